"""Constrained decoding libraries side by side on the student: xgrammar (the product's), outlines-core, lm-format-enforcer.

    pip install -e '.[constraint-bench]'     # outlines and lm-format-enforcer, for this benchmark only
    python -m bench.constraint_libs --base <tiny-llama dir> --adapter <adapter dir> [--prompts 32]

Each library gets the same rationale language over the bundled catalogue:
xgrammar the product's EBNF (:func:`slimrec.rationale_shape.grammar_ebnf`,
the catalogue as a trie of titles); outlines-core and lm-format-enforcer,
which take regular expressions and not this EBNF, the same language as one
regular expression (:func:`catalogue_regex`: the step bounds of
:func:`~slimrec.rationale_shape.shape_regex` with the quoted title replaced by
an alternation of the catalogue's titles). Per library, in its own process
under ``--timeout`` seconds (a library that cannot build the constraint in time
is reported as such): the constraint's build time and resident-memory growth,
then greedy batched generation of ``--prompts`` held-out prompts with the same
student, bound and KV cache (one pass to the grammar's bound): output tokens/s,
the share that parses into three steps, and step-3 titles that ground to a
catalogue id exactly. Nothing is asserted; quote figures from a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import pandas as pd

from bench.common import record, row

LIBS = ("xgrammar", "outlines_core", "lmformatenforcer", "outlines_core_shape", "lmformatenforcer_shape")


def catalogue_regex(shape, titles) -> str:
    """:func:`~slimrec.rationale_shape.shape_regex` with each quoted title one of ``titles``, unanchored."""
    from slimrec.rationale_shape import shape_regex

    title = '"(' + "|".join(re.escape(t).replace("\\\n", "\\n") for t in sorted(set(titles))) + ')"'
    return shape_regex(shape, title).removeprefix("^").removesuffix("$")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def _processor_factory(lib: str, tok, vocab: int, ebnf: str, regex: str):
    """(factory of a per-call logits processor or prefix function, kwargs name) after building the constraint.

    A ``_shape`` library gets :func:`~slimrec.rationale_shape.shape_regex` (any quoted title: no catalogue,
    so its titles need not ground) in place of the catalogue regex: what the library can do at all.
    """
    if lib == "xgrammar":
        from slimrec.student.constrain import StudentGrammar

        g = StudentGrammar(ebnf, tok, vocab, threads=2)
        return (lambda: g.processor()), "logits_processor"
    if lib == "outlines_core":
        from outlines.backends.outlines_core import OutlinesCoreLogitsProcessor
        from outlines_core import Index, Vocabulary

        formatted: dict[str, list[int]] = {}
        for token, token_id in tok.get_vocab().items():
            if token_id != tok.eos_token_id:
                formatted.setdefault(tok.convert_tokens_to_string([token]), []).append(token_id)
        index = Index(regex, Vocabulary(tok.eos_token_id, formatted))
        return (lambda: OutlinesCoreLogitsProcessor(index, "torch")), "logits_processor"
    if lib == "lmformatenforcer":
        import transformers.tokenization_utils_base as tub

        # lm-format-enforcer 0.11.3 imports transformers.tokenization_utils, which transformers 5 removed; the
        # class it wants lives in tokenization_utils_base
        if not hasattr(sys.modules.get("transformers.tokenization_utils"), "PreTrainedTokenizerBase"):
            sys.modules["transformers.tokenization_utils"] = tub
        from lmformatenforcer import RegexParser
        from lmformatenforcer.integrations.transformers import (
            build_token_enforcer_tokenizer_data,
            build_transformers_prefix_allowed_tokens_fn,
        )

        data = build_token_enforcer_tokenizer_data(tok)
        return (lambda: build_transformers_prefix_allowed_tokens_fn(data, RegexParser(regex))), "prefix_allowed_tokens_fn"
    raise ValueError(f"unknown library {lib!r}; one of {LIBS}")


def run_one(lib: str, args) -> dict:
    """One library: build the constraint, generate, parse (in this process)."""
    import torch
    from slimrec.config import load_config
    from slimrec.rationale import parse_rationale
    from slimrec.rationale_shape import shape_regex
    from slimrec.stages.student_rationales import constraint
    from slimrec.student.config import rationale_shape
    from slimrec.student.data import collate_left, fit_prompt_ids, split_by_user, training_pairs, trim_items
    from slimrec.student.models import load_student, load_tokenizer

    from bench.student import offline_pairs

    torch.set_num_threads(args.threads)
    cfg = load_config(args.profile).student
    items, prompts, teacher = offline_pairs(args.dataset, args.users, args.seed)
    pairs = training_pairs(teacher, prompts)
    pairs["target"] = [trim_items(r, cfg.max_target_items) for r in pairs["rationale"]]
    _, held = split_by_user(pairs, cfg.heldout_fraction, cfg.split_seed)
    con = constraint(cfg, items)
    regex = catalogue_regex(rationale_shape(cfg), con.titles.titles)
    if lib.endswith("_shape"):
        regex = shape_regex(rationale_shape(cfg)).removeprefix("^").removesuffix("$")
    tok = load_tokenizer(args.base, padding_side="left")
    model = load_student(args.base, args.adapter, None, "cpu", merge=True).eval()
    vocab = int(model.get_output_embeddings().weight.shape[0])
    r0, t0 = _rss_mb(), time.perf_counter()
    factory, kwarg = _processor_factory(lib.removesuffix("_shape"), tok, vocab, con.ebnf, regex)
    out = {"library": lib, "build_seconds": round(time.perf_counter() - t0, 2),
           "build_rss_growth_mb": round(_rss_mb() - r0, 1), "titles": len(con.titles.titles),
           "regex_chars": len(regex), "ebnf_chars": len(con.ebnf), "max_new_tokens": con.max_new_tokens}
    ids = sorted((fit_prompt_ids(tok, p, cfg.max_prompt_tokens) for p in
                  held.drop_duplicates("user_id").head(args.prompts)["student_prompt"]), key=len)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    texts, n_tok = [], 0
    t0 = time.perf_counter()
    for s in range(0, len(ids), cfg.infer.batch_size):
        batch = collate_left(ids[s : s + cfg.infer.batch_size], pad)
        proc = factory()
        extra = {"logits_processor": [proc]} if kwarg == "logits_processor" else {kwarg: proc}
        with torch.inference_mode():
            gen = model.generate(**batch, max_new_tokens=con.max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, eos_token_id=eos, pad_token_id=pad,
                                 cache_implementation=cfg.infer.kv_cache, **extra)
        for r in gen[:, batch["input_ids"].shape[1] :].tolist():
            k = r.index(eos) if eos in r else len(r)
            n_tok += k + (k < len(r))
            texts.append(tok.decode(r[:k], skip_special_tokens=True))
    wall = time.perf_counter() - t0
    parsed = [parse_rationale(t) for t in texts]
    names = [list(p.item_names) if p else [] for p, _ in parsed]
    out.update({"prompts": len(ids), "output_tokens": n_tok, "generate_seconds": round(wall, 2),
                "tokens_per_s": round(n_tok / wall, 1),
                "parse_ok_rate": round(sum(e is None for _, e in parsed) / len(ids), 3),
                "titles_named": sum(len(n) for n in names),
                "titles_grounded_exactly": sum(len(x) for x in con.titles.ground(names)),
                "load_avg": os.getloadavg()})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the student's base model directory")
    ap.add_argument("--adapter", required=True, help="the student's LoRA adapter directory")
    ap.add_argument("--dataset", default="data/amazon_office_2014")
    ap.add_argument("--profile", default="dev")
    ap.add_argument("--users", type=int, default=1500, help="users answered by the offline teacher (held-out ones prompt)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per library (build + generation)")
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # the child process: one library, JSON out
    args = ap.parse_args(argv)
    if args.only:
        print("RESULT " + json.dumps(run_one(args.only, args), default=str))
        return []
    results = []
    for lib in args.libs.split(","):
        cmd = [sys.executable, "-m", "bench.constraint_libs", *(argv if argv is not None else sys.argv[1:]), "--only", lib]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            res = json.loads(line[7:]) if line else {"library": lib, "error": (p.stderr.strip().splitlines() or
                                                                              ["no output"])[-1][:300]}
        except subprocess.TimeoutExpired:
            res = {"library": lib, "error": f"did not finish within {args.timeout} s"}
        res["wall_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(res, default=str), flush=True)
        results.append(res)
    cols = ["library", "build_seconds", "build_rss_growth_mb", "tokens_per_s", "parse_ok_rate", "titles_named",
            "titles_grounded_exactly", "error"]
    print(pd.DataFrame(results).reindex(columns=cols).to_string(index=False))
    ref = next((r for r in results if r["library"] == "xgrammar" and "tokens_per_s" in r), None)
    rows = []
    for r in results:
        if "error" in r:
            rows.append(row(r["library"], "did not run", float("nan"), "", spread=r["error"]))
            continue
        base = ("xgrammar", ref["tokens_per_s"]) if ref and r is not ref else (None, None)
        rows.append(row(r["library"], "build seconds", r["build_seconds"], "s",
                        *(("xgrammar", ref["build_seconds"]) if ref and r is not ref else (None, None))))
        rows.append(row(r["library"], "tokens/s", r["tokens_per_s"], "tok/s", *base))
        rows.append(row(r["library"], "parse ok rate", r["parse_ok_rate"], "share"))
    record("constraint_libs", rows, extra={"results": results})
    return results


if __name__ == "__main__":
    main()
