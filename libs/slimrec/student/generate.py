"""Student generation: batched HF ``generate`` or vLLM with a LoRA adapter, and the parsing of its output.

Model steps are callable classes for Ray Data actor pools: weights load once
in ``__init__``, ``__call__`` turns a batch of prompts into raw answers.
Greedy decoding with the static cache runs :func:`_greedy_pass` (rows that end
leave the batch); sampling, a repetition penalty or another cache run HF ``generate``.

Input batch columns: ``user_id``, ``prompt_hash``, ``student_prompt``.
Output (:data:`RAW_COLUMNS`): ``user_id``, ``prompt_hash``, ``rationale``,
``finish_reason`` (stop | length | error | dead_end), ``output_tokens``,
``latency_ms`` (the batch's wall time / its rows), ``error`` (the exception of
a failed batch, or a row's grammar dead end, else None). A failed batch becomes
rows with ``finish_reason=error``, never an exception that kills the run.

Constrained decoding (``infer.constrained``, the default): both engines take
the EBNF of :func:`slimrec.rationale_shape.grammar_ebnf` and the
``max_new_tokens`` derived from it; transformers masks logits with xgrammar
(:mod:`slimrec.student.constrain`), vLLM gets the same text as
``SamplingParams(structured_outputs=StructuredOutputsParams(grammar=...))``
on its xgrammar backend. An actor asked to constrain without a grammar, or
without the library, fails at start with the reason: it never decodes
unconstrained instead.

:func:`parse_outputs` is the post-processing (a plain function): it splits
each answer into its steps with :func:`slimrec.rationale.parse_rationale`
and turns errors into statuses.
"""

from __future__ import annotations

import logging
import time

import pandas as pd

from slimrec.memory import release_free_heap
from slimrec.rationale import parse_rationale, status_of
from slimrec.student.data import collate_left, fit_prompt_ids

log = logging.getLogger(__name__)

RAW_COLUMNS = ["user_id", "prompt_hash", "rationale", "finish_reason", "output_tokens", "latency_ms", "error"]


def generate_ids(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 device: str = "cpu", repetition_penalty: float = 1.0,
                 kv_cache: str = "static", grammar=None, pass_tokens: int | None = None,
                 drop_ended: bool = True) -> list[tuple]:
    """(text, finish_reason, n_tokens, error) per prompt, generated ``batch_size`` at a time, left padded.

    ``finish_reason`` is ``stop`` when the model wrote EOS, else ``length``;
    with a ``grammar`` (:class:`~slimrec.student.constrain.StudentGrammar`)
    every token is masked to what the grammar allows, and a row the grammar
    could not continue is ``dead_end`` with the reason in ``error`` (else None). The
    caller orders prompts by length when it wants batches that pad little. ``kv_cache``:
    ``static`` preallocates each call's cache (prompt + ``max_new_tokens``), ``dynamic`` grows it by
    concatenation every step: 63% of the CPU time of a batch of 64 in a profile of the tiny student, whose
    dev student_rationales stage went 265 s -> 204 s with ``static`` (4,903 of 4,905 rationales the same).

    ``pass_tokens`` (with a grammar): decode in passes of at most that many tokens. Rows that end leave;
    the others continue from their tokens and grammar state in the next pass, until ``max_new_tokens`` in
    all. The grammar's byte-safe bound is far above what rationales take (dev: 879 tokens, none over 198),
    and a single pass sizes the static cache by the bound; greedy text is the same either way up to float
    rounding of the re-read prefix.

    ``drop_ended`` (greedy decoding, static cache, no repetition penalty): each pass runs
    :func:`_greedy_pass`, where rows that wrote their end token leave the batch, their KV cache rows
    with them, instead of ``generate`` computing padding for them until the batch's longest answer
    ends; the same tokens up to float rounding of a smaller batch. Otherwise ``generate`` runs the pass.
    """
    out: list[tuple] = []
    step = max_new_tokens if grammar is None or not pass_tokens else max(1, min(pass_tokens, max_new_tokens))
    drop = drop_ended and not do_sample and repetition_penalty == 1.0 and kv_cache == "static" and \
        _greedy_pass_fits(model)
    for s in range(0, len(prompt_ids), batch_size):
        out.extend(_generate_chunk(model, tokenizer, prompt_ids[s : s + batch_size], max_new_tokens, step,
                                   do_sample, temperature, top_p, seed + s, device, repetition_penalty, kv_cache,
                                   grammar, drop))
    return out


