"""The rationale's declared shape: its grammar (compiled by xgrammar), its token bound, and the parser agree.

Strings come out of the compiled grammar itself (random walks over the tokens
its mask allows, with the tiny student's tokenizer), so "what the grammar
accepts parses" is checked on what the grammar produces, not on strings
written to match the parser.
"""

from __future__ import annotations

import random
import re

import pandas as pd
import pytest
from slimrec.rationale import parse_rationale
from slimrec.rationale_shape import (
    NO_ITEMS,
    CatalogueTitles,
    RationaleShape,
    format_rationale,
    grammar_ebnf,
    max_new_tokens,
    max_output_bytes,
    render_title,
    shape_regex,
)

xgr = pytest.importorskip("xgrammar")

TITLES = ["Pen", "Pen Blue", "Pen Black 0.7mm", "Pencil HB", "Mead Spiral Notebook, 70 Sheets",
          "Ring Binder 2\" Red", "Caf\u00e9 Mug \u201cOffice\u201d", "Stapler\\Remover"]


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from slimrec.student.models import load_tokenizer

    return load_tokenizer(tiny_base[0])


def _compiled(ebnf: str, tok):
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok), stop_token_ids=[tok.eos_token_id])
    return xgr.GrammarCompiler(info, max_threads=1).compile_grammar(ebnf)


def _accepts(ebnf: str, tok, text: str) -> bool:
    m = xgr.GrammarMatcher(_compiled(ebnf, tok))
    return m.accept_string(text) and m.accept_token(tok.eos_token_id) and m.is_terminated()


def _titles() -> list[str]:
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(len(TITLES))], "title": TITLES})
    return CatalogueTitles(items, 100).titles


def test_catalogue_titles_render_like_the_teacher_and_ground_exactly():
    items = pd.DataFrame({"item_id": ["b", "a", "c", "d", "e"],
                          "title": ['Pen "Fine"\nBlue', "Pen 'Fine' Blue", "ab", None, "x" * 150]})
    ct = CatalogueTitles(items, 100)
    # a and b render alike: the smaller id wins; "ab" is too short to be read as a title; None is dropped
    assert ct.titles == ["Pen 'Fine' Blue", "x" * 99 + "\u2026"]
    assert ct.item_ids == {"Pen 'Fine' Blue": "a", "x" * 99 + "\u2026": "e"}
    assert ct.dropped == 2
    assert ct.ground([["Pen 'Fine' Blue", "nope", "Pen 'Fine' Blue"], []]) == [["a"], []]
    assert render_title("Caf\u00e9 \u201cMug\u201d", 100) == "Caf\u00e9 'Mug'"


def test_trie_grammar_accepts_exactly_the_titles(tokenizer):
    titles = _titles()
    ebnf = grammar_ebnf(RationaleShape(max_items=1), titles)
    head = format_rationale("a", "b", [])[: -len(NO_ITEMS + ".")]  # up to "Recommended items: "
    for t in titles:
        assert _accepts(ebnf, tokenizer, f'{head}"{t}".'), t
    for t in ["Pe", "Pen Blu", "Pen Bluex", "Pencil", "Pen Black 0.7mm ", "pen"]:
        assert not _accepts(ebnf, tokenizer, f'{head}"{t}".'), t


def test_bounds_and_punctuation_of_the_declared_shape(tokenizer):
    titles = _titles()
    shape = RationaleShape(step1_max_words=4, step2_max_words=3, word_max_chars=6, max_items=2)
    ebnf = grammar_ebnf(shape, titles)
    longest = format_rationale(" ".join(["a" * 6] * 4), " ".join(["b" * 6] * 3), [titles[0], titles[-1]])
    assert _accepts(ebnf, tokenizer, longest)
    assert len(longest.encode()) <= max_output_bytes(shape, titles)
    assert shape.step_max_chars(1) == 4 * 6 + 3 and shape.step_max_chars(2) == 3 * 6 + 2
    assert _accepts(ebnf, tokenizer, format_rationale("x", "y", []))  # "none stand out"
    assert _accepts(ebnf, tokenizer, format_rationale("It's (2) a-b, ok.", "#1 ~x", [titles[0]]))  # punctuation
    rejected = [
        format_rationale("a a a a a", "b", [titles[0]]),  # step 1: five words, at most four
        format_rationale("a", "b b b b", [titles[0]]),  # step 2: four words, at most three
        format_rationale("a" * 7, "b", [titles[0]]),  # a word of seven characters, at most six
        format_rationale("", "b", [titles[0]]),  # empty step
        format_rationale(" a", "b", [titles[0]]),  # a step starts with a word
        format_rationale("a  b", "b", [titles[0]]),  # one space between words
        format_rationale("a ", "b", [titles[0]]),  # and none after the last
        format_rationale('say "hi"', "b", [titles[0]]),  # double quotes only around titles
        format_rationale("caf\u00e9", "b", [titles[0]]),  # free text is ASCII (one byte per character)
        format_rationale("a", "b", titles[:3]),  # three items, at most two
        format_rationale("a", "b", ["Not In The Catalogue"]),
        format_rationale("a", "b", [titles[0]])[:-1],  # no closing period
    ]
    for text in rejected:
        assert not _accepts(ebnf, tokenizer, text), text


