"""The student across seeds: one lake per student seed, each written by ``slim run``; figures and their spread.

    python -m bench.student_seeds --lakes /tmp/seeds/s1/lake,/tmp/seeds/s2/lake,/tmp/seeds/s3/lake

Each lake holds one pipeline run on the same data and config except
``student.split_seed`` (for example ``slim run ... --to student_rationales
--set student.split_seed=2`` on a fresh lake). Per lake, from its
``student_models`` row (the latest registered student) and that student's
``student_rationales`` rows:

* usable share: rows with status ``ok`` over all rows the student wrote, and the
  counts of every other status (``truncated``, ``parse_error``, ...);
* the held-out fidelity the registry records under the grammar: parse rate, step-3
  grounded-item precision and recall against the teacher, ROUGE-L, for the student
  and for its untrained base;
* output tokens/s per actor: output tokens over the summed per-row latency (a batch's wall time / its rows).

Prints one row per seed and the mean and standard deviation (ddof 1) over
seeds, and records the mean rows (``bench.common.record``) with the spread and
the per-seed values in ``spread``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd

from bench.common import record, row

FIDELITY = [
    ("heldout_constrained_parse_ok_rate_student", "held-out parse rate, student"),
    ("heldout_constrained_item_precision_student", "held-out step-3 precision, student"),
    ("heldout_constrained_item_recall_student", "held-out step-3 recall, student"),
    ("heldout_constrained_rouge_l_student", "held-out ROUGE-L, student"),
    ("heldout_constrained_item_recall_base", "held-out step-3 recall, base"),
    ("heldout_constrained_rouge_l_base", "held-out ROUGE-L, base"),
]


def lake_figures(lake: str) -> dict:
    """One lake's student figures (see the module docstring); raises ValueError when the lake has no student."""
    from slimrec.lake import Lake

    lk = Lake(lake)
    models = lk.read_pandas("student_models") if lk.exists("student_models") else pd.DataFrame()
    if models.empty:
        raise ValueError(f"{lake}: no student_models rows (run distill_student there first)")
    m = models.sort_values("created_ts").iloc[-1]
    metrics = m["metrics"] if isinstance(m["metrics"], dict) else json.loads(m["metrics"])
    rows = lk.read_pandas("student_rationales") if lk.exists("student_rationales") else pd.DataFrame()
    rows = rows[rows["model_version"] == m["model_version"]] if len(rows) else rows
    if rows.empty:
        raise ValueError(f"{lake}: {m['model_version']} wrote no student_rationales rows")
    status = rows["status"].value_counts().to_dict()
    secs = rows["latency_ms"].sum() / 1000.0
    out = {"lake": lake, "seed": metrics.get("seed"), "model_version": m["model_version"], "rows": len(rows),
           "usable_share": status.get("ok", 0) / len(rows), "statuses": status,
           "grounded_ids_per_row": float(rows["grounded_item_ids"].map(len).mean()),
           "tokens_per_s": float(rows["output_tokens"].sum() / secs) if secs > 0 else float("nan"),
           "val_loss": float(m["val_loss"])}
    for key, _ in FIDELITY:
        out[key] = float(metrics[key]) if metrics.get(key) is not None else float("nan")
    return out


def summary_rows(per_lake: list[dict]) -> list[dict]:
    """Mean over seeds of each figure, with the standard deviation and the per-seed values as its spread."""
    rows = []
    seeds = ", ".join(str(f["seed"]) for f in per_lake)
    for key, name, unit in [("usable_share", "usable share (status ok)", "share"), ("val_loss", "val loss", ""),
                            ("tokens_per_s", "output tokens/s per actor", "tok/s")] + [(k, n, "") for k, n in FIDELITY]:
        vals = np.array([f[key] for f in per_lake], dtype=float)
        sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
        each = ", ".join(f"{v:.4g}" for v in vals)
        rows.append(row(f"{len(per_lake)} student seeds ({seeds})", name, float(np.mean(vals)), unit,
                        spread=f"sd {sd:.4g}; per seed {each}"))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lakes", required=True, help="comma-separated lake roots, one per student seed")
    args = ap.parse_args(argv)
    per_lake = [lake_figures(x) for x in args.lakes.split(",") if x]
    cols = ["seed", "model_version", "rows", "usable_share", "statuses", "tokens_per_s"] + [k for k, _ in FIDELITY]
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(pd.DataFrame(per_lake)[cols].to_string(index=False))
    rows = summary_rows(per_lake)
    record("student_seeds", rows, extra={"per_lake": per_lake})
    return per_lake


if __name__ == "__main__":
    main()
