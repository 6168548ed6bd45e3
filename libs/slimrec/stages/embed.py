"""Stage embed: items, student and teacher rationales -> item_embeddings, rationale_embeddings.

Only rows whose text (``text_hash``) or encoder changed are encoded: the
candidates are anti-joined with what the tables already hold for this
encoder id, the rest is left as it is. All texts of a run go through one Ray
Data actor pool (one model load per actor), then each table gets one MERGE
commit on its key; a run with nothing to encode makes no commit.
A missing rationale table is skipped with a log line (its stage has not run).

``StageResult.extra``: encoder id, rows encoded per table and source, texts
encoded (steps mode: up to three per rationale; ``texts_by_source``: item,
teacher, student) and ``encode_s`` /
``texts_per_s``, wall clock of the Ray pass including the actor pool's start
and model load.
"""

from __future__ import annotations

import logging
import time

import pandas as pd

from slimrec.embed.encoder import resolve_encoder
from slimrec.embed.ray_encode import encode
from slimrec.embed.texts import (
    ITEM_KEY,
    RATIONALE_KEY,
    changed_rows,
    flatten_texts,
    item_texts,
    pool_vectors,
    rationale_texts,
    with_vectors,
)
from slimrec.schemas.tables import spec as table_spec
from slimrec.stages.base import StageContext, StageResult
from slimrec.teacher.planted import drop_planted

log = logging.getLogger(__name__)

INPUTS = ["items", "student_rationales", "teacher_rationales"]
OUTPUTS = ["item_embeddings", "rationale_embeddings"]

_RATIONALE_COLS = ["user_id", "run_date", "status", "rationale", "step1", "step2", "step3"]
_SOURCES = {
    # source -> (table, column that names the model, extra columns: tie-breaks, where the row came from)
    "student": ("student_rationales", "model_version", ["rationale_source"]),
    "teacher": ("teacher_rationales", "teacher_model", ["answered_ts"]),
}


def _existing(ctx: StageContext, table: str, columns: list[str], encoder_id: str) -> pd.DataFrame:
    if ctx.force or not ctx.lake.exists(table):
        return pd.DataFrame(columns=columns)
    return ctx.lake.read_pandas(table, columns=columns, filters=[("encoder", "=", encoder_id)])


def _rationale_candidates(ctx: StageContext, inputs: dict[str, int | None]) -> tuple[pd.DataFrame, dict[str, int]]:
    cfg = ctx.cfg.embed
    frames, counts = [], {}
    for source in cfg.sources:
        table, version_col, extra = _SOURCES[source]
        if inputs.get(table) is None:
            log.info("embed: %s does not exist yet: %s rationales skipped", table, source)
            continue
        raw = ctx.lake.read_pandas(table, version=inputs[table], columns=_RATIONALE_COLS + [version_col] + extra)
        version = cfg.student_model_version if source == "student" else cfg.teacher_model
        if source == "teacher" and version is None:
            raw = drop_planted(raw, version_col)  # a planted experiment's rows only when named
        rows = rationale_texts(raw, source, cfg.rationale_text, version_col, version)
        log.info("embed: %s: %d rows -> %d users with an ok rationale", table, len(raw), len(rows))
        frames.append(rows)
        counts[source] = len(rows)
    cols = ["user_id", "source", "model_version", "texts", "text_hash", "rationale_source"]
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)), counts


