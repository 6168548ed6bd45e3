"""Item text normalisation, in one place.

Used by ingest for every source format: HTML entities decoded, markup and
control characters removed, whitespace collapsed, trailing separators and
punctuation trimmed, lengths capped; category paths split on whatever
separator the source used.
"""

from __future__ import annotations

import ast
import hashlib
import html
import json
import re
import unicodedata

# HTML tags only (a name right after "<", attributes optional): "<2m>" or "a < b > c" are text, kept.
# Inline tags are removed without a space ("<i>read</i>!" -> "read!"); any other tag breaks words.
_INLINE_TAG_RE = re.compile(r"</?(?:a|b|i|u|em|strong|span|font|sup|sub|small|big)(?:\s[^<>]{0,200})?/?>", re.I)
_TAG_RE = re.compile(r"<!--.{0,200}?-->|</?[A-Za-z][A-Za-z0-9-]{0,20}(?:\s[^<>]{0,200})?/?>")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd]")
_TRAILING_RE = re.compile(r"[\s,;:|/\\\-–—]+$")
# Path separators, strongest first: the first one present splits the path, so a level name may hold
# the weaker ones ("Office > Pens/Pencils", "Office, Labels/Stickers").
_CATEGORY_SEPS = (re.compile(r"\s*(?:>|»|›)\s*"), re.compile(r"\s*\|\s*"), re.compile(r"\s*,\s*"), re.compile(r"\s*/\s*"))


def clean_text(value, max_chars: int) -> str | None:
    """Normalised one-line text or None when nothing is left.

    >>> clean_text("  Pens &amp;amp; Pencils,<br> blue ;  ", 100)
    'Pens & Pencils, blue'
    """
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value)
    for _ in range(3):  # double-encoded entities (&amp;amp;) are common in scraped catalogues
        unescaped = html.unescape(value)
        if unescaped == value:
            break
        value = unescaped
    if not value.isascii():
        value = unicodedata.normalize("NFC", value)
    if "<" in value:
        value = _TAG_RE.sub(" ", _INLINE_TAG_RE.sub("", value))
    value = _CONTROL_RE.sub(" ", value)
    value = " ".join(value.split())
    value = _TRAILING_RE.sub("", value)
    if len(value) > max_chars:
        value = value[:max_chars].rstrip()
    return value or None


def split_categories(value, max_chars: int = 200) -> list[str]:
    """A category path, coarse to fine, from any of the shapes sources use.

    Accepts a list of strings, a list of lists (Amazon 2014: several paths,
    the first is taken), or one string joined by ``>``, ``|``, ``,`` or ``/``
    (the first of these present is the separator; level names keep the others).

    >>> split_categories("Office Electronics, Telephones &amp; Accessories, Cordless Telephones")
    ['Office Electronics', 'Telephones & Accessories', 'Cordless Telephones']
    >>> split_categories([["Office Products", "Office & School Supplies"], ["Other"]])
    ['Office Products', 'Office & School Supplies']
    """
    if value is None:
        return []
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("[") and s.endswith("]"):
            try:
                return split_categories(json.loads(s), max_chars)
            except ValueError:
                try:
                    return split_categories(ast.literal_eval(s), max_chars)
                except (ValueError, SyntaxError):
                    pass
        s = html.unescape(s)
        sep = next((r for r in _CATEGORY_SEPS if r.search(s)), None)
        parts = sep.split(s) if sep else [s]
    elif isinstance(value, (list, tuple)):
        if value and all(isinstance(v, (list, tuple)) for v in value):
            value = value[0]
        parts = [str(v) for v in value if v is not None]
    else:
        parts = [str(value)]
    out: list[str] = []
    for p in parts:
        c = clean_text(p, max_chars)
        if c and (not out or out[-1] != c):
            out.append(c)
    return out


def item_text(title: str | None, categories: list[str] | None, brand: str | None) -> str:
    """What the encoder reads for an item: ``title | category path | brand``."""
    cat = " > ".join(categories or [])
    return " | ".join(p for p in (title or "", cat, brand or "") if p) or "unknown item"


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def unit_draw(*parts) -> float:
    """A stable number in [0, 1) from sha1 of the parts joined by the unit separator (first 8 bytes): the same
    parts give the same draw on every run and machine. Salt it with a purpose (``unit_draw("seed-pool", seed,
    user)``) so that two samples drawn from the same users stay independent."""
    h = hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64
