"""Training pairs for the student: student prompt -> teacher rationale, and their tokens.

Pure functions over pandas frames and a tokenizer; no session, no path.

* :func:`training_pairs`: ok ``teacher_rationales`` rows joined to ``prompts``
  on ``prompt_hash``.
* :func:`split_by_user`: train / held-out by a seeded hash of ``user_id``, so a
  user is on one side only and stays there across runs.
* :func:`trim_items`: cut step 3 after the first ``k`` quoted items.
* :func:`fit_prompt_ids` / :func:`encode_pair`: tokens of a prompt that fits a
  token budget (oldest history lines dropped first) and of a pair, with the
  prompt masked out of the loss (label ``-100``).
"""

from __future__ import annotations

import re

import pandas as pd

from slimrec.rationale import parse_rationale
from slimrec.text import unit_draw

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
PAIR_COLUMNS = ["user_id", "prompt_hash", "teacher_model", "student_prompt", "rationale"]
_QUOTED = re.compile(r"[\"“]([^\"”\n]{3,200})[\"”]")


def training_pairs(teacher: pd.DataFrame, prompts: pd.DataFrame, teacher_model: str | None = None) -> pd.DataFrame:
    """Ok teacher answers with the student prompt of the same ``prompt_hash``.

    ``teacher``: ``prompt_hash, teacher_model, user_id, rationale, status``;
    ``prompts``: ``prompt_hash, student_prompt`` (and ``run_date``: the latest
    wins when a hash was written on several dates). Output: :data:`PAIR_COLUMNS`,
    sorted by (user_id, prompt_hash, teacher_model).

    Example: teacher rows (h1, ok), (h2, parse_error); prompts h1, h2, h3 ->
    one pair, h1's student prompt -> h1's rationale.
    """
    t = teacher[teacher["status"] == "ok"]
    if teacher_model is not None:
        t = t[t["teacher_model"] == teacher_model]
    t = t[t["rationale"].notna() & (t["rationale"].str.strip() != "")]
    p = prompts
    if "run_date" in p.columns:
        p = p.sort_values("run_date")
    p = p.drop_duplicates("prompt_hash", keep="last")[["prompt_hash", "student_prompt"]]
    out = t[["user_id", "prompt_hash", "teacher_model", "rationale"]].merge(p, on="prompt_hash", how="inner")
    return out[PAIR_COLUMNS].sort_values(["user_id", "prompt_hash", "teacher_model"]).reset_index(drop=True)


def user_bucket(user_id: str, seed: int) -> float:
    """A stable number in [0, 1) per (seed, user): sha1, first 8 bytes.

    Salted with this purpose: the teacher draws its sample from sha1(seed, user) too, keeping the
    lowest draws, so an unsalted split would hold out a third of a 30% sample instead of 10%.
    """
    return unit_draw("student-heldout", seed, user_id)


def split_by_user(pairs: pd.DataFrame, heldout_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held-out): a user is held out when ``user_bucket(user_id, seed) < heldout_fraction``.

    With at least two users and a positive fraction, at least one user is held
    out and at least one trains (the bucket order decides which).
    """
    if pairs.empty or heldout_fraction <= 0:
        return pairs.reset_index(drop=True), pairs.iloc[0:0].reset_index(drop=True)
    users = pd.Series(sorted(pairs["user_id"].unique()))
    buckets = users.map(lambda u: user_bucket(u, seed))
    held = set(users[buckets < heldout_fraction])
    if len(users) >= 2 and not held:
        held = {users[buckets.idxmin()]}
    if len(users) >= 2 and len(held) == len(users):
        held.discard(users[buckets.idxmax()])
    mask = pairs["user_id"].isin(held)
    return pairs[~mask].reset_index(drop=True), pairs[mask].reset_index(drop=True)


def eval_subset(held: pd.DataFrame, k: int, seed: int) -> pd.DataFrame:
    """At most ``k`` held-out users (one pair each), a seeded sample in user_id order: the quality check's set."""
    one = held.drop_duplicates("user_id")
    return one.sample(n=min(k, len(one)), random_state=seed).sort_values("user_id") if len(one) else one


