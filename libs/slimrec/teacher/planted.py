"""The planted-signal teacher: an experiment that LEAKS held-out targets on purpose.

It measures the rationale channel (prompt -> teacher -> embed -> fusion ->
ranking) with a teacher whose rationales carry known signal: with precision
``p``, a user's rationale also names that user's validation and test items in
step 3, placed among the offline teacher's other named items in random order
(they replace its lowest-ranked picks, so every rationale names as many items
as before); otherwise the rationale is exactly what the offline teacher writes.
A channel that works rises steeply with ``p``; student rationales must stay
flat (a student cannot know a user's future, so a rise means leakage).

It is never a default: only ``slim experiment planted`` or the explicit key
``teacher.offline.planted_precision`` turns it on, its ``teacher_model`` name
carries :data:`PLANTED_MARK` (so the cache key includes ``p``), stages that
pick "the teacher's rows" without naming a model leave planted rows out
(:func:`drop_planted`), and every report that shows its numbers flags them as
leakage.

Which users are planted is a stable draw per (seed, user) in ``[0, 1)``; a
user is planted when the draw is below ``p``, so the planted users of a lower
``p`` are planted at every higher ``p`` (nested sets, paired comparisons).

Example: users u1 (draw 0.07), u2 (draw 0.62), ``p = 0.25`` -> u1's step 3
names its valid and test items among 8 of the offline picks; u2's is unchanged.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

PLANTED_MARK = "+planted-p"
LEAKAGE_NOTE = (
    "LEAKAGE BY DESIGN: planted-signal teacher (its rationales name held-out targets); an experiment "
    "of the rationale channel, never a result"
)


def planted_model_name(base: str, precision: float) -> str:
    """``offline-cooc-v1`` at 0.25 -> ``offline-cooc-v1+planted-p0.25``."""
    return f"{base}{PLANTED_MARK}{precision:g}"


def is_planted(teacher_model) -> bool:
    return isinstance(teacher_model, str) and PLANTED_MARK in teacher_model


def precision_of(teacher_model: str) -> float | None:
    """``...+planted-p0.25`` -> 0.25; None for a model that is not planted."""
    if not is_planted(teacher_model):
        return None
    return float(teacher_model.rsplit(PLANTED_MARK, 1)[1])


def drop_planted(df: pd.DataFrame | None, column: str) -> pd.DataFrame | None:
    """Rows whose ``column`` (teacher_model / model_version) is not a planted teacher."""
    if df is None or df.empty or column not in df.columns:
        return df
    return df[~df[column].map(is_planted)]


def planted_draw(user_ids, seed: int) -> np.ndarray:
    """A stable number in ``[0, 1)`` per (seed, user), salted with this purpose."""
    out = np.empty(len(user_ids), dtype=np.float64)
    for i, u in enumerate(user_ids):
        h = hashlib.sha1(f"planted\x1f{seed}\x1f{u}".encode()).digest()
        out[i] = int.from_bytes(h[:8], "big") / 2**64
    return out


def planted_targets(sequences: pd.DataFrame, precision: float, seed: int) -> pd.DataFrame:
    """``user_sequences(user_id, valid_target, test_target)`` -> ``user_id, planted_item_ids``.

    ``planted_item_ids`` is ``[valid_target, test_target]`` for the planted users and ``[]`` for the rest.
    """
    draw = planted_draw(sequences["user_id"].astype(str).tolist(), seed)
    hit = draw < precision
    ids = [[str(v), str(t)] if h else [] for v, t, h in
           zip(sequences["valid_target"], sequences["test_target"], hit, strict=True)]
    return pd.DataFrame({"user_id": sequences["user_id"].astype(str).to_numpy(), "planted_item_ids": ids})


def per_user_keys(sample: pd.DataFrame) -> pd.DataFrame:
    """The sample with ``prompt_hash`` replaced by ``sha1(prompt_hash | user_id)``: the planted teacher's cache key.

    A planted rationale names its user's held-out items, so two users shown the same prompt need two
    rationales; under the prompt's own hash the cache would send it once and give it to one user only.
    The key is still a 40-hex sha1 but matches no ``prompts`` row: planted rows never reach a consumer
    that joins on prompts (distillation drops them, embed and train read them by user).
    """
    out = sample.copy()
    out["prompt_hash"] = [hashlib.sha1(f"{h}|{u}".encode()).hexdigest()
                          for h, u in zip(out["prompt_hash"], out["user_id"], strict=True)]
    return out


def insert_planted(chosen: list[int], planted: list[int], n_items: int, key: str) -> list[int]:
    """The offline picks ``chosen`` with ``planted`` placed among them at random positions.

    Planted items replace the lowest-ranked picks so the list keeps ``max(len(chosen), n_items)`` items
    at most; a planted item the teacher had picked anyway is not named twice. Positions are drawn from
    a generator seeded by ``key`` (the prompt hash), so the same prompt gives the same text.

    >>> insert_planted([1, 2, 3, 4], [9], 4, "h")  # 9 replaces 4, at a seeded position
    [1, 9, 2, 3]
    """
    planted = [c for c in dict.fromkeys(planted)]
    if not planted:
        return list(chosen)
    keep = [c for c in chosen if c not in planted][: max(0, n_items - len(planted))]
    rng = np.random.default_rng(int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big"))
    out = list(keep)
    for c in planted:
        out.insert(int(rng.integers(0, len(out) + 1)), c)
    return out
