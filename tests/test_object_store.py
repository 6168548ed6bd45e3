"""The lake on a real S3 server (SeaweedFS on 127.0.0.1): settings, credentials, concurrent writers,
Spark's two readers, the folder for what must be a path, and a server that goes away mid-write."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, date, datetime

import pyarrow as pa
import pytest
from slimrec.config import ConfigError, load_config
from slimrec.lake import CommitInfo, Lake, LakeError
from slimrec.storage import StorageError, delta_options, duckdb_secret_sql, filesystem


def info(d=date(2024, 1, 2)):
    return CommitInfo("test_stage", d, "run1", "cfg123", {})


def _models(n: int, tag: str) -> pa.Table:
    return pa.table({"model_version": [f"{tag}-{i}" for i in range(n)], "base_model": ["b"] * n,
                     "adapter_path": ["/a"] * n, "lora_config": ["{}"] * n, "train_rows": [10] * n,
                     "heldout_rows": [2] * n, "train_loss": [1.0] * n, "val_loss": [1.1] * n,
                     "heldout_rouge_l_student": [0.5] * n, "heldout_rouge_l_base": [0.1] * n, "metrics": ["{}"] * n,
                     "created_ts": [datetime(2024, 1, 1, tzinfo=UTC)] * n})


def test_secrets_are_refused_in_the_config_and_kept_out_of_options():
    with pytest.raises(ConfigError, match="must not hold secrets.*AWS_SECRET_ACCESS_KEY"):
        load_config("tiny", None, ["lake.storage_options={AWS_SECRET_ACCESS_KEY: x}"])
    cfg = load_config("tiny", None, ["lake.storage_options={AWS_ENDPOINT_URL: 'http://127.0.0.1:9'}"])
    opts = delta_options("s3://b/lake", cfg.lake.storage_options)
    assert opts == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "conditional_put": "etag"}
    assert delta_options("/data/lake", {"AWS_REGION": "x"}) is None  # local lakes take no options
    with pytest.raises(StorageError):
        delta_options("s3://b/lake", {"aws_session_token": "t"})


def test_unsafe_rename_is_explicit_and_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="slimrec.storage"):
        opts = delta_options("s3://b/lake", {}, s3_commit="unsafe_rename")
    assert opts == {"AWS_S3_ALLOW_UNSAFE_RENAME": "true"}
    assert "can lose a commit" in caplog.text
    with pytest.raises(ConfigError):
        load_config("tiny", None, ["lake.s3_commit=whatever"])


def test_one_description_reaches_pyarrow_and_duckdb(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.0.0.5:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    fs, path = filesystem("s3://bucket/pre/fix/")
    assert path == "bucket/pre/fix"
    assert fs.region == "eu-west-3"
    sql = duckdb_secret_sql("s3://bucket/pre")
    assert "ENDPOINT '10.0.0.5:9000'" in sql and "USE_SSL false" in sql and "URL_STYLE 'path'" in sql
    assert duckdb_secret_sql("/local/lake") is None


def test_local_root_of_an_object_store_lake(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Lake("s3://bucket/a/b").local_root == tmp_path.resolve() / ".slimrec-local" / "bucket" / "a" / "b"
    assert Lake("s3://bucket/a", local_dir=str(tmp_path / "shared")).local_root == tmp_path / "shared"
    assert Lake(tmp_path / "lake").local_root == tmp_path / "lake"


def test_the_server_checks_credentials(s3_lake, monkeypatch):
    s3_lake.write_arrow("student_models", _models(1, "a"), "merge", info())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")
    with pytest.raises(Exception, match="(?i)privileges|forbidden|denied|signature"):
        Lake(s3_lake.root).count("student_models")


def test_concurrent_appends_lose_no_commit(s3_lake):
    s3_lake.write_arrow("student_models", _models(1, "seed"), "append", info())
    errors: list[str] = []

    def append(k):
        try:
            Lake(s3_lake.root).write_arrow("student_models", _models(3, f"w{k}"), "append", info())
        except Exception as e:  # noqa: BLE001 - recorded and asserted on below
            errors.append(repr(e))

    threads = [threading.Thread(target=append, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert s3_lake.count("student_models") == 1 + 6 * 3
    assert s3_lake.version("student_models") == 6


def test_concurrent_overwrites_leave_one_whole_table(s3_lake):
    """Each writer replaces the table with its own rows: whoever wins, the table holds exactly one writer's
    rows (never a mix, never a lost version), and a loser gets a readable LakeError, not a corrupt log."""
    s3_lake.write_arrow("student_models", _models(2, "seed"), "overwrite", info())
    outcome: dict[int, str] = {}

    def overwrite(k):
        try:
            Lake(s3_lake.root).write_arrow("student_models", _models(k + 1, f"w{k}"), "overwrite", info())
            outcome[k] = "ok"
        except LakeError as e:
            outcome[k] = str(e)

    threads = [threading.Thread(target=overwrite, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcome) == 4
    assert all(v == "ok" or "another writer committed" in v for v in outcome.values())
    winners = [k for k, v in outcome.items() if v == "ok"]
    assert winners
    final = set(s3_lake.read_arrow("student_models", columns=["model_version"]).column(0).to_pylist())
    tags = {v.split("-")[0] for v in final}
    assert len(tags) == 1 and tags.pop() in {f"w{k}" for k in winners}
    assert s3_lake.version("student_models") == len(winners)
    for v in range(s3_lake.version("student_models") + 1):
        s3_lake.count("student_models", version=v)  # every version readable


@pytest.mark.parametrize("where,reader", [("local", "parquet"), ("local", "datasource"), ("s3", "auto")])
def test_spark_readers_agree_with_delta_rs(spark, tmp_path, where, reader, request):
    """Spark's Parquet reader and the Data Source reader (the one ``auto`` picks for S3) give the rows
    delta-rs gives, partition values included."""
    root = tmp_path / "lake" if where == "local" else request.getfixturevalue("s3_lake").root
    lake = Lake(root, spark_reader=reader)
    df = spark.createDataFrame(
        [(f"u{i}", "tp", "sp", "v1", f"ph{i}", 3, 3, ["a", "b"], "h") for i in range(5)],
        "user_id string, teacher_prompt string, student_prompt string, prompt_version string, prompt_hash string, "
        "history_len int, n_prompt_items int, prompt_item_ids array<string>, seq_hash string").repartition(2)
    lake.write_spark(df, "prompts", "replace_date", info(date(2024, 1, 1)))
    lake.write_spark(df.limit(2), "prompts", "replace_date", info(date(2024, 1, 2)))
    cols = ["user_id", "run_date", "prompt_item_ids", "history_len"]
    got = sorted((r.user_id, r.run_date, tuple(r.prompt_item_ids), r.history_len)
                 for r in lake.read_spark(spark, "prompts").select(*cols).collect())
    want = sorted((r["user_id"], r["run_date"], tuple(r["prompt_item_ids"]), r["history_len"])
                  for r in lake.read_arrow("prompts", columns=cols).to_pylist())
    assert len(got) == 7 and {g[1] for g in got} == {date(2024, 1, 1), date(2024, 1, 2)}
    assert got == want
    assert lake.read_spark(spark, "prompts", version=0).count() == 5  # time travel
