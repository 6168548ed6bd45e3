"""Stage teacher_rationales: prompts (+ items, user_sequences) -> teacher_rationales, cached and budgeted.

1. Population: the latest prompt of each user dated on or before the run date
   (``build_prompts`` writes only changed users per date), current template.
2. Sample: ``teacher.sample_size`` users, stratified by history length,
   reproducible by ``teacher.seed`` and stable across runs.
3. Anti-join against ``teacher_rationales`` for this teacher_model: only
   prompts without an ok answer and with fewer than ``max_attempts`` requests
   so far are sent; identical prompts of two users are sent once.
4. Dry-run estimate (calls, tokens, cost; an HTTP teacher's priced both
   synchronously and through the Batch API) logged and returned in ``extra``;
   with ``ctx.dry_run`` nothing is sent or written. Prompts inside a batch an
   earlier run created (``teacher_batches``) are paid already: not priced.
5. Send (offline teacher, the HTTP teacher's Ray actors, or the Batch API:
   ``teacher.http.api=batch``, :mod:`slimrec.teacher.batch_teacher`) under the
   run's budget; every ``commit_batch_size`` answers (or ``commit_interval_s``)
   are MERGEd on (prompt_hash, teacher_model): a crash loses at most the batch
   in flight, a rerun resumes (and polls the Batch API batches it left open,
   never creating them again), and a retried prompt's failed row is replaced.

``extra``: calls, input_tokens, output_tokens, cost_usd (this run; estimates
in a dry run), requests, statuses, cache counts and the estimate. The API key
is read from the environment variable ``teacher.http.api_key_env`` at send
time; only the variable's name is ever logged.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter

import pandas as pd
from pydantic import SecretStr

from slimrec.stages.base import StageContext, StageResult, delete_rows_naming_unknown_items
from slimrec.teacher.budget import Budget, api_of, estimate, price_of
from slimrec.teacher.cache import CACHE_COLUMNS, RUN_COLUMNS, plan_requests, to_table_rows
from slimrec.teacher.config import TeacherConfig
from slimrec.teacher.planted import LEAKAGE_NOTE, per_user_keys, planted_model_name, planted_targets
from slimrec.teacher.sampling import stratified_sample

log = logging.getLogger(__name__)

STAGE = "teacher_rationales"
# teacher_rationales is an input too: the anti-join reads it, and a run that left prompts to retry
# must not look "unchanged" to the pipeline's skip check; so is teacher_batches (Batch API state), so that
# a run that left batches running is run again to collect them.
INPUTS = ["prompts", "items", "user_sequences", "teacher_rationales", "teacher_batches"]
OUTPUTS = ["teacher_rationales"]
PROMPT_COLUMNS = ["user_id", "run_date", "teacher_prompt", "prompt_version", "prompt_hash", "history_len", "prompt_item_ids"]


def teacher_model_of(cfg: TeacherConfig) -> str:
    """The ``teacher_model`` column of this config's answers (a planted experiment's carries ``+planted-p<p>``)."""
    if cfg.kind == "offline":
        p = cfg.offline.planted_precision
        return cfg.offline.model_name if p is None else planted_model_name(cfg.offline.model_name, p)
    return cfg.http.model


def _with_planted(ctx: StageContext, cfg: TeacherConfig, pending: pd.DataFrame, inputs: dict) -> pd.DataFrame:
    """``pending`` plus ``planted_item_ids`` (planted experiment only: the users' held-out targets)."""
    p = cfg.offline.planted_precision
    log.warning("teacher: PLANTED-SIGNAL EXPERIMENT (precision %g): rationales name held-out targets; %s", p,
                LEAKAGE_NOTE)
    seqs = ctx.lake.read_pandas("user_sequences", version=inputs["user_sequences"],
                                columns=["user_id", "valid_target", "test_target"])
    planted = planted_targets(seqs, p, cfg.offline.planted_seed)
    out = pending.merge(planted, on="user_id", how="left")
    out["planted_item_ids"] = [x if isinstance(x, list) else [] for x in out["planted_item_ids"]]
    log.info("teacher: planted %d of %d prompts", int(out["planted_item_ids"].map(len).gt(0).sum()), len(out))
    return out


def _usd(x: float | None) -> str:
    return "unknown (no price)" if x is None else f"{x:.4f}"


def latest_prompts(prompts: pd.DataFrame, run_date, prompt_version: str | None) -> pd.DataFrame:
    """Latest prompt per user dated on or before ``run_date`` (template ``prompt_version`` when given).

    Example: u1 has prompts on 01-10 and 01-15, u2 on 01-12; run_date 01-14 -> u1@01-10, u2@01-12.
    """
    p = prompts[pd.to_datetime(prompts["run_date"]) <= pd.Timestamp(run_date)]
    if prompt_version is not None:
        p = p[p["prompt_version"] == prompt_version]
    return p.sort_values(["user_id", "run_date"]).drop_duplicates("user_id", keep="last").reset_index(drop=True)


def api_key(cfg: TeacherConfig) -> SecretStr | None:
    """The key from ``$<api_key_env>``, wrapped so its repr is ``**********``; None when unset."""
    value = os.environ.get(cfg.http.api_key_env)
    log.info("teacher: API key variable %s is %s", cfg.http.api_key_env, "set" if value else "not set")
    return SecretStr(value) if value else None


def _read_cache(ctx: StageContext, version: int | None, teacher_model: str) -> pd.DataFrame:
    if version is None:
        return pd.DataFrame(columns=CACHE_COLUMNS)
    return ctx.lake.read_pandas(STAGE, version=version, columns=CACHE_COLUMNS, filters=[("teacher_model", "=", teacher_model)])


def _batch_store(ctx: StageContext, inputs: dict, teacher_model: str):
    """The Batch API's state table (``teacher_batches``), written with this stage's lineage."""
    from slimrec.teacher.batch_teacher import TABLE, BatchStore

    return BatchStore(ctx.lake, lambda: ctx.commit_info(STAGE, inputs, teacher_model=teacher_model, table=TABLE))


def _build_teacher(ctx: StageContext, cfg: TeacherConfig, inputs: dict):
    """(teacher, title index for grounding or None)."""
    lake = ctx.lake
    if cfg.kind == "offline":
        from slimrec.teacher.offline import OfflineTeacher, build_stats

        missing = [t for t in ("items", "user_sequences") if inputs.get(t) is None]
        if missing:
            raise RuntimeError(f"the offline teacher needs table(s) {missing}: run ingest and build_sequences first")
        items = lake.read_pandas("items", version=inputs["items"], columns=["item_id", "title", "brand", "categories"])
        # Histories only (no valid/test targets): the statistics must not see what is evaluated.
        hist = lake.read_pandas("user_sequences", version=inputs["user_sequences"], columns=["history"])["history"]
        return OfflineTeacher(build_stats(hist, items, cfg.offline), cfg.offline), None
    from slimrec.teacher.grounding import TitleIndex
    from slimrec.teacher.http_teacher import HttpTeacher

    titles = None
    if inputs.get("items") is not None:
        titles = TitleIndex(lake.read_pandas("items", version=inputs["items"], columns=["item_id", "title"]))
    else:
        log.warning("teacher: no items table; step-3 titles will not be grounded to item ids")
    key = api_key(cfg)
    if cfg.http.api == "batch":
        from slimrec.teacher.batch_teacher import BatchTeacher

        def chat_teacher() -> HttpTeacher:  # retry_failed=chat only: Ray starts when a retry needs it
            ctx.ray()
            return HttpTeacher(cfg, key)

        return BatchTeacher(cfg, key, _batch_store(ctx, inputs, cfg.http.model), chat_teacher=chat_teacher), titles
    ctx.ray()
    return HttpTeacher(cfg, key), titles


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.teacher
    teacher_model = teacher_model_of(cfg)
    system_prompt = cfg.http.system_prompt if cfg.kind == "http" else None
    log.info("teacher: config %s", cfg.model_dump_json(exclude={"prices"}))
    inputs = ctx.input_versions(INPUTS)

    prompts = ctx.lake.read_pandas("prompts", version=inputs["prompts"], columns=PROMPT_COLUMNS,
                                   filters=[("run_date", "<=", ctx.run_date)])
    population = latest_prompts(prompts, ctx.run_date, ctx.cfg.prompts.version)
    sample = stratified_sample(population, cfg.sample_size, cfg.seed, cfg.strata, cfg.min_stratum_share)
    if cfg.kind == "offline" and cfg.offline.planted_precision is not None:
        sample = per_user_keys(sample)  # a planted answer is per user: users sharing a prompt each get one
    cached = _read_cache(ctx, inputs[STAGE], teacher_model)
    stale, deleted_version = None, None
    if inputs[STAGE] is not None and not ctx.dry_run:
        # answers naming items that a re-ingest removed from the catalogue leave the cache (asked again
        # if their prompt is still sampled): the cache holds only answers grounded in the current items
        stale, deleted_version = delete_rows_naming_unknown_items(
            ctx, STAGE, ["prompt_hash", "teacher_model"], inputs, version=inputs[STAGE],
            filters=[("teacher_model", "=", teacher_model)])
        cached = cached[~cached["prompt_hash"].isin(stale["prompt_hash"].to_pylist())]
    pending, counts = plan_requests(sample, cached, cfg.max_attempts)
    to_price = pending
    if api_of(cfg) == "batch":
        from slimrec.teacher.batch_teacher import api_root

        # prompts in batches that earlier runs created are paid already: this run polls them, not prices them
        held = _batch_store(ctx, inputs, teacher_model).held_prompts(teacher_model, api_root(cfg.http.base_url))
        counts["in_open_batches"] = int(pending["prompt_hash"].isin(held).sum())
        to_price = pending[~pending["prompt_hash"].isin(held)]
    est = estimate(to_price, cfg, teacher_model, system_prompt, counts["cached_ok"])
    log.info(
        "teacher: %d prompts (%d users in the population) -> sample %d -> %d to send (%d cached ok, %d exhausted, "
        "%d retries%s); estimate (%s): %d calls, %d input + %d output tokens, cost %s USD, %d calls within budget",
        len(prompts), len(population), len(sample), len(pending), counts["cached_ok"], counts["exhausted"],
        counts["retry"], f", {counts['in_open_batches']} in open batches" if "in_open_batches" in counts else "",
        est["api"], est["calls"], est["input_tokens"], est["output_tokens"], _usd(est["cost_usd"]),
        est["calls_within_budget"],
    )
    for mode, m in est.get("modes", {}).items():
        log.info("teacher: estimate if sent by %s: cost %s USD, %d of %d calls within budget", mode,
                 _usd(m["cost_usd"]), m["calls_within_budget"], est["calls"])
    base_extra = {"teacher_model": teacher_model, **counts, "estimate": est,
                  "stale_deleted": 0 if stale is None else stale.num_rows}
    if ctx.dry_run:
        return StageResult(STAGE, {}, rows_in=len(sample), rows_out=0, skipped=True,
                           extra={**base_extra, "dry_run": True, "calls": est["calls"],
                                  "input_tokens": est["input_tokens"], "output_tokens": est["output_tokens"],
                                  "cost_usd": est["cost_usd"]})
    totals = {"calls": 0, "requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
    if pending.empty:
        log.info("teacher: nothing to send; every sampled prompt is cached")
        return StageResult(STAGE, {STAGE: deleted_version} if deleted_version is not None else {}, rows_in=len(sample),
                           rows_out=0, extra={**base_extra, **totals, "statuses": {}})

    price = price_of(cfg, teacher_model)
    budget = Budget.from_config(cfg, price)
    teacher, titles = _build_teacher(ctx, cfg, inputs)
    if cfg.kind == "offline":
        if cfg.offline.planted_precision is not None:
            pending = _with_planted(ctx, cfg, pending, inputs)
        batches = teacher.answer(pending, budget, cfg.commit_batch_size, cfg.chars_per_token)
    else:
        batches = teacher.answer(pending, budget)
    previous = cached[cached["prompt_hash"].isin(pending["prompt_hash"])]
    statuses: Counter = Counter()
    version = deleted_version
    commits = 0
    t0 = time.perf_counter()
    for raw in batches:
        rows = to_table_rows(raw, pending, teacher_model, previous, price, titles, cfg.grounding_min_score,
                             cfg.chars_per_token, system_prompt)
        totals["input_tokens"] += int(rows["run_input_tokens"].sum())
        totals["output_tokens"] += int(rows["run_output_tokens"].sum())
        totals["cost_usd"] += float(rows["run_cost_usd"].sum())
        totals["calls"] += len(rows)
        totals["requests"] += int(sum(r.get("attempts") or 0 for r in raw))
        statuses.update(rows["status"])
        info = ctx.commit_info(STAGE, inputs, teacher_model=teacher_model, batch=commits, rows=len(rows))
        version = ctx.lake.write_arrow(STAGE, rows.drop(columns=RUN_COLUMNS), "merge", info)
        commits += 1
        log.info("teacher: committed %d rows (batch %d, %d so far, %s) -> version %s",
                 len(rows), commits, totals["calls"], dict(statuses), version)
    stats = teacher.run_stats if isinstance(teacher.run_stats, dict) else teacher.run_stats.as_dict()
    batch_extra = {k: stats[k] for k in ("batches_created", "batches_resumed", "batches_abandoned", "retried_in_batch",
                                         "retried_chat", "in_flight", "batch_ids") if k in stats}
    totals["cost_usd"] = round(totals["cost_usd"], 6)
    log.info("teacher: %d prompts answered or failed in %.1fs: %s; %d requests, %d+%d tokens, %.4f USD; stopped by %s",
             totals["calls"], time.perf_counter() - t0, dict(statuses), totals["requests"], totals["input_tokens"],
             totals["output_tokens"], totals["cost_usd"], stats.get("stopped_by"))
    return StageResult(
        STAGE, {STAGE: version}, rows_in=len(sample), rows_out=totals["calls"],
        extra={**base_extra, **totals, "statuses": dict(statuses), "commits": commits,
               "not_sent": int(stats.get("not_sent", 0)), "stopped_by": stats.get("stopped_by"),
               "fatal_error": stats.get("fatal_error"), **({"batch": batch_extra} if batch_extra else {})},
    )
