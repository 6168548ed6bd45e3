"""The planted curve's rows and checks, on synthetic points whose answers are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from slimrec.planted_experiment import Point, curve_checks, experiment_rows, format_checks, format_curve
from slimrec.recommender.metrics import METRIC_NAMES

USERS = 200
VARIANTS = ("text", "cooc_prior", "teacher", "slim")


def _point(p: float, per_variant: dict[str, np.ndarray], seeds=(0, 1, 2)) -> Point:
    """One precision: every variant's per-user test NDCG@10 (the same for each seed plus tiny seed noise)."""
    rng = np.random.default_rng(int(p * 100))
    metrics, per_user = [], []
    for v, vals in per_variant.items():
        for s in seeds:
            x = np.clip(vals + rng.normal(0, 1e-4, len(vals)), 0, 1)
            for split in ("valid", "test"):
                for proto in ("full", "sampled100"):
                    metrics.append({"backbone": "sasrec", "variant": v, "protocol": proto, "split": split, "seed": s,
                                    **{m: float(x.mean()) for m in METRIC_NAMES}, "n_users": len(vals)})
            for proto in ("full", "sampled100"):
                per_user.append(pd.DataFrame({"backbone": "sasrec", "variant": v, "seed": s, "protocol": proto,
                                              "user": np.arange(len(vals)), "ndcg_10": x}))
    return Point(p, f"offline+planted-p{p:g}", f"r-p{p:g}", pd.DataFrame(metrics), pd.concat(per_user),
                 "sasrec/cooc_prior")


def _curve(teacher_at, slim_shift=0.0):
    rng = np.random.default_rng(0)
    text = rng.uniform(0, 0.1, USERS)
    cooc = text + 0.02
    pts = []
    for p in (0.0, 0.25, 1.0):
        hit = rng.uniform(size=USERS) < p
        teacher = np.where(hit, teacher_at, cooc)
        slim = text + (slim_shift if p > 0 else 0.0)
        pts.append(_point(p, {"text": text, "cooc_prior": cooc, "teacher": teacher, "slim": slim}))
    return pts


def _checks(rows):
    return {(c["check"].split(":")[0], c["variant"], c["precision"]): c["ok"] for c in curve_checks(rows)}


def test_rows_pair_every_variant_against_text_reference_and_lowest_p():
    rows = experiment_rows(_curve(teacher_at=0.9), "e1", "d")
    t = rows[(rows.split == "test") & (rows.metric == "ndcg_10") & (rows.protocol == "full")]
    assert set(t.variant) == set(VARIANTS) and t.n_seeds.eq(3).all() and t.n_users.eq(USERS).all()
    text = t[t.variant == "text"].set_index("precision")
    assert (text.diff_vs_text == 0).all()
    cooc = t[t.variant == "cooc_prior"].iloc[0]
    assert cooc.diff_vs_text == pytest.approx(0.02, abs=1e-3) and cooc.se_vs_text < 1e-3
    top = t[(t.variant == "teacher") & (t.precision == 1.0)].iloc[0]
    assert top["mean"] == pytest.approx(0.9, abs=1e-3) and top.diff_vs_p0 > 0.5
    assert rows.leakage.str.contains("LEAK").all()  # flagged on every row


def test_checks_pass_for_a_channel_that_carries_the_answer():
    checks = _checks(experiment_rows(_curve(teacher_at=0.9), "e1", "d"))
    assert checks[("p=1", "teacher", 1.0)] and checks[("p=0.25", "teacher", 0.25)]
    assert checks[("teacher rises", "teacher", 1.0)] and checks[("student flat", "slim", 1.0)]


def test_checks_fail_a_lossy_channel_and_a_leaking_student():
    rows = experiment_rows(_curve(teacher_at=0.2, slim_shift=0.05), "e2", "d")
    checks = _checks(rows)
    assert not checks[("p=1", "teacher", 1.0)]
    assert not checks[("student flat", "slim", 0.25)] and not checks[("student flat", "slim", 1.0)]
    text = format_checks(curve_checks(rows))
    assert "NO" in text and "leakage check" in text
    curve = format_curve(rows)
    assert curve.startswith("!! ") and "sampled100" in curve and f"{USERS:>6}" in curve
