"""The lake on real Spark and real Delta: modes, time travel, metadata, other engines reading.

Every test that takes ``tmp_lake`` runs twice: on local disk and on a real S3 server (SeaweedFS on
127.0.0.1), where Spark's executors write and read through pyarrow's S3 filesystem."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest
from slimrec.lake import CommitInfo, LakeError, duckdb_connection


def _interactions(spark, rows):
    return spark.createDataFrame(
        rows, "user_id string, item_id string, event_ts timestamp, event_seq long, ts_derived boolean, source_file string"
    )


def _prompts(spark, users, seq_hash="h0"):
    return spark.createDataFrame(
        [(u, "tp", "sp", "v1", f"ph-{u}", 3, 3, ["a", "b"], seq_hash) for u in users],
        "user_id string, teacher_prompt string, student_prompt string, prompt_version string, prompt_hash string, "
        "history_len int, n_prompt_items int, prompt_item_ids array<string>, seq_hash string",
    )


@pytest.fixture(params=["local", "s3"])
def tmp_lake(request, tmp_path):
    from slimrec.lake import Lake

    return Lake(tmp_path / "lake") if request.param == "local" else request.getfixturevalue("s3_lake")


def info(d=date(2024, 1, 2), **inputs):
    return CommitInfo("test_stage", d, "run1", "cfg123", inputs or {"interactions": 3})


def test_append_overwrite_and_time_travel(spark, tmp_lake):
    t = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    df = _interactions(spark, [("u1", "a", t, 0, False, "f"), ("u2", "b", t, 1, True, None)])
    assert tmp_lake.write_spark(df, "interactions", "overwrite", info()) == 0
    assert tmp_lake.write_spark(df, "interactions", "append", info()) == 1
    assert tmp_lake.count("interactions") == 4
    assert tmp_lake.write_spark(df.limit(1), "interactions", "overwrite", info()) == 2
    assert tmp_lake.count("interactions") == 1
    assert tmp_lake.count("interactions", version=1) == 4  # time travel
    assert tmp_lake.read_spark(spark, "interactions", version=0).count() == 2
    got = tmp_lake.read_pandas("interactions", version=0).sort_values("user_id")
    assert got["event_ts"].iloc[0] == t  # microsecond UTC timestamps survive the round trip
    assert list(got["run_date"]) == [date(2024, 1, 2)] * 2
    assert json.loads(got["input_versions"].iloc[0]) == {"interactions": 3}


def test_commit_metadata(spark, tmp_lake):
    t = datetime(2024, 1, 1, tzinfo=UTC)
    tmp_lake.write_spark(_interactions(spark, [("u1", "a", t, 0, False, "f")]), "interactions", "overwrite",
                         info(items=7))
    last = tmp_lake.last_commit("interactions")
    assert last["slimrec.stage"] == "test_stage"
    assert last["slimrec.run_date"] == "2024-01-02"
    assert last["slimrec.config_hash"] == "cfg123"
    assert json.loads(last["slimrec.input_versions"]) == {"items": 7}


def test_replace_date_replaces_only_its_slice(spark, tmp_lake):
    d1, d2 = date(2024, 1, 1), date(2024, 1, 2)
    tmp_lake.write_spark(_prompts(spark, ["u1", "u2"]), "prompts", "replace_date", info(d1))
    tmp_lake.write_spark(_prompts(spark, ["u3"]), "prompts", "replace_date", info(d2))
    # rerun of d1 with one user: d1 slice replaced, d2 untouched, nothing appended twice
    tmp_lake.write_spark(_prompts(spark, ["u1"]), "prompts", "replace_date", info(d1))
    got = sorted(map(tuple, tmp_lake.read_pandas("prompts")[["user_id", "run_date"]].values.tolist()))
    assert got == [("u1", d1), ("u3", d2)]
    # Spark reads the partition column back from the paths with the right type
    rows = sorted((r.user_id, r.run_date) for r in tmp_lake.read_spark(spark, "prompts").collect())
    assert rows == [("u1", d1), ("u3", d2)]


def test_replace_date_refuses_rows_of_another_date(spark, tmp_lake):
    from pyspark.sql import functions as F

    df = _prompts(spark, ["u1"]).withColumn("run_date", F.lit(date(2023, 5, 5)))
    with pytest.raises(LakeError, match="run_date"):
        tmp_lake.write_spark(df, "prompts", "replace_date", info(date(2024, 1, 1)))


def test_replace_date_needs_a_partitioned_table(spark, tmp_lake):
    t = datetime(2024, 1, 1, tzinfo=UTC)
    with pytest.raises(LakeError, match="partitioned by run_date"):
        tmp_lake.write_spark(_interactions(spark, [("u1", "a", t, 0, False, "f")]), "interactions", "replace_date", info())


def test_merge_upserts_on_key(spark, tmp_lake):
    d = date(2024, 1, 1)
    tmp_lake.write_spark(_prompts(spark, ["u1", "u2"], "old"), "prompts", "replace_date", info(d))
    tmp_lake.write_spark(_prompts(spark, ["u2", "u3"], "new"), "prompts", "merge", info(d))
    got = dict(tmp_lake.read_pandas("prompts")[["user_id", "seq_hash"]].values.tolist())
    assert got == {"u1": "old", "u2": "new", "u3": "new"}
    # insert-only merge leaves matched rows alone
    tmp_lake.write_spark(_prompts(spark, ["u1", "u4"], "other"), "prompts", "merge", info(d), update=False)
    got = dict(tmp_lake.read_pandas("prompts")[["user_id", "seq_hash"]].values.tolist())
    assert got == {"u1": "old", "u2": "new", "u3": "new", "u4": "other"}


def test_other_engines_read_what_spark_wrote(spark, tmp_lake):
    t = datetime(2024, 1, 1, tzinfo=UTC)
    rows = [(f"u{i}", f"i{i % 3}", t, i, False, "f") for i in range(7)]
    tmp_lake.write_spark(_interactions(spark, rows).repartition(3), "interactions", "overwrite", info())
    tmp_lake.write_spark(_prompts(spark, ["u1", "u2"]), "prompts", "replace_date", info())
    con = duckdb_connection(tmp_lake)
    n, users = con.sql(
        f"SELECT count(*), count(DISTINCT user_id) FROM delta_scan('{tmp_lake.path('interactions')}')"
    ).fetchone()
    assert (n, users) == (7, 7)
    duck = con.sql(f"SELECT user_id, run_date FROM delta_scan('{tmp_lake.path('prompts')}') ORDER BY 1").fetchall()
    assert duck == [("u1", date(2024, 1, 2)), ("u2", date(2024, 1, 2))]
    from deltalake import DeltaTable

    assert sorted(DeltaTable(tmp_lake.path("interactions"), storage_options=tmp_lake.storage_options).to_pyarrow_table().column("user_id").to_pylist()) == \
        sorted(r[0] for r in rows)


def test_write_arrow_and_missing_table(tmp_lake):
    data = pa.table({"model_version": ["m1"], "base_model": ["b"], "adapter_path": ["/a"], "lora_config": ["{}"],
                     "train_rows": [10], "heldout_rows": [2], "train_loss": [1.0], "val_loss": [1.1],
                     "heldout_rouge_l_student": [0.5], "heldout_rouge_l_base": [0.1], "metrics": ["{}"],
                     "created_ts": [datetime(2024, 1, 1, tzinfo=UTC)]})
    assert tmp_lake.version("student_models") is None
    assert tmp_lake.write_arrow("student_models", data, "merge", info()) == 0
    assert tmp_lake.write_arrow("student_models", data, "merge", info()) == 1
    assert tmp_lake.count("student_models") == 1
    with pytest.raises(LakeError, match="does not exist"):
        tmp_lake.read_arrow("metrics")
    with pytest.raises(KeyError, match="unknown table"):
        tmp_lake.path("no_such_table")


def test_arrow_write_enforces_not_null(tmp_lake):
    data = pa.table({"model_version": [None], "base_model": ["b"], "adapter_path": ["/a"], "lora_config": ["{}"],
                     "train_rows": [10], "heldout_rows": [2], "train_loss": [1.0], "val_loss": [1.1],
                     "heldout_rouge_l_student": [0.5], "heldout_rouge_l_base": [0.1], "metrics": ["{}"],
                     "created_ts": [datetime(2024, 1, 1, tzinfo=UTC)]})
    with pytest.raises(Exception, match="(?i)null"):
        tmp_lake.write_arrow("student_models", data, "overwrite", info())
    assert not tmp_lake.exists("student_models")


def test_target_file_rows_bounds_rows_per_file(spark, tmp_path):
    from slimrec.lake import Lake

    lake = Lake(tmp_path / "lake", target_file_rows=2)
    t = datetime(2024, 1, 1, tzinfo=UTC)
    rows = [(f"u{i}", "a", t, i, False, "f") for i in range(5)]
    lake.write_spark(_interactions(spark, rows).coalesce(1), "interactions", "overwrite", info())
    sizes = sorted(pa.parquet.read_table(u.removeprefix("file://")).num_rows for u in lake.file_uris("interactions"))
    assert sizes == [1, 2, 2]
    assert lake.count("interactions") == 5


def test_session_conf_sets_and_restores(spark):
    from slimrec.spark import session_conf

    key, unset_key = "spark.sql.shuffle.partitions", "spark.sql.execution.useObjectHashAggregateExec"
    before = spark.conf.get(key)
    spark.conf.unset(unset_key)
    default = spark.conf.get(unset_key)
    with session_conf(spark, {key: "7", unset_key: "false"}):
        assert spark.conf.get(key) == "7"
        assert spark.conf.get(unset_key) == "false"
    assert spark.conf.get(key) == before
    assert spark.conf.get(unset_key) == default


def test_arrow_batches_to_python_are_bounded_by_rows_not_bytes(spark):
    """get_spark turns Spark's per-row byte measuring off (slimrec.spark): batches stay row-bounded."""
    from slimrec.spark import session_conf

    assert spark.conf.get("spark.sql.execution.arrow.maxBytesPerBatch") == str(2**31 - 1)

    def sizes(batches):
        for b in batches:
            yield pa.RecordBatch.from_pydict({"n": [b.num_rows]})

    with session_conf(spark, {"spark.sql.execution.arrow.maxRecordsPerBatch": "100"}):
        got = [r.n for r in spark.range(0, 1050, numPartitions=1).mapInArrow(sizes, "n long").collect()]
    assert sorted(got) == [50] + [100] * 10


