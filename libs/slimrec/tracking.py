"""MLflow tracking: one MLflow run per ``slim run`` / ``slim refresh``, read back from the lake.

``slim run --dataset data/amazon_office_2014 --lake lake --profile dev`` logs into
``lake/_mlflow/mlflow.db`` (the default ``tracking.mlflow_uri``: a local SQLite store, its artifacts in
``lake/_mlflow/artifacts``); ``--set tracking.mlflow_uri=http://host:5000`` sends the run to a tracking
server and ``--set tracking.mlflow_uri=null`` turns tracking off. (mlflow-skinny's file store, ``./mlruns``,
refuses to open unless ``MLFLOW_ALLOW_FILE_STORE=true``: MLflow keeps it in maintenance mode.)

The Delta tables stay the source of truth. Once a command has written its tables and its report, this
module reads them back and logs a view of them; it writes nothing to the lake. A tracking server that is
down or refuses a request costs one warning (the reason on one log line): the command goes on and ends as
it would have, with every row in its tables.

What one command logs (MlflowClient; a nested run carries its parent's id in the ``mlflow.parentRunId`` tag)::

    <command> <run_date> <run_id>        params   config.<key>: the resolved config, flattened, secrets redacted
                                                  input_versions.<table>: what train_recommender read
                                                  table_versions.<table>: the lake after the command
                                                  model.<key>: student model_version, teacher, encoder,
                                                  recommender run id, best backbone and variant
                                         metrics  student/<figure>: the fidelity figures of the student used
                                         artifacts report/ (the run report: HTML, MD, JSON),
                                                  results/metrics_rows.csv (the metrics rows as read),
                                                  results/results_summary.csv (mean and std over seeds),
                                                  student/student_model.json, config.json
      <backbone>/<variant>/seed<n>       params   backbone, variant, seed
                                         metrics  <split>/<protocol>/<column>: the metrics rows' values

Metrics are those of the train_recommender run the report shows (:func:`slimrec.results.latest_run`): the
command's own when it trained, else the run it kept (a refresh without ``--retrain``, a run whose
train_recommender was skipped); the ``slimrec.metrics_run_id`` tag names it. A figure the table holds as
null (not measured) is not logged. Example: the metrics row ``(sasrec, base, full, test, seed 0, ndcg_10 =
0.041)`` is the metric ``test/full/ndcg_10 = 0.041`` of the run ``sasrec/base/seed0``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import numbers
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from slimrec.config import ConfigError, PipelineConfig, TrackingConfig
from slimrec.results import latest_run, metrics_summary
from slimrec.schemas.tables import TABLES, spec

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'mlflow-skinny==3.18.0' 'sqlalchemy>=2,<3' 'alembic>=1.13,<2' (or pip install -e .)"
# MLflow's own limits (mlflow.utils.validation): longer param values are cut, longer keys refused.
MAX_PARAM_VALUE_CHARS = 6000
MAX_KEY_CHARS = 250
MAX_TAG_VALUE_CHARS = 8000
REDACTED = "***"
# MLflow's HTTP client reads these at each request; the tracking config's value applies unless the
# environment already sets one.
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "http_timeout_s",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "http_max_retries",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "http_backoff_factor",
}
# Words of a config key whose value is a secret (the key split at . _ - and lower-cased). A key ending in
# _env holds the *name* of an environment variable (teacher.http.api_key_env), which is no secret.
_SECRET_WORDS = {"password", "passwd", "secret", "token", "credential", "credentials", "apikey", "auth",
                 "authorization", "sas", "signature"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("account", "key"), ("session", "token")}
_BAD_NAME_CHARS = re.compile(r"[^\w./\- ]+")


# ---------------------------------------------------------------------------------------------- config
def resolve_uri(tcfg: TrackingConfig, lake_root: str | Path) -> str | None:
    """The tracking URI for MLflow, or None when tracking is off.

    A URI with a scheme is kept (``http://host:5000``, ``sqlite:////srv/mlflow.db``, ``databricks``); a file
    path becomes a local SQLite store, a relative one under ``lake_root`` (:attr:`slimrec.lake.Lake.local_root`:
    the lake root, or for an object-store lake its local folder; ``_mlflow/mlflow.db`` ->
    ``sqlite:////.../lake/_mlflow/mlflow.db``).
    """
    uri = (tcfg.mlflow_uri or "").strip()
    if not uri:
        return None
    if uri == "databricks" or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri):
        return uri
    path = Path(uri).expanduser()
    if not path.is_absolute():
        path = Path(lake_root) / path
    return f"sqlite:///{path.resolve()}"


def local_database(uri: str) -> Path | None:
    """The file of a local SQLite store (``sqlite:////srv/mlflow.db`` -> ``/srv/mlflow.db``), else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_tracking(tcfg: TrackingConfig, lake_root: str | Path) -> None:
    """Fail before the pipeline runs (ConfigError) when tracking is on but cannot work here."""
    uri = resolve_uri(tcfg, lake_root)
    if uri is None:
        return
    off = "or turn tracking off with --set tracking.mlflow_uri=null"
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"tracking.mlflow_uri is {redact_uri(uri)} but MLflow is not installed: {INSTALL_HINT}; {off}")
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme in ("sqlite", "postgresql", "mysql", "mssql") and not all(
            importlib.util.find_spec(m) for m in ("sqlalchemy", "alembic")):
        raise ConfigError(f"tracking.mlflow_uri {redact_uri(uri)}: a database store needs SQLAlchemy and alembic, "
                          f"which mlflow-skinny does not bring: {INSTALL_HINT}; {off}")


def redact_uri(value: str) -> str:
    """A URL without its secrets: ``https://user:pass@host/v1?api_key=k&x=1`` -> ``https://***@host/v1?api_key=***&x=1``
    (the user part, and query parameters whose name :func:`is_secret_key` flags); other strings unchanged."""
    if "://" not in value or not ("@" in value or "?" in value):
        return value
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if parts.username or parts.password:
        netloc = f"{REDACTED}@{parts.hostname or ''}" + (f":{port}" if port else "")
    query = "&".join(
        f"{k}={REDACTED}" if is_secret_key(k) else (f"{k}={v}" if sep else k)
        for k, sep, v in (q.partition("=") for q in parts.query.split("&"))) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) config key names a secret: ``spark.extra_conf.spark.hadoop.fs.s3a.secret.key``,
    ``x.api_key``, ``x.password`` are; ``teacher.http.api_key_env`` (an env variable's name) and
    ``teacher.max_tokens`` are not."""
    if key.endswith("_env"):
        return False
    words = [w for w in re.split(r"[._\-/ ]+", key.lower()) if w]
    return bool(_SECRET_WORDS & set(words)) or any(p in _SECRET_PAIRS for p in zip(words, words[1:], strict=False))


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1, "c": {}}}`` -> ``{"a.b": 1, "a.c": {}}`` (lists and empty dicts are leaves)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _name(key: str) -> str:
    """A param, metric or tag name MLflow accepts: odd characters become ``_``, at most 250 characters."""
    return _BAD_NAME_CHARS.sub("_", key)[:MAX_KEY_CHARS]


def _value(v: Any, limit: int = MAX_PARAM_VALUE_CHARS) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    s = redact_uri(s)
    return s if len(s) <= limit else s[: limit - 40] + " ... [cut; whole value in config.json]"


def redacted_config(cfg: PipelineConfig) -> dict:
    """The resolved config as JSON data with every secret-like value replaced by ``***``."""
    def walk(d: Any, prefix: str) -> Any:
        if isinstance(d, dict):
            return {k: (REDACTED if is_secret_key(f"{prefix}{k}") and not isinstance(v, dict)
                        else walk(v, f"{prefix}{k}.")) for k, v in d.items()}
        if isinstance(d, str):
            return redact_uri(d)
        return d

    return walk(cfg.model_dump(mode="json"), "")


def config_params(cfg: PipelineConfig) -> dict[str, str]:
    """``config.<dotted key>`` -> value as text, for every leaf of the resolved config (secrets redacted)."""
    return {_name(f"config.{k}"): _value(v) for k, v in flatten(redacted_config(cfg)).items()}


def _not_a_retry(record: logging.LogRecord) -> bool:
    """urllib3 logs each retry of a request as a warning; the one warning of a failed tracking says it all."""
    return not record.getMessage().startswith("Retrying")


@contextmanager
def http_settings(tcfg: TrackingConfig):
    """MLflow's HTTP timeout and retries from ``tcfg`` for the block (the environment's own values win):
    its defaults (120 s, 7 retries with backoff) would hold a run for minutes on a server that is down.
    urllib3's retry warnings are dropped meanwhile."""
    saved = {k: os.environ.get(k) for k in HTTP_ENV}
    for k, attr in HTTP_ENV.items():
        os.environ.setdefault(k, str(getattr(tcfg, attr)))
    pool_log = logging.getLogger("urllib3.connectionpool")
    pool_log.addFilter(_not_a_retry)
    try:
        yield
    finally:
        pool_log.removeFilter(_not_a_retry)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------- the view
def metric_columns() -> list[str]:
    """The ``metrics`` table's numeric figures (from its declaration): hr_10 ... mrr, n_users, the
    beyond-accuracy columns; key and lineage columns excluded."""
    s = spec("metrics")
    return [c.name for c in s.columns if c.type in ("float64", "int64", "int32") and c.name not in s.key]


def row_metrics(row: pd.Series | dict, columns: list[str]) -> dict[str, float]:
    """One metrics row -> ``{"<split>/<protocol>/<column>": value}``, nulls left out.

    Example: ``{split: test, protocol: full, ndcg_10: 0.04, gini_10: None}`` -> ``{"test/full/ndcg_10": 0.04}``.
    """
    out = {}
    for c in columns:
        v = row.get(c)
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            continue
        out[_name(f"{row['split']}/{row['protocol']}/{c}")] = float(v)
    return out


@dataclass
class Child:
    """A nested run: its name, params and metrics."""

    name: str
    params: dict[str, str]
    metrics: dict[str, float]


@dataclass
class RunView:
    """What one command logs, read from the lake (see the module docstring)."""

    name: str
    started_ms: int
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    children: list[Child]
    texts: dict[str, str]  # artifact file -> content
    files: list[tuple[str, str]]  # (local path, artifact folder)


def metric_children(rows: pd.DataFrame) -> list[Child]:
    """One nested run per (backbone, variant, seed) of a run's metrics rows, holding every
    ``<split>/<protocol>/<column>`` of that seed's rows (both protocols, both splits)."""
    if rows.empty:
        return []
    cols = [c for c in metric_columns() if c in rows.columns]
    out = []
    for (backbone, variant, seed), g in rows.groupby(["backbone", "variant", "seed"], sort=True):
        values: dict[str, float] = {}
        for _, r in g.iterrows():
            values.update(row_metrics(r, cols))
        out.append(Child(f"{backbone}/{variant}/seed{seed}",
                         {"backbone": str(backbone), "variant": str(variant), "seed": str(int(seed))}, values))
    return out


def _table_versions(lake) -> dict[str, int]:
    return {t: v for t in TABLES if (v := lake.version(t)) is not None}


def _student(lake, model_version: str | None) -> tuple[dict | None, dict[str, float]]:
    """The ``student_models`` row of ``model_version`` (its metrics JSON parsed) and its numeric figures."""
    if not model_version or not lake.exists("student_models"):
        return None, {}
    rows = lake.read_pandas("student_models", filters=[("model_version", "=", model_version)])
    if rows.empty:
        return None, {}
    row = rows.iloc[[-1]].to_dict(orient="records")[0]
    figures = json.loads(row.get("metrics") or "{}")
    row["metrics"] = figures
    numeric = {f"student/{k}": float(v) for k, v in {**row, **figures}.items()
               if isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(float(v))}
    return row, {_name(k): v for k, v in numeric.items()}


def _started_ms(lake, run_id: str) -> int:
    started = (lake.run_record(run_id) or {}).get("started")
    try:
        return int(datetime.fromisoformat(started).timestamp() * 1000)
    except (TypeError, ValueError):
        return int(time.time() * 1000)


def collect(lake, cfg: PipelineConfig, command: str, run_id: str, run_date,
            report_paths: dict[str, Path] | None = None) -> RunView:
    """Read what a command left in the lake into a :class:`RunView` (nothing is sent anywhere)."""
    run = latest_run(lake)
    rows = pd.DataFrame()
    notes: dict = {}
    if run is not None and lake.exists("metrics"):
        rows = lake.read_pandas("metrics", filters=[("run_id", "=", str(run["run_id"]))])
        notes = json.loads(run["notes"] or "{}")
    if not rows.empty:
        rows = rows.sort_values(["backbone", "variant", "seed", "split", "protocol"]).reset_index(drop=True)
    rationales = notes.get("rationale_coverage") or {}
    model = {
        "student_version": (rationales.get("student") or {}).get("model_version") or None,
        "teacher": (rationales.get("teacher") or {}).get("model_version") or notes.get("teacher_model"),
        "encoder": notes.get("encoder"),
        "recommender_run_id": None if run is None else str(run["run_id"]),
        "best_backbone": None if run is None else run["best_backbone"],
        "best_variant": None if run is None else run["best_variant"],
    }
    student_row, student_metrics = _student(lake, model["student_version"])
    inputs = json.loads(rows["input_versions"].iloc[0] or "{}") if not rows.empty else {}
    params = {
        **config_params(cfg),
        **{_name(f"input_versions.{t}"): _value(v) for t, v in sorted(inputs.items())},
        **{_name(f"table_versions.{t}"): str(v) for t, v in sorted(_table_versions(lake).items())},
        **{_name(f"model.{k}"): _value(v) for k, v in model.items() if v is not None},
        "slimrec.command": command, "slimrec.run_id": run_id, "slimrec.run_date": str(run_date),
        "slimrec.config_hash": cfg.config_hash(),
    }
    metrics_run = model["recommender_run_id"] or ""
    tags = {"slimrec.command": command, "slimrec.run_id": run_id, "slimrec.run_date": str(run_date),
            "slimrec.config_hash": cfg.config_hash(), "slimrec.profile": cfg.profile, "slimrec.dataset": cfg.dataset_name,
            "slimrec.lake": redact_uri(lake.root), "slimrec.metrics_run_id": metrics_run,
            "slimrec.metrics_from_this_command": str(metrics_run == run_id).lower(), "slimrec.level": "command",
            "mlflow.note.content": f"`slim {command}` {run_id} on the lake {redact_uri(lake.root)}: a view of its "
            f"Delta tables, which stay the source of truth. Metrics: train_recommender run {metrics_run or '(none)'}"
            ", one nested run per backbone/variant/seed."}
    texts = {"config.json": json.dumps(redacted_config(cfg), indent=2, sort_keys=True)}
    if not rows.empty:
        texts["results/metrics_rows.csv"] = rows.to_csv(index=False)
        texts["results/results_summary.csv"] = metrics_summary(rows).to_csv(index=False)
    if student_row is not None:
        texts["student/student_model.json"] = json.dumps(student_row, indent=2, sort_keys=True, default=str)
    files = [(str(p), "report") for p in (report_paths or {}).values() if Path(p).is_file()]
    return RunView(name=f"{command} {run_date} {run_id}", started_ms=_started_ms(lake, run_id),
                   tags={k: _value(v, MAX_TAG_VALUE_CHARS) for k, v in tags.items()}, params=params,
                   metrics=student_metrics, children=metric_children(rows), texts=texts, files=files)


# ---------------------------------------------------------------------------------------------- logging
def _metric_list(values: dict[str, float], now_ms: int):
    from mlflow.entities import Metric

    return [Metric(k, v, now_ms, 0) for k, v in sorted(values.items())]


def _param_list(values: dict[str, str]):
    from mlflow.entities import Param

    return [Param(k, v) for k, v in sorted(values.items())]


def log_view(view: RunView, uri: str, tcfg: TrackingConfig) -> str:
    """Log ``view`` as one MLflow run with its nested runs; returns the MLflow run id. Raises on any failure
    (after marking a run it had created FAILED, when the server still answers)."""
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = MlflowClient(tracking_uri=uri)
    parent = None
    with http_settings(tcfg):
        try:
            exp = client.get_experiment_by_name(tcfg.experiment)
            if exp is None:
                # A local database keeps its artifacts beside it (MLflow's default is ./mlruns wherever the
                # command started); a server decides for itself.
                db = local_database(uri)
                exp_id = client.create_experiment(
                    tcfg.experiment, artifact_location=(db.parent / "artifacts").as_uri() if db else None)
            else:
                exp_id = exp.experiment_id
            now = int(time.time() * 1000)
            parent = client.create_run(exp_id, start_time=view.started_ms, tags=view.tags, run_name=view.name).info.run_id
            client.log_batch(parent, metrics=_metric_list(view.metrics, now), params=_param_list(view.params))
            for name, text in sorted(view.texts.items()):
                client.log_text(parent, text, name)
            for path, folder in view.files:
                client.log_artifact(parent, path, folder)
            for c in view.children:
                tags = {MLFLOW_PARENT_RUN_ID: parent, "slimrec.level": "seed",
                        **{k: view.tags[k] for k in ("slimrec.run_id", "slimrec.metrics_run_id")}}
                rid = client.create_run(exp_id, start_time=view.started_ms, tags=tags, run_name=c.name).info.run_id
                client.log_batch(rid, metrics=_metric_list(c.metrics, now), params=_param_list(c.params))
                client.set_terminated(rid)
            client.set_terminated(parent)
            return parent
        except Exception:
            if parent:
                try:
                    client.set_terminated(parent, RunStatus.to_string(RunStatus.FAILED))
                except Exception as e:  # noqa: BLE001 - the first failure is the one reported
                    log.debug("tracking: could not mark run %s failed: %s", parent, e)
            raise


def _reason(exc: BaseException) -> str:
    """One line: the exception's first line (cut) and its innermost cause (MLflow wraps urllib3's errors)."""
    def first(e: BaseException, limit: int) -> str:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"

    inner = exc
    while (nxt := inner.__cause__ or inner.__context__) is not None:
        inner = nxt
    return first(exc, 160) + (f" (cause: {first(inner, 160)})" if inner is not exc else "")


def track_command(ctx, command: str, report_paths: dict[str, Path] | None = None) -> str | None:
    """Log the command ``ctx`` ran as one MLflow run (when ``tracking.mlflow_uri`` is set); its MLflow run
    id, or None when tracking is off or failed. Never raises: a failure is one warning, and the lake, which
    already holds everything, is untouched."""
    tcfg = ctx.cfg.tracking
    uri = resolve_uri(tcfg, ctx.lake.local_root)
    if uri is None or ctx.dry_run:
        return None
    t0 = time.perf_counter()
    try:
        view = collect(ctx.lake, ctx.cfg, command, ctx.run_id, ctx.run_date, report_paths)
        run_id = log_view(view, uri, tcfg)
    except Exception as e:  # noqa: BLE001 - tracking never fails a run that has written its tables
        log.warning("tracking: MLflow at %s failed, the run goes on without it (the lake holds every row): %s",
                    redact_uri(uri), _reason(e))
        return None
    log.info("tracking: MLflow run %s at %s (%d nested runs, %d params) in %.1fs",
             run_id, redact_uri(uri), len(view.children), len(view.params), time.perf_counter() - t0)
    return run_id
