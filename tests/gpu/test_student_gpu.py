"""Student on a GPU: LoRA training with bf16 autocast, then vLLM + LoRARequest inference (needs the gpu extra).

Run with ``bash tests/gpu/run_gpu_check.sh`` (or ``pytest -m gpu tests/gpu``) on a machine
with a CUDA GPU and ``pip install -e '.[gpu]'``. Skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import sys
from datetime import date
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "student"))  # the student tests' helpers

pytestmark = pytest.mark.gpu


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


needs_cuda = pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (pip install -e '.[gpu]')")


@pytest.fixture(scope="module")
def gpu_adapter(tmp_path_factory):
    """A tiny base and a LoRA adapter trained on the GPU (bf16 autocast), saved like the stage saves it."""
    from slimrec.student.data import encode_pair, fit_prompt_ids, split_by_user, training_pairs
    from slimrec.student.models import load_tokenizer
    from slimrec.student.tiny_model import build_corpus, ensure_tiny_model
    from slimrec.student.train import core_train
    from student_helpers import histories, items_frame, prompts_frame, small_student_config, teacher_frame

    items = items_frame()
    hists = histories(60, seed=1)
    prompts = prompts_frame(hists, items)
    teacher = teacher_frame(prompts, hists, items)
    # prompt (128) + the grammar's longest answer fit the tiny base's 512 positions (vLLM's max_model_len)
    cfg = small_student_config(train={"epochs": 10, "min_steps": 0, "batch_size": 4, "learning_rate": 1e-2,
                                      "precision": "bf16"}, max_prompt_tokens=128,
                               infer={"max_new_tokens": 120, "batch_size": 8, "num_actors": 1, "cpus_per_actor": 0.5,
                                      "torch_threads": 1, "write_batch_rows": 16, "step1_max_words": 12,
                                      "step2_max_words": 8, "word_max_chars": 10, "max_items": 2})
    root = tmp_path_factory.mktemp("gpu_models")
    corpus = build_corpus(items, prompts["student_prompt"].tolist(), teacher["rationale"].tolist(), cfg.tiny)
    base, _ = ensure_tiny_model(root, corpus, cfg.tiny)
    tok = load_tokenizer(base)
    train_df, held = split_by_user(training_pairs(teacher, prompts), 0.2, 0)

    def enc(df):
        return [encode_pair(tok, p, t, cfg.max_prompt_tokens, cfg.max_target_tokens)
                for p, t in zip(df["student_prompt"], df["rationale"], strict=True)]

    eval_set = {"prompt_ids": [fit_prompt_ids(tok, p, cfg.max_prompt_tokens) for p in held["student_prompt"]],
                "targets": held["rationale"].tolist(), "full": held["rationale"].tolist()}
    config = {"base_path": base, "train": enc(train_df), "val": enc(held), "eval_set": eval_set,
              "lora": cfg.lora.model_dump(), "train_cfg": cfg.train.model_dump(), "seed": 0,
              "max_new_tokens": cfg.infer.max_new_tokens, "eval_batch_size": 8}
    model, metrics = core_train(config, device="cuda:0")
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    return base, str(adapter), metrics, held, cfg


def _constraint(cfg):
    """The stage's grammar over the synthetic catalogue (bounds of ``cfg``: prompt + answer fit 512 tokens)."""
    from slimrec.stages.student_rationales import constraint
    from student_helpers import items_frame

    con = constraint(cfg, items_frame())
    assert cfg.max_prompt_tokens + con.max_new_tokens <= 512
    return con


@needs_cuda
def test_bf16_lora_training_on_gpu(gpu_adapter):
    _, _, metrics, _, _ = gpu_adapter
    print("GPU training metrics:", {k: v for k, v in metrics.items() if k not in ("history", "samples")})
    assert metrics["device"].startswith("cuda") and metrics["precision"] == "bfloat16"
    assert metrics["history"]["train_loss"][-1] < 0.7 * metrics["history"]["train_loss"][0]
    assert metrics["heldout_rouge_l_student"] > metrics["heldout_rouge_l_base"] + 0.1
    assert metrics["peak_gpu_mb"] > 0


