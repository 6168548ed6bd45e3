"""Stage ingest on hand-made files: three source formats, every bad-input class, real Spark + Delta.

Fixtures (``tests/fixtures/``), and what each row is for:

* ``lcrec_tiny``: users u1..u5 and ``u\\xff6`` (a raw 0xFF byte in the key); u2 repeats item 3,
  u4 names the unknown item 99, u5 is not a list; item 4 has a 5,000-character title, item 6 a
  0xFF byte in its title, item 7 is not an object.
* ``amazon_tiny``: gzip JSON lines as published (reviews JSON, metadata Python-literal lines as in
  the 2014 dump plus one 2018-style JSON line); unreadable lines, a review without reviewerID,
  a timestamp "yesterday", a 0xFF byte in a reviewer id, tied timestamps, a duplicate review.
* ``amazon2023_tiny``: the 2023 release's keys (reviews ``user_id, asin, parent_asin`` with ms
  timestamps, two variants of one product; metadata ``parent_asin, store, categories`` with an empty
  category list beside ``main_category``); a review of a product the metadata lacks.
* ``events_tiny``: CSV events (unix seconds, unix ms and ISO-8601 timestamps; a bad timestamp,
  an empty one, a missing user id, an unknown item, a duplicate event, a 0xFF byte, a 200-char id).
"""

from __future__ import annotations

import gzip
import json
from datetime import UTC, date, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from slimrec import ingest
from slimrec.config import load_config
from slimrec.ingest import IngestError, parse_json_line
from slimrec.lake import Lake
from slimrec.pipeline import StageError, run_stage
from slimrec.stages.base import StageContext
from typer.testing import CliRunner

FIXTURES = Path(__file__).parent / "fixtures"
RUN_DATE = date(2024, 1, 15)
BASE = datetime(2014, 1, 1, tzinfo=UTC)  # ingest.order_base_ts default


def _ctx(spark, lake_dir, dataset, *sets):
    cfg = load_config("tiny", overrides=["quality.enabled=false", *sets])
    return StageContext(cfg=cfg, lake=Lake(lake_dir), run_date=RUN_DATE, dataset_dir=str(dataset), _spark=spark)


def _ingest(spark, lake_dir, dataset, *sets):
    ctx = _ctx(spark, lake_dir, dataset, *sets)
    return ctx, run_stage("ingest", ctx, check=False)


def _inter(lake: Lake) -> list[tuple]:
    df = lake.read_pandas("interactions").sort_values(["user_id", "event_ts", "event_seq"])
    return [(r.user_id, r.item_id, r.event_ts.to_pydatetime(), r.event_seq, r.ts_derived)
            for r in df.itertuples()]


def _quarantine(lake: Lake) -> list[tuple]:
    q = lake.read_pandas("quarantine")
    rows = [(r.stage, r.source, None if pd.isna(r.source_row) else int(r.source_row), r.reason)
            for r in q.itertuples()]
    return _sorted(rows)


def _sorted(rows: list[tuple]) -> list[tuple]:
    return sorted(rows, key=lambda r: tuple((x is not None, x) for x in r))


# ----------------------------------------------------------------------------- LC-Rec JSON
@pytest.fixture(scope="module")
def lcrec(spark, tmp_path_factory):
    ctx, result = _ingest(spark, tmp_path_factory.mktemp("lcrec") / "lake", FIXTURES / "lcrec_tiny")
    return ctx.lake, result


def test_lcrec_interactions_keep_source_order_with_derived_timestamps(lcrec):
    lake, result = lcrec

    def ev(user, item, pos):  # event_ts = base + position seconds, event_seq = position
        return (user, item, BASE.replace(second=pos), pos, True)

    assert _inter(lake) == [
        ev("u1", "1", 0), ev("u1", "2", 1), ev("u1", "3", 2), ev("u1", "4", 3), ev("u1", "5", 4),
        # u2 repeats item 3: both events are kept here (different positions); build_sequences dedups
        ev("u2", "3", 0), ev("u2", "1", 1), ev("u2", "3", 2), ev("u2", "2", 3), ev("u2", "6", 4),
        ev("u3", "1", 0), ev("u3", "2", 1),
        # u4's item 99 is not in the catalogue: quarantined, the order of the rest is kept
        ev("u4", "2", 0), ev("u4", "4", 2), ev("u4", "5", 3),
    ]
    assert (result.rows_in, result.rows_out) == (19, 15)
    assert result.extra["format"] == "lcrec"
    assert result.extra["items"] == 6


