"""Each table declared once: Spark and Arrow schemas agree, keys and partitions are real columns."""

from __future__ import annotations

from datetime import date

import pyarrow as pa
import pytest
from slimrec.schemas.tables import TABLES, arrow_type, spec


@pytest.mark.parametrize("name", sorted(TABLES))
def test_keys_partitions_and_lineage_are_columns(name):
    s = TABLES[name]
    assert set(s.key) <= set(s.column_names)
    assert set(s.partition_by) <= set(s.column_names)
    assert len(s.column_names) == len(set(s.column_names))
    assert ("run_date" in s.column_names) and ("input_versions" in s.column_names)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_spark_arrow_round_trip(spark, name):
    """An empty Spark frame of the spec's Spark schema converts to exactly the spec's Arrow types."""
    s = TABLES[name]
    got = spark.createDataFrame([], s.spark_schema()).toArrow().schema
    want = s.arrow_schema()
    assert got.names == want.names
    for g, w in zip(got, want, strict=True):
        # Spark hands out timestamps in the session time zone (UTC in our sessions)
        assert g.type == w.type, (name, g.name, g.type, w.type)


def test_logical_types():
    assert arrow_type("list<float32>") == pa.list_(pa.float32())
    assert arrow_type("timestamp") == pa.timestamp("us", tz="UTC")
    with pytest.raises(ValueError, match="unknown logical type"):
        arrow_type("decimal")
    with pytest.raises(KeyError, match="unknown table"):
        spec("nope")


def test_conform_arrow_orders_and_names_missing_columns():
    s = spec("quarantine")
    t = pa.table({"reason": ["r"], "stage": ["s"], "source": ["f"], "source_row": [1], "payload": [None],
                  "run_date": pa.array([date(2024, 1, 1)], pa.date32()), "input_versions": [None]})
    assert s.conform_arrow(t).schema.names == s.column_names
    with pytest.raises(ValueError, match=r"missing columns \['reason'\]"):
        s.conform_arrow(t.drop(["reason"]))


def test_conform_arrow_refuses_nulls_in_not_null_columns():
    s = spec("quarantine")
    t = pa.table({"stage": ["s"], "source": ["f"], "source_row": [1], "reason": ["r"], "payload": [None],
                  "run_date": pa.array([None], pa.date32()), "input_versions": [None]})
    with pytest.raises(ValueError, match="run_date"):
        s.conform_arrow(t)


def test_conform_arrow_fills_columns_added_later_with_null():
    s = spec("metrics")
    row = {"run_id": "r", "dataset": "d", "backbone": "b", "variant": "v", "protocol": "full", "split": "test",
           "seed": 0, "hr_10": 0.5, "hr_20": 0.5, "ndcg_10": 0.3, "ndcg_20": 0.3, "mrr": 0.2, "n_users": 1,
           "run_date": date(2024, 1, 1), "input_versions": None}
    t = s.conform_arrow(pa.Table.from_pylist([row]))
    assert t.schema.names == s.column_names and t.column("gini_10").null_count == 1
    with pytest.raises(ValueError, match=r"missing columns \['mrr'\]"):  # an original column is still required
        s.conform_arrow(pa.Table.from_pylist([row]).drop(["mrr"]))


def test_a_column_added_later_must_be_nullable():
    from slimrec.schemas.tables import Column

    with pytest.raises(ValueError, match="must be nullable"):
        Column("x", "float64", nullable=False, added_later=True)
