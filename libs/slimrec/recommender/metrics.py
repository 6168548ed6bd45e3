"""Ranking metrics for one held-out target per user, with ties handled exactly.

A user's result is two counts: ``n_greater`` (candidates scored strictly above
the target) and ``n_equal`` (other candidates scored exactly as the target).
Ties are broken uniformly at random *in expectation*: the target's rank is
``1 + n_greater + X`` with ``X`` uniform on ``0..n_equal``, and every metric is
its expectation over ``X``. So a model that scores everything alike earns the
random baseline, not a perfect score (the optimistic ``rank = 1 + n_greater``
rule would give it NDCG 1).

Worked example (no ties): target beaten by 2 candidates -> rank 3:
HR@10 = 1, NDCG@10 = 1/log2(3+1) = 0.5, MRR = 1/3.
With one tie (n_greater=0, n_equal=1): rank 1 or 2 with probability 1/2 each:
HR@10 = 1, NDCG@10 = (1 + 1/log2(3)) / 2, MRR = (1 + 1/2) / 2 = 0.75.
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ("hr_10", "hr_20", "ndcg_10", "ndcg_20", "mrr")


def _cum_discount(n: int) -> np.ndarray:
    """``out[r] = sum_{j=1..r} 1/log2(j+1)`` for ``r = 0..n``."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, n + 2)))])


def _cum_harmonic(n: int) -> np.ndarray:
    """``out[r] = sum_{j=1..r} 1/j`` for ``r = 0..n``."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])


def rank_metrics(n_greater, n_equal, ks: tuple[int, ...] = (10, 20)) -> dict[str, np.ndarray]:
    """Per-user HR@k, NDCG@k (for each k in ``ks``) and MRR, expected over random tie-breaking.

    ``n_greater``, ``n_equal``: int arrays of shape (U,). Returns ``{"hr_10": (U,), "ndcg_10": (U,), ...,
    "mrr": (U,)}`` as float64. Ranks are 1-based; ``rank in [g+1, g+1+e]`` with equal probability.
    """
    g = np.asarray(n_greater, dtype=np.int64)
    e = np.asarray(n_equal, dtype=np.int64)
    if g.shape != e.shape:
        raise ValueError(f"n_greater {g.shape} and n_equal {e.shape} differ in shape")
    if (g < 0).any() or (e < 0).any():
        raise ValueError("counts must be >= 0")
    lo = g + 1  # best possible rank
    hi = g + 1 + e  # worst possible rank
    width = (e + 1).astype(np.float64)
    n_max = int(hi.max()) if hi.size else 1
    out: dict[str, np.ndarray] = {}
    cd = _cum_discount(max(n_max, max(ks)))
    for k in ks:
        top = np.minimum(hi, k)  # ranks lo..top fall inside the top k
        inside = np.clip(top - lo + 1, 0, None).astype(np.float64)
        out[f"hr_{k}"] = inside / width
        dsum = np.where(top >= lo, cd[top] - cd[np.minimum(lo - 1, top)], 0.0)
        out[f"ndcg_{k}"] = dsum / width
    ch = _cum_harmonic(n_max)
    out["mrr"] = (ch[hi] - ch[lo - 1]) / width
    return out


def mean_metrics(per_user: dict[str, np.ndarray], mask: np.ndarray | None = None) -> dict[str, float]:
    """Mean of each per-user metric, over the users where ``mask`` is true (all when None)."""
    res = {}
    for name, arr in per_user.items():
        a = arr if mask is None else arr[mask]
        res[name] = float(a.mean()) if a.size else float("nan")
    return res


def counts_from_scores(scores: np.ndarray, target_col: np.ndarray | int = 0):
    """(n_greater, n_equal) of the target in each row of ``scores`` (U, C).

    ``target_col``: the target's column per row (or one column for all). ``-inf`` entries are excluded
    candidates: they never beat a finite target and are not counted as ties. A target scored ``-inf``
    or NaN is an error (it would be silently ranked last or first).
    """
    scores = np.asarray(scores)
    rows = np.arange(scores.shape[0])
    t = scores[rows, target_col]
    if not np.isfinite(t).all():
        raise ValueError("a target score is not finite (excluded or NaN)")
    greater = (scores > t[:, None]).sum(axis=1)
    equal = (scores == t[:, None]).sum(axis=1) - 1  # minus the target itself
    return greater.astype(np.int64), equal.astype(np.int64)
