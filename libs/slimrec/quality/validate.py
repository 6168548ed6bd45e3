"""Great Expectations gates: validate the slice a stage wrote, store the results, stop on failure.

``validate_table`` runs a table's suite (``schemas/expectations.py``) with Great
Expectations 1.x against a Spark DataFrame of the slice that version N wrote
(``slices.py``), in one ephemeral GE context per process (nothing is written
to the working directory). ``gate`` also appends the per-expectation results
to ``dq_results`` and raises :class:`QualityGateError` when the suite fails,
so the runner stops before a later stage reads the table.

GE evaluates a suite on Spark in two passes, because on small tables the cost
is the number of Spark jobs, and asking every expectation for its offending
rows costs several jobs each:

1. the whole suite with ``BOOLEAN_ONLY`` (GE bundles the aggregates into a few
   jobs) gives pass/fail per expectation;
2. each failed expectation, and each one whose observed value carries
   information even when it passes (aggregates, ``mostly`` thresholds), is run
   again alone with ``SUMMARY`` and the table's key as
   ``unexpected_index_column_names``: observed value, unexpected count and a
   few offending rows.

A strict map expectation (no ``mostly``) that passed had no unexpected value:
its unexpected count is recorded as 0 without a second pass.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from slimrec.lake import CommitInfo, Lake
from slimrec.quality.config import QualityConfig
from slimrec.quality.derive import RefReader, add_derived
from slimrec.quality.slices import QualityError, Slice, plan_slice, read_slice
from slimrec.schemas.expectations import Check, Suite, Thresholds, suite_for
from slimrec.schemas.tables import TABLES, spec

log = logging.getLogger(__name__)

_AGGREGATE = {"ExpectTableRowCountToBeBetween"}  # not row-wise: observed value only from a second pass


class QualityGateError(QualityError):
    """A table's expectation suite failed; the pipeline must not feed it forward."""

    def __init__(self, report: ValidationReport):
        self.report = report
        super().__init__(
            f"quality gate failed, pipeline stopped before any later stage reads {report.table}\n"
            + report.summary(failures_only=True)
        )


# ---------------------------------------------------------------------- results
@dataclass
class ExpectationOutcome:
    check_id: str
    expectation: str  # GE type, e.g. expect_column_values_to_not_be_null
    column: str | None
    catches: str
    success: bool
    kwargs: dict[str, Any]
    observed: str | None = None
    unexpected_count: int | None = None
    element_count: int | None = None
    offending_rows: list[dict[str, Any]] = field(default_factory=list)
    exception: str | None = None

    def describe(self) -> str:
        kw = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if k not in ("batch_id",))
        return f"{self.expectation}({kw})"


@dataclass
class ValidationReport:
    table: str
    suite: str
    success: bool
    version: int | None = None
    run_date: date | None = None
    slice: str = ""
    rows: int | None = None
    outcomes: list[ExpectationOutcome] = field(default_factory=list)
    validation_id: str = ""
    run_id: str = ""
    notes: list[str] = field(default_factory=list)  # e.g. a referenced table that does not exist
    reference_versions: dict[str, int | None] = field(default_factory=dict)
    missing: bool = False  # the table (or that version) was never written
    seconds: float = 0.0
    docs_index: str | None = None  # Data Docs index.html when rendered
    ge_result: Any = field(default=None, repr=False)  # the merged gx ExpectationSuiteValidationResult

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def outcome(self, check_id: str) -> ExpectationOutcome:
        for o in self.outcomes:
            if o.check_id == check_id:
                return o
        raise KeyError(f"{self.table}: no outcome {check_id!r}")

    def summary(self, failures_only: bool = False) -> str:
        if self.missing:
            return f"{self.table}: NOT VALIDATED: {self.notes[0] if self.notes else 'never written'}"
        verdict = "PASSED" if self.success else "FAILED"
        lines = [
            f"{self.table} version {self.version}, run_date {self.run_date}, {self.slice}, {self.rows} rows: "
            f"suite {self.suite} {verdict} ({len(self.failures)} of {len(self.outcomes)} expectations failed)"
        ]
        lines += [f"  note: {n}" for n in self.notes]
        for o in self.outcomes:
            if o.success and failures_only:
                continue
            lines.append(f"  {'ok    ' if o.success else 'FAILED'} {o.describe()}  [{o.catches}]")
            if not o.success:
                if o.exception:
                    lines.append(f"      error: {o.exception}")
                if o.observed is not None:
                    lines.append(f"      observed: {o.observed}")
                if o.offending_rows:
                    lines.append("      offending rows:")
                    lines += [f"        {_json(r)}" for r in o.offending_rows]
        if self.docs_index:
            lines.append(f"  data docs: {self.docs_index}")
        return "\n".join(lines)

    def raise_for_failure(self) -> ValidationReport:
        if not self.success:
            raise QualityGateError(self)
        return self

    def dq_rows(self) -> list[dict[str, Any]]:
        """One ``dq_results`` row per expectation (columns as in ``schemas/tables.py``)."""
        now = datetime.now(tz=UTC)
        rows = []
        for o in self.outcomes:
            details = {
                "check": o.catches,
                "kwargs": o.kwargs,
                "slice": self.slice,
                "rows": self.rows,
                "run_id": self.run_id,
                "element_count": o.element_count,
                "offending_rows": o.offending_rows,
                "exception": o.exception,
                "reference_versions": self.reference_versions,
                "notes": self.notes,
            }
            rows.append(
                dict(
                    validation_id=self.validation_id,
                    table_name=self.table,
                    table_version=self.version,
                    suite=self.suite,
                    suite_success=self.success,
                    expectation=o.expectation,
                    column_name=o.column,
                    success=o.success,
                    observed=o.observed,
                    unexpected_count=o.unexpected_count,
                    details=_json(details),
                    validated_ts=now,
                    run_date=self.run_date,
                )
            )
        return rows


