"""Quality gate config (owned by the quality module)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class QualityConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(True, description="run the expectation suite after every stage and stop on failure")
