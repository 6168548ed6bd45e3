"""Derived ``dq_*`` columns, computed in Spark before Great Expectations runs.

GE 1.x has no expectation for "every id in this array exists in that table"
or "no NaN inside this array"; instead of custom expectations, each such rule
becomes a column (declared in ``schemas/expectations.py``) that a standard
expectation then checks, so every rule is reported the same way: the
expectation, its column, the observed value and the offending rows.

Example (user_sequences, items holds i1 and i2)::

    user_id  item_ids        dq_unknown_item_ids
    u1       [i1, i2, i1]    null
    u2       [i1, i9, i8]    [i8, i9]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from slimrec.lake import Lake
from slimrec.schemas.expectations import Derived, Suite, Thresholds
from slimrec.schemas.tables import spec

log = logging.getLogger(__name__)

ROW_ID = "_dq_row"


class RefReader:
    """Reads referenced tables once per validation, at the version the slice's lineage names."""

    def __init__(self, lake: Lake, spark, input_versions: Mapping[str, int | None]):
        self.lake, self.spark, self.input_versions = lake, spark, dict(input_versions)
        self.notes: list[str] = []
        self.versions: dict[str, int | None] = {}
        self._cache: dict[str, object] = {}

    def read(self, table: str):
        if table in self._cache:
            return self._cache[table]
        if not self.lake.exists(table):
            self.notes.append(f"{table} does not exist: every reference to it counts as missing")
            df = self.spark.createDataFrame([], spec(table).spark_schema())
            self.versions[table] = None
        else:
            v = self.input_versions.get(table)
            latest = self.lake.version(table)
            if v is None or v > latest:
                v = latest
            df = self.lake.read_spark(self.spark, table, v)
            self.versions[table] = v
        self._cache[table] = df
        return df


def _missing(df, d: Derived, refs: RefReader):
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    m = d.missing
    is_array = isinstance(df.schema[m.column].dataType, T.ArrayType)
    ids = df.select(ROW_ID, (F.explode(m.column) if is_array else F.col(m.column)).alias("_dq_id"))
    ids = ids.where(F.col("_dq_id").isNotNull())
    keys = refs.read(m.table).select(F.col(m.key).alias("_dq_id")).distinct()
    agg = F.array_sort(F.collect_set("_dq_id")) if is_array else F.first("_dq_id")
    unknown = ids.join(keys, "_dq_id", "left_anti").groupBy(ROW_ID).agg(agg.alias(d.name))
    return df.join(unknown, ROW_ID, "left")


def _lookup(df, d: Derived, refs: RefReader):
    from pyspark.sql import functions as F

    lk = d.lookup
    ref = refs.read(lk.table).select(*lk.on, *[F.col(c).alias(f"ref_{c}") for c in lk.columns])
    ref = ref.dropDuplicates(list(lk.on))  # a duplicate key there is that table's defect, not this one's
    out = df.join(ref, list(lk.on), "left").withColumn(d.name, F.expr(d.sql))
    return out.drop(*[f"ref_{c}" for c in lk.columns])


def _expected_dim(df, d: Derived, th: Thresholds):
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    counts = df.groupBy("encoder", "dim").count()
    w = Window.partitionBy("encoder").orderBy(F.desc("count"), F.desc("dim"))
    modes = counts.withColumn("_r", F.row_number().over(w)).where("_r = 1").select("encoder", F.col("dim").alias("_mode"))
    configured = dict(th.embedding_dims)
    if configured:
        lit_map = F.create_map(*[x for k, v in configured.items() for x in (F.lit(k), F.lit(v))])
        expected = F.coalesce(lit_map[F.col("encoder")], F.col("_mode"))
    else:
        expected = F.col("_mode")
    # A null encoder is the not-null check's defect; comparing its dim with nothing would report it twice.
    expected = F.when(F.col("encoder").isNull(), F.col("dim")).otherwise(expected)
    return df.join(F.broadcast(modes), "encoder", "left").withColumn(d.name, expected.cast("int")).drop("_mode")


def add_derived(df, suite: Suite, refs: RefReader, th: Thresholds):
    """``df`` (with a ``_dq_row`` id column) plus every derived column of ``suite``."""
    from pyspark.sql import functions as F

    for d in suite.derived:
        if d.missing is not None:
            df = _missing(df, d, refs)
        elif d.lookup is not None:
            df = _lookup(df, d, refs)
        elif d.expected_dim:
            df = _expected_dim(df, d, th)
        elif d.sql is not None:
            df = df.withColumn(d.name, F.expr(d.sql))
        else:
            raise ValueError(f"derived column {d.name} of {suite.name} has no definition")
    return df