def test_lcrec_bad_rows_are_quarantined_with_reasons(lcrec):
    lake, result = lcrec
    assert _quarantine(lake) == _sorted([
        ("ingest", "tiny.inter.json", 4, "user value is not a list of items"),  # u5: 5th user
        ("ingest", "tiny.inter.json", 13, "unknown item id (not in the catalogue)"),  # u4's 99
        ("ingest", "tiny.inter.json", 16, "non-UTF-8 bytes in id"),  # u\xff6, three items
        ("ingest", "tiny.inter.json", 17, "non-UTF-8 bytes in id"),
        ("ingest", "tiny.inter.json", 18, "non-UTF-8 bytes in id"),
        ("ingest", "tiny.item.json", 6, "item record is not an object"),  # item 7
    ])
    assert result.extra["quarantined"] == 6
    q = lake.read_pandas("quarantine")
    assert q.payload.str.contains("99").any()


def test_lcrec_item_text_is_normalised(lcrec):
    lake, _ = lcrec
    items = lake.read_pandas("items").set_index("item_id")
    assert sorted(items.index) == ["1", "2", "3", "4", "5", "6"]
    one = items.loc["1"]
    assert one.title == "Pens & Pencils"  # double-encoded entity decoded, trailing comma gone
    assert one.description == "Blue ink"  # markup and repeated spaces gone
    assert list(one.categories) == ["Office Products", "Writing & Correction Supplies", "Pens"]
    assert one.item_text == "Pens & Pencils | Office Products > Writing & Correction Supplies > Pens | Bic"
    assert items.loc["2"].title == "Stapler Deluxe"
    assert items.loc["2"].brand is None and items.loc["2"].description is None
    assert list(items.loc["2"].categories) == ["Office Products", "Staplers"]
    assert items.loc["5"].title == "Paper Clips"  # BEL control character
    assert list(items.loc["5"].categories) == ["Office Products", "Clips"]
    assert items.loc["6"].title == "Ink Cartridge Black"  # the 0xFF byte is not kept as U+FFFD
    assert items.loc["4"].title == ("Desk Lamp " * 200).rstrip()  # 5,000 chars cut to ingest.max_text_chars (2,000)
    assert items.loc["4"].title.startswith("Desk Lamp Desk Lamp")
    import hashlib

    assert one.text_hash == hashlib.sha1(one.item_text.encode()).hexdigest()


def test_lcrec_raw_tables_hold_every_record(lcrec):
    lake, _ = lcrec
    raw = lake.read_pandas("raw_interactions")
    assert len(raw) == 19  # 5 + 5 + 2 + 4 + 3 list entries; u5's non-list value is not a row
    assert sorted(raw.source_row) == list(range(19))
    assert raw.ts_raw.isna().all()
    assert lake.count("raw_items") == 6
    assert set(lake.read_pandas("interactions").run_date) == {RUN_DATE}


# ----------------------------------------------------------------------------- Amazon dumps (gzip)
@pytest.fixture(scope="module")
def amazon(spark, tmp_path_factory):
    ctx, result = _ingest(spark, tmp_path_factory.mktemp("amazon") / "lake", FIXTURES / "amazon_tiny")
    return ctx.lake, result


def _ts(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, tz=UTC)


def test_amazon_gzip_json_lines(amazon):
    lake, result = amazon
    assert result.extra["format"] == "amazon"
    assert _inter(lake) == [
        ("A1", "B001", _ts(1400000000), 0, False),  # tied timestamps: source row breaks the tie
        ("A1", "B002", _ts(1400000000), 1, False),
        ("A1", "B003", _ts(1400086400), 2, False),
        ("A2", "B003", _ts(1300000000), 5, False),
        ("A2", "B001", _ts(1300000500), 7, False),
        ("A2", "B004", _ts(1300000900), 8, False),
        ("A2", "B002", _ts(1300000900), 11, False),
    ]
    assert _quarantine(lake) == _sorted([
        ("ingest", "reviews_Tiny_5.json.gz", 3, "unreadable JSON line"),
        ("ingest", "reviews_Tiny_5.json.gz", 4, "missing user id"),
        ("ingest", "reviews_Tiny_5.json.gz", 6, "unparseable timestamp: yesterday"),
        ("ingest", "reviews_Tiny_5.json.gz", 10, "non-UTF-8 bytes in id"),
        ("ingest", "reviews_Tiny_5.json.gz", 12, "duplicate event (same user, item, event_ts; first kept)"),
        ("ingest", "meta_Tiny.json.gz", 4, "unreadable JSON line"),
        ("ingest", "meta_Tiny.json.gz", 5, "item record without id"),
    ])
    # 13 lines: one blank (skipped), one unreadable (quarantined before it is a raw row), 11 raw rows
    assert (result.rows_in, result.rows_out, result.extra["quarantined"]) == (11, 7, 7)


