"""Derived ``dq_*`` columns, computed in Spark before Great Expectations runs.

GE 1.x has no expectation for "every id in this array exists in that table"
or "no NaN inside this array"; instead of custom expectations, each such rule
becomes a column (declared in ``schemas/expectations.py``) that a standard
expectation then checks, so every rule is reported the same way: the
expectation, its column, the observed value and the offending rows.

Example (user_sequences; items holds i1 and i2)::

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


def _missing(df, d: Derived, refs: RefReader, max_listed: int):
    """Unknown ids in two steps, without joining the slice back to itself.

    1. the distinct ids of the slice that ``table.key`` lacks (one anti-join; usually none) are
       collected, at most ``max_listed`` of them;
    2. each row keeps those of its ids that are in that list (a projection, no shuffle).
    """
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    m = d.missing
    is_array = isinstance(df.schema[m.column].dataType, T.ArrayType)
    ids = df.select((F.explode(m.column) if is_array else F.col(m.column)).alias("_dq_id"))
    ids = ids.where(F.col("_dq_id").isNotNull()).distinct()
    keys = refs.read(m.table).select(F.col(m.key).alias("_dq_id"))
    unknown = [r[0] for r in ids.join(keys, "_dq_id", "left_anti").limit(max_listed + 1).collect()]
    if len(unknown) > max_listed:
        refs.notes.append(
            f"{d.name}: more than {max_listed} distinct ids of {m.column} are missing from {m.table}; "
            f"rows are flagged for the first {max_listed} only (unexpected counts are lower bounds)"
        )
        unknown = unknown[:max_listed]
    if not unknown:
        return df.withColumn(d.name, F.lit(None).cast(df.schema[m.column].dataType))
    listed = F.array(*[F.lit(x) for x in sorted(unknown)])
    if is_array:
        value = F.array_sort(F.array_distinct(F.array_intersect(F.col(m.column), listed)))
        return df.withColumn(d.name, F.when(F.size(value) > 0, value))
    return df.withColumn(d.name, F.when(F.array_contains(listed, F.col(m.column)), F.col(m.column)))


def _lookup(df, d: Derived, refs: RefReader):
    from pyspark.sql import functions as F

    lk = d.lookup
    ref = refs.read(lk.table).select(*lk.on, *[F.col(c).alias(f"ref_{c}") for c in lk.columns])
    ref = ref.dropDuplicates(list(lk.on))  # a duplicate key there is that table's defect, not this one's
    out = df.join(ref, list(lk.on), "left").withColumn(d.name, F.expr(d.sql))
    return out.drop(*[f"ref_{c}" for c in lk.columns])


def _expected_dim(df, d: Derived, th: Thresholds):
    """Configured dimension of the row's encoder (by full id or by name), else its most common dim in the slice."""
    from pyspark.sql import functions as F

    counts = df.groupBy("encoder", "dim").count().collect()  # encoders x dims: a handful of rows
    mode: dict[str, tuple[int, int]] = {}
    for r in counts:
        if r["encoder"] is not None and r["dim"] is not None:
            mode[r["encoder"]] = max(mode.get(r["encoder"], (-1, -1)), (r["count"], r["dim"]))
    configured = dict(th.embedding_dims)
    expected = {}
    for enc, (_, dim) in mode.items():
        # "all-MiniLM-L6-v2:st:norm:256" (name:pooling:norm:max_len, see slimrec.embed) matches its name too.
        expected[enc] = configured.get(enc, configured.get(enc.split(":")[0], dim))
    if not expected:
        return df.withColumn(d.name, F.col("dim").cast("int"))
    lit_map = F.create_map(*[x for k, v in sorted(expected.items()) for x in (F.lit(k), F.lit(v))])
    # A null encoder is the not-null check's defect; comparing its dim with nothing would report it twice.
    value = F.when(F.col("encoder").isNull(), F.col("dim")).otherwise(lit_map[F.col("encoder")])
    return df.withColumn(d.name, value.cast("int"))


def add_derived(df, suite: Suite, refs: RefReader, th: Thresholds, max_listed_missing: int = 10_000):
    """``df`` plus every derived column of ``suite``."""
    from pyspark.sql import functions as F

    for d in suite.derived:
        if d.missing is not None:
            df = _missing(df, d, refs, max_listed_missing)
        elif d.lookup is not None:
            df = _lookup(df, d, refs)
        elif d.expected_dim:
            df = _expected_dim(df, d, th)
        elif d.sql is not None:
            df = df.withColumn(d.name, F.expr(d.sql))
        else:
            raise ValueError(f"derived column {d.name} of {suite.name} has no definition")
    return df