def _json(v: Any) -> str:
    return json.dumps(v, default=str, sort_keys=True)


# ---------------------------------------------------------------------- config
def resolve_thresholds(cfg) -> Thresholds:
    """Thresholds from a ``QualityConfig`` or a whole ``PipelineConfig``.

    ``None`` thresholds follow the stage settings they mirror: those of the
    given PipelineConfig, else those settings' defaults.
    """
    from slimrec.config import PromptsConfig, SequencesConfig

    shape = None
    if isinstance(cfg, QualityConfig):
        q, seq, prompts = cfg, SequencesConfig(), PromptsConfig()
    else:
        q, seq, prompts = cfg.quality, cfg.sequences, cfg.prompts
        if cfg.student.infer.constrained:
            from slimrec.rationale_shape import shape_regex
            from slimrec.student.config import rationale_shape

            shape = shape_regex(rationale_shape(cfg.student))
    return Thresholds(
        min_seq_len=q.min_seq_len if q.min_seq_len is not None else seq.min_seq_len,
        max_seq_len=q.max_seq_len if q.max_seq_len is not None else seq.max_seq_len,
        max_prompt_chars=q.max_prompt_chars if q.max_prompt_chars is not None else prompts.max_chars,
        max_rationale_chars=q.max_rationale_chars,
        min_three_step_share=q.min_three_step_share,
        rationale_statuses=tuple(q.rationale_statuses),
        rationale_sources=tuple(q.rationale_sources),
        embedding_dims=tuple(sorted(q.embedding_dims.items())),
        metric_protocol_pattern=q.metric_protocol_pattern,
        non_empty_tables=tuple(q.non_empty_tables),
        student_shape_regex=shape,
    )


def _quality_cfg(cfg) -> QualityConfig:
    return cfg if isinstance(cfg, QualityConfig) else cfg.quality


# ---------------------------------------------------------------------- GE context
_GX: dict[str, Any] = {}


def gx_context():
    """One ephemeral GE context per process, with a Spark datasource (GE is slow to start)."""
    if "context" not in _GX:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        _GX.update(context=ctx, batch_definitions={}, docs_sites={})
    return _GX["context"]


def _batch(table: str, df):
    ctx = gx_context()
    if "datasource" not in _GX:
        # Added only once a session runs: without one GE would start its own SparkSession.
        # persist=False: the slice is already cached by us, once.
        _GX["datasource"] = ctx.data_sources.add_spark(name="slimrec", persist=False)
    bds = _GX["batch_definitions"]
    if table not in bds:
        asset = _GX["datasource"].add_dataframe_asset(name=table)
        bds[table] = asset.add_batch_definition_whole_dataframe("slice")
    return bds[table].get_batch(batch_parameters={"dataframe": df})


# ---------------------------------------------------------------------- outcome parsing
def _is_strict_map(check: Check) -> bool:
    return check.expectation not in _AGGREGATE and check.kwargs.get("mostly") in (None, 1, 1.0)


