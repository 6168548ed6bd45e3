"""Student stage config (owned by the student module): distill_student and student_rationales.

Four groups: the builtin small base model (``tiny``), the training pairs and
LoRA (``lora``, ``train``), the held-out quality check, and inference
(``infer``, with its ``vllm`` engine settings). Defaults are the ``dev``
profile on two CPU cores; the comments on each field say what it trades.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

BUILTIN_TINY = "builtin:tiny-llama"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TinyModelConfig(_Frozen):
    """The offline base model the project builds itself (``base_model: builtin:tiny-llama``).

    Every field is part of the hash that names its directory: change one and a
    new base is built next to the old one; keep them and the base is reused.
    """

    version: str = Field("v1", description="builder version; part of the directory name tiny-llama-<version>-<hash>")
    vocab_size: int = Field(4096, ge=300, description="BPE vocabulary (byte-level) trained on the corpus with `tokenizers`")
    tokenizer_min_frequency: int = Field(2, ge=1, description="pairs seen fewer times are not merged by the BPE trainer")
    hidden_size: int = Field(192, ge=16, description="Llama hidden size")
    intermediate_size: int = Field(512, ge=16, description="Llama MLP inner size")
    num_layers: int = Field(4, ge=1, description="Llama decoder layers")
    num_heads: int = Field(3, ge=1, description="attention heads (head dim = hidden_size / num_heads; 64 suits vLLM kernels)")
    max_position_embeddings: int = Field(
        4096, ge=64, description="longest prompt + answer the model takes, tokens: holds the prompt and the "
        "grammar's byte-safe bound of a constrained answer (dev: 160 + 2,857); rotary positions, so no weights grow")
    corpus_description_chars: int = Field(
        300, ge=0, description="item descriptions, cut to this many characters, join the catalogue text (0: none)"
    )
    corpus_max_prompts: int = Field(
        5000, ge=0, description="student prompts (a seeded sample) added to the tokenizer corpus and the warm-up"
    )
    corpus_max_rationales: int = Field(
        2000,
        ge=0,
        description="ok teacher rationales (a seeded sample) added to the tokenizer corpus only, never to the "
        "warm-up: the un-adapted base must not have seen the teacher's answers",
    )
    warmup_steps: int = Field(
        600, ge=0, description="causal-LM steps on catalogue text and student prompts (dev data: 120 steps of 16 left the "
        "student at held-out val loss 3.61 and 0% parseable answers; 600 of 8, 55 s more: 2.13 and 62%)")
    warmup_seq_len: int = Field(128, ge=16, description="tokens per warm-up sequence (documents packed back to back)")
    warmup_batch_size: int = Field(8, ge=1, description="sequences per warm-up step")
    warmup_lr: float = Field(2e-3, gt=0, description="AdamW learning rate of the warm-up (linear decay to 10%)")
    seed: int = Field(0, description="seed of the weights' init, the corpus samples and the warm-up order")


class LoraSettings(_Frozen):
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA branch")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        description="module names that get adapters (Llama names; every linear layer by default)",
    )


class TrainSettings(_Frozen):
    epochs: int = Field(2, ge=1, description="passes over the training pairs")
    min_steps: int = Field(
        150,
        ge=0,
        description="optimizer steps at least: a small pair set (tiny profiles) gets more epochs than `epochs` so "
        "the adapter still learns; 0: exactly `epochs`",
    )
    batch_size: int = Field(16, ge=1, description="pairs per micro-batch per worker")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    learning_rate: float = Field(5e-3, gt=0, description="AdamW peak learning rate (LoRA weights only)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of optimizer steps with linear LR warm-up; then linear decay to 0")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 on GPUs that support it, else fp16 (loss scaling); the frozen base is held in that "
        "dtype under autocast, the adapter in fp32. fp32 (always on CPU) keeps everything in fp32",
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP when > 1)")
    use_gpu: bool = Field(False, description="one GPU per Ray Train worker")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs each training worker reserves")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per worker; None: the node's cores / num_workers"
    )
    length_group_size: int = Field(
        32, ge=1, description="batches drawn as a pool sorted by length so a batch pads little (1: no grouping)"
    )
    checkpoints_to_keep: int = Field(2, ge=1, description="per-epoch adapter checkpoints Ray Train keeps")


class InferSettings(_Frozen):
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: CPU/GPU actors with HF generate; vllm: GPU actors with vllm.LLM + LoRA"
    )
    constrained: bool = Field(
        True,
        description="grammar-constrained decoding (xgrammar; vLLM's structured outputs): every answer has the "
        "three steps of slimrec.rationale_shape and step 3 names only catalogue titles. Needs xgrammar: the stage "
        "fails with the reason when it cannot load, it never decodes unconstrained instead",
    )
    max_new_tokens: int = Field(
        200, ge=1, description="unconstrained only: generated tokens per rationale at most (beyond: status truncated). "
        "Constrained, it is derived from the grammar's bounds (its longest rationale in bytes + the end token)")
    pass_tokens: int | None = Field(
        None, ge=1, description="constrained, transformers: decode in passes of this many tokens; rows that end leave "
        "and the rest continue, grammar state and all, until the grammar's bound. The bound is byte-safe and far above "
        "real lengths (dev: 2,857 tokens, none over 200 in practice), and one pass would size the static KV cache and every "
        "batch's steps by it. None: max_new_tokens")
    step1_max_words: int = Field(64, ge=1, description="constrained: step 1's body, words at most (offline teacher on "
                                 "the bundled data: 43 median, 59 at most)")
    step2_max_words: int = Field(40, ge=1, description="constrained: step 2's body, words at most (offline teacher on "
                                 "the bundled data: 25 median, 34 at most)")
    word_max_chars: int = Field(24, ge=1, description="constrained: characters of one word of steps 1 and 2 at most "
                                "(words are printable ASCII between single spaces; offline teacher on the bundled "
                                "data: 99% of steps have no word over 19). Bounds in words, not characters per step: "
                                "xgrammar masks a long bounded run of characters token by token at every step")
    max_items: int | None = Field(
        None, ge=1, description="constrained: step-3 titles at most; None: student.max_target_items (what it was "
        "trained to write), or 10 when that is None too")
    title_max_chars: int = Field(
        100, ge=10, description="constrained: catalogue titles are cut to this length in step-3 slots, as the offline "
        "teacher cuts them (teacher.offline.max_title_chars)")
    kv_cache: Literal["static", "dynamic"] = Field(
        "static",
        description="transformers generate's KV cache: static (preallocated for prompt + max_new_tokens) or dynamic "
        "(grown by concatenation every step). Same greedy tokens up to float rounding; static made the dev "
        "student_rationales stage 1.3x faster on CPU",
    )
    drop_ended_rows: bool = Field(
        True, description="greedy decoding with the static cache: rows that wrote their end token leave the batch "
        "(and their KV cache rows), instead of generate computing padding for them until the batch's longest answer "
        "ends; false: transformers generate")
    do_sample: bool = Field(False, description="false: greedy decoding (reproducible)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature when do_sample")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling when do_sample")
    seed: int = Field(0, description="sampling seed when do_sample")
    repetition_penalty: float = Field(
        1.0, gt=0, description="HF/vLLM repetition penalty (1.0: none); >1 curbs the loops small students fall into"
    )
    batch_size: int = Field(128, ge=1, description="prompts per generate call (padded left, sorted by length)")
    num_actors: int = Field(2, ge=1, description="model actors in the Ray Data actor pool (one model each)")
    cpus_per_actor: float = Field(
        0.5, gt=0, description="Ray CPUs each actor reserves; fractional so Ray Data cannot deadlock on small machines"
    )
    gpus_per_actor: float = Field(0.0, ge=0, description="Ray GPUs each actor reserves (vllm: tensor_parallel_size)")
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per actor; None: the node's cores / num_actors (set it on clusters)"
    )
    device: str = Field("auto", description="torch device of transformers actors: auto (cuda when there), cpu, cuda")
    merge_adapter: bool = Field(
        True, description="merge LoRA into the base weights after loading (faster; same greedy text up to float rounding)"
    )
    write_batch_rows: int = Field(1000, ge=1, description="rows per Delta MERGE (a crash loses at most this many)")
    retry_failed: bool = Field(
        True, description="rerun users whose last row for this prompt and model has status failed (exceptions)"
    )
    grounding_min_score: float = Field(
        88.0, ge=0, le=100, description="unconstrained only: fuzzy title match score (rapidfuzz, 0-100) to ground a "
        "step-3 title; constrained titles ground exactly"
    )


class VllmSettings(_Frozen):
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one vLLM engine spans")
    max_model_len: int = Field(4096, ge=64, description="prompt + answer tokens vLLM reserves KV cache for: at least "
                               "student.max_prompt_tokens + the grammar's token bound (dev: 160 + 2,857), checked "
                               "before any actor starts")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="share of GPU memory vLLM may take")
    dtype: str = Field("auto", description="vLLM weights dtype: auto, bfloat16, float16")
    max_num_seqs: int = Field(256, ge=1, description="sequences vLLM batches at once")
    enforce_eager: bool = Field(False, description="disable CUDA graphs (faster start, slower decode)")


class StudentConfig(_Frozen):
    # ---------------------------------------------------------------- base model
    base_model: str = Field(
        BUILTIN_TINY,
        description="builtin:tiny-llama (built here, offline), a local HF model directory, or a HF name that "
        "resolves from the local cache on clusters (e.g. meta-llama/Llama-2-7b-hf); never downloaded",
    )
    models_dir: str | None = Field(
        None, description="folder for built bases, adapters and Ray Train runs; None: <lake root>/_models"
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="builtin base model (base_model=builtin:...)")
    # ---------------------------------------------------------------- training pairs
    teacher_model: str | None = Field(
        None,
        description="train on this teacher_model's rationales only; None: every teacher's ok rows except a "
        "planted-signal experiment's",
    )
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="users held out (seeded hash of user_id) for val loss and quality")
    split_seed: int = Field(0, description="seed of the train / held-out split by user")
    max_train_pairs: int | None = Field(None, ge=1, description="cap on training pairs (seeded sample); None: all")
    max_prompt_tokens: int = Field(
        160, ge=16, description="student prompt tokens at most: the oldest history lines are dropped first (train and infer)"
    )
    max_target_items: int | None = Field(
        2,
        ge=1,
        description="step 3 of a teacher rationale is cut after this many quoted items before training (the "
        "teacher ranks best first); None: whole rationale. Keeps generation short on CPUs",
    )
    max_target_tokens: int = Field(200, ge=8, description="rationale tokens trained on at most (longer: cut, no end token)")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter (PEFT)")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Ray Train TorchTrainer job")
    # ---------------------------------------------------------------- quality on held-out users
    eval_max_users: int = Field(64, ge=1, description="held-out users whose rationales are generated for the quality check")
    eval_batch_size: int = Field(32, ge=1, description="prompts per generate call in the quality check")
    min_rouge_gain: float | None = Field(
        0.1,
        description="the stage fails (nothing registered) unless student ROUGE-L minus base ROUGE-L on held-out "
        "users is at least this; None: register whatever it measures",
    )
    skip_if_registered: bool = Field(
        True, description="a model_version already in student_models (same data, base and config) is not retrained"
    )
    # ---------------------------------------------------------------- inference
    model_version: str = Field("latest", description="adapter used by student_rationales: latest (newest registered) or a model_version")
    infer: InferSettings = Field(default_factory=InferSettings, description="student_rationales inference")
    vllm: VllmSettings = Field(default_factory=VllmSettings, description="vLLM engine (infer.engine=vllm, GPUs)")


def rationale_shape(cfg: StudentConfig):
    """The :class:`~slimrec.rationale_shape.RationaleShape` the student's decoding is constrained to."""
    from slimrec.rationale_shape import RationaleShape

    items = cfg.infer.max_items or cfg.max_target_items or 10
    return RationaleShape(step1_max_words=cfg.infer.step1_max_words, step2_max_words=cfg.infer.step2_max_words,
                          word_max_chars=cfg.infer.word_max_chars, max_items=items)
