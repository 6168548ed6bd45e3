"""Real models, no Ray: the built base, prompt fitting, LoRA training moving the loss, save/reload, batching."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from slimrec.student.data import IGNORE_INDEX, encode_pair, fit_prompt_ids, split_by_user
from slimrec.student.generate import generate_ids
from slimrec.student.models import load_student, load_tokenizer
from slimrec.student.tiny_model import BUILD_INFO, ensure_tiny_model, model_dir_name
from student_helpers import small_student_config, small_tiny_config


def test_tiny_model_is_a_plain_hf_directory_and_is_reused(tiny_base, tmp_path):
    path, corpus, _ = tiny_base
    files = {p.name for p in Path(path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", BUILD_INFO} <= files
    info = json.loads((Path(path) / BUILD_INFO).read_text())
    assert info["warmup_loss_last"] < info["warmup_loss_first"]  # the warm-up learned something
    tok = load_tokenizer(path)
    ids = tok("Pilot Gel Pen Set Black 100 | Gel Pens | Pilot")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "Pilot Gel Pen Set Black 100 | Gel Pens | Pilot"
    mtime = os.path.getmtime(Path(path) / BUILD_INFO)
    again, _ = ensure_tiny_model(Path(path).parent, corpus, small_tiny_config())
    assert again == path and os.path.getmtime(Path(path) / BUILD_INFO) == mtime  # reused, not rebuilt
    other = {**corpus, "prompts": corpus["prompts"][:-1]}
    from slimrec.student.tiny_model import corpus_hash

    assert model_dir_name(small_tiny_config(), corpus_hash(other)) != Path(path).name
    assert model_dir_name(small_tiny_config(hidden_size=32), corpus_hash(corpus)) != Path(path).name


def test_fit_prompt_ids_drops_the_oldest_lines_first(tiny_base):
    path, _, _ = tiny_base
    tok = load_tokenizer(path)
    lines = [f"- Mead Spiral Notebook Blue {k} | Notebooks | Mead" for k in range(8)]
    prompt = "Purchase history (oldest first; title | category | brand):\n" + "\n".join(lines) + "\nStep 1 ...:\n"
    full = fit_prompt_ids(tok, prompt, 10_000)
    short = fit_prompt_ids(tok, prompt, len(full) - 5)
    assert len(short) <= len(full) - 5 and short[0] == tok.bos_token_id
    text = tok.decode(short, skip_special_tokens=True)
    assert text.startswith("Purchase history") and "Blue 7" in text and "Blue 0" not in text
    assert text.endswith("Step 1 ...:\n")
    tiny = fit_prompt_ids(tok, prompt, 6)  # not even one line fits: keep the last tokens after BOS
    assert len(tiny) == 6 and tiny[0] == tok.bos_token_id and tiny[1:] == full[-5:]


def test_encode_pair_masks_the_prompt(tiny_base):
    path, _, _ = tiny_base
    tok = load_tokenizer(path)
    ex = encode_pair(tok, "Purchase history:\n- a | b | c\n", "Step 1: x", 100, 100)
    n_prompt = len(fit_prompt_ids(tok, "Purchase history:\n- a | b | c\n", 100))
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tok.eos_token_id
    cut = encode_pair(tok, "p", "Step 1: a long answer that will be cut", 100, 3)
    assert len(cut["input_ids"]) - len(fit_prompt_ids(tok, "p", 100)) == 3 and cut["input_ids"][-1] != tok.eos_token_id


@pytest.fixture(scope="module")
def trained(tiny_base):
    """LoRA trained on ~48 synthetic pairs with the training loop Ray Train runs (here without Ray)."""
    from slimrec.student.train import core_train

    path, _, pairs = tiny_base
    cfg = small_student_config()
    tok = load_tokenizer(path)
    train_df, held = split_by_user(pairs, 0.2, 0)
    enc = lambda df: [encode_pair(tok, p, t, cfg.max_prompt_tokens, cfg.max_target_tokens)  # noqa: E731
                      for p, t in zip(df["student_prompt"], df["rationale"], strict=True)]
    eval_set = {"prompt_ids": [fit_prompt_ids(tok, p, cfg.max_prompt_tokens) for p in held["student_prompt"]],
                "targets": held["rationale"].tolist(), "full": held["rationale"].tolist()}
    config = {"base_path": path, "train": enc(train_df), "val": enc(held), "eval_set": eval_set,
              "lora": cfg.lora.model_dump(), "train_cfg": cfg.train.model_dump(), "seed": 0,
              "max_new_tokens": cfg.infer.max_new_tokens, "eval_batch_size": 8}
    reports = []
    model, metrics = core_train(config, report=lambda m, d: reports.append((m, d is not None)))
    return model, tok, metrics, reports, eval_set["prompt_ids"], path


def test_lora_training_moves_the_loss_and_beats_the_base(trained):
    model, _, metrics, reports, _, _ = trained
    hist = metrics["history"]
    assert len(reports) == 16 and all(has_ckpt for _, has_ckpt in reports)  # one checkpoint per epoch
    assert hist["train_loss"][-1] < 0.6 * hist["train_loss"][0]  # e.g. 5.7 -> 2.1
    assert hist["val_loss"][-1] < hist["val_loss"][0]
    assert metrics["trainable_params"] < 0.2 * metrics["total_params"]  # only the adapter trains
    assert metrics["heldout_rouge_l_student"] > metrics["heldout_rouge_l_base"] + 0.2
    assert metrics["heldout_parse_ok_rate_student"] > 0.5
    # it reads its prompt: its answers match their own users far better than other users'
    assert metrics["heldout_rouge_l_student"] > metrics["heldout_rouge_l_student_other_users"] + 0.05


def test_adapter_saves_and_reloads_to_identical_generations(trained, tmp_path):
    model, tok, _, _, prompts, path = trained
    model.eval()
    before = generate_ids(model, tok, prompts[:6], max_new_tokens=60, batch_size=6)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    reloaded = load_student(path, str(tmp_path / "adapter"), merge=False)
    assert generate_ids(reloaded, tok, prompts[:6], max_new_tokens=60, batch_size=6) == before
    merged = load_student(path, str(tmp_path / "adapter"), merge=True)
    same = sum(a == b for a, b in zip(generate_ids(merged, tok, prompts[:6], 60, 6), before, strict=True))
    assert same >= 5  # merging only changes float rounding


def test_batched_generation_matches_one_prompt_at_a_time(trained):
    model, tok, _, _, prompts, _ = trained
    batched = generate_ids(model, tok, prompts[:6], max_new_tokens=60, batch_size=6)
    single = generate_ids(model, tok, prompts[:6], max_new_tokens=60, batch_size=1)
    assert sum(a[0] == b[0] for a, b in zip(batched, single, strict=True)) >= 5  # left padding + mask: same text


def test_static_kv_cache_generates_the_tokens_of_the_dynamic_one(trained):
    """The default preallocated cache is a speed choice only: same tokens, finish reasons and counts."""
    model, tok, _, _, prompts, _ = trained
    model.eval()
    static = generate_ids(model, tok, prompts[:6], max_new_tokens=60, batch_size=3, kv_cache="static")
    dynamic = generate_ids(model, tok, prompts[:6], max_new_tokens=60, batch_size=3, kv_cache="dynamic")
    assert static == dynamic  # static: slimrec's greedy pass (rows that end leave); dynamic: transformers generate
    assert static == generate_ids(model, tok, prompts[:6], max_new_tokens=60, batch_size=3, kv_cache="static",
                                  drop_ended=False)
    assert any(n > 0 for _, _, n, _ in static)
    with pytest.raises(ValueError, match="cache_implementation"):  # the choice reaches transformers' generate
        generate_ids(model, tok, prompts[:1], max_new_tokens=4, batch_size=1, kv_cache="no-such-cache")