def test_executor_writer_streams_files_of_bounded_rows(tmp_path):
    """The executor-side writer, fed batch by batch: files per partition value of at most target_file_rows."""
    from slimrec.spark_delta import _Writer

    schema = pa.schema([("user_id", pa.string()), ("n", pa.int64()), ("run_date", pa.date32())])
    writer = _Writer({"path": str(tmp_path), "partition_by": "run_date",
                      "arrow_schema": schema.serialize().to_pybytes().hex(), "target_file_rows": "5"})
    d1, d2 = date(2024, 1, 1), date(2024, 1, 2)
    batches = [pa.RecordBatch.from_pylist([{"user_id": f"u{i}{j}", "n": i * 3 + j, "run_date": d1 if j < 2 else d2}
                                           for j in range(3)], schema=schema) for i in range(7)]
    files_before_the_end = []

    def feed():
        for i, b in enumerate(batches):
            if i == 4:  # 8 rows of 2024-01-01 went in: a full file of 5 must be on disk already
                files_before_the_end.extend(tmp_path.rglob("*.parquet"))
            yield b

    actions = writer.write(feed()).actions
    assert len(files_before_the_end) == 1  # streamed, not held until the task's last batch
    by_date: dict[str, list[int]] = {}
    seen = []
    for a in actions:
        t = pa.parquet.read_table(tmp_path / a["path"])
        assert t.column_names == ["user_id", "n"]  # the partition column lives in the path, as Delta wants
        assert json.loads(json.dumps(a["stats"]))["numRecords"] == t.num_rows
        by_date.setdefault(a["partition_values"]["run_date"], []).append(t.num_rows)
        seen += t.column("n").to_pylist()
    assert {k: sorted(v) for k, v in by_date.items()} == {"2024-01-01": [4, 5, 5], "2024-01-02": [2, 5]}
    assert sorted(seen) == list(range(21))  # every row once