def test_amazon_python_literal_metadata(amazon):
    lake, _ = amazon
    items = lake.read_pandas("items").set_index("item_id")
    assert sorted(items.index) == ["B001", "B002", "B003", "B004"]
    assert items.loc["B001"].title == "Scotch Tape & Dispenser"
    assert list(items.loc["B001"].categories) == ["Office Products", "Office & School Supplies", "Tape"]  # 1st path
    assert items.loc["B001"].brand == "3M"
    assert items.loc["B002"].title == "Sharpie's Marker"
    assert items.loc["B002"].description == "Permanent."  # a full stop is kept (abbreviations)
    assert list(items.loc["B003"].categories) == ["Office Products", "Paper"]  # 2018 "category" list
    assert items.loc["B004"].title == "Desk Organizer"


def test_amazon_2023_release(spark, tmp_path):
    """Items are products (parent_asin, the metadata's key), not the variant bought; ms timestamps."""
    ctx, result = _ingest(spark, tmp_path / "lake", FIXTURES / "amazon2023_tiny")
    lake = ctx.lake
    assert result.extra["format"] == "amazon"
    ms = lambda v: datetime.fromtimestamp(v / 1000, tz=UTC)  # noqa: E731
    assert _inter(lake) == [
        ("U1", "P01", ms(1588687728923), 0, False),
        ("U1", "P02", ms(1588687728923), 1, False),
        ("U2", "P01", ms(1600000000000), 2, False),  # another variant (B01V2) of product P01
        ("U2", "P03", ms(1600000100000), 3, False),
    ]
    assert _quarantine(lake) == [
        ("ingest", "Office_Products.jsonl.gz", 4, "unknown item id (not in the catalogue)")]
    items = lake.read_pandas("items").set_index("item_id")
    assert sorted(items.index) == ["P01", "P02", "P03"]
    assert (items.loc["P01"].title, items.loc["P01"].brand) == ("Gel Pens, 12 Pack", "Pilot")
    assert list(items.loc["P01"].categories) == ["Office Products", "Writing", "Pens"]
    assert items.loc["P01"].description == "Bright colours"
    assert list(items.loc["P02"].categories) == ["Office Products"]  # categories [] -> main_category
    assert items.loc["P03"].brand is None


# ----------------------------------------------------------------------------- events CSV
@pytest.fixture(scope="module")
def events(spark, tmp_path_factory):
    ctx, result = _ingest(spark, tmp_path_factory.mktemp("events") / "lake", FIXTURES / "events_tiny")
    return ctx.lake, result


def test_events_csv_timestamps_and_bad_rows(events):
    lake, result = events
    assert result.extra["format"] == "events"
    assert _inter(lake) == [
        ("u1", "i1", _ts(1400000000), 0, False),
        ("u1", "i2", _ts(1400000000), 1, False),
        ("u1", "i3", _ts(1400000001), 2, False),  # ISO-8601 string
        ("u1", "i4", _ts(1400000002), 4, False),  # unix milliseconds
        ("u2", "i3", _ts(1400000050), 9, False),
        ("u2", "i1", _ts(1400000100), 6, False),
        ("u2", "i2", _ts(1400000400), 11, False),
        ("u2", "i3", _ts(1400000500), 12, False),  # a later repeat: an event, deduplicated in sequences
    ]
    assert _quarantine(lake) == _sorted([
        ("ingest", "events.csv", 3, "duplicate event (same user, item, event_ts; first kept)"),
        ("ingest", "events.csv", 5, "unparseable timestamp: not-a-date"),
        ("ingest", "events.csv", 7, "unknown item id (not in the catalogue)"),
        ("ingest", "events.csv", 8, "missing user id"),
        ("ingest", "events.csv", 10, "missing timestamp"),
        ("ingest", "events.csv", 13, "non-UTF-8 bytes in id"),
        ("ingest", "events.csv", 14, "id longer than 128 characters"),
    ])
    assert (result.rows_in, result.rows_out, result.extra["quarantined"]) == (15, 8, 7)
    items = lake.read_pandas("items").set_index("item_id")
    assert items.loc["i3"].title == "Sticky Notes, 3x3"
    assert list(items.loc["i1"].categories) == ["Office", "Pens"]
    assert items.loc["i4"].brand is None