def _generate_chunk(model, tokenizer, chunk: list[list[int]], max_new_tokens: int, step: int, do_sample: bool,
                    temperature: float, top_p: float, seed: int, device: str, repetition_penalty: float,
                    kv_cache: str, grammar, drop_ended: bool = False) -> list[tuple]:
    """One batch of :func:`generate_ids`, in passes of ``step`` tokens (one pass when ``step`` is the bound)."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    n = len(chunk)
    tokens: list[list[int]] = [[] for _ in range(n)]
    finish, errors = ["length"] * n, [None] * n
    ended = [False] * n  # an end token was generated (counted in n_tokens)
    pending, states, holds_last = list(range(n)), None, False
    done = 0
    while pending and done < max_new_tokens:
        this = min(step, max_new_tokens - done)
        batch = {k: v.to(device) for k, v in collate_left([chunk[i] + tokens[i] for i in pending], pad).items()}
        proc = grammar.processor(states, steps=done, holds_last=holds_last) if grammar is not None else None
        if drop_ended:
            with torch.inference_mode():
                new, dead, state_of = _greedy_pass(model, batch, this, eos, pad, proc)
        else:
            kwargs = dict(max_new_tokens=this, do_sample=do_sample, eos_token_id=eos, pad_token_id=pad,
                          cache_implementation=kv_cache)
            if repetition_penalty != 1.0:
                kwargs["repetition_penalty"] = repetition_penalty
            if do_sample:
                torch.manual_seed(seed + done)
                kwargs.update(temperature=temperature, top_p=top_p)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if proc is not None:
                kwargs.update(proc.generate_kwargs())
            with torch.inference_mode():
                gen = model.generate(**batch, **kwargs)  # (B, T_prompt + T_new)
            new = gen[:, batch["input_ids"].shape[1] :].tolist()
            dead, state_of = (proc.dead, proc.row_state) if proc is not None else ({}, None)
        if proc is not None:
            proc.finish()
            holds_last = proc.holds_last
        still, still_states = [], []
        for j, (i, row) in enumerate(zip(pending, new, strict=True)):
            k = row.index(eos) if eos in row else len(row)
            tokens[i].extend(row[:k])
            ended[i] = k < len(row)
            err = dead.get(j)
            if err is not None:
                finish[i], errors[i] = "dead_end", err
            elif ended[i]:
                finish[i] = "stop"
            else:
                still.append(i)
                if proc is not None:
                    still_states.append(state_of(j))
        done += this
        pending, states = still, still_states
    return [(tokenizer.decode(tokens[i], skip_special_tokens=True), finish[i], len(tokens[i]) + ended[i], errors[i])
            for i in range(n)]


# generation_config fields that change no greedy token of _greedy_pass (ids, output switches, what slimrec sets)
_NEUTRAL_GENERATION_FIELDS = {
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
    "_from_model_config", "use_cache", "output_attentions", "output_hidden_states", "output_scores",
    "output_logits", "return_dict_in_generate", "max_length", "max_new_tokens", "do_sample", "temperature",
    "top_p", "top_k", "cache_implementation",
}


def _greedy_pass_fits(model) -> bool:
    """Whether :func:`_greedy_pass` writes what ``generate`` would for ``model``: it takes ``logits_to_keep``,
    and its ``generation_config`` asks for no logits processor of its own (``no_repeat_ngram_size``,
    ``suppress_tokens``, ``min_new_tokens``... which only ``generate`` applies). Else ``generate`` decodes,
    and the reason is logged once."""
    config = getattr(model, "generation_config", None)
    extra = sorted(set(config.to_diff_dict()) - _NEUTRAL_GENERATION_FIELDS) if config is not None else []
    supports = getattr(model, "_supports_logits_to_keep", lambda: False)()
    if extra or not supports:
        if not getattr(model, "_slimrec_generate_logged", False):
            log.info("student decoding: transformers generate (rows that end stay in the batch): %s",
                     f"the model's generation_config sets {', '.join(extra)}" if extra
                     else "its forward takes no logits_to_keep")
            model._slimrec_generate_logged = True
        return False
    return True


def _greedy_pass(model, batch: dict, steps: int, eos: int, pad: int, proc, drop_share: float = 0.125):
    """At most ``steps`` greedy tokens for each row of ``batch`` (left padded), with a static KV cache, as
    ``generate`` writes them: ``(new, dead, state_of)``, ``new`` the rows' tokens (end token, then ``pad``
    after it), ``dead`` row -> dead-end reason, ``state_of(row)`` the grammar state of a row that did not end.

    Rows that wrote their end token leave the batch once they are ``drop_share`` of it (a copy of the cache
    each time, so not at every row): the rest of the pass computes only the rows still writing. ``proc``
    (a :class:`~slimrec.student.constrain.GrammarLogitsProcessor`, or None) masks each step's logits as in
    ``generate``, its next mask prepared while the model runs, and follows the batch as rows leave
    (:meth:`~slimrec.student.constrain.GrammarLogitsProcessor.keep_rows`).
    """
    import torch
    from transformers import StaticCache

    ids, attn = batch["input_ids"], batch["attention_mask"]
    n, width = ids.shape
    dev = ids.device
    cache = StaticCache(config=model.config, max_cache_len=width + steps)
    new = torch.full((n, steps), pad, dtype=torch.long, device=dev)
    origin = torch.arange(n, device=dev)  # batch row -> row of ``batch``
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    dead: dict[int, str] = {}

    def collect_dead(rows) -> None:  # the processor's dead ends of batch rows ``rows``, by row of ``batch``
        dead.update({int(origin[j]): r for j, r in proc.dead.items() if j in rows})

    step_ids, step_pos = ids, (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)  # positions as generate gives them
    for s in range(steps):
        logits = model(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()
        if proc is not None:
            logits = proc(step_ids, logits)
        nxt = torch.where(done, pad, logits.argmax(-1))  # rows that ended write padding, as in generate
        new[origin, s] = nxt
        done |= nxt == eos
        if s == steps - 1 or bool(done.all()):
            break
        if int(done.sum()) >= max(1, drop_share * len(done)):
            keep = (~done).nonzero().flatten()
            if proc is not None:
                collect_dead(set(done.nonzero().flatten().tolist()))
                proc.keep_rows(keep.tolist())
            cache.reorder_cache(keep)
            attn, step_pos, nxt, origin, done = attn[keep], step_pos[keep], nxt[keep], origin[keep], done[keep]
        attn = torch.cat([attn, attn.new_ones((len(attn), 1))], dim=1)
        step_pos = step_pos[:, -1:] + 1
        step_ids = nxt[:, None]
        if proc is not None and proc.g.overlap:
            proc.prepare_ahead(step_ids)
    if proc is None:
        return new.tolist(), dead, None
    collect_dead(range(len(origin)))
    at = {int(o): j for j, o in enumerate(origin)}
    return new.tolist(), dead, lambda i: proc.row_state(at[i])


def _threads(torch_threads: int | None, num_actors: int) -> int:
    import os

    return torch_threads or max(1, (os.cpu_count() or 1) // max(1, num_actors))


class TransformersGenerator:
    """Ray Data actor: base + adapter loaded once; batched, padded, greedy (by default) generation.

    ``infer`` is :class:`~slimrec.student.config.InferSettings` (or its dict). ``grammar``: the EBNF answers
    are constrained to; with ``shape`` (a :class:`~slimrec.rationale_shape.RationaleShape` as a dict) the grammar
    leaves the words of steps 1 and 2 uncounted and the decoder counts them (``Constraint.actor_kwargs``).
    """

    def __init__(self, base_path: str, adapter_path: str | None, infer, max_prompt_tokens: int,
                 grammar: str | None = None, max_new_tokens: int | None = None, shape: dict | None = None):
        import torch

        from slimrec.student.config import InferSettings
        from slimrec.student.models import base_dtype, load_student, load_tokenizer, pick_device

        self.infer = infer if isinstance(infer, InferSettings) else InferSettings.model_validate(infer)
        self.device = pick_device(self.infer.device)
        if self.device == "cpu":
            torch.set_num_threads(_threads(self.infer.torch_threads, self.infer.num_actors))
        dtype = base_dtype(base_path, torch.bfloat16 if self.device.startswith("cuda") else None)
        self.tokenizer = load_tokenizer(base_path, padding_side="left")
        self.model = load_student(base_path, adapter_path, dtype, self.device, merge=self.infer.merge_adapter)
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens, self.grammar = _constraint(self.infer, grammar, max_new_tokens)
        self.pass_tokens = self.infer.pass_tokens or self.infer.max_new_tokens
        if self.grammar is not None:
            from slimrec.student.constrain import StudentGrammar, word_budget

            context = getattr(self.model.config, "max_position_embeddings", None)
            if context and max_prompt_tokens + self.max_new_tokens > context:
                log.warning("the grammar's longest answer (%d tokens) + the prompt (%d) exceed the base model's "
                            "context (%d positions): an answer that long would run past it; lower "
                            "student.infer.step1_max_words / step2_max_words / word_max_chars / max_items",
                            self.max_new_tokens, max_prompt_tokens, context)
            vocab = int(self.model.get_output_embeddings().weight.shape[0])  # logits' last dim, (V,)
            self.grammar = StudentGrammar(grammar, self.tokenizer, vocab, words=word_budget(shape),
                                          threads=_threads(self.infer.torch_threads, self.infer.num_actors))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        t0 = time.perf_counter()
        n = len(batch)
        try:
            ids = [fit_prompt_ids(self.tokenizer, p, self.max_prompt_tokens) for p in batch["student_prompt"]]
            order = sorted(range(n), key=lambda i: len(ids[i]))  # similar lengths share a generate call
            res = generate_ids(self.model, self.tokenizer, [ids[i] for i in order], self.max_new_tokens,
                               self.infer.batch_size, self.infer.do_sample, self.infer.temperature,
                               self.infer.top_p, self.infer.seed, self.device, self.infer.repetition_penalty,
                               self.infer.kv_cache, grammar=self.grammar, pass_tokens=self.pass_tokens,
                               drop_ended=self.infer.drop_ended_rows)
            outs: list = [None] * n
            for i, r in zip(order, res, strict=True):
                outs[i] = r
            err = None
        except Exception as e:  # noqa: BLE001 - one bad batch becomes failed rows, not a dead run
            log.exception("student generation failed for a batch of %d", n)
            outs, err = [(None, "error", 0, None)] * n, f"failed: {type(e).__name__}: {e}"[:500]
        ms = (time.perf_counter() - t0) * 1000.0 / max(1, n)
        if self.device == "cpu":
            # the batch's parser states, cache and activations go back to the machine, not to glibc's arenas
            # (one actor: 1,194 -> 701 MB after two batches of 128 constrained dev prompts)
            release_free_heap()
        return _raw_frame(batch, outs, ms, err)


def _constraint(infer, grammar: str | None, max_new_tokens: int | None) -> tuple[int, str | None]:
    """(max_new_tokens, grammar or None) for an actor; constrained without a grammar is an error, not a fallback."""
    if not infer.constrained:
        return infer.max_new_tokens, None
    if not grammar or not max_new_tokens:
        raise ValueError("student.infer.constrained=true but the actor got no grammar and max_new_tokens "
                         "(built by the stage from the items table: slimrec.rationale_shape)")
    return int(max_new_tokens), grammar


# vLLM validates max_lora_rank against a fixed set (vllm/config/lora.py, ``MaxLoRARanks``).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that holds an adapter of rank ``rank``.

    vLLM rejects any other value (a rank-12 adapter needs ``max_lora_rank=16``).
    """
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]}); "
                     "use a smaller student.lora.r or infer.engine=transformers")