def test_executor_writer_diverts_rows_whose_struct_is_set(tmp_path):
    """divert_column: rows with a record there go to side files (its fields only), the rest to the table."""
    from slimrec.spark_delta import _Writer

    schema = pa.schema([("user_id", pa.string()), ("n", pa.int64())])
    rec = pa.struct([("reason", pa.string()), ("row", pa.int64())])
    side = tmp_path / "side"
    writer = _Writer({"path": str(tmp_path / "t"), "job": "job1-",
                      "arrow_schema": schema.serialize().to_pybytes().hex(), "target_file_rows": "3",
                      "divert_column": "_q", "divert_dir": str(side)})
    full = pa.schema([*schema, ("_q", rec)])
    batches = [pa.RecordBatch.from_pylist(
        [{"user_id": f"u{i}{j}", "n": i * 4 + j, "_q": {"reason": "short", "row": i * 4 + j} if j % 2 else None}
         for j in range(4)], schema=full) for i in range(3)]
    msg = writer.write(iter(batches))
    kept = pa.concat_tables([pa.parquet.read_table(tmp_path / "t" / a["path"]) for a in msg.actions])
    assert kept.column_names == ["user_id", "n"]
    assert sorted(kept.column("n").to_pylist()) == [0, 2, 4, 6, 8, 10]
    assert sum(a["stats"]["numRecords"] for a in msg.actions) == 6
    diverted = pa.concat_tables([pa.parquet.read_table(side / p) for p in msg.diverted])
    assert diverted.column_names == ["reason", "row"]
    assert sorted(diverted.column("row").to_pylist()) == [1, 3, 5, 7, 9, 11]
    assert len(msg.diverted) == 2  # side files are bounded by target_file_rows too (3 + 3)
    assert all(a["path"].startswith("part-job1-") for a in msg.actions)
    other = tmp_path / "t" / "part-job0-x.snappy.parquet"  # another job's file
    other.write_bytes(b"")
    assert writer.remove_job_files() == len(msg.actions) + len(msg.diverted)  # a failed job's cleanup
    assert list(tmp_path.rglob("*.parquet")) == [other]


