"""The offline teacher: deterministic three-step rationales from the data, no network.

It reads what an LLM teacher would read (the items shown in the prompt,
oldest first) and answers from catalogue statistics computed on
``user_sequences.history`` only, never on the validation/test targets
(leakage guard):

* item transitions ``T[a, b]``: over all histories, how often ``b`` follows
  ``a`` within ``window`` positions, each pair weighted ``1 / gap``;
* category and brand transitions, scored as smoothed positive PMI
  ``log((n_ab + 1) / (n_a * n_b / N + 1))``: what follows *more than its
  popularity explains*, not what is popular.

For a user with prompt items ``a_1 .. a_n`` (oldest first) and recency
weights ``w_k = decay ** (n - k)``:

* Step 1 summarises the user's own top categories and brands (counts) and the
  most recent item;
* Step 2 names the categories and brands with the highest ``sum_k w_k *
  PMI(cat(a_k) -> c)`` (same for brands);
* Step 3 names ``n_items`` catalogue titles in double quotes, ranked by
  ``sum_k w_k * T[a_k, b]`` over items the user does not have; ties and
  shortfalls are filled with the most popular items of the step-2 categories,
  then of the catalogue. ``grounded_item_ids`` are those items, exactly.

Example (window 1, items A -> B seen in 3 other histories, A -> C in 1)::

    prompt items [A]  ->  Step 3: Recommended items: "B"; "C"; ...   grounded [B, C, ...]
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import scipy.sparse as sp

from slimrec.prompts import sanitize_text
from slimrec.teacher.budget import estimate_tokens
from slimrec.teacher.config import OfflineTeacherConfig
from slimrec.teacher.planted import insert_planted

log = logging.getLogger(__name__)

UNKNOWN = ""
_QUOTES = re.compile("[\"\u201c\u201d\u201e]")  # a quote inside a title would cut it short in step 3


@dataclass
class CatalogueStats:
    """Statistics from histories only, as integer codes and sparse matrices (scales to large catalogues)."""

    item_ids: np.ndarray  # (n_items,) object: code -> item_id
    code: dict[str, int]  # item_id -> code
    title: list[str]  # (n_items,) sanitised title, "" when missing
    item_cat: np.ndarray  # (n_items,) int: category code, -1 unknown
    item_brand: np.ndarray  # (n_items,) int: brand code, -1 unknown
    cats: list[str]  # category code -> name
    brands: list[str]  # brand code -> name
    pop: np.ndarray  # (n_items,) occurrences in histories
    follow: sp.csr_matrix  # (n_items, n_items): sum of 1/gap over "dst follows src" in histories
    cat_pmi: sp.csr_matrix  # (n_cats, n_cats): positive smoothed PMI of category transitions
    brand_pmi: sp.csr_matrix  # (n_brands, n_brands): same for brands
    cat_items: list[np.ndarray]  # category code -> item codes, most popular first
    pop_order: np.ndarray  # item codes, most popular first (ties: smaller item_id first)
    n_histories: int


def _leaf(categories) -> str:
    if categories is None:
        return UNKNOWN
    cats = [c for c in list(categories) if c]
    return cats[-1] if cats else UNKNOWN


def item_meta(items: pd.DataFrame, max_title_chars: int) -> pd.DataFrame:
    """``items`` -> index item_id; title, category (leaf of the path), brand; all prompt-sanitised."""
    meta = pd.DataFrame(
        {
            "item_id": items["item_id"].astype(str),
            "title": [sanitize_text(t, max_title_chars) for t in items["title"]],
            "category": [sanitize_text(_leaf(c), 80) for c in items["categories"]],
            "brand": [sanitize_text(b, 60) for b in items["brand"]],
        }
    )
    return meta.drop_duplicates("item_id").set_index("item_id")


def transition_pairs(histories: list[list[str]] | pd.Series, window: int) -> pd.DataFrame:
    """Every (src, dst, gap) with dst up to ``window`` positions after src in one history.

    >>> transition_pairs([["a", "b", "c"]], 2).values.tolist()
    [['a', 'b', 1], ['b', 'c', 1], ['a', 'c', 2]]
    """
    lens = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    flat = np.array([x for h in histories for x in h], dtype=object)
    user = np.repeat(np.arange(len(lens)), lens)
    frames = []
    for gap in range(1, window + 1):
        if len(flat) <= gap:
            break
        same = user[:-gap] == user[gap:]
        frames.append(pd.DataFrame({"src": flat[:-gap][same], "dst": flat[gap:][same], "gap": gap}))
    if not frames:
        return pd.DataFrame({"src": pd.Series(dtype=object), "dst": pd.Series(dtype=object), "gap": pd.Series(dtype="int64")})
    return pd.concat(frames, ignore_index=True)


def _codes(labels: list[str]) -> tuple[np.ndarray, list[str]]:
    names = sorted({x for x in labels if x != UNKNOWN})
    index = {x: i for i, x in enumerate(names)}
    return np.array([index.get(x, -1) for x in labels], dtype=np.int64), names


def _pmi(src: np.ndarray, dst: np.ndarray, w: np.ndarray, n: int, min_count: int) -> sp.csr_matrix:
    """Smoothed positive PMI ``log((n_ab + 1) / (n_a * n_b / N + 1))`` of label pairs; unknown (-1) dropped."""
    ok = (src >= 0) & (dst >= 0)
    n = max(1, n)  # as wide as _project's weights: a catalogue without any brand (MovieLens) has no labels
    counts = sp.coo_matrix((w[ok], (src[ok], dst[ok])), shape=(n, n)).tocsr()
    counts.sum_duplicates()
    total = counts.sum()
    if total == 0:
        return sp.csr_matrix((n, n))
    out_src = np.asarray(counts.sum(axis=1)).ravel()
    in_dst = np.asarray(counts.sum(axis=0)).ravel()
    c = counts.tocoo()
    expected = out_src[c.row] * in_dst[c.col] / total
    pmi = np.log((c.data + 1.0) / (expected + 1.0))
    keep = (c.data >= min_count) & (pmi > 0)
    return sp.csr_matrix((pmi[keep], (c.row[keep], c.col[keep])), shape=(n, n))


def build_stats(histories: list[list[str]] | pd.Series, items: pd.DataFrame, cfg: OfflineTeacherConfig) -> CatalogueStats:
    """Catalogue statistics from ``user_sequences.history`` lists (never the targets) and the ``items`` table."""
    t0 = time.perf_counter()
    histories = [list(map(str, h)) for h in histories if h is not None and len(h) > 0]
    meta = item_meta(items, cfg.max_title_chars)
    # Items seen in histories but missing from the catalogue still count as transitions (no title: never named).
    extra = sorted({x for h in histories for x in h} - set(meta.index))
    ids = np.array(sorted(meta.index.tolist()) + extra, dtype=object)
    code = {x: i for i, x in enumerate(ids)}
    n = len(ids)
    meta = meta.reindex(ids)
    title = meta["title"].fillna("").tolist()
    item_cat, cats = _codes(meta["category"].fillna(UNKNOWN).tolist())
    item_brand, brands = _codes(meta["brand"].fillna(UNKNOWN).tolist())

    pairs = transition_pairs(histories, cfg.window)
    src = pairs["src"].map(code).to_numpy(dtype=np.int64)
    dst = pairs["dst"].map(code).to_numpy(dtype=np.int64)
    w = 1.0 / pairs["gap"].to_numpy(dtype=float)
    not_self = src != dst
    follow = sp.coo_matrix((w[not_self], (src[not_self], dst[not_self])), shape=(n, n)).tocsr()
    follow.sum_duplicates()
    pop = np.bincount([code[x] for h in histories for x in h], minlength=n).astype(np.int64)
    cat_pmi = _pmi(item_cat[src], item_cat[dst], w, len(cats), cfg.min_pair_count)
    brand_pmi = _pmi(item_brand[src], item_brand[dst], w, len(brands), cfg.min_pair_count)

    pop_order = np.lexsort((np.arange(n), -pop))  # most popular first, then smaller id (ids are sorted)
    cat_items = [np.empty(0, dtype=np.int64) for _ in cats]
    ranked_cats = item_cat[pop_order]
    for c in range(len(cats)):
        cat_items[c] = pop_order[ranked_cats == c]
    log.info(
        "offline teacher stats: %d histories, %d items, %d item pairs, %d category pairs, %d brand pairs in %.2fs",
        len(histories), n, follow.nnz, cat_pmi.nnz, brand_pmi.nnz, time.perf_counter() - t0,
    )
    return CatalogueStats(
        ids, code, title, item_cat, item_brand, cats, brands, pop, follow, cat_pmi, brand_pmi,
        cat_items, pop_order, len(histories),
    )


def _weights(prompt_item_ids, code: dict[str, int], decay: float, n_items: int) -> sp.csr_matrix:
    """(batch, n_items) recency weights: decay ** (steps from the most recent prompt item)."""
    rows, cols, vals = [], [], []
    for r, ids in enumerate(prompt_item_ids):
        ids = [str(x) for x in (ids if ids is not None else [])]
        k = len(ids)
        for j, it in enumerate(ids):
            c = code.get(it)
            if c is not None:
                rows.append(r)
                cols.append(c)
                vals.append(decay ** (k - 1 - j))
    m = sp.csr_matrix((vals, (rows, cols)), shape=(len(prompt_item_ids), n_items))
    m.sum_duplicates()
    return m


def _top_row(scores: sp.csr_matrix, r: int, k: int, exclude: set[int], tie: np.ndarray | None) -> list[int]:
    """Codes of the k highest scores of row r (ties: higher ``tie`` first, then smaller code), minus ``exclude``."""
    lo, hi = scores.indptr[r], scores.indptr[r + 1]
    cols = scores.indices[lo:hi]
    vals = scores.data[lo:hi]
    keep = vals > 0
    if exclude:
        keep &= ~np.isin(cols, np.fromiter(exclude, dtype=np.int64))
    cols, vals = cols[keep], vals[keep]
    if len(cols) == 0:
        return []
    keys = (cols, -tie[cols], -vals) if tie is not None else (cols, -vals)
    order = np.lexsort(keys)[:k]
    return cols[order].tolist()


def _project(u: sp.csr_matrix, label: np.ndarray, n_labels: int) -> sp.csr_matrix:
    """(B, n_items) weights -> (B, n_labels) weights summed per label; unknown labels (-1) dropped."""
    known = np.flatnonzero(label >= 0)
    p = sp.csr_matrix((np.ones(len(known)), (known, label[known])), shape=(u.shape[1], max(1, n_labels)))
    return (u @ p).tocsr()


def _label(names: list[str], code: int) -> str:
    return names[code] if code >= 0 else UNKNOWN


def _counts(labels: list[str], k: int) -> list[tuple[str, int]]:
    """Most frequent labels (ties: the more recent first), UNKNOWN left out."""
    last: dict[str, int] = {}
    cnt: dict[str, int] = {}
    for i, x in enumerate(labels):
        if x == UNKNOWN:
            continue
        cnt[x] = cnt.get(x, 0) + 1
        last[x] = i
    return sorted(cnt.items(), key=lambda kv: (-kv[1], -last[kv[0]], kv[0]))[:k]


def _join(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _counted(label: str, k: int) -> str:
    return f"{label} ({k})" if k > 1 else label


def _step1(n_items: int, cats: list[tuple[str, int]], brands: list[tuple[str, int]], last_title: str, last_cat: str) -> str:
    noun = "item" if n_items == 1 else "items"
    if cats:
        txt = f"The customer has bought {n_items} {noun}, mostly {_join([_counted(c, k) for c, k in cats])}"
    else:
        txt = f"The customer has bought {n_items} {noun} from categories that are not listed"
    if brands:
        txt += f", and favours the brands {_join([_counted(b, k) for b, k in brands])}."
    else:
        txt += "; no brand is listed for them."
    if last_title:
        txt += f" The most recent purchase is '{last_title}'" + (f" ({last_cat})." if last_cat else ".")
    return txt


def _step2(cats: list[str], brands: list[str], from_own: bool) -> str:
    if from_own:
        txt = f"Customers with this history tend to stay with {_join(cats)}" if cats else "No category stands out"
    else:
        txt = f"Customers who bought these items next tend to buy {_join(cats)}" if cats else "No category stands out"
    txt += f"; brands to suggest: {_join(brands)}." if brands else "; no brand stands out."
    return txt


def _step3(titles: list[str]) -> str:
    if not titles:
        return "Recommended items: none stand out."
    return "Recommended items: " + "; ".join(f'"{t}"' for t in titles) + "."


class OfflineTeacher:
    """Callable batch function: prompts rows -> teacher answer rows. Load stats once, call per batch.

    Input columns: ``prompt_hash``, ``prompt_item_ids`` (oldest first) and, in the planted-signal
    experiment only, ``planted_item_ids`` (:mod:`slimrec.teacher.planted`). Output
    columns: ``prompt_hash``, ``rationale``, ``grounded_item_ids``,
    ``finish_reason`` ("stop"), ``latency_ms`` (batch time / rows).
    """

    def __init__(self, stats: CatalogueStats, cfg: OfflineTeacherConfig):
        self.stats = stats
        self.cfg = cfg
        self.teacher_model = cfg.model_name
        self.run_stats: dict = {}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        t0 = time.perf_counter()
        st, cfg = self.stats, self.cfg
        n = len(batch)
        prompt_items = list(batch["prompt_item_ids"])
        planted = list(batch["planted_item_ids"]) if "planted_item_ids" in batch.columns else None
        hashes = batch["prompt_hash"].tolist()
        u = _weights(prompt_items, st.code, cfg.recency_decay, len(st.item_ids))  # (B, n_items)
        item_scores = (u @ st.follow).tocsr()  # (B, n_items): what follows the user's recent items
        cat_w = _project(u, st.item_cat, len(st.cats))  # (B, n_cats): recency weight per category
        brand_w = _project(u, st.item_brand, len(st.brands))
        cat_scores = (cat_w @ st.cat_pmi).tocsr()
        brand_scores = (brand_w @ st.brand_pmi).tocsr()

        rationales, grounded = [], []
        for r, ids in enumerate(prompt_items):
            ids = [str(x) for x in (ids if ids is not None else [])]
            codes = [st.code[i] for i in ids if i in st.code]
            own = set(codes)
            cats_u = _counts([_label(st.cats, st.item_cat[c]) for c in codes], cfg.n_categories)
            brands_u = _counts([_label(st.brands, st.item_brand[c]) for c in codes], cfg.n_brands)
            last_title = st.title[codes[-1]] if codes else ""
            last_cat = _label(st.cats, st.item_cat[codes[-1]]) if codes else ""
            cats2 = [st.cats[c] for c in _top_row(cat_scores, r, cfg.n_categories, set(), None)]
            from_own = not cats2
            if from_own:
                cats2 = [c for c, _ in cats_u]
            brands2 = [st.brands[b] for b in _top_row(brand_scores, r, cfg.n_brands, set(), None)]
            brands2 = brands2 or [b for b, _ in brands_u]

            chosen = [c for c in _top_row(item_scores, r, 4 * cfg.n_items, own, st.pop) if st.title[c]][: cfg.n_items]
            if len(chosen) < cfg.n_items:  # cold or rare items: popular items of the step-2 categories, then overall
                taken = own | set(chosen)
                cat_codes = [st.cats.index(c) for c in cats2 if c in st.cats]
                for pool in [st.cat_items[c] for c in cat_codes] + [st.pop_order]:
                    for c in pool[: 4 * cfg.n_items + len(taken)]:
                        if len(chosen) >= cfg.n_items:
                            break
                        c = int(c)
                        if c not in taken and st.title[c]:
                            chosen.append(c)
                            taken.add(c)
            if planted is not None:  # experiment only (slimrec.teacher.planted): names held-out targets
                codes_p = [st.code[str(x)] for x in (planted[r] if planted[r] is not None else []) if str(x) in st.code]
                chosen = insert_planted(chosen, [c for c in codes_p if st.title[c]], cfg.n_items, str(hashes[r]))
            titles = [_QUOTES.sub("'", st.title[c]) for c in chosen]
            text = "\n".join(
                [
                    "Step 1: " + _step1(len(ids), cats_u, brands_u, last_title, last_cat),
                    "Step 2: " + _step2(cats2, brands2, from_own),
                    "Step 3: " + _step3(titles),
                ]
            )
            rationales.append(text)
            grounded.append([str(st.item_ids[c]) for c in chosen])
        per_row_ms = (time.perf_counter() - t0) * 1000.0 / max(1, n)
        return pd.DataFrame(
            {
                "prompt_hash": batch["prompt_hash"].to_numpy(),
                "rationale": rationales,
                "grounded_item_ids": grounded,
                "finish_reason": "stop",
                "latency_ms": per_row_ms,
            }
        )

    def answer(self, pending: pd.DataFrame, budget, batch_size: int, chars_per_token: float) -> Iterator[list[dict]]:
        """Same contract as :meth:`HttpTeacher.answer`: batches of raw result dicts, budget reserved per prompt.

        ``pending`` has ``prompt_hash``, ``teacher_prompt``, ``prompt_item_ids``.
        Token counts are estimates (chars / ``chars_per_token``): nothing is billed.
        """
        self.run_stats = {"sent": 0, "answered": 0, "failed": 0, "not_sent": 0, "requests": 0, "stopped_by": None}
        rows = pending.reset_index(drop=True)
        take = 0
        ins = [estimate_tokens(p, chars_per_token) for p in rows["teacher_prompt"]]
        for n_in in ins:
            if not budget.try_reserve(n_in, 0):
                self.run_stats["stopped_by"] = budget.stopped_by
                break
            take += 1
        self.run_stats["not_sent"] = len(rows) - take
        for start in range(0, take, batch_size):
            chunk = rows.iloc[start : min(take, start + batch_size)]
            ans = self(chunk)
            now = datetime.now(tz=UTC)
            batch = []
            for (_, a), n_in in zip(ans.iterrows(), ins[start : start + len(chunk)], strict=True):
                n_out = estimate_tokens(a["rationale"], chars_per_token)
                budget.settle(n_in, 0, n_in, n_out)
                batch.append(
                    {
                        "prompt_hash": a["prompt_hash"], "sent": True, "fatal": False, "content": a["rationale"],
                        "finish_reason": "stop", "input_tokens": n_in, "output_tokens": n_out, "error": None,
                        "http_status": None, "attempts": 1, "latency_ms": float(a["latency_ms"]), "answered_ts": now,
                        "grounded_item_ids": list(a["grounded_item_ids"]),
                    }
                )
            self.run_stats["sent"] += len(batch)
            self.run_stats["answered"] += len(batch)
            self.run_stats["requests"] += len(batch)
            yield batch
