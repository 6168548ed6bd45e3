"""Beyond-accuracy metrics of full-ranking top-K lists: coverage, Gini, popularity, novelty, diversity.

Accuracy alone rewards a model that recommends only best-sellers. These figures describe *what* is
recommended, from the lists themselves (no target involved):

==========================  ===========================================================================
name                        definition (over the users' top-K lists; K = the name's suffix)
==========================  ===========================================================================
``coverage_10``, ``_20``    share of catalogue items in at least one user's top-K list
``gini_10``                 Gini index of the catalogue's exposure counts in the top-10 lists
                            (items never recommended count with 0; 0 = even, (n-1)/n = one item only)
``popularity_pct_10``       mean popularity percentile (0..100) of recommended items; popularity =
                            training interaction count, mid-rank percentile within the catalogue
``novelty_10``              mean self-information ``-log2(count_i / total)`` (bits) of recommended items
``ild_10``                  intra-list diversity: mean pairwise cosine distance within a user's top-10
                            list, over item text vectors (absent when the run has no item vectors)
==========================  ===========================================================================

Conventions (those of :mod:`slimrec.recommender.data`): items are internal indices ``1..n_items``;
``0`` marks an empty slot of a list (a user with fewer than K candidates), and is never counted.
``popularity`` and ``vectors`` are indexed the same way (row 0, padding, is ignored). Per-list figures
(popularity, novelty, diversity) are averaged within each list first, then over the lists that have
what the figure needs, so every user weighs the same however short the list.

Worked example (catalogue of 4 items; training counts ``[-, 3, 1, 0, 0]``, total 4; two users):
lists ``[[1, 2], [1, 3]]`` with K = 2:

* coverage@2 = |{1, 2, 3}| / 4 = 0.75;
* exposure counts (items 1..4) = [2, 1, 1, 0], sorted [0, 1, 1, 2], sum 4:
  Gini = (-3*0 - 1*1 + 1*1 + 3*2) / (4 * 4) = 0.375;
* percentiles: item 1 is above 3 items -> (3 + 0.5) / 4 = 87.5; item 2 above 2 -> 62.5; item 3 ties
  with item 4 -> (0 + 0.5 * 2) / 4 = 25; user means 75 and 56.25 -> 65.625;
* self-information: item 1 -log2(3/4) = 0.415, item 2 -log2(1/4) = 2, item 3 never seen in training
  counts as seen once: 2; user means 1.2075 and 1.2075 -> 1.2075.

Bad input never raises: no users, no recommended item, an empty catalogue or no training interactions
give NaN and a reason (see :func:`beyond_accuracy`).
"""

from __future__ import annotations

import numpy as np

COVERAGE_KS = (10, 20)
LIST_K = 10  # the cut-off of Gini, popularity, novelty and diversity
MAX_K = max(*COVERAGE_KS, LIST_K)  # the list length evaluation must keep
BEYOND_NAMES = ("coverage_10", "coverage_20", "gini_10", "popularity_pct_10", "novelty_10", "ild_10")


def _lists(items, k: int | None = None) -> np.ndarray:
    """``items`` as a (U, K) integer array (its own integer type kept: int32 lists of 1M users are
    80 MB), cut to its first ``k`` columns."""
    a = np.asarray(items)
    if not np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.int64)
    if a.ndim != 2:
        raise ValueError(f"top-K lists must be (users, K), got shape {a.shape}")
    return a if k is None else a[:, :k]


def exposure_counts(items, n_items: int, k: int | None = None) -> np.ndarray:
    """(n_items+1,) int64: how many top-``k`` lists hold each item (index 0, empty slots, kept at 0)."""
    a = _lists(items, k)
    counts = np.bincount(a[a > 0], minlength=n_items + 1)
    counts[0] = 0
    return counts


def coverage(items, n_items: int, k: int) -> float:
    """Share of the ``n_items`` catalogue items that appear in at least one top-``k`` list.

    Example: lists [[1, 2], [1, 3]], 4 items, k = 2 -> 3 / 4. NaN when the catalogue is empty.
    """
    if n_items <= 0:
        return float("nan")
    return float(np.count_nonzero(exposure_counts(items, n_items, k)[1:]) / n_items)


