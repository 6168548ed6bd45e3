"""Rationale format shared by teacher and student: three numbered steps.

A rationale is free text in which the three steps of the chain-of-thought
prompt appear in order, each introduced by ``Step 1``, ``Step 2``,
``Step 3`` (``Step 1:``, ``**Step 1.**``, ``1)`` ... are accepted: an HTTP
teacher writes free text)::

    Step 1: The user buys office phones and labels from VTech and Brother.
    Step 2: Categories: Cordless Telephones; Label Makers. Brands: VTech, Brother.
    Step 3: Items: "VTECH CS6114 DECT 6.0 Cordless Phone"; "Brother P-Touch PT-D210".

:func:`parse_rationale` never raises on model output: it returns
``(ParsedRationale | None, error | None)`` so a bad answer becomes a status.

The exact shape the offline teacher writes and the constrained student must
write is declared in :mod:`slimrec.rationale_shape`; the step-3 title bounds
and the "no items" phrase come from there, and every string that shape's
grammar accepts parses here with its titles as ``item_names``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slimrec.rationale_shape import MAX_TITLE_CHARS, MIN_TITLE_CHARS, NO_ITEMS

STATUSES = ("ok", "parse_error", "empty", "truncated", "failed", "skipped_budget")

_STEP_RE = re.compile(r"(?im)^[\s*#>_-]*(?:step\s*([123])|([123])[.)])\s*(?:\([^)\n]*\))?\s*[:.\-)]*\**\s*")
_QUOTED_RE = re.compile(rf"[\"“]([^\"”\n]{{{MIN_TITLE_CHARS},{MAX_TITLE_CHARS}}})[\"”]")


@dataclass(frozen=True)
class ParsedRationale:
    step1: str
    step2: str
    step3: str
    item_names: tuple[str, ...]  # item titles named in step 3, in order


def _split_items(step3: str) -> tuple[str, ...]:
    quoted = _QUOTED_RE.findall(step3)
    if quoted:
        return tuple(q.strip() for q in quoted)
    body = step3.split(":", 1)[1] if ":" in step3[:40] else step3
    if body.strip(" .").casefold() == NO_ITEMS:
        return ()
    parts = re.split(r";|\n|\s\d+\.\s", body)
    return tuple(p.strip(" .-*\t") for p in parts if len(p.strip(" .-*\t")) >= 3)


def parse_rationale(text: str | None, finish_reason: str | None = None):
    """Split ``text`` into its three steps.

    Returns ``(ParsedRationale, None)`` or ``(None, status_error)`` where the
    error starts with the status: ``"empty: ..."``, ``"truncated: ..."``,
    ``"parse_error: ..."``.

    >>> p, err = parse_rationale("Step 1: a b c\\nStep 2: cats\\nStep 3: \\"Blue Pen\\"; \\"Red Pen\\"")
    >>> (p.step2, p.item_names, err)
    ('cats', ('Blue Pen', 'Red Pen'), None)
    """
    if text is None or not text.strip():
        return None, "empty: no text"
    matches = list(_STEP_RE.finditer(text))
    # Explicit "Step N" headers win: once any is present, bare "1." / "2)" lines are list items
    # inside a step (an LLM often numbers its points), not step headers.
    if any(m.group(1) for m in matches):
        matches = [m for m in matches if m.group(1)]
    found: dict[int, tuple[int, int]] = {}
    for m in matches:
        n = int(m.group(1) or m.group(2))
        if n not in found and all(k < n for k in found):
            found[n] = (m.start(), m.end())
    if finish_reason == "length" and 3 not in found:
        return None, "truncated: the answer hit the token limit before step 3"
    missing = [n for n in (1, 2, 3) if n not in found]
    if missing:
        if finish_reason == "length":
            return None, "truncated: the answer hit the token limit"
        return None, f"parse_error: step(s) {missing} not found"
    bodies = []
    for n in (1, 2, 3):
        start = found[n][1]
        end = found[n + 1][0] if n < 3 else len(text)
        bodies.append(text[start:end].strip())
    if finish_reason == "length":  # before the empty-step check: a cut right after "Step 3:" is truncation
        return None, "truncated: the answer hit the token limit inside step 3"
    if not all(bodies):
        empty = [i + 1 for i, b in enumerate(bodies) if not b]
        return None, f"parse_error: step(s) {empty} empty"
    return ParsedRationale(bodies[0], bodies[1], bodies[2], _split_items(bodies[2])), None


def status_of(error: str | None) -> str:
    """Status column value for a parse error string (``None`` -> ``ok``)."""
    if error is None:
        return "ok"
    head = error.split(":", 1)[0]
    return head if head in STATUSES else "parse_error"
