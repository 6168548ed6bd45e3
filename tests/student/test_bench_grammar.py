"""bench.grammar: the stage's grammar over a catalogue, its cost, and a valid rationale walked token by token."""

from __future__ import annotations

import pytest

pytest.importorskip("xgrammar")


def test_measure_walks_a_valid_rationale_through_the_grammar(tiny_base):
    from slimrec.config import load_config
    from slimrec.student.constrain import StudentGrammar
    from slimrec.student.models import load_tokenizer
    from student_helpers import items_frame
    from transformers import AutoConfig

    from bench.grammar import mask_walk, measure
    from bench.student import generated_items

    base, _, _ = tiny_base
    tok = load_tokenizer(base)
    vocab = int(AutoConfig.from_pretrained(base, local_files_only=True).vocab_size)
    cfg = load_config("tiny").student
    items = items_frame()
    r = measure(items, tok, vocab, cfg, threads=1)
    assert r["items"] == len(items) and 0 < r["titles"] <= len(items)
    assert r["compile_s"] > 0 and r["compiled_mb"] > 0 and r["max_new_tokens"] > 0
    assert r["mask"]["tokens"] > 10 and r["mask"]["median_ms"] > 0
    bigger = measure(generated_items(items, 300, seed=0), tok, vocab, cfg, threads=1)
    assert bigger["titles"] > r["titles"] and bigger["ebnf_chars"] > r["ebnf_chars"]
    # a text outside the grammar is refused, with the token it stopped at
    g = StudentGrammar('root ::= "Step 1: a"', tok, vocab, threads=1)
    with pytest.raises(RuntimeError, match="refused token"):
        mask_walk(g, tok, "Step 2: b")