@pytest.mark.parametrize("mode", ["overwrite", "merge"])
def test_write_spark_diverting_routes_each_row_once(spark, tmp_lake, mode):
    """Both paths (executor files; driver-side MERGE) write the kept rows and return the diverted ones."""
    from pyspark.sql import functions as F

    info = CommitInfo("test", date(2024, 1, 15))
    rows = [(f"u{i}", [f"i{i}"] * 3, i) for i in range(6)]
    df = spark.createDataFrame(rows, "user_id string, item_ids array<string>, seq_len int").select(
        "user_id", "item_ids",
        F.slice("item_ids", 1, 1).alias("history"), F.lit("v").alias("valid_target"), F.lit("t").alias("test_target"),
        "seq_len", F.lit(None).cast("timestamp").alias("last_event_ts"), F.col("user_id").alias("seq_hash"),
        F.when(F.col("seq_len") >= 4, F.struct(F.lit("too long").alias("reason"), "user_id")).alias("_q"))
    if mode == "merge":  # an existing table, one user already in it with another hash
        tmp_lake.write_spark(df.where("seq_len = 0").drop("_q").withColumn("seq_hash", F.lit("old")),
                             "user_sequences", "overwrite", info)
    done = tmp_lake.write_spark_diverting(df, "user_sequences", mode, info, "_q")
    assert done.rows == 4
    got = tmp_lake.read_arrow("user_sequences").to_pydict()
    assert sorted(zip(got["user_id"], got["seq_hash"], strict=True)) == [(f"u{i}", f"u{i}") for i in range(4)]
    assert sorted(done.diverted.to_pylist(), key=lambda r: r["user_id"]) == [
        {"reason": "too long", "user_id": "u4"}, {"reason": "too long", "user_id": "u5"}]
    assert not list(Path(tmp_lake.path("user_sequences")).glob("_diverted/**/*.parquet"))  # staging removed


