"""Which rows a validation looks at: the slice that the commit at a Delta version wrote.

The Delta log says how version N was written (``history()``: operation and
its parameters), and that decides the slice:

========================================  ==================================================
commit at version N                       slice validated
========================================  ==================================================
first commit, or an overwrite without a   ``table``: the whole table at N (every row is this
predicate (the stage rewrote the table)   run's output, so a stale ``run_date`` is a defect)
append, or an overwrite with a predicate  ``added``: the files version N added (= files at N
(``replace_date`` of one run_date)        minus files at N-1): exactly the rows written
MERGE and anything else                   ``run_date``: rows of version N dated the run's date.
                                          A merge rewrites whole files, so rows it did not
                                          touch reappear with their own (older) run_date:
                                          they are history, not this run's output.
========================================  ==================================================

When the commit carries ``slimrec.write_mode`` (every lake write records it),
that decides instead: append and replace_date -> ``added``, merge -> ``run_date``.

The run's date is the ``slimrec.run_date`` the stage stored in the commit
metadata unless the caller names one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal

from slimrec.lake import Lake
from slimrec.schemas.tables import spec

log = logging.getLogger(__name__)

SliceKind = Literal["table", "added", "run_date"]


class QualityError(RuntimeError):
    """Validation cannot run as asked (unknown table, no run date to check against)."""


@dataclass(frozen=True)
class Slice:
    table: str
    version: int
    run_date: date
    kind: SliceKind
    files: tuple[str, ...] = ()  # kind == "added": the files version N added
    operation: str = ""
    input_versions: dict[str, int | None] = field(default_factory=dict)  # lineage stored with the commit

    def describe(self) -> str:
        if self.kind == "table":
            return f"whole table at version {self.version} ({self.operation or 'first write'})"
        if self.kind == "added":
            return f"{len(self.files)} file(s) added by version {self.version} ({self.operation})"
        return f"rows of version {self.version} with run_date = {self.run_date} ({self.operation})"


def commit_at(lake: Lake, table: str, version: int) -> dict[str, Any]:
    """The Delta log's commit info of ``version`` (empty when the log no longer has it)."""
    for h in lake.history(table):
        if h.get("version") == version:
            return h
    return {}


def _kind(commit: dict[str, Any], version: int) -> SliceKind:
    op = str(commit.get("operation", "")).upper()
    params = commit.get("operationParameters") or {}
    mode = str(params.get("mode", "")).lower()
    partial = any(params.get(k) for k in ("predicate", "partitionFilters", "replaceWhere"))
    if version == 0:
        return "table"
    written = commit.get("slimrec.write_mode")  # the lake's own record of how it wrote this version
    if written in ("append", "replace_date"):
        return "added"
    if written == "merge":
        return "run_date"
    if (op == "WRITE" or op.startswith("CREATE") or op.startswith("REPLACE")) and mode == "overwrite" and not partial:
        return "table"
    if op == "WRITE" and (mode == "append" or (mode == "overwrite" and partial)):
        return "added"
    return "run_date"


def plan_slice(lake: Lake, table: str, version: int, run_date: date | None = None) -> Slice:
    """Decide what version ``version`` of ``table`` wrote (see the module docstring)."""
    commit = commit_at(lake, table, version)
    if run_date is None:
        raw = commit.get("slimrec.run_date")
        if not raw:
            raise QualityError(
                f"version {version} of {table} carries no slimrec.run_date in its commit metadata; "
                "pass the run date to check against"
            )
        run_date = date.fromisoformat(raw)
    try:
        inputs = json.loads(commit.get("slimrec.input_versions") or "{}")
    except json.JSONDecodeError:
        inputs = {}
    kind = _kind(commit, version)
    op = str(commit.get("operation", ""))
    mode = (commit.get("operationParameters") or {}).get("mode")
    op = f"{op} {mode}".strip() if mode else op
    files: tuple[str, ...] = ()
    if kind == "added":
        before = set(lake.file_uris(table, version - 1))
        files = tuple(f for f in lake.file_uris(table, version) if f not in before)
    return Slice(table, version, run_date, kind, files, op, inputs)


def read_slice(lake: Lake, spark, sl: Slice):
    """The slice as a Spark DataFrame with the table's columns."""
    from pyspark.sql import functions as F

    s = spec(sl.table)
    if sl.kind == "table":
        return lake.read_spark(spark, sl.table, sl.version)
    if sl.kind == "run_date":
        return lake.read_spark(spark, sl.table, sl.version).where(F.col("run_date") == F.lit(sl.run_date))
    if not sl.files:
        return spark.createDataFrame([], s.spark_schema())
    return lake.read_spark(spark, sl.table, sl.version, only_files=sl.files)  # the files this version added
