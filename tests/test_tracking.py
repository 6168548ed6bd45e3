"""MLflow tracking (slimrec.tracking) on a small synthetic lake: no pipeline, no Spark, no Ray.

The lake holds hand-written ``metrics`` rows of one train_recommender run, its ``recommender_runs`` row and
two students; a command is logged into a real SQLite store and read back with MLflow's own client.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from datetime import UTC, date, datetime

import pandas as pd
import pytest
from slimrec.config import ConfigError, load_config
from slimrec.lake import CommitInfo, Lake
from slimrec.stages.base import StageContext
from slimrec.tracking import (
    HTTP_ENV,
    check_tracking,
    is_secret_key,
    redact_uri,
    resolve_uri,
    track_command,
)

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

RUN_DATE = date(2024, 1, 2)
INPUTS = {"user_sequences": 3, "items": 1, "student_rationales": 2, "item_embeddings": None}
COLS = ["backbone", "variant", "protocol", "split", "seed", "hr_10", "hr_20", "ndcg_10", "ndcg_20", "mrr", "n_users",
        "coverage_10", "coverage_20", "gini_10", "popularity_pct_10", "novelty_10", "ild_10"]
N = None  # not measured: null in the table, never a metric
ROWS = [
    ("sasrec", "base", "full", "test", 0, 0.30, 0.45, 0.151, 0.188, 0.120, 40, 0.25, 0.40, 0.71, 62.5, 9.8, 0.43),
    ("sasrec", "base", "full", "test", 1, 0.32, 0.47, 0.162, 0.199, 0.131, 40, 0.27, 0.42, 0.69, 61.0, 9.9, N),
    ("sasrec", "base", "sampled100", "test", 0, 0.61, 0.80, 0.402, 0.451, 0.355, 40, N, N, N, N, N, N),
    ("sasrec", "base", "sampled100", "test", 1, 0.63, 0.81, 0.413, 0.460, 0.361, 40, N, N, N, N, N, N),
    ("sasrec", "base", "full", "valid", 0, 0.35, 0.50, 0.170, 0.210, 0.140, 40, N, N, N, N, N, N),
    ("sasrec", "base", "full", "valid", 1, 0.36, 0.52, 0.175, 0.216, 0.142, 40, N, N, N, N, N, N),
    ("sasrec", "slim", "full", "test", 0, 0.33, 0.49, 0.170, 0.205, 0.138, 40, 0.22, 0.37, 0.74, 65.0, 9.5, 0.41),
    ("sasrec", "slim", "full", "test", 1, 0.31, 0.48, 0.166, 0.201, 0.133, 40, 0.23, 0.38, 0.73, 64.2, 9.6, 0.40),
    ("sasrec", "slim", "sampled100", "test", 0, 0.66, 0.83, 0.431, 0.478, 0.380, 40, N, N, N, N, N, N),
    ("none", "popular", "full", "test", 0, 0.10, 0.15, 0.052, 0.064, 0.047, 40, 0.02, 0.04, 0.98, 99.1, 5.2, 0.55),
    ("none", "popular", "sampled100", "test", 0, 0.40, 0.58, 0.231, 0.276, 0.200, 40, N, N, N, N, N, N),
    ("none", "popular", "full", "valid", 0, 0.11, 0.16, 0.055, 0.066, 0.049, 40, N, N, N, N, N, N),
]
SECRET_S3 = "s3cr3t-value"
OVERRIDES = [
    'spark.extra_conf={"spark.hadoop.fs.s3a.secret.key": "' + SECRET_S3 + '", "spark.app.id": "visible"}',
    "ray_address=ray://admin:hunter2@head:10001",
    "teacher.http.system_prompt=" + "x" * 7000,
]


def _synthetic_lake(lake: Lake) -> None:
    info = CommitInfo("train_recommender", RUN_DATE, "rec1", "cfg", INPUTS)
    m = pd.DataFrame(ROWS, columns=COLS).assign(run_id="rec1", dataset="tiny")
    m["seed"] = m["seed"].astype("int32")
    lake.write_arrow("metrics", m, "append", info)
    # an experiment's run (planted signal) finished later: never what a command's MLflow run shows
    lake.write_arrow("metrics", m.assign(run_id="planted-p1", ndcg_10=0.9), "append",
                     CommitInfo("train_recommender", RUN_DATE, "planted-p1"))
    now = datetime(2024, 1, 2, 5, tzinfo=UTC)
    notes = {"encoder": "all-MiniLM-L6-v2:st:norm:256", "teacher_model": None,
             "rationale_coverage": {"student": {"model_version": "student-abc", "users_with_vector": 40},
                                    "teacher": {"model_version": "offline-cooc-v1", "users_with_vector": 10}}}
    runs = pd.DataFrame([
        {"run_id": "rec1", "dataset": "tiny", "config": "{}", "best_backbone": "sasrec", "best_variant": "slim",
         "n_users": 40, "n_items": 30, "notes": json.dumps(notes), "started_ts": now, "finished_ts": now},
        {"run_id": "planted-p1", "dataset": "tiny", "config": "{}", "best_backbone": "sasrec", "best_variant": "slim",
         "n_users": 40, "n_items": 30, "notes": json.dumps({"leakage": "planted"}), "started_ts": now,
         "finished_ts": now + pd.Timedelta(hours=1)},
    ])
    lake.write_arrow("recommender_runs", runs, "append", info)
    figures = {"heldout_token_f1_student": 0.52, "heldout_parse_ok_rate_student": 0.94,
               "history": {"train_loss": [2.5, 2.0]}}
    students = pd.DataFrame([
        {"model_version": "student-old", "base_model": "builtin:tiny-llama", "adapter_path": "/m/old",
         "lora_config": "{}", "train_rows": 10, "heldout_rows": 2, "train_loss": 3.0, "val_loss": 3.1,
         "heldout_rouge_l_student": 0.2, "heldout_rouge_l_base": 0.1, "metrics": "{}", "created_ts": now},
        {"model_version": "student-abc", "base_model": "builtin:tiny-llama", "adapter_path": "/m/abc",
         "lora_config": "{}", "train_rows": 900, "heldout_rows": 100, "train_loss": 2.0, "val_loss": 1.95,
         "heldout_rouge_l_student": 0.47, "heldout_rouge_l_base": 0.08, "metrics": json.dumps(figures),
         "created_ts": now},
    ])
    lake.write_arrow("student_models", students, "append", CommitInfo("distill_student", RUN_DATE, "d1"))


def _versions(lake: Lake) -> dict[str, int]:
    return {t["table"]: t["version"] for t in lake.tables()}


def _reports(folder, run_id):
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for ext, body in (("html", "<html>report</html>"), ("md", "# report"), ("json", '{"run_id": "x"}')):
        paths[ext] = folder / f"run-{RUN_DATE}-{run_id}.{ext}"
        paths[ext].write_text(body)
    return paths


def _context(lake, run_id, *extra) -> StageContext:
    cfg = load_config("tiny", None, [*OVERRIDES, *extra])
    return StageContext(cfg=cfg, lake=lake, run_date=RUN_DATE, run_id=run_id)


def _command_run(client: MlflowClient, run_id: str):
    exp = client.get_experiment_by_name("slimrec")
    found = client.search_runs([exp.experiment_id],
                               f"tags.`slimrec.run_id` = '{run_id}' and tags.`slimrec.level` = 'command'")
    assert len(found) == 1
    return found[0]


def _children(client: MlflowClient, parent):
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A synthetic lake; ``slim run`` (its own train_recommender run, rec1) and a later ``slim refresh``
    (which kept rec1) logged into the lake's default store."""
    root = tmp_path_factory.mktemp("tracking")
    lake = Lake(root / "lake")
    _synthetic_lake(lake)
    lake.record_run("rec1", {"started": "2024-01-02T03:04:05+00:00"})
    before = _versions(lake)
    ctx = _context(lake, "rec1")
    run_id = track_command(ctx, "run", _reports(root / "reports", "rec1"))
    refresh_id = track_command(_context(lake, "ref1"), "refresh", _reports(root / "reports", "ref1"))
    uri = resolve_uri(ctx.cfg.tracking, lake.root)
    return {"lake": lake, "uri": uri, "client": MlflowClient(uri), "run": run_id, "refresh": refresh_id,
            "before": before, "root": root}


