"""Daily refresh: merge a day's events, then redo only what they change.

1. ``merge_events``: the day's events file (CSV/Parquet; user, item, timestamp
   columns) goes through the same checks as ingest; events already in
   ``interactions`` are ignored (anti-join on the key, then an insert-only
   MERGE), bad rows go to quarantine. No new event -> no commit.
2. Every later stage runs with skip-if-inputs-unchanged, and each writes only
   what changed: sequences of users with new events, prompts for those users,
   teacher calls for new sampled prompts within budget, student rationales for
   changed prompts, embeddings of changed texts.
3. ``--retrain`` distils a new student (when the teacher answered new prompts)
   and fits a new recommender (and rewrites recommendations); without it the
   current student and recommender are kept.
   Without it, the users whose sequence or rationale changed are rescored
   with the current recommender's saved model and merged into
   ``recommendations`` under the refresh's run date
   (slimrec.recommender.serving).

Running the same date twice changes nothing the second time: step 1 finds no
new event, so every later stage is skipped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from slimrec.ingest import IngestError, build_interactions, read_events_spark
from slimrec.pipeline import STAGES, StageError, run_stage
from slimrec.stages.base import StageContext, StageResult

log = logging.getLogger(__name__)


def merge_events(ctx: StageContext, events_path: str | Path) -> StageResult:
    from pyspark.sql import functions as F

    p = Path(events_path)
    if not p.exists():
        raise IngestError(f"events file {p} does not exist")
    if not ctx.lake.exists("interactions"):
        raise IngestError("refresh needs an ingested lake (run `slim run` or `slim ingest` first)")
    t0 = time.perf_counter()
    spark, lake = ctx.spark(), ctx.lake
    inputs = ctx.input_versions(["interactions", "items"])
    raw, _ = read_events_spark(spark, [p], [])
    raw = raw.cache()
    n_raw = raw.count()
    items = lake.read_spark(spark, "items")
    new, quarantine = build_interactions(raw, items, ctx.cfg.ingest.order_base_ts, ctx.cfg.ingest.max_id_chars)
    old = lake.read_spark(spark, "interactions").select("user_id", "item_id", "event_ts")
    fresh = new.join(old, ["user_id", "item_id", "event_ts"], "left_anti").cache()
    n_new = fresh.count()
    info = ctx.commit_info("merge_events", inputs, events_file=p.name)
    tables: dict[str, int | None] = {}
    if n_new:
        tables["interactions"] = lake.write_spark(fresh, "interactions", "merge", info, update=False)
    q = quarantine.toPandas()
    if len(q):
        q["source_row"] = q["source_row"].astype("Int64")
        tables["quarantine"] = lake.write_arrow("quarantine", q, "merge", info)
    users = fresh.select(F.countDistinct("user_id")).first()[0] if n_new else 0
    raw.unpersist()
    fresh.unpersist()
    log.info("merge_events: %d rows read, %d new events for %d users, %d already present, %d quarantined",
             n_raw, n_new, users, n_raw - n_new - len(q), len(q))
    return StageResult("merge_events", tables, rows_in=n_raw, rows_out=n_new,
                       extra={"seconds": round(time.perf_counter() - t0, 1), "users_with_new_events": users,
                              "quarantined": int(len(q))})


def refresh(ctx: StageContext, events_path: str | Path, retrain: bool = False, progress=None) -> list[StageResult]:
    from slimrec.pipeline import gate, measured, skipped_stage

    def merge(meter) -> StageResult:
        result = merge_events(ctx, events_path)
        meter.mark_run_end()
        if not ctx.dry_run:
            gate(ctx, result, ["interactions"])
        return result

    def rescore_step(meter) -> StageResult:
        return rescore(ctx)

    results = [measured(ctx, merge)[0]]
    later = [s for s in STAGES if s != "ingest"]
    for i, name in enumerate(later):
        if progress:
            progress(i, len(later), name)
        if name == "train_recommender" and not retrain:
            results.append(measured(ctx, rescore_step)[0])
            continue
        if name == "distill_student" and not retrain and ctx.lake.exists("student_models"):
            why = "the current student is kept; `slim refresh --retrain` distils a new one"
            results.append(skipped_stage(ctx, name, why))
            continue
        results.append(run_stage(name, ctx, allow_skip=True))
    return results


def rescore(ctx: StageContext) -> StageResult:
    """Rescore users whose inputs changed with the current recommender (see slimrec.recommender.serving)."""
    from slimrec.recommender.serving import STEP, ServingError
    from slimrec.recommender.serving import rescore as rescore_users

    cfg = ctx.cfg.recommender
    root = Path(cfg.artifacts_dir) if Path(cfg.artifacts_dir).is_absolute() else ctx.lake.local_root / cfg.artifacts_dir
    if ctx.dry_run:
        return StageResult(STEP, skipped=True, extra={"reason": "dry run"})
    try:
        facts = rescore_users(ctx, root)
    except ServingError as e:
        raise StageError(f"{STEP}: {e}") from None
    if "skipped_reason" in facts:
        log.info("refresh: %s skipped: %s", STEP, facts["skipped_reason"])
        return StageResult(STEP, skipped=True, extra={"reason": facts.pop("skipped_reason"), **facts})
    version = facts.pop("version")
    return StageResult(STEP, {"recommendations": version}, rows_in=facts["users_changed"],
                       rows_out=facts["users_rescored"], extra=facts)
