"""Constrained decoding with transformers on CPU: every answer parses and names catalogue items, or says why not."""

from __future__ import annotations

import re
import sys

import pandas as pd
import pytest
import torch
from slimrec.rationale import parse_rationale
from slimrec.rationale_shape import CatalogueTitles, RationaleShape, grammar_ebnf, max_new_tokens
from slimrec.student.config import InferSettings
from slimrec.student.generate import TransformersGenerator, parse_outputs

pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def catalogue():
    from student_helpers import items_frame

    items = items_frame()
    ct = CatalogueTitles(items, 100)
    shape = RationaleShape(step1_max_words=10, step2_max_words=6, word_max_chars=8, max_items=2)
    return items, ct, grammar_ebnf(shape, ct.titles), max_new_tokens(shape, ct.titles)


def _batch(pairs: pd.DataFrame, n: int) -> pd.DataFrame:
    return pairs.head(n)[["user_id", "student_prompt"]].assign(prompt_hash=[f"h{i}" for i in range(n)])


def test_untrained_base_under_the_grammar_writes_only_parseable_grounded_rationales(tiny_base, catalogue):
    base, _, pairs = tiny_base
    _, ct, ebnf, bound = catalogue
    infer = InferSettings(batch_size=4, torch_threads=1, num_actors=1, max_new_tokens=40)
    gen = TransformersGenerator(base, None, infer.model_dump(mode="json"), max_prompt_tokens=96,
                                grammar=ebnf, max_new_tokens=bound)
    assert gen.max_new_tokens == bound and gen.grammar.compile_seconds >= 0
    raw = gen(_batch(pairs, 6))
    assert raw["finish_reason"].tolist() == ["stop"] * 6  # the grammar ends every answer before the bound
    assert (raw["output_tokens"] <= bound).all() and raw["error"].isna().all()
    parsed = parse_outputs(raw)
    assert parsed["status"].tolist() == ["ok"] * 6, parsed["error"].tolist()
    grounded = ct.ground(parsed["item_names"])
    for names, ids in zip(parsed["item_names"], grounded, strict=True):
        assert len(ids) == len(set(names))  # every named title is a catalogue item

    # the same base without the grammar, cut at 40 tokens, does not write three steps
    free = TransformersGenerator(base, None, {**infer.model_dump(mode="json"), "constrained": False},
                                 max_prompt_tokens=96)
    assert free.grammar is None and free.max_new_tokens == 40
    assert (parse_outputs(free(_batch(pairs, 6)))["status"] != "ok").any()


def test_a_constrained_actor_without_grammar_or_library_refuses_to_start(tiny_base, catalogue, monkeypatch):
    base, _, _ = tiny_base
    _, _, ebnf, bound = catalogue
    infer = InferSettings(torch_threads=1).model_dump(mode="json")
    with pytest.raises(ValueError, match="got no grammar"):
        TransformersGenerator(base, None, infer, max_prompt_tokens=96)
    from slimrec.student.constrain import ConstraintUnavailable

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar -> ImportError
    with pytest.raises(ConstraintUnavailable, match="needs xgrammar"):
        TransformersGenerator(base, None, infer, max_prompt_tokens=96, grammar=ebnf, max_new_tokens=bound)


def test_an_answer_bound_beyond_the_models_context_is_warned_at_start(tiny_base, catalogue, caplog):
    base, _, _ = tiny_base  # 512 positions
    items, ct, ebnf, bound = catalogue
    infer = InferSettings(torch_threads=1).model_dump(mode="json")
    with caplog.at_level("WARNING", logger="slimrec.student.generate"):
        TransformersGenerator(base, None, infer, max_prompt_tokens=96, grammar=ebnf, max_new_tokens=bound)
    assert bound + 96 <= 512 and "exceed the base model's context" not in caplog.text
    big = RationaleShape(step1_max_words=40, step2_max_words=20, word_max_chars=10, max_items=2)
    big_bound = max_new_tokens(big, ct.titles)
    assert big_bound + 96 > 512
    with caplog.at_level("WARNING", logger="slimrec.student.generate"):
        TransformersGenerator(base, None, infer, max_prompt_tokens=96, grammar=grammar_ebnf(big, ct.titles),
                              max_new_tokens=big_bound)
    assert f"longest answer ({big_bound} tokens) + the prompt (96) exceed the base model's context (512" in caplog.text


