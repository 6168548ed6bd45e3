"""Encode texts on a Ray Data actor pool (one model per actor, loaded once, fractional CPUs), or in
this process when the input is small.

:func:`encode` is the stage's entry: ``texts -> (N, dim) float32`` in the order given, on the
actor pool (:func:`encode_texts`; Ray must be up) or, for fewer than ``embed.pool_min_texts`` texts,
in this process (:func:`encode_local`), which skips the pool's start. Both give the same vectors.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd

from slimrec.embed.config import EmbedConfig
from slimrec.embed.encoder import EncoderSpec

log = logging.getLogger(__name__)

BLOCKS_PER_ACTOR = 4  # at least this many blocks per actor: the longest-first order then balances the tail


class EncodeBatch:
    """Ray Data callable class: loads the encoder in ``__init__``, encodes a batch in ``__call__``.

    Batch in: ``row`` (int64), ``text`` (str). Batch out: ``row``, ``embedding`` (B, dim) float32.
    """

    def __init__(self, spec: dict, encode_batch_size: int, torch_threads: int):
        import torch

        from slimrec.embed.encoder import load_encoder

        # Ray sets OMP_NUM_THREADS from the actor's (fractional -> 1) CPU request; the config decides instead.
        torch.set_num_threads(torch_threads)
        self.encoder = load_encoder(EncoderSpec(**spec))
        self.encode_batch_size = encode_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vecs = self.encoder.encode([str(t) for t in batch["text"]], self.encode_batch_size)
        return {"row": batch["row"], "embedding": vecs}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def torch_threads(cfg: EmbedConfig) -> int:
    """Threads per actor: the config's, else this node's cores shared by the actors."""
    return cfg.torch_threads or max(1, _cores() // cfg.num_actors)


def block_size(n: int, cfg: EmbedConfig) -> int:
    """Texts per Ray Data block: ``cfg.block_rows`` at most, and small enough that every actor gets
    several blocks (:data:`BLOCKS_PER_ACTOR`), or one actor encodes a small input alone while the others
    wait (600 texts in one 1,024-row block ran on one of two actors).

    >>> block_size(600, EmbedConfig(num_actors=2, block_rows=1024)), block_size(10**6, EmbedConfig(block_rows=1024))
    (75, 1024)
    """
    return max(1, min(cfg.block_rows, -(-n // (cfg.num_actors * BLOCKS_PER_ACTOR))))


def engine_for(n: int, cfg: EmbedConfig) -> str:
    """``"pool"`` (Ray Data actors) or ``"local"`` (this process) for ``n`` texts. GPU actors
    (``actor_num_gpus``) always mean the pool: this process may have no GPU.

    >>> engine_for(3_000, EmbedConfig()), engine_for(60_000, EmbedConfig()), engine_for(5, EmbedConfig(pool_min_texts=0))
    ('local', 'pool', 'pool')
    >>> engine_for(5, EmbedConfig(actor_num_gpus=1, device="cuda"))
    'pool'
    """
    return "pool" if n >= cfg.pool_min_texts or cfg.actor_num_gpus > 0 else "local"


def _length_order(texts: list[str], cfg: EmbedConfig) -> np.ndarray:
    rows = np.arange(len(texts), dtype=np.int64)
    if cfg.sort_by_length:
        # Globally by length, longest first: each batch, and each forward pass inside it, holds similar
        # lengths (little padding), and the slowest blocks start first, so the pool does not end with
        # one actor encoding the longest texts while the other waits (the tail of an ascending order).
        rows = rows[np.argsort([-len(t) for t in texts], kind="stable")]
    return rows


def encode_local(texts: list[str], spec: EncoderSpec, cfg: EmbedConfig) -> np.ndarray:
    """(N,) texts -> (N, dim) float32 in this process: the model loaded here, torch on every core this
    process may use (or ``torch_threads`` x ``num_actors`` where set), released afterwards."""
    import torch

    from slimrec.embed.encoder import load_encoder

    if not texts:
        return np.zeros((0, 0), np.float32)
    threads = cfg.torch_threads * cfg.num_actors if cfg.torch_threads else _cores()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        encoder = load_encoder(spec)
        rows = _length_order(texts, cfg)
        log.info("embed: %d texts in this process, %d torch threads, encoder %s", len(texts), threads,
                 spec.encoder_id)
        out = np.empty((len(texts), encoder.dim), np.float32)
        step = max(cfg.batch_size, cfg.encode_batch_size)
        for i in range(0, len(rows), step):
            idx = rows[i : i + step]
            out[idx] = encoder.encode([texts[j] for j in idx], cfg.encode_batch_size)
        del encoder
    finally:
        torch.set_num_threads(before)
    return out


def encode(texts: list[str], spec: EncoderSpec, cfg: EmbedConfig, start_ray=None) -> tuple[np.ndarray, str]:
    """(vectors, engine): :func:`encode_texts` on the actor pool or :func:`encode_local`, by
    :func:`engine_for`; ``start_ray`` is called before the pool is used (the stage's ``ctx.ray``)."""
    engine = engine_for(len(texts), cfg)
    if engine == "local":
        return encode_local(texts, spec, cfg), engine
    if start_ray is not None:
        start_ray()
    return encode_texts(texts, spec, cfg), engine


def encode_texts(texts: list[str], spec: EncoderSpec, cfg: EmbedConfig) -> np.ndarray:
    """(N,) texts -> (N, dim) float32 vectors, in input order, computed by the actor pool."""
    import ray

    n = len(texts)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    rows = _length_order(texts, cfg)
    frame = pd.DataFrame({"row": rows, "text": [texts[i] for i in rows]})
    per_block = block_size(n, cfg)
    blocks = [frame.iloc[i : i + per_block] for i in range(0, n, per_block)]
    threads = torch_threads(cfg)
    log.info(
        "embed: %d texts in %d blocks on %d actor(s) x %.2g CPU, %d torch threads each, encoder %s",
        n, len(blocks), cfg.num_actors, cfg.actor_num_cpus, threads, spec.encoder_id,
    )
    ds = ray.data.from_pandas(blocks).map_batches(
        EncodeBatch,
        fn_constructor_kwargs={
            "spec": spec.as_dict(),
            "encode_batch_size": cfg.encode_batch_size,
            "torch_threads": threads,
        },
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.actor_num_cpus,
        num_gpus=cfg.actor_num_gpus or None,
        batch_size=cfg.batch_size,
        batch_format="numpy",
    )
    out: np.ndarray | None = None
    seen = 0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        vecs = np.asarray(batch["embedding"], dtype=np.float32)  # (B, dim)
        if out is None:
            out = np.empty((n, vecs.shape[1]), np.float32)
        out[batch["row"]] = vecs
        seen += len(vecs)
    if seen != n:
        raise RuntimeError(f"embed: the actor pool returned {seen} vectors for {n} texts")
    return out
