"""Delta data-file bookkeeping shared by the lake and the Spark file writers.

Pure pyarrow / delta-rs helpers with no Spark import: the per-file statistics
Delta readers use to skip files, the add-action that registers a written file
in a commit, and the split of rows diverted to a side output (a stage's
quarantine records). :mod:`slimrec.lake` and :mod:`slimrec.spark_delta` both
import from here, so neither has to import the other for them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
from deltalake.transaction import AddAction


def file_stats(t: pa.Table) -> dict:
    """Delta file stats: numRecords, nullCount, min/max of scalar columns."""
    mins, maxs, nulls = {}, {}, {}
    for name in t.column_names:
        col = t.column(name)
        nulls[name] = col.null_count
        ty = col.type
        if pa.types.is_list(ty) or pa.types.is_binary(ty) or len(t) == col.null_count:
            continue
        if pa.types.is_string(ty):
            continue  # string min/max are optional in Delta; skip to keep stats small
        mm = pc.min_max(col)
        lo, hi = mm["min"].as_py(), mm["max"].as_py()
        if hasattr(lo, "isoformat"):
            lo, hi = lo.isoformat(), hi.isoformat()
        if isinstance(lo, float) and (lo != lo or hi != hi):
            continue
        mins[name], maxs[name] = lo, hi
    return {"numRecords": len(t), "minValues": mins, "maxValues": maxs, "nullCount": nulls}


def split_diverted(t: pa.Table, column: str) -> tuple[pa.Table, pa.Table | None]:
    """``t`` -> (rows whose struct ``column`` is null, without it; the others' ``column`` fields, or None)."""
    col = t[column]
    if col.null_count == len(t):
        return t.drop_columns([column]), None
    hit = pc.is_valid(col)
    return t.filter(pc.invert(hit)).drop_columns([column]), pa.Table.from_struct_array(col.filter(hit).combine_chunks())


def partition_value(v) -> str | None:
    """A partition column's value as Delta writes it in the add-action (dates ISO, None stays None)."""
    if v is None:
        return None
    return v.isoformat() if hasattr(v, "isoformat") else str(v)


def make_add_action(path: str, size: int, partition_values: dict[str, str | None], stats: dict) -> AddAction:
    """The add-action of one data file; ``path`` is relative to the table root, ``size`` in bytes."""
    return AddAction(
        path=path,
        size=size,
        partition_values=partition_values,
        modification_time=int(datetime.now(tz=UTC).timestamp() * 1000),  # ms since epoch
        data_change=True,
        stats=json.dumps(stats),
    )
