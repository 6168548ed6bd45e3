"""Rationales by retrieval: a seed pool of users the student writes for, nearest pool users for the rest.

Pure functions (numpy and faiss in, numpy out); the stage around them is
:mod:`slimrec.stages.retrieve_rationales`.

1. :func:`in_seed_pool`: a user is in the pool when a salted sha1 of
   ``(seed, user_id)`` falls below the share: stable across runs and as users
   arrive, so a daily refresh never moves a user in or out of the pool.
2. :func:`user_vectors`: a user's vector is the mean of the text vectors of
   the items in their history (L2-normalised), what the encoder already made.
3. :func:`nearest`: exact inner-product search over the donors' user vectors
   with faiss (``IndexFlatIP``: cosine on normalised vectors), in batches.
4. :func:`blend_vectors` and :func:`vote_items`: the retrieved rationale's
   vector is the similarity-weighted mean of the neighbours' rationale vectors;
   its grounded items are the neighbours' grounded items ranked by summed
   similarity.

Worked example (k = 2): donors d1 (similarity 0.9, items [a, b]) and d2
(0.6, items [b, c]) -> grounded items [b (1.5), a (0.9), c (0.6)], vector
``normalise(0.9 * v(d1) + 0.6 * v(d2))``, text of d1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from slimrec.embed.texts import pool_vectors
from slimrec.text import unit_draw


def in_seed_pool(user_ids: Iterable[str], share: float, seed: int) -> np.ndarray:
    """Boolean per user: in the seed pool of ``share`` of the users.

    >>> in_seed_pool(["u1", "u2", "u3"], 1.0, 0).tolist()
    [True, True, True]
    """
    return np.array([unit_draw("seed-pool", seed, str(u)) < share for u in user_ids], dtype=bool)


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


def user_vectors(histories: Sequence[Sequence[str]], item_index: dict[str, int],
                 item_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, d) normalised means of each history's item vectors, and whether a user has any item vector.

    ``item_index`` maps item_id -> row of ``item_vectors``; items without a vector are skipped.

    >>> v, ok = user_vectors([["a", "b"], ["z"]], {"a": 0, "b": 1}, np.array([[1., 0.], [0., 1.]]))
    >>> np.round(v.astype(float), 3).tolist(), ok.tolist()
    ([[0.707, 0.707], [0.0, 0.0]], [True, False])
    """
    rows = [[item_index[i] for i in h if i in item_index] for h in histories]
    counts = np.array([len(r) for r in rows], dtype=np.int64)
    flat = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(counts.sum()))
    owner = np.repeat(np.arange(len(rows)), counts)
    return pool_vectors(item_vectors[flat], owner, len(rows), normalize=True), counts > 0


def nearest(donors: np.ndarray, queries: np.ndarray, k: int, batch: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, donor rows), each (Q, min(k, D)), best first: exact inner product with faiss.

    ``donors`` and ``queries`` are float32 and normalised (inner product = cosine).
    """
    import faiss

    k = min(k, len(donors))
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    index = faiss.IndexFlatIP(donors.shape[1])
    index.add(np.ascontiguousarray(donors, dtype=np.float32))
    sims, rows = [], []
    for i in range(0, len(queries), batch):
        s, r = index.search(np.ascontiguousarray(queries[i : i + batch], dtype=np.float32), k)
        sims.append(s)
        rows.append(r)
    return np.concatenate(sims), np.concatenate(rows).astype(np.int64)


def _weights(sims: np.ndarray) -> np.ndarray:
    """Similarities as non-negative weights; a row with none positive weighs its neighbours equally."""
    w = np.clip(sims.astype(np.float64), 0.0, None)
    flat = w.sum(axis=1) <= 0
    w[flat] = 1.0
    return w


def blend_vectors(vectors: np.ndarray, sims: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(Q, d) normalised similarity-weighted means of the neighbours' vectors (``vectors[rows]``)."""
    w = _weights(sims)
    return normalise(np.einsum("qk,qkd->qd", w, vectors[rows].astype(np.float64)))


def vote_items(neighbour_items: Sequence[Sequence[Sequence[str]]], sims: np.ndarray, max_items: int) -> list[list[str]]:
    """Per query: the neighbours' grounded items ranked by summed weight (ties: first named first).

    >>> vote_items([[["a", "b"], ["b", "c"]]], np.array([[0.9, 0.6]]), 3)
    [['b', 'a', 'c']]
    """
    w = _weights(sims)
    out = []
    for q, lists in enumerate(neighbour_items):
        score: dict[str, float] = {}
        for j, items in enumerate(lists):
            for it in dict.fromkeys(items):  # an item named twice by one neighbour counts once
                score[it] = score.get(it, 0.0) + float(w[q, j])
        out.append(sorted(score, key=lambda it: -score[it])[:max_items])  # sorted is stable: first named wins ties
    return out
