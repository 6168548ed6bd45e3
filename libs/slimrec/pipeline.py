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
    "student_rationales": ("student",),
    "embed": ("embed",),
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


def run_stage(name: str, ctx: StageContext, check: bool = True, allow_skip: bool = False) -> StageResult:
    mod = stage_module(name)
    if allow_skip:
        skip, why = should_skip(ctx, name)
        if skip:
            log.info("stage %s: skipped (%s)", name, why)
            return StageResult(name, skipped=True, extra={"reason": why})
    missing = [t for t in mod.INPUTS if not ctx.lake.exists(t) and t in REQUIRED_INPUTS.get(name, mod.INPUTS)]
    if missing:
        raise StageError(f"stage {name} needs table(s) {', '.join(missing)}; run the stages that write them first")
    log.info("stage %s: start (run_date=%s, run_id=%s)", name, ctx.run_date, ctx.run_id)
    started_from = None if ctx.dry_run else _stage_inputs(ctx, name, mod)
    t0 = time.perf_counter()
    result = mod.run(ctx)
    result.extra["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("stage %s: done in %.1fs, rows in %d, rows out %d, tables %s",
             name, result.extra["seconds"], result.rows_in, result.rows_out, result.tables)
    if check and not ctx.dry_run:
        gate(ctx, result, mod.OUTPUTS)
    if started_from is not None:
        ctx.lake.record_stage(name, {**started_from, "checked": check and ctx.cfg.quality.enabled,
                                     "run_id": ctx.run_id, "run_date": ctx.run_date.isoformat(),
                                     "tables": result.tables})
    return result


# Inputs a stage cannot run without; others (rationale tables for the recommender) are optional.
REQUIRED_INPUTS: dict[str, list[str]] = {
    "teacher_rationales": ["prompts"],
    "distill_student": ["teacher_rationales"],
    "student_rationales": ["prompts"],
    "embed": ["items"],
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


def results_json(results: list[StageResult]) -> list[dict]:
    return [asdict(r) for r in results]
