"""Plain numpy inputs of the recommender, built from pandas frames (or the bundled JSON).

Ids: items get an internal index ``1..n_items`` (``0`` is padding) in the order
of :attr:`RecData.item_ids`; users are rows ``0..n_users-1`` of
:attr:`RecData.user_ids`. Sequences are stored as CSR (``ptr``/``items``).

Splits (leave-one-out; the leakage guard of DESIGN.md):

=========  ==========================  ==============  ===========================
split      model input                 target          excluded under full ranking
=========  ==========================  ==============  ===========================
train      history[:t]                 history[t]      (sampled negatives only)
valid      history                     valid_target    history
test       history + [valid_target]    test_target     history + [valid_target]
serve      whole sequence              (none)          whole sequence
=========  ==========================  ==============  ===========================

Example: ``item_ids = [i1, i2, i3, i4, i5]`` -> history ``[i1, i2, i3]``,
train rows ``<i1> -> i2``, ``<i1, i2> -> i3``, valid ``<i1, i2, i3> -> i4``,
test ``<i1, i2, i3, i4> -> i5``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

SOURCES = ("teacher", "student")


@dataclass
class RationaleData:
    """Rationale vectors and grounded items of one source, aligned with :attr:`RecData.user_ids`."""

    vectors: np.ndarray  # (U, D) float32, zeros where absent
    present: np.ndarray  # (U,) bool: a rationale vector exists for the user
    grounded_ptr: np.ndarray  # (U+1,) int64 CSR over users
    grounded_items: np.ndarray  # internal item indices named by the rationale's step 3
    model_version: str = ""
    # (U,) bool: the user's rationale was retrieved from the nearest seed-pool users (retrieve_rationales)
    # instead of written for them; None: the table says nothing of it
    retrieved: np.ndarray | None = None

    @property
    def n_present(self) -> int:
        return int(self.present.sum())

    @property
    def n_grounded_users(self) -> int:
        return int((np.diff(self.grounded_ptr) > 0).sum())


@dataclass
class RecData:
    user_ids: np.ndarray  # (U,) str
    item_ids: np.ndarray  # (n_items,) str; internal index = position + 1
    hist_ptr: np.ndarray  # (U+1,) int64
    hist_items: np.ndarray  # internal indices, time order per user
    valid_target: np.ndarray  # (U,) int64
    test_target: np.ndarray  # (U,) int64
    item_text: np.ndarray | None = None  # (n_items+1, D) float32, row 0 (padding) zeros
    item_text_present: np.ndarray | None = None  # (n_items+1,) bool
    rationales: dict[str, RationaleData] = field(default_factory=dict)
    encoder: str | None = None

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def hist_len(self) -> np.ndarray:
        return np.diff(self.hist_ptr)

    def history(self, u: int) -> np.ndarray:
        return self.hist_items[self.hist_ptr[u] : self.hist_ptr[u + 1]]

    def split_sequences(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """CSR ``(ptr, items)`` of the model input for ``split`` (valid | test | serve).

        For every split this is also the set excluded from full-ranking candidates.
        """
        if split == "valid":
            return self.hist_ptr, self.hist_items
        extra = [self.valid_target] if split == "test" else [self.valid_target, self.test_target]
        return append_columns(self.hist_ptr, self.hist_items, extra)

    def targets(self, split: str) -> np.ndarray:
        if split == "valid":
            return self.valid_target
        if split == "test":
            return self.test_target
        raise ValueError(f"split {split!r} has no target")


def append_columns(ptr: np.ndarray, items: np.ndarray, cols: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Append one item per user (each array in ``cols``, shape (U,)) to a CSR."""
    lens = np.diff(ptr)
    k = len(cols)
    new_lens = lens + k
    new_ptr = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64)
    out = np.zeros(new_ptr[-1], dtype=np.int64)
    src_rows = np.repeat(np.arange(len(lens)), lens)
    offs = np.arange(len(items)) - np.repeat(ptr[:-1], lens)
    out[new_ptr[:-1][src_rows] + offs] = items
    for j, c in enumerate(cols):
        out[new_ptr[:-1] + lens + j] = c
    return new_ptr, out


def pad_left(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int) -> np.ndarray:
    """Rows ``items[starts[r]:ends[r]]``, last ``max_len`` kept, right-aligned in an (R, max_len) int64 array.

    Right alignment puts every row's most recent item in the last column (as SASRec.pytorch does),
    so the last column is the user's current state. ``0`` pads.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    take = np.minimum(ends - starts, max_len).clip(0)
    out = np.zeros((len(starts), max_len), dtype=np.int64)
    total = int(take.sum())
    if total == 0:
        return out
    row = np.repeat(np.arange(len(starts)), take)
    first = np.cumsum(take) - take
    off = np.arange(total) - np.repeat(first, take)
    src = np.repeat(ends - take, take) + off
    col = max_len - np.repeat(take, take) + off
    out[row, col] = items[src]
    return out


def csr_pad_left(ptr: np.ndarray, items: np.ndarray, max_len: int) -> np.ndarray:
    return pad_left(items, ptr[:-1], ptr[1:], max_len)


def train_rows_per_position(data: RecData, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SASRec-style rows: one per user with >= 2 history items; every position predicts the next item.

    Returns ``inputs (R, L)``, ``targets (R, L)`` (0 where nothing is predicted) and ``row_user (R,)``.
    Row of history ``[a, b, c]``: inputs ``[0.., a, b]``, targets ``[0.., b, c]``.
    """
    lens = data.hist_len
    users = np.nonzero(lens >= 2)[0]
    s, e = data.hist_ptr[users], data.hist_ptr[users + 1]
    inputs = pad_left(data.hist_items, s, e - 1, max_len)
    targets = pad_left(data.hist_items, s + 1, e, max_len)
    return inputs, targets, users


