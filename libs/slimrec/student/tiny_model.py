"""The offline base model: a small Llama the project builds itself from the lake's text.

No weights can be downloaded here, so ``base_model: builtin:tiny-llama``
builds one, once, and saves it as a normal Hugging Face model directory
(``config.json``, ``model.safetensors``, ``tokenizer.json``) that the same
``AutoModelForCausalLM`` / ``AutoTokenizer`` / PEFT / vLLM code loads as any
other local model:

1. a byte-level BPE tokenizer trained with ``tokenizers`` on catalogue text
   (item lines and descriptions), a seeded sample of the training pairs'
   student prompts and of their teacher rationales (so the teacher's
   template words are single tokens);
2. a ``LlamaConfig`` of ``tiny.*`` sizes, randomly initialised (seeded);
3. a short causal-LM warm-up on catalogue text and student prompts only,
   never on teacher rationales: the un-adapted base is the baseline the
   adapter must beat, so it must not have seen the answers. Documents are
   packed without EOS between them, so after a prompt the base writes
   catalogue-like text rather than stopping at once.

The directory is ``<models_dir>/tiny-llama-<version>-<hash>`` where the
hash covers the build config and the corpus, so the same inputs reuse the
same directory and a changed corpus builds a new one beside it. It is built
in a temporary folder and renamed into place (two builders never leave a
half-written model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import pandas as pd

from slimrec.prompts import item_line, sanitize_text
from slimrec.student.config import TinyModelConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
BUILD_INFO = "build_info.json"


def catalogue_lines(items: pd.DataFrame, max_title_chars: int = 120) -> list[str]:
    """One ``title | category path | brand`` line per item (the prompt's own item format), in item_id order."""
    items = items.sort_values("item_id")
    return [
        item_line(t, list(c) if c is not None else None, b, max_title_chars)
        for t, c, b in zip(items["title"], items["categories"], items["brand"], strict=True)
    ]


def _sample(texts: list[str], k: int, seed: int) -> list[str]:
    texts = sorted(texts)
    if len(texts) <= k:
        return texts
    return sorted(random.Random(seed).sample(texts, k))


def descriptions(items: pd.DataFrame, max_chars: int) -> list[str]:
    """Sanitised item descriptions (plain English about the products), cut to ``max_chars``, in item_id order."""
    if max_chars <= 0 or "description" not in items.columns:
        return []
    items = items.sort_values("item_id")
    return [d for d in (sanitize_text(x, max_chars) for x in items["description"]) if d]


def build_corpus(
    items: pd.DataFrame, prompts: list[str], rationales: list[str], cfg: TinyModelConfig
) -> dict[str, list[str]]:
    """``{"catalogue", "prompts", "rationales"}`` text lists, sampled and ordered deterministically.

    ``catalogue`` is one ``title | categories | brand`` line per item, then the
    item descriptions (``corpus_description_chars``).
    """
    return {
        "catalogue": catalogue_lines(items) + descriptions(items, cfg.corpus_description_chars),
        "prompts": _sample([p for p in prompts if p], cfg.corpus_max_prompts, cfg.seed),
        "rationales": _sample([r for r in rationales if r], cfg.corpus_max_rationales, cfg.seed + 1),
    }


def corpus_hash(corpus: dict[str, list[str]]) -> str:
    h = hashlib.sha1()
    for name in sorted(corpus):
        h.update(name.encode())
        for t in corpus[name]:
            h.update(b"\x1e" + t.encode())
    return h.hexdigest()


def model_dir_name(cfg: TinyModelConfig, corpus_sha: str) -> str:
    key = hashlib.sha1((json.dumps(cfg.model_dump(mode="json"), sort_keys=True) + corpus_sha).encode()).hexdigest()
    return f"tiny-llama-{cfg.version}-{key[:12]}"


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int, model_max_length: int):
    """Byte-level BPE (any text encodes, nothing is unknown) wrapped as a ``PreTrainedTokenizerFast`` adding BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _packed_blocks(tokenizer, docs: list[str], seq_len: int) -> list[list[int]]:
    """Documents as ``<s> doc`` back to back, cut into ``seq_len`` blocks (the last partial one dropped).

    No EOS between documents: after a prompt the base goes on writing catalogue
    text instead of stopping at once, so the un-adapted baseline says something.
    """
    flat: list[int] = []
    for x in tokenizer(docs, add_special_tokens=True)["input_ids"]:
        flat.extend(x)
    return [flat[i : i + seq_len] for i in range(0, len(flat) - seq_len + 1, seq_len)]


def warm_up(model, tokenizer, docs: list[str], cfg: TinyModelConfig) -> dict:
    """``cfg.warmup_steps`` AdamW steps of next-token loss on packed ``docs``; returns first/last loss and time."""
    import torch

    if cfg.warmup_steps == 0 or not docs:
        return {"warmup_steps": 0}
    blocks = _packed_blocks(tokenizer, docs, cfg.warmup_seq_len)
    if not blocks:
        return {"warmup_steps": 0}
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.9 * s / max(1, cfg.warmup_steps))
    model.train()
    order: list[int] = []
    losses = []
    t0 = time.perf_counter()
    for step in range(cfg.warmup_steps):
        if len(order) < cfg.warmup_batch_size:
            more = list(range(len(blocks)))
            rng.shuffle(more)
            order.extend(more)
        take, order = order[: cfg.warmup_batch_size], order[cfg.warmup_batch_size :]
        x = torch.tensor([blocks[i] for i in take], dtype=torch.long)  # (B, T)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            log.info("tiny-llama warm-up step %d/%d loss %.3f", step, cfg.warmup_steps, losses[-1])
    model.eval()
    return {
        "warmup_steps": cfg.warmup_steps,
        "warmup_blocks": len(blocks),
        "warmup_loss_first": losses[0],
        "warmup_loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "warmup_seconds": round(time.perf_counter() - t0, 2),
    }


def build_tiny_model(out_dir: str | Path, corpus: dict[str, list[str]], cfg: TinyModelConfig) -> dict:
    """Train the tokenizer, init the Llama, warm it up, save both to ``out_dir``; returns the build info."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    tok_texts = corpus["catalogue"] + corpus["prompts"] + corpus["rationales"]
    tokenizer = train_tokenizer(tok_texts, cfg.vocab_size, cfg.tokenizer_min_frequency, cfg.max_position_embeddings)
    mcfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.02,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny-llama: vocab %d, %d params; warm-up on %d catalogue lines + %d prompts",
             len(tokenizer), n_params, len(corpus["catalogue"]), len(corpus["prompts"]))
    stats = warm_up(model, tokenizer, corpus["catalogue"] + corpus["prompts"], cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "builder": f"slimrec tiny-llama {cfg.version}",
        "config": cfg.model_dump(mode="json"),
        "corpus_sha1": corpus_hash(corpus),
        "corpus_sizes": {k: len(v) for k, v in corpus.items()},
        "vocab_size": len(tokenizer),
        "n_params": n_params,
        "build_seconds": round(time.perf_counter() - t0, 2),
        **stats,
    }
    (out_dir / BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


def ensure_tiny_model(models_dir: str | Path, corpus: dict[str, list[str]], cfg: TinyModelConfig) -> tuple[str, dict]:
    """Path of the built model for (cfg, corpus), building it first when absent; and its build info."""
    models_dir = Path(models_dir)
    final = models_dir / model_dir_name(cfg, corpus_hash(corpus))
    if (final / BUILD_INFO).exists():
        log.info("tiny-llama: reusing %s", final)
        return str(final), json.loads((final / BUILD_INFO).read_text())
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = models_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("tiny-llama: building %s", final)
    info = build_tiny_model(tmp, corpus, cfg)
    try:
        os.replace(tmp, final)
    except OSError:  # another builder won the race: theirs is identical (same hash)
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final), info


def approx_params(cfg: TinyModelConfig) -> int:
    """Parameter count of the tiny Llama (tied embeddings), for estimates before it exists."""
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    return cfg.vocab_size * h + n * (4 * h * h + 3 * h * i + 2 * h) + h