def _clean(v: Any) -> Any:
    """JSON-friendly values for the offending rows (dates, numpy scalars, NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan", "inf": strict JSON has no literal for them
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            return v.item()
        except (ValueError, AttributeError):
            return str(v)
    if isinstance(v, (date, datetime)):
        return v.isoformat()
    return v


def _outcome(check: Check, res, detailed: bool, n_rows: int) -> ExpectationOutcome:
    exc = None
    info = getattr(res, "exception_info", None) or {}
    if isinstance(info, dict):
        if info.get("raised_exception"):
            exc = info.get("exception_message")
        else:  # keyed by metric when several metrics raised
            for v in info.values():
                if isinstance(v, dict) and v.get("raised_exception"):
                    exc = v.get("exception_message")
                    break
    o = ExpectationOutcome(
        check_id=check.id,
        expectation=check.type,
        column=check.column,
        catches=check.catches,
        success=bool(res.success),
        kwargs={k: v for k, v in dict(check.kwargs).items()},
        exception=exc,
    )
    result = dict(res.result or {})
    if not detailed:
        if o.success and _is_strict_map(check):
            o.unexpected_count = 0
            o.element_count = n_rows
            o.observed = "0 unexpected"
        return o
    if "observed_value" in result:
        o.observed = _json(_clean(result["observed_value"])) if not isinstance(result["observed_value"], str) else result["observed_value"]
    if "unexpected_count" in result:
        o.unexpected_count = int(result["unexpected_count"])
        o.element_count = result.get("element_count")
        pct = result.get("unexpected_percent") or 0.0
        sample = [_clean(v) for v in result.get("partial_unexpected_list") or []]
        o.observed = f"{o.unexpected_count} of {o.element_count} rows unexpected ({pct:.1f}%)"
        if sample:
            o.observed += f"; values {_json(sample)}"
    o.offending_rows = [_clean(r) for r in result.get("partial_unexpected_index_list") or []]
    return o


# ---------------------------------------------------------------------- validation
def _missing_report(table: str, suite_name: str, why: str, version: int | None, run_date: date | None):
    return ValidationReport(
        table=table, suite=suite_name, success=False, version=version, run_date=run_date, missing=True, notes=[why]
    )


def _get_spark(spark):
    if spark is not None:
        return spark
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    from slimrec.config import SparkConfig
    from slimrec.spark import get_spark

    return get_spark(SparkConfig())


def validate_table(
    lake: Lake,
    table: str,
    *,
    cfg,
    spark=None,
    version: int | None = None,
    run_date: date | None = None,
    run_id: str = "",
    docs_dir: str | Path | None = None,
) -> ValidationReport:
    """Validate the slice version ``version`` (default: latest) of ``table`` wrote.

    ``cfg`` is the ``QualityConfig`` or the whole ``PipelineConfig`` (better:
    thresholds left at None then follow the stage settings). ``run_date``
    defaults to the one stored with the commit. A table (or version) never
    written gives a report with ``missing=True`` and ``success=False``, not an
    exception; an unknown table name raises :class:`QualityError`.
    ``docs_dir`` renders Great Expectations Data Docs (HTML) there.
    """
    t0 = time.perf_counter()
    if table not in TABLES:
        raise QualityError(f"unknown table {table!r}; known: {', '.join(sorted(TABLES))}")
    qcfg = _quality_cfg(cfg)
    th = resolve_thresholds(cfg)
    suite_name = suite_for(table, th, run_date or date.today()).name
    if not lake.exists(table):
        return _missing_report(
            table, suite_name, f"table {table} has never been written under {lake.root} (has its stage run?)",
            version, run_date,
        )
    latest = lake.version(table)
    if version is None:
        version = latest
    elif version < 0 or version > latest:
        return _missing_report(
            table, suite_name, f"table {table} has no version {version} (versions 0..{latest})", version, run_date
        )
    spark = _get_spark(spark)
    sl = plan_slice(lake, table, version, run_date)
    suite = suite_for(table, th, sl.run_date)
    report = ValidationReport(
        table=table,
        suite=suite.name,
        success=False,
        version=version,
        run_date=sl.run_date,
        slice=sl.describe(),
        run_id=run_id,
        validation_id=f"{run_id or uuid.uuid4().hex[:12]}:{table}@{version}",
    )
    df, cached = _prepare(lake, spark, sl, suite, th, qcfg, report)
    try:
        _run_suite(df, suite, spec(table).key, qcfg, report)
    finally:
        for d in cached:
            d.unpersist()
    report.success = all(o.success for o in report.outcomes)
    if docs_dir is not None:
        report.docs_index = render_docs(report, docs_dir)
    report.seconds = round(time.perf_counter() - t0, 2)
    log.info(
        "quality: %s v%s %s: %s (%d rows, %d/%d failed, %.1fs)", table, version, sl.kind,
        "passed" if report.success else "FAILED", report.rows, len(report.failures), len(report.outcomes),
        report.seconds,
    )
    return report


def _prepare(lake: Lake, spark, sl: Slice, suite: Suite, th: Thresholds, qcfg: QualityConfig, report):
    """Read the slice, add the derived columns and cache the result (one Spark partition when small).

    Returns ``(df, cached)``: the DataFrame to validate and every DataFrame cached for it.
    """
    df = read_slice(lake, spark, sl)
    cached = []
    if suite.derived:
        # Derived columns read the slice more than once (distinct ids, modes): read the files once.
        df = df.cache()
        cached.append(df)
    refs = RefReader(lake, spark, sl.input_versions)
    df = add_derived(df, suite, refs, th, qcfg.max_listed_missing_ids)
    # The table's row count at that version (Delta metadata) bounds the slice's: GE runs many tiny
    # jobs, and on a small slice one task per job beats several.
    if lake.count(sl.table, sl.version) <= qcfg.small_slice_rows:
        df = df.coalesce(1)
    df = df.cache()
    cached.append(df)
    report.rows = df.count()
    report.notes += refs.notes
    report.reference_versions = dict(refs.versions)
    return df, cached


def _index_columns(df, check: Check, key: tuple[str, ...]) -> list[str]:
    cols = [c for c in (*key, *check.show) if c in df.columns]
    return list(dict.fromkeys(cols))


def _run_suite(df, suite: Suite, key: tuple[str, ...], qcfg: QualityConfig, report: ValidationReport) -> None:
    batch = _batch(suite.table, df)
    first = batch.validate(suite.to_gx(), result_format="BOOLEAN_ONLY")
    by_id = {r.expectation_config.meta.get("check_id"): r for r in first.results}
    merged = []
    for check in suite.checks:
        res = by_id[check.id]
        if res.success and (_is_strict_map(check) or check.expectation == "ExpectTableRowCountToBeBetween"):
            o = _outcome(check, res, detailed=False, n_rows=report.rows or 0)
            if check.expectation == "ExpectTableRowCountToBeBetween":
                o.observed = str(report.rows)  # the slice's row count, counted once in _prepare
            report.outcomes.append(o)
            merged.append(res)
            continue
        fmt = {
            "result_format": "SUMMARY",
            "partial_unexpected_count": qcfg.offending_rows,
            "unexpected_index_column_names": _index_columns(df, check, key),
        }
        detail = batch.validate(check.to_gx(), result_format=fmt)
        report.outcomes.append(_outcome(check, detail, detailed=True, n_rows=report.rows or 0))
        merged.append(detail)
    first.results = merged
    first.success = all(r.success for r in merged)
    report.ge_result = first


# ---------------------------------------------------------------------- dq_results and docs
def write_dq_results(lake: Lake, report: ValidationReport, info: CommitInfo | None = None) -> int | None:
    """Append the report's per-expectation rows to ``dq_results``; returns the new Delta version."""
    if report.missing or not report.outcomes:
        return None
    import pyarrow as pa

    info = info or CommitInfo(
        stage="quality",
        run_date=report.run_date,
        run_id=report.run_id,
        input_versions={report.table: report.version},
        extra={"validated_table": report.table, "suite_success": report.success},
    )
    rows = report.dq_rows()
    data = pa.Table.from_pylist(rows).append_column(
        "input_versions", pa.array([_json({report.table: report.version})] * len(rows), pa.string())
    )
    return lake.write_arrow("dq_results", data, "append", info)


