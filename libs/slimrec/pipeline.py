"""Running stages: one stage, or the whole pipeline with a quality gate after each.

A stage is skipped when the Delta versions of its inputs equal those recorded
in the commit metadata of its last successful run (``--force`` runs it anyway).
"""

from __future__ import annotations

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


def _last_inputs(ctx: StageContext, name: str, outputs: list[str]) -> dict | None:
    """Input versions recorded by the last commit this stage made to its main output table."""
    main = outputs[0]
    if not ctx.lake.exists(main):
        return None
    for commit in ctx.lake.history(main, 50):
        if commit.get("slimrec.stage") == name:
            rec = {"versions": json.loads(commit.get("slimrec.input_versions", "{}"))}
            if "slimrec.dataset_fingerprint" in commit:
                rec["dataset"] = json.loads(commit["slimrec.dataset_fingerprint"])
            return rec
    return None


def should_skip(ctx: StageContext, name: str) -> tuple[bool, str]:
    mod = stage_module(name)
    if ctx.force:
        return False, "forced"
    last = _last_inputs(ctx, name, mod.OUTPUTS)
    if last is None:
        return False, "never ran"
    now = {t: ctx.lake.version(t) for t in mod.INPUTS}
    if name == "ingest":
        fp = dataset_fingerprint(ctx.dataset_dir)
        return (last.get("dataset") == fp, "dataset files unchanged" if last.get("dataset") == fp else "dataset changed")
    if {k: v for k, v in last["versions"].items() if k in now} == now and now:
        return True, f"inputs unchanged since its last run ({now})"
    return False, "inputs changed"


def gate(ctx: StageContext, result: StageResult, outputs: list[str]) -> None:
    """Validate each table the stage wrote; raises QualityGateError on a failed suite."""
    if not ctx.cfg.quality.enabled:
        return
    from slimrec.quality import gate as quality_gate

    for table, version in result.tables.items():
        if version is None or table in ("quarantine", "dq_results"):
            continue
        quality_gate(ctx.lake, table, cfg=ctx.cfg, spark=ctx.spark(), version=version,
                     run_date=ctx.run_date, run_id=ctx.run_id)


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
    t0 = time.perf_counter()
    result = mod.run(ctx)
    result.extra["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("stage %s: done in %.1fs, rows in %d, rows out %d, tables %s",
             name, result.extra["seconds"], result.rows_in, result.rows_out, result.tables)
    if check and not ctx.dry_run:
        gate(ctx, result, mod.OUTPUTS)
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
