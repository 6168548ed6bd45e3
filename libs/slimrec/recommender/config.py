"""Recommender stage config (owned by the recommender module)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RecommenderConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    backbones: list[str] = Field(default_factory=lambda: ["sasrec"], description="sasrec | gru4rec | srgnn")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="one training run per seed")