def test_write_mapped_diverting_writes_what_the_function_makes(spark, tmp_lake):
    """Each partition through an Arrow function, written by the worker that ran it: rows, lineage, diverted."""
    import pyarrow.compute as pc

    info = CommitInfo("test", date(2024, 1, 15), input_versions={"interactions": 3})

    def fn(t):  # (user_id, n) -> user_sequences rows; n >= 4 is diverted
        n = t["n"]
        items = pa.array([[f"i{k}" for k in range(v)] for v in n.to_pylist()], pa.list_(pa.string()))
        long_ = pc.greater_equal(n, 4).combine_chunks()
        q = pa.StructArray.from_arrays([pa.array(["too long"] * len(t)), t["user_id"].combine_chunks()],
                                       names=["reason", "user_id"], mask=pc.invert(long_))
        return pa.table({"user_id": t["user_id"], "item_ids": items, "history": items, "valid_target": t["user_id"],
                         "test_target": t["user_id"], "seq_len": pc.cast(n, pa.int32()),
                         "last_event_ts": pa.nulls(len(t), pa.timestamp("us", "UTC")), "seq_hash": t["user_id"], "_q": q})

    df = spark.createDataFrame([(f"u{i}", i) for i in range(1, 7)], "user_id string, n long").repartition(3)
    done = tmp_lake.write_mapped_diverting(df, fn, "user_sequences", "overwrite", info, "_q")
    got = tmp_lake.read_arrow("user_sequences")
    assert done.rows == 3 and sorted(got["user_id"].to_pylist()) == ["u1", "u2", "u3"]
    assert set(got["run_date"].to_pylist()) == {date(2024, 1, 15)}
    assert set(got["input_versions"].to_pylist()) == {'{"interactions": 3}'}
    assert sorted(r["user_id"] for r in done.diverted.to_pylist()) == ["u4", "u5", "u6"]
    assert not list(Path(tmp_lake.path("user_sequences")).glob("_diverted/**/*.parquet"))
    with pytest.raises(LakeError, match="appends or overwrites, not 'merge'"):
        tmp_lake.write_mapped_diverting(df, fn, "user_sequences", "merge", info, "_q")


def test_write_spark_diverting_skip_empty_keeps_the_table(spark, tmp_lake):
    """skip_empty: an overwrite whose rows are all diverted commits nothing; the diverted rows still come back."""
    from pyspark.sql import functions as F

    info = CommitInfo("test", date(2024, 1, 15))
    df = spark.createDataFrame([("u1", 1), ("u2", 2)], "user_id string, n int").select(
        "user_id", F.array("user_id").alias("item_ids"), F.array("user_id").alias("history"),
        F.lit("v").alias("valid_target"), F.lit("t").alias("test_target"), F.col("n").alias("seq_len"),
        F.lit(None).cast("timestamp").alias("last_event_ts"), F.col("user_id").alias("seq_hash"),
        F.when(F.col("n") > 0, F.struct(F.lit("refused").alias("reason"))).alias("_q"))
    none = tmp_lake.write_spark_diverting(df, "user_sequences", "overwrite", info, "_q", skip_empty=True)
    assert (none.version, none.rows, none.diverted.num_rows) == (None, 0, 2)
    assert not tmp_lake.exists("user_sequences")  # no empty table made
    first = tmp_lake.write_spark_diverting(df.withColumn("_q", F.lit(None)), "user_sequences", "overwrite", info, "_q")
    again = tmp_lake.write_spark_diverting(df, "user_sequences", "overwrite", info, "_q", skip_empty=True)
    assert again.version is None and tmp_lake.version("user_sequences") == first.version
    assert sorted(tmp_lake.read_arrow("user_sequences")["user_id"].to_pylist()) == ["u1", "u2"]