def test_a_grammar_dead_end_ends_the_row_with_a_reason(tiny_base, catalogue):
    import torch
    from slimrec.student.constrain import StudentGrammar
    from slimrec.student.models import load_tokenizer

    base, _, _ = tiny_base
    _, _, ebnf, _ = catalogue
    tok = load_tokenizer(base)
    g = StudentGrammar(ebnf, tok, len(tok), threads=1)
    proc = g.processor()
    step1 = tok("Step 1:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[5, 6], [5, 6]])
    proc(ids, torch.zeros(2, len(tok)))  # first call: the prompt, nothing accepted
    # row 0 follows the grammar; row 1 gets a token the grammar forbids (as if forced by another processor)
    bad = tok('"', add_special_tokens=False)["input_ids"][0]
    ids = torch.cat([ids, torch.tensor([[step1[0]], [bad]])], dim=1)
    out = proc(ids, torch.zeros(2, len(tok)))
    assert set(proc.dead) == {1} and "grammar dead end" in proc.dead[1]
    assert torch.isfinite(out[1]).sum() == 1 and torch.isfinite(out[1, tok.eos_token_id])  # only the end token
    assert torch.isfinite(out[0]).sum() >= 1 and not torch.isfinite(out[0, tok.eos_token_id])

    raw = pd.DataFrame({"user_id": ["u0", "u1", "u2"], "prompt_hash": ["a", "b", "c"],
                        "rationale": ['Step 1: a\nStep 2: b\nStep 3: Recommended items: none stand out.', "Step", ""],
                        "finish_reason": ["stop", "dead_end", "stop"], "output_tokens": [9, 2, 1],
                        "latency_ms": 1.0, "error": [None, proc.dead[1], None]})
    parsed = parse_outputs(raw)
    assert parsed["status"].tolist() == ["ok", "parse_error", "empty"]  # no row lost, each with its reason
    assert parsed["error"][1].startswith("parse_error: grammar dead end")
    assert parsed["item_names"][0] == [] and parse_rationale(raw["rationale"][0])[0].item_names == ()


def test_decoding_in_short_passes_continues_each_row_where_it_stopped(tiny_base, catalogue):
    """Rows that outlive a pass go on from their tokens and grammar state: the same greedy answers as one pass."""
    from slimrec.student.constrain import StudentGrammar
    from slimrec.student.data import fit_prompt_ids
    from slimrec.student.generate import generate_ids
    from slimrec.student.models import load_student, load_tokenizer

    base, _, pairs = tiny_base
    _, _, ebnf, bound = catalogue
    tok = load_tokenizer(base, padding_side="left")
    model = load_student(base, None, None, "cpu").eval()
    g = StudentGrammar(ebnf, tok, int(model.get_output_embeddings().weight.shape[0]), threads=1)
    ids = sorted((fit_prompt_ids(tok, p, 96) for p in pairs["student_prompt"].head(6)), key=len)
    one = generate_ids(model, tok, ids, bound, 3, grammar=g)  # a single pass to the grammar's bound
    assert max(r[2] for r in one) > 7  # so passes of 7 tokens must continue rows several times
    short = generate_ids(model, tok, ids, bound, 3, grammar=g, pass_tokens=7)
    assert [r[:3] for r in short] == [r[:3] for r in one]
    assert all(r[1] == "stop" and r[3] is None for r in short)
    for text, *_ in short:
        assert parse_rationale(text)[1] is None

    # the bound still holds across passes: a budget below the answers' lengths truncates at exactly that budget
    cut = generate_ids(model, tok, ids, 10, 3, grammar=g, pass_tokens=4)  # passes of 4, 4, 2 tokens
    assert [r[1:3] for r in cut] == [("length", 10)] * len(ids)
    assert cut == generate_ids(model, tok, ids, 10, 3, grammar=g)  # what one pass of 10 writes


def _uncounted_decoder(base: str, shape: RationaleShape, titles):
    """(tokenizer, untrained tiny model, token bound, grammar with words counted by the decoder) for ``shape``."""
    from slimrec.rationale_shape import WordBudget
    from slimrec.student.constrain import StudentGrammar
    from slimrec.student.models import load_student, load_tokenizer

    tok = load_tokenizer(base, padding_side="left")
    model = load_student(base, None, None, "cpu").eval()
    vocab = int(model.get_output_embeddings().weight.shape[0])
    g = StudentGrammar(grammar_ebnf(shape, titles, count_words=False), tok, vocab, threads=1, words=WordBudget(shape))
    return tok, model, max_new_tokens(shape, titles), g


def test_words_counted_by_the_decoder_give_the_answers_of_the_counted_grammar(tiny_base, catalogue):
    """The uncounted grammar with a WordBudget allows exactly the tokens of the grammar that counts words itself:
    the same greedy answers, in one pass and in short passes, and every step within its word limit and every
    word within its characters. The untrained base writes long steps, so limits of 3 and 2 words and of 4
    characters a word bind."""
    from slimrec.rationale_shape import shape_regex
    from slimrec.student.constrain import StudentGrammar
    from slimrec.student.data import fit_prompt_ids
    from slimrec.student.generate import generate_ids

    base, _, pairs = tiny_base
    _, ct, _, _ = catalogue
    shape = RationaleShape(step1_max_words=3, step2_max_words=2, word_max_chars=4, max_items=2)
    tok, model, bound, uncounted = _uncounted_decoder(base, shape, ct.titles)
    counted = StudentGrammar(grammar_ebnf(shape, ct.titles), tok, uncounted.vocab_size, threads=1)
    ids = [fit_prompt_ids(tok, p, 96) for p in pairs["student_prompt"].head(6)]
    for pass_tokens in (None, 7):
        a = generate_ids(model, tok, ids, bound, 6, grammar=uncounted, pass_tokens=pass_tokens)
        assert a == generate_ids(model, tok, ids, bound, 6, grammar=counted, pass_tokens=pass_tokens)
        assert all(r[1] == "stop" and r[3] is None for r in a)
    pattern = re.compile(shape_regex(shape))
    assert all(pattern.fullmatch(text) for text, *_ in a)
    steps = [parse_rationale(text)[0] for text, *_ in a]
    assert max(len(p.step1.split()) for p in steps) == 3  # the limits were reached, and held
    assert max(len(p.step2.split()) for p in steps) == 2
    assert max(len(w) for p in steps for w in (p.step1 + " " + p.step2).split()) == 4
    assert re.search(r"\+ \(\" \" \[!#-~\]\+\)\*", grammar_ebnf(shape, ct.titles, count_words=False))


def test_rows_that_end_leave_the_batch_and_the_answers_stay_the_same(tiny_base, catalogue, monkeypatch):
    """The decoder that drops ended rows from its batch (their cache rows and grammar states with them) writes
    generate's answers, in one pass and in short passes; rows do leave (answers end at different lengths)."""
    from slimrec.student.constrain import GrammarLogitsProcessor
    from slimrec.student.data import fit_prompt_ids
    from slimrec.student.generate import generate_ids

    base, _, pairs = tiny_base
    _, ct, _, _ = catalogue
    shape = RationaleShape(step1_max_words=6, step2_max_words=4, word_max_chars=10, max_items=2)
    tok, model, bound, g = _uncounted_decoder(base, shape, ct.titles)
    vocab = g.vocab_size
    kept: list[int] = []
    real = GrammarLogitsProcessor.keep_rows
    monkeypatch.setattr(GrammarLogitsProcessor, "keep_rows", lambda self, keep: (kept.append(len(keep)),
                                                                                    real(self, keep))[1])
    ids = [fit_prompt_ids(tok, p, 96) for p in pairs["student_prompt"].head(8)]
    for pass_tokens in (None, 7):
        dropped = generate_ids(model, tok, ids, bound, 8, grammar=g, pass_tokens=pass_tokens, drop_ended=True)
        assert dropped == generate_ids(model, tok, ids, bound, 8, grammar=g, pass_tokens=pass_tokens,
                                       drop_ended=False)
        assert all(r[1] == "stop" and r[3] is None for r in dropped)
    assert len({r[2] for r in dropped}) > 1 and kept and min(kept) < 8  # rows left the batch on the way

    proc = g.processor()  # the grammar states follow the rows that stay
    proc(torch.tensor([[5, 6], [5, 6], [5, 6]]), torch.zeros(3, vocab))
    proc.dead[2] = "a reason"
    states = [proc.row_state(i) for i in range(3)]
    real(proc, [1, 2])
    assert [proc.row_state(i) for i in range(2)] == states[1:] and proc.dead == {1: "a reason"}
    assert proc.bitmask.shape[0] == 2


def test_a_row_with_no_token_within_its_word_limits_ends_as_a_dead_end(tiny_base, catalogue):
    """No tokenizer seen needs it (a step can always end with a newline), but a row whose every token the word
    limits mask is ended with the end token and a reason, like a grammar dead end, never left to sample -inf."""
    import torch
    from slimrec.rationale_shape import WordBudget
    from slimrec.student.constrain import StudentGrammar
    from slimrec.student.models import load_tokenizer

    base, _, _ = tiny_base
    _, ct, _, _ = catalogue
    shape = RationaleShape(step1_max_words=3, step2_max_words=2, word_max_chars=8, max_items=2)
    tok = load_tokenizer(base)
    g = StudentGrammar(grammar_ebnf(shape, ct.titles, count_words=False), tok, len(tok), threads=1,
                       words=WordBudget(shape))
    proc = g.processor()
    proc(torch.tensor([[5, 6], [5, 6]]), torch.zeros(2, len(tok)))  # first step: both rows live
    proc.word_over = (torch.tensor([0, 1]), torch.stack([torch.ones(len(tok), dtype=torch.bool),
                                                         torch.zeros(len(tok), dtype=torch.bool)]))
    scores = torch.zeros(2, len(tok))
    proc._apply_word_limits(scores)
    assert set(proc.dead) == {0} and "word limits" in proc.dead[0]
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [tok.eos_token_id]
    assert torch.isfinite(scores[1]).all()


def test_word_budget_tables_agree_with_advancing_byte_by_byte():
    """What a token adds, from each state, as the tables say and as :meth:`WordBudget.advance` finds."""
    from slimrec.rationale_shape import WordBudget

    b = WordBudget(RationaleShape(step1_max_words=3, step2_max_words=2, word_max_chars=4))
    vocab = [b"a", b" b", b"a b c", b"\n", b"\nStep 2: x", b"\nStep 2: x y z", b"Step 1: a", b"1: a b", b"x\nStep 3: Re",
             b"abcd", b"abcde", b"ab cdefg", b"a bcde", b" abcde", b"ab\nStep 2: abcde", b"Step", b"2: abc", b": ab"]
    added, lead, over = b.token_tables(vocab)
    for step in range(2):
        for left in range(b.max_label + 1):
            for spaces in range(b.limits[step] + 1):
                for chars in range(b.word_max + 1) if left == 0 else (0,):  # a label precedes an empty word
                    for t, data in enumerate(vocab):
                        _, ok = b.advance((step, left, spaces, chars), data)
                        assert ok == (spaces + added[step][left][t] <= b.limits[step]
                                      and chars + lead[step][left][t] <= b.word_max
                                      and not over[step][left][t]), (step, left, spaces, chars, data)
    assert b.advance(b.start(), b"Step 1: a b c\nStep 2: d e\nStep 3: f g h i")[0] == (2, 8, 0, 0)
    assert b.advance(b.start(), b"Step 1: a b c d")[1] is False
    assert b.advance(b.start(), b"Step 1: a bcde")[1] is True
    assert b.advance(b.start(), b"Step 1: a bcdef")[1] is False
    assert b.advance(b.start(), b"Step 1: a\nStep 2: bcdef")[1] is False
    assert b.advance((0, 0, 0, 3), b"ab")[1] is False  # the word being written grows to five characters


def test_masks_prepared_ahead_of_the_forward_pass_give_the_same_answers(tiny_base, catalogue):
    """The overlap (each next mask prepared on a worker thread while the model runs) changes no token: the
    same greedy answers as masks prepared inside the processor's call, in one pass and in short passes."""
    from slimrec.student.constrain import StudentGrammar
    from slimrec.student.data import fit_prompt_ids
    from slimrec.student.generate import generate_ids
    from slimrec.student.models import load_student, load_tokenizer

    base, _, pairs = tiny_base
    _, _, ebnf, bound = catalogue
    tok = load_tokenizer(base, padding_side="left")
    model = load_student(base, None, None, "cpu").eval()
    vocab = int(model.get_output_embeddings().weight.shape[0])
    ahead = StudentGrammar(ebnf, tok, vocab, threads=1)
    inline = StudentGrammar(ebnf, tok, vocab, threads=1, overlap=False)
    assert "stopping_criteria" in ahead.processor().generate_kwargs()
    assert "stopping_criteria" not in inline.processor().generate_kwargs()
    ids = [fit_prompt_ids(tok, p, 96) for p in pairs["student_prompt"].head(5)]
    for pass_tokens in (None, 5):
        a = generate_ids(model, tok, ids, bound, 5, grammar=ahead, pass_tokens=pass_tokens)
        b = generate_ids(model, tok, ids, bound, 5, grammar=inline, pass_tokens=pass_tokens)
        assert a == b and all(r[1] == "stop" for r in a)


def test_bench_student_decodes_every_way_with_the_same_answers(tiny_base, monkeypatch):
    """``bench.student``'s comparison runs each decoding it reports (free and constrained, ended rows dropped or
    generate's, counted grammar) and the paired ratios; the ways that must agree do."""
    from slimrec.config import load_config
    from slimrec.stages.student_rationales import constraint
    from slimrec.student.constrain import StudentGrammar, word_budget
    from slimrec.student.data import fit_prompt_ids
    from slimrec.student.models import load_student, load_tokenizer
    from student_helpers import items_frame

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parents[2]))
    from bench.student import constrained_vs_free

    base, _, pairs = tiny_base
    cfg = load_config("tiny", overrides=["student.infer.batch_size=4", "student.infer.max_new_tokens=24",
                                         "student.infer.step1_max_words=4", "student.infer.step2_max_words=3"]).student
    con = constraint(cfg, items_frame())
    tok = load_tokenizer(base, padding_side="left")
    model = load_student(base, None, None, "cpu").eval()
    g = StudentGrammar(con.ebnf_uncounted, tok, len(tok), threads=1, words=word_budget(con.shape))
    ids = sorted((fit_prompt_ids(tok, p, 96) for p in pairs["student_prompt"].head(6)), key=len)
    out = constrained_vs_free(model, tok, ids, cfg, g, con, repeats=1)
    for name in ("unconstrained", "constrained", "constrained_inline", "constrained_counted",
                 "unconstrained_generate", "constrained_generate"):
        assert out[name]["prompts"] == 6 and out[name]["tokens_per_s"] > 0
    assert out["identical_constrained_vs_counted"] == "6/6"
    assert out["identical_constrained_vs_generate"] == "6/6"
    assert out["constrained"]["parse_ok_rate"] == 1.0
    assert out["tokens_per_s_ratio_constrained_vs_unconstrained_generate"] > 0