def test_the_default_store_is_a_sqlite_database_under_the_lake(tracked):
    lake = tracked["lake"]
    assert tracked["uri"] == f"sqlite:///{lake.root}/_mlflow/mlflow.db"
    assert (tracked["root"] / "lake" / "_mlflow" / "mlflow.db").is_file()
    assert tracked["run"] and tracked["refresh"]
    assert _versions(lake) == tracked["before"]  # tracking reads the lake, never writes it


def test_every_metrics_row_value_is_a_metric_of_its_nested_run(tracked):
    client = tracked["client"]
    parent = _command_run(client, "rec1")
    assert parent.info.run_id == tracked["run"]
    children = {c.info.run_name: c for c in _children(client, parent)}
    table = tracked["lake"].read_pandas("metrics", filters=[("run_id", "=", "rec1")])
    assert len(table) == len(ROWS)
    expected: dict[str, dict[str, float]] = {}
    for r in table.to_dict(orient="records"):
        want = expected.setdefault(f"{r['backbone']}/{r['variant']}/seed{r['seed']}", {})
        for c in COLS[5:]:
            if r[c] is not None and not (isinstance(r[c], float) and math.isnan(r[c])):
                want[f"{r['split']}/{r['protocol']}/{c}"] = float(r[c])
    assert sorted(children) == sorted(expected) == [
        "none/popular/seed0", "sasrec/base/seed0", "sasrec/base/seed1", "sasrec/slim/seed0", "sasrec/slim/seed1"]
    for name, want in expected.items():
        assert children[name].data.metrics == want, name  # value by value, and nothing else
    # spot checks against the hand-written rows
    assert children["sasrec/base/seed1"].data.metrics["test/full/ndcg_10"] == 0.162
    assert children["sasrec/base/seed1"].data.metrics["test/sampled100/mrr"] == 0.361
    assert children["none/popular/seed0"].data.metrics["test/full/gini_10"] == 0.98
    assert "test/full/ild_10" not in children["sasrec/base/seed1"].data.metrics  # null: not measured
    assert "valid/full/coverage_10" not in children["sasrec/base/seed0"].data.metrics
    for name, c in children.items():
        backbone, variant, seed = name.split("/")
        assert c.data.params == {"backbone": backbone, "variant": variant, "seed": seed[len("seed"):]}
        assert c.info.status == "FINISHED"
        assert c.data.tags["slimrec.metrics_run_id"] == "rec1"