def test_events_parquet_without_catalogue(spark, tmp_path):
    """Parquet events with native timestamps and no items file: the catalogue is the ids seen."""
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame({
        "userId": ["a", "a", "a", "b"],
        "itemId": ["x", "y", "z", "x"],
        "timestamp": pd.to_datetime(["2020-01-02", "2020-01-01", "2020-01-01", "2020-01-03"], utc=True),
    }).to_parquet(data / "events.parquet")
    ctx, result = _ingest(spark, tmp_path / "lake", data)
    day = lambda d: datetime(2020, 1, d, tzinfo=UTC)  # noqa: E731
    assert _inter(ctx.lake) == [
        ("a", "y", day(1), 1, False), ("a", "z", day(1), 2, False), ("a", "x", day(2), 0, False),
        ("b", "x", day(3), 3, False),
    ]
    items = ctx.lake.read_pandas("items")
    assert sorted(items.item_id) == ["x", "y", "z"]
    assert set(items.item_text) == {"unknown item"}
    assert result.extra["quarantined"] == 0


def test_parquet_source_rows_are_file_rows(spark, tmp_path):
    """A Parquet file read in several row groups and Spark partitions: each row's source_row is its row in
    the file (Parquet's own row index), so the quarantine points at the right row."""
    data = tmp_path / "data"
    data.mkdir()
    n = 3000
    users = [f"u{k}" if k % 997 else "" for k in range(n)]  # rows 0, 997, 1994, 2991 have no user
    t = pa.table({"user_id": users, "item_id": [f"i{k % 7}" for k in range(n)], "timestamp": list(range(n))})
    pq.write_table(t, data / "events.parquet", row_group_size=250)
    spark.conf.set("spark.sql.files.maxPartitionBytes", "4096")
    try:
        ctx, result = _ingest(spark, tmp_path / "lake", data)
        raw = ctx.lake.read_pandas("raw_interactions")
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
    assert sorted(raw.source_row) == list(range(n))
    assert all(raw.user_raw.fillna("").to_numpy() == [users[r] for r in raw.source_row])
    assert all(raw.ts_raw.astype(int).to_numpy() == raw.source_row.to_numpy())
    assert _quarantine(ctx.lake) == [("ingest", "events.parquet", r, "missing user id") for r in (0, 997, 1994, 2991)]
    assert result.rows_out == n - 4


def test_amazon_2023_benchmark_csv_is_events(spark, tmp_path):
    """The 2023 release's benchmark CSV (user_id, parent_asin, rating, timestamp in ms) is an events file
    although its name says "Products": its columns decide; the metadata CSV beside it is the catalogue."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "Office_Products.train.csv").write_text(
        "user_id,parent_asin,rating,timestamp,history\n"
        "U1,P01,5.0,1588687728923,\nU1,P02,4.0,1588687729923,P01\nU2,P02,3.0,1600000000000,\n")
    (data / "meta_Office_Products.csv").write_text("parent_asin,title,store\nP01,Gel Pens,Pilot\nP02,Stapler,\n")
    from slimrec.ingest import detect_format

    fmt, files = detect_format(data)
    assert (fmt, [p.name for p in files["interactions"]], [p.name for p in files["items"]]) == (
        "events", ["Office_Products.train.csv"], ["meta_Office_Products.csv"])
    ctx, result = _ingest(spark, tmp_path / "lake", data)
    ms = lambda v: datetime.fromtimestamp(v / 1000, tz=UTC)  # noqa: E731
    assert _inter(ctx.lake) == [
        ("U1", "P01", ms(1588687728923), 0, False), ("U1", "P02", ms(1588687729923), 1, False),
        ("U2", "P02", ms(1600000000000), 2, False),
    ]
    items = ctx.lake.read_pandas("items").set_index("item_id")
    assert (items.loc["P01"].title, items.loc["P01"].brand) == ("Gel Pens", "Pilot")
    assert result.extra["quarantined"] == 0


def test_events_csv_with_byte_order_mark_and_spaced_header(spark, tmp_path):
    """A spreadsheet's "CSV UTF-8" starts with a byte-order mark; hand-written headers have spaces after
    commas: the columns format detection saw are the ones read."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "clicks.csv").write_bytes("\ufeffuser_id, item_id, timestamp\nu1,i1,100\nu1,i2,200\n".encode())
    (data / "items.csv").write_bytes("\ufeffitem_id, title\ni1,Blue pen\ni2,Red pen\n".encode())
    ctx, result = _ingest(spark, tmp_path / "lake", data)
    assert [(r[0], r[1], r[3]) for r in _inter(ctx.lake)] == [("u1", "i1", 0), ("u1", "i2", 1)]
    assert ctx.lake.read_pandas("items").set_index("item_id").loc["i2"].title == "Red pen"
    assert result.extra["quarantined"] == 0


