"""Overlap of a generated rationale with the teacher's: ROUGE-L F1 and token F1.

Both work on lower-cased word tokens (``\\w+``), so punctuation and quoting
style do not count. ROUGE-L is the longest common subsequence (order
matters: the template's structure counts); token F1 is the bag-of-words
overlap (SQuAD style: each shared token counted at most min(count) times).

Worked example: candidate ``"a b c d"``, reference ``"a c e"``: LCS = ``a c``
(2 tokens), P = 2/4, R = 2/3, ROUGE-L F1 = 2PR/(P+R) = 4/7.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"\w+")


def words(text: str | None) -> list[str]:
    return _WORD.findall((text or "").lower())


def lcs_len(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str | None, reference: str | None) -> float:
    """ROUGE-L F1 (beta = 1) of word tokens; 0.0 when either side is empty."""
    c, r = words(candidate), words(reference)
    lcs = lcs_len(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def token_f1(candidate: str | None, reference: str | None) -> float:
    """Bag-of-words F1 of word tokens; 0.0 when either side is empty."""
    c, r = Counter(words(candidate)), Counter(words(reference))
    common = sum((c & r).values())
    if common == 0:
        return 0.0
    p, rec = common / sum(c.values()), common / sum(r.values())
    return 2 * p * rec / (p + rec)


def mean_overlap(candidates: Sequence[str | None], references: Sequence[str | None]) -> dict[str, float]:
    """Mean ROUGE-L and token F1 over aligned pairs: ``{"rouge_l": .., "token_f1": .., "n": ..}``."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} references")
    n = len(candidates)
    if n == 0:
        return {"rouge_l": 0.0, "token_f1": 0.0, "n": 0}
    rl = sum(rouge_l(c, r) for c, r in zip(candidates, references, strict=True)) / n
    tf = sum(token_f1(c, r) for c, r in zip(candidates, references, strict=True)) / n
    return {"rouge_l": rl, "token_f1": tf, "n": n}


def prompt_dependence(candidates: Sequence[str | None], references: Sequence[str | None]) -> dict[str, float]:
    """Does a model read its prompt? Its answers scored against their own references and against
    another user's (each reference shifted by one), and the share of distinct answers.

    A model that writes the same text whoever the user is scores about as well on both.
    Example: references ``["a b", "c d"]``; answers equal to them -> own 1.0, other users 0.0,
    distinct 1.0; the answer ``"a b"`` twice -> own 0.5, other users 0.5, distinct 0.5.
    """
    n = len(candidates)
    if n == 0:
        return {"own": 0.0, "other_users": 0.0, "distinct_share": 0.0, "n": 0}
    shifted = list(references[1:]) + list(references[:1])
    return {"own": mean_overlap(candidates, references)["rouge_l"],
            "other_users": mean_overlap(candidates, shifted)["rouge_l"],
            "distinct_share": len(set(candidates)) / n, "n": n}


def item_overlap(predicted: Sequence[Sequence[str]], expected: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro-averaged precision and recall of grounded item ids (each user's list as a set).

    >>> item_overlap([["a", "b"], ["c"]], [["a"], ["d", "e"]])
    {'item_precision': 0.3333333333333333, 'item_recall': 0.3333333333333333}
    """
    hits = n_pred = n_true = 0
    for p, t in zip(predicted, expected, strict=True):
        ps, ts = set(p or ()), set(t or ())
        hits += len(ps & ts)
        n_pred += len(ps)
        n_true += len(ts)
    return {"item_precision": hits / n_pred if n_pred else 0.0, "item_recall": hits / n_true if n_true else 0.0}