def test_command_params_hold_config_versions_and_model_keys(tracked):
    client = tracked["client"]
    parent = _command_run(client, "rec1")
    p = parent.data.params
    cfg = load_config("tiny", None, OVERRIDES)
    assert p["slimrec.config_hash"] == cfg.config_hash() == parent.data.tags["slimrec.config_hash"]
    assert p["config.recommender.seeds"] == "[0]"
    assert p["config.dataset_name"] == "tiny"
    assert p["config.teacher.http.api_key_env"] == "OPENAI_API_KEY"  # a variable's name, not a secret
    # what train_recommender read (the metrics rows' lineage) and the lake after the command
    assert p["input_versions.user_sequences"] == "3"
    assert p["input_versions.student_rationales"] == "2"
    assert p["input_versions.item_embeddings"] == "null"
    assert p["table_versions.metrics"] == "1"
    assert p["table_versions.student_models"] == "0"
    assert p["model.student_version"] == "student-abc"
    assert p["model.encoder"] == "all-MiniLM-L6-v2:st:norm:256"
    assert p["model.teacher"] == "offline-cooc-v1"
    assert p["model.recommender_run_id"] == "rec1"
    assert p["model.best_variant"] == "slim"
    assert len(p["config.teacher.http.system_prompt"]) <= 6000  # MLflow's limit; config.json has it whole
    assert parent.info.start_time == int(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp() * 1000)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["slimrec.metrics_from_this_command"] == "true"


def test_secrets_never_reach_mlflow(tracked, tmp_path):
    client = tracked["client"]
    parent = _command_run(client, "rec1")
    p = parent.data.params
    assert p["config.spark.extra_conf.spark.hadoop.fs.s3a.secret.key"] == "***"
    assert p["config.spark.extra_conf.spark.app.id"] == "visible"
    assert p["config.ray_address"] == "ray://***@head:10001"
    config_json = client.download_artifacts(parent.info.run_id, "config.json", str(tmp_path))
    text = open(config_json).read()
    everything = text + json.dumps(p) + json.dumps(parent.data.tags)
    assert SECRET_S3 not in everything and "hunter2" not in everything
    assert json.loads(text)["teacher"]["http"]["system_prompt"] == "x" * 7000