def _dataset(tmp_path: Path, files: dict[str, str]) -> Path:
    """A dataset folder holding ``files`` (name -> text)."""
    data = tmp_path / "data"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
    return data


def test_events_column_names_match_without_case_or_separators(spark, tmp_path):
    """MovieLens' ratings.csv (userId, movieId) and movies.csv (movieId, title, genres): the catalogue is
    told from the events by its columns, and the ids and genres are read."""
    data = _dataset(tmp_path, {
        "ratings.csv": "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n2,31,4.0,1260759100\n",
        "movies.csv": 'movieId,title,genres\n31,"Dangerous Minds (1995)",Drama\n1029,"Dumbo (1941)",Animation|Children|Drama|Musical\n',
    })
    ctx, result = _ingest(spark, tmp_path / "lake", data)
    assert [(r[0], r[1], r[2]) for r in _inter(ctx.lake)] == [
        ("1", "31", _ts(1260759144)), ("1", "1029", _ts(1260759179)), ("2", "31", _ts(1260759100))]
    dumbo = ctx.lake.read_pandas("items").set_index("item_id").loc["1029"]
    assert dumbo.title == "Dumbo (1941)" and list(dumbo.categories) == ["Animation", "Children", "Drama", "Musical"]
    assert result.extra["quarantined"] == 0


def test_recbole_atomic_files(spark, tmp_path):
    """RecBole's *.inter / *.item: tab-separated, every header with a :type suffix."""
    data = _dataset(tmp_path, {
        "ml.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n196\t302\t3\t881250950\n",
        "ml.item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                   "242\tKolya\t1996\tComedy\n302\tL.A. Confidential\t1997\tCrime Film-Noir\n",
    })
    assert ingest.detect_format(data) == ("events", {"interactions": [data / "ml.inter"], "items": [data / "ml.item"]})
    ctx, result = _ingest(spark, tmp_path / "lake", data)
    assert [(r[0], r[1], r[2]) for r in _inter(ctx.lake)] == [("196", "242", _ts(881250949)), ("196", "302", _ts(881250950))]
    assert ctx.lake.read_pandas("items").set_index("item_id").loc["302"].title == "L.A. Confidential"
    assert result.extra["quarantined"] == 0


def test_column_name_keys():
    assert {ingest._name_key(c) for c in ("userId", "user_id", "User-ID", " user id", "\ufeffuser_id:token")} == {"userid"}
    cols = ["t_dat", "customer_id", "article_id", "price"]  # H&M's transactions
    assert [ingest._column(cols, names, "x", "f") for names in (ingest.USER_COLS, ingest.ITEM_COLS, ingest.TS_COLS)] == [
        "customer_id", "article_id", "t_dat"]
    # the order of preference holds across spellings: parent_asin before asin, whatever their case
    assert ingest._column(["ASIN", "parentAsin", "user"], ingest.ITEM_COLS, "item id", "f") == "parentAsin"
    # an item record's fields are matched the same way, and an empty value is no value
    assert ingest._pick(ingest._keyed({"Product Title": "Pen", "title": ""}), ingest.ITEM_TITLE_KEYS) == "Pen"


def test_timestamp_parsing_rules(spark):
    """build_interactions alone: every timestamp shape a source may use, and what is refused."""
    from slimrec.ingest import build_interactions

    cases = {  # ts_raw -> expected event_ts (None: quarantined as unparseable)
        "1400000000": _ts(1400000000),
        "1400000000123": datetime(2014, 5, 13, 16, 53, 20, 123000, tzinfo=UTC),  # ms
        "1400000000123456": datetime(2014, 5, 13, 16, 53, 20, 123456, tzinfo=UTC),  # us
        "1400000000123456789": datetime(2014, 5, 13, 16, 53, 20, 123456, tzinfo=UTC),  # ns
        "1400000000.5": datetime(2014, 5, 13, 16, 53, 20, 500000, tzinfo=UTC),
        "2014-05-13T16:53:20Z": _ts(1400000000),
        "2014-05-13 16:53:20": _ts(1400000000),
        "2014-05-13": datetime(2014, 5, 13, tzinfo=UTC),
        "yesterday": None,
        "1e30": None,
        "NaN": None,
    }
    raw = spark.createDataFrame(
        [("f", i, "u", f"i{i}", ts, None) for i, ts in enumerate(cases)],  # distinct items: no dedup
        "source_file string, source_row long, user_raw string, item_raw string, ts_raw string, position long",
    )
    inter, q = build_interactions(raw, None, "2014-01-01T00:00:00+00:00", 128)
    got = {list(cases)[r.event_seq]: r.event_ts for r in inter.collect()}
    bad = {list(cases)[r.source_row]: r.reason for r in q.collect()}
    assert got == {k: v.replace(tzinfo=None) for k, v in cases.items() if v is not None}
    assert bad == {k: f"unparseable timestamp: {k}" for k, v in cases.items() if v is None}