def _interaction_rows(spark, refused_from: int, n: int = 6):
    """interactions rows with raw_interactions' columns; rows from ``refused_from`` on are diverted."""
    from pyspark.sql import functions as F

    return spark.range(n, numPartitions=2).select(
        F.concat(F.lit("u"), F.col("id").cast("string")).alias("user_id"), F.lit("i").alias("item_id"),
        F.timestamp_seconds(F.col("id") + 1_400_000_000).alias("event_ts"), F.col("id").alias("event_seq"),
        F.lit(False).alias("ts_derived"), F.lit("f.csv").alias("source_file"), F.col("id").alias("source_row"),
        F.concat(F.lit("u"), F.col("id").cast("string")).alias("user_raw"), F.lit("i").alias("item_raw"),
        (F.col("id") + 1_400_000_000).cast("string").alias("ts_raw"), F.lit(None).cast("long").alias("position"),
        F.when(F.col("id") >= refused_from, F.struct(F.lit("refused").alias("reason"), "source_row")).alias("_q"))


def test_tee_table_gets_every_row_in_the_same_pass(spark, tmp_lake):
    """tee: every row, diverted or not, also goes to the second table, committed after the first;
    a skipped commit leaves the tee table as it was and removes the files written for it."""
    info = CommitInfo("test", date(2024, 1, 15), input_versions={"x": 1})
    done = tmp_lake.write_spark_diverting(_interaction_rows(spark, 4), "interactions", "overwrite", info, "_q",
                                          tee="raw_interactions")
    assert done.rows == 4 and done.diverted.num_rows == 2
    assert done.tee_version == tmp_lake.version("raw_interactions") == 0
    raw = tmp_lake.read_arrow("raw_interactions").to_pandas().sort_values("source_row")
    assert raw.source_row.tolist() == list(range(6)) and raw.user_raw.tolist() == [f"u{i}" for i in range(6)]
    assert raw.ts_raw.tolist() == [str(1_400_000_000 + i) for i in range(6)] and raw.position.isna().all()
    assert set(raw.input_versions) == {'{"x": 1}'} and set(raw.run_date) == {date(2024, 1, 15)}
    assert sorted(tmp_lake.read_arrow("interactions")["user_id"].to_pylist()) == ["u0", "u1", "u2", "u3"]
    files = sorted(p.name for p in Path(tmp_lake.path("raw_interactions")).rglob("*.parquet"))

    none = tmp_lake.write_spark_diverting(_interaction_rows(spark, 0), "interactions", "overwrite", info, "_q",
                                          skip_empty=True, tee="raw_interactions")
    assert (none.version, none.tee_version, none.diverted.num_rows) == (None, None, 6)
    assert tmp_lake.version("raw_interactions") == 0
    assert sorted(p.name for p in Path(tmp_lake.path("raw_interactions")).rglob("*.parquet")) == files

    from pyspark.sql import functions as F

    failing = _interaction_rows(spark, 4, n=400).withColumn(
        "item_raw", F.when(F.col("source_row") == 399, F.raise_error(F.lit("boom"))).otherwise(F.lit("i")))
    with pytest.raises(Exception, match="boom"):  # a failed job: the files written for either table go
        tmp_lake.write_spark_diverting(failing, "interactions", "overwrite", info, "_q", tee="raw_interactions")
    assert sorted(p.name for p in Path(tmp_lake.path("raw_interactions")).rglob("*.parquet")) == files
    assert tmp_lake.read_arrow("interactions").num_rows == 4

    with pytest.raises(LakeError, match="lacks the columns \\['ts_raw'\\] of its tee table raw_interactions"):
        tmp_lake.write_spark_diverting(_interaction_rows(spark, 4).drop("ts_raw"), "interactions", "overwrite", info,
                                       "_q", tee="raw_interactions")
    with pytest.raises(LakeError, match="append or overwrite only"):
        tmp_lake.write_spark_diverting(_interaction_rows(spark, 4), "interactions", "merge", info, "_q",
                                       tee="raw_interactions")


