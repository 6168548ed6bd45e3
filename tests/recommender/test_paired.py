"""Paired per-user comparison against cooc_prior, on hand-made per-user results."""

from __future__ import annotations

import numpy as np
import pytest
from slimrec.recommender.runner import NO_BACKBONE, paired_comparisons


def _res(variant, full, rows=None):
    return {"variant": variant, "per_user_test_ndcg_10": {"full": full, "sampled100": full}, "per_user_rows": rows}


def test_paired_difference_and_standard_error_by_hand():
    payloads = [
        {"backbone": "sasrec", "seed": 0, "results": [_res("cooc_prior", [0.0, 1.0, 0.5, 0.0]),
                                                       _res("slim", [1.0, 1.0, 0.5, 0.0]),
                                                       _res("teacher", [1.0, 0.0], rows=[0, 1])]},
        {"backbone": "sasrec", "seed": 1, "results": [_res("cooc_prior", [0.0, 1.0, 0.5, 0.0]),
                                                       _res("slim", [0.0, 1.0, 1.0, 0.0]),
                                                       _res("teacher", [1.0, 0.0], rows=[0, 1])]},
        {"backbone": NO_BACKBONE, "seed": 0, "results": [_res("text_matching", [0.0, 0.0, 0.0, 0.0])]},
    ]
    out = {(r["variant"], r["protocol"]): r for r in paired_comparisons(payloads, n_users=4)}
    assert set(out) == {(v, p) for v in ("slim", "teacher", "text_matching") for p in ("full", "sampled100")}
    slim = out[("slim", "full")]
    # seed means: slim [0.5, 1, 0.75, 0], cooc [0, 1, 0.5, 0] -> diffs [0.5, 0, 0.25, 0]
    d = np.array([0.5, 0.0, 0.25, 0.0])
    assert slim["mean_diff"] == pytest.approx(d.mean())
    assert slim["se"] == pytest.approx(d.std(ddof=1) / 2.0)
    assert (slim["users_better"], slim["users_worse"], slim["n_users"], slim["n_seeds"]) == (2, 0, 4, 2)
    teacher = out[("teacher", "full")]  # paired on its two users only
    assert teacher["n_users"] == 2 and teacher["mean_diff"] == pytest.approx(0.0)
    assert teacher["reference_ndcg_10"] == pytest.approx(0.5)
    tm = out[("text_matching", "full")]  # no backbone: paired with sasrec's cooc_prior
    assert tm["mean_diff"] == pytest.approx(-0.375) and tm["users_worse"] == 2


def test_no_reference_no_comparison():
    payloads = [{"backbone": "sasrec", "seed": 0, "results": [_res("slim", [1.0, 0.0])]}]
    assert paired_comparisons(payloads, n_users=2) == []