def test_source_rows_are_exact_across_file_splits(spark, tmp_path):
    """source_row is the 0-based row of the file even when Spark reads it as several splits."""
    from slimrec.ingest import read_events_spark

    f = tmp_path / "events.csv"
    f.write_text("user_id,item_id,timestamp\n" + "".join(f"u{n % 7},i{n},{n}\n" for n in range(3000)))
    old = spark.conf.get("spark.sql.files.maxPartitionBytes")
    spark.conf.set("spark.sql.files.maxPartitionBytes", "4096")  # about 9 splits of ~330 rows
    try:
        raw, _ = read_events_spark(spark, [f], [])
        assert raw.rdd.getNumPartitions() > 5
        got = raw.select("source_row", "ts_raw").collect()
    finally:
        spark.conf.set("spark.sql.files.maxPartitionBytes", old)
    assert sorted(r.source_row for r in got) == list(range(3000))
    assert all(int(r.ts_raw) == r.source_row for r in got)


def test_rerun_of_ingest_replaces_tables(spark, tmp_path):
    """A second ingest of the same files overwrites (same rows, same quarantine), never appends."""
    ctx, _ = _ingest(spark, tmp_path / "lake", FIXTURES / "amazon_tiny")
    first_q = _quarantine(ctx.lake)
    ctx2, _ = _ingest(spark, tmp_path / "lake", FIXTURES / "amazon_tiny")
    assert ctx2.lake.count("interactions") == 7
    assert ctx2.lake.count("raw_interactions") == 11
    assert _quarantine(ctx2.lake) == first_q
    assert ctx2.lake.version("interactions") == 1


# ----------------------------------------------------------------------------- whole-input errors
def test_read_lcrec_quarantine_keys_are_unique(tmp_path):
    """Two bad users in one file get two quarantine keys (a MERGE of duplicate keys fails on rerun)."""
    from slimrec.ingest import read_lcrec

    f = tmp_path / "x.inter.json"
    f.write_text('{"a": "x", "b": [1, 2], "c": {"d": 1}}')
    raw, raw_items, q = read_lcrec([f], [])
    assert raw[["user_raw", "item_raw", "source_row", "position"]].values.tolist() == [["b", "1", 0, 0], ["b", "2", 1, 1]]
    assert q[["source", "source_row", "reason"]].values.tolist() == [
        ["x.inter.json", 0, "user value is not a list of items"],
        ["x.inter.json", 2, "user value is not a list of items"],
    ]
    assert len(raw_items) == 0


def test_parse_json_line_reasons():
    assert parse_json_line('{"a": 1}') == ({"a": 1}, None)
    assert parse_json_line("{'a': [['x']]}") == ({"a": [["x"]]}, None)
    assert parse_json_line("{nope") == (None, "unreadable JSON line")
    assert parse_json_line("[1, 2]") == (None, "JSON line is not an object")


@pytest.fixture
def no_spark(monkeypatch):
    """Whole-input errors of JSON sources are found before Spark starts (and the CLI, which stops
    its session on the way out, must not get hold of the tests' shared one)."""

    def refuse(self):
        raise AssertionError("Spark was started before the input error was found")

    monkeypatch.setattr(StageContext, "spark", refuse)


def _cli(args: list[str]):
    from slimrec.cli import app

    return CliRunner().invoke(app, args)


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    out = result.output.strip()
    assert out.startswith("error: "), out
    assert len(out.splitlines()) == 1, out
    assert "Traceback" not in out
    for f in fragments:
        assert f in out, out


def _ingest_cli(dataset, lake, *extra):
    return _cli(["ingest", "--dataset", str(dataset), "--lake", str(lake), "--profile", "tiny",
                 "--set", "quality.enabled=false", "--run-date", "2024-01-15", *extra])


def test_cli_missing_folder(no_spark, tmp_path):
    _assert_one_line_error(_ingest_cli(tmp_path / "nope", tmp_path / "lake"), "does not exist")


def test_cli_dataset_is_a_file(no_spark, tmp_path):
    f = tmp_path / "x.json"
    f.write_text("{}")
    _assert_one_line_error(_ingest_cli(f, tmp_path / "lake"), "is not a folder")


def test_cli_unknown_format(no_spark, tmp_path):
    _assert_one_line_error(_ingest_cli(FIXTURES / "unknown_format", tmp_path / "lake"),
                           "no recognisable data", "notes.txt")


