"""End to end with the lake on a real S3 server (SeaweedFS on 127.0.0.1): the same ``slim run`` and the
same two ``slim refresh`` calls as the local-disk lake of ``refreshed`` (same replay data, dates and
seeds), through the CLI in this process. Spark's executors write and read the lake through pyarrow's
S3 filesystem, delta-rs commits with conditional writes, and DuckDB reads it with ``delta_scan``.
"""

from __future__ import annotations

import uuid

import pandas as pd
import pytest
from e2ekit import BASE_DATE, DAY, FIGURES, slim, versions
from slimrec.lake import Lake, duckdb_connection

pytestmark = pytest.mark.slow

# figures that depend on nothing but the data, the config and the seeds
METRIC_COLS = ["backbone", "variant", "protocol", "split", "seed", "hr_10", "hr_20", "ndcg_10", "ndcg_20"]


@pytest.fixture(scope="module")
def s3_refreshed(refreshed, s3_server):
    root, replay = refreshed["root"], refreshed["root"] / "replay"
    uri = f"s3://{s3_server.bucket}/e2e-{uuid.uuid4().hex[:8]}/lake"
    local = ["--set", f"lake.local_dir={root / 's3-local'}"]  # models, checkpoints, MLflow store
    slim("run", "--dataset", replay / "base", "--lake", uri, "--profile", "tiny", "--run-date", BASE_DATE,
         "--report-dir", root / "s3-r0", *local)
    lake = Lake(uri)
    out = {"lake": lake, "v0": versions(lake), "metrics0": lake.read_pandas("metrics")}
    for n in (1, 2):
        slim("refresh", "--events", replay / f"events-{DAY}.csv", "--lake", uri, "--profile", "tiny",
             "--run-date", DAY, "--report-dir", root / f"s3-r{n}", *local)
        out[f"v{n}"] = versions(lake)
    return out


def _metrics(df: pd.DataFrame) -> pd.DataFrame:
    return df[METRIC_COLS].sort_values(METRIC_COLS[:5]).reset_index(drop=True)


def test_the_run_on_s3_writes_what_the_run_on_local_disk_writes(refreshed, s3_refreshed):
    local, s3 = refreshed["lake"], s3_refreshed["lake"]
    assert set(s3_refreshed["v0"]) == set(refreshed["v0"])
    counts = {}
    for table, v in refreshed["v0"].items():
        counts[table] = (local.count(table, version=v), s3.count(table, version=s3_refreshed["v0"][table]))
    assert {t: c[0] for t, c in counts.items()} == {t: c[1] for t, c in counts.items()}
    want = _metrics(local.read_pandas("metrics", version=refreshed["v0"]["metrics"]))
    got = _metrics(s3_refreshed["metrics0"])
    assert len(got) > 0
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-6)
    FIGURES["s3 lake: tables"] = len(counts)


def test_duckdb_reads_every_table_of_the_s3_lake(s3_refreshed):
    lake = s3_refreshed["lake"]
    con = duckdb_connection(lake)
    for t in lake.tables():
        n = con.sql(f"SELECT count(*) FROM delta_scan('{lake.path(t['table'])}')").fetchone()[0]
        assert n == t["rows"], t["table"]


def test_second_refresh_on_s3_commits_nothing(s3_refreshed):
    assert s3_refreshed["v2"] == s3_refreshed["v1"]
    changed = {t for t, v in s3_refreshed["v1"].items() if s3_refreshed["v0"].get(t) != v}
    assert {"interactions", "user_sequences", "prompts", "recommendations"} <= changed


def test_the_secret_key_is_written_nowhere(refreshed, s3_refreshed):
    """The S3 secret lives in the environment only: not in any lake object, report, log or local file."""
    import os
    from pathlib import Path

    import pyarrow.fs as pafs
    from slimrec.storage import filesystem

    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    fs, path = filesystem(s3_refreshed["lake"].root)
    objects = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
    assert objects
    for info in objects:
        with fs.open_input_stream(info.path) as f:
            assert secret not in f.read(), info.path
    local = [p for d in ("s3-local", "s3-r0", "s3-r1", "s3-r2") for p in Path(refreshed["root"], d).rglob("*")
             if p.is_file()]
    assert local
    for p in local:
        assert secret not in p.read_bytes(), p