def trim_items(rationale: str, max_items: int | None) -> str:
    """Cut step 3 after its first ``max_items`` quoted titles (the teacher ranks best first).

    >>> trim_items('Step 1: a\\nStep 2: b\\nStep 3: Items: "Pen A"; "Pen B"; "Pen C".', 2)
    'Step 1: a\\nStep 2: b\\nStep 3: Items: "Pen A"; "Pen B".'

    Text that does not parse, or has no more than ``max_items`` quoted titles,
    comes back unchanged.
    """
    if max_items is None:
        return rationale
    parsed, err = parse_rationale(rationale)
    if err is not None:
        return rationale
    start = rationale.rfind(parsed.step3)
    if start < 0:
        return rationale
    quoted = list(_QUOTED.finditer(rationale, start))
    if len(quoted) <= max_items:
        return rationale
    return rationale[: quoted[max_items - 1].end()] + "."


def _bos_eos(tokenizer) -> tuple[list[int], int | None]:
    """Ids the tokenizer puts before a text (BOS, when it adds one) and the EOS id."""
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    return list(prefix), tokenizer.eos_token_id


def fit_prompt_ids(tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """Token ids of ``prompt`` (with the tokenizer's BOS) in at most ``max_tokens``.

    History lines (``- title | category | brand``) are dropped oldest first
    until the prompt fits; if the header, the newest line and the closing
    instruction still do not fit, the oldest tokens after BOS are cut.
    """
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(ids) <= max_tokens:
        return list(ids)
    lines = prompt.split("\n")
    hist = [i for i, ln in enumerate(lines) if ln.startswith("- ")]
    if hist:
        # Tokens per history line (with its newline); byte-level BPE never merges across "\n".
        line_lens = [len(x) for x in tokenizer([lines[i] + "\n" for i in hist], add_special_tokens=False)["input_ids"]]
        over = len(ids) - max_tokens
        drop, saved = 0, 0
        while saved < over and drop < len(hist) - 1:
            saved += line_lens[drop]
            drop += 1
        dropped = set(hist[:drop])
        ids = tokenizer("\n".join(ln for i, ln in enumerate(lines) if i not in dropped), add_special_tokens=True)[
            "input_ids"
        ]
    if len(ids) > max_tokens:
        prefix, _ = _bos_eos(tokenizer)
        keep = max_tokens - len(prefix)
        ids = prefix + list(ids[len(ids) - keep :])
    return list(ids)


def encode_pair(tokenizer, prompt: str, target: str, max_prompt_tokens: int, max_target_tokens: int) -> dict:
    """``{"input_ids", "labels"}`` of prompt + target + EOS; prompt positions carry no loss.

    A target longer than ``max_target_tokens`` is cut and gets no EOS (the
    model is not taught to stop there).
    """
    p = fit_prompt_ids(tokenizer, prompt, max_prompt_tokens)
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    _, eos = _bos_eos(tokenizer)
    t = list(t[:max_target_tokens]) if len(t) >= max_target_tokens else list(t) + ([eos] if eos is not None else [])
    return {"input_ids": p + t, "labels": [IGNORE_INDEX] * len(p) + t}


def collate_right(examples: list[dict], pad_id: int):
    """Right-padded training batch: ``input_ids``, ``attention_mask``, ``labels`` as (B, T) long tensors."""
    import torch

    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        mask[i, :k] = 1
        labels[i, :k] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_left(prompt_ids: list[list[int]], pad_id: int):
    """Left-padded generation batch: ``input_ids`` and ``attention_mask`` as (B, T) long tensors."""
    import torch

    n = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), n), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, n - len(p) :] = torch.tensor(p)
        mask[i, n - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def length_grouped_batches(lengths: list[int], batch_size: int, group: int, seed: int) -> list[list[int]]:
    """Indices in batches of similar length: shuffle, sort pools of ``group`` batches by length, shuffle batches.

    Deterministic for a seed; every index appears exactly once.
    """
    import random

    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    pool = batch_size * max(1, group)
    batches: list[list[int]] = []
    for s in range(0, len(idx), pool):
        chunk = sorted(idx[s : s + pool], key=lambda i: lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches
