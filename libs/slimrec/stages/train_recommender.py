"""Stage train_recommender: sequences (+ item text, rationale vectors) -> metrics, recommender_runs, recommendations.

Every configured backbone x variant x seed is trained on the same leave-one-out
split as one Ray Train ``TorchTrainer`` job, evaluated on the test target under
both protocols (full ranking without the user's history; 100 sampled
negatives outside the user's sequence) beside random, most-popular and
transition-count baselines, described beyond accuracy by its test users'
full-ranking top-K lists (coverage, Gini, popularity, novelty, diversity:
:mod:`slimrec.recommender.beyond`), and the best variant (by validation
NDCG@10) writes top-K recommendations. Variants whose inputs do not exist yet (no item
embeddings, no teacher or student rationales) are logged and listed in
``recommender_runs.notes``; nothing is filled in for them.

Inputs: ``user_sequences``, ``items`` (required); ``item_embeddings``,
``rationale_embeddings``, ``teacher_rationales``, ``student_rationales``
(optional). Outputs: ``metrics`` and ``recommender_runs`` (append, keyed by
run_id), ``recommendations`` (replace this run date's slice).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from slimrec.recommender.data import build_rec_data
from slimrec.recommender.experiment import run_experiment
from slimrec.recommender.metrics import METRIC_NAMES
from slimrec.recommender.runner import plan_groups
from slimrec.stages.base import StageContext, StageResult
from slimrec.teacher.planted import LEAKAGE_NOTE, is_planted

log = logging.getLogger(__name__)

STAGE = "train_recommender"
INPUTS = [
    "user_sequences", "items", "item_embeddings", "rationale_embeddings", "teacher_rationales", "student_rationales",
]
OUTPUTS = ["metrics", "recommender_runs", "recommendations"]
PER_USER_FILE = "per_user_test.parquet"  # beside the run's checkpoints: per-user test NDCG@10 of every result

_COLUMNS = {
    "user_sequences": ["user_id", "history", "valid_target", "test_target"],
    "items": ["item_id"],
    "item_embeddings": ["item_id", "encoder", "embedding"],
    "rationale_embeddings": ["user_id", "source", "model_version", "encoder", "embedding"],
    "teacher_rationales": ["user_id", "teacher_model", "status", "grounded_item_ids", "answered_ts", "run_date"],
    "student_rationales": ["user_id", "model_version", "status", "grounded_item_ids", "run_date", "rationale_source"],
}


def _read(ctx: StageContext, table: str, version: int | None) -> pd.DataFrame | None:
    if version is None:
        log.info("%s: %s does not exist (yet): variants that need it will be reported missing", STAGE, table)
        return None
    df = ctx.lake.read_pandas(table, version=version, columns=_COLUMNS[table])
    log.info("%s: read %s v%s: %d rows", STAGE, table, version, len(df))
    return df


def _teacher_rows(teacher: pd.DataFrame | None, emb: pd.DataFrame | None, teacher_model: str | None):
    """Teacher answers and vectors of ``teacher_model`` only (``embed.teacher_model``, which the embed stage
    encoded); None: every teacher except a planted-signal experiment's, whose rows never reach a default run."""
    def keep(df, col):
        if df is None or col not in df.columns:
            return df
        is_t = df["source"] == "teacher" if "source" in df.columns else pd.Series(True, index=df.index)
        wrong = df[col] != teacher_model if teacher_model is not None else df[col].map(is_planted)
        return df[~(is_t & wrong)]

    return keep(teacher, "teacher_model"), keep(emb, "model_version")