def gini(items, n_items: int, k: int) -> float:
    """Gini index of the exposure counts of ALL ``n_items`` catalogue items in the top-``k`` lists.

    Items never recommended count with 0, so a model that recommends the same few items to everyone
    is unequal even if it spreads its slots evenly over them. With counts sorted ascending
    ``x_1 <= ... <= x_n``: ``G = sum_i (2i - n - 1) x_i / (n * sum_i x_i)``; 0 when every item is
    recommended equally often, ``(n - 1) / n`` when one item takes every slot. NaN when nothing is
    recommended (or the catalogue is empty).

    Example: exposure [2, 1, 1, 0] -> sorted [0, 1, 1, 2]: (-3*0 - 1*1 + 1*1 + 3*2) / (4 * 4) = 0.375.
    """
    x = np.sort(exposure_counts(items, n_items, k)[1:]).astype(np.float64)
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return float("nan")
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def popularity_percentiles(popularity, n_items: int) -> np.ndarray:
    """(n_items+1,) mid-rank percentile (0..100) of each item's training count within the catalogue.

    ``pct_i = 100 * (#{j: c_j < c_i} + 0.5 * #{j: c_j = c_i}) / n`` over the catalogue's ``n`` items
    (``i`` itself among the equal ones), so tied items share one value and the catalogue's mean is
    exactly 50: a recommender that draws items uniformly scores about 50, one that recommends the
    best-sellers near 100. Index 0 is 0. Example: counts [3, 1, 0, 0] -> [87.5, 62.5, 25, 25].
    """
    c = np.asarray(popularity, dtype=np.float64)[1 : n_items + 1]
    s = np.sort(c)
    below = np.searchsorted(s, c, side="left")
    equal = np.searchsorted(s, c, side="right") - below
    out = np.zeros(n_items + 1)
    if n_items:
        out[1:] = 100.0 * (below + 0.5 * equal) / n_items
    return out


def self_information(popularity, n_items: int) -> np.ndarray:
    """(n_items+1,) bits ``-log2(c_i / total)`` of each item (``total``: all training interactions).

    An item never seen in training (``c_i = 0``, infinitely surprising) counts as seen once, the rarest
    popularity training can show. Index 0 is 0. All NaN when there is no training interaction.
    Example: counts [3, 1, 0, 0] (total 4) -> [0.415, 2, 2, 2].
    """
    c = np.asarray(popularity, dtype=np.float64)[1 : n_items + 1]
    total = c.sum()
    out = np.zeros(n_items + 1)
    if total <= 0:
        out[1:] = np.nan
        return out
    out[1:] = -np.log2(np.maximum(c, 1.0) / total)
    return out


def list_mean(items, per_item: np.ndarray, k: int) -> float:
    """Mean over users of the mean of ``per_item`` over each user's top-``k`` list (empty slots skipped;
    users with an empty list left out). NaN when no user has an item. Vectorised: no loop over users."""
    a = _lists(items, k)
    filled = a > 0
    n = filled.sum(axis=1)
    vals = np.where(filled, np.asarray(per_item, dtype=np.float64)[a], 0.0)
    has = n > 0
    if not has.any():
        return float("nan")
    return float((vals.sum(axis=1)[has] / n[has]).mean())


