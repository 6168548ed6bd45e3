"""What every stage receives and returns.

A stage module ``slimrec.stages.<name>`` defines ``INPUTS`` (tables read),
``OUTPUTS`` (tables written) and ``run(ctx) -> StageResult``. It reads through
``ctx.lake``, calls pure transforms, and writes through ``ctx.lake`` with
``ctx.commit_info(...)``; the runner validates every output table afterwards.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from slimrec.config import PipelineConfig
from slimrec.lake import CommitInfo, Lake

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    stage: str
    tables: dict[str, int | None] = field(default_factory=dict)  # table -> Delta version written (None: no commit)
    rows_in: int = 0
    rows_out: int = 0
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # cost_usd, tokens, calls, ... (JSON-able)


@dataclass
class StageContext:
    cfg: PipelineConfig
    lake: Lake
    run_date: date
    dry_run: bool = False
    force: bool = False
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    dataset_dir: str | None = None
    _spark: Any = None
    _spark_owned: bool = False  # this context started the session (rather than joining a running one)

    def spark(self):
        """The stage's SparkSession, started on first use from ``cfg.spark``."""
        if self._spark is None:
            from pyspark.sql import SparkSession

            from slimrec.spark import get_spark

            self._spark_owned = SparkSession.getActiveSession() is None
            self._spark = get_spark(self.cfg.spark)
        return self._spark

    def release_memory(self) -> None:
        """Between stages: this process's freed heap back to the OS (:func:`slimrec.memory.release_free_heap`)
        and a full collection in the JVM of a Spark session this context started, so its heap shrinks to what
        it holds (:func:`slimrec.memory.shrink_jvm_heap`; a joined session is left alone)."""
        from slimrec.memory import release_free_heap, shrink_jvm_heap

        release_free_heap()
        if self._spark is not None and self._spark_owned:
            shrink_jvm_heap(self._spark)

    def ray(self) -> None:
        """Start or join Ray (``cfg.ray_address``; local by default)."""
        from slimrec.rayutil import ensure_ray

        ensure_ray(self.cfg.ray_address)

    def input_versions(self, tables: list[str]) -> dict[str, int | None]:
        return {t: self.lake.version(t) for t in tables}

    def commit_info(self, stage: str, inputs: dict[str, int | None], **extra: Any) -> CommitInfo:
        return CommitInfo(
            stage=stage,
            run_date=self.run_date,
            run_id=self.run_id,
            config_hash=self.cfg.config_hash(),
            input_versions=inputs,
            extra=extra,
        )


def rows_naming_unknown_items(lake: Lake, table: str, key: list[str], known, version: int | None = None,
                              filters=None):
    """Keys (an Arrow table) of ``table``'s rows whose ``grounded_item_ids`` name an item not in ``known``
    (the current catalogue's ids): answers grounded in a catalogue that a re-ingest has since replaced.

    Example: a cached row grounded in ``["i1", "i9"]`` with ``known = {"i1", "i2"}`` -> its key.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    t = lake.read_arrow(table, version=version, columns=[*key, "grounded_item_ids"], filters=filters)
    ids = t["grounded_item_ids"].combine_chunks()
    unknown = pc.invert(pc.is_in(pc.list_flatten(ids), pa.array(sorted(known), pa.string())))
    mask = np.zeros(t.num_rows, dtype=bool)
    mask[pc.filter(pc.list_parent_indices(ids), unknown).to_numpy()] = True
    return t.filter(pa.array(mask)).select(key)


def delete_rows_naming_unknown_items(ctx: StageContext, table: str, key: list[str], inputs: dict,
                                     version: int | None = None, filters=None):
    """Delete ``table``'s rows grounded in items the catalogue (``inputs["items"]``) no longer has, in one
    commit: (their keys, the new version or None when there were none)."""
    known = set(ctx.lake.read_pandas("items", version=inputs["items"], columns=["item_id"])["item_id"])
    stale = rows_naming_unknown_items(ctx.lake, table, key, known, version=version, filters=filters)
    if not stale.num_rows:
        return stale, None
    v = ctx.lake.delete_keys(table, stale, ctx.commit_info(table, inputs, deleted=stale.num_rows))
    log.warning("%s: %d rows named items no longer in the catalogue: deleted", table, stale.num_rows)
    return stale, v