def test_strings_the_compiled_grammar_generates_parse_within_the_token_bound(tokenizer):
    titles = _titles()
    shape = RationaleShape(step1_max_words=8, step2_max_words=6, word_max_chars=8, max_items=3)
    ebnf = grammar_ebnf(shape, titles)
    bound = max_new_tokens(shape, titles)
    regex = shape_regex(shape)
    compiled = _compiled(ebnf, tokenizer)
    vocab = len(tokenizer)
    # tokens that end a step or a list more often than a uniform pick would: walks of every length
    enders = {i for i in range(vocab) if any(c in tokenizer.decode([i]) for c in '\n";.')} | {tokenizer.eos_token_id}
    rng = random.Random(0)
    seen_counts = set()
    for _ in range(60):
        m = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, vocab)
        ids: list[int] = []
        while not m.is_terminated():
            m.fill_next_token_bitmask(mask)
            words = mask[0].tolist()
            allowed = [i for i in range(vocab) if (words[i // 32] >> (i % 32)) & 1]
            assert allowed, f"dead end after {tokenizer.decode(ids)!r}"
            pref = [i for i in allowed if i in enders]
            tok = rng.choice(pref if pref and rng.random() < 0.15 else allowed)
            assert m.accept_token(tok)
            ids.append(tok)
        assert ids[-1] == tokenizer.eos_token_id and len(ids) <= bound
        text = tokenizer.decode(ids[:-1], skip_special_tokens=True)
        assert len(text.encode()) <= max_output_bytes(shape, titles)
        parsed, err = parse_rationale(text, "stop")
        assert err is None, (err, text)
        assert re.fullmatch(regex, text), text  # the table expectation's regex holds what the grammar writes
        assert set(parsed.item_names) <= set(titles) and len(parsed.item_names) <= shape.max_items
        for step, body in ((1, parsed.step1), (2, parsed.step2)):
            words = body.split(" ")
            assert len(words) <= shape.max_words(step), body
            assert max(len(w) for w in words) <= shape.word_max_chars and len(body) <= shape.step_max_chars(step)
        seen_counts.add(len(parsed.item_names))
    assert seen_counts >= {1, 2}  # the walks reached more than one list length


def test_offline_teacher_rationales_are_in_the_grammar_when_their_free_text_is_ascii(tokenizer):
    """The student's training targets (offline teacher, step 3 cut to 2 titles) are sentences of the grammar."""
    from slimrec.config import load_config
    from slimrec.student.data import trim_items
    from slimrec.teacher.fixtures import prompt_rows
    from slimrec.teacher.offline import OfflineTeacher, build_stats
    from student_helpers import histories, items_frame, sequences_frame

    items = items_frame()
    hists = histories(40, seed=3)
    cfg = load_config("tiny").teacher.offline
    seqs = sequences_frame(hists)
    prompts = prompt_rows(seqs, items)
    answers = OfflineTeacher(build_stats(seqs["history"], items, cfg), cfg)(prompts)
    ct = CatalogueTitles(items, cfg.max_title_chars)
    shape = RationaleShape(max_items=2)
    ebnf = grammar_ebnf(shape, ct.titles)
    for text, grounded in zip(answers["rationale"], answers["grounded_item_ids"], strict=True):
        parsed, err = parse_rationale(text)
        assert err is None
        assert ct.ground([parsed.item_names]) == [list(grounded)]  # every teacher title grounds to its own id
        target = trim_items(text, 2)
        assert _accepts(ebnf, tokenizer, target), target