def train_rows_prefix(data: RecData, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Session-style rows (SR-GNN): every history prefix ``h[:k]`` (k >= 1) predicts ``h[k]``.

    Returns ``inputs (R, L)``, ``targets (R,)`` and ``row_user (R,)``.
    History ``[a, b, c]`` gives ``<a> -> b`` and ``<a, b> -> c``.
    """
    lens = data.hist_len
    n_rows = np.clip(lens - 1, 0, None)
    row_user = np.repeat(np.arange(data.n_users), n_rows)
    k = np.arange(n_rows.sum()) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows) + 1  # prefix length
    base = data.hist_ptr[:-1][row_user]
    inputs = pad_left(data.hist_items, base, base + k, max_len)
    targets = data.hist_items[base + k]
    return inputs, targets, row_user


def excluded_mask_rows(ptr: np.ndarray, items: np.ndarray, users: np.ndarray, n_cols: int) -> np.ndarray:
    """Dense bool (len(users), n_cols) with True at every item of each user's CSR row."""
    lens = np.diff(ptr)[users]
    rows = np.repeat(np.arange(len(users)), lens)
    cols = np.concatenate([items[ptr[u] : ptr[u + 1]] for u in users]) if len(users) else np.zeros(0, np.int64)
    m = np.zeros((len(users), n_cols), dtype=bool)
    m[rows, cols] = True
    return m


# ---------------------------------------------------------------------------------------------- builders
def split_leave_one_out(item_lists: pd.Series) -> pd.DataFrame:
    """``user_sequences``-shaped frame from ordered item lists (users with < 3 items are dropped)."""
    rows = []
    for uid, seq in item_lists.items():
        seq = [str(x) for x in seq]
        if len(seq) < 3:
            continue
        rows.append((str(uid), seq, seq[:-2], seq[-2], seq[-1]))
    return pd.DataFrame(rows, columns=["user_id", "item_ids", "history", "valid_target", "test_target"])


def sequences_from_inter_json(inter: dict) -> pd.DataFrame:
    """The bundled ``Office.inter.json`` (``{user: [items in time order]}``) as ``user_sequences`` columns.

    Repeated items of a user keep their first occurrence (the pipeline's default dedup).
    """
    dedup = {u: list(dict.fromkeys(str(i) for i in seq)) for u, seq in inter.items()}
    return split_leave_one_out(pd.Series(dedup))


def items_from_item_json(items: dict) -> pd.DataFrame:
    """``items(item_id, item_text)`` from ``Office.item.json``; text is ``title | categories | brand``."""
    rows = []
    for iid, rec in items.items():
        parts = [str(rec.get(k) or "").strip() for k in ("title", "categories", "brand")]
        rows.append((str(iid), " | ".join(p for p in parts if p)))
    return pd.DataFrame(rows, columns=["item_id", "item_text"])


def _stack(emb: pd.Series) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=np.float32) for v in emb]) if len(emb) else np.zeros((0, 0), np.float32)


