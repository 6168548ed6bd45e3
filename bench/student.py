"""Student benchmark: distillation time per epoch, peak memory, held-out quality, generation tokens/s.

    python -m bench.student                       # bundled Office data, dev profile's student config
    python -m bench.student --set student.train.epochs=2 --users 1500 --gen-prompts 64

What it does, on the bundled data and without Spark or a lake:

1. items and leave-one-out sequences from ``data/amazon_office_2014`` (the
   teacher's fixture reader), prompts exactly as ``build_prompts`` renders
   them, and offline-teacher rationales for ``--users`` users (seeded);
2. the builtin tiny Llama (built once into ``--models-dir``, then reused);
3. LoRA distillation with the same loop Ray Train runs
   (:func:`slimrec.student.train.core_train`, in this process): seconds per
   epoch, train/val loss, peak resident memory;
4. held-out quality: ROUGE-L and token F1 of the student's and of the
   un-adapted base's rationales against the teacher's, on held-out users;
5. generation on ``--gen-prompts`` held-out prompts: batched (``infer.batch_size``)
   versus one prompt at a time, and the configured KV cache (``infer.kv_cache``)
   versus the other one, same prompts, greedy: output tokens/s and how many
   outputs are identical;
6. constrained decoding (:mod:`slimrec.rationale_shape`, xgrammar): the grammar's
   build time and memory over the bundled catalogue (and over ``--grammar-scale``
   generated titles), then the same prompts batched with and without the
   grammar: parse rate, grounded titles, output tokens/s and their ratio.

Numbers depend on the machine's load: the report prints the load average
and CPU seconds next to wall seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
import pandas as pd

from bench.common import record

log = logging.getLogger("bench.student")


def offline_pairs(dataset: str, users: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(items, prompts, teacher rows) for ``users`` sampled users, from the bundled data set."""
    from slimrec.config import load_config
    from slimrec.teacher.fixtures import lcrec_tables, prompt_rows
    from slimrec.teacher.offline import OfflineTeacher, build_stats

    cfg = load_config("dev")
    items, seqs = lcrec_tables(dataset)
    prompts = prompt_rows(seqs, items, cfg.prompts)
    stats = build_stats(seqs["history"], items, cfg.teacher.offline)
    sample = prompts.sample(n=min(users, len(prompts)), random_state=seed)
    answers = OfflineTeacher(stats, cfg.teacher.offline)(sample)
    teacher = sample[["prompt_hash", "user_id"]].merge(answers, on="prompt_hash")
    teacher = teacher.assign(teacher_model=cfg.teacher.offline.model_name, status="ok")
    return items, prompts, teacher


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def generated_items(items: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` made-up items whose titles are 3-14 words drawn from the catalogue's titles (a bigger catalogue)."""
    rng = np.random.default_rng(seed)
    words = np.array([w for t in items["title"].dropna() for w in str(t).split()])
    lens = rng.integers(3, 15, size=n)
    titles = [" ".join(rng.choice(words, size=k)) for k in lens]
    return pd.DataFrame({"item_id": [f"gen{i:07d}" for i in range(n)], "title": titles})


def grammar_cost(tok, vocab_size: int, items: pd.DataFrame, cfg, threads: int) -> tuple:
    """(figures, compiled grammar, constraint): the stage's grammar over ``items`` compiled for ``tok``."""
    from slimrec.stages.student_rationales import constraint
    from slimrec.student.constrain import StudentGrammar, word_budget

    con = constraint(cfg, items)
    r0 = _rss_mb()
    g = StudentGrammar(con.ebnf_uncounted, tok, vocab_size, threads=threads, words=word_budget(con.shape))
    return {"items": len(items), "titles": len(con.titles), "ebnf_chars": len(con.ebnf),
            "ebnf_rules": con.ebnf.count("::="), "ebnf_build_seconds": round(con.build_seconds, 2),
            "compile_seconds": round(g.compile_seconds, 2), "compiled_mb": round(g.memory_bytes / 1e6, 1),
            "rss_growth_mb": round(_rss_mb() - r0, 1), "max_new_tokens": con.max_new_tokens,
            "tokenizer_vocab": vocab_size, "threads": threads, "load_avg": os.getloadavg()}, g, con


def constrained_vs_free(model, tok, ids: list[list[int]], cfg, grammar, con, repeats: int = 1,
                        one_pass: bool = False) -> dict:
    """Same prompts, batched, greedy: free decoding at ``infer.max_new_tokens`` against the grammar.

    Runs: ``unconstrained`` (the free student's own bound), ``constrained`` (the grammar as the stage
    decodes: passes of ``infer.pass_tokens``, rows that end leave, each next mask prepared on a worker
    thread while the model runs) and ``constrained_inline`` (the same with every mask prepared inside
    the logits processor's call, ``StudentGrammar.overlap=False``), ``constrained_counted`` (the grammar that
    counts the words of steps 1 and 2 itself, as vLLM gets it, instead of the decoder's ``WordBudget``: the same
    answers), and ``unconstrained_generate`` / ``constrained_generate`` (the free and constrained runs decoded by
    transformers ``generate``, which computes rows that ended until the batch's longest answer ends, instead of
    dropping them: ``infer.drop_ended_rows``; the same answers); with ``one_pass`` also
    ``constrained_one_pass`` (one pass to the grammar's byte-safe bound, which sizes the static cache by that
    bound: slow, kept to show why the stage decodes in passes). ``repeats`` rounds, interleaved (every other
    round in reverse order), so load drifts hit every run alike; tokens/s is the median over rounds and each ratio's min and max over rounds are given.
    """
    import copy

    from slimrec.rationale import parse_rationale
    from slimrec.student.constrain import StudentGrammar
    from slimrec.student.generate import generate_ids

    passes = cfg.infer.pass_tokens or cfg.infer.max_new_tokens
    inline = copy.copy(grammar)  # the same compiled grammar, masks prepared inside the processor's call
    inline.overlap = False
    counted = StudentGrammar(con.ebnf, tok, grammar.vocab_size, threads=grammar.threads)  # what vLLM gets
    drop = cfg.infer.drop_ended_rows
    runs = (("unconstrained", None, cfg.infer.max_new_tokens, None, drop),
            ("constrained", grammar, con.max_new_tokens, passes, drop),
            ("constrained_inline", inline, con.max_new_tokens, passes, drop),
            ("constrained_counted", counted, con.max_new_tokens, passes, drop),
            ("unconstrained_generate", None, cfg.infer.max_new_tokens, None, False),
            ("constrained_generate", grammar, con.max_new_tokens, passes, False))
    if one_pass:
        runs += (("constrained_one_pass", grammar, con.max_new_tokens, None, drop),)
    out: dict = {}
    rates: dict[str, list[float]] = {name: [] for name, *_ in runs}
    texts: dict[str, list[str]] = {}
    for k in range(max(1, repeats)):
        for name, g, bound, pass_tokens, drop_ended in (runs if k % 2 == 0 else runs[::-1]):  # none always first
            t0, c0 = time.perf_counter(), time.process_time()
            res = generate_ids(model, tok, ids, bound, cfg.infer.batch_size, repetition_penalty=cfg.infer.repetition_penalty,
                               kv_cache=cfg.infer.kv_cache, grammar=g, pass_tokens=pass_tokens, drop_ended=drop_ended)
            wall = time.perf_counter() - t0
            n_tok = sum(r[2] for r in res)
            rates[name].append(n_tok / wall)
            if name in out:
                continue
            texts[name] = [r[0] for r in res]
            parsed = [parse_rationale(t, f) if f != "dead_end" else (None, "parse_error: dead end") for t, f, *_ in res]
            statuses = pd.Series([(e or "ok").split(":")[0] for _, e in parsed]).value_counts().to_dict()
            names = [list(p.item_names) if p else [] for p, _ in parsed]
            named = sum(len(n) for n in names)
            grounded = sum(len(x) for x in con.titles.ground(names))
            out[name] = {"prompts": len(ids), "max_new_tokens": bound, "pass_tokens": pass_tokens or bound,
                         "batch_size": cfg.infer.batch_size, "output_tokens": n_tok,
                         "output_tokens_max": max(r[2] for r in res), "seconds": round(wall, 2),
                         "cpu_seconds": round(time.process_time() - c0, 2),
                         "rationales_per_s": round(len(ids) / wall, 2),
                         "parse_ok_rate": round(statuses.get("ok", 0) / len(ids), 3), "statuses": statuses,
                         "titles_named": named, "titles_grounded_exactly": grounded}
    for name, r in rates.items():
        out[name]["tokens_per_s"] = round(float(np.median(r)), 1)
        out[name]["tokens_per_s_rounds"] = [round(x, 1) for x in r]
    for a, b, key in (("constrained", "unconstrained", "constrained_vs_unconstrained"),
                      ("constrained_inline", "unconstrained", "constrained_inline_vs_unconstrained"),
                      ("constrained", "constrained_inline", "constrained_vs_constrained_inline"),
                      ("constrained_counted", "unconstrained", "constrained_counted_vs_unconstrained"),
                      ("constrained", "constrained_counted", "constrained_vs_constrained_counted"),
                      ("constrained", "unconstrained_generate", "constrained_vs_unconstrained_generate"),
                      ("constrained_generate", "unconstrained_generate", "constrained_generate_vs_unconstrained_generate"),
                      ("constrained", "constrained_generate", "constrained_vs_constrained_generate"),
                      ("constrained_one_pass", "unconstrained", "constrained_one_pass_vs_unconstrained")):
        if a not in rates:
            continue
        per_round = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
        out[f"tokens_per_s_ratio_{key}"] = round(float(np.median(per_round)), 2)
        out[f"tokens_per_s_ratio_{key}_min_max"] = [round(min(per_round), 2), round(max(per_round), 2)]
    out["rationales_per_s_ratio_constrained_vs_unconstrained"] = round(
        out["constrained"]["rationales_per_s"] / out["unconstrained"]["rationales_per_s"], 2)
    same = sum(a == b for a, b in zip(texts["constrained"], texts["constrained_counted"], strict=True))
    out["identical_constrained_vs_counted"] = f"{same}/{len(ids)}"
    same = sum(a == b for a, b in zip(texts["constrained"], texts["constrained_generate"], strict=True))
    out["identical_constrained_vs_generate"] = f"{same}/{len(ids)}"
    out["drop_ended_rows"] = drop
    out["kv_cache"] = cfg.infer.kv_cache
    out["repeats"] = max(1, repeats)
    return out


def report_rows(report: dict) -> list[dict]:
    """The report's headline figures as :func:`bench.common.row` rows (for ``make bench`` and docs/benchmarks.md)."""
    from bench.common import row

    rows = []
    if "distill" in report:
        d = report["distill"]
        epochs = d["history"]["epoch_seconds"]
        rows.append(row("distill LoRA (in-process)", "seconds per epoch", float(np.mean(epochs)), "s",
                        spread=f"{min(epochs):.1f}-{max(epochs):.1f} s over {len(epochs)} epochs"))
        rows.append(row("held-out ROUGE-L vs teacher", "student", d.get("heldout_rouge_l_student", float("nan")), "",
                        "untrained base", d.get("heldout_rouge_l_base")))
    if "generation" in report:
        g = report["generation"]
        rows.append(row("generate, batched", "tokens/s", g["batched"]["tokens_per_s"], "tok/s", "one prompt at a time",
                        g["single"]["tokens_per_s"]))
    if "constrained" in report:
        c, gr = report["constrained"], report["grammar"]
        rows.append(row(f"grammar over {gr['titles']} titles", "compile seconds", gr["compile_seconds"], "s"))
        rows.append(row(f"grammar over {gr['titles']} titles", "compiled size", gr["compiled_mb"], "MB"))
        if "grammar_scaled" in report:
            gs = report["grammar_scaled"]
            rows.append(row(f"grammar over {gs['titles']} titles", "compile seconds", gs["compile_seconds"], "s"))
        for name in [n for n in ("constrained", "constrained_inline", "constrained_counted", "constrained_generate",
                                 "unconstrained_generate", "constrained_one_pass") if n in c]:
            rows.append(row(f"{name}, {c[name]['prompts']} prompts", "tokens/s", c[name]["tokens_per_s"], "tok/s",
                            f"free, bound {c['unconstrained']['max_new_tokens']}", c["unconstrained"]["tokens_per_s"],
                            spread=f"median of {c['repeats']} rounds"))
        for key, case in (("constrained_vs_unconstrained", "constrained / free"),
                          ("constrained_inline_vs_unconstrained", "constrained_inline / free"),
                          ("constrained_vs_constrained_inline", "constrained / constrained_inline"),
                          ("constrained_counted_vs_unconstrained", "constrained_counted / free"),
                          ("constrained_vs_constrained_counted", "constrained / constrained_counted"),
                          ("constrained_vs_unconstrained_generate", "constrained / free with generate"),
                          ("constrained_generate_vs_unconstrained_generate", "both with generate: constrained / free"),
                          ("constrained_vs_constrained_generate", "constrained: ended rows dropped / generate")):
            if f"tokens_per_s_ratio_{key}" in c:
                lo, hi = c[f"tokens_per_s_ratio_{key}_min_max"]
                rows.append(row(case, "tokens/s ratio, paired by round", c[f"tokens_per_s_ratio_{key}"], "x",
                                spread=f"median; {lo}-{hi} over {c['repeats']} rounds"))
        rows.append(row("constrained", "parse ok rate", c["constrained"]["parse_ok_rate"], "share",
                        "free decoding", c["unconstrained"]["parse_ok_rate"]))
    if "inference" in report:
        inf = report["inference"]
        rows.append(row(f"free generation, {inf['users']} users", "tokens/s", inf["tokens_per_s"], "tok/s"))
    if "peak_rss_mb" in report:
        rows.append(row("whole benchmark", "peak RSS", report["peak_rss_mb"], "MiB"))
    return rows


def grammar_and_constrained(report: dict, model, tok, items, held, cfg, args) -> None:
    """Grammar build cost (catalogue, and ``--grammar-scale`` generated titles) and constrained against free
    generation on ``--constrained-prompts`` held-out prompts, into ``report``."""
    from slimrec.student.data import fit_prompt_ids

    vocab = int(model.get_output_embeddings().weight.shape[0])
    report["grammar"], grammar, con = grammar_cost(tok, vocab, items, cfg, args.threads)
    if args.grammar_scale:
        report["grammar_scaled"] = grammar_cost(tok, vocab, generated_items(items, args.grammar_scale, args.seed),
                                                cfg, args.threads)[0]
    c_df = held.drop_duplicates("user_id").head(args.constrained_prompts)
    ids = sorted((fit_prompt_ids(tok, p, cfg.max_prompt_tokens) for p in c_df["student_prompt"]), key=len)
    report["constrained"] = constrained_vs_free(model, tok, ids, cfg, grammar, con, args.repeats, args.one_pass)


def constrained_only(args, cfg, items: pd.DataFrame, held: pd.DataFrame, report: dict) -> dict:
    """Step 6 alone, on a student distilled elsewhere (``--base`` + ``--adapter``, e.g. a lake's student_models row)."""
    from slimrec.student.models import load_student, load_tokenizer

    tok = load_tokenizer(args.base, padding_side="left")
    model = load_student(args.base, args.adapter, None, "cpu", merge=cfg.infer.merge_adapter).eval()
    report["student"] = {"base": args.base, "adapter": args.adapter}
    grammar_and_constrained(report, model, tok, items, held, cfg, args)
    report["load_avg_end"] = os.getloadavg()
    print(json.dumps({k: report[k] for k in ("grammar", "grammar_scaled", "constrained", "load_avg_start",
                                             "load_avg_end") if k in report}, indent=1, default=str))
    record("student", report_rows(report), extra=report)
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="data/amazon_office_2014")
    ap.add_argument("--users", type=int, default=1500, help="users answered by the offline teacher (dev: 1500)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models-dir", default="bench/results/_models", help="where the builtin base is built / reused")
    ap.add_argument("--gen-prompts", type=int, default=32, help="prompts for the batched vs single generation check")
    ap.add_argument("--infer-users", type=int, default=500,
                    help="users (any, seeded) generated batched like the stage does, timed and extrapolated to all")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the stage: cores / actors)")
    ap.add_argument("--profile", default="dev")
    ap.add_argument("--grammar-scale", type=int, default=0,
                    help="also compile the grammar over this many generated titles (0: only the bundled catalogue)")
    ap.add_argument("--constrained-prompts", type=int, default=64,
                    help="held-out prompts generated with and without the grammar (0: skip)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved rounds of the constrained / unconstrained runs (median and min-max of ratios)")
    ap.add_argument("--one-pass", action="store_true",
                    help="also decode under the grammar in one pass to its byte-safe bound (slow: the static cache "
                         "is sized by the bound)")
    ap.add_argument("--adapter", default=None,
                    help="an already distilled adapter (with --base): skip steps 2-5, measure constrained decoding only")
    ap.add_argument("--base", default=None, help="the adapter's base model directory (with --adapter)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override, e.g. student.train.epochs=2")
    ap.add_argument("--quick", action="store_true",
                    help="make bench --quick: 300 users, 1 epoch, 8 + 32 prompts, 64 inference users, 2 rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.users, args.gen_prompts, args.constrained_prompts, args.infer_users, args.repeats = 300, 8, 32, 64, 2
        args.sets = ["student.train.epochs=1", *args.sets]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from slimrec.config import load_config
    from slimrec.rationale import parse_rationale
    from slimrec.student.data import (
        encode_pair,
        eval_subset,
        fit_prompt_ids,
        split_by_user,
        training_pairs,
        trim_items,
    )
    from slimrec.student.generate import generate_ids
    from slimrec.student.models import load_tokenizer
    from slimrec.student.tiny_model import build_corpus, ensure_tiny_model
    from slimrec.student.train import core_train, peak_rss_mb

    cfg = load_config(args.profile, overrides=args.sets).student
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"torch_threads": args.threads})})
    torch.set_num_threads(args.threads)
    report: dict = {"load_avg_start": os.getloadavg(), "cpus": os.cpu_count(), "student_config": cfg.model_dump(mode="json")}
    t0 = time.perf_counter()
    items, prompts, teacher = offline_pairs(args.dataset, args.users, args.seed)
    pairs = training_pairs(teacher, prompts)
    pairs["target"] = [trim_items(r, cfg.max_target_items) for r in pairs["rationale"]]
    train_df, held = split_by_user(pairs, cfg.heldout_fraction, cfg.split_seed)
    report["data_seconds"] = round(time.perf_counter() - t0, 1)
    if args.adapter:
        return constrained_only(args, cfg, items, held, report)

    t0, c0 = time.perf_counter(), time.process_time()
    corpus = build_corpus(items, pairs["student_prompt"].tolist(), pairs["rationale"].tolist(), cfg.tiny)
    base_path, base_info = ensure_tiny_model(args.models_dir, corpus, cfg.tiny)
    report["base"] = {"path": base_path, "seconds_this_run": round(time.perf_counter() - t0, 1),
                      "cpu_seconds_this_run": round(time.process_time() - c0, 1), **base_info}

    tok = load_tokenizer(base_path)
    enc = [encode_pair(tok, p, t, cfg.max_prompt_tokens, cfg.max_target_tokens)
           for p, t in zip(train_df["student_prompt"], train_df["target"], strict=True)]
    val = [encode_pair(tok, p, t, cfg.max_prompt_tokens, cfg.max_target_tokens)
           for p, t in zip(held["student_prompt"], held["target"], strict=True)]
    eval_df = eval_subset(held, cfg.eval_max_users, cfg.split_seed)
    eval_set = {"prompt_ids": [fit_prompt_ids(tok, p, cfg.max_prompt_tokens) for p in eval_df["student_prompt"]],
                "targets": eval_df["target"].tolist(), "full": eval_df["rationale"].tolist()}
    target_tokens = [sum(x != -100 for x in e["labels"]) for e in enc]
    report["data"] = {"train_pairs": len(enc), "heldout_pairs": len(val), "eval_users": len(eval_df),
                      "train_tokens": sum(len(e["input_ids"]) for e in enc),
                      "target_tokens_p50_p90_max": np.percentile(target_tokens, [50, 90, 100]).tolist()}
    config = {"base_path": base_path, "train": enc, "val": val, "eval_set": eval_set,
              "lora": cfg.lora.model_dump(mode="json"), "train_cfg": cfg.train.model_dump(mode="json"),
              "seed": cfg.split_seed, "max_new_tokens": cfg.infer.max_new_tokens, "eval_batch_size": cfg.eval_batch_size,
              "repetition_penalty": cfg.infer.repetition_penalty}
    t0, c0 = time.perf_counter(), time.process_time()
    model, m = core_train(config)
    report["distill"] = {k: v for k, v in m.items() if k != "samples"}
    report["distill"]["seconds_total_incl_eval"] = round(time.perf_counter() - t0, 1)
    report["distill"]["cpu_seconds_total_incl_eval"] = round(time.process_time() - c0, 1)
    report["samples"] = m.get("samples")

    # Generation: the same held-out prompts, batched versus one at a time (greedy, so outputs should match).
    gen_df = held.drop_duplicates("user_id").head(args.gen_prompts)
    ids = sorted((fit_prompt_ids(tok, p, cfg.max_prompt_tokens) for p in gen_df["student_prompt"]), key=len)
    merged = model.merge_and_unload().eval() if cfg.infer.merge_adapter else model.eval()
    generate_ids(merged, tok, ids[:2], 8, 2)  # warm-up: thread pools and allocator, outside the timings
    gen = {}
    other_cache = "dynamic" if cfg.infer.kv_cache == "static" else "static"
    runs = (("batched", cfg.infer.batch_size, cfg.infer.kv_cache), ("single", 1, cfg.infer.kv_cache),
            (f"batched_{other_cache}_cache", cfg.infer.batch_size, other_cache))
    for name, bs, cache in runs:
        t0, c0 = time.perf_counter(), time.process_time()
        outs = generate_ids(merged, tok, ids, cfg.infer.max_new_tokens, bs,
                            repetition_penalty=cfg.infer.repetition_penalty, kv_cache=cache)
        wall = time.perf_counter() - t0
        n_tok = sum(o[2] for o in outs)
        gen[name] = {"batch_size": bs, "kv_cache": cache, "prompts": len(ids), "output_tokens": n_tok,
                     "seconds": round(wall, 2),
                     "cpu_seconds": round(time.process_time() - c0, 2), "tokens_per_s": round(n_tok / wall, 1),
                     "outs": outs}
    other = f"batched_{other_cache}_cache"
    ref = gen["batched"].pop("outs")
    for name, key in (("single", "identical_outputs"), (other, f"identical_outputs_{other_cache}_cache")):
        gen[key] = f"{sum(a[0] == b[0] for a, b in zip(ref, gen[name].pop('outs'), strict=True))}/{len(ids)}"
    gen["speedup_batched_vs_single"] = round(gen["batched"]["tokens_per_s"] / gen["single"]["tokens_per_s"], 2)
    gen[f"speedup_{cfg.infer.kv_cache}_vs_{other_cache}_cache"] = round(
        gen["batched"]["tokens_per_s"] / gen[other]["tokens_per_s"], 2)
    report["generation"] = gen

    if args.constrained_prompts:
        grammar_and_constrained(report, merged, tok, items, held, cfg, args)

    if args.infer_users:
        users = prompts.sample(n=min(args.infer_users, len(prompts)), random_state=args.seed + 1)
        ids = sorted((fit_prompt_ids(tok, p, cfg.max_prompt_tokens) for p in users["student_prompt"]), key=len)
        t0, c0 = time.perf_counter(), time.process_time()
        outs = generate_ids(merged, tok, ids, cfg.infer.max_new_tokens, cfg.infer.batch_size,
                            repetition_penalty=cfg.infer.repetition_penalty, kv_cache=cfg.infer.kv_cache)
        wall = time.perf_counter() - t0
        n_tok = sum(o[2] for o in outs)
        statuses = pd.Series([(parse_rationale(t, f)[1] or "ok").split(":")[0] for t, f, *_ in outs]).value_counts()
        report["inference"] = {
            "users": len(ids), "batch_size": cfg.infer.batch_size, "threads": args.threads,
            "prompt_tokens_mean": round(float(np.mean([len(x) for x in ids])), 1),
            "output_tokens": n_tok, "output_tokens_mean": round(n_tok / len(ids), 1), "seconds": round(wall, 1),
            "cpu_seconds": round(time.process_time() - c0, 1), "tokens_per_s": round(n_tok / wall, 1),
            "statuses": statuses.to_dict(),
            "est_seconds_all_users": round(wall * len(prompts) / len(ids), 1), "all_users": len(prompts),
        }
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    report["load_avg_end"] = os.getloadavg()

    d = report["distill"]
    print(f"held-out ROUGE-L vs teacher (trimmed to {cfg.max_target_items} items), {d.get('heldout_eval_users')} users: "
          f"student {d.get('heldout_rouge_l_student', 0):.3f} vs base {d.get('heldout_rouge_l_base', 0):.3f}; "
          f"token F1 {d.get('heldout_token_f1_student', 0):.3f} vs {d.get('heldout_token_f1_base', 0):.3f}; "
          f"parse ok {d.get('heldout_parse_ok_rate_student', 0):.2f}")
    print(f"distill: epochs {d['history']['epoch_seconds']} s, train loss {d['history']['train_loss']}, "
          f"val loss {d['history']['val_loss']}, peak RSS {report['peak_rss_mb']} MiB")
    print(f"generation: batched {gen['batched']['tokens_per_s']} tok/s vs single {gen['single']['tokens_per_s']} tok/s "
          f"(x{gen['speedup_batched_vs_single']}), identical {gen['identical_outputs']}")
    print(f"generation: {cfg.infer.kv_cache} KV cache {gen['batched']['tokens_per_s']} tok/s vs {other_cache} "
          f"{gen[other]['tokens_per_s']} tok/s (x{gen[f'speedup_{cfg.infer.kv_cache}_vs_{other_cache}_cache']}), "
          f"identical {gen[f'identical_outputs_{other_cache}_cache']}")
    if "inference" in report:
        inf = report["inference"]
        print(f"inference: {inf['users']} users in {inf['seconds']} s ({inf['tokens_per_s']} tok/s, {inf['threads']} threads), "
              f"statuses {inf['statuses']}; all {inf['all_users']} users: about {inf['est_seconds_all_users']} s")
    if "constrained" in report:
        c, gr = report["constrained"], report["grammar"]
        print(f"grammar: {gr['titles']} titles, {gr['ebnf_chars']} EBNF chars, compile {gr['compile_seconds']} s, "
              f"{gr['compiled_mb']} MB compiled (RSS +{gr['rss_growth_mb']} MB), max_new_tokens {gr['max_new_tokens']}")
        if "grammar_scaled" in report:
            gs = report["grammar_scaled"]
            print(f"grammar at {gs['titles']} titles: compile {gs['compile_seconds']} s, {gs['compiled_mb']} MB "
                  f"(RSS +{gs['rss_growth_mb']} MB)")
        for k in [k for k in ("unconstrained", "constrained_one_pass", "constrained_counted", "constrained_inline",
                              "constrained") if k in c]:
            print(f"{k}: parse ok {c[k]['parse_ok_rate']:.1%} {c[k]['statuses']}, {c[k]['tokens_per_s']} tok/s, "
                  f"{c[k]['rationales_per_s']} rationales/s, titles named {c[k]['titles_named']} grounded "
                  f"{c[k]['titles_grounded_exactly']}")
        print(f"constrained / unconstrained: tokens/s x{c['tokens_per_s_ratio_constrained_vs_unconstrained']} "
              f"(rounds {c['tokens_per_s_ratio_constrained_vs_unconstrained_min_max']}), "
              f"rationales/s x{c['rationales_per_s_ratio_constrained_vs_unconstrained']}; masks prepared ahead / inline "
              f"x{c['tokens_per_s_ratio_constrained_vs_constrained_inline']}; words counted by the decoder / by the "
              f"grammar x{c['tokens_per_s_ratio_constrained_vs_constrained_counted']} (identical answers "
              f"{c['identical_constrained_vs_counted']})"
              + (f"; one pass to the grammar's bound x{c['tokens_per_s_ratio_constrained_one_pass_vs_unconstrained']}"
                 if "constrained_one_pass" in c else ""))
    print(f"load average start {report['load_avg_start']} end {report['load_avg_end']}")
    record("student", report_rows(report), extra=report)
    return report


if __name__ == "__main__":
    main()
