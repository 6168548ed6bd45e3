"""build_sequences on Spark: order, dedup, k-core, max length, leave-one-out, hashes; the stage on
Delta (incremental writes); and the bundled data read back by DuckDB and deltalake (slow)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from slimrec.config import SequencesConfig, load_config
from slimrec.lake import Lake
from slimrec.pipeline import run_stage
from slimrec.sequences import build_sequences
from slimrec.stages.base import StageContext

RUN_DATE = date(2024, 1, 15)
BUNDLED = Path(__file__).resolve().parents[1] / "data" / "amazon_office_2014"


def ts(s: int) -> datetime:
    return datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=s)


def h(*items: str) -> str:
    return hashlib.sha1("\x1f".join(items).encode()).hexdigest()


# user, item, event_ts (s after 2024-01-01), event_seq
EVENTS = [
    # u1: tied timestamps keep source order (event_seq), then item_id; a repeat keeps its first time
    ("u1", "a", 10, 0), ("u1", "b", 10, 1), ("u1", "c", 5, 2), ("u1", "a", 20, 3),
    ("u1", "e", 30, 5), ("u1", "d", 30, 5),
    # u2: x x y x -> first occurrences [x, y] (too short); consecutive-only dedup [x, y, x]
    ("u2", "x", 1, 0), ("u2", "x", 2, 1), ("u2", "y", 3, 2), ("u2", "x", 4, 3),
    # u3: seven items, for max_seq_len
    *[("u3", f"i{k}", k, k) for k in range(1, 8)],
]


def _interactions(spark, events=EVENTS):
    pdf = pd.DataFrame(events, columns=["user_id", "item_id", "s", "event_seq"])
    pdf["event_ts"] = [ts(s) for s in pdf.s]
    return spark.createDataFrame(pdf[["user_id", "item_id", "event_ts", "event_seq"]],
                                 "user_id string, item_id string, event_ts timestamp, event_seq long")


def _run(spark, events=EVENTS, **cfg):
    seqs, q = build_sequences(_interactions(spark, events), SequencesConfig(**cfg))
    rows = {r.user_id: r.asDict() for r in seqs.collect()}
    return rows, sorted((json.loads(r.payload)["user_id"], r.reason) for r in q.collect()), q


@pytest.fixture(scope="module")
def default(spark):
    return _run(spark)


def test_order_dedup_and_leave_one_out(default):
    rows, quarantined, _ = default
    assert sorted(rows) == ["u1", "u3"]
    u1 = rows["u1"]
    assert u1["item_ids"] == ["c", "a", "b", "d", "e"]
    assert u1["history"] == ["c", "a", "b"]
    assert (u1["valid_target"], u1["test_target"], u1["seq_len"]) == ("d", "e", 5)
    assert u1["last_event_ts"] == ts(30).replace(tzinfo=None)
    assert u1["seq_hash"] == h("c", "a", "b", "d", "e")
    u3 = rows["u3"]
    assert u3["item_ids"] == [f"i{k}" for k in range(1, 8)]
    assert (u3["history"], u3["valid_target"], u3["test_target"]) == (["i1", "i2", "i3", "i4", "i5"], "i6", "i7")


def test_short_sequences_are_quarantined(default):
    _, quarantined, q = default
    assert quarantined == [("u2", "sequence shorter than 3 items after dedup/filtering")]
    (row,) = q.collect()
    assert (row.stage, row.source, row.source_row) == ("build_sequences", "interactions user_id=u2", None)
    assert json.loads(row.payload) == {"user_id": "u2", "item_ids": ["x", "y"]}


def test_consecutive_only_dedup(spark):
    rows, quarantined, _ = _run(spark, dedup_consecutive_only=True)
    assert rows["u2"]["item_ids"] == ["x", "y", "x"]
    assert (rows["u2"]["history"], rows["u2"]["valid_target"], rows["u2"]["test_target"]) == (["x"], "y", "x")
    assert rows["u1"]["item_ids"] == ["c", "a", "b", "a", "d", "e"]  # a repeat later on is kept
    assert quarantined == []


def test_max_seq_len_keeps_the_most_recent(spark):
    rows, _, _ = _run(spark, max_seq_len=5)
    u3 = rows["u3"]
    assert u3["item_ids"] == ["i3", "i4", "i5", "i6", "i7"]
    assert (u3["history"], u3["valid_target"], u3["test_target"], u3["seq_len"]) == (["i3", "i4", "i5"], "i6", "i7", 5)
    assert u3["seq_hash"] == h("i3", "i4", "i5", "i6", "i7")
    assert u3["last_event_ts"] == ts(7).replace(tzinfo=None)
    assert rows["u1"]["item_ids"] == ["c", "a", "b", "d", "e"]  # exactly 5: untouched


def test_k_core_is_iterative(spark):
    # k=2. Round 1 drops item r (1 user) and user D (1 item); then s has one user left (C) and goes;
    # then C has one item left and goes. A and B remain with [p, q].
    events = [("A", "p", 1, 0), ("A", "q", 2, 1), ("A", "r", 3, 2), ("B", "p", 1, 3), ("B", "q", 2, 4),
              ("C", "p", 1, 5), ("C", "s", 2, 6), ("D", "s", 1, 7)]
    rows, quarantined, _ = _run(spark, events, k_core=2, min_seq_len=2)
    assert {u: r["item_ids"] for u, r in rows.items()} == {"A": ["p", "q"], "B": ["p", "q"]}
    assert rows["A"]["history"] == [] and rows["A"]["valid_target"] == "p" and rows["A"]["test_target"] == "q"
    assert quarantined == []


def test_seq_hash_is_stable_and_order_sensitive(spark):
    """The same events in another row order give the same hashes; another order of items does not."""
    rows1, _, _ = _run(spark)
    rows2, _, _ = _run(spark, list(reversed(EVENTS)))
    assert {u: r["seq_hash"] for u, r in rows1.items()} == {u: r["seq_hash"] for u, r in rows2.items()}
    assert h("a", "b", "c") != h("b", "a", "c")
    assert h("ab", "c") != h("a", "bc")  # the separator keeps item boundaries


def test_sequences_of_on_arrow_alone():
    """The per-partition kernel without Spark: ties by event_seq then item bytes, first occurrence, cut, empty."""
    import pyarrow as pa
    from slimrec.sequences import sequences_of

    t0 = datetime(2024, 1, 1)
    events = pa.table({
        "user_id": ["v", "v", "v", "v", "w", "w", "v"],
        "item_id": ["z", "\u00e9", "Z", "z", "m", "m", "q"],  # bytes: "Z" < "z" < "\u00e9"
        "event_ts": pa.array([t0, t0, t0, t0 + timedelta(1), t0, t0 + timedelta(2), t0 + timedelta(3)], pa.timestamp("us")),
        "event_seq": pa.array([0, 0, 0, 1, 0, 1, 2], pa.int64()),
    })
    got = {r["user_id"]: r for r in sequences_of(events, 3).to_pylist()}
    assert got["v"]["item_ids"] == ["z", "\u00e9", "q"]  # [Z, z, \u00e9, (z again), q], cut to the last 3
    assert (got["v"]["seq_len"], got["v"]["last_event_ts"]) == (3, t0 + timedelta(3))
    assert (got["w"]["item_ids"], got["w"]["last_event_ts"]) == (["m"], t0)  # the repeat keeps its first time
    got = {r["user_id"]: r for r in sequences_of(events, 50, consecutive_only=True).to_pylist()}
    assert got["v"]["item_ids"] == ["Z", "z", "\u00e9", "z", "q"] and got["w"]["last_event_ts"] == t0  # m, m: the repeat is dropped
    empty = sequences_of(events.slice(0, 0), 3)
    assert empty.num_rows == 0 and empty.column_names == ["user_id", "item_ids", "last_event_ts", "seq_len"]


def test_sort_order_packs_keys_and_breaks_ties_on_the_rest():
    """Keys too wide for one 63-bit word: ties on the first word are ordered by the next; none: one sort."""
    import numpy as np
    from slimrec.sequences import _sort_order

    rng = np.random.default_rng(3)
    n = 5000
    user, wide, item = rng.integers(0, 50, n), rng.integers(0, 2**40, n), rng.integers(0, 2**30, n)
    wide[::7] = wide[0]  # ties on (user, wide) where users are equal too
    keys = [user.astype(np.int64), wide.astype(np.int64), item.astype(np.int64)]
    got = _sort_order(keys)
    want = np.lexsort(keys[::-1])
    assert [tuple(k[got]) for k in keys] == [tuple(k[want]) for k in keys]
    narrow = [user.astype(np.int64), rng.permutation(n).astype(np.int64)]  # 6 + 13 bits: one word, no ties
    assert (np.lexsort(narrow[::-1]) == _sort_order(narrow)).all()
    unique_first = [rng.permutation(n).astype(np.int64), rng.integers(0, 2**55, n).astype(np.int64)]  # two words
    assert (np.lexsort(unique_first[::-1]) == _sort_order(unique_first)).all()


@pytest.mark.parametrize("consecutive_only", [False, True])
def test_arrow_sequences_match_spark_sql(spark, consecutive_only):
    """Random events with many ties and repeats: the Arrow kernel and the Spark SQL build give the same rows."""
    import random

    from slimrec.sequences import _user_item_sequences_sql, user_item_sequences

    rnd = random.Random(7)
    items = ["a", "b", "B", "\u00e9", "ab", "a b", "z9", "\u4e2d"]
    events = [(f"u{rnd.randrange(40)}", rnd.choice(items), rnd.randrange(6), rnd.randrange(3)) for _ in range(600)]
    cfg = SequencesConfig(max_seq_len=4, dedup_consecutive_only=consecutive_only)
    df = _interactions(spark, events)

    def rows(frame):
        return sorted(tuple(r) for r in frame.select("user_id", "item_ids", "last_event_ts", "seq_len").collect())

    assert rows(user_item_sequences(df, cfg)) == rows(_user_item_sequences_sql(df, cfg))


# ----------------------------------------------------------------------------- the stage on Delta
def _ctx(spark, lake, *sets):
    cfg = load_config("tiny", overrides=["quality.enabled=false", *sets])
    return StageContext(cfg=cfg, lake=lake, run_date=RUN_DATE, _spark=spark)


def _write_interactions(lake: Lake, ctx, events, mode="overwrite"):
    pdf = pd.DataFrame(events, columns=["user_id", "item_id", "s", "event_seq"])
    pdf["event_ts"] = [ts(s) for s in pdf.s]
    pdf["ts_derived"] = False
    pdf["source_file"] = "test"
    lake.write_arrow("interactions", pdf.drop(columns="s"), mode, ctx.commit_info("ingest", {}))


def test_stage_writes_only_changed_users(spark, tmp_path):
    lake = Lake(tmp_path / "lake")
    ctx = _ctx(spark, lake)
    events = [*EVENTS, ("u4", "z", 1, 0), ("u4", "z", 2, 1)]  # u2 and u4 are both too short
    _write_interactions(lake, ctx, events)
    r1 = run_stage("build_sequences", ctx, check=False)
    assert (r1.rows_in, r1.rows_out) == (len(events), 2)
    assert r1.extra["quarantined_users"] == 2
    seqs = lake.read_pandas("user_sequences").set_index("user_id")
    assert sorted(seqs.index) == ["u1", "u3"]
    assert seqs.loc["u1"].item_ids.tolist() == ["c", "a", "b", "d", "e"]
    assert seqs.loc["u1"].input_versions == '{"interactions": 0}'
    q = lake.read_pandas("quarantine")
    assert sorted(json.loads(p)["user_id"] for p in q.payload) == ["u2", "u4"]
    assert set(q.stage) == {"build_sequences"}

    # unchanged input: no new user_sequences commit, quarantine stays as it is (no duplicates)
    v_seq, v_q = lake.version("user_sequences"), lake.version("quarantine")
    r2 = run_stage("build_sequences", _ctx(spark, lake), check=False)
    assert r2.tables["user_sequences"] is None and r2.extra["changed_users"] == 0
    assert lake.version("user_sequences") == v_seq
    assert len(lake.read_pandas("quarantine")) == 2
    assert lake.version("quarantine") >= v_q

    # one more event for u3: only u3 is written (MERGE), u1's row is the one written first
    _write_interactions(lake, ctx, [("u3", "i8", 8, 8)], mode="append")
    r3 = run_stage("build_sequences", _ctx(spark, lake), check=False)
    assert r3.extra["changed_users"] == 1
    after = lake.read_pandas("user_sequences").set_index("user_id")
    assert sorted(after.index) == ["u1", "u3"]
    assert after.loc["u3"].item_ids.tolist() == [f"i{k}" for k in range(1, 9)]
    assert (after.loc["u3"].valid_target, after.loc["u3"].test_target) == ("i7", "i8")
    assert after.loc["u3"].input_versions == '{"interactions": 1}'
    assert after.loc["u1"].input_versions == '{"interactions": 0}'
    assert lake.version("user_sequences") == v_seq + 1


def test_replaced_interactions_delete_users_and_stale_quarantine(spark, tmp_path):
    """A re-ingest that drops a user, shortens one and lengthens a short one: user_sequences and the
    stage's quarantine records follow the new input (nothing left over from the first run)."""
    lake = Lake(tmp_path / "lake")
    ctx = _ctx(spark, lake)
    _write_interactions(lake, ctx, [*EVENTS, ("u4", "z", 1, 0)])  # u2 and u4 too short
    run_stage("build_sequences", ctx, check=False)
    q_ingest = pd.DataFrame({"stage": ["ingest"], "source": ["f"], "source_row": [1], "reason": ["r"],
                             "payload": ["{}"]})
    lake.write_arrow("quarantine", q_ingest, "merge", ctx.commit_info("ingest", {}))  # another stage's record
    # u1 gone; u2 now has three distinct items; u3 down to two items (too short); u4 unchanged
    events = [("u2", "x", 1, 0), ("u2", "y", 3, 2), ("u2", "w", 5, 4), ("u3", "i1", 1, 1), ("u3", "i2", 2, 2),
              ("u4", "z", 1, 0)]
    _write_interactions(lake, ctx, events)
    r = run_stage("build_sequences", _ctx(spark, lake), check=False)
    seqs = lake.read_pandas("user_sequences").set_index("user_id")
    assert sorted(seqs.index) == ["u2"] and seqs.loc["u2"].item_ids.tolist() == ["x", "y", "w"]
    assert r.extra["deleted_users"] == 2 and r.extra["changed_users"] == 1 and r.rows_out == 1
    q = lake.read_pandas("quarantine")
    mine = q[q.stage == "build_sequences"]
    assert sorted(json.loads(p)["user_id"] for p in mine.payload) == ["u3", "u4"]
    assert q[q.stage == "ingest"].source.tolist() == ["f"]  # other stages' records are not touched

    # the same input again: nothing changes, no commit to either table
    v_seq, v_q = lake.version("user_sequences"), lake.version("quarantine")
    r2 = run_stage("build_sequences", _ctx(spark, lake), check=False)
    assert r2.extra["deleted_users"] == 0 and r2.tables["user_sequences"] is None
    assert lake.version("user_sequences") == v_seq and len(lake.read_pandas("quarantine")) == 3
    assert lake.version("quarantine") == v_q + 1  # the two current records, merged again (unchanged)


