"""A student base that is a plain Hugging Face folder (not the builtin): another architecture, its own tokenizer,
loaded with ``local_files_only``; distilled twice with one seed it gives the same adapter, bit for bit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from slimrec.stages import distill_student, student_rationales
from student_helpers import histories, items_frame, make_ctx, prompts_frame, small_student_config, write_lake

USERS = 24


def _save_qwen2(out: Path) -> Path:
    """A randomly initialised 2-layer Qwen2 and a BPE tokenizer trained on the catalogue, saved as HF files."""
    import torch
    from slimrec.student.tiny_model import train_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    items = items_frame()
    texts = [*prompts_frame(histories(USERS, seed=5), items)["student_prompt"], *items["title"]]
    tok = train_tokenizer(texts, vocab_size=400, min_frequency=1, model_max_length=512)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    return _save_qwen2(tmp_path_factory.mktemp("hf") / "qwen2-tiny")


def _distill(root: Path, base: Path, seed: int):
    from datetime import date

    from slimrec.lake import Lake

    lake = Lake(root / "lake")
    run_date = date(2024, 1, 15)
    hists = histories(USERS, seed=5)
    write_lake(lake, run_date, hists)
    # An untrained random base cannot be required to gain ROUGE-L: this test is about loading and decoding.
    scfg = small_student_config(models_dir=str(root / "models"), base_model=str(base), min_rouge_gain=None,
                                split_seed=seed, train={"epochs": 2, "min_steps": 0, "batch_size": 4,
                                                        "learning_rate": 1e-2, "torch_threads": 1,
                                                        "cpus_per_worker": 0.5})
    result = distill_student.run(make_ctx(lake, run_date, scfg))
    return lake, run_date, hists, scfg, result


@pytest.fixture(scope="module")
def distilled_hf(ray_local, hf_base, tmp_path_factory):
    return _distill(tmp_path_factory.mktemp("run_a"), hf_base, seed=3)


def test_a_hugging_face_folder_distills_and_writes_a_rationale_for_every_user(distilled_hf, hf_base):
    lake, run_date, hists, scfg, result = distilled_hf
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # loaded with local files only, never the network
    row = lake.read_pandas("student_models").iloc[0]
    assert Path(row["base_model"]) == hf_base.resolve() and json.loads(row["metrics"])["seed"] == 3
    assert json.loads((hf_base / "config.json").read_text())["model_type"] == "qwen2"
    out = student_rationales.run(make_ctx(lake, run_date, scfg))
    rows = lake.read_pandas("student_rationales")
    # a random base under the grammar: every rationale has the shape, every named title is a catalogue item
    assert out.extra["statuses"] == {"ok": USERS} and len(rows) == USERS and set(rows.user_id) == set(hists)
    assert all(set(ids) <= set(items_frame()["item_id"]) for ids in rows["grounded_item_ids"])
    assert (rows["output_tokens"] <= out.extra["max_new_tokens"]).all()


def test_the_same_inputs_and_seed_give_the_same_adapter(distilled_hf, hf_base, tmp_path_factory):
    from safetensors.torch import load_file

    lake_a = distilled_hf[0]
    lake_b, *_ = _distill(tmp_path_factory.mktemp("run_b"), hf_base, seed=3)
    lake_c, *_ = _distill(tmp_path_factory.mktemp("run_c"), hf_base, seed=4)
    a, b, c = (lake.read_pandas("student_models").iloc[0] for lake in (lake_a, lake_b, lake_c))
    assert a.model_version == b.model_version != c.model_version
    wa, wb, wc = (load_file(Path(r.adapter_path) / "adapter_model.safetensors") for r in (a, b, c))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)  # bit for bit
    assert any(not (wa[k] == wc[k]).all() for k in wa)  # another seed, another adapter


def test_a_missing_model_folder_is_a_readable_error(tmp_path):
    from slimrec.config import ConfigError
    from slimrec.stages.distill_student import resolve_base

    cfg = small_student_config(base_model=str(tmp_path / "no-such-model"))
    with pytest.raises(ConfigError, match="no such directory"):
        resolve_base(cfg, tmp_path, None, [], [])
