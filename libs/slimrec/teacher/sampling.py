"""Which users go to the teacher: a stratified, reproducible sample.

A user's draw is a hash of ``(seed, user_id)``, not a position in a shuffled
list, so the same users are picked on every run while they stay in the data:
their prompts hit the teacher cache when their history has not changed.
Users are binned into history-length strata (quantiles), so short and long
histories are both present, and each stratum gets at least
``min_stratum_share`` of the sample.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from slimrec.text import unit_draw


def user_draw(user_ids: pd.Series, seed: int) -> np.ndarray:
    """Uniform [0, 1) value per user from sha1(seed, user_id): stable across runs and machines."""
    return np.array([unit_draw(seed, u) for u in user_ids.astype(str)], dtype=np.float64)


def history_strata(history_len: pd.Series, n_strata: int) -> np.ndarray:
    """Stratum index 0..k-1 per row from quantile bins of ``history_len`` (ties collapse bins)."""
    if n_strata <= 1 or history_len.nunique() <= 1:
        return np.zeros(len(history_len), dtype=np.int64)
    edges = np.unique(np.quantile(history_len.to_numpy(dtype=float), np.linspace(0, 1, n_strata + 1)[1:-1]))
    # side="left": bin i is (edge_{i-1}, edge_i]; equal quantiles (many ties) collapse into one edge.
    return np.searchsorted(edges, history_len.to_numpy(dtype=float), side="left").astype(np.int64)


def allocate(sizes: list[int], n: int, min_share: float) -> list[int]:
    """Sample size per stratum: proportional (largest remainder), each at least ``min_share * n`` when it can.

    >>> allocate([80, 15, 5], 20, 0.1)
    [14, 4, 2]
    """
    total = sum(sizes)
    if n >= total:
        return list(sizes)
    floor = [min(s, math.ceil(min_share * n)) for s in sizes]
    alloc = list(floor)
    left = n - sum(alloc)
    if left < 0:  # more strata than the sample can give their minimum: shrink the biggest minimums
        while sum(alloc) > n:
            alloc[int(np.argmax(alloc))] -= 1
        return alloc
    room = [s - a for s, a in zip(sizes, alloc, strict=True)]
    share = [left * r / max(1, sum(room)) for r in room]
    add = [min(r, int(x)) for r, x in zip(room, share, strict=True)]
    alloc = [a + d for a, d in zip(alloc, add, strict=True)]
    # Largest remainders take what is left, one each, where room remains.
    order = sorted(range(len(sizes)), key=lambda i: (-(share[i] - int(share[i])), i))
    while sum(alloc) < n:
        progressed = False
        for i in order:
            if sum(alloc) >= n:
                break
            if alloc[i] < sizes[i]:
                alloc[i] += 1
                progressed = True
        if not progressed:
            break
    return alloc


def stratified_sample(
    prompts: pd.DataFrame, n: int, seed: int, n_strata: int = 4, min_share: float = 0.1
) -> pd.DataFrame:
    """The rows of ``prompts`` whose users go to the teacher.

    Input columns: ``user_id``, ``history_len`` (others are kept). Output: the
    chosen rows plus ``stratum``, ordered by (stratum, draw). Within a stratum
    the users with the smallest draw are taken, so growing ``n`` only adds users.

    Example: 8 users with history_len 3,3,4,4,9,12,30,50, n=4, 2 strata
    (median 6.5) -> the 2 lowest-draw users of {3,3,4,4} and of {9,12,30,50}.
    """
    if prompts.empty or n <= 0:
        return prompts.head(0).assign(stratum=pd.Series(dtype="int64"))
    df = prompts.copy()
    df["stratum"] = history_strata(df["history_len"], n_strata)
    df["_draw"] = user_draw(df["user_id"], seed)
    strata = sorted(df["stratum"].unique())
    sizes = [int((df["stratum"] == s).sum()) for s in strata]
    alloc = allocate(sizes, n, min_share)
    parts = [
        df[df["stratum"] == s].sort_values(["_draw", "user_id"]).head(k) for s, k in zip(strata, alloc, strict=True)
    ]
    out = pd.concat(parts, ignore_index=True).drop(columns="_draw")
    return out
