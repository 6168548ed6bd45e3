"""Leave-one-out evaluation under both protocols, vectorised over users and items.

The rule, used everywhere in this project:

* ``full``: the target is ranked against every catalogue item except the
  items of the user's history *before the target* (valid: ``history``; test:
  ``history + [valid_target]``). Scores are a batched matmul over all items;
  excluded items get ``-inf``.
* ``sampled100``: the target is ranked against 100 negatives drawn uniformly,
  without replacement, from the items NOT in the user's whole sequence
  (history, valid and test targets). The draw is seeded by ``eval_seed`` and a
  stable hash of the user id, so every model, variant and seed of a run (and
  of later runs) sees the same negatives.

Ties count as expected under random tie-breaking (see :mod:`metrics`).

Beyond accuracy (:mod:`beyond`): the test split's full-ranking top-K lists (the same candidates the
target competes with) give catalogue coverage, Gini, popularity, novelty and intra-list diversity
(:meth:`Evaluator.per_user_and_lists`, :meth:`Evaluator.beyond`). Ties inside a list follow
``argpartition``'s order (deterministic, not random).

A score function maps ``(split, users)`` to a dense ``(B, n_items+1)`` float32
array (column 0, padding, is ignored). Priors are extra score functions
combined linearly: ``score = model + sum_k w_k * prior_k``; the weights are
chosen on the validation split only (:meth:`Evaluator.choose_weights`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import numpy as np

from slimrec.recommender.beyond import MAX_K, beyond_accuracy
from slimrec.recommender.data import RecData, csr_pad_left, excluded_mask_rows
from slimrec.recommender.metrics import counts_from_scores, mean_metrics, rank_metrics
from slimrec.recommender.priors import cooc_rows, grounded_rows, novel_rows, transition_counts

log = logging.getLogger(__name__)

ScoreFn = Callable[[str, np.ndarray], np.ndarray]
PROTOCOLS = ("full", "sampled100")
_SPLIT_CODE = {"valid": 1, "test": 2, "serve": 3}
SPLITS = ("valid", "test")
# The input a rationale is written from: prompts see the history before both held-out targets, which is
# the validation split's input (the test and serve inputs are longer by the validation target).
CONTEXT_SPLIT = "valid"
# The split and protocol whose top-K lists the beyond-accuracy figures describe.
LIST_SPLIT, LIST_PROTOCOL = "test", "full"


class ScoreMemo:
    """Score functions with their answers kept, read-only, for each ``(split, users)`` asked again, until
    all of them together take ``max_bytes`` (later answers are computed each time). For a trained model and
    its priors, which no longer change: one variant's evaluation asks for the same batches many times (each
    prior weight of the validation grid, the novel-item prior's reference, then both splits), and each ask
    of the model is a forward pass over the batch.

    >>> calls = []
    >>> f = ScoreMemo(2**20)(lambda split, users: calls.append(split) or np.zeros((len(users), 3), np.float32))
    >>> _ = f("valid", np.arange(4)); _ = f("valid", np.arange(4)); _ = f("test", np.arange(4))
    >>> calls
    ['valid', 'test']
    """

    def __init__(self, max_bytes: int):
        self.left = max_bytes

    def __call__(self, fn: ScoreFn) -> ScoreFn:
        store: dict[tuple, np.ndarray] = {}

        def cached(split: str, users: np.ndarray) -> np.ndarray:
            users = np.asarray(users)
            key = (split, users.dtype.str, users.tobytes())
            if (hit := store.get(key)) is not None:
                return hit
            out = np.asarray(fn(split, users))
            if 0 not in out.strides and out.nbytes <= self.left:  # not a broadcast view (a stride of 0)
                out.setflags(write=False)  # every caller gets the same array: none may change it
                store[key] = out
                self.left -= out.nbytes
            return out

        return cached


def _user_seed(user_id: str) -> int:
    return int.from_bytes(hashlib.sha1(str(user_id).encode()).digest()[:8], "little")


def sample_negatives(data: RecData, n_neg: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(U, n_neg) item indices drawn uniformly without replacement from items outside each user's whole
    sequence, and a (U, n_neg) bool mask of real draws (False only when a user has fewer than ``n_neg``
    such items). Deterministic per (seed, user_id)."""
    ptr, items = data.split_sequences("serve")
    n = data.n_items
    out = np.zeros((data.n_users, n_neg), dtype=np.int64)
    ok = np.zeros((data.n_users, n_neg), dtype=bool)
    for u in range(data.n_users):
        seen = np.unique(items[ptr[u] : ptr[u + 1]])  # sorted internal indices in 1..n
        free = n - len(seen)
        k = min(n_neg, free)
        if k <= 0:
            continue
        rng = np.random.default_rng([seed, _user_seed(data.user_ids[u])])
        j = rng.choice(free, size=k, replace=False)  # rank among the free items, 0-based
        # the j-th free item of 1..n: skip every seen item at or below it
        shifted = seen - 1 - np.arange(len(seen))  # free items before each seen item
        out[u, :k] = j + 1 + np.searchsorted(shifted, j, side="right")
        ok[u, :k] = True
    return out, ok