def test_cli_empty_folder(no_spark, tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(_ingest_cli(tmp_path / "empty", tmp_path / "lake"), "no recognisable data", "no files")


def test_cli_format_mismatch(no_spark, tmp_path):
    _assert_one_line_error(_ingest_cli(FIXTURES / "lcrec_tiny", tmp_path / "lake", "--format", "amazon"),
                           "--format amazon", "lcrec")


def test_cli_unknown_format_name(no_spark, tmp_path):
    result = _ingest_cli(FIXTURES / "lcrec_tiny", tmp_path / "lake", "--format", "xml")
    _assert_one_line_error(result, "ingest.format")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "is not valid JSON (line 1, column 1)"),  # empty file
        (b'{"u1": [1, 2, 3],\n  "u2": [4, 5', "is not valid JSON (line 2"),  # cut short
        (b"[1, 2, 3]", "expected an object {user: [items]}, got list"),
    ],
    ids=["empty", "truncated", "wrong-shape"],
)
def test_cli_unreadable_lcrec_document(no_spark, tmp_path, content, fragment):
    d = tmp_path / "data"
    d.mkdir()
    (d / "x.inter.json").write_bytes(content)
    (d / "x.item.json").write_text("{}")
    _assert_one_line_error(_ingest_cli(d, tmp_path / "lake"), "x.inter.json", fragment)