def intra_list_diversity(items, vectors, k: int, present=None, batch_users: int = 4096) -> float:
    """Mean over users of the mean pairwise cosine distance ``1 - cos(v_i, v_j)`` within each top-``k`` list.

    ``vectors``: (n_items+1, D) item text vectors (row 0 padding). Items without a vector (``present``
    False, or a zero vector) and empty slots are skipped; a list with fewer than 2 items that have a
    vector has no pair and is left out. NaN when no list has a pair.

    With unit vectors ``u_i`` of a list's ``m`` items, ``sum_{i != j} cos_ij = |sum_i u_i|^2 - m``, so each
    batch of users costs (B, k, D) and no (k, k) matrix is formed. Example: (1, 0), (0, 1), (1, 1)/sqrt(2):
    cosines 0, 1/sqrt(2), 1/sqrt(2) -> ILD = 1 - sqrt(2)/3 = 0.5286.
    """
    a = _lists(items, k)
    v = np.asarray(vectors, dtype=np.float32)  # (n_items+1, D)
    norm = np.linalg.norm(v, axis=1)
    ok = norm > 0
    if present is not None:
        ok &= np.asarray(present, dtype=bool)
    ok[0] = False
    unit = v / np.where(ok, norm, np.inf)[:, None]  # rows without a vector become 0
    total, n_lists = 0.0, 0
    for start in range(0, len(a), batch_users):
        b = a[start : start + batch_users]  # (B, k)
        m = ok[b].sum(axis=1).astype(np.float64)  # items with a vector per list
        s = unit[b].sum(axis=1, dtype=np.float64)  # (B, D): zero rows for empty slots and missing vectors
        pairs = m * (m - 1)
        keep = pairs > 0
        mean_cos = ((s * s).sum(axis=1)[keep] - m[keep]) / pairs[keep]
        total += float(np.clip(1.0 - mean_cos, 0.0, 2.0).sum())  # clip: float rounding at identical vectors
        n_lists += int(keep.sum())
    return total / n_lists if n_lists else float("nan")


def beyond_accuracy(
    items, popularity, n_items: int, vectors=None, present=None
) -> tuple[dict[str, float], dict[str, str]]:
    """Every figure of :data:`BEYOND_NAMES` for one set of top-K lists, and why any of them is NaN or absent.

    ``items``: (U, K) top-K lists, best first, internal indices with 0 for an empty slot; K >= 20 for
    every figure (shorter lists are measured on what they hold). ``popularity``: (n_items+1,) training
    interaction counts. ``vectors``/``present``: item text vectors and which items have one; None: the
    run has no item vectors, and ``ild_10`` is left out of the values (absent, not zero).

    Returns ``(values, reasons)``: ``values[name]`` is a float (NaN when it cannot be measured on this
    input), ``reasons[name]`` says why for each NaN or absent figure. Never raises on empty input.
    """
    a = _lists(items)
    names = [n for n in BEYOND_NAMES if vectors is not None or n != "ild_10"]
    reasons: dict[str, str] = {} if vectors is not None else {"ild_10": "no item text vectors in this run"}
    why = None
    if n_items <= 0:
        why = "empty catalogue"
    elif a.shape[0] == 0:
        why = "no users"
    elif not (a[:, :MAX_K] > 0).any():
        why = "no recommended item (every top-K list is empty)"
    if why:
        return {n: float("nan") for n in names}, {**reasons, **{n: why for n in names}}
    values = {f"coverage_{k}": coverage(a, n_items, k) for k in COVERAGE_KS}
    values[f"gini_{LIST_K}"] = gini(a, n_items, LIST_K)
    values[f"popularity_pct_{LIST_K}"] = list_mean(a, popularity_percentiles(popularity, n_items), LIST_K)
    values[f"novelty_{LIST_K}"] = list_mean(a, self_information(popularity, n_items), LIST_K)
    if vectors is not None:
        values[f"ild_{LIST_K}"] = intra_list_diversity(a, vectors, LIST_K, present)
    for n, x in values.items():
        if np.isnan(x):
            reasons[n] = {
                f"novelty_{LIST_K}": "no training interactions",
                f"ild_{LIST_K}": "no top-10 list holds two items with a text vector",
            }.get(n, f"no recommended item in the top {LIST_K}")
    return values, reasons


__all__ = [
    "BEYOND_NAMES",
    "COVERAGE_KS",
    "LIST_K",
    "MAX_K",
    "beyond_accuracy",
    "coverage",
    "exposure_counts",
    "gini",
    "intra_list_diversity",
    "list_mean",
    "popularity_percentiles",
    "self_information",
]
