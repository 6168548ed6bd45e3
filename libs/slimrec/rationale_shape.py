"""The rationale's shape, declared once: the grammar that constrains the student, its token bound, its titles.

The offline teacher writes, and the student is trained to write::

    Step 1: <free text>
    Step 2: <free text>
    Step 3: Recommended items: "<catalogue title>"; "<catalogue title>".

(or ``Step 3: Recommended items: none stand out.``). From :class:`RationaleShape`
and the catalogue come

* :func:`grammar_ebnf`: an EBNF grammar (the GBNF dialect xgrammar and vLLM's
  ``StructuredOutputsParams(grammar=...)`` read) whose step-3 slots accept only
  catalogue titles, as a trie of rules (shared prefixes written once);
* :func:`max_output_bytes` / :func:`max_new_tokens`: the longest text the
  grammar accepts, in UTF-8 bytes. A token of any tokenizer covers at least one
  byte, so ``max_new_tokens`` = that + 1 (the end token) cannot cut a
  rationale mid-step;
* :class:`CatalogueTitles`: ``items`` rows -> the titles as the teacher renders
  them in step 3 (:func:`render_title`) and the item id each one grounds to.

The parser (:mod:`slimrec.rationale`) takes its step-3 bounds
(:data:`MIN_TITLE_CHARS`, :data:`MAX_TITLE_CHARS`) and the empty phrase
(:data:`NO_ITEMS`) from here; a test decodes random walks through the compiled
grammar and parses every one.

Free text (steps 1 and 2) is words of printable ASCII (no space, no double
quote) separated by single spaces: every character is one byte, which keeps the
token bound tight (any UTF-8 character would triple it). Its length is bounded
in words and characters per word, not in characters per step: xgrammar masks a
long bounded run of characters (``[ -~]{0,379}``) by checking the vocabulary
token by token at every step, while short bounded words separated by spaces hit
its precomputed masks (constrained against free decoding: ``bench/student.py``).
Titles keep their own characters, non-ASCII included. A decoder may also take the
grammar without the word counts and count them itself (:class:`WordBudget`), which
xgrammar's parser finds far cheaper (:func:`grammar_ebnf`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd

from slimrec.prompts import sanitize_text

STEP_LABELS = ("Step 1: ", "\nStep 2: ", "\nStep 3: ")
ITEMS_LEAD = "Recommended items: "
NO_ITEMS = "none stand out"
ITEM_SEP = "; "
END = "."
MIN_TITLE_CHARS = 3  # a quoted step-3 name shorter than this is not read as a title
MAX_TITLE_CHARS = 200
# A word of steps 1 and 2: printable ASCII without space and '"' (0x22; quotes delimit titles in step 3 only).
WORD_CHAR_CLASS = "[!#-~]"
WORD_SEP = " "
_QUOTES = re.compile("[\"\u201c\u201d\u201e]")  # the offline teacher's set: a quote inside a title would cut it


@dataclass(frozen=True)
class RationaleShape:
    """Length bounds of a rationale: words in each of steps 1 and 2, characters per word, titles in step 3."""

    step1_max_words: int = 64
    step2_max_words: int = 40
    word_max_chars: int = 24
    max_items: int = 2

    def __post_init__(self):
        if min(self.step1_max_words, self.step2_max_words, self.word_max_chars, self.max_items) < 1:
            raise ValueError(f"rationale shape bounds must be >= 1: {self}")

    def max_words(self, step: int) -> int:
        """Words of step ``step``'s body (1 or 2) at most."""
        return self.step1_max_words if step == 1 else self.step2_max_words

    def step_max_chars(self, step: int) -> int:
        """Characters of step ``step``'s body (1 or 2) at most: its words at their longest, single spaces between."""
        words = self.max_words(step)
        return words * self.word_max_chars + (words - 1) * len(WORD_SEP)


def render_title(title: str | None, max_chars: int) -> str:
    """A catalogue title as the teacher writes it inside step-3 quotes (one line, no double quotes).

    >>> render_title('Pen "Fine"\\nBlue', 100)
    "Pen 'Fine' Blue"
    """
    return _QUOTES.sub("'", sanitize_text(title, max_chars))