def build_rec_data(
    user_sequences: pd.DataFrame,
    items: pd.DataFrame | None = None,
    item_embeddings: pd.DataFrame | None = None,
    rationale_embeddings: pd.DataFrame | None = None,
    rationales: dict[str, pd.DataFrame] | None = None,
    encoder: str | None = None,
) -> tuple[RecData, dict]:
    """Index users and items and align every optional input with them.

    Inputs (pandas): ``user_sequences(user_id, history list, valid_target, test_target)``;
    ``items(item_id)`` (the catalogue; items seen only in sequences are added);
    ``item_embeddings(item_id, encoder, embedding)``; ``rationale_embeddings(user_id, source, model_version,
    encoder, embedding)``; ``rationales[source]`` = ``teacher_rationales`` / ``student_rationales`` rows
    ``(user_id, status, grounded_item_ids, ...)``, only ``status == 'ok'`` rows used, the latest per user.
    Missing inputs stay absent (never filled with fakes); ``notes`` says what was found.
    """
    notes: dict = {}
    # Users and items are indexed in sorted id order, never in the order a table's files happen to hold
    # them (a compaction or another writer reorders rows): same data, same indices, same seeded run.
    seqs = user_sequences.assign(user_id=user_sequences["user_id"].astype(str)).sort_values(
        "user_id", kind="stable").reset_index(drop=True)
    cat = set() if items is None else {str(x) for x in items["item_id"]}
    seen = set(cat)
    for h in seqs["history"]:
        seen.update(str(x) for x in h)
    seen.update(str(x) for x in seqs["valid_target"])
    seen.update(str(x) for x in seqs["test_target"])
    item_ids = np.array(sorted(seen), dtype=object)
    index = {iid: i + 1 for i, iid in enumerate(item_ids)}
    notes["items_not_in_catalogue"] = len(item_ids) - len(cat) if items is not None else None

    lens = seqs["history"].map(len).to_numpy()
    hist_ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    hist_items = np.fromiter((index[str(x)] for h in seqs["history"] for x in h), dtype=np.int64, count=hist_ptr[-1])
    data = RecData(
        user_ids=seqs["user_id"].astype(str).to_numpy(dtype=object),
        item_ids=item_ids,
        hist_ptr=hist_ptr,
        hist_items=hist_items,
        valid_target=seqs["valid_target"].map(lambda x: index[str(x)]).to_numpy(np.int64),
        test_target=seqs["test_target"].map(lambda x: index[str(x)]).to_numpy(np.int64),
    )
    user_index = {u: i for i, u in enumerate(data.user_ids)}

    if item_embeddings is not None and len(item_embeddings):
        encs = sorted(item_embeddings["encoder"].unique())
        enc = encoder if encoder in encs else (encs[0] if len(encs) == 1 else None)
        if enc is None:
            raise ValueError(f"item_embeddings hold encoders {encs}; set recommender.encoder to one of them")
        ie = item_embeddings[item_embeddings["encoder"] == enc]
        vec = _stack(ie["embedding"])
        text = np.zeros((data.n_items + 1, vec.shape[1]), dtype=np.float32)
        present = np.zeros(data.n_items + 1, dtype=bool)
        idx = ie["item_id"].map(lambda x: index.get(str(x), -1)).to_numpy()
        ok = idx > 0
        text[idx[ok]] = vec[ok]
        present[idx[ok]] = True
        data.item_text, data.item_text_present, data.encoder = text, present, enc
        notes["item_text_coverage"] = float(present[1:].mean())
        notes["encoder"] = enc

    for source in SOURCES:
        rat = _rationale_data(source, data, user_index, index, rationale_embeddings, (rationales or {}).get(source))
        if rat is not None:
            data.rationales[source] = rat
            notes[f"{source}_rationale_users"] = rat.n_present
            notes[f"{source}_grounded_users"] = rat.n_grounded_users
    return data, notes


def _rationale_data(source, data, user_index, item_index, emb_df, rat_df) -> RationaleData | None:
    vectors = None
    present = np.zeros(data.n_users, dtype=bool)
    version = ""
    if emb_df is not None and len(emb_df):
        e = emb_df[emb_df["source"] == source]
        if data.encoder is not None:
            e = e[e["encoder"] == data.encoder]
        if len(e):
            vec = _stack(e["embedding"])
            vectors = np.zeros((data.n_users, vec.shape[1]), dtype=np.float32)
            u = e["user_id"].map(lambda x: user_index.get(str(x), -1)).to_numpy()
            ok = u >= 0
            vectors[u[ok]] = vec[ok]
            present[u[ok]] = True
            versions = e["model_version"].value_counts()
            version = str(versions.index[0]) if len(versions) else ""
    g_lists: list[list[int]] = [[] for _ in range(data.n_users)]
    retrieved = None
    if rat_df is not None and len(rat_df):
        r = rat_df[rat_df["status"] == "ok"]
        if version and "model_version" in r.columns and (r["model_version"] == version).any():
            r = r[r["model_version"] == version]  # grounded items of the same model as the vectors
        order = [c for c in ("run_date", "answered_ts") if c in r.columns]
        if order:
            r = r.sort_values(order)
        r = r.drop_duplicates("user_id", keep="last")
        if "rationale_source" in r.columns and (r["rationale_source"] == "retrieved").any():
            retrieved = np.zeros(data.n_users, dtype=bool)
            u = r.loc[r["rationale_source"] == "retrieved", "user_id"].map(lambda x: user_index.get(str(x), -1))
            retrieved[u[u >= 0].to_numpy(np.int64)] = True
        for uid, gids in zip(r["user_id"], r["grounded_item_ids"], strict=True):
            u = user_index.get(str(uid))
            if u is None or gids is None:
                continue
            g_lists[u] = [item_index[str(g)] for g in gids if str(g) in item_index]
    if vectors is None and not any(g_lists):
        return None
    lens = np.array([len(g) for g in g_lists], dtype=np.int64)
    return RationaleData(
        vectors=vectors if vectors is not None else np.zeros((data.n_users, 0), np.float32),
        present=present,
        grounded_ptr=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        grounded_items=np.fromiter((i for g in g_lists for i in g), dtype=np.int64, count=int(lens.sum())),
        model_version=version,
        retrieved=retrieved,
    )