def test_artifacts_are_the_report_the_results_and_the_students_figures(tracked, tmp_path):
    client = tracked["client"]
    parent = _command_run(client, "rec1")
    rid = parent.info.run_id
    assert sorted(a.path for a in client.list_artifacts(rid, "report")) == [
        f"report/run-{RUN_DATE}-rec1.{e}" for e in ("html", "json", "md")]
    rows = pd.read_csv(client.download_artifacts(rid, "results/metrics_rows.csv", str(tmp_path)))
    assert len(rows) == len(ROWS) and set(rows["run_id"]) == {"rec1"}
    summary = pd.read_csv(client.download_artifacts(rid, "results/results_summary.csv", str(tmp_path)))
    base = summary[(summary["protocol"] == "full") & (summary["variant"] == "base")].iloc[0]
    assert base["ndcg_10_mean"] == pytest.approx((0.151 + 0.162) / 2)
    student = json.load(open(client.download_artifacts(rid, "student/student_model.json", str(tmp_path))))
    assert student["model_version"] == "student-abc"
    assert student["metrics"]["heldout_token_f1_student"] == 0.52
    m = parent.data.metrics
    assert m["student/heldout_rouge_l_student"] == 0.47
    assert m["student/heldout_rouge_l_base"] == 0.08
    assert m["student/heldout_token_f1_student"] == 0.52
    assert m["student/train_rows"] == 900


def test_a_refresh_that_kept_the_recommender_shows_that_runs_metrics(tracked):
    client = tracked["client"]
    parent = _command_run(client, "ref1")
    assert parent.info.run_id == tracked["refresh"]
    assert parent.data.tags["slimrec.command"] == "refresh"
    assert parent.data.tags["slimrec.metrics_run_id"] == "rec1"
    assert parent.data.tags["slimrec.metrics_from_this_command"] == "false"
    children = {c.info.run_name: c.data.metrics for c in _children(client, parent)}
    assert children["sasrec/slim/seed0"]["test/sampled100/ndcg_10"] == 0.431
    assert len(children) == 5


def _one_warning(caplog) -> logging.LogRecord:
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    return warnings[0]


def test_an_unreachable_server_warns_once_and_the_run_goes_on(tmp_lake, tmp_path, caplog, monkeypatch):
    for k in HTTP_ENV:
        monkeypatch.delenv(k, raising=False)
    _synthetic_lake(tmp_lake)
    before = _versions(tmp_lake)
    ctx = _context(tmp_lake, "rec1", "tracking.mlflow_uri=http://127.0.0.1:1")  # nothing listens on port 1
    caplog.set_level(logging.INFO)
    t0 = time.perf_counter()
    assert track_command(ctx, "run", _reports(tmp_path, "rec1")) is None
    assert time.perf_counter() - t0 < 20  # one retry after 1 s, not MLflow's 7 retries over minutes
    msg = _one_warning(caplog).getMessage()
    assert "http://127.0.0.1:1" in msg and "Connection refused" in msg and "\n" not in msg
    assert _versions(tmp_lake) == before
    assert len(tmp_lake.read_pandas("metrics")) == 2 * len(ROWS)
    assert not any(k in os.environ for k in HTTP_ENV)  # MLflow's settings are the command's only while it logs


def test_a_server_that_never_answers_costs_the_timeout(tmp_lake, caplog, monkeypatch):
    for k in HTTP_ENV:
        monkeypatch.delenv(k, raising=False)
    _synthetic_lake(tmp_lake)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        ctx = _context(tmp_lake, "rec1", f"tracking.mlflow_uri={uri}", "tracking.http_timeout_s=1",
                       "tracking.http_max_retries=0")
        caplog.set_level(logging.INFO)
        t0 = time.perf_counter()
        assert track_command(ctx, "run") is None
        assert time.perf_counter() - t0 < 10
    assert "timed out" in _one_warning(caplog).getMessage().lower()