def run(ctx: StageContext) -> StageResult:
    cfg, lake = ctx.cfg.embed, ctx.lake
    enc = resolve_encoder(cfg)
    log.info("embed: encoder %s from %s; config %s", enc.encoder_id, enc.path, cfg.model_dump_json())
    inputs = ctx.input_versions(INPUTS)

    items = item_texts(lake.read_pandas("items", version=inputs["items"], columns=["item_id", "item_text", "text_hash"]))
    rationales, per_source = _rationale_candidates(ctx, inputs)
    todo_items = changed_rows(
        items, _existing(ctx, "item_embeddings", ["item_id", "text_hash"], enc.encoder_id), ITEM_KEY, ["text_hash"]
    )
    # model_version too: the same text from another model is relabelled (its vector is reused below).
    old_r = _existing(ctx, "rationale_embeddings", ["user_id", "source", "model_version", "text_hash"], enc.encoder_id)
    todo_rat = changed_rows(rationales, old_r, RATIONALE_KEY, ["text_hash", "model_version"])
    # A changed row whose text some row already has a vector for (another model wrote the same text, as a
    # planted experiment's unplanted users do) takes that vector: same text, encoder and pooling, same vector.
    todo_rat, reused = _reuse_by_text(ctx, todo_rat, enc.encoder_id)

    rows_in = len(items) + len(rationales)
    n_texts = int(todo_items["texts"].map(len).sum() + todo_rat["texts"].map(len).sum())
    extra = {
        "encoder": enc.encoder_id,
        "items_encoded": len(todo_items),
        "rationales_encoded": {s: int((todo_rat["source"] == s).sum()) for s in per_source},
        "rationale_candidates": per_source,
        "texts_encoded": n_texts,
        # texts per source: the cost table charges each rationale variant its source's share of the stage
        "texts_by_source": {"item": int(todo_items["texts"].map(len).sum()),
                            **{s: int(todo_rat.loc[todo_rat["source"] == s, "texts"].map(len).sum())
                               for s in per_source}},
    }
    log.info(
        "embed: %d items (%d changed), %d rationales (%d changed) -> %d texts to encode",
        len(items), len(todo_items), len(rationales), len(todo_rat), n_texts,
    )
    versions: dict[str, int | None] = {"item_embeddings": None, "rationale_embeddings": None}
    # Vectors of items no longer in the catalogue (a re-ingest replaced it) go, whatever their encoder.
    gone = _stale_items(lake, set(items["item_id"])) if not ctx.dry_run else None
    if gone is not None and len(gone):
        info = ctx.commit_info("embed", inputs, deleted_items=len(gone))
        versions["item_embeddings"] = lake.delete_keys("item_embeddings", gone, info)
        extra["items_deleted"] = len(gone)
        log.warning("embed: %d item vectors of items no longer in the catalogue: deleted", len(gone))
    extra["rationales_reused"] = len(reused)
    if not ctx.dry_run and n_texts == 0 and len(reused):
        out = reused[_out_cols("rationale_embeddings")]
        info = ctx.commit_info("embed", inputs, rows_encoded=0, rows_reused=len(out), encoder=enc.encoder_id,
                               rationale_text=cfg.rationale_text)
        versions["rationale_embeddings"] = lake.write_arrow("rationale_embeddings", out, "merge", info)
        log.info("embed: nothing to encode; %d rationale vectors reused by text hash", len(out))
        return StageResult("embed", versions, rows_in=rows_in, rows_out=len(out), extra=extra)
    if ctx.dry_run or n_texts == 0:
        if n_texts == 0:
            log.info("embed: nothing changed for encoder %s: no commit", enc.encoder_id)
        return StageResult("embed", versions, rows_in=rows_in, rows_out=0, skipped=ctx.dry_run, extra=extra)

    # One pass over every text: one model load (per actor, on the pool) for the whole run.
    work = pd.concat([todo_items.assign(_part="item"), todo_rat.assign(_part="rationale")], ignore_index=True)
    flat, owner = flatten_texts(work)
    t0 = time.perf_counter()
    encoded, engine = encode(flat, enc, cfg, start_ray=ctx.ray)
    vectors = pool_vectors(encoded, owner, len(work), cfg.normalize)  # (rows, dim)
    encode_s = time.perf_counter() - t0
    extra.update(encode_s=round(encode_s, 2), texts_per_s=round(n_texts / max(encode_s, 1e-9), 1), engine=engine)
    log.info("embed: encoded %d texts in %.1f s (%.1f texts/s, %s)", n_texts, encode_s,
             n_texts / max(encode_s, 1e-9), "Ray actor pool" if engine == "pool" else "this process")

    is_item = (work["_part"] == "item").to_numpy()
    # Every input's version in both commits: the pipeline's skip check reads them from item_embeddings.
    commit_extra = {"encoder": enc.encoder_id, "rationale_text": cfg.rationale_text}
    if is_item.any():
        out = with_vectors(todo_items, vectors[is_item], enc.encoder_id, _out_cols("item_embeddings"))
        info = ctx.commit_info("embed", inputs, rows_encoded=len(out), **commit_extra)
        versions["item_embeddings"] = lake.write_arrow("item_embeddings", out, "merge", info)
    if (~is_item).any() or len(reused):
        out = with_vectors(todo_rat, vectors[~is_item], enc.encoder_id, _out_cols("rationale_embeddings"))
        out = pd.concat([out, reused[out.columns]], ignore_index=True) if len(reused) else out
        info = ctx.commit_info("embed", inputs, rows_encoded=len(out), **commit_extra)
        versions["rationale_embeddings"] = lake.write_arrow("rationale_embeddings", out, "merge", info)
    rows_out = len(work)
    log.info("embed: wrote %d item and %d rationale vectors", int(is_item.sum()), int((~is_item).sum()))
    return StageResult("embed", versions, rows_in=rows_in, rows_out=rows_out, extra=extra)


def _reuse_by_text(ctx: StageContext, todo: pd.DataFrame, encoder_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows still to encode, rows given the stored vector of an identical text: output columns + texts)."""
    cols = _out_cols("rationale_embeddings")
    if todo.empty or ctx.force or not ctx.lake.exists("rationale_embeddings"):
        return todo, pd.DataFrame(columns=cols)
    old = ctx.lake.read_pandas("rationale_embeddings", columns=["text_hash", "embedding", "dim"],
                               filters=[("encoder", "=", encoder_id)])
    old = old[old["text_hash"].isin(set(todo["text_hash"]))].drop_duplicates("text_hash")
    if old.empty:
        return todo, pd.DataFrame(columns=cols)
    hit = todo["text_hash"].isin(set(old["text_hash"]))
    reused = todo[hit].drop(columns=["texts"]).merge(old, on="text_hash", how="left").assign(encoder=encoder_id)
    log.info("embed: %d of %d changed rationales have an identical text already encoded: vectors reused",
             int(hit.sum()), len(todo))
    return todo[~hit].reset_index(drop=True), reused[cols]


def _stale_items(lake, current: set):
    """item_embeddings' keys (an Arrow table) whose item is not in ``current``, or None without the table."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not lake.exists("item_embeddings"):
        return None
    keys = lake.read_arrow("item_embeddings", columns=list(table_spec("item_embeddings").key))
    return keys.filter(pc.invert(pc.is_in(keys["item_id"], pa.array(sorted(current), pa.string()))))


def _out_cols(table: str) -> list[str]:
    """Output columns without the lineage ones (the lake fills run_date, input_versions)."""
    return [c for c in table_spec(table).column_names if c not in ("run_date", "input_versions")]

