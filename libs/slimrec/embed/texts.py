"""Pure transforms of the embed stage: which texts to encode, and how vectors come back as rows.

No session, no path, no model: pandas frames in, pandas frames out.

Worked example (``rationale_text="whole"``)::

    student_rationales                      rationale_texts(...)
    user_id run_date   model_version status  user_id source  model_version texts        text_hash
    u1      2024-01-14 s1            ok      u1      student s1            ["Step 1..."] sha1("whole\\x1fStep 1...")
    u1      2024-01-15 s1            ok   ->
    u2      2024-01-15 s1            failed  (u1's 2024-01-15 row wins; u2 has no ok row)

``changed_rows`` then keeps the rows whose (key, text_hash) pair is not in the
existing table for this encoder, and ``pool_vectors`` turns the per-text
vectors back into one vector per row.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

TEXT_SEP = "\x1f"  # unit separator: cannot occur in normalised text, so hashes of step lists do not collide
ITEM_KEY = ["item_id"]
RATIONALE_KEY = ["user_id", "source"]


def _nonempty(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def rationale_text_parts(row, mode: str) -> list[str]:
    """Texts encoded for one rationale: ``[rationale]``, or its non-empty steps (falls back to the whole).

    >>> rationale_text_parts({"rationale": "Step 1: a Step 2: b", "step1": "a", "step2": "b", "step3": None}, "steps")
    ['a', 'b']
    """
    if mode == "steps":
        steps = [row.get(f"step{i}") for i in (1, 2, 3)]
        steps = [s.strip() for s in steps if _nonempty(s)]
        if steps:
            return steps
    text = row.get("rationale")
    return [text.strip()] if _nonempty(text) else []


def rationale_hash(parts: list[str], mode: str) -> str:
    """sha1 over the mode and the encoded texts: a new mode or a new text means a new vector."""
    return hashlib.sha1(TEXT_SEP.join([mode, *parts]).encode()).hexdigest()


def latest_ok(df: pd.DataFrame, order: list[str], version_col: str, version: str | None) -> pd.DataFrame:
    """Each user's latest row with status ``ok`` (ordered by ``order``, last wins), optionally one version only."""
    ok = df[(df["status"] == "ok") & df["rationale"].map(_nonempty)]
    if version is not None:
        ok = ok[ok[version_col] == version]
    return ok.sort_values(["user_id", *order], kind="stable").drop_duplicates("user_id", keep="last")


def rationale_texts(df: pd.DataFrame, source: str, mode: str, version_col: str, version: str | None) -> pd.DataFrame:
    """Rationale rows -> one row per user to encode.

    Input: user_id, status, rationale, step1..3, run_date, ``version_col``
    (``model_version`` for the student, ``teacher_model`` for the teacher) and,
    for the teacher, ``answered_ts`` as a tie-break; ``rationale_source`` when
    present: a user whose latest ok row was retrieved is left out (its vector
    is the neighbours', not its text's).
    Output: user_id, source, model_version, texts (list[str]), text_hash, rationale_source.
    """
    order = ["run_date", *(c for c in ("answered_ts",) if c in df.columns), version_col]
    latest = latest_ok(df, order, version_col, version)
    if "rationale_source" in latest.columns:  # a retrieved rationale's vector is written by retrieve_rationales
        latest = latest[latest["rationale_source"].fillna(source) != "retrieved"]
    parts = [rationale_text_parts(r, mode) for r in latest.to_dict("records")]
    out = pd.DataFrame(
        {
            "user_id": latest["user_id"].to_numpy(),
            "source": source,
            "model_version": latest[version_col].astype(str).to_numpy(),
            "texts": parts,
            "text_hash": [rationale_hash(p, mode) for p in parts],
            "rationale_source": source,
        }
    )
    return out[out["texts"].map(len) > 0].reset_index(drop=True)


def item_texts(items: pd.DataFrame) -> pd.DataFrame:
    """items(item_id, item_text, text_hash) -> item_id, texts ([item_text]), text_hash (the items table's)."""
    out = items[items["item_text"].map(_nonempty)][["item_id", "item_text", "text_hash"]]
    return pd.DataFrame(
        {
            "item_id": out["item_id"].to_numpy(),
            "texts": [[t] for t in out["item_text"]],
            "text_hash": out["text_hash"].to_numpy(),
        }
    )


def changed_rows(candidates: pd.DataFrame, existing: pd.DataFrame, key: list[str], compare: list[str]) -> pd.DataFrame:
    """Anti-join: candidates whose ``key`` is new, or whose ``compare`` columns differ from ``existing``.

    ``existing`` holds rows of the same encoder only.

    >>> c = pd.DataFrame({"item_id": ["a", "b", "c"], "text_hash": ["1", "2", "3"]})
    >>> e = pd.DataFrame({"item_id": ["a", "b"], "text_hash": ["1", "x"]})
    >>> changed_rows(c, e, ["item_id"], ["text_hash"])["item_id"].tolist()
    ['b', 'c']
    """
    if existing.empty:
        return candidates.reset_index(drop=True)
    old = existing[key + compare].drop_duplicates(key).rename(columns={c: f"{c}__old" for c in compare})
    m = candidates.merge(old, on=key, how="left", indicator=True)
    differs = m["_merge"] == "left_only"
    for c in compare:
        differs |= m[c] != m[f"{c}__old"]
    return m[differs][candidates.columns].reset_index(drop=True)


def flatten_texts(rows: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """``texts`` lists -> (flat texts, owner row index per text)."""
    counts = rows["texts"].map(len).to_numpy()
    flat = [t for ts in rows["texts"] for t in ts]
    return flat, np.repeat(np.arange(len(rows)), counts)


def pool_vectors(vectors: np.ndarray, owner: np.ndarray, n_rows: int, normalize: bool) -> np.ndarray:
    """Mean of each row's text vectors: (n_texts, d) -> (n_rows, d); re-normalised when ``normalize``.

    >>> pool_vectors(np.array([[1., 0.], [0., 1.], [3., 4.]]), np.array([0, 0, 1]), 2, False).tolist()
    [[0.5, 0.5], [3.0, 4.0]]
    """
    d = vectors.shape[1] if vectors.ndim == 2 else 0
    sums = np.zeros((n_rows, d), np.float64)
    np.add.at(sums, owner, vectors)
    counts = np.bincount(owner, minlength=n_rows).astype(np.float64)[:, None]
    out = sums / np.maximum(counts, 1.0)
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)


def with_vectors(rows: pd.DataFrame, vectors: np.ndarray, encoder_id: str, columns: list[str]) -> pd.DataFrame:
    """Rows + their (n, d) vectors -> the output table's columns (embedding list<float32>, dim, encoder)."""
    out = rows.drop(columns=["texts"]).copy()
    out["encoder"] = encoder_id
    out["embedding"] = list(vectors.astype(np.float32))
    out["dim"] = np.int32(vectors.shape[1] if len(vectors) else 0)
    return out[columns]