class CatalogueTitles:
    """Step-3 titles of a catalogue: rendered titles (sorted, unique) and the item id each grounds to.

    ``items`` has ``item_id`` and ``title``. Titles that render shorter than
    :data:`MIN_TITLE_CHARS` or longer than :data:`MAX_TITLE_CHARS` cannot be
    named (``dropped`` counts those items). Several items with the same rendered
    title ground to the smallest item_id.
    """

    def __init__(self, items: pd.DataFrame, max_title_chars: int):
        df = items[["item_id", "title"]].dropna()
        rendered = [render_title(t, max_title_chars) for t in df["title"]]
        ids: dict[str, str] = {}
        dropped = 0
        for item_id, t in sorted(zip(df["item_id"].astype(str), rendered, strict=True)):
            if not MIN_TITLE_CHARS <= len(t) <= MAX_TITLE_CHARS:
                dropped += 1
                continue
            ids.setdefault(t, item_id)
        self.item_ids = ids
        self.titles: list[str] = sorted(ids)
        self.dropped = dropped + int(items["title"].isna().sum())

    def __len__(self) -> int:
        return len(self.titles)

    def ground(self, names_lists: Iterable[Sequence[str]]) -> list[list[str]]:
        """Exact title -> item_id (in order, no repeats); a name not in the catalogue is skipped."""
        out = []
        for names in names_lists:
            ids: list[str] = []
            for n in names or ():
                i = self.item_ids.get(n)
                if i is not None and i not in ids:
                    ids.append(i)
            out.append(ids)
        return out


def _literal(s: str) -> str:
    """An EBNF string literal: backslash, quote and control characters escaped."""
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _trie_rules(titles: Sequence[str], prefix: str = "t") -> list[str]:
    """Rules of a radix trie over ``titles``: ``t0`` accepts exactly the titles.

    Each rule is a branching node: one alternative per outgoing edge (its label,
    then the child's rule), plus ``""`` when a title ends there. Built iteratively
    over the sorted titles, so a 50,000-title catalogue needs no recursion.
    """
    rules: list[str] = []
    counter = [0]

    def new_name() -> str:
        name = f"{prefix}{counter[0]}"
        counter[0] += 1
        return name

    # Work items: (rule name, sorted titles below it, characters already consumed)
    root = new_name()
    stack = [(root, sorted(set(titles)), 0)]
    while stack:
        name, group, depth = stack.pop()
        alts = []
        ends_here = False
        i = 0
        while i < len(group):
            if len(group[i]) == depth:
                ends_here = True
                i += 1
                continue
            first = group[i][depth]
            j = i
            while j < len(group) and len(group[j]) > depth and group[j][depth] == first:
                j += 1
            sub = group[i:j]
            # longest common prefix of this branch from ``depth``: the edge label
            lo, hi = sub[0], sub[-1]
            k = depth
            while k < len(lo) and k < len(hi) and lo[k] == hi[k]:
                k += 1
            label = lo[depth:k]
            if len(sub) == 1 and k == len(lo):
                alts.append(_literal(label))
            else:
                child = new_name()
                alts.append(f"{_literal(label)} {child}")
                stack.append((child, sub, k))
            i = j
        if ends_here:
            alts.append('""')
        rules.append(f"{name} ::= " + " | ".join(alts))
    return rules


def _text(shape: RationaleShape, step: int, regex: bool = False, count_words: bool = True) -> str:
    """Step ``step``'s body (1 or 2): ``[!#-~]{1,W} (" " [!#-~]{1,W}){0,K-1}`` in EBNF, or the same as a regex;
    without ``count_words``, any number of words of any length (``[!#-~]+ (" " [!#-~]+)*``)."""
    words = shape.max_words(step)
    word = f"{WORD_CHAR_CLASS}{{1,{shape.word_max_chars}}}" if count_words else f"{WORD_CHAR_CLASS}+"
    sep = WORD_SEP if regex else f"{_literal(WORD_SEP)} "
    gap = "" if regex else " "
    if not count_words:
        return f"{word}{gap}({sep}{word})*"
    return f"{word}{gap}({sep}{word}){{0,{words - 1}}}" if words > 1 else word


