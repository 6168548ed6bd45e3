"""Running stages: one stage, or the whole pipeline with a quality gate after each.

A stage is skipped when the Delta versions of its inputs equal those recorded
when it last *finished* (``--force`` runs it anyway). The record
(:meth:`slimrec.lake.Lake.record_stage`) is written after the stage and its
quality gate succeed, never from the commit metadata of its first table: a
stage writes several tables (or batches) in separate commits, and a run
killed between two of them must rerun the stage, not skip it on a half-done
set of tables that no gate has validated.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import time
from dataclasses import asdict

from slimrec.ingest import dataset_fingerprint
from slimrec.stages.base import StageContext, StageResult

log = logging.getLogger(__name__)

STAGES = [
    "ingest",
    "build_sequences",
    "build_prompts",
    "teacher_rationales",
    "distill_student",
    "student_rationales",
    "embed",
    "retrieve_rationales",
    "train_recommender",
]


class StageError(RuntimeError):
    """A stage that cannot run as asked (unknown name, missing input table)."""


def stage_module(name: str):
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(f"slimrec.stages.{name}")


# The config sections whose values change what a stage writes. A stage whose inputs are unchanged but that
# last ran under other values of these runs again: a planted-signal experiment's train_recommender (embed
# names the planted teacher) must never stand in for the default run's on the same lake.
STAGE_CONFIG: dict[str, tuple[str, ...]] = {
    "ingest": ("ingest",),
    "build_sequences": ("sequences",),
    "build_prompts": ("prompts",),
    "teacher_rationales": ("teacher",),
    "distill_student": ("student",),
    "student_rationales": ("student", "retrieval"),
    "embed": ("embed",),
    "retrieve_rationales": ("retrieval", "student", "embed"),
    "train_recommender": ("recommender", "embed", "dataset_name"),
}


def stage_config_hash(ctx: StageContext, name: str) -> str:
    """sha1 (12 hex) of the config sections in :data:`STAGE_CONFIG` for ``name``."""
    cfg = ctx.cfg.model_dump(mode="json")
    part = {k: cfg.get(k) for k in STAGE_CONFIG.get(name, ())}
    return hashlib.sha1(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _stage_inputs(ctx: StageContext, name: str, mod) -> dict:
    """The inputs a stage starts from: Delta versions (and the dataset files, for ingest), and its config."""
    rec: dict = {"versions": {t: ctx.lake.version(t) for t in mod.INPUTS}, "config": stage_config_hash(ctx, name)}
    if name == "ingest":
        rec["dataset"] = dataset_fingerprint(ctx.dataset_dir)
    return rec


def should_skip(ctx: StageContext, name: str) -> tuple[bool, str]:
    mod = stage_module(name)
    if ctx.force:
        return False, "forced"
    last = ctx.lake.stage_record(name)
    if last is None:
        return False, "no finished run recorded"
    if not last.get("checked") and ctx.cfg.quality.enabled:
        return False, "its last run skipped the quality gate"
    now = _stage_inputs(ctx, name, mod)
    if last.get("config") != now["config"]:
        return False, ("its config changed since its last run" if last.get("config")
                       else "its last run recorded no config")
    if name == "ingest":
        same = last.get("dataset") == now["dataset"]
        return same, "dataset files unchanged" if same else "dataset changed"
    versions = now["versions"]
    if {k: v for k, v in last["versions"].items() if k in versions} == versions and versions:
        return True, f"inputs unchanged since its last run ({versions})"
    return False, "inputs changed"


def _passed_gate(ctx: StageContext, table: str, version: int) -> bool:
    """Whether ``dq_results`` holds a passing suite for this version of ``table``."""
    if not ctx.lake.exists("dq_results"):
        return False
    dq = ctx.lake.read_pandas("dq_results", columns=["table_version", "suite_success"],
                              filters=[("table_name", "=", table)])
    return bool(((dq["table_version"] == version) & dq["suite_success"]).any())


def gate(ctx: StageContext, result: StageResult, outputs: list[str]) -> None:
    """Validate each table the stage wrote; raises QualityGateError on a failed suite.

    An output the stage did not commit to this time (nothing changed) is validated too when its
    current version never passed a gate: a run killed after that commit and before its gate left it
    unvalidated, and the rerun, finding nothing to change, would otherwise hand it on unchecked.
    """
    if not ctx.cfg.quality.enabled:
        return
    from slimrec.quality import gate as quality_gate

    todo = {t: v for t, v in result.tables.items() if v is not None}
    for table in [*result.tables, *outputs]:
        if table in todo or table in ("quarantine", "dq_results") or not ctx.lake.exists(table):
            continue
        current = ctx.lake.version(table)
        if not _passed_gate(ctx, table, current):
            log.warning("stage %s: %s v%d was committed but never validated: validating it now",
                        result.stage, table, current)
            todo[table] = current
    for table, version in todo.items():
        if table in ("quarantine", "dq_results"):
            continue
        # run_date=None: the gate takes the date from that version's own commit, which is this run's date
        # for what this run wrote and the earlier date for a version an interrupted run left unvalidated.
        quality_gate(ctx.lake, table, cfg=ctx.cfg, spark=ctx.spark(), version=version,
                     run_date=None, run_id=ctx.run_id)


def record_cost(ctx: StageContext, cost: dict) -> None:
    """Append a stage's cost figures (:mod:`slimrec.cost`) to this run's record (``stage_costs``)."""
    if ctx.dry_run:
        return
    rec = ctx.lake.run_record(ctx.run_id) or {}
    rec.setdefault("stage_costs", []).append(cost)
    ctx.lake.record_run(ctx.run_id, rec)


def skipped_stage(ctx: StageContext, name: str, why: str) -> StageResult:
    """The result of a stage that does not run (it costs nothing, and its cost record says why)."""
    from slimrec.cost import skipped_cost

    log.info("stage %s: skipped (%s)", name, why)
    cost = skipped_cost(name, why, ctx.run_date)
    record_cost(ctx, cost)
    return StageResult(name, skipped=True, extra={"reason": why, "cost": cost})


def measured(ctx: StageContext, body) -> tuple[StageResult, dict]:
    """``body(meter)`` (returns a StageResult; may call ``meter.mark_run_end()`` before its gate) under a
    :class:`slimrec.cost.StageMeter`: (the result, with ``extra["cost"]``, and the cost record)."""
    from slimrec.cost import StageMeter, stage_cost

    with StageMeter(ctx.cfg.cost.sample_interval_s) as meter:
        result = body(meter)
    cost = stage_cost(result, meter.figures, ctx.cfg, ctx.run_date)
    if not ctx.dry_run:
        result.extra["cost"] = cost
        record_cost(ctx, cost)
    return result, cost


def run_stage(name: str, ctx: StageContext, check: bool = True, allow_skip: bool = False) -> StageResult:
    mod = stage_module(name)
    if allow_skip:
        skip, why = should_skip(ctx, name)
        if skip:
            return skipped_stage(ctx, name, why)
    missing = [t for t in mod.INPUTS if not ctx.lake.exists(t) and t in REQUIRED_INPUTS.get(name, mod.INPUTS)]
    if missing:
        raise StageError(f"stage {name} needs table(s) {', '.join(missing)}; run the stages that write them first")
    log.info("stage %s: start (run_date=%s, run_id=%s)", name, ctx.run_date, ctx.run_id)
    started_from = None if ctx.dry_run else _stage_inputs(ctx, name, mod)

    def body(meter) -> StageResult:
        t0 = time.perf_counter()
        result = mod.run(ctx)
        result.extra["seconds"] = round(time.perf_counter() - t0, 1)
        meter.mark_run_end()  # GPU-hours are the stage's own wall time; CPU counts its gate too
        log.info("stage %s: done in %.1fs, rows in %d, rows out %d, tables %s",
                 name, result.extra["seconds"], result.rows_in, result.rows_out, result.tables)
        if check and not ctx.dry_run:
            gate(ctx, result, mod.OUTPUTS)
        return result

    result, cost = measured(ctx, body)
    ctx.release_memory()
    if started_from is not None:
        from slimrec.cost import add_totals

        # cost_total sums the finished runs since the stage's config last changed (a planted experiment's
        # teacher, say, starts its own count, and the default run's starts again after it)
        last = ctx.lake.stage_record(name) or {}
        previous = last.get("cost_total") if last.get("config") == started_from["config"] else None
        ctx.lake.record_stage(name, {**started_from, "checked": check and ctx.cfg.quality.enabled,
                                     "run_id": ctx.run_id, "run_date": ctx.run_date.isoformat(),
                                     "tables": result.tables, "cost": cost,
                                     "cost_total": add_totals(previous, cost)})
    return result


# Inputs a stage cannot run without; others (rationale tables for the recommender) are optional.
REQUIRED_INPUTS: dict[str, list[str]] = {
    "teacher_rationales": ["prompts"],
    "distill_student": ["teacher_rationales"],
    "student_rationales": ["prompts"],
    "embed": ["items"],
    "retrieve_rationales": ["prompts"],
    "train_recommender": ["user_sequences", "items"],
}


def run_pipeline(ctx: StageContext, start: str | None = None, stop: str | None = None,
                 progress=None) -> list[StageResult]:
    names = STAGES[STAGES.index(start) if start else 0 : (STAGES.index(stop) + 1) if stop else None]
    if not names:
        raise StageError(f"--from {start} comes after --to {stop}")
    results = []
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names), name)
        results.append(run_stage(name, ctx, allow_skip=True))
    return results


# Stages whose ``run`` estimates without writing under ``ctx.dry_run`` and is worth asking for a cost
# estimate; the others (Spark stages, the recommender) show only their last measured figures.
ESTIMATED = ("teacher_rationales", "distill_student", "student_rationales", "embed")


def dry_run_costs(ctx: StageContext, start: str | None = None, stop: str | None = None):
    """The cost table of ``slim run --dry-run`` (:func:`slimrec.cost.dry_run_table`), nothing written.

    Each stage in :data:`ESTIMATED` whose required inputs exist runs its own dry run against the lake as
    it is now (a stage before it that would change its inputs is not foreseen); every stage shows the
    figures of its last finished run from its stage record, or "not measured yet".
    """
    from slimrec.config import ConfigError
    from slimrec.cost import dry_run_table

    if not ctx.dry_run:
        raise StageError("dry_run_costs needs a dry-run context")
    names = STAGES[STAGES.index(start) if start else 0 : (STAGES.index(stop) + 1) if stop else None]
    estimates: dict[str, dict] = {}
    for name in names:
        mod = stage_module(name)
        missing = [t for t in REQUIRED_INPUTS.get(name, mod.INPUTS) if not ctx.lake.exists(t)]
        if name not in ESTIMATED:
            estimates[name] = {"reason": "no estimate for this stage"}
        elif missing:
            estimates[name] = {"reason": f"no estimate: {', '.join(missing)} not built yet"}
        else:
            try:
                estimates[name] = mod.run(ctx).extra
            except (StageError, ConfigError) as e:  # e.g. no student registered yet: say so, estimate the rest
                estimates[name] = {"reason": f"no estimate: {e}"}
    records = {n: (ctx.lake.stage_record(n) or {}).get("cost") for n in names}
    return dry_run_table(estimates, records, ctx.cfg.cost)


def results_json(results: list[StageResult]) -> list[dict]:
    return [asdict(r) for r in results]
