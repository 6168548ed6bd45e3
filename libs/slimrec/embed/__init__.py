"""Text embeddings of items and rationales (stage ``embed``).

* :mod:`.config` ``EmbedConfig``: encoder, pooling, normalisation, max length, dtype, Ray actor pool.
* :mod:`.encoder` ``resolve_encoder(cfg)`` (no weights loaded: path, kind, the id stored in the
  tables' ``encoder`` column) and ``load_encoder(spec).encode(texts)``.
* :mod:`.texts` pure pandas transforms: which rows changed, rationale texts (whole or steps), pooling.
* :mod:`.ray_encode` ``encode_texts``: the Ray Data actor pool.

Readers of ``item_embeddings`` / ``rationale_embeddings`` select the rows of
the configured encoder with :func:`encoder_id`.
"""

from __future__ import annotations

from slimrec.embed.config import EmbedConfig


def encoder_id(cfg: EmbedConfig) -> str:
    """The ``encoder`` column value that ``cfg`` writes, e.g. ``all-MiniLM-L6-v2:st:norm:256``."""
    from slimrec.embed.encoder import resolve_encoder

    return resolve_encoder(cfg).encoder_id


__all__ = ["EmbedConfig", "encoder_id"]
