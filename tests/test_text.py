"""Item text normalisation (slimrec.text): pure functions, expected values written by hand."""

from __future__ import annotations

import pytest
from slimrec.text import clean_text, item_text, sha1, split_categories


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Pens &amp; Pencils", "Pens & Pencils"),
        ("Pens &amp;amp; Pencils", "Pens & Pencils"),  # double-encoded
        ("12&quot; Ruler &#8211; steel", '12" Ruler – steel'),
        ("Blue<br/>ink <b>pen</b>", "Blue ink pen"),
        ("Great <i>read</i>!", "Great read!"),  # inline tags leave no space
        ("<p class='x'>Ink</p><!-- note -->refill", "Ink refill"),
        ("Cable &lt;2m&gt; long", "Cable <2m> long"),  # angle brackets that are not tags are text
        ("size &lt; 5mm &amp; weight &gt; 2g", "size < 5mm & weight > 2g"),
        ("  tab\there\nnew   line  ", "tab here new line"),
        ("Paper\x07Clips\x00", "Paper Clips"),
        ("bad \ufffd byte", "bad byte"),  # what a non-UTF-8 byte decodes to
        ("Stapler,", "Stapler"),
        ("Stapler ; - ", "Stapler"),
        ("Stapler |", "Stapler"),
        ("Pads, 24 lb.", "Pads, 24 lb."),  # a full stop may end an abbreviation: kept
        ("Cafe\u0301", "Café"),  # NFC
        ("   ", None),
        ("", None),
        (None, None),
        (42, "42"),
    ],
)
def test_clean_text(raw, expected):
    assert clean_text(raw, 100) == expected


def test_clean_text_caps_length_without_trailing_space():
    assert clean_text("abc def ghi", 8) == "abc def"
    assert clean_text("x" * 10_000, 2000) == "x" * 2000


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Office Electronics, Telephones &amp; Accessories, Cordless Telephones",
         ["Office Electronics", "Telephones & Accessories", "Cordless Telephones"]),
        ("Office > Pens > Gel", ["Office", "Pens", "Gel"]),
        ("Office|Pens", ["Office", "Pens"]),
        ("Office » Pens › Gel", ["Office", "Pens", "Gel"]),
        ([["Office Products", "Office & School Supplies"], ["Other"]], ["Office Products", "Office & School Supplies"]),
        (["Office", "Office", "Pens"], ["Office", "Pens"]),  # a repeated level is dropped
        (["Office", None, " ", "Pens,"], ["Office", "Pens"]),
        ('["Office", "Pens"]', ["Office", "Pens"]),  # JSON list in a string
        ("[['Office', 'Pens'], ['x']]", ["Office", "Pens"]),  # Python literal in a string
        ("Office", ["Office"]),
        ("Office > Pens/Pencils", ["Office", "Pens/Pencils"]),  # the strongest separator wins
        ("Office Products, Labels/Stickers", ["Office Products", "Labels/Stickers"]),
        ("Office | Ink, Toner", ["Office", "Ink, Toner"]),
        ("Office/Pens", ["Office", "Pens"]),
        ("", []),
        (None, []),
        ([], []),
    ],
)
def test_split_categories(raw, expected):
    assert split_categories(raw) == expected


def test_item_text():
    assert item_text("Pen", ["Office", "Pens"], "Bic") == "Pen | Office > Pens | Bic"
    assert item_text("Pen", [], None) == "Pen"
    assert item_text(None, ["Office"], "Bic") == "Office | Bic"
    assert item_text(None, None, None) == "unknown item"


def test_sha1():
    assert sha1("") == "da39a3ee5e6b4b0d3255bfef95601890afd80709"
    assert sha1("abc") == "a9993e364706816aba3e25717850c26c9cd0d89d"
