"""Stage distill_student: teacher_rationales + prompts (+ items) -> a LoRA adapter registered in student_models.

1. Pairs: each ok teacher rationale with the student prompt of the same
   ``prompt_hash`` (:func:`slimrec.student.data.training_pairs`); step 3 cut to
   ``max_target_items`` titles; split train / held-out by a seeded hash of
   ``user_id``.
2. Base model: ``builtin:tiny-llama`` is built once from the lake's text and
   reused (:mod:`slimrec.student.tiny_model`); a local directory or a cached
   HF name is used as it is.
3. ``model_version`` = hash of (base, training pairs, training config): the
   same inputs give the same version, which is not retrained
   (``skip_if_registered``; ``--force`` retrains).
4. Ray Train ``TorchTrainer`` job (:mod:`slimrec.student.train`): LoRA, loss
   on rationale tokens only, val loss and a checkpoint per epoch, then the
   held-out quality check: ROUGE-L / token F1 of student vs teacher and of
   the same base without the adapter vs teacher.
5. The adapter is copied to ``<models_dir>/student/<model_version>/adapter``
   and registered (MERGE on model_version) with its base, LoRA config,
   metrics and the input table versions; unless the student beats the base
   by ``min_rouge_gain`` ROUGE-L, the stage fails and registers nothing.

``ctx.dry_run``: counts and token estimates only; nothing is built, trained
or written. Command: ``slim stage distill_student --lake lake`` (or
``python jobs/distill_student.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from slimrec.pipeline import StageError
from slimrec.stages.base import StageContext, StageResult
from slimrec.student.config import StudentConfig
from slimrec.student.data import (
    encode_pair,
    eval_subset,
    fit_prompt_ids,
    split_by_user,
    training_pairs,
    trim_items,
)
from slimrec.teacher.planted import drop_planted

log = logging.getLogger(__name__)

STAGE = "distill_student"
INPUTS = ["teacher_rationales", "prompts", "items"]
OUTPUTS = ["student_models"]
# Student config fields that only change inference or bookkeeping, not the trained adapter.
_NOT_IN_VERSION = ("infer", "vllm", "model_version", "eval_max_users", "eval_batch_size", "min_rouge_gain",
                   "skip_if_registered", "models_dir")


class StudentQualityError(StageError):
    """The trained adapter does not beat the un-adapted base on held-out users by the configured margin."""


def model_version_of(cfg: StudentConfig, base_fingerprint: str, pairs: pd.DataFrame) -> str:
    """``student-<12 hex>`` over (base, training pairs' (prompt_hash, teacher_model, rationale), training config)."""
    conf = cfg.model_dump(mode="json")
    for k in _NOT_IN_VERSION:
        conf.pop(k, None)
    conf["train"].pop("checkpoints_to_keep", None)
    h = hashlib.sha1(base_fingerprint.encode())
    h.update(json.dumps(conf, sort_keys=True).encode())
    for ph, tm, r in zip(pairs["prompt_hash"], pairs["teacher_model"], pairs["rationale"], strict=True):
        h.update(f"\x1e{ph}\x1f{tm}\x1f".encode() + hashlib.sha1(r.encode()).digest())
    return f"student-{h.hexdigest()[:12]}"


def resolve_base(cfg: StudentConfig, root: Path, items: pd.DataFrame | None, prompts: list[str],
                 rationales: list[str]) -> tuple[str, str, dict]:
    """(path or name to load, fingerprint, info). Builds the builtin base when it is missing."""
    from slimrec.student.models import is_builtin

    if is_builtin(cfg.base_model):
        from slimrec.student.tiny_model import build_corpus, ensure_tiny_model

        if items is None:
            raise ValueError("builtin:tiny-llama needs the items table to build its base model")
        path, info = ensure_tiny_model(root, build_corpus(items, prompts, rationales, cfg.tiny), cfg.tiny)
        return path, Path(path).name, info
    p = Path(cfg.base_model).expanduser()
    looks_like_path = cfg.base_model.startswith(("/", "./", "../", "~")) or cfg.base_model.count("/") > 1
    if looks_like_path and not p.is_dir():
        from slimrec.config import ConfigError

        raise ConfigError(f"student.base_model={cfg.base_model}: no such directory (a Hugging Face model folder "
                          f"with config.json, the weights and the tokenizer; or an org/name in the local HF cache)")
    if p.is_dir():
        conf = (p / "config.json").read_bytes() if (p / "config.json").exists() else b""
        return str(p.resolve()), f"{p.resolve()}:{hashlib.sha1(conf).hexdigest()[:12]}", {"source": "local dir"}
    return cfg.base_model, cfg.base_model, {"source": "HF name from the local cache"}


def _registered(ctx: StageContext, model_version: str) -> bool:
    if not ctx.lake.exists("student_models"):
        return False
    t = ctx.lake.read_arrow("student_models", columns=["model_version"], filters=[("model_version", "=", model_version)])
    return t.num_rows > 0


def constrained_eval_set(cfg: StudentConfig, items: pd.DataFrame, eval_df: pd.DataFrame,
                         teacher: pd.DataFrame) -> dict:
    """The quality check's grammar (as student_rationales builds it) and the teacher's ids per held-out pair.

    ``teacher_item_ids``: the teacher row's ``grounded_item_ids`` cut to ``max_target_items`` (the trimmed
    target names the teacher's first titles, best first).
    """
    from slimrec.stages.student_rationales import constraint

    con = constraint(cfg, items)
    key = ["prompt_hash", "teacher_model"]
    ids = eval_df[key].merge(teacher.drop_duplicates(key)[[*key, "grounded_item_ids"]], on=key, how="left")
    k = cfg.max_target_items
    truth = [list(x)[:k] if x is not None and not isinstance(x, float) else [] for x in ids["grounded_item_ids"]]
    return {"grammar": con.ebnf_uncounted, "grammar_shape": con.shape, "grammar_max_new_tokens": con.max_new_tokens,
            "title_ids": con.titles.item_ids, "teacher_item_ids": truth}


def run(ctx: StageContext) -> StageResult:
    from slimrec.student.models import adapter_dir, load_tokenizer, models_dir, runs_dir

    cfg: StudentConfig = ctx.cfg.student
    lake = ctx.lake
    inputs = ctx.input_versions(INPUTS)
    t0 = time.perf_counter()
    teacher = lake.read_pandas("teacher_rationales", version=inputs["teacher_rationales"],
                               columns=["prompt_hash", "teacher_model", "user_id", "rationale", "status",
                                        "grounded_item_ids"])
    if inputs["prompts"] is None:
        raise StageError("distill_student needs the prompts table (student prompts); run build_prompts first")
    prompts = lake.read_pandas("prompts", version=inputs["prompts"], columns=["prompt_hash", "student_prompt", "run_date"])
    if cfg.teacher_model is None:
        teacher = drop_planted(teacher, "teacher_model")  # a planted experiment's answers only when named
    pairs = training_pairs(teacher, prompts, cfg.teacher_model)
    log.info("distill_student: %d teacher rows, %d ok pairs with a student prompt", len(teacher), len(pairs))
    if pairs.empty:
        raise StageError("distill_student: no ok teacher rationale has a student prompt; run teacher_rationales first")
    pairs["target"] = [trim_items(r, cfg.max_target_items) for r in pairs["rationale"]]
    train_df, held = split_by_user(pairs, cfg.heldout_fraction, cfg.split_seed)
    if cfg.max_train_pairs is not None and len(train_df) > cfg.max_train_pairs:
        train_df = train_df.sample(n=cfg.max_train_pairs, random_state=cfg.split_seed).sort_values("user_id")
    eval_df = eval_subset(held, cfg.eval_max_users, cfg.split_seed)
    extra: dict = {"train_pairs": len(train_df), "heldout_pairs": len(held), "eval_users": len(eval_df)}
    if ctx.dry_run:
        chars = (train_df["student_prompt"].str.len() + train_df["target"].str.len()).sum()
        extra.update(est_train_tokens_per_epoch=int(chars / 4), epochs=cfg.train.epochs, base_model=cfg.base_model)
        log.info("distill_student dry run: %s", extra)
        return StageResult(STAGE, rows_in=len(pairs), extra=extra)

    root = models_dir(cfg, lake.local_root)
    items = lake.read_pandas("items", version=inputs["items"]) if inputs["items"] is not None else None
    # The base's corpus is the catalogue plus the pairs' own prompts and answers, not every prompt: prompts of
    # users without a teacher answer change daily and would rebuild the base (and retrain) for nothing.
    base_path, base_fp, base_info = resolve_base(cfg, root, items, pairs["student_prompt"].tolist(),
                                                 pairs["rationale"].tolist())
    version = model_version_of(cfg, base_fp, pd.concat([train_df, held]))
    extra["model_version"] = version
    if cfg.skip_if_registered and not ctx.force and _registered(ctx, version):
        log.info("distill_student: %s is already registered (same base, data and config); nothing to train", version)
        return StageResult(STAGE, rows_in=len(pairs), skipped=True, extra=extra)

    tok = load_tokenizer(base_path)

    def encode(df: pd.DataFrame) -> list[dict]:
        return [encode_pair(tok, p, t, cfg.max_prompt_tokens, cfg.max_target_tokens)
                for p, t in zip(df["student_prompt"], df["target"], strict=True)]

    train_ex, val_ex = encode(train_df), encode(held)
    eval_set = {
        "prompt_ids": [fit_prompt_ids(tok, p, cfg.max_prompt_tokens) for p in eval_df["student_prompt"]],
        "targets": eval_df["target"].tolist(),
        "full": eval_df["rationale"].tolist(),
    }
    if cfg.infer.constrained and items is not None:
        eval_set.update(constrained_eval_set(cfg, items, eval_df, teacher))
    config = {
        "base_path": base_path,
        "train": train_ex,
        "val": val_ex,
        "eval_set": eval_set,
        "lora": cfg.lora.model_dump(mode="json"),
        "train_cfg": cfg.train.model_dump(mode="json"),
        "seed": cfg.split_seed,
        "max_new_tokens": cfg.infer.max_new_tokens,
        "pass_tokens": cfg.infer.pass_tokens or cfg.infer.max_new_tokens,
        "repetition_penalty": cfg.infer.repetition_penalty,
        "kv_cache": cfg.infer.kv_cache,
        "eval_batch_size": cfg.eval_batch_size,
    }
    log.info("distill_student: %s on %s: %d train pairs (%d tokens), %d held-out pairs, %d eval users",
             version, base_path, len(train_ex), sum(len(e["input_ids"]) for e in train_ex), len(val_ex), len(eval_df))
    ctx.ray()
    from slimrec.student.train import run_trainer

    result = run_trainer(config, cfg.train, str(runs_dir(root)), version)
    if result.error is not None:
        raise result.error
    metrics = dict(result.metrics or {})
    dest = adapter_dir(root, version)
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        shutil.copytree(d, dest)
    student_rl = metrics.get("heldout_rouge_l_student")
    base_rl = metrics.get("heldout_rouge_l_base")
    log.info("distill_student: held-out ROUGE-L student %.4f vs base %.4f (%d users)",
             student_rl or 0.0, base_rl or 0.0, metrics.get("heldout_eval_users", 0))
    other = metrics.get("heldout_rouge_l_student_other_users")
    if student_rl is not None and other is not None:
        log.info("distill_student: the student's rationales against other users' teacher rationales: ROUGE-L %.4f "
                 "(teacher against other users: %.4f); distinct answers %.0f%% (teacher %.0f%%); parse ok %.0f%%",
                 other, metrics.get("heldout_rouge_l_teacher_other_users") or 0.0,
                 100 * (metrics.get("heldout_distinct_share_student") or 0.0),
                 100 * (metrics.get("heldout_distinct_share_teacher") or 0.0),
                 100 * (metrics.get("heldout_parse_ok_rate_student") or 0.0))
        if student_rl - other < 0.02:
            log.warning("distill_student: the student's rationales hardly depend on the user (ROUGE-L %.4f against "
                        "their own teacher rationales, %.4f against other users'): train longer or use a larger "
                        "base model", student_rl, other)
    if cfg.min_rouge_gain is not None and (student_rl is None or student_rl - (base_rl or 0.0) < cfg.min_rouge_gain):
        raise StudentQualityError(
            f"adapter {version} reaches held-out ROUGE-L {student_rl} against the base's {base_rl}: less than the "
            f"required gain of {cfg.min_rouge_gain}; nothing registered (adapter left at {dest})"
        )
    all_metrics = {**metrics, "seed": cfg.split_seed, "base_build": base_info, "train_seconds_total": round(time.perf_counter() - t0, 1),
                   "train_pairs": len(train_ex), "heldout_pairs": len(val_ex),
                   "max_target_items": cfg.max_target_items, "max_prompt_tokens": cfg.max_prompt_tokens}
    row = pd.DataFrame([{
        "model_version": version,
        "base_model": base_path,
        "adapter_path": str(dest),
        "lora_config": json.dumps(cfg.lora.model_dump(mode="json"), sort_keys=True),
        "train_rows": len(train_ex),
        "heldout_rows": len(val_ex),
        "train_loss": metrics.get("train_loss"),
        "val_loss": metrics.get("val_loss"),
        "heldout_rouge_l_student": student_rl,
        "heldout_rouge_l_base": base_rl,
        "metrics": json.dumps(all_metrics, sort_keys=True, default=str),
        "created_ts": datetime.now(tz=UTC),
    }])
    info = ctx.commit_info(STAGE, inputs, model_version=version, student_config=cfg.model_dump(mode="json"))
    v = lake.write_arrow("student_models", row, "merge", info)
    extra.update({k: metrics.get(k) for k in ("train_loss", "val_loss", "heldout_rouge_l_student",
                                             "heldout_rouge_l_base", "heldout_token_f1_student",
                                             "heldout_token_f1_base", "heldout_rouge_l_student_other_users",
                                             "heldout_distinct_share_student", "heldout_parse_ok_rate_student",
                                             "peak_rss_mb")})
    extra.update({k: v for k, v in metrics.items() if k.startswith("heldout_constrained_")})
    extra["epoch_seconds"] = (metrics.get("history") or {}).get("epoch_seconds")
    return StageResult(STAGE, tables={"student_models": v}, rows_in=len(pairs), rows_out=1, extra=extra)
