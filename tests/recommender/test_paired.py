"""Paired per-user comparison against the strongest no-LLM model or baseline, on hand-made results."""

from __future__ import annotations

import numpy as np
import pytest
from slimrec.recommender.runner import NO_BACKBONE, paired_comparisons, reference_label, strongest_no_llm


def _res(variant, full, rows=None, backbone="sasrec", seed=0, valid=0.0):
    return {"backbone": backbone, "seed": seed, "variant": variant,
            "per_user_test_ndcg_10": {"full": full, "sampled100": full}, "per_user_rows": rows,
            "rows": [{"split": "valid", "protocol": "full", "subset": "all", "ndcg_10": valid},
                     {"split": "test", "protocol": "full", "subset": "all", "ndcg_10": float(np.mean(full))}]}


def _results(popular_valid=0.01):
    return [
        _res("cooc_prior", [0.0, 1.0, 0.5, 0.0], seed=0, valid=0.05),
        _res("cooc_prior", [0.0, 1.0, 0.5, 0.0], seed=1, valid=0.07),
        _res("base", [1.0, 1.0, 1.0, 1.0], seed=0, valid=0.04),  # best on test, not on validation
        _res("slim", [1.0, 1.0, 0.5, 0.0], seed=0), _res("slim", [0.0, 1.0, 1.0, 0.0], seed=1),
        _res("teacher", [1.0, 0.0], rows=[0, 1]), _res("teacher", [1.0, 0.0], rows=[0, 1], seed=1),
        _res("text_matching", [0.0, 0.0, 0.0, 0.0], backbone=NO_BACKBONE),
        _res("popular", [0.0, 0.0, 1.0, 1.0], backbone=NO_BACKBONE, valid=popular_valid),
        _res("random", [0.0, 0.0, 0.0, 1.0], backbone=NO_BACKBONE, valid=0.5),  # never the reference
    ]


def test_reference_is_the_best_no_llm_run_on_validation():
    # cooc_prior's seeds average 0.06 on validation: above base (0.04) and popular (0.01), although base
    # has the best test scores; random and LLM variants are never candidates
    assert strongest_no_llm(_results()) == ("sasrec", "cooc_prior")
    assert strongest_no_llm(_results(popular_valid=0.2)) == (NO_BACKBONE, "popular")
    assert reference_label(("sasrec", "cooc_prior")) == "sasrec/cooc_prior"
    assert reference_label((NO_BACKBONE, "popular")) == "popular"
    assert strongest_no_llm([_res("slim", [1.0], valid=0.9)]) is None


def test_paired_difference_and_standard_error_by_hand():
    out = {(r["backbone"], r["variant"], r["protocol"]): r for r in paired_comparisons(_results(), n_users=4)}
    assert {v for _, v, _ in out} == {"base", "slim", "teacher", "text_matching", "popular"}
    assert {r["reference"] for r in out.values()} == {"sasrec/cooc_prior"}
    slim = out[("sasrec", "slim", "full")]
    # seed means: slim [0.5, 1, 0.75, 0], cooc [0, 1, 0.5, 0] -> diffs [0.5, 0, 0.25, 0]
    d = np.array([0.5, 0.0, 0.25, 0.0])
    assert slim["mean_diff"] == pytest.approx(d.mean())
    assert slim["se"] == pytest.approx(d.std(ddof=1) / 2.0)
    assert (slim["users_better"], slim["users_worse"], slim["n_users"], slim["n_seeds"]) == (2, 0, 4, 2)
    teacher = out[("sasrec", "teacher", "full")]  # paired on its two users only
    assert teacher["n_users"] == 2 and teacher["mean_diff"] == pytest.approx(0.0)
    assert teacher["reference_ndcg_10"] == pytest.approx(0.5)
    tm = out[(NO_BACKBONE, "text_matching", "full")]
    assert tm["mean_diff"] == pytest.approx(-0.375) and tm["users_worse"] == 2


def test_a_baseline_can_be_the_reference():
    out = paired_comparisons(_results(popular_valid=0.2), n_users=4)
    assert {r["reference"] for r in out} == {"popular"}
    cooc = next(r for r in out if r["variant"] == "cooc_prior" and r["protocol"] == "full")
    # cooc_prior's seed mean [0, 1, 0.5, 0] against popular [0, 0, 1, 1]
    assert cooc["mean_diff"] == pytest.approx(-0.125) and (cooc["users_better"], cooc["users_worse"]) == (1, 2)


def test_no_reference_no_comparison():
    assert paired_comparisons([_res("slim", [1.0, 0.0])], n_users=2) == []


def test_baselines_that_beat_the_served_model_on_validation():
    import pandas as pd
    from slimrec.recommender.config import RecommenderConfig
    from slimrec.recommender.runner import baselines_above

    cfg = RecommenderConfig()
    rows = [("sasrec", "base", 0.05), ("sasrec", "base", 0.07), (NO_BACKBONE, "popular", 0.08),
            (NO_BACKBONE, "cooc", 0.04), (NO_BACKBONE, "text_matching", 0.09)]
    m = pd.DataFrame([{"backbone": b, "variant": v, "split": "valid", "protocol": cfg.early_stop_protocol,
                       "ndcg_10": x} for b, v, x in rows])
    # base averages 0.06: popular is above it, cooc is not, text_matching is a model (not a baseline)
    assert baselines_above(m, ("sasrec", "base"), cfg) == {"popular": pytest.approx(0.08)}
    assert baselines_above(m[m.variant != "popular"], ("sasrec", "base"), cfg) == {}
