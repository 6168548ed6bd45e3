"""Teacher stage config (owned by the teacher module)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TeacherConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["offline", "http"] = Field("offline", description="offline: deterministic, no network; http: OpenAI-compatible endpoint")
    sample_size: int = Field(1500, description="users sent to the teacher per run (paper: 1,000-2,000)")
    seed: int = Field(0, description="seed of the stratified user sample")
