"""Money: token estimates, the dry-run estimate and the run's budget.

Before anything is sent the stage prints what the run would cost
(:func:`estimate`); while sending, :class:`Budget` reserves each prompt's
estimate before it goes out and settles it with the real usage when the answer
comes back, so the run stops *before* a cap would be crossed (by at most the
estimation error of the prompts in flight), and everything already answered is
kept.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field

import pandas as pd

from slimrec.teacher.config import ModelPrice, TeacherConfig

log = logging.getLogger(__name__)


def estimate_tokens(text: str | None, chars_per_token: float) -> int:
    """Rough token count of ``text`` (no tokenizer is needed or downloaded): ceil(chars / chars_per_token)."""
    return int(math.ceil(len(text or "") / chars_per_token))


def price_of(cfg: TeacherConfig, teacher_model: str) -> ModelPrice | None:
    return cfg.prices.get(teacher_model)


def cost_usd(price: ModelPrice | None, input_tokens: int, output_tokens: int) -> float | None:
    """USD for one call; None when the model has no price in the table."""
    if price is None:
        return None
    return (input_tokens * price.input_per_1m + output_tokens * price.output_per_1m) / 1e6


def request_input_text(teacher_prompt: str, system_prompt: str | None) -> str:
    return (system_prompt or "") + "\n" + teacher_prompt


def api_of(cfg: TeacherConfig) -> str:
    """How the run sends prompts: ``offline``, ``chat`` (synchronous HTTP) or ``batch`` (the Batch API)."""
    return "offline" if cfg.kind == "offline" else cfg.http.api


def price_factor(cfg: TeacherConfig, api: str) -> float:
    """Multiplier on the price table for ``api``: ``http.batch.price_factor`` for batch, 1 otherwise."""
    return cfg.http.batch.price_factor if api == "batch" else 1.0


def estimate(
    pending: pd.DataFrame, cfg: TeacherConfig, teacher_model: str, system_prompt: str | None, cached: int
) -> dict:
    """The dry-run estimate for the prompts that would be sent (``pending.teacher_prompt``).

    Returns calls, input_tokens, output_tokens, cost_usd (None without a price),
    cached (prompts the cache already answers) and, when a cap is set, how many
    of the calls fit within it (``calls_within_budget``), for the configured
    ``api``. An HTTP teacher's estimate also prices both ways of sending,
    ``modes: {chat: {cost_usd, calls_within_budget}, batch: {...}}`` (batch =
    ``http.batch.price_factor`` x chat), so a dry run shows what switching saves.
    """
    price = price_of(cfg, teacher_model)
    out_per = min(cfg.est_output_tokens, cfg.http.max_tokens) if cfg.kind == "http" else cfg.est_output_tokens
    ins = [estimate_tokens(request_input_text(p, system_prompt), cfg.chars_per_token) for p in pending["teacher_prompt"]]
    api = api_of(cfg)
    est = {
        "teacher_model": teacher_model,
        "api": api,
        "calls": len(ins),
        "input_tokens": int(sum(ins)),
        "output_tokens": int(out_per * len(ins)),
        "cost_usd": None,
        "cached": int(cached),
        "price_known": price is not None,
    }

    def priced(factor: float) -> dict:
        c = cost_usd(price, est["input_tokens"], est["output_tokens"])
        b = Budget.from_config(cfg, price)
        fits = 0
        for n_in in ins:
            if not b.try_reserve(n_in, out_per, factor):
                break
            fits += 1
        return {"cost_usd": None if c is None else round(c * factor, 6), "calls_within_budget": fits}

    est.update(priced(price_factor(cfg, api)))
    if cfg.kind == "http":
        est["modes"] = {m: priced(price_factor(cfg, m)) for m in ("chat", "batch")}
    return est


class BudgetExceeded(RuntimeError):
    pass


@dataclass
class Budget:
    """Caps of one run and what has been spent and reserved so far (thread-safe)."""

    max_calls: int | None = None
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    price: ModelPrice | None = None
    calls: int = 0
    tokens: int = 0
    cost: float = 0.0
    reserved_tokens: int = 0
    reserved_cost: float = 0.0
    stopped_by: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_config(cls, cfg: TeacherConfig, price: ModelPrice | None) -> Budget:
        if cfg.max_cost_usd is not None and price is None:
            raise BudgetExceeded("max_cost_usd is set but the teacher model has no entry in teacher.prices")
        return cls(cfg.max_calls, cfg.max_tokens, cfg.max_cost_usd, price)

    def try_reserve(self, est_input: int, est_output: int, factor: float = 1.0) -> bool:
        """Reserve one call's estimate; False (and ``stopped_by`` set) when it would cross a cap.

        ``factor`` scales the price table for this call (a Batch API call: ``http.batch.price_factor``).
        """
        est_cost = (cost_usd(self.price, est_input, est_output) or 0.0) * factor
        with self._lock:
            if self.max_calls is not None and self.calls + 1 > self.max_calls:
                self.stopped_by = self.stopped_by or "max_calls"
                return False
            if self.max_tokens is not None and self.tokens + self.reserved_tokens + est_input + est_output > self.max_tokens:
                self.stopped_by = self.stopped_by or "max_tokens"
                return False
            if self.max_cost_usd is not None and self.cost + self.reserved_cost + est_cost > self.max_cost_usd:
                self.stopped_by = self.stopped_by or "max_cost_usd"
                return False
            self.calls += 1
            self.reserved_tokens += est_input + est_output
            self.reserved_cost += est_cost
            return True

    def settle(self, est_input: int, est_output: int, input_tokens: int, output_tokens: int,
               factor: float = 1.0) -> None:
        """Swap a reservation for what the call really used (a reservation of 0, 0 only adds the use: an
        answer of a batch that an earlier, killed run paid for and this run collects)."""
        est_cost = (cost_usd(self.price, est_input, est_output) or 0.0) * factor
        real_cost = (cost_usd(self.price, input_tokens, output_tokens) or 0.0) * factor
        with self._lock:
            self.reserved_tokens -= est_input + est_output
            self.reserved_cost -= est_cost
            self.tokens += input_tokens + output_tokens
            self.cost += real_cost
