"""Run report: per-stage figures and the metrics table, for the terminal and as files."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from slimrec.report_html import render_html
from slimrec.results import (  # noqa: F401 - re-exported: callers import these from here
    BEYOND_COLS,
    BEYOND_LABELS,
    METRIC_COLS,
    beyond_summary,
    latest_beyond_reasons,
    latest_metrics,
    latest_missing,
    latest_paired,
    latest_run,
    metrics_summary,
    paired_reference,
    paired_title,
    stage_table,
)
from slimrec.stages.base import StageResult

log = logging.getLogger(__name__)


def _records(df: pd.DataFrame) -> list[dict]:
    """Rows as dicts with NaN as None (strict JSON readers refuse NaN)."""
    return df.astype(object).where(df.notna(), None).to_dict(orient="records")


def format_missing(missing: dict[str, str]) -> str:
    """One line per variant that was configured but could not run, or "" when none."""
    return "\n".join(f"not run: {v}: {why}" for v, why in missing.items())


def format_paired(paired: pd.DataFrame) -> str:
    if paired.empty:
        return "(no paired comparison: no model or baseline without an LLM, or per-user results missing)"
    ref = paired_reference(paired)
    w = max(10, len(ref))
    vw = max(16, int(paired["variant"].str.len().max()))
    lines = [f"{'protocol':<11} {'backbone':<9} {'variant':<{vw}} {'users':>6} {'seeds':>5}  {'NDCG@10':>8} "
             f"{ref:>{w}} {'diff':>8} {'paired SE':>9} {'diff/SE':>7}  better/worse users"]
    for r in paired.itertuples(index=False):
        if r.se and r.se == r.se:
            z = f"{r.mean_diff / r.se:>+7.2f}"
        else:  # no spread: every user scores the same under both (e.g. a prior weight of 0 on validation)
            z = f"{'same' if r.users_better == r.users_worse == 0 else 'n/a':>7}"
        lines.append(f"{r.protocol:<11} {r.backbone:<9} {r.variant:<{vw}} {r.n_users:>6} {r.n_seeds:>5}  "
                     f"{r.variant_ndcg_10:>8.4f} {r.reference_ndcg_10:>{w}.4f} {r.mean_diff:>+8.4f} {r.se:>9.4f} "
                     f"{z}  {r.users_better}/{r.users_worse}")
    return "\n".join(lines)


def format_metrics(summary: pd.DataFrame) -> str:
    if summary.empty:
        return "(no metrics: train_recommender has not run)"
    w = max(16, int(summary["variant"].str.len().max()))  # popular@teacher_users and the like
    lines = [f"{'protocol':<11} {'backbone':<9} {'variant':<{w}} {'seeds':>5}  " + "  ".join(f"{c:>15}" for c in METRIC_COLS)]
    for r in summary.itertuples(index=False):
        d = r._asdict()
        vals = "  ".join(f"{d[c + '_mean']:.4f}±{d[c + '_std']:.4f}" for c in METRIC_COLS)
        lines.append(f"{r.protocol:<11} {r.backbone:<9} {r.variant:<{w}} {r.seeds:>5}  {vals}")
    return "\n".join(lines)


def _pm_or_dash(mean: float, std: float, digits: int) -> str:
    return "-" if mean != mean else f"{mean:.{digits}f}±{std:.{digits}f}"


def format_beyond(beyond: pd.DataFrame, reasons: dict[str, list[str]] | None = None) -> str:
    """Beyond-accuracy figures beside NDCG@10, one line per (backbone, variant): :func:`beyond_summary`'s
    frame; "-" for a figure not measured, whose reason (``reasons``) is listed below the table."""
    if beyond.empty:
        return "(no beyond-accuracy figures: the run predates them or measured none)"
    w = max(16, int(beyond["variant"].str.len().max()))
    cols = ["ndcg_10", *BEYOND_COLS]
    labels = {"ndcg_10": "NDCG@10", **BEYOND_LABELS}
    lines = [f"{'backbone':<9} {'variant':<{w}} {'seeds':>5}  " + "  ".join(f"{labels[c]:>17}" for c in cols)]
    for r in beyond.itertuples(index=False):
        d = r._asdict()
        vals = "  ".join(f"{_pm_or_dash(d[c + '_mean'], d[c + '_std'], 2 if c == 'popularity_pct_10' else 4):>17}"
                         for c in cols)
        lines.append(f"{r.backbone:<9} {r.variant:<{w}} {r.seeds:>5}  {vals}")
    lines += [f"not measured: {k}: {'; '.join(v)}" for k, v in (reasons or {}).items()]
    return "\n".join(lines)


def format_stages(stages: pd.DataFrame) -> str:
    lines = [f"{'stage':<20} {'status':<8} {'seconds':>8} {'rows in':>10} {'rows out':>10} {'cost $':>8}  note"]
    for r in stages.itertuples(index=False):
        lines.append(f"{r.stage:<20} {r.status:<8} {r.seconds:>8.1f} {r.rows_in:>10,} {r.rows_out:>10,} {r.cost_usd:>8.4f}  {r.note}")
    return "\n".join(lines)


def write_report(lake, results: list[StageResult], out_dir: str | Path, run_id: str, run_date,
                 cfg=None) -> dict[str, Path]:
    """Write ``run-<date>-<run_id>.json``, ``.md`` and a one-file ``.html`` report with charts.

    ``cfg``: the run's PipelineConfig, for the cost table's prices (None: the defaults)."""
    from slimrec.config import PipelineConfig
    from slimrec.cost import COST_NOTE, format_cost_table, format_variant_costs, run_cost_tables

    cfg = cfg or PipelineConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = stage_table(results)
    summary = metrics_summary(latest_metrics(lake))
    costs, variant_cost = run_cost_tables(lake, results, cfg, summary)
    beyond = beyond_summary(summary)
    reasons = latest_beyond_reasons(lake)
    paired = latest_paired(lake)
    missing = latest_missing(lake)
    stem = out / f"run-{run_date}-{run_id}"
    payload = {
        "run_id": run_id,
        "run_date": str(run_date),
        "written_at": datetime.now(tz=UTC).isoformat(timespec="seconds"),
        "stages": stages.to_dict(orient="records"),
        # NaN (a figure not measured) as null: strict JSON readers refuse NaN
        "metrics": summary.astype(object).where(summary.notna(), None).to_dict(orient="records"),
        "beyond_not_measured": reasons,
        "missing_variants": missing,
        "paired_reference": paired_reference(paired),
        "paired_vs_reference": paired.to_dict(orient="records"),
        "prices": cfg.cost.model_dump(mode="json"),
        "stage_costs": _records(costs),
        "variant_costs": _records(variant_cost),
    }
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md")}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str))
    paths["html"] = stem.with_suffix(".html")
    paths["html"].write_text(render_html(lake, results, run_id, run_date, cfg=cfg))
    paths["md"].write_text(
        f"# slimrec run {run_id} ({run_date})\n\n## Stages\n\n```\n{format_stages(stages)}\n```\n\n"
        f"## Metrics (test target; mean±std over seeds; full ranking first)\n\n```\n{format_metrics(summary)}\n```\n"
        f"\n## Beyond accuracy (test users' full-ranking top-K lists; mean±std over seeds)\n\n"
        f"```\n{format_beyond(beyond, reasons)}\n```\n"
        + (f"\nVariants configured but not run:\n\n```\n{format_missing(missing)}\n```\n" if missing else "")
        + f"\n## {paired_title(paired)}\n\nPaired per user, test NDCG@10 averaged over seeds."
        f"\n\n```\n{format_paired(paired)}\n```\n"
        f"\n## Cost per stage (this run)\n\n```\n{format_cost_table(costs, cfg.cost)}\n```\n"
        f"\n## Gain over text per $1,000 and per hour\n\n{COST_NOTE}\n\n```\n{format_variant_costs(variant_cost)}\n```\n"
    )
    return paths