def grammar_ebnf(shape: RationaleShape, titles: Sequence[str], count_words: bool = True) -> str:
    """The EBNF grammar of a rationale whose step-3 slots accept only ``titles`` (root rule ``root``).

    ``titles`` are rendered titles (:attr:`CatalogueTitles.titles`); with none,
    step 3 can only say :data:`NO_ITEMS`. ``count_words=False``: steps 1 and 2 take
    any number of words of any length, for a decoder that counts words and characters
    itself with :class:`WordBudget` (the grammar and that count together accept exactly
    what the counted grammar does). xgrammar's parser keeps every position's states for
    rollback, and a counted repetition holds many: replaying 128 dev rationales, the
    counted grammar's matchers grew by 1.9 GB and filled a mask in 6.4 ms a step; with
    the words' count open (characters still bounded) by 0.67 GB in 1.2 ms; with both
    open by 0.44 GB, filling masks in 28% less time (``bench/student.py`` measures the decoding).
    """
    bad = [t for t in titles if '"' in t or not MIN_TITLE_CHARS <= len(t) <= MAX_TITLE_CHARS]
    if bad:
        raise ValueError(f"{len(bad)} titles cannot sit in step-3 quotes, e.g. {bad[0]!r}")
    s1, s2, s3 = (_literal(x) for x in STEP_LABELS)
    lines = [
        f"root ::= {s1} step1 {s2} step2 {s3} step3",
        f"step1 ::= {_text(shape, 1, count_words=count_words)}",
        f"step2 ::= {_text(shape, 2, count_words=count_words)}",
    ]
    if titles:
        more = f" ({_literal(ITEM_SEP)} item){{0,{shape.max_items - 1}}}" if shape.max_items > 1 else ""
        lines += [
            f"step3 ::= {_literal(ITEMS_LEAD)} (item{more} | {_literal(NO_ITEMS)}) {_literal(END)}",
            'item ::= "\\"" t0 "\\""',
            *_trie_rules(titles),
        ]
    else:
        lines.append(f"step3 ::= {_literal(ITEMS_LEAD + NO_ITEMS + END)}")
    return "\n".join(lines) + "\n"


class WordBudget:
    """The word limits of steps 1 and 2 (words per step, characters per word), counted over the bytes a
    decoder writes (beside ``grammar_ebnf(..., count_words=False)``, which leaves them out).

    A row's state is ``(step, label_left, spaces, chars)``: the step it writes (0, 1, 2 for steps 1-3),
    the bytes of that step's label (``Step k: ``) still to come, the spaces written in the step's body so
    far (its words - 1) and the characters of the word being written. :meth:`advance` moves a state over
    written bytes; :meth:`token_tables` precomputes, per vocabulary token, what it would add, so that a
    decoder can mask every token that would take a body past a limit.

    >>> b = WordBudget(RationaleShape(step1_max_words=2, word_max_chars=3))
    >>> b.advance(b.start(), b"Step 1: a bc")
    ((0, 0, 1, 2), True)
    >>> b.advance((0, 0, 1, 2), b" c")[1]  # a third word in step 1
    False
    >>> b.advance((0, 0, 1, 2), b"de")[1]  # a word of four characters
    False
    """

    def __init__(self, shape: RationaleShape):
        self.limits = (shape.step1_max_words - 1, shape.step2_max_words - 1)  # spaces per body
        self.word_max = shape.word_max_chars
        self.labels = tuple(len(x.lstrip("\n").encode()) for x in STEP_LABELS)
        self.max_label = max(self.labels)

    def start(self) -> tuple[int, int, int, int]:
        return (0, self.labels[0], 0, 0)

    def advance(self, state: tuple[int, int, int, int], data: bytes) -> tuple[tuple[int, int, int, int], bool]:
        """(the state after ``data``, whether no body went past a limit on the way)."""
        after, added, lead, over = self._scan(state, data)
        step = state[0]
        within = step >= 2 or (state[2] + added <= self.limits[step] and state[3] + lead <= self.word_max)
        return after, within and not over

    def token_tables(self, vocab: Sequence[bytes]) -> tuple[list, list, list]:
        """``(added, lead, over)``, each ``[step][label_left][token]`` for steps 0-1 and label_left
        0..``max_label``: the spaces a token adds to the body it starts in, the characters it adds to the
        word being written there (before its first space or newline), and whether it passes a limit by
        itself (a word it begins grows past ``word_max_chars``, or a later body past its word limit). A token
        is allowed at state ``(step, left, spaces, chars)`` when ``spaces + added <= limit``, ``chars + lead
        <= word_max_chars`` and not ``over``."""
        size = (2, self.max_label + 1)
        added = [[[0] * len(vocab) for _ in range(size[1])] for _ in range(size[0])]
        lead = [[[0] * len(vocab) for _ in range(size[1])] for _ in range(size[0])]
        over = [[[False] * len(vocab) for _ in range(size[1])] for _ in range(size[0])]
        for t, data in enumerate(vocab):
            plain = b" " not in data and b"\n" not in data
            for step in range(2):
                for left in range(self.max_label + 1):
                    if plain:  # label bytes first, then one run of the word being written
                        lead[step][left][t] = max(0, len(data) - left)
                    else:
                        _, added[step][left][t], lead[step][left][t], over[step][left][t] = self._scan(
                            (step, left, 0, 0), data)
        return added, lead, over

    def _scan(self, state: tuple[int, int, int, int], data: bytes) -> tuple[tuple[int, int, int, int], int, int, bool]:
        """(the state after ``data``, the spaces it adds to the body it starts in, the characters it adds to
        the word being written there, whether it passes a limit by itself: a word it begins longer than
        ``word_max``, or a later body past its word limit)."""
        start, (step, left, spaces, chars) = state[0], state
        added, lead, over = 0, 0, False
        begun = False  # a word of this data's own is being written (the state's word has ended)
        for b in data:
            if step >= 2:
                break
            if left:
                left -= 1
            elif b == 0x0A:  # the end of a body: the next step's label follows
                step, left, spaces, chars, begun = step + 1, self.labels[step + 1], 0, 0, True
            elif b == 0x20:
                spaces, chars, begun = spaces + 1, 0, True
                if step == start:
                    added += 1
                else:
                    over = over or spaces > self.limits[step]
            else:
                chars += 1
                if begun:
                    over = over or chars > self.word_max
                else:
                    lead += 1
        return (step, left, spaces, chars), added, lead, over