def _default_encoder(ctx: StageContext) -> str | None:
    """The embed stage's encoder id (``name:pooling:norm:max_len``), when its model folder resolves."""
    if ctx.cfg.recommender.encoder:
        return ctx.cfg.recommender.encoder
    try:
        from slimrec.embed.encoder import resolve_encoder

        return resolve_encoder(ctx.cfg.embed).encoder_id
    except Exception as e:  # noqa: BLE001 - any failure only means "no preferred encoder"
        log.info("%s: embed encoder does not resolve here (%s); using the only encoder in the tables", STAGE, e)
        return None


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.recommender
    log.info("%s: config %s", STAGE, cfg.model_dump_json())
    started = datetime.now(tz=UTC)
    inputs = ctx.input_versions(INPUTS)
    frames = {t: _read(ctx, t, inputs[t]) for t in INPUTS}
    teacher_model = ctx.cfg.embed.teacher_model
    frames["teacher_rationales"], frames["rationale_embeddings"] = _teacher_rows(
        frames["teacher_rationales"], frames["rationale_embeddings"], teacher_model)
    data, data_notes = build_rec_data(
        frames["user_sequences"],
        frames["items"],
        frames["item_embeddings"],
        frames["rationale_embeddings"],
        {"teacher": frames["teacher_rationales"], "student": frames["student_rationales"]},
        encoder=_default_encoder(ctx),
    )
    groups, missing = plan_groups(cfg, data)
    extra = {"users": data.n_users, "items": data.n_items, "groups": len(groups), "missing_variants": missing,
             **{k: v for k, v in data_notes.items() if k.endswith("_users")}}
    if ctx.dry_run:
        log.info("%s: dry run: would train %d (backbone, seed) groups; missing %s", STAGE, len(groups), missing)
        return StageResult(STAGE, {t: None for t in OUTPUTS}, rows_in=data.n_users, skipped=True, extra=extra)

    # A relative artifacts_dir lives under the lake root (its local folder for an object-store lake), not
    # wherever the command was started.
    artifacts = Path(cfg.artifacts_dir) if Path(cfg.artifacts_dir).is_absolute() else ctx.lake.local_root / cfg.artifacts_dir
    res = run_experiment(data, cfg, ctx.run_id, artifacts, ray_address=ctx.cfg.ray_address)
    finished = datetime.now(tz=UTC)
    per_user = artifacts / ctx.run_id / PER_USER_FILE
    per_user.parent.mkdir(parents=True, exist_ok=True)
    res.per_user_test().to_parquet(per_user, index=False)
    info = ctx.commit_info(STAGE, inputs, best=list(res.best) if res.best else None)

    metrics = res.metrics.assign(run_id=ctx.run_id, dataset=ctx.cfg.dataset_name)
    metrics["seed"] = metrics["seed"].astype("int32")
    versions = {"metrics": ctx.lake.write_arrow("metrics", metrics, "append", info)}
    notes = {**res.notes, "data": data_notes, "artifacts": str(artifacts / ctx.run_id),
             "teacher_model": teacher_model}
    if is_planted(teacher_model):
        notes["leakage"] = LEAKAGE_NOTE
    runs = pd.DataFrame([{
        "run_id": ctx.run_id, "dataset": ctx.cfg.dataset_name, "config": cfg.model_dump_json(),
        "best_backbone": res.best[0] if res.best else None, "best_variant": res.best[1] if res.best else None,
        "n_users": data.n_users, "n_items": data.n_items, "notes": json.dumps(notes, sort_keys=True, default=str),
        "started_ts": started, "finished_ts": finished,
    }])
    versions["recommender_runs"] = ctx.lake.write_arrow("recommender_runs", runs, "append", info)
    if is_planted(teacher_model):
        versions["recommendations"] = None  # a model that saw planted targets never serves anyone
        log.warning("%s: planted-signal experiment (%s): no recommendations written", STAGE, LEAKAGE_NOTE)
    elif res.recommendations is not None:
        recs = res.recommendations.assign(run_id=ctx.run_id)
        versions["recommendations"] = ctx.lake.write_arrow("recommendations", recs, "replace_date", info)
    else:
        versions["recommendations"] = None
        log.warning("%s: no model variant ran: no recommendations written", STAGE)

    table = res.table("test")
    log.info("%s: results (test target)\n%s", STAGE, table)
    extra.update(best=list(res.best) if res.best else None, run_id=ctx.run_id, per_user_file=str(per_user),
                 paired_reference=notes.get("paired_reference"))
    if res.best:
        b = res.metrics[(res.metrics.backbone == res.best[0]) & (res.metrics.variant == res.best[1])
                        & (res.metrics.split == "test")]
        extra["best_test"] = {p: {m: round(float(g[m].mean()), 4) for m in METRIC_NAMES}
                              for p, g in b.groupby("protocol")}
    rows_out = len(metrics) + 1 + (0 if res.recommendations is None else len(res.recommendations))
    return StageResult(STAGE, versions, rows_in=data.n_users, rows_out=rows_out, extra=extra)
