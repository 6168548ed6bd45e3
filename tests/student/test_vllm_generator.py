"""The vLLM engine's code path on CPU: ``VllmGenerator`` against a recording stand-in for ``vllm``.

vLLM itself needs a GPU (``tests/gpu`` runs the real thing there). What can be
checked here is everything this project does around it: the engine arguments
(``max_lora_rank`` from the set vLLM accepts), token-id prompts cut exactly as
in training, the adapter as a ``LoRARequest``, greedy sampling, finish
reasons and token counts, a failing batch turned into ``failed`` rows, and
the grammar passed through vLLM's structured outputs.
The stand-in mirrors the vLLM 0.32.0 API this code calls (``LLM(**engine_args)``
with ``structured_outputs_config``, ``LLM.generate(prompts, params,
lora_request=, use_tqdm=)``, ``SamplingParams`` with exactly the keyword
arguments of ``vllm/sampling_params.py``, ``StructuredOutputsParams`` with its
fields and its one-constraint check, ``LoRARequest(name, int_id, path)``,
outputs with ``outputs[0].text / token_ids / finish_reason``): a misspelt
parameter name is a ``TypeError`` here as it is in vLLM.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field, fields

import pandas as pd
import pytest
from slimrec.student.config import InferSettings, VllmSettings
from slimrec.student.data import fit_prompt_ids
from slimrec.student.generate import VLLM_LORA_RANKS, VllmGenerator, parse_outputs, vllm_max_lora_rank
from slimrec.student.models import load_tokenizer


@dataclass
class _Completion:
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class _RequestOutput:
    outputs: list[_Completion]


@dataclass
class _Recorder:
    engines: list[dict] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)
    fail: bool = False


# vllm 0.32.0, vllm/sampling_params.py: SamplingParams.from_optional's keyword arguments
SAMPLING_PARAMS_032 = frozenset(
    "n presence_penalty frequency_penalty repetition_penalty temperature watermarking top_p top_k min_p seed stop "
    "stop_token_ids bad_words thinking_token_budget include_stop_str_in_output ignore_eos max_tokens min_tokens "
    "logprobs prompt_logprobs prompt_logprob_token_ids prompt_logprob_start detokenize skip_special_tokens "
    "spaces_between_special_tokens output_kind stream_interval structured_outputs logit_bias allowed_token_ids "
    "extra_args skip_clone repetition_detection logprob_token_ids routed_experts_prompt_start "
    "trace_decode_token_ids".split())
# vllm/config/structured_outputs.py: StructuredOutputsConfig's fields and backends
STRUCTURED_OUTPUTS_CONFIG_032 = frozenset({"backend", "disable_any_whitespace", "disable_additional_properties",
                                           "reasoning_parser", "reasoning_parser_plugin", "enable_in_reasoning"})
BACKENDS_032 = ("auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer")


@dataclass
class StructuredOutputsParams:  # vllm/sampling_params.py, 0.32.0: the same fields and the one-constraint check
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self):
        kinds = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
        if sum(getattr(self, k) is not None for k in kinds) != 1:
            raise ValueError(f"exactly one structured-outputs constraint, got {self}")


@pytest.fixture
def fake_vllm(monkeypatch):
    rec = _Recorder()

    class SamplingParams:
        def __init__(self, **kw):
            unknown = set(kw) - SAMPLING_PARAMS_032
            if unknown:
                raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
            so = kw.get("structured_outputs")
            if so is not None and not isinstance(so, StructuredOutputsParams):
                raise TypeError(f"structured_outputs must be StructuredOutputsParams, got {type(so).__name__}")
            self.kw = kw

    class LoRARequest:
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    class LLM:
        def __init__(self, **kw):
            if kw.get("enable_lora") and kw["max_lora_rank"] not in VLLM_LORA_RANKS:  # what vLLM validates
                raise ValueError(f"max_lora_rank {kw['max_lora_rank']} not allowed")
            so = kw.get("structured_outputs_config") or {}
            if set(so) - STRUCTURED_OUTPUTS_CONFIG_032 or so.get("backend", "auto") not in BACKENDS_032:
                raise ValueError(f"bad structured_outputs_config {so}")
            rec.engines.append(kw)

        def generate(self, prompts, params, *, lora_request=None, use_tqdm=True):
            rec.calls.append({"prompts": prompts, "params": params, "lora": lora_request, "use_tqdm": use_tqdm})
            if rec.fail:
                raise RuntimeError("CUDA out of memory")
            out = []
            for i, p in enumerate(prompts):
                n = len(p["prompt_token_ids"])
                if i % 2 == 0:
                    out.append(_RequestOutput([_Completion(f'Step 1: a{n}\nStep 2: b\nStep 3: "Pen {n}".',
                                                           [1] * 7, "stop")]))
                else:
                    out.append(_RequestOutput([_Completion("Step 1: cut", [1] * 5, "length")]))
            return out

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.SamplingParams, sampling.StructuredOutputsParams = SamplingParams, StructuredOutputsParams
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    return rec


def test_max_lora_rank_is_one_vllm_accepts():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 12, 16, 17, 64, 300, 512)] == [1, 8, 8, 16, 16, 32, 64, 320, 512]
    with pytest.raises(ValueError, match="above the largest vLLM serves"):
        vllm_max_lora_rank(513)


def test_vllm_generator_sends_training_token_ids_and_the_adapter(fake_vllm, tiny_base):
    base, _, pairs = tiny_base
    infer = InferSettings(engine="vllm", max_new_tokens=33, constrained=False)
    gen = VllmGenerator(base, "/models/adapter", infer.model_dump(mode="json"),
                        VllmSettings().model_dump(mode="json"), max_prompt_tokens=40, lora_rank=12)
    (engine,) = fake_vllm.engines
    assert engine["model"] == base and engine["enable_lora"] is True
    assert engine["max_lora_rank"] == 16  # rank 12 served under the next rank vLLM accepts

    batch = pairs.head(5)[["user_id", "student_prompt"]].assign(prompt_hash=[f"h{i}" for i in range(5)])
    raw = gen(batch)

    (call,) = fake_vllm.calls
    tok = load_tokenizer(base, padding_side="left")
    assert [p["prompt_token_ids"] for p in call["prompts"]] == [
        fit_prompt_ids(tok, p, 40) for p in batch["student_prompt"]]  # same cut as training
    assert all(len(p["prompt_token_ids"]) <= 40 for p in call["prompts"])
    assert (call["lora"].lora_path, call["lora"].lora_int_id) == ("/models/adapter", 1)
    assert call["params"].kw["temperature"] == 0.0 and call["params"].kw["max_tokens"] == 33  # greedy
    assert call["params"].kw["structured_outputs"] is None  # constrained=false: no grammar
    assert "structured_outputs_config" not in engine
    assert call["use_tqdm"] is False
    assert raw["user_id"].tolist() == batch["user_id"].tolist()
    assert raw["prompt_hash"].tolist() == ["h0", "h1", "h2", "h3", "h4"]
    assert raw["finish_reason"].tolist() == ["stop", "length", "stop", "length", "stop"]
    assert raw["output_tokens"].tolist() == [7, 5, 7, 5, 7]
    parsed = parse_outputs(raw)
    assert parsed["status"].tolist()[:2] == ["ok", "truncated"]
    assert parsed["item_names"][0] == [f"Pen {len(call['prompts'][0]['prompt_token_ids'])}"]


def test_vllm_generator_without_adapter_and_a_failing_batch(fake_vllm, tiny_base):
    base, _, pairs = tiny_base
    gen = VllmGenerator(base, None, InferSettings(engine="vllm", constrained=False).model_dump(mode="json"),
                        VllmSettings().model_dump(mode="json"), max_prompt_tokens=64, lora_rank=16)
    assert fake_vllm.engines[0]["enable_lora"] is False
    fake_vllm.fail = True
    batch = pairs.head(3)[["user_id", "student_prompt"]].assign(prompt_hash="h")
    raw = gen(batch)
    assert fake_vllm.calls[0]["lora"] is None
    assert raw["finish_reason"].tolist() == ["error"] * 3
    assert raw["error"].str.contains("CUDA out of memory").all()
    assert set(parse_outputs(raw)["status"]) == {"failed"}
    assert isinstance(raw, pd.DataFrame) and len(raw) == 3


def test_stage_refuses_an_adapter_rank_vllm_cannot_serve_before_starting_actors():
    from slimrec.pipeline import StageError
    from slimrec.stages.student_rationales import _generator
    from slimrec.student.config import StudentConfig

    cfg = StudentConfig.model_validate({"infer": {"engine": "vllm", "constrained": False}})
    model = {"base_model": "/m/base", "adapter_path": "/m/adapter", "lora_config": '{"r": 600}'}
    with pytest.raises(StageError, match="LoRA rank 600 is above the largest vLLM serves"):
        _generator(cfg, model)
    cls, kwargs, resources = _generator(cfg, {**model, "lora_config": '{"r": 12}'})
    assert cls is VllmGenerator and kwargs["lora_rank"] == 12 and resources["num_gpus"] >= 1


def test_vllm_generator_sends_the_grammar_through_structured_outputs(fake_vllm, tiny_base):
    from slimrec.rationale_shape import RationaleShape, grammar_ebnf, max_new_tokens

    base, _, pairs = tiny_base
    titles = ["Pilot Gel Pen Set Black 100", "Mead Spiral Notebook Blue 101"]
    ebnf = grammar_ebnf(RationaleShape(max_items=2), titles)
    bound = max_new_tokens(RationaleShape(max_items=2), titles)
    gen = VllmGenerator(base, "/models/adapter", InferSettings(engine="vllm").model_dump(mode="json"),
                        VllmSettings().model_dump(mode="json"), max_prompt_tokens=40, lora_rank=16,
                        grammar=ebnf, max_new_tokens=bound)
    (engine,) = fake_vllm.engines
    assert engine["structured_outputs_config"] == {"backend": "xgrammar"}  # the engine the CPU path uses
    gen(pairs.head(2)[["user_id", "student_prompt"]].assign(prompt_hash="h"))
    params = fake_vllm.calls[0]["params"].kw
    assert params["structured_outputs"].grammar == ebnf
    assert params["max_tokens"] == bound  # derived from the grammar, not infer.max_new_tokens (200)
    assert {f.name for f in fields(params["structured_outputs"]) if getattr(params["structured_outputs"], f.name)
            not in (None, False)} == {"grammar"}


def test_constrained_vllm_generator_without_a_grammar_refuses_to_start(fake_vllm, tiny_base):
    base, _, _ = tiny_base
    with pytest.raises(ValueError, match="constrained=true but the actor got no grammar"):
        VllmGenerator(base, None, InferSettings(engine="vllm").model_dump(mode="json"),
                      VllmSettings().model_dump(mode="json"), max_prompt_tokens=40, lora_rank=16)
    assert fake_vllm.engines == []  # refused before an engine was built


def test_the_stand_in_rejects_a_misspelt_vllm_parameter(fake_vllm):
    import vllm
    from vllm.sampling_params import StructuredOutputsParams as SOP

    with pytest.raises(TypeError, match="guided_decoding"):
        vllm.SamplingParams(max_tokens=3, guided_decoding=SOP(grammar="root ::= \"a\""))  # the pre-0.11 name
    with pytest.raises(TypeError):
        SOP(ebnf="root ::= \"a\"")  # no such field
