"""The generated results page (slim report): figures from the lake, provenance, README markers, errors."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import pandas as pd
import pytest
from slimrec.cli import app
from slimrec.lake import CommitInfo, LakeError
from slimrec.results_page import (
    END,
    START,
    readme_block,
    replace_between_markers,
    results_markdown,
    write_results,
)
from typer.testing import CliRunner

INFO = CommitInfo("test", date(2024, 1, 2), "r1")
PAIRED = {"backbone": "sasrec", "variant": "slim", "reference": "sasrec/cooc_prior", "protocol": "full",
          "n_users": 40, "n_seeds": 2, "variant_ndcg_10": 0.0555, "reference_ndcg_10": 0.0552, "mean_diff": 0.0003,
          "se": 0.0004, "users_better": 19, "users_worse": 16}


def _run(lake, run_id, finished, ndcg_base, notes=None):
    base = dict(run_id=run_id, dataset="d", split="test", hr_10=0.0, hr_20=0.0, ndcg_20=0.0, mrr=0.0, n_users=40)
    rows = []
    for protocol, shift in (("full", 0.0), ("sampled100", 0.2)):
        for seed, noise in ((0, -0.01), (1, 0.01)):
            rows.append({**base, "backbone": "sasrec", "variant": "base", "protocol": protocol, "seed": seed,
                         "ndcg_10": ndcg_base + shift + noise})
            rows.append({**base, "backbone": "none", "variant": "random", "protocol": protocol, "seed": seed,
                         "ndcg_10": 0.001 + shift})
    m = pd.DataFrame(rows)
    m["seed"] = m["seed"].astype("int32")
    lake.write_arrow("metrics", m, "append", INFO)
    lake.write_arrow("recommender_runs", pd.DataFrame({
        "run_id": [run_id], "dataset": ["d"], "config": ["{}"], "best_backbone": ["sasrec"], "best_variant": ["base"],
        "n_users": [40], "n_items": [12], "notes": [json.dumps(notes or {})],
        "started_ts": [finished], "finished_ts": [finished]}), "append", INFO)


def test_page_shows_mean_std_both_protocols_paired_and_provenance(tmp_lake):
    _run(tmp_lake, "run1", datetime(2024, 1, 2, 10, tzinfo=UTC), 0.05, {"paired_vs_reference": [PAIRED]})
    tmp_lake.record_run("run1", {"command": "slim run --dataset x --lake lake", "machine": "box: 2 CPUs"})
    page = results_markdown(tmp_lake, "lake", now=datetime(2024, 1, 3, tzinfo=UTC))
    assert "`slim report --lake lake` on 2024-01-03 00:00 UTC" in page
    assert "| finished | 2024-01-02 10:00 UTC |" in page
    assert "`slim run --dataset x --lake lake`" in page and "box: 2 CPUs" in page
    # seeds 0.04 and 0.06: mean 0.05, sample std 0.0141; sampled-100 shifted by 0.2
    assert "| sasrec | base | 2 | 0.0500 ± 0.0141 |" in page
    assert "| sasrec | base | 2 | 0.2500 ± 0.0141 |" in page
    assert page.index("## full ranking") < page.index("## sampled-100")
    assert "| full ranking | sasrec | slim | 40 | 0.0555 | 0.0552 | +0.0003 ± 0.0004 | +0.75 | 19/16 |" in page
    block = readme_block(tmp_lake, "lake")
    assert "| base | 0.0500 ± 0.0141 | 0.2500 ± 0.0141 |" in block
    assert "| random | 0.0010 ± 0.0000 | 0.2010 ± 0.0000 |" in block
    assert "run1 of 2024-01-02 10:00 UTC, `slim run --dataset x --lake lake`" in block


def test_page_skips_planted_experiment_runs(tmp_lake):
    _run(tmp_lake, "clean", datetime(2024, 1, 2, tzinfo=UTC), 0.05)
    _run(tmp_lake, "planted", datetime(2024, 1, 5, tzinfo=UTC), 0.5, {"leakage": "LEAKAGE BY DESIGN"})
    page = results_markdown(tmp_lake, "lake")
    assert "`clean`" in page and "planted" not in page
    assert "0.5000" not in page
    assert "command | `not recorded" in page  # a run without a run record says so


def test_write_results_fills_readme_markers_only(tmp_lake, tmp_path):
    _run(tmp_lake, "run1", datetime(2024, 1, 2, tzinfo=UTC), 0.05)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{START}\nold table\n{END}\nafter\n")
    out = tmp_path / "docs" / "results.md"
    write_results(tmp_lake, out, readme, label="lake")
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n" + START + "\n") and text.endswith(END + "\nafter\n")
    assert "old table" not in text and "| base | 0.0500 ± 0.0141 |" in text
    assert out.read_text().startswith("# Current results")
    with pytest.raises(LakeError, match="markers"):
        replace_between_markers("no markers here", "x")


def test_slim_report_without_results_is_one_line(tmp_path):
    r = CliRunner().invoke(app, ["report", "--lake", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.md")])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "holds no train_recommender results" in lines[0]
    assert "Traceback" not in r.output and not (tmp_path / "r.md").exists()


def test_cli_records_command_and_machine_but_not_for_a_dry_run(tmp_lake, monkeypatch):
    from types import SimpleNamespace

    from slimrec import cli

    monkeypatch.setattr(cli.sys, "argv", ["/venv/bin/slim", "run", "--dataset", "my data", "--lake", "lake"])
    cli._record_run(SimpleNamespace(dry_run=False, lake=tmp_lake, run_id="abc"), "dev")
    rec = tmp_lake.run_record("abc")
    assert rec["command"] == "slim run --dataset 'my data' --lake lake" and rec["profile"] == "dev"
    assert "CPUs" in rec["machine"]
    cli._record_run(SimpleNamespace(dry_run=True, lake=tmp_lake, run_id="dry"), "dev")
    assert tmp_lake.run_record("dry") is None


def test_a_planted_run_is_never_the_latest_run_of_the_product(tmp_lake):
    """What `slim run` prints and what serving rescores with come from the latest run without leakage."""
    from slimrec.results import latest_metrics, latest_run

    _run(tmp_lake, "clean", datetime(2024, 1, 2, tzinfo=UTC), 0.05)
    _run(tmp_lake, "planted", datetime(2024, 1, 5, tzinfo=UTC), 0.5, {"leakage": "LEAKAGE BY DESIGN"})
    assert latest_run(tmp_lake)["run_id"] == "clean"
    assert set(latest_metrics(tmp_lake)["run_id"]) == {"clean"}
    assert latest_run(tmp_lake, without_leakage=False)["run_id"] == "planted"  # only when asked for


def test_the_readme_table_keeps_all_user_rows_and_the_page_keeps_the_subsets(tmp_lake):
    _run(tmp_lake, "run1", datetime(2024, 1, 2, tzinfo=UTC), 0.05)
    sub = tmp_lake.read_pandas("metrics")
    sub = sub[sub.variant == "base"].assign(variant="base@teacher_users")
    tmp_lake.write_arrow("metrics", sub.drop(columns=["run_date", "input_versions"], errors="ignore"), "append", INFO)
    assert "base@teacher_users" not in readme_block(tmp_lake, "lake")
    assert "| base |" in readme_block(tmp_lake, "lake")
    assert "base@teacher_users" in results_markdown(tmp_lake, "lake")


def test_page_shows_beyond_accuracy_beside_ndcg(tmp_lake):
    _run(tmp_lake, "run1", datetime(2024, 1, 2, 10, tzinfo=UTC), 0.05,
         {"beyond_not_measured": {"all/ild_10": ["no item text vectors in this run"]}})
    page = results_markdown(tmp_lake, "lake")
    assert "## Beyond accuracy" not in page  # rows written without the figures: no section
    m = tmp_lake.read_pandas("metrics")
    full = m.protocol == "full"
    # base: coverage@10 0.2 and 0.4 -> 0.3 ± 0.1414; popularity percentile 80 and 90 -> 85 ± 7.07
    m.loc[full, "coverage_10"] = [0.2 if (v, s) == ("base", 0) else 0.4 if v == "base" else 0.9
                                  for v, s in zip(m.variant[full], m.seed[full], strict=True)]
    m.loc[full, "coverage_20"] = 0.95
    m.loc[full, "popularity_pct_10"] = [80.0 if (v, s) == ("base", 0) else 90.0 if v == "base" else 50.0
                                        for v, s in zip(m.variant[full], m.seed[full], strict=True)]
    m.loc[full, ["gini_10", "novelty_10"]] = [0.6, 4.0]
    tmp_lake.write_arrow("metrics", m.drop(columns=["run_date", "input_versions"]), "overwrite", INFO)
    page = results_markdown(tmp_lake, "lake")
    section = page.split("## Beyond accuracy (full ranking)")[1]
    assert ("| sasrec | base | 2 | 0.0500 ± 0.0141 | 0.3000 ± 0.1414 | 0.9500 ± 0.0000 | 0.6000 ± 0.0000 | "
            "85.00 ± 7.07 | 4.0000 ± 0.0000 | - |") in section
    assert "Not measured: all/ild_10: no item text vectors in this run." in section
