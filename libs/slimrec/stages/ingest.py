"""Stage ingest: dataset folder -> raw_interactions, raw_items, items, interactions, quarantine."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa

from slimrec.ingest import (
    IngestError,
    checked_raw,
    dataset_fingerprint,
    detect_format,
    interaction_rows,
    normalise_items,
    read_amazon,
    read_events_spark,
    read_lcrec,
)
from slimrec.schemas.tables import spec
from slimrec.sequences import QUARANTINE_COLUMN
from slimrec.stages.base import StageContext, StageResult
from slimrec.text import sha1

log = logging.getLogger(__name__)

INPUTS: list[str] = []
OUTPUTS = ["raw_interactions", "raw_items", "items", "interactions", "quarantine"]
_EMPTY_RAW_ITEMS = pd.DataFrame({"source_file": pd.Series([], dtype=str), "source_row": pd.Series([], dtype="int64"),
                                 "item_raw": pd.Series([], dtype=str), "payload": pd.Series([], dtype=str)})


def _to_spark(spark, pdf, table: str):
    s = spec(table)
    cols = [c for c in s.column_names if c in pdf.columns]
    schema = pa.schema([s.arrow_schema().field(c) for c in cols])
    return spark.createDataFrame(pa.Table.from_pandas(pdf[cols], schema=schema, preserve_index=False))


def run(ctx: StageContext) -> StageResult:
    if not ctx.dataset_dir:
        raise IngestError("ingest needs --dataset DIR")
    cfg = ctx.cfg.ingest
    fmt, files = detect_format(Path(ctx.dataset_dir), cfg.format)
    log.info("ingest: %s format, files %s", fmt, {k: [p.name for p in v] for k, v in files.items()})
    if fmt == "events":
        spark = ctx.spark()
        raw_sdf, raw_items_sdf = read_events_spark(spark, files["interactions"], files["items"])
        raw_items = raw_items_sdf.toPandas() if raw_items_sdf is not None else None
        q_read = None
    else:
        reader = read_lcrec if fmt == "lcrec" else read_amazon
        # JSON sources are parsed before Spark starts: an unreadable document fails in a second.
        raw_pdf, raw_items, q_read = reader(files["interactions"], files["items"])
        spark = ctx.spark()
        raw_sdf = _to_spark(spark, raw_pdf, "raw_interactions")
    if raw_items is not None and len(raw_items):
        items, q_items = normalise_items(raw_items, cfg.max_text_chars, cfg.max_id_chars)
        items_sdf = _to_spark(spark, items, "items")
    else:
        # No catalogue file: the catalogue is the set of item ids seen, with no text.
        log.warning("ingest: no item file; items are derived from the interactions, without text")
        items, q_items, items_sdf = None, None, None
    checked = checked_raw(raw_sdf, items_sdf, cfg.max_id_chars)
    info = ctx.commit_info("ingest", {}, format=fmt, dataset=str(ctx.dataset_dir),
                           dataset_fingerprint=dataset_fingerprint(ctx.dataset_dir))
    lake = ctx.lake
    engine = ctx.cfg.spark.delta_engine
    # One pass: every raw row is written as an interaction or comes back as its quarantine record, and
    # goes to raw_interactions as read (the delta-rs engine; delta-spark writes raw_interactions apart).
    # First, so that a source with no valid row writes nothing: a lake keeps its last good ingest.
    tee = "raw_interactions" if engine == "delta-rs" else None
    split = lake.write_spark_diverting(interaction_rows(checked, cfg.order_base_ts, keep_raw=tee is not None),
                                       "interactions", "overwrite", info, QUARANTINE_COLUMN, engine, skip_empty=True,
                                       tee=tee)
    n_inter, q_inter = split.rows, split.diverted.to_pandas()
    if not n_inter:
        top = q_inter["reason"].value_counts().head(3) if len(q_inter) else {}
        why = "; ".join(f"{r}: {n}" for r, n in top.items()) or "the files hold no records"
        raise IngestError(f"no valid interactions in {ctx.dataset_dir} ({len(q_inter)} rows read; {why})")
    if items is None:
        items = lake.read_spark(spark, "interactions").select("item_id").distinct().toPandas()
        items = items.assign(title=None, brand=None, categories=[[] for _ in range(len(items))], description=None,
                             item_text="unknown item", text_hash=sha1("unknown item"))
    versions = {
        "interactions": split.version,
        "raw_interactions": (split.tee_version if tee else
                             lake.write_spark(raw_sdf, "raw_interactions", "overwrite", info, engine=engine)),
        "raw_items": lake.write_arrow("raw_items", raw_items if raw_items is not None else _EMPTY_RAW_ITEMS, "overwrite", info),
        "items": lake.write_arrow("items", items, "overwrite", info),
    }
    n_raw = n_inter + len(q_inter)
    parts = [q for q in (q_inter, q_read, q_items) if q is not None and len(q)]
    q_all = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(q_all):
        q_all["source_row"] = q_all["source_row"].astype("Int64")
    # ingest rewrites its tables: records of an earlier ingest that this one did not produce go too
    versions["quarantine"] = lake.replace_quarantine("ingest", q_all, info)
    if len(q_all):
        for reason, n in q_all["reason"].value_counts().items():
            log.warning("ingest: quarantined %d rows: %s", n, reason)
    log.info("ingest: %d raw rows -> %d interactions, %d items, %d quarantined", n_raw, n_inter, len(items), len(q_all))
    return StageResult(
        "ingest", versions, rows_in=n_raw, rows_out=n_inter,
        extra={"format": fmt, "items": int(len(items)), "quarantined": int(len(q_all))},
    )
