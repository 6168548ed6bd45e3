"""End to end: the ``refreshed`` lake's ``slim run`` and two ``slim refresh`` ran with tracking on (the default
``tracking.mlflow_uri``, a SQLite store under the lake); MLflow's own client reads back one run per command
whose nested runs hold the ``metrics`` table's values."""

from __future__ import annotations

import math

import pytest
from slimrec.results import latest_run

pytestmark = pytest.mark.slow


def test_run_and_refreshes_are_mlflow_runs_that_match_the_metrics_table(refreshed):
    from mlflow.tracking import MlflowClient

    lake = refreshed["lake"]
    client = MlflowClient(f"sqlite:///{lake.root}/_mlflow/mlflow.db")
    exp = client.get_experiment_by_name("slimrec")
    commands = client.search_runs([exp.experiment_id], "tags.`slimrec.level` = 'command'",
                                  order_by=["attributes.start_time ASC"])
    assert [r.data.tags["slimrec.command"] for r in commands] == ["run", "refresh", "refresh"]
    assert all(r.info.status == "FINISHED" for r in commands)
    assert "mlflow: run" in refreshed["log0"] and "mlflow: run" in refreshed["log1"]

    rec = str(latest_run(lake)["run_id"])
    run = commands[0]
    assert run.data.tags["slimrec.run_id"] == rec == run.data.tags["slimrec.metrics_run_id"]
    for refresh in commands[1:]:  # no --retrain: the refresh shows the recommender it kept
        assert refresh.data.tags["slimrec.metrics_run_id"] == rec
        assert refresh.data.tags["slimrec.metrics_from_this_command"] == "false"

    rows = lake.read_pandas("metrics", filters=[("run_id", "=", rec)])
    children = {c.info.run_name: c.data.metrics for c in client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
    expected: dict[str, dict[str, float]] = {}
    figures = ["hr_10", "hr_20", "ndcg_10", "ndcg_20", "mrr", "n_users", "coverage_10", "coverage_20", "gini_10",
               "popularity_pct_10", "novelty_10", "ild_10"]
    for r in rows.to_dict(orient="records"):
        want = expected.setdefault(f"{r['backbone']}/{r['variant']}/seed{r['seed']}", {})
        for c in figures:
            if r[c] is not None and not (isinstance(r[c], float) and math.isnan(r[c])):
                want[f"{r['split']}/{r['protocol']}/{c}"] = float(r[c])
    assert children == expected
    assert {p: run.data.params[p] for p in ("config.profile", "model.recommender_run_id")} == {
        "config.profile": "tiny", "model.recommender_run_id": rec}
    assert run.data.params["table_versions.metrics"] == str(refreshed["v0"]["metrics"])
