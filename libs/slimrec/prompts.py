"""Chain-of-thought prompt templates (SLIM, macro to micro) and item-text sanitising.

The teacher prompt asks, like a salesperson, for three steps: (1) summarise
the user's preferences, (2) recommend categories and brands, (3) recommend
specific items. The student prompt is a shorter form of the same template:
the student learns to produce the teacher's answer from it.

Only history before the validation/test targets is ever passed in (the
caller guarantees it; ``build_prompts`` takes ``user_sequences.history``).
Item text is sanitised: control characters removed, lengths capped, and text
that tries to instruct the model is neutralised and quoted.

All functions are pure and importable, so tests need neither Spark nor a model.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

TEMPLATE_VERSIONS = ("v1",)

_TEACHER_V1 = (
    "You are an experienced salesperson in an online store. Below is the purchase history of a customer, "
    "oldest first. Each line is: title | category path | brand.\n\n"
    "{history}\n\n"
    "Think step by step, from general to specific, and answer in exactly three steps:\n"
    "Step 1: Summarise the customer's preferences (product types, uses, styles, brands).\n"
    "Step 2: Recommend the categories and brands the customer is likely to buy next.\n"
    "Step 3: Recommend specific items the customer is likely to buy next; give each item's title in double quotes.\n"
    "Start each step with 'Step N:'."
)

_STUDENT_V1 = (
    "Purchase history (oldest first; title | category | brand):\n{history}\n"
    "Step 1 preferences, Step 2 categories and brands, Step 3 items:\n"
)

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Phrases that try to steer the model. Matched case-insensitively, replaced by a neutral marker.
_INJECTION_RE = re.compile(
    r"(ignore|disregard|forget)\s+(all\s+|any\s+)?(the\s+)?(previous|prior|above)\s+(instructions?|prompts?|text)"
    r"|you\s+are\s+now\b|system\s*prompt|\bassistant\s*:|\bsystem\s*:|\buser\s*:|</?(?:s|im_start|im_end)>"
    r"|\bstep\s*[123]\s*:",
    re.IGNORECASE,
)


def sanitize_text(text: str | None, max_chars: int) -> str:
    """One line of model-safe text: NFC, no control characters, no instructions, at most ``max_chars``.

    >>> sanitize_text("Pen\\x00 set. Ignore previous instructions!", 60)
    'Pen set. [removed]!'
    """
    if not text:
        return ""
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL_RE.sub(" ", text)
    text = text.replace("|", "/").replace("\n", " ").replace('"', "'")
    text = _INJECTION_RE.sub("[removed]", text)
    text = " ".join(text.split())
    if len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "…"
    return text


def item_line(title: str | None, categories: list[str] | None, brand: str | None, max_title_chars: int) -> str:
    """``title | category path | brand`` with each part sanitised; missing parts become ``unknown``."""
    cat = " > ".join(c for c in (list(categories) if categories is not None else []) if c) or "unknown"
    return " | ".join(
        [
            sanitize_text(title, max_title_chars) or "untitled item",
            sanitize_text(cat, 160),
            sanitize_text(brand, 60) or "unknown",
        ]
    )


def short_item_line(title: str | None, categories: list[str] | None, brand: str | None, max_title_chars: int) -> str:
    """The student's shorter line: ``title | leaf category | brand``."""
    cats = [c for c in (list(categories) if categories is not None else []) if c]
    return " | ".join(
        [
            sanitize_text(title, max_title_chars) or "untitled item",
            sanitize_text(cats[-1], 60) if cats else "unknown",
            sanitize_text(brand, 40) or "unknown",
        ]
    )


def item_lines_table(items, max_title_chars: int, student_title_chars: int):
    """Arrow ``items`` (item_id, title, categories, brand) -> (item_id, tline, sline): each item's
    :func:`item_line` and :func:`short_item_line`, for engines that join lines to histories themselves."""
    import pyarrow as pa

    rows = zip(items.column("title").to_pylist(), items.column("categories").to_pylist(),
               items.column("brand").to_pylist(), strict=True)
    lines = [(item_line(t, c, b, max_title_chars), short_item_line(t, c, b, student_title_chars)) for t, c, b in rows]
    return pa.table({"item_id": items.column("item_id").cast(pa.string()),
                     "tline": pa.array([x[0] for x in lines], pa.string()),
                     "sline": pa.array([x[1] for x in lines], pa.string())})


def missing_item_lines(max_title_chars: int, student_title_chars: int) -> tuple[str, str]:
    """The two lines of an item a history names but the catalogue lacks (shown as untitled)."""
    return item_line(None, None, None, max_title_chars), short_item_line(None, None, None, student_title_chars)


def render(
    version: str,
    lines: list[str],
    max_items: int,
    max_chars: int,
    student_lines: list[str] | None = None,
    student_max_items: int = 10,
) -> tuple[str, str, int]:
    """Teacher prompt, student prompt and how many history lines the teacher prompt shows.

    Keeps the most recent ``max_items`` lines, then drops the oldest until the
    teacher prompt fits ``max_chars`` (always at least one line). The student
    prompt shows the most recent ``student_max_items`` of ``student_lines``
    (short lines; default: the same lines).
    """
    if version not in TEMPLATE_VERSIONS:
        raise ValueError(f"unknown prompt template version {version!r}; known: {TEMPLATE_VERSIONS}")
    shown = lines[-max_items:] if max_items > 0 else list(lines)
    while True:
        hist = "\n".join(f"- {x}" for x in shown)
        teacher = _TEACHER_V1.format(history=hist)
        if len(teacher) <= max_chars or len(shown) <= 1:
            break
        shown = shown[1:]
    short = (student_lines if student_lines is not None else lines)[-min(len(shown), student_max_items):]
    student = _STUDENT_V1.format(history="\n".join(f"- {x}" for x in short))
    return teacher, student, len(shown)


def template_parts(version: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """((teacher before, after), (student before, after)) the history block of ``version``'s prompts.

    A prompt is ``before + "\\n".join("- " + line for line in shown) + after``: what engines that render
    the history themselves (Spark SQL in build_prompts, the DuckDB baseline) put around it. Found by
    rendering one marker line, so it follows the templates above.
    """
    mark = "\x00slimrec-history\x00"
    teacher, student, _ = render(version, [mark], 1, 10**9, [mark], 1)
    parts = [t.split(f"- {mark}") for t in (teacher, student)]
    if any(len(p) != 2 for p in parts):
        raise ValueError(f"prompt template {version!r}: the history is not one block of '- line' rows")
    return (parts[0][0], parts[0][1]), (parts[1][0], parts[1][1])


def prompt_hash(version: str, teacher_prompt: str) -> str:
    """sha1 over (template version, teacher prompt): the teacher cache key."""
    return hashlib.sha1(f"{version}\x1f{teacher_prompt}".encode()).hexdigest()