def shape_regex(shape: RationaleShape, title: str | None = None) -> str:
    """A regular expression (Java and Python syntax alike) of every text :func:`grammar_ebnf` accepts, with
    any quoted title in place of the catalogue trie: the table expectation of a constrained student's rows.
    ``title``: the pattern of one quoted title instead (bench/constraint_libs.py passes the catalogue's).

    >>> import re; bool(re.fullmatch(shape_regex(RationaleShape(5, 5, 2)), format_rationale("a", "b", ["Pen A"])))
    True
    """
    def lit(x: str) -> str:
        return re.escape(x).replace("\\\n", "\\n")  # re.escape's backslash + newline -> the escape \n

    s1, s2, s3 = (lit(x) for x in STEP_LABELS)
    title = title or f'"[^"]{{{MIN_TITLE_CHARS},{MAX_TITLE_CHARS}}}"'
    items = f"{title}({lit(ITEM_SEP)}{title}){{0,{shape.max_items - 1}}}"
    return (f"^{s1}{_text(shape, 1, regex=True)}"
            f"{s2}{_text(shape, 2, regex=True)}"
            f"{s3}{lit(ITEMS_LEAD)}({items}|{lit(NO_ITEMS)}){lit(END)}$")


def max_output_bytes(shape: RationaleShape, titles: Sequence[str]) -> int:
    """UTF-8 bytes of the longest rationale :func:`grammar_ebnf` accepts."""
    fixed = sum(len(x.encode()) for x in STEP_LABELS) + len(ITEMS_LEAD.encode()) + len(END.encode())
    longest = max((len(t.encode()) for t in titles), default=0)
    items = shape.max_items * (longest + 2) + (shape.max_items - 1) * len(ITEM_SEP) if titles else 0
    return fixed + shape.step_max_chars(1) + shape.step_max_chars(2) + max(items, len(NO_ITEMS))


def max_new_tokens(shape: RationaleShape, titles: Sequence[str]) -> int:
    """Generated tokens that always hold a whole rationale: one token per byte at worst, plus the end token."""
    return max_output_bytes(shape, titles) + 1


def format_rationale(step1: str, step2: str, titles: Sequence[str]) -> str:
    """A rationale in the declared shape (what the grammar accepts when the parts fit its bounds).

    >>> format_rationale("a", "b", ["Pen A", "Pen B"])
    'Step 1: a\\nStep 2: b\\nStep 3: Recommended items: "Pen A"; "Pen B".'
    """
    items = ITEM_SEP.join(f'"{t}"' for t in titles) if titles else NO_ITEMS
    return f"{STEP_LABELS[0]}{step1}{STEP_LABELS[1]}{step2}{STEP_LABELS[2]}{ITEMS_LEAD}{items}{END}"
