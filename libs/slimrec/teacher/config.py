"""Teacher stage config (owned by the teacher module).

Secrets never live here: ``http.api_key_env`` names the environment variable
that holds the key; the key itself is read at send time and never logged,
stored or put in an error message.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelPrice(_Frozen):
    input_per_1m: float = Field(..., ge=0, description="USD per 1M input (prompt) tokens")
    output_per_1m: float = Field(..., ge=0, description="USD per 1M output (completion) tokens")


# List prices as published by the vendors when this table was written; check before trusting a cost figure.
_DEFAULT_PRICES = {
    "gpt-4o-mini": ModelPrice(input_per_1m=0.15, output_per_1m=0.60),
    "gpt-4o": ModelPrice(input_per_1m=2.50, output_per_1m=10.00),
    "gpt-4.1-mini": ModelPrice(input_per_1m=0.40, output_per_1m=1.60),
    "gpt-4.1": ModelPrice(input_per_1m=2.00, output_per_1m=8.00),
    "gpt-3.5-turbo": ModelPrice(input_per_1m=0.50, output_per_1m=1.50),
    "offline-cooc-v1": ModelPrice(input_per_1m=0.0, output_per_1m=0.0),
    "fake-teacher": ModelPrice(input_per_1m=1.0, output_per_1m=2.0),
}

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, precise shopping assistant. Answer in exactly three steps, each starting with "
    "'Step N:' on its own line. In Step 3 put every item title in double quotes."
)


class BatchApiConfig(_Frozen):
    """The OpenAI-compatible Batch API (``teacher.http.api=batch``): slimrec.teacher.batch_teacher."""

    price_factor: float = Field(
        0.5, gt=0, le=1,
        description="batch price = price_factor x the synchronous price in teacher.prices (OpenAI: 0.5, half "
        "price); used by the budget, the cost columns and the dry run",
    )
    completion_window: Literal["24h"] = Field("24h", description="completion_window of each batch (the API allows 24h)")
    max_requests_per_batch: int = Field(
        50_000, ge=1, description="request lines per batch file (OpenAI: at most 50,000 and 200 MB); more prompts: more batches"
    )
    poll_interval_s: float = Field(30.0, gt=0, description="first wait between two status polls of a batch, seconds")
    poll_backoff: float = Field(1.5, ge=1, description="each wait is the previous one times this, up to poll_max_interval_s")
    poll_max_interval_s: float = Field(300.0, gt=0, description="longest wait between two polls of a batch, seconds")
    max_wait_s: float = Field(
        90_000.0, gt=0,
        description="a run stops polling after this many seconds (default: the 24h window plus 1h); batches still "
        "running stay in teacher_batches and the next run resumes polling them instead of paying again",
    )
    retry_failed: Literal["chat", "batch", "none"] = Field(
        "chat",
        description="lines that come back failed (error file, a batch that ends failed, expired or cancelled): chat: "
        "sent again through the synchronous path (Ray actors) in the same run; batch: in a new batch; none: left "
        "failed (a later run retries them until teacher.max_attempts). Each failed row keeps its reason",
    )
    retry_rounds: int = Field(
        1, ge=0, description="new batches a run may create for lines that failed in its batches (retry_failed=batch)"
    )


class HttpTeacherConfig(_Frozen):
    api: Literal["chat", "batch"] = Field(
        "chat",
        description="chat: one synchronous POST /chat/completions per prompt; batch: the OpenAI-compatible Batch API "
        "(a JSONL file of requests, answered within the completion window at batch prices; see http.batch)",
    )
    base_url: str = Field(
        "https://api.openai.com/v1",
        description="OpenAI-compatible API root; POST {base_url}/chat/completions (OpenAI, a vLLM server, a gateway); "
        "api=batch also uses {base_url}/files and {base_url}/batches",
    )
    model: str = Field("gpt-4o-mini", description="model name sent to the endpoint; also the teacher_model column")
    temperature: float = Field(0.0, ge=0, le=2, description="sampling temperature (0: most reproducible)")
    max_tokens: int = Field(512, ge=16, description="max_tokens of each completion (finish_reason=length: truncated)")
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="system message sent before the teacher prompt")
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="name of the environment variable holding the API key; unset: no Authorization header (vLLM)",
    )
    requests_per_s: float = Field(5.0, gt=0, description="request rate limit over all workers, retries included")
    max_concurrency: int = Field(8, ge=1, description="requests in flight at once, over all workers")
    request_timeout_s: float = Field(60.0, gt=0, description="per-request timeout (connect + answer), seconds")
    max_retries: int = Field(4, ge=0, description="retries per prompt and run on 429, 408, 5xx, timeouts, drops, bad JSON")
    backoff_base_s: float = Field(0.5, gt=0, description="exponential backoff: base * 2**(attempt-1), with jitter")
    backoff_max_s: float = Field(30.0, gt=0, description="cap on one backoff wait, seconds")
    max_retry_after_s: float = Field(
        120.0, gt=0, description="a Retry-After longer than this is cut to this (the prompt still retries)"
    )
    num_workers: int = Field(1, ge=1, description="Ray actors sending requests; rate and concurrency are split among them")
    worker_num_cpus: float = Field(0.25, gt=0, description="CPUs each Ray actor asks for (fractional: I/O bound)")
    seed: int = Field(0, description="seed of the retry jitter")
    batch: BatchApiConfig = Field(default_factory=BatchApiConfig, description="the Batch API (api=batch)")


class OfflineTeacherConfig(_Frozen):
    model_name: str = Field("offline-cooc-v1", description="teacher_model written for offline rationales")
    window: int = Field(5, ge=1, description="a later item up to this many positions after an item counts as following it")
    recency_decay: float = Field(
        0.4, gt=0, le=1, description="weight of the k-th most recent prompt item is decay**k when scoring what follows"
    )
    n_items: int = Field(10, ge=1, le=20, description="specific items named in step 3")
    n_categories: int = Field(3, ge=1, description="categories named in steps 1 and 2")
    n_brands: int = Field(3, ge=1, description="brands named in steps 1 and 2")
    min_pair_count: int = Field(2, ge=1, description="category/brand transitions seen fewer times are ignored in step 2")
    max_title_chars: int = Field(100, ge=10, description="item titles are cut to this length inside the rationale")
    planted_precision: float | None = Field(
        None, ge=0, le=1,
        description="EXPERIMENT ONLY, LEAKS TARGETS: with this probability per user, step 3 also names the user's "
        "validation and test items (slimrec.teacher.planted; `slim experiment planted` sets it). None: off. "
        "The teacher_model becomes <model_name>+planted-p<p>, and reports flag its numbers as leakage",
    )
    planted_seed: int = Field(0, description="seed of the per-user planted draw (planted experiment only)")


class TeacherConfig(_Frozen):
    kind: Literal["offline", "http"] = Field(
        "offline", description="offline: deterministic, no network; http: OpenAI-compatible endpoint"
    )
    sample_size: int = Field(1500, ge=1, description="users sent to the teacher per run (paper: 1,000-2,000)")
    seed: int = Field(0, description="seed of the stratified user sample (a user's draw is stable across runs)")
    strata: int = Field(4, ge=1, description="history-length strata (quantile bins) the sample is drawn from")
    min_stratum_share: float = Field(
        0.1, ge=0, le=1, description="each stratum gets at least this share of the sample (short and long histories)"
    )
    max_attempts: int = Field(
        10, ge=1, description="requests per prompt over all runs; a non-ok prompt with this many is not sent again"
    )
    commit_batch_size: int = Field(200, ge=1, description="answers per Delta commit (a crash loses at most this many)")
    commit_interval_s: float = Field(10.0, gt=0, description="commit a partial batch after this many seconds")
    max_calls: int | None = Field(None, ge=0, description="stop after sending this many prompts in a run; None: no cap")
    max_tokens: int | None = Field(
        None, ge=0, description="stop before input+output tokens of the run exceed this; None: no cap"
    )
    max_cost_usd: float | None = Field(None, ge=0, description="stop before the run's cost exceeds this; None: no cap")
    est_output_tokens: int = Field(300, ge=1, description="expected output tokens per answer, for estimates")
    chars_per_token: float = Field(4.0, gt=0, description="characters per token, for estimates before usage is known")
    prices: dict[str, ModelPrice] = Field(
        default_factory=lambda: dict(_DEFAULT_PRICES), description="price table: teacher_model -> USD per 1M tokens"
    )
    http: HttpTeacherConfig = Field(default_factory=HttpTeacherConfig, description="HTTP teacher (kind=http)")
    offline: OfflineTeacherConfig = Field(
        default_factory=OfflineTeacherConfig, description="offline teacher (kind=offline)"
    )
    grounding_min_score: float = Field(
        88.0, ge=0, le=100, description="fuzzy title match score (rapidfuzz, 0-100) needed to ground a step-3 title"
    )