def test_failed_write_job_removes_its_files(spark, tmp_lake):
    """A task fails after other tasks wrote their files: the error reaches the caller and none of this
    job's files stay behind; the table is untouched."""
    from pyspark.sql import functions as F

    info = CommitInfo("test", date(2024, 1, 15))
    ok = spark.createDataFrame([("f", 0, "u", "i", "1", None)],
                               "source_file string, source_row long, user_raw string, item_raw string, ts_raw string, position long")
    tmp_lake.write_spark(ok, "raw_interactions", "overwrite", info)
    before = sorted(p.name for p in Path(tmp_lake.path("raw_interactions")).rglob("*.parquet"))
    bad = spark.range(0, 400, numPartitions=4).select(
        F.lit("f").alias("source_file"), F.col("id").alias("source_row"), F.lit("u").alias("user_raw"),
        F.when(F.col("id") == 399, F.raise_error(F.lit("boom"))).otherwise(F.lit("i")).alias("item_raw"),
        F.lit("1").alias("ts_raw"), F.lit(None).cast("long").alias("position"))
    with pytest.raises(Exception, match="boom"):
        tmp_lake.write_spark(bad, "raw_interactions", "overwrite", info)
    assert sorted(p.name for p in Path(tmp_lake.path("raw_interactions")).rglob("*.parquet")) == before
    assert tmp_lake.read_arrow("raw_interactions").num_rows == 1


def test_write_spark_diverting_needs_the_column(spark, tmp_lake):
    df = spark.createDataFrame([("u1",)], "user_id string")
    with pytest.raises(LakeError, match="diverted column '_q'"):
        tmp_lake.write_spark_diverting(df, "user_sequences", "overwrite", CommitInfo("t", date(2024, 1, 15)), "_q")


def _quarantine_rows(stage, sources):
    return pa.table({"stage": [stage] * len(sources), "source": sources, "source_row": [None] * len(sources),
                     "reason": ["r"] * len(sources), "payload": ["{}"] * len(sources)},
                    schema=pa.schema([("stage", pa.string()), ("source", pa.string()), ("source_row", pa.int64()),
                                      ("reason", pa.string()), ("payload", pa.string())]))


def test_delete_keys_and_replace_quarantine(spark, tmp_lake):
    d = date(2024, 1, 1)
    tmp_lake.write_spark(_prompts(spark, ["u1", "u2", "u3"]), "prompts", "replace_date", info(d))
    v = tmp_lake.delete_keys("prompts", pa.table({"user_id": ["u2", "nobody"], "run_date": [d, d]}), info(d))
    assert v == 1 and sorted(tmp_lake.read_pandas("prompts").user_id) == ["u1", "u3"]
    assert tmp_lake.delete_keys("prompts", pa.table({"user_id": pa.array([], pa.string()),
                                                     "run_date": pa.array([], pa.date32())}), info(d)) is None
    with pytest.raises(LakeError, match="keys lack"):
        tmp_lake.delete_keys("prompts", pa.table({"user_id": ["u1"]}), info(d))

    # a stage's records replace its earlier ones; other stages' records stay
    assert tmp_lake.replace_quarantine("a", _quarantine_rows("a", ["x", "y"]), info(d)) is not None
    tmp_lake.replace_quarantine("b", _quarantine_rows("b", ["z"]), info(d))
    tmp_lake.replace_quarantine("a", _quarantine_rows("a", ["y", "w"]), info(d))
    got = sorted(zip(*tmp_lake.read_pandas("quarantine")[["stage", "source"]].values.T.tolist(), strict=True))
    assert got == [("a", "w"), ("a", "y"), ("b", "z")]
    v = tmp_lake.version("quarantine")
    assert tmp_lake.replace_quarantine("c", _quarantine_rows("c", []), info(d)) is None  # nothing to do: no commit
    assert tmp_lake.version("quarantine") == v
    tmp_lake.replace_quarantine("a", _quarantine_rows("a", []), info(d))  # an empty run clears the stage's records
    assert sorted(tmp_lake.read_pandas("quarantine").source) == ["z"]
    with pytest.raises(LakeError, match="needs mode='merge'"):
        tmp_lake.write_arrow("quarantine", _quarantine_rows("a", []), "append", info(d), delete_missing="true")


