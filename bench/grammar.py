"""python -m bench.grammar [--base MODEL_DIR] [--titles 0,10000,25000,50000] [--threads 2]

What the student's rationale grammar (:func:`slimrec.stages.student_rationales.constraint`:
three steps, step 3 a trie of catalogue titles; xgrammar; the form that counts the words of steps 1
and 2 itself, which vLLM gets: the transformers actors compile the same trie with the word counts left
to the decoder, ``Constraint.ebnf_uncounted``) costs as the catalogue grows: the
bundled catalogue (``0`` in ``--titles``) and generated catalogues of that many items, whose
titles are 3-14 words drawn from the bundled titles (``bench.student.generated_items``).

For each size: building the EBNF (the title trie), compiling it for the student's tokenizer
(``StudentGrammar``: xgrammar's compiler, ``--threads``), the compiled grammar's size, this
process's RSS growth, the grammar's ``max_new_tokens`` bound; then decoding-time cost: one valid
rationale naming catalogue titles (as many as step 3 allows) walked token by token through a matcher, the time to fill
each next-token mask (the work constrained decoding adds per generated token), median over the
walk. Ratios: each figure against the bundled catalogue's, measured in the same run, and the
compile time per title against the bundled catalogue's (1.0: linear in the titles).

``--base``: the student's base model directory (its tokenizer and vocabulary size); by default the
builtin tiny base is built (or reused) under ``bench/results/_models`` as ``bench.student`` does.
Writes ``bench/results/grammar.json``; never asserts times.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import time

from bench.common import record, row
from bench.student import _rss_mb, generated_items, offline_pairs

log = logging.getLogger("bench.grammar")


def tiny_base(dataset: str, models_dir: str, seed: int, cfg) -> str:
    """The builtin tiny base for the bundled data (built once, then reused)."""
    from slimrec.student.data import training_pairs
    from slimrec.student.tiny_model import build_corpus, ensure_tiny_model

    items, prompts, teacher = offline_pairs(dataset, 1500, seed)
    pairs = training_pairs(teacher, prompts)
    corpus = build_corpus(items, pairs["student_prompt"].tolist(), pairs["rationale"].tolist(), cfg.tiny)
    return ensure_tiny_model(models_dir, corpus, cfg.tiny)[0]


def mask_walk(grammar, tok, text: str) -> dict:
    """Fill the next-token mask before every token of ``text`` (which the grammar accepts): ms per token."""
    xgr = grammar._xgr
    matcher = xgr.GrammarMatcher(grammar.compiled)
    mask = xgr.allocate_token_bitmask(1, grammar.vocab_size)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    times = []
    for t in ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - t0)
        if not matcher.accept_token(int(t)):
            raise RuntimeError(f"the grammar refused token {t} of its own rationale after {len(times)} tokens")
    return {"tokens": len(ids), "median_ms": 1000 * statistics.median(times), "max_ms": 1000 * max(times),
            "total_ms": 1000 * sum(times)}


def measure(items, tok, vocab: int, cfg, threads: int) -> dict:
    from slimrec.rationale_shape import format_rationale
    from slimrec.stages.student_rationales import constraint
    from slimrec.student.config import rationale_shape
    from slimrec.student.constrain import StudentGrammar

    gc.collect()
    r0 = _rss_mb()
    con = constraint(cfg, items)
    g = StudentGrammar(con.ebnf, tok, vocab, threads=threads)
    titles = con.titles.titles
    picks = [titles[len(titles) // 7], titles[len(titles) // 2], titles[-1]][: rationale_shape(cfg).max_items]
    walk = mask_walk(g, tok, format_rationale("The customer buys pens and paper.", "Pens, Paper; Bic.", picks)
                     + tok.eos_token)
    out = {"items": len(items), "titles": len(titles), "ebnf_chars": len(con.ebnf),
           "ebnf_build_s": con.build_seconds, "compile_s": g.compile_seconds, "compiled_mb": g.memory_bytes / 1e6,
           "rss_growth_mb": _rss_mb() - r0, "max_new_tokens": con.max_new_tokens, "mask": walk}
    del g, con
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="the student's base model directory (default: the builtin tiny base)")
    ap.add_argument("--titles", default="0,10000,25000,50000",
                    help="catalogue sizes; 0: the bundled catalogue (the baseline)")
    ap.add_argument("--threads", type=int, default=2, help="xgrammar compiler threads")
    ap.add_argument("--dataset", default="data/amazon_office_2014")
    ap.add_argument("--models-dir", default="bench/results/_models")
    ap.add_argument("--profile", default="dev")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the bundled catalogue and 10,000 titles")
    args = ap.parse_args(argv)
    if args.quick:
        args.titles = "0,10000"
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from slimrec.config import load_config
    from slimrec.student.models import load_tokenizer
    from slimrec.teacher.fixtures import lcrec_tables
    from transformers import AutoConfig

    cfg = load_config(args.profile).student
    base = args.base or tiny_base(args.dataset, args.models_dir, args.seed, cfg)
    tok = load_tokenizer(base)
    vocab = int(AutoConfig.from_pretrained(base, local_files_only=True).vocab_size)
    catalogue, _ = lcrec_tables(args.dataset)
    sizes = [int(s) for s in args.titles.split(",") if s.strip()]
    if 0 not in sizes:
        sizes = [0, *sizes]
    results = []
    for n in sizes:
        items = catalogue if n == 0 else generated_items(catalogue, n, args.seed)
        r = measure(items, tok, vocab, cfg, args.threads)
        r["case"] = f"bundled catalogue ({r['titles']} titles)" if n == 0 else f"{n} generated items ({r['titles']} titles)"
        print(f"{r['case']}: EBNF {r['ebnf_chars'] / 1e6:.1f}M chars in {r['ebnf_build_s']:.2f} s, compiled in "
              f"{r['compile_s']:.2f} s, {r['compiled_mb']:.1f} MB, RSS +{r['rss_growth_mb']:.0f} MiB, mask "
              f"{r['mask']['median_ms']:.3f} ms/token (max {r['mask']['max_ms']:.2f})", flush=True)
        results.append(r)
    base_r = results[0]
    rows = []
    for r in results:
        b = None if r is base_r else base_r
        rows += [
            row(r["case"], "EBNF build", r["ebnf_build_s"], "s", b and "bundled catalogue", b and b["ebnf_build_s"]),
            row(r["case"], "compile", r["compile_s"], "s", b and "bundled catalogue", b and b["compile_s"],
                spread=f"{args.threads} compiler threads"),
            row(r["case"], "compile per 1k titles", 1000 * r["compile_s"] / r["titles"], "s",
                b and "bundled catalogue", b and 1000 * b["compile_s"] / b["titles"]),
            row(r["case"], "compiled size", r["compiled_mb"], "MB", b and "bundled catalogue", b and b["compiled_mb"]),
            row(r["case"], "RSS growth", r["rss_growth_mb"], "MiB", b and "bundled catalogue", b and b["rss_growth_mb"]),
            row(r["case"], "mask fill per token", r["mask"]["median_ms"], "ms", b and "bundled catalogue",
                b and b["mask"]["median_ms"], spread=f"median over {r['mask']['tokens']} tokens; "
                                                     f"max {r['mask']['max_ms']:.2f} ms"),
            row(r["case"], "max_new_tokens", r["max_new_tokens"], "tokens"),
        ]
    record("grammar", rows, {"results": results, "base": base, "vocab": vocab, "threads": args.threads})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
