"""Student stage config (owned by the student module)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StudentConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str = Field("builtin:tiny-llama", description="local HF model dir, HF name (clusters) or builtin:tiny-llama")
