"""Quality gate config (owned by the quality module).

Every threshold an expectation suite uses lives here (the suites themselves are
declared in ``schemas/expectations.py``). Thresholds that mirror a stage's own
limit (sequence length, prompt budget) default to ``None``: they then follow
that stage's setting when the gate is given the whole :class:`PipelineConfig`,
or that setting's default when it is given only this section.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

RATIONALE_STATUSES = ("ok", "parse_error", "empty", "truncated", "failed", "skipped_budget")


class QualityConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(True, description="run the expectation suite after every stage and stop on failure")
    min_seq_len: int | None = Field(
        None, ge=1, description="user_sequences.seq_len lower bound; None: sequences.min_seq_len"
    )
    max_seq_len: int | None = Field(
        None, ge=1, description="user_sequences.seq_len upper bound; None: sequences.max_seq_len"
    )
    max_prompt_chars: int | None = Field(
        None, ge=1, description="teacher and student prompts must be 1..N characters; None: prompts.max_chars"
    )
    max_rationale_chars: int = Field(
        20_000, ge=1, description="rationale text of a status=ok row must be 1..N characters"
    )
    min_three_step_share: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="share of status=ok rationale rows whose step1, step2 and step3 are all non-empty, at least",
    )
    rationale_statuses: tuple[str, ...] = Field(
        RATIONALE_STATUSES, description="allowed values of the status column of rationale tables"
    )
    rationale_sources: tuple[str, ...] = Field(
        ("teacher", "student"), description="allowed values of rationale_embeddings.source"
    )
    embedding_dims: dict[str, int] = Field(
        default_factory=lambda: {"all-MiniLM-L6-v2": 384},
        description="expected vector dimension per encoder, keyed by the encoder column's full value "
        "(all-MiniLM-L6-v2:st:norm:256) or its name before the first ':' (all-MiniLM-L6-v2); an encoder "
        "not listed must use one dimension throughout the slice (its most common one)",
    )
    metric_protocol_pattern: str = Field(
        r"^(full|sampled[0-9]+)$", description="regex the metrics.protocol values must match"
    )
    non_empty_tables: tuple[str, ...] = Field(
        ("raw_interactions", "items", "interactions", "user_sequences"),
        description="tables whose validated slice must hold at least one row",
    )
    max_listed_missing_ids: int = Field(
        10_000,
        ge=1,
        description="distinct dangling ids collected per reference check; rows are flagged for these only "
        "(the check fails either way; beyond this the unexpected count is a lower bound)",
    )
    offending_rows: int = Field(5, ge=1, le=100, description="offending rows shown per failed expectation")
    small_slice_rows: int = Field(
        200_000,
        ge=0,
        description="slices with at most this many rows are validated in one Spark partition "
        "(GE runs many small jobs; one task each is faster than many tiny ones)",
    )

    @field_validator("embedding_dims")
    @classmethod
    def _positive_dims(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: d for k, d in v.items() if d < 1}
        if bad:
            raise ValueError(f"embedding dimensions must be >= 1: {bad}")
        return v
