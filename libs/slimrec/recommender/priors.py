"""Score priors that need no training: item transitions and the rationale's grounded items.

Transition counts come from TRAINING sequences only (every user's ``history``:
never a validation or test target). ``C[a, b]`` counts how often ``b`` follows
``a`` within ``window`` positions in some user's history. The prior of a
candidate ``j`` for a user whose input ends with ``... x2, x1`` is
``log(1 + sum_k decay**k * C[x_{k+1}, j])`` over the last ``last_n`` items.

Rows the model *trains* on use leave-own-user-out counts (the user's own
transitions removed), so a training target is never explained by a count it
contributed itself; validation and test rows use the full counts (their
targets are not in any history).

The grounded prior of candidate ``j`` is ``1`` when the user's rationale names
``j`` in step 3 (``grounded_item_ids``), else ``0``. Its *novel* parts keep only
the named items that a no-LLM score does not already put in its top ``R`` for
that user: the part of the rationale the recommender could not have said
itself. Two references: the model's own scores and the transition prior. Both
are taken on the input the rationale was written from (the history before the
held-out targets, the ``valid`` split's input), for every split: at the test
position the input is one item longer, and the items that were obvious from
the rationale's history are no longer the top of the longer input, so novelty
measured there would call every named item new. Each part is a separate prior
with its weight chosen on validation, so a rationale whose extra items are
right gets them lifted to the top, and one whose extra items are noise gets
weight 0 for them.

Example: histories ``[1, 2, 3]`` and ``[1, 2]``, window 1: ``C[1, 2] = 2``,
``C[2, 3] = 1``; for user 1's training row ``<1> -> 2`` the own-user-out count
``C[1, 2]`` is ``1``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def transition_counts(ptr: np.ndarray, items: np.ndarray, n_items: int, window: int = 1) -> sp.csr_matrix:
    """Sparse (n_items+1, n_items+1) float32 counts of ``b`` following ``a`` within ``window`` positions."""
    lens = np.diff(ptr)
    rows, cols = [], []
    for d in range(1, window + 1):
        # pairs (p, p + d) inside one user's sequence
        ok = np.repeat(lens, lens) > 0
        pos = np.arange(len(items))
        user_end = np.repeat(ptr[1:], lens)
        valid = ok & (pos + d < user_end)
        rows.append(items[pos[valid]])
        cols.append(items[pos[valid] + d])
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    m = sp.coo_matrix((np.ones(len(r), np.float32), (r, c)), shape=(n_items + 1, n_items + 1)).tocsr()
    m.sum_duplicates()
    return m


def cooc_rows(counts: sp.csr_matrix, inputs: np.ndarray, last_n: int = 1, decay: float = 1.0) -> np.ndarray:
    """Dense (B, n_items+1) prior ``log1p(sum_k decay**k C[x_k, :])`` for right-aligned inputs (B, L)."""
    acc = None
    for k in range(min(last_n, inputs.shape[1])):
        ctx = inputs[:, -1 - k]
        part = counts[ctx].toarray() * (decay**k)
        part[ctx == 0] = 0.0  # padding has no transitions
        acc = part if acc is None else acc + part
    return np.log1p(acc).astype(np.float32)


def grounded_rows(ptr: np.ndarray, items: np.ndarray, users: np.ndarray, n_items: int) -> np.ndarray:
    """Dense (B, n_items+1) 0/1 indicator of the items each user's rationale names."""
    out = np.zeros((len(users), n_items + 1), dtype=np.float32)
    lens = np.diff(ptr)[users]
    if lens.sum():
        r = np.repeat(np.arange(len(users)), lens)
        c = np.concatenate([items[ptr[u] : ptr[u + 1]] for u in users])
        out[r, c] = 1.0
    return out