class VllmGenerator:
    """Ray Data actor for GPUs: ``vllm.LLM`` over the base with the adapter as a ``LoRARequest``.

    Prompts go in as token ids (the same :func:`fit_prompt_ids` as training),
    so BOS and truncation match what the adapter was trained on.
    """

    def __init__(self, base_path: str, adapter_path: str | None, infer, vllm_cfg, max_prompt_tokens: int,
                 lora_rank: int, grammar: str | None = None, max_new_tokens: int | None = None):
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import StructuredOutputsParams

        from slimrec.student.config import InferSettings, VllmSettings
        from slimrec.student.models import load_tokenizer, set_offline

        set_offline()
        self.infer = infer if isinstance(infer, InferSettings) else InferSettings.model_validate(infer)
        v = vllm_cfg if isinstance(vllm_cfg, VllmSettings) else VllmSettings.model_validate(vllm_cfg)
        self.tokenizer = load_tokenizer(base_path, padding_side="left")
        self.max_prompt_tokens = max_prompt_tokens
        max_new, grammar = _constraint(self.infer, grammar, max_new_tokens)
        engine: dict = {}
        if grammar is not None:
            # vLLM 0.32 (vllm/config/structured_outputs.py): the same xgrammar the CPU path uses
            engine["structured_outputs_config"] = {"backend": "xgrammar"}
        self.llm = LLM(
            **engine,
            model=base_path,
            tokenizer=base_path,
            enable_lora=adapter_path is not None,
            max_lora_rank=vllm_max_lora_rank(lora_rank),
            max_loras=1,
            tensor_parallel_size=v.tensor_parallel_size,
            max_model_len=v.max_model_len,
            gpu_memory_utilization=v.gpu_memory_utilization,
            dtype=v.dtype,
            max_num_seqs=v.max_num_seqs,
            enforce_eager=v.enforce_eager,
            seed=self.infer.seed,
        )
        self.params = SamplingParams(
            temperature=self.infer.temperature if self.infer.do_sample else 0.0,
            top_p=self.infer.top_p if self.infer.do_sample else 1.0,
            max_tokens=max_new,
            repetition_penalty=self.infer.repetition_penalty,
            seed=self.infer.seed if self.infer.do_sample else None,
            structured_outputs=StructuredOutputsParams(grammar=grammar) if grammar is not None else None,
        )
        self.lora = LoRARequest("student", 1, adapter_path) if adapter_path else None

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        t0 = time.perf_counter()
        n = len(batch)
        try:
            ids = [fit_prompt_ids(self.tokenizer, p, self.max_prompt_tokens) for p in batch["student_prompt"]]
            results = self.llm.generate([{"prompt_token_ids": x} for x in ids], self.params,
                                        lora_request=self.lora, use_tqdm=False)
            outs = []
            for r in results:
                o = r.outputs[0]
                finish = "stop" if o.finish_reason == "stop" else "length"
                outs.append((o.text, finish, len(o.token_ids), None))
            err = None
        except Exception as e:  # noqa: BLE001
            log.exception("vLLM generation failed for a batch of %d", n)
            outs, err = [(None, "error", 0, None)] * n, f"failed: {type(e).__name__}: {e}"[:500]
        ms = (time.perf_counter() - t0) * 1000.0 / max(1, n)
        return _raw_frame(batch, outs, ms, err)


