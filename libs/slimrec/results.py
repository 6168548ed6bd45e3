"""What a train_recommender run left in the lake, as frames: the data side of every report.

Reads ``recommender_runs`` and ``metrics`` (mean and std over seeds, the paired per-user
comparison against the strongest no-LLM reference, the variants that did not run) and turns
a pipeline run's stage results into a table. The text report (:mod:`slimrec.report`), the HTML
page (:mod:`slimrec.report_html`) and the generated results page (:mod:`slimrec.results_page`)
format these frames; this module formats nothing and imports none of them.
"""

from __future__ import annotations

import json

import pandas as pd

from slimrec.recommender.beyond import BEYOND_NAMES
from slimrec.stages.base import StageResult

METRIC_COLS = ["ndcg_10", "hr_10", "ndcg_20", "hr_20", "mrr"]
# Beyond accuracy (slimrec.recommender.beyond): measured on the test split's full-ranking top-K lists only.
BEYOND_COLS = list(BEYOND_NAMES)
BEYOND_LABELS = {"coverage_10": "Coverage@10", "coverage_20": "Coverage@20", "gini_10": "Gini@10",
                 "popularity_pct_10": "Popularity pct@10", "novelty_10": "Novelty@10 (bits)", "ild_10": "ILD@10"}


def stage_table(results: list[StageResult]) -> pd.DataFrame:
    rows = []
    for r in results:
        rows.append({
            "stage": r.stage,
            "status": "skipped" if r.skipped else "ran",
            "seconds": r.extra.get("seconds", 0.0),
            "rows_in": r.rows_in,
            "rows_out": r.rows_out,
            "cost_usd": r.extra.get("cost_usd", 0.0),
            "note": r.extra.get("reason", ""),
        })
    return pd.DataFrame(rows)


def metrics_summary(metrics: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Mean and std over seeds per (backbone, variant, protocol); full ranking first.

    Input: rows of the ``metrics`` table for one run. Output columns:
    protocol, backbone, variant, seeds, then ``<metric>_mean`` / ``<metric>_std`` for the accuracy
    metrics and the beyond-accuracy figures (:data:`BEYOND_COLS`; NaN where not measured: the
    sampled protocol, runs before them, ILD without item vectors).
    """
    if metrics.empty:
        return pd.DataFrame()
    m = metrics[metrics["split"] == split]
    if m.empty:
        return pd.DataFrame()
    m = m.assign(**{c: float("nan") for c in BEYOND_COLS if c not in m.columns})  # frames of older runs
    cols = METRIC_COLS + BEYOND_COLS
    g = m.groupby(["protocol", "backbone", "variant"])
    out = g[cols].agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    out.insert(0, "seeds", g.size())
    out = out.reset_index().fillna({f"{c}_std": 0.0 for c in METRIC_COLS})
    for c in BEYOND_COLS:  # one seed: std 0 where the figure was measured, NaN where it was not
        out[f"{c}_std"] = out[f"{c}_std"].where(out[f"{c}_mean"].isna(), out[f"{c}_std"].fillna(0.0))
    order = {"full": 0, "sampled100": 1}
    out["_p"] = out["protocol"].map(order).fillna(9)
    return out.sort_values(["_p", "backbone", "ndcg_10_mean"], ascending=[True, True, False]).drop(columns="_p")


def beyond_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The full-ranking rows of ``summary`` (:func:`metrics_summary`) with a beyond-accuracy figure, in the
    same order: protocol, backbone, variant, seeds, ``ndcg_10_*`` and the ``<figure>_mean`` / ``_std`` of
    :data:`BEYOND_COLS`. Empty when the run measured none (runs before the figures existed)."""
    if summary.empty or f"{BEYOND_COLS[0]}_mean" not in summary.columns:
        return pd.DataFrame()
    s = summary[summary["protocol"] == "full"]
    s = s[s[[f"{c}_mean" for c in BEYOND_COLS]].notna().any(axis=1)]
    keep = ["protocol", "backbone", "variant", "seeds", "ndcg_10_mean", "ndcg_10_std"]
    return s[keep + [f"{c}_{x}" for c in BEYOND_COLS for x in ("mean", "std")]]


def latest_beyond_reasons(lake, run: pd.Series | None = None) -> dict[str, list[str]]:
    """{"<subset>/<figure>": [why it is NaN or absent]} that ``run`` (default: the latest train_recommender
    run) noted; empty when every figure was measured."""
    return dict(_latest_notes(lake, run).get("beyond_not_measured") or {})


def latest_run(lake, without_leakage: bool = True) -> pd.Series | None:
    """The most recent ``recommender_runs`` row (run_id, dataset, best_backbone, n_users, n_items, notes,
    started_ts, finished_ts), or None.

    ``without_leakage`` (the default) skips runs whose notes carry a ``leakage`` flag (the planted-signal
    experiment's runs): they are never a run's results, never what serving rescores with.
    """
    if not lake.exists("recommender_runs"):
        return None
    runs = lake.read_pandas("recommender_runs", columns=[
        "run_id", "dataset", "best_backbone", "best_variant", "n_users", "n_items", "notes", "started_ts",
        "finished_ts"])
    if without_leakage and not runs.empty:
        runs = runs[[not json.loads(n or "{}").get("leakage") for n in runs["notes"]]]
    return None if runs.empty else runs.sort_values("finished_ts").iloc[-1]


def latest_metrics(lake, run: pd.Series | None = None) -> pd.DataFrame:
    """Metrics rows of ``run`` (default: the most recent train_recommender run), or an empty frame."""
    run = latest_run(lake) if run is None else run
    if run is None or not lake.exists("metrics"):
        return pd.DataFrame()
    m = lake.read_pandas("metrics")
    return m[m["run_id"] == run["run_id"]]


def _latest_notes(lake, run: pd.Series | None = None) -> dict:
    """The notes (JSON) of ``run`` (default: the latest train_recommender run), or {} before any."""
    run = latest_run(lake) if run is None else run
    return {} if run is None else json.loads(run["notes"] or "{}")


def latest_paired(lake, run: pd.Series | None = None) -> pd.DataFrame:
    """Paired per-user comparisons against the strongest no-LLM model or baseline (chosen on validation)
    stored by ``run`` (default: the latest train_recommender run); its name is in the ``reference`` column."""
    notes = _latest_notes(lake, run)
    # runs written before the reference was chosen on validation compared with cooc_prior
    rows = pd.DataFrame(notes.get("paired_vs_reference") or notes.get("paired_vs_cooc_prior") or [])
    if rows.empty:
        return rows
    rows["_p"] = rows["protocol"].map({"full": 0, "sampled100": 1}).fillna(9)
    return rows.sort_values(["_p", "backbone", "mean_diff"], ascending=[True, True, False]).drop(columns="_p")


def latest_missing(lake, run: pd.Series | None = None) -> dict[str, str]:
    """{variant: why it did not run} of ``run`` (default: the latest train_recommender run; empty when all
    ran)."""
    return dict(_latest_notes(lake, run).get("missing_variants") or {})


def paired_reference(paired: pd.DataFrame) -> str | None:
    """The name of what ``paired`` (:func:`latest_paired`) compares with, or None when it is empty."""
    return None if paired.empty else str(paired["reference"].iloc[0])


def paired_title(paired: pd.DataFrame) -> str:
    ref = paired_reference(paired)
    return (f"Against {ref}, the strongest model or baseline without an LLM on validation (full-ranking NDCG@10)"
            if ref else "Against the strongest model or baseline without an LLM")