def test_rows_naming_unknown_items(tmp_lake):
    from slimrec.stages.base import rows_naming_unknown_items

    d = date(2024, 1, 2)
    rows = pa.table({"user_id": ["u1", "u2", "u3", "u4"], "model_version": ["m"] * 4, "prompt_hash": ["p"] * 4,
                     "rationale": ["r"] * 4, "step1": ["s"] * 4, "step2": ["s"] * 4, "step3": ["s"] * 4,
                     "grounded_item_ids": [["i1", "i2"], ["i1", "i9"], [], None], "status": ["ok"] * 4,
                     "error": [None] * 4, "output_tokens": [1] * 4, "latency_ms": [1.0] * 4})
    tmp_lake.write_arrow("student_rationales", rows, "overwrite", info(d))
    key = ["user_id", "run_date", "model_version"]
    got = rows_naming_unknown_items(tmp_lake, "student_rationales", key, {"i1", "i2"})
    assert got.column_names == key and got["user_id"].to_pylist() == ["u2"]
    assert rows_naming_unknown_items(tmp_lake, "student_rationales", key, {"i1", "i2", "i9"}).num_rows == 0


def test_a_column_added_later_widens_a_table_written_before_it(tmp_lake):
    """A lake whose ``metrics`` table predates the beyond-accuracy columns: old rows read them as null,
    the next append (old-style writer or new) widens the table in one commit, time travel still reads."""
    from deltalake import write_deltalake
    from slimrec.schemas.tables import spec

    s = spec("metrics")
    late = [c.name for c in s.columns if c.added_later]
    assert {"coverage_10", "ild_10"} <= set(late)
    old_schema = pa.schema([f for f in s.arrow_schema() if f.name not in late])
    row = {"run_id": "r1", "dataset": "d", "backbone": "sasrec", "variant": "base", "protocol": "full",
           "split": "test", "seed": 0, "hr_10": 0.5, "hr_20": 0.6, "ndcg_10": 0.3, "ndcg_20": 0.35, "mrr": 0.2,
           "n_users": 4, "run_date": date(2024, 1, 1), "input_versions": "{}"}
    write_deltalake(tmp_lake.path("metrics"), pa.Table.from_pylist([row], schema=old_schema), mode="overwrite")
    old = tmp_lake.read_pandas("metrics")
    assert list(old.columns) == s.column_names and old["coverage_10"].isna().all()
    assert tmp_lake.read_pandas("metrics", columns=["run_id", "ild_10"]).ild_10.isna().all()
    # a writer that predates the columns still appends (they are filled with null) ...
    legacy = pa.Table.from_pylist([{**row, "run_id": "r2"}], schema=old_schema).drop_columns(["run_date",
                                                                                             "input_versions"])
    assert tmp_lake.write_arrow("metrics", legacy, "append", info()) == 1
    # ... and a new one writes its figures
    new = pa.Table.from_pylist([{**row, "run_id": "r3", "coverage_10": 0.25}]).drop_columns(["run_date",
                                                                                            "input_versions"])
    assert tmp_lake.write_arrow("metrics", new, "append", info()) == 2
    m = tmp_lake.read_pandas("metrics").set_index("run_id")
    assert m.loc["r3", "coverage_10"] == 0.25 and m.loc[["r1", "r2"], "coverage_10"].isna().all()
    assert tmp_lake.read_pandas("metrics", version=0).coverage_10.isna().all()