def render_docs(report: ValidationReport, docs_dir: str | Path) -> str | None:
    """Render the report as Great Expectations Data Docs under ``docs_dir``; returns index.html's path."""
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    if report.ge_result is None:
        return None
    ctx = gx_context()
    root = Path(docs_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    sites = _GX["docs_sites"]
    if str(root) not in sites:
        name = f"slimrec_docs_{len(sites)}"
        ctx.add_data_docs_site(
            name,
            {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(root)},
            },
        )
        sites[str(root)] = name
    run = RunIdentifier(run_name=report.run_id or report.validation_id, run_time=datetime.now(tz=UTC))
    key = ValidationResultIdentifier(
        ExpectationSuiteIdentifier(name=report.suite), run, batch_identifier=f"{report.table}-v{report.version}"
    )
    ctx.validation_results_store.store_validation_results(report.ge_result, key)
    ctx.build_data_docs(site_names=[sites[str(root)]], resource_identifiers=[key])
    index = root / "index.html"
    return str(index) if index.exists() else None


def gate(
    lake: Lake,
    table: str,
    *,
    cfg,
    spark=None,
    version: int | None = None,
    run_date: date | None = None,
    run_id: str = "",
    info: CommitInfo | None = None,
    docs_dir: str | Path | None = None,
) -> ValidationReport:
    """Validate, append the results to ``dq_results``, raise :class:`QualityGateError` on failure.

    A table the stage did not write (``missing``) also fails the gate: the
    runner only gates tables the stage reports as written.
    """
    report = validate_table(
        lake, table, cfg=cfg, spark=spark, version=version, run_date=run_date, run_id=run_id, docs_dir=docs_dir
    )
    if table != "dq_results":
        write_dq_results(lake, report, info)
    return report.raise_for_failure()
