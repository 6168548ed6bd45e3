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


# ------------------------------------------------------------------------------------------ resume
def _finished_point(lake, tmp_path, run_id, p, config, versions, with_file=True):
    """What train_recommender leaves for one precision: metrics rows, a recommender_runs row, a per-user file."""
    import json
    from datetime import UTC, date, datetime

    from slimrec.lake import CommitInfo

    info = CommitInfo("test", date(2024, 1, 2), run_id)
    art = tmp_path / run_id
    art.mkdir(parents=True, exist_ok=True)
    pt = _point(p, {"text": np.full(10, 0.1), "teacher": np.full(10, 0.1 + p)}, seeds=(0,))
    if with_file:
        pt.per_user.to_parquet(art / "per_user_test.parquet", index=False)
    m = pt.metrics.assign(run_id=run_id, dataset="d")
    m["seed"] = m["seed"].astype("int32")
    lake.write_arrow("metrics", m, "append", info)
    notes = {"teacher_model": f"offline-cooc-v1+planted-p{p:g}", "artifacts": str(art),
             "paired_reference": "sasrec/cooc_prior", "data": {"teacher_rationale_users": 10}}
    now = datetime(2024, 1, 2, tzinfo=UTC)
    lake.write_arrow("recommender_runs", pd.DataFrame({
        "run_id": [run_id], "dataset": ["d"], "config": [json.dumps(config)], "best_backbone": ["sasrec"],
        "best_variant": ["teacher"], "n_users": [10], "n_items": [5], "notes": [json.dumps(notes)],
        "started_ts": [now], "finished_ts": [now], "input_versions": [json.dumps(versions)]}), "append", info)


def test_resume_reuses_only_points_computed_from_the_same_inputs_and_config(tmp_lake, tmp_path):
    import json

    from slimrec.planted_experiment import point_run_id, reusable_points

    cfg, shared = {"epochs": 10, "seeds": [0, 1, 2]}, {"user_sequences": 0, "student_rationales": 4}
    _finished_point(tmp_lake, tmp_path, "planted-aa-p0", 0.0, cfg, {**shared, "teacher_rationales": 3})
    _finished_point(tmp_lake, tmp_path, "planted-aa-p1", 0.1, {**cfg, "epochs": 5}, shared)  # other config
    _finished_point(tmp_lake, tmp_path, "planted-aa-p2", 0.25, cfg, {**shared, "student_rationales": 3})  # stale
    _finished_point(tmp_lake, tmp_path, "planted-bb-p0", 1.0, cfg, shared, with_file=False)  # file gone
    _finished_point(tmp_lake, tmp_path, "planted-cc-p0", 0.5, cfg, shared)  # another experiment, not asked for

    found, why = reusable_points(tmp_lake, ["planted-aa", "planted-bb"], [0.0, 0.1, 0.25, 0.5, 1.0],
                                 "offline-cooc-v1", json.dumps(cfg), shared)
    assert set(found) == {0.0}
    pt = found[0.0]
    assert pt.run_id == "planted-aa-p0" and pt.users == 10 and pt.reference == "sasrec/cooc_prior"
    assert len(pt.metrics) == 8 and set(pt.per_user.variant) == {"text", "teacher"}
    text = "\n".join(why)
    assert "planted-aa-p1 (p=0.1): recommender config differs (epochs)" in text
    assert "planted-aa-p2 (p=0.25): shared inputs changed" in text and "'student_rationales': (3, 4)" in text
    assert "planted-bb-p0 (p=1): per-user file" in text and "planted-cc" not in text

    # a resumed experiment's new points never take a run id already in the lake
    assert point_run_id("planted-aa", 0.5, {"planted-aa-p0"}) == "planted-aa-p0.500"
    assert point_run_id("planted-aa", 1.0, {"planted-aa-p1.000"}) == "planted-aa-p1.000-r2"