def test_a_model_whose_generation_config_adds_processors_decodes_with_generate(tiny_base, caplog):
    """A real model's generation_config may ask for logits processors only ``generate`` applies
    (``no_repeat_ngram_size`` here): such a model is decoded by ``generate``, with the reason logged."""
    from slimrec.student.data import fit_prompt_ids
    from slimrec.student.generate import _greedy_pass_fits, generate_ids
    from slimrec.student.models import load_student, load_tokenizer

    base, _, pairs = tiny_base
    tok = load_tokenizer(base, padding_side="left")
    model = load_student(base, None, None, "cpu").eval()
    assert _greedy_pass_fits(model)
    ids = [fit_prompt_ids(tok, p, 96) for p in pairs["student_prompt"].head(3)]
    plain = generate_ids(model, tok, ids, 30, 3)
    model.generation_config.no_repeat_ngram_size = 2
    with caplog.at_level("INFO", logger="slimrec.student.generate"):
        assert not _greedy_pass_fits(model)
    assert "no_repeat_ngram_size" in caplog.text
    ngram = generate_ids(model, tok, ids, 30, 3)
    assert ngram != plain  # the setting was applied (the untrained base repeats itself without it)
    assert ngram == generate_ids(model, tok, ids, 30, 3, drop_ended=False)
