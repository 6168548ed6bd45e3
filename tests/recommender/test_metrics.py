"""Metric functions against values worked out by hand."""

import math

import numpy as np
import pytest
from slimrec.recommender.metrics import counts_from_scores, rank_metrics


def one(g, e=0):
    return {k: float(v[0]) for k, v in rank_metrics([g], [e]).items()}


def test_target_at_rank_1():
    assert one(0) == {"hr_10": 1.0, "ndcg_10": 1.0, "hr_20": 1.0, "ndcg_20": 1.0, "mrr": 1.0}


def test_target_at_rank_3():
    m = one(2)
    assert m["hr_10"] == 1.0 and m["hr_20"] == 1.0
    assert m["ndcg_10"] == pytest.approx(1 / math.log2(4))  # 0.5
    assert m["mrr"] == pytest.approx(1 / 3)


def test_target_at_rank_10_and_11_around_k():
    m10 = one(9)
    assert m10["hr_10"] == 1.0 and m10["ndcg_10"] == pytest.approx(1 / math.log2(11))
    m11 = one(10)  # rank 11: outside the top 10, inside the top 20
    assert m11["hr_10"] == 0.0 and m11["ndcg_10"] == 0.0
    assert m11["hr_20"] == 1.0 and m11["ndcg_20"] == pytest.approx(1 / math.log2(12))
    assert m11["mrr"] == pytest.approx(1 / 11)


def test_target_beyond_20():
    m = one(50)
    assert m["hr_10"] == m["hr_20"] == m["ndcg_10"] == m["ndcg_20"] == 0.0
    assert m["mrr"] == pytest.approx(1 / 51)


def test_one_tie_at_the_top():
    # ranks 1 or 2, each with probability 1/2
    m = one(0, 1)
    assert m["hr_10"] == 1.0
    assert m["ndcg_10"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert m["mrr"] == pytest.approx(0.75)


def test_tie_straddling_k():
    # ranks 10 or 11: in the top 10 half the time
    m = one(9, 1)
    assert m["hr_10"] == pytest.approx(0.5)
    assert m["ndcg_10"] == pytest.approx(0.5 / math.log2(11))
    assert m["hr_20"] == 1.0
    assert m["mrr"] == pytest.approx((1 / 10 + 1 / 11) / 2)


def test_everything_tied_is_random_not_perfect():
    n = 100  # the target and 99 others all scored alike
    m = one(0, n - 1)
    assert m["hr_10"] == pytest.approx(10 / n)
    assert m["ndcg_10"] == pytest.approx(sum(1 / math.log2(r + 1) for r in range(1, 11)) / n)
    assert m["mrr"] == pytest.approx(sum(1 / r for r in range(1, n + 1)) / n)


def test_vectorised_over_users():
    m = rank_metrics(np.array([0, 2, 10]), np.array([0, 0, 0]))
    assert m["hr_10"].tolist() == [1.0, 1.0, 0.0]
    assert m["mrr"] == pytest.approx([1.0, 1 / 3, 1 / 11])


def test_counts_from_scores_excluded_and_ties():
    s = np.array([[0.5, 0.9, -np.inf, 0.5, 0.1], [0.2, 0.1, 0.2, 0.2, -np.inf]])
    g, e = counts_from_scores(s, np.array([0, 2]))
    assert g.tolist() == [1, 0]
    assert e.tolist() == [1, 2]


def test_excluded_target_is_an_error():
    with pytest.raises(ValueError):
        counts_from_scores(np.array([[-np.inf, 1.0]]), 0)