def top_items(masked: np.ndarray, k: int) -> np.ndarray:
    """(B, k) int32 columns of the ``k`` best finite scores of each row of ``masked`` (B, N), best first.

    Excluded candidates are ``-inf``; a row with fewer than ``k`` finite scores is filled with 0 (the
    padding column, never a candidate). Example: row [-inf, 0.2, -inf, 0.9], k = 3 -> [3, 1, 0].
    """
    kk = min(k, masked.shape[1])
    out = np.zeros((masked.shape[0], k), dtype=np.int32)  # item indices; (1M users, 20) is 80 MB
    if kk == 0 or masked.shape[0] == 0:
        return out
    part = np.argpartition(-masked, kk - 1, axis=1)[:, :kk]
    ps = np.take_along_axis(masked, part, 1)
    order = np.argsort(-ps, axis=1, kind="stable")
    best = np.take_along_axis(part, order, 1)
    best[~np.isfinite(np.take_along_axis(ps, order, 1))] = 0
    out[:, :kk] = best
    return out


class Evaluator:
    """Everything evaluation needs, built once per data set: inputs, exclusions, sampled candidates, priors."""

    def __init__(self, data: RecData, cfg):
        self.data, self.cfg = data, cfg
        self.n_cols = data.n_items + 1
        self.inputs = {s: csr_pad_left(*data.split_sequences(s), cfg.max_len) for s in ("valid", "test", "serve")}
        self.negatives, self.neg_ok = sample_negatives(data, cfg.num_sampled_negatives, cfg.eval_seed)
        self.counts = transition_counts(data.hist_ptr, data.hist_items, data.n_items, cfg.cooc_window)
        pop = np.zeros(self.n_cols, dtype=np.float32)
        np.add.at(pop, data.hist_items, 1.0)
        self.popularity = pop  # training-history counts
        self._reasons_logged: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ priors as score functions
    def cooc_fn(self) -> ScoreFn:
        cfg = self.cfg

        def fn(split, users):
            return cooc_rows(self.counts, self.inputs[split][users], cfg.cooc_last_n, cfg.cooc_decay)

        return fn

    def grounded_fn(self, source: str) -> ScoreFn:
        rat = self.data.rationales[source]

        def fn(split, users):
            return grounded_rows(rat.grounded_ptr, rat.grounded_items, users, self.data.n_items)

        return fn

    def grounded_novel_fn(self, source: str, ref_fn: ScoreFn, top_r: int, floor: float | None = None) -> ScoreFn:
        """The grounded prior restricted to named items OUTSIDE the top ``top_r`` of ``ref_fn`` (the model,
        or the transition prior with ``floor=0``) on the rationale's own input (:data:`CONTEXT_SPLIT`),
        whatever split is scored: what the rationale says beyond what a no-LLM score already ranks high
        from the same history (see :mod:`priors`)."""
        grounded = self.grounded_fn(source)

        def fn(split, users):
            return novel_rows(grounded(split, users), ref_fn(CONTEXT_SPLIT, users), top_r, floor)

        return fn

    def popular_fn(self) -> ScoreFn:
        return lambda split, users: np.broadcast_to(self.popularity, (len(users), self.n_cols))

    def random_fn(self, seed: int) -> ScoreFn:
        def fn(split, users):
            rng = np.random.default_rng([seed, _SPLIT_CODE[split], int(users[0]) if len(users) else 0, len(users)])
            return rng.random((len(users), self.n_cols), dtype=np.float32)

        return fn

    # ------------------------------------------------------------------ core
    def _batches(self, users: np.ndarray):
        bs = self.cfg.eval_batch_size
        for i in range(0, len(users), bs):
            yield users[i : i + bs]

    def _excluded(self, split: str, users: np.ndarray) -> np.ndarray:
        """(B, N) True where an item is not a full-ranking candidate: padding and the input's items."""
        excl = excluded_mask_rows(*self.data.split_sequences(split), users, self.n_cols)
        excl[:, 0] = True
        excl[np.arange(len(users)), self.data.targets(split)[users]] = False  # a repeated target stays a candidate
        return excl

    def _masked(self, scores: np.ndarray, split: str, users: np.ndarray, excl=None) -> np.ndarray:
        """A float32 copy of ``scores`` with every non-candidate of full ranking at ``-inf``."""
        s = scores.astype(np.float32, copy=True)
        s[self._excluded(split, users) if excl is None else excl] = -np.inf
        return s

    def _counts(self, scores: np.ndarray, split: str, users: np.ndarray, protocol: str, excl=None):
        targets = self.data.targets(split)[users]
        rows = np.arange(len(users))
        if protocol == "full":
            return counts_from_scores(self._masked(scores, split, users, excl), targets)
        cand = np.concatenate([targets[:, None], self.negatives[users]], axis=1)
        s = scores[rows[:, None], cand].astype(np.float32)
        s[:, 1:][~self.neg_ok[users]] = -np.inf
        return counts_from_scores(s, 0)

    def per_user(
        self,
        model_fn: ScoreFn,
        priors: list[ScoreFn] = (),
        weights: tuple[float, ...] = (),
        users: np.ndarray | None = None,
        splits=SPLITS,
        protocols=PROTOCOLS,
    ) -> dict[tuple[str, str], dict[str, np.ndarray]]:
        """Per-user metrics ``{(split, protocol): {metric: (U,)}}`` of ``model + sum w_k prior_k``."""
        return self._evaluate(model_fn, priors, weights, users, splits, protocols, 0)[0]

    def per_user_and_lists(
        self,
        model_fn: ScoreFn,
        priors: list[ScoreFn] = (),
        weights: tuple[float, ...] = (),
        users: np.ndarray | None = None,
        k: int = MAX_K,
    ) -> tuple[dict[tuple[str, str], dict[str, np.ndarray]], np.ndarray]:
        """:meth:`per_user` on both splits and protocols, and the (U, k) top-k lists of the test split under
        full ranking, from the same scores (no second pass): internal item indices, best first, 0 for an
        empty slot (a user with fewer than k candidates). What :meth:`beyond` measures."""
        return self._evaluate(model_fn, priors, weights, users, SPLITS, PROTOCOLS, k)

    def _evaluate(self, model_fn, priors, weights, users, splits, protocols, k: int):
        users = np.arange(self.data.n_users) if users is None else users
        out, lists = {}, []
        for split in splits:
            acc = {p: ([], []) for p in protocols}
            want = k > 0 and split == LIST_SPLIT
            for b in self._batches(users):
                s = self._combined(model_fn, priors, weights, split, b)
                for p in protocols:
                    if want and p == LIST_PROTOCOL:
                        masked = self._masked(s, split, b)
                        g, e = counts_from_scores(masked, self.data.targets(split)[b])
                        lists.append(top_items(masked, k))
                    else:
                        g, e = self._counts(s, split, b, p)
                    acc[p][0].append(g)
                    acc[p][1].append(e)
            for p in protocols:
                out[(split, p)] = rank_metrics(np.concatenate(acc[p][0]), np.concatenate(acc[p][1]))
        top = np.concatenate(lists) if lists else np.zeros((0, k), dtype=np.int32)
        return out, top

    def beyond(self, lists: np.ndarray, mask: np.ndarray | None = None) -> tuple[dict[str, float], dict[str, str]]:
        """Beyond-accuracy figures (:func:`beyond.beyond_accuracy`) of the top-K ``lists`` (U, K) of
        :meth:`per_user_and_lists`, over the rows where ``mask`` is true (all when None); popularity from
        the training histories, diversity over the item text vectors when the run has them. Returns
        ``(values, reasons)``; each reason (a NaN or absent figure) is logged once per evaluator."""
        rows = lists if mask is None else lists[mask]
        values, reasons = beyond_accuracy(rows, self.popularity, self.data.n_items, self.data.item_text,
                                          self.data.item_text_present)
        for name, why in reasons.items():
            if (name, why) not in self._reasons_logged:
                self._reasons_logged.add((name, why))
                log.info("beyond-accuracy %s not measured: %s", name, why)
        return values, reasons

    def _combined(self, model_fn, priors, weights, split, users):
        s = np.array(model_fn(split, users), dtype=np.float32, copy=True)
        for w, fn in zip(weights, priors, strict=True):
            if w:
                s += np.float32(w) * fn(split, users)
        return s

    def ndcg10(self, model_fn: ScoreFn, users: np.ndarray | None = None, split: str = "valid") -> float:
        """Mean NDCG@10 on ``split`` under the early-stopping protocol (model scores only)."""
        res = self.per_user(model_fn, users=users, splits=(split,), protocols=(self.cfg.early_stop_protocol,))
        return float(res[(split, self.cfg.early_stop_protocol)]["ndcg_10"].mean())

    def choose_weights(
        self, model_fn: ScoreFn, priors: list[ScoreFn], users: np.ndarray | None = None, rounds: int = 2
    ) -> tuple[tuple[float, ...], float]:
        """Choose prior weights on the VALIDATION split (never test): best mean NDCG@10 under the
        early-stopping protocol over ``prior_weight_grid``. One prior: the whole grid; several: coordinate
        ascent from all zeros (each weight over the grid with the others fixed, ``rounds`` times).
        Ties take the smaller weight (the grid is sorted, 0 first), also against the weight a prior already
        has. Returns (weights, valid NDCG@10)."""
        if not priors:
            return (), self.ndcg10(model_fn, users)
        users = np.arange(self.data.n_users) if users is None else users
        grid = sorted(set(self.cfg.prior_weight_grid) | {0.0})
        weights = [0.0] * len(priors)
        best_v = -1.0
        for _ in range(rounds if len(priors) > 1 else 1):
            changed = False
            for k in range(len(priors)):
                cands = [tuple(weights[:k] + [w] + weights[k + 1 :]) for w in grid]
                sums = self._grid_sums(model_fn, priors, cands, users)
                # The candidates include the current weights, so the best one is never worse; argmax takes
                # the first of equals, the smallest weight: a prior that stopped helping once another was
                # weighted goes back to 0 in the next round instead of keeping the weight it won earlier.
                i = int(np.argmax(sums))
                changed |= cands[i] != tuple(weights)
                weights, best_v = list(cands[i]), float(sums[i] / len(users))
            if not changed:
                break
        return tuple(weights), best_v

    def _grid_sums(self, model_fn, priors, cands, users) -> np.ndarray:
        proto = self.cfg.early_stop_protocol
        sums = np.zeros(len(cands))
        for b in self._batches(users):
            base = np.array(model_fn("valid", b), dtype=np.float32, copy=True)
            comps = [fn("valid", b) for fn in priors]
            excl = self._excluded("valid", b) if proto == "full" else None
            for gi, ws in enumerate(cands):
                sc = base.copy()
                for w, c in zip(ws, comps, strict=True):
                    if w:
                        sc += np.float32(w) * c
                g, e = self._counts(sc, "valid", b, proto, excl)
                sums[gi] += rank_metrics(g, e, ks=(10,))["ndcg_10"].sum()
        return sums

    def top_k(self, model_fn: ScoreFn, priors=(), weights=(), k: int = 20, split: str = "serve",
              users: np.ndarray | None = None):
        """(U, k) internal item indices and scores, best first, excluding every item of the ``split`` input.

        ``users``: rows of :attr:`RecData.user_ids` to score (default: all), in that order.
        """
        items, scores = [], []
        users = np.arange(self.data.n_users) if users is None else np.asarray(users, dtype=np.int64)
        ptr, seq = self.data.split_sequences(split)
        for b in self._batches(users):
            s = self._combined(model_fn, priors, weights, split, b)
            excl = excluded_mask_rows(ptr, seq, b, self.n_cols)
            excl[:, 0] = True
            s[excl] = -np.inf
            kk = min(k, self.n_cols - 1)
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            ps = np.take_along_axis(s, part, 1)
            order = np.argsort(-ps, axis=1, kind="stable")
            items.append(np.take_along_axis(part, order, 1))
            scores.append(np.take_along_axis(ps, order, 1))
        return np.concatenate(items), np.concatenate(scores)


def summarise(per_user: dict, mask: np.ndarray | None = None) -> dict[tuple[str, str], dict[str, float]]:
    return {key: mean_metrics(m, mask) for key, m in per_user.items()}
