"""The teacher cache: what to send, and the rows to write for what came back.

``teacher_rationales`` is keyed by ``(prompt_hash, teacher_model)`` and kept
forever. A prompt is *done* when its row is ``ok`` (answered prompts are never
sent again) or when it has used ``max_attempts`` requests over all runs
without an ok answer; everything else in the sample is sent (an anti-join).
Attempts, tokens and cost add up over runs, so a row says what the prompt
cost in total.
"""

from __future__ import annotations

import pandas as pd

from slimrec.rationale import parse_rationale, status_of
from slimrec.teacher.budget import cost_usd, estimate_tokens, request_input_text
from slimrec.teacher.config import ModelPrice
from slimrec.teacher.grounding import TitleIndex

RUN_COLUMNS = ["run_input_tokens", "run_output_tokens", "run_cost_usd"]
CACHE_COLUMNS = ["prompt_hash", "teacher_model", "status", "attempts", "input_tokens", "output_tokens", "cost_usd"]


def plan_requests(sample: pd.DataFrame, cached: pd.DataFrame, max_attempts: int) -> tuple[pd.DataFrame, dict]:
    """Anti-join of the sampled prompts against the cache of one teacher_model.

    ``sample``: prompts rows (``prompt_hash``, ``user_id``, ...). ``cached``:
    ``CACHE_COLUMNS`` rows of that model. Returns (prompts to send, one row per
    prompt_hash under its smallest user_id; counts). Example: sample hashes {a, b, c, c},
    cache a=ok, b=failed with 10 attempts, max_attempts 10 -> send {c} once;
    counts ok=1, exhausted=1, duplicates=1.
    """
    # Identical prompts (same shown history) go out once, under the smallest user_id; sample order is kept.
    first_user = sample.groupby("prompt_hash")["user_id"].transform("min")
    uniq = sample[sample["user_id"] == first_user].drop_duplicates("prompt_hash", keep="first")
    counts = {"sampled": int(len(sample)), "duplicate_prompts": int(len(sample) - len(uniq))}
    if cached is None or cached.empty:
        counts.update(cached_ok=0, exhausted=0, retry=0)
        return uniq.reset_index(drop=True), counts
    c = cached.drop_duplicates("prompt_hash", keep="last").set_index("prompt_hash")
    st = uniq["prompt_hash"].map(c["status"])
    att = uniq["prompt_hash"].map(c["attempts"]).fillna(0)
    is_ok = st.eq("ok")
    exhausted = st.notna() & ~is_ok & (att >= max_attempts)
    retry = st.notna() & ~is_ok & ~exhausted
    counts.update(cached_ok=int(is_ok.sum()), exhausted=int(exhausted.sum()), retry=int(retry.sum()))
    return uniq[~(is_ok | exhausted)].reset_index(drop=True), counts


def to_table_rows(
    raw: list[dict],
    pending: pd.DataFrame,
    teacher_model: str,
    previous: pd.DataFrame | None,
    price: ModelPrice | None,
    titles: TitleIndex | None,
    min_score: float,
    chars_per_token: float,
    system_prompt: str | None = None,
) -> pd.DataFrame:
    """Raw teacher results -> ``teacher_rationales`` rows (without run_date/input_versions, filled by the lake).

    ``raw`` dicts: prompt_hash, content, finish_reason, error (transport
    failure, already redacted), attempts, input_tokens, output_tokens (None:
    estimated), latency_ms, answered_ts, optional grounded_item_ids, optional
    price_factor (the Batch API's discount on ``price``; default 1).
    ``pending``: the sent prompts (prompt_hash, user_id, prompt_version,
    teacher_prompt). ``previous``: cache rows of earlier runs, to add up
    attempts, tokens and cost. The ``RUN_COLUMNS`` hold this run's share.
    """
    meta = pending.drop_duplicates("prompt_hash").set_index("prompt_hash")
    prev = previous.drop_duplicates("prompt_hash", keep="last").set_index("prompt_hash") if previous is not None and len(previous) else None
    out = []
    to_ground: list[tuple[int, tuple[str, ...]]] = []
    for r in raw:
        h = r["prompt_hash"]
        m = meta.loc[h]
        text = r.get("content")
        row = {
            "prompt_hash": h,
            "teacher_model": teacher_model,
            "user_id": str(m["user_id"]),
            "prompt_version": str(m["prompt_version"]),
            "rationale": text if text else None,
            "step1": None,
            "step2": None,
            "step3": None,
            "grounded_item_ids": None,
            "finish_reason": r.get("finish_reason"),
            "latency_ms": r.get("latency_ms"),
            "answered_ts": r.get("answered_ts"),
        }
        n_in = n_out = 0
        if r.get("error") is not None:
            row["status"], row["error"] = "failed", r["error"]
        else:
            parsed, perr = parse_rationale(text, r.get("finish_reason"))
            row["status"], row["error"] = status_of(perr), perr
            if parsed is not None:
                row.update(step1=parsed.step1, step2=parsed.step2, step3=parsed.step3)
                if r.get("grounded_item_ids") is not None:
                    row["grounded_item_ids"] = [str(x) for x in r["grounded_item_ids"]]
                elif titles is not None:
                    to_ground.append((len(out), parsed.item_names))
            n_in = r.get("input_tokens")
            if n_in is None:
                n_in = estimate_tokens(request_input_text(m["teacher_prompt"], system_prompt), chars_per_token)
            n_out = r.get("output_tokens")
            if n_out is None:
                n_out = estimate_tokens(text, chars_per_token)
        c = cost_usd(price, n_in, n_out)
        if c is not None:
            c *= r.get("price_factor", 1.0)
        # This run's spend, for the stage's totals; dropped before the write.
        row.update(run_input_tokens=int(n_in), run_output_tokens=int(n_out), run_cost_usd=c or 0.0)
        attempts = int(r.get("attempts") or 0)
        if prev is not None and h in prev.index:
            p = prev.loc[h]
            attempts += int(p["attempts"] or 0)
            n_in += int(0 if pd.isna(p["input_tokens"]) else p["input_tokens"])
            n_out += int(0 if pd.isna(p["output_tokens"]) else p["output_tokens"])
            if c is not None and not pd.isna(p["cost_usd"]):
                c += float(p["cost_usd"])
        row.update(attempts=attempts, input_tokens=int(n_in), output_tokens=int(n_out), cost_usd=c)
        out.append(row)
    if to_ground:
        ids = titles.ground([names for _, names in to_ground], min_score)
        for (i, _), g in zip(to_ground, ids, strict=True):
            out[i]["grounded_item_ids"] = g
    cols = [
        "prompt_hash", "teacher_model", "user_id", "prompt_version", "rationale", "step1", "step2", "step3",
        "grounded_item_ids", "status", "error", "attempts", "input_tokens", "output_tokens", "cost_usd",
        "latency_ms", "finish_reason", "answered_ts", *RUN_COLUMNS,
    ]
    df = pd.DataFrame(out, columns=cols)
    df["answered_ts"] = pd.to_datetime(df["answered_ts"], utc=True)
    return df