# ----------------------------------------------------------------------------- bundled data, DuckDB
def _duckdb():
    import duckdb
    import duckdb_extension_delta

    ext = next(Path(duckdb_extension_delta.__file__).parent.glob("extensions/*/delta.duckdb_extension"))
    con = duckdb.connect()
    con.execute(f"LOAD '{ext}'")
    return con


@pytest.mark.slow
def test_bundled_data_read_by_duckdb_and_deltalake(spark, tmp_path):
    lake = Lake(tmp_path / "lake")
    cfg = load_config("tiny", overrides=["quality.enabled=false"])
    ctx = StageContext(cfg=cfg, lake=lake, run_date=RUN_DATE, dataset_dir=str(BUNDLED), _spark=spark)
    for stage in ("ingest", "build_sequences", "build_prompts"):
        run_stage(stage, ctx, check=False)

    con = _duckdb()
    scan = lambda t: f"delta_scan('{lake.path(t)}')"  # noqa: E731
    assert con.sql(f"SELECT count(DISTINCT user_id), count(*), count(DISTINCT item_id) FROM {scan('interactions')}"
                   ).fetchone() == (4905, 53258, 2420)
    assert con.sql(f"SELECT count(*), sum(seq_len), min(seq_len), max(seq_len) FROM {scan('user_sequences')}"
                   ).fetchone() == (4905, 53258, 5, 94)
    assert con.sql(f"SELECT count(*) FROM {scan('prompts')}").fetchone() == (4905,)
    assert con.sql(f"SELECT count(*) FROM {scan('items')}").fetchone() == (2420,)

    # DuckDB builds the same sequences from the same interactions, and the same hashes
    mismatches = con.sql(f"""
        WITH d AS (
            SELECT user_id, list(item_id ORDER BY event_ts, event_seq, item_id) AS item_ids
            FROM {scan('interactions')} GROUP BY user_id)
        SELECT count(*) FROM d JOIN {scan('user_sequences')} s USING (user_id)
        WHERE d.item_ids <> s.item_ids
           OR s.history <> d.item_ids[1:len(d.item_ids) - 2]
           OR s.valid_target <> d.item_ids[-2] OR s.test_target <> d.item_ids[-1]
           OR s.seq_hash <> sha1(array_to_string(d.item_ids, chr(31)))
    """).fetchone()[0]
    assert mismatches == 0
    # the README's order for user "0" (items 0..4) survives ingest and sequencing
    assert con.sql(f"SELECT item_ids FROM {scan('user_sequences')} WHERE user_id = '0'").fetchone()[0] == \
        ["0", "1", "2", "3", "4"]

    # leakage guard at scale: no prompt shows a target, and the shown items end the history
    bad = con.sql(f"""
        SELECT count(*) FROM {scan('prompts')} p JOIN {scan('user_sequences')} s USING (user_id)
        WHERE list_contains(p.prompt_item_ids, s.valid_target) OR list_contains(p.prompt_item_ids, s.test_target)
           OR p.prompt_item_ids <> s.history[len(s.history) - len(p.prompt_item_ids) + 1:]
    """).fetchone()[0]
    assert bad == 0

    # deltalake and Spark read the very rows DuckDB read
    duck = con.sql(f"SELECT user_id, seq_hash FROM {scan('user_sequences')}").df()
    dl = lake.read_pandas("user_sequences", columns=["user_id", "seq_hash"])
    sp = lake.read_spark(spark, "user_sequences").select("user_id", "seq_hash").toPandas()
    key = lambda df: sorted(map(tuple, df[["user_id", "seq_hash"]].values.tolist()))  # noqa: E731
    assert key(duck) == key(dl) == key(sp)
    assert lake.count("interactions") == 53258