def _raw_frame(batch: pd.DataFrame, outs: list, ms: float, err: str | None) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": batch["user_id"].to_numpy(),
            "prompt_hash": batch["prompt_hash"].to_numpy(),
            "rationale": [o[0] for o in outs],
            "finish_reason": [o[1] for o in outs],
            "output_tokens": [int(o[2]) for o in outs],
            "latency_ms": ms,
            "error": [err if err is not None else o[3] for o in outs],
        }
    )


def parse_outputs(raw: pd.DataFrame) -> pd.DataFrame:
    """Raw answers -> ``step1..3``, ``item_names`` (step-3 titles), ``status``, ``error``.

    ``finish_reason=error`` rows are ``failed`` with the batch's error;
    ``dead_end`` rows (the grammar could not go on) are ``parse_error`` with
    that reason; the rest go through :func:`parse_rationale` (``length`` ->
    ``truncated`` when step 3 was cut). Example:
    ``"Step 1: a\\nStep 2: b\\nStep 3: \\"Pen\\""``, stop -> ok, item_names ``["Pen"]``.
    """
    step1, step2, step3, names, status, error = [], [], [], [], [], []
    for text, finish, err in zip(raw["rationale"], raw["finish_reason"], raw["error"], strict=True):
        if finish == "error":
            p, e = None, err or "failed: generation error"
        elif finish == "dead_end":
            p, e = None, f"parse_error: {err or 'grammar dead end'}"
        else:
            p, e = parse_rationale(text, finish)
        step1.append(p.step1 if p else None)
        step2.append(p.step2 if p else None)
        step3.append(p.step3 if p else None)
        names.append(list(p.item_names) if p else [])
        status.append("failed" if finish == "error" else status_of(e))
        error.append(e)
    out = raw.copy()
    out["step1"], out["step2"], out["step3"] = step1, step2, step3
    out["item_names"], out["status"], out["error"] = names, status, error
    return out