def test_tracking_off_logs_nothing(tmp_lake):
    _synthetic_lake(tmp_lake)
    for off in ("tracking.mlflow_uri=null", "tracking.mlflow_uri="):
        ctx = _context(tmp_lake, "rec1", off)
        assert resolve_uri(ctx.cfg.tracking, tmp_lake.root) is None
        assert track_command(ctx, "run") is None
    assert not os.path.exists(os.path.join(tmp_lake.root, "_mlflow"))


def test_resolve_uri_places_paths_and_keeps_urls(tmp_path, monkeypatch):
    def uri(value, root="/data/lake"):
        return resolve_uri(load_config("tiny", None, [f"tracking.mlflow_uri={value}"]).tracking, root)

    assert uri("_mlflow/mlflow.db") == "sqlite:////data/lake/_mlflow/mlflow.db"
    assert uri("/srv/mlflow.db") == "sqlite:////srv/mlflow.db"
    assert uri("http://mlflow:5000") == "http://mlflow:5000"
    assert uri("databricks") == "databricks"
    monkeypatch.chdir(tmp_path)  # an object-store lake keeps its store in the lake's local folder
    from slimrec.lake import Lake

    root = Lake("s3://bucket/lake").local_root
    assert uri("m.db", root=root) == f"sqlite:///{tmp_path.resolve()}/.slimrec-local/bucket/lake/m.db"


def test_check_tracking_names_the_missing_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "alembic" else real(name, *a))
    tcfg = load_config("tiny").tracking
    with pytest.raises(ConfigError, match="pip install 'mlflow-skinny"):
        check_tracking(tcfg, "/data/lake")
    check_tracking(load_config("tiny", None, ["tracking.mlflow_uri=http://mlflow:5000"]).tracking, "/data/lake")
    check_tracking(load_config("tiny", None, ["tracking.mlflow_uri=null"]).tracking, "/data/lake")


@pytest.mark.parametrize("key, secret", [
    ("spark.extra_conf.spark.hadoop.fs.s3a.secret.key", True),
    ("spark.extra_conf.fs.azure.account.key.acct.dfs.core.windows.net", True),
    ("spark.extra_conf.spark.hadoop.fs.s3a.access.key", True),
    ("teacher.http.api_key", True),
    ("x.password", True),
    ("x.hf_token", True),
    ("teacher.http.api_key_env", False),
    ("teacher.max_tokens", False),
    ("student.infer.pass_tokens", False),
    ("recommender.prior_weight_grid", False),
])
def test_secret_keys(key, secret):
    assert is_secret_key(key) is secret


def test_redact_uri():
    assert redact_uri("https://u:p@mlflow.example.com:8443/x") == "https://***@mlflow.example.com:8443/x"
    assert redact_uri("http://mlflow:5000") == "http://mlflow:5000"
    assert redact_uri("no uri @ all") == "no uri @ all"
    assert redact_uri("https://api.example.com/v1?api_key=k123&model=m&flag") == (
        "https://api.example.com/v1?api_key=***&model=m&flag")


def test_slim_run_refuses_tracking_it_cannot_do_before_any_stage(tmp_path, monkeypatch):
    import importlib.util

    from slimrec.cli import app
    from typer.testing import CliRunner

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    r = CliRunner().invoke(app, ["run", "--lake", str(tmp_path / "lake"), "--from", "build_sequences",
                                 "--profile", "tiny"])
    assert r.exit_code == 2, r.output
    assert "error: tracking.mlflow_uri" in r.output and "tracking.mlflow_uri=null" in r.output
    assert not (tmp_path / "lake" / "_runs").exists()  # refused before the run was recorded or any stage ran


def test_the_config_log_line_of_a_command_holds_no_secret(tmp_path, caplog):
    from slimrec.cli import _context

    with caplog.at_level(logging.INFO, logger="slimrec"):
        ctx = _context(str(tmp_path / "lake"), "tiny", None, OVERRIDES[:2], None, dry_run=True)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("config (profile tiny"))
    assert SECRET_S3 not in line and "hunter2" not in line
    assert '"spark.app.id": "visible"' in line and "head:10001" in line  # only the secrets go
    assert ctx.cfg.spark.extra_conf["spark.hadoop.fs.s3a.secret.key"] == SECRET_S3  # the config itself keeps them