def novel_rows(grounded: np.ndarray, scores: np.ndarray, top_r: int, floor: float | None = None) -> np.ndarray:
    """``grounded`` (B, N) with the columns of each row's ``top_r`` highest ``scores`` set to 0 (column 0,
    padding, is never in the top). With ``floor``, a column counts as top only if its score is above it
    (a sparse prior such as transitions has fewer than ``top_r`` items it predicts at all; the rest tie at 0
    and are not "predicted").

    >>> novel_rows(np.array([[0, 1, 1, 1.]]), np.array([[9, 3, 2, 1.]]), 1).tolist()
    [[0.0, 0.0, 1.0, 1.0]]
    >>> novel_rows(np.array([[0, 1, 1, 1.]]), np.array([[0, 3, 0, 0.]]), 2, floor=0.0).tolist()
    [[0.0, 0.0, 1.0, 1.0]]
    """
    out = np.array(grounded, dtype=np.float32, copy=True)
    s = np.asarray(scores)[:, 1:]
    r = min(top_r, s.shape[1])
    if r <= 0 or not len(out):
        return out
    top = np.argpartition(-s, r - 1, axis=1)[:, :r]
    rows = np.broadcast_to(np.arange(len(out))[:, None], top.shape)
    if floor is not None:
        keep = s[rows, top] > floor
        rows, top = rows[keep], top[keep]
    out[rows, top + 1] = 0.0
    return out


class TrainCooc:
    """Leave-own-user-out transition prior for per-position training rows, in torch.

    ``full_rows``: (B, L+1) right-aligned whole training history of each row (inputs plus the last target).
    Position ``t`` of the inputs has context item ``full[:, t]``; its own transitions are the items at
    ``t+1 .. t+window`` after every occurrence of that context item in the same row.
    """

    def __init__(self, counts: sp.csr_matrix, window: int, device: torch.device):
        self.window = window
        self.n = counts.shape[0]
        self.dense = torch.as_tensor(counts.toarray(), device=device)  # (n+1, n+1); fine up to ~20k items
        # TODO(scale): a sparse gather for catalogues too large for a dense count matrix.

    def _own(self, full: torch.Tensor) -> torch.Tensor:
        """(B, L, L+1) weights: own[b, t, s] = number of times item full[b, s] follows full[b, t]'s item."""
        B, L1 = full.shape
        same = (full[:, :, None] == full[:, None, :]) & (full[:, :, None] > 0)  # (B, L+1, L+1) same item
        follow = torch.zeros(B, L1, L1, device=full.device)
        for d in range(1, self.window + 1):
            follow[:, : L1 - d, :] += torch.nn.functional.one_hot(
                torch.arange(d, L1, device=full.device), L1
            ).float()[None]
        # own[t, s] = sum_p same[t, p] * follow[p, s]
        own = torch.bmm(same.float(), follow)
        return own[:, :-1, :]  # contexts are the L input positions

    def at(self, full: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Prior for candidates ``cand`` (B, L, K) at each input position: log1p(C - own), (B, L, K)."""
        ctx = full[:, :-1]  # (B, L)
        glob = self.dense[ctx[:, :, None], cand]  # (B, L, K)
        own = self._own(full)  # (B, L, L+1)
        # own count of candidate k = sum_s own[t, s] * [full[s] == cand[k]]
        match = (full[:, None, None, :] == cand[..., None]).float()  # (B, L, K, L+1)
        own_c = (match * own[:, :, None, :]).sum(-1)
        return torch.log1p((glob - own_c).clamp_min(0)) * (ctx[..., None] > 0)

    def full(self, full: torch.Tensor) -> torch.Tensor:
        """Prior over all items at each input position (B, L, n+1)."""
        ctx = full[:, :-1]
        glob = self.dense[ctx]  # (B, L, n+1)
        own = self._own(full)  # (B, L, L+1)
        own_c = torch.zeros_like(glob).scatter_add_(2, full[:, None, :].expand(-1, ctx.shape[1], -1), own)
        return torch.log1p((glob - own_c).clamp_min(0)) * (ctx[..., None] > 0)