@pytest.mark.slow  # starts its own JVM
def test_cli_ingest_error_after_spark_started(tmp_path):
    """Through the installed ``slim`` script: no valid interactions is one line, exit 2, no traceback."""
    import subprocess
    import sys

    d = tmp_path / "data"
    d.mkdir()
    (d / "x.inter.json").write_text('{"u1": [1, 2]}')
    (d / "x.item.json").write_text('{"7": {"title": "Pen"}}')
    slim = Path(sys.executable).parent / "slim"
    p = subprocess.run(
        [str(slim), "ingest", "--dataset", str(d), "--lake", str(tmp_path / "lake"), "--profile", "tiny",
         "--set", "quality.enabled=false"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: no valid interactions in " + str(d) +
                      " (2 rows read; unknown item id (not in the catalogue): 2)"]
    assert "Traceback" not in p.stderr + p.stdout


def test_empty_events_file(spark, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "events.csv").write_text("user_id,item_id,timestamp\n")
    with pytest.raises(IngestError, match=r"^no valid interactions in .* \(0 rows read; the files hold no records\)$"):
        _ingest(spark, tmp_path / "lake", d)
    assert not Lake(tmp_path / "lake").exists("interactions")  # nothing half-written


def test_events_without_timestamp_column(spark, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "events.csv").write_text("user_id,item_id,rating\nu1,i1,5\n")
    with pytest.raises(IngestError, match=r"^events.csv: no timestamp column \(looked for .*; found user_id, item_id, rating\)$"):
        _ingest(spark, tmp_path / "lake", d)


def test_stage_needs_its_input(tmp_path):
    ctx = StageContext(cfg=load_config("tiny"), lake=Lake(tmp_path / "lake"), run_date=RUN_DATE)
    with pytest.raises(StageError, match="needs table"):
        run_stage("build_sequences", ctx, check=False)


def test_gzip_fixture_is_really_gzip():
    """The Amazon pair is compressed, as published (guards against a fixture edited by hand)."""
    for name in ("reviews_Tiny_5.json.gz", "meta_Tiny.json.gz"):
        with gzip.open(FIXTURES / "amazon_tiny" / name) as f:
            assert f.readline().startswith(b"{")


def test_lcrec_fixture_sanity():
    """The 0xFF bytes and the long title are really in the files (non-UTF-8, not escapes)."""
    inter = (FIXTURES / "lcrec_tiny" / "tiny.inter.json").read_bytes()
    items = (FIXTURES / "lcrec_tiny" / "tiny.item.json").read_bytes()
    assert b"u\xff6" in inter and b"\xff" in items
    with pytest.raises(UnicodeDecodeError):
        items.decode("utf-8")
    doc = json.loads(items.decode("utf-8", errors="replace"))
    assert len(doc["4"]["title"]) == 5000



def test_events_csv_as_pandas_writes_it(spark, tmp_path):
    """RFC 4180 catalogue (doubled quotes, line breaks inside a quoted description) and ids that pandas
    wrote as floats (an integer column with a missing value): every row parsed, ids matched."""
    data = tmp_path / "data"
    data.mkdir()
    items = pd.DataFrame({
        "item_id": [1000, 1001, 1002],
        "title": ['The "Silent" Book, part 0', "Ink, blue", "Pad"],
        "brand": ["Penguin", "Acme", None],
        "description": ["line one\nline two", 'a "quoted"\r\nsecond line', None],
    })
    items.to_csv(data / "items.csv", index=False)
    events = pd.DataFrame({"user_id": [7.0, 7.0, 7.0, 8.0, None], "item_id": [1000.0, 1001.0, 1002.0, 1000.0, 1001.0],
                           "timestamp": [1, 2, 3, 4, 5]})
    events.to_parquet(data / "events.parquet")
    ctx, result = _ingest(spark, tmp_path / "lake", data)
    got = ctx.lake.read_pandas("items").set_index("item_id").sort_index()
    assert list(got.index) == ["1000", "1001", "1002"]
    assert got.loc["1000"].title == 'The "Silent" Book, part 0' and got.loc["1000"].brand == "Penguin"
    assert got.loc["1001"].description == 'a "quoted" second line'
    assert [(r[0], r[1]) for r in _inter(ctx.lake)] == [("7", "1000"), ("7", "1001"), ("7", "1002"), ("8", "1000")]
    assert _quarantine(ctx.lake) == [("ingest", "events.parquet", 4, "missing user id")]
    assert result.extra["quarantined"] == 1


def test_detect_format_choices(tmp_path):
    """--format picks a format among those a folder holds; a broken first line does not hide a file; a
    lone catalogue-named events file gets a hint about names."""
    from slimrec.ingest import IngestError, detect_format

    d = tmp_path / "mixed"
    d.mkdir()
    (d / "user_item_events.csv").write_text("user_id,item_id,timestamp\nu1,i1,1\n")
    (d / "items.csv").write_text("item_id,title\ni1,Pen\n")
    (d / "reviews.json").write_text('{"reviewerID": "u1", "asi\n{"reviewerID": "u1", "asin": "i1", "unixReviewTime": 1}\n')
    assert detect_format(d)[0] == "amazon"  # auto: amazon before events; the first line is broken
    fmt, files = detect_format(d, "events")
    assert fmt == "events" and [p.name for p in files["interactions"]] == ["user_item_events.csv"]
    assert [p.name for p in files["items"]] == ["items.csv"]
    with pytest.raises(IngestError, match=r"--format lcrec given, but .* holds no lcrec files \(it looks like amazon, events\)"):
        detect_format(d, "lcrec")
    only = tmp_path / "only"
    only.mkdir()
    (only / "item_list.csv").write_text("item_id,title\ni1,Pen\n")
    with pytest.raises(IngestError, match="item_list.csv look.* like a catalogue .* name the events file"):
        detect_format(only)


def test_cli_run_without_dataset_needs_an_ingested_lake(no_spark, tmp_path):
    result = _cli(["run", "--lake", str(tmp_path / "lake"), "--profile", "tiny"])
    _assert_one_line_error(result, "holds no ingested data: pass --dataset DIR")


def test_integer_and_text_timestamp_files_parse_alike(spark, tmp_path):
    """An integer timestamp column is read as it is, a text one parsed from its text; two files, one
    of each, give the same events, and raw_interactions keeps each value's text."""
    data = tmp_path / "mixed"
    data.mkdir()
    pq.write_table(pa.table({"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "a"],
                             "timestamp": pa.array([1_400_000_000, 1_400_000_000_000, -5], pa.int64())}),
                   data / "events_int.parquet")
    pq.write_table(pa.table({"user_id": ["u3", "u3", "u4", "u4"], "item_id": ["a", "b", "a", "b"],
                             "timestamp": ["1400000000", "1400000000000", "2014-05-13T16:53:20", "soon"]}),
                   data / "events_text.parquet")
    ctx, result = _ingest(spark, tmp_path / "lake", data)
    t0 = datetime(2014, 5, 13, 16, 53, 20, tzinfo=UTC)
    got = {(r[0], r[1]): r[2] for r in _inter(ctx.lake)}
    assert got == {("u1", "a"): t0, ("u1", "b"): t0, ("u2", "a"): datetime(1969, 12, 31, 23, 59, 55, tzinfo=UTC),
                   ("u3", "a"): t0, ("u3", "b"): t0, ("u4", "a"): t0}
    assert [q[1:] for q in _quarantine(ctx.lake)] == [("events_text.parquet", 3, "unparseable timestamp: soon")]
    raw = ctx.lake.read_pandas("raw_interactions").sort_values(["source_file", "source_row"])
    assert raw.ts_raw.tolist() == ["1400000000", "1400000000000", "-5", "1400000000", "1400000000000",
                                   "2014-05-13T16:53:20", "soon"]
    assert result.rows_out == 6