@needs_cuda
@needs_vllm
def test_vllm_lora_generation_matches_transformers(gpu_adapter):
    import pandas as pd
    from slimrec.student.generate import TransformersGenerator, VllmGenerator, parse_outputs
    from slimrec.student.metrics import mean_overlap

    base, adapter, _, held, cfg = gpu_adapter
    batch = pd.DataFrame({"user_id": held["user_id"], "prompt_hash": held["prompt_hash"],
                          "student_prompt": held["student_prompt"]}).reset_index(drop=True)
    vcfg = {"max_model_len": 512, "gpu_memory_utilization": 0.3, "dtype": "bfloat16", "enforce_eager": True}
    con = _constraint(cfg)
    vllm_out = VllmGenerator(base, adapter, cfg.infer.model_dump(), vcfg, cfg.max_prompt_tokens, cfg.lora.r,
                             **con.actor_kwargs("vllm"))(batch)
    hf_out = TransformersGenerator(base, adapter, {**cfg.infer.model_dump(), "device": "cuda"},
                                   cfg.max_prompt_tokens, **con.actor_kwargs("transformers"))(batch)
    assert vllm_out["error"].isna().all(), vllm_out["error"].dropna().tolist()[:1]
    for out in (vllm_out, hf_out):  # the same grammar on both engines: every answer parses, none is cut
        assert parse_outputs(out)["status"].tolist() == ["ok"] * len(batch)
    agree = mean_overlap(vllm_out["rationale"].tolist(), hf_out["rationale"].tolist())
    teacher = mean_overlap(vllm_out["rationale"].tolist(), held["rationale"].tolist())
    statuses = parse_outputs(vllm_out)["status"].value_counts().to_dict()
    print(f"vLLM vs transformers ROUGE-L {agree['rouge_l']:.3f}; vLLM vs teacher {teacher['rouge_l']:.3f}; {statuses}")
    assert agree["rouge_l"] > 0.8  # same greedy decoding; bf16 kernels may flip a few tokens
    assert teacher["rouge_l"] > 0.3


@needs_cuda
@needs_vllm
def test_student_rationales_stage_with_vllm(gpu_adapter, ray_local, tmp_path):
    import json
    from datetime import UTC, datetime

    import pandas as pd
    from slimrec.lake import CommitInfo, Lake
    from slimrec.stages import student_rationales
    from student_helpers import histories, items_frame, make_ctx, prompts_frame

    base, adapter, _, _, cfg = gpu_adapter
    lake = Lake(tmp_path / "lake")
    run_date = date(2024, 1, 15)
    hists = histories(30, seed=5)
    info = CommitInfo("fixture", run_date)
    lake.write_arrow("items", items_frame(), "overwrite", info)
    lake.write_arrow("prompts", prompts_frame(hists, items_frame()), "replace_date", info)
    lake.write_arrow("student_models", pd.DataFrame([{
        "model_version": "student-gpu", "base_model": base, "adapter_path": adapter,
        "lora_config": json.dumps({"r": cfg.lora.r}), "train_rows": 1, "heldout_rows": 1, "train_loss": None,
        "val_loss": None, "heldout_rouge_l_student": None, "heldout_rouge_l_base": None, "metrics": "{}",
        "created_ts": datetime.now(tz=UTC)}]), "overwrite", info)
    scfg = cfg.model_copy(update={
        "infer": cfg.infer.model_copy(update={"engine": "vllm", "gpus_per_actor": 1.0, "batch_size": 16}),
        "vllm": cfg.vllm.model_copy(update={"max_model_len": 512, "gpu_memory_utilization": 0.3,
                                            "dtype": "bfloat16", "enforce_eager": True}),
    })
    r = student_rationales.run(make_ctx(lake, run_date, scfg))
    print("vLLM stage:", r.extra)
    rows = lake.read_pandas("student_rationales")
    assert r.rows_out == len(hists) == rows["user_id"].nunique()
    assert r.extra["constrained"] and r.extra["statuses"] == {"ok": len(hists)}  # vLLM's structured outputs
    assert student_rationales.run(make_ctx(lake, run_date, scfg)).rows_out == 0
