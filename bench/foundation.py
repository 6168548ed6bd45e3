"""python -m bench.foundation [--events 5000000] [--users 200000] [--items 50000] [--quick] [--only bundled|generated] [--warm-runs 5]

The foundation stages (ingest, build_sequences, build_prompts) through the real
stage code (``slimrec.pipeline.run_stage``, a temp lake, one local[2] Spark
session, the ``dev`` profile) on

* the bundled ``data/amazon_office_2014`` (LC-Rec JSON, 53K events), and
* a generated events table (``bench/gen_events.py``: 5M events, 200K users,
  50K items, Zipf popularity, tied timestamps; Parquet, ``events`` format).

For each stage: wall time, rows/s and the peak RSS of the process tree
(Python driver + Spark JVM + Python workers, sampled every 0.2 s).

Baselines: DuckDB does each stage's work from the same inputs, in a child
process limited to 2 threads, writing Parquet instead of Delta:

* ingest (:func:`duck_ingest`): reads the same raw files and writes
  raw_interactions, raw_items, items, interactions and quarantine with the
  stage's parsing, casting, dedupe and quarantine reasons (Parquet ``events``
  folders only: the bundled LC-Rec JSON has no ingest baseline);
* build_sequences (:func:`duck_sql`): from the stage's ``interactions`` Delta
  table (first occurrence per user and item, order by (event_ts, event_seq,
  item_id), last ``max_seq_len``, at least ``min_seq_len``, leave-one-out,
  sha1 hash), in two formulations (``list(... ORDER BY ...)`` and
  ``list_sort`` over structs; the ratio takes the faster);
* build_prompts (:func:`duck_prompts`): from the stage's ``user_sequences``
  and ``items`` Delta tables, the same teacher and student prompts and hashes.

Every baseline output is checked equal to the stage's tables row by row
(:func:`compare_tables`: the same column types, the same rows as multisets);
a difference is printed with the first differing row, and the run exits 1
after writing its figures. The ratio is the Spark stage (read, transform,
write Delta) over its DuckDB baseline (read, transform, write Parquet).
Spark session start is reported on its own line.

Each side is timed cold and warm. Cold: the stage as a daily job runs it,
its first query of that shape in the JVM (the stages in order, in one
session), which on 2 cores pays for the JIT compiler beside the tasks;
DuckDB's first run in a fresh process. Warm: the median of ``--warm-runs``
more runs of the same stage, each into a new lake holding copies of its input
tables (the stage's own lake would find nothing changed); DuckDB's same work
again, the median of as many more runs in the same process. Both ratios are
recorded, the warm ones with the range of the runs as their spread. Then the
rerun path: build_sequences twice more on its own lake, which already holds
``user_sequences`` (MERGE of changed users; nothing changed).

For the first build_sequences run and each warm one, the CPU seconds of the
Spark JVM's threads by kind (task threads, the C2 and C1 JIT compilers, GC;
Linux /proc) show where a first run's extra time goes.

Writes ``bench/results/foundation.json``. Never asserts times. The machine
may be shared: timings move with whatever else runs there.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path

from bench.common import PeakRSS, record, row

log = logging.getLogger("bench.foundation")

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "amazon_office_2014"
RUN_DATE = date(2024, 1, 15)
WARM_RUNS = 5
STAGES = ("ingest", "build_sequences", "build_prompts")


# ----------------------------------------------------------------------------- DuckDB baseline
def _duck_connect(threads: int = 2):
    import duckdb
    import duckdb_extension_delta

    ext = next(Path(duckdb_extension_delta.__file__).parent.glob("extensions/*/delta.duckdb_extension"))
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute("SET enable_progress_bar = false")
    con.execute(f"LOAD '{ext}'")
    return con


def duck_sql(interactions: str, max_len: int, min_len: int, variant: str) -> str:
    """The same sequences as slimrec.sequences.build_sequences (dedup: first occurrence)."""
    first = f"""
        SELECT user_id, item_id, min(struct_pack(t := event_ts, s := event_seq)) AS k
        FROM delta_scan('{interactions}') GROUP BY user_id, item_id"""
    if variant == "list_order_by":
        seq = f"""
        SELECT user_id, list(item_id ORDER BY k.t, k.s, item_id) AS all_ids, max(k.t) AS last_event_ts
        FROM ({first}) GROUP BY user_id"""
    else:  # list_sort over structs: sort inside each list, after a plain hash aggregate
        seq = f"""
        SELECT user_id, list_transform(list_sort(list(struct_pack(t := k.t, s := k.s, i := item_id))), x -> x.i)
               AS all_ids, max(k.t) AS last_event_ts
        FROM ({first}) GROUP BY user_id"""
    return f"""
        WITH s AS (SELECT user_id, all_ids[-{max_len}:] AS item_ids, last_event_ts FROM ({seq}))
        SELECT user_id, item_ids, item_ids[1:len(item_ids) - 2] AS history, item_ids[-2] AS valid_target,
               item_ids[-1] AS test_target, len(item_ids)::INT AS seq_len, last_event_ts,
               sha1(array_to_string(item_ids, chr(31))) AS seq_hash
        FROM s WHERE len(item_ids) >= {min_len}"""


def compare_tables(con, spark_rel: str, duck_rel: str, columns: list[str], key: list[str]) -> dict:
    """Row-by-row comparison of two relations (``delta_scan(...)``, ``read_parquet(...)``, a table name) over
    ``columns``: the same column types, and the same rows as multisets (each side EXCEPT ALL the other).
    ``first_difference`` holds the lowest differing row by ``key`` from either side (and the other side's
    row of the same key, when it has one), or None."""
    cols = ", ".join(f'"{c}"' for c in columns)
    types = {}
    for side, rel in (("spark", spark_rel), ("duckdb", duck_rel)):
        r = con.sql(f"SELECT {cols} FROM {rel} LIMIT 0")
        types[side] = [str(t) for t in r.types]
    out: dict = {"columns": columns}
    if types["spark"] != types["duckdb"]:
        bad = [f"{c}: spark {a} / duckdb {b}" for c, a, b in zip(columns, types["spark"], types["duckdb"], strict=True)
               if a != b]
        out.update(same=False, first_difference=f"column types differ: {'; '.join(bad)}")
        return out
    con.execute(f"CREATE OR REPLACE TEMP TABLE _only_spark AS SELECT {cols} FROM {spark_rel} "
                f"EXCEPT ALL SELECT {cols} FROM {duck_rel}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE _only_duck AS SELECT {cols} FROM {duck_rel} "
                f"EXCEPT ALL SELECT {cols} FROM {spark_rel}")
    out["only_spark"] = con.sql("SELECT count(*) FROM _only_spark").fetchone()[0]
    out["only_duckdb"] = con.sql("SELECT count(*) FROM _only_duck").fetchone()[0]
    out["total"] = con.sql(f"SELECT count(*) FROM {spark_rel}").fetchone()[0]
    out["same"] = out["only_spark"] == out["only_duckdb"] == 0
    out["first_difference"] = None
    if not out["same"]:
        order = ", ".join(f'"{c}"' for c in key)
        first = con.sql(f"SELECT * FROM (SELECT 'spark' AS side, * FROM _only_spark UNION ALL "
                        f"SELECT 'duckdb' AS side, * FROM _only_duck) ORDER BY {order}, side LIMIT 1").fetchall()[0]
        cond = " AND ".join(f'"{c}" IS NOT DISTINCT FROM ?' for c in key)
        at = [first[1 + columns.index(c)] for c in key]
        side, other = ("duckdb", "_only_duck") if first[0] == "spark" else ("spark", "_only_spark")
        twin = [(side, *t) for t in con.execute(f"SELECT * FROM {other} WHERE {cond} LIMIT 1", at).fetchall()]
        names = ["side", *columns]
        out["first_difference"] = "; ".join(str(dict(zip(names, r, strict=True))) for r in [first, *twin])
    con.execute("DROP TABLE IF EXISTS _only_spark; DROP TABLE IF EXISTS _only_duck")
    return out


class OutputMismatch(AssertionError):
    """A DuckDB baseline wrote something else than the Spark stage: the benchmark compares nothing then."""


def assert_same(check: dict, what: str) -> None:
    """Raise :class:`OutputMismatch` naming the first differing row when ``check`` (from
    :func:`compare_tables`) found a difference."""
    if not check.get("same"):
        counts = {k: check[k] for k in ("only_spark", "only_duckdb", "total") if k in check}
        raise OutputMismatch(f"{what}: DuckDB and Spark differ {counts}; first differing row: "
                             f"{check.get('first_difference')}")


# ----------------------------------------------------------------------------- DuckDB ingest baseline
def _udf(con, name: str, fn, ret: str) -> None:
    """A scalar DuckDB function over Arrow batches (one Python call per batch of values, not per row)."""
    if con.execute("SELECT count(*) FROM duckdb_functions() WHERE function_name = ?", [name]).fetchone()[0]:
        return
    con.create_function(name, lambda a: _arrow_array([fn(v) for v in a.to_pylist()], ret), ["VARCHAR"], ret,
                        type="arrow", null_handling="special", side_effects=False)


def _arrow_array(values: list, ret: str):
    import pyarrow as pa

    return pa.array(values, pa.list_(pa.string()) if ret == "VARCHAR[]" else pa.string())


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _columns(con, rel: str) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in con.sql(f"DESCRIBE SELECT * FROM {rel}").fetchall()]


def _id_expr(col: str, typ: str) -> str:
    """slimrec.ingest._id_string in SQL: trimmed text; whole floats without their ".0"."""
    c = _q(col)
    if typ.startswith(("FLOAT", "DOUBLE", "DECIMAL")):
        return (f"CASE WHEN {c} = floor({c}) AND abs({c}) < 1e18 THEN CAST(CAST({c} AS BIGINT) AS VARCHAR) "
                f"ELSE trim(CAST({c} AS VARCHAR)) END")
    return f"trim(CAST({c} AS VARCHAR))"


def _value_expr(col: str, typ: str) -> str:
    """A catalogue field as slimrec.ingest._pick sees it after the JSON round trip: NULL for no value
    (NULL, an empty string or list), a list as its JSON text (split_categories parses it back), else text."""
    c = _q(col)
    if typ.endswith("[]"):
        return f"CASE WHEN len({c}) > 0 THEN CAST(to_json({c}) AS VARCHAR) END"
    if typ == "VARCHAR":
        return f"nullif({c}, '')"
    return f"CAST({c} AS VARCHAR)"


def _pick_expr(cols: list[tuple[str, str]], names: tuple[str, ...]) -> str:
    """slimrec.ingest._pick per row: the first of ``names`` (matched by _name_key) that has a value."""
    from slimrec.ingest import _name_key

    by_key: dict[str, tuple[str, str]] = {}
    for c, t in cols:
        by_key.setdefault(_name_key(c), (c, t))
    parts = [_value_expr(*by_key[_name_key(n)]) for n in names if _name_key(n) in by_key]
    return f"coalesce({', '.join(parts)})" if len(parts) > 1 else (parts[0] if parts else "NULL::VARCHAR")


def duck_ingest(con, dataset: Path, out_dir: Path, max_text_chars: int = 2000, max_id_chars: int = 128,
                order_base_ts: str = "2014-01-01T00:00:00+00:00", format: str = "auto") -> dict[str, int]:
    """The ingest stage's work for an ``events`` folder of Parquet files, in DuckDB: raw_interactions,
    raw_items, items, interactions and quarantine as Parquet files in ``out_dir``; returns their row counts.

    Reproduces slimrec.ingest (read_events_spark, normalise_items, build_interactions): the same file
    detection and column matching (the product's own functions), ids as trimmed text (whole floats
    without ".0"), the source row as the 0-based row of the file, timestamps through their text (integers
    as unix seconds, ms above 1e11, us above 1e14, ns above 1e17; decimals as seconds; other text
    ISO-8601, UTC), the same quarantine reasons in the same order of checks, the catalogue check, and the
    same dedupe (first by source file and row per user, item and event_ts; first record per item id).

    Item text normalisation (HTML entities, tags, NFC, category path splitting) is Python-only
    (slimrec.text.clean_text / split_categories): it runs as DuckDB Arrow UDFs, over the distinct values
    of each field only (titles, brands, category paths, descriptions), so Python sees each distinct value
    once (in Arrow batches), never once per event. item_text and text_hash are SQL (concat_ws, sha1).

    Not reproduced (never in the generated data; the Spark stage may differ there): CSV/TSV sources and
    the LC-Rec and Amazon JSON formats (raise NotImplementedError), Parquet nanosecond timestamp columns,
    Spark's and DuckDB's text-to-timestamp parsers on unusual strings, fractional-second rounding.
    Quarantine payloads are written as DuckDB's JSON, not Spark's (compare by reason and source row).
    """
    from slimrec.ingest import (
        ITEM_CATEGORY_KEYS,
        ITEM_COLS,
        ITEM_TITLE_KEYS,
        TS_COLS,
        USER_COLS,
        _clean_name,
        _column,
        detect_format,
    )
    from slimrec.text import clean_text, split_categories

    fmt, files = detect_format(Path(dataset), format)
    if fmt != "events" or any(not p.name.lower().endswith(".parquet") for p in files["interactions"] + files["items"]):
        raise NotImplementedError(f"the DuckDB ingest baseline reads Parquet events files only ({dataset}: {fmt})")
    out_dir.mkdir(parents=True, exist_ok=True)
    con.execute("SET TimeZone = 'UTC'")

    def source(f: Path) -> tuple[str, list[tuple[str, str]], dict[str, str]]:
        rel = f"read_parquet({_lit(str(f))}, file_row_number = true)"
        cols = [(c, t) for c, t in _columns(con, rel) if c != "file_row_number"]
        return rel, cols, {_clean_name(c): c for c, _ in cols}  # cleaned name -> the file's name

    raws = []
    for f in files["interactions"]:
        rel, cols, clean = source(f)
        typ = dict(cols)
        u, i, t = (clean[_column(list(clean), names, what, f.name)]
                   for names, what in ((USER_COLS, "user id"), (ITEM_COLS, "item id"), (TS_COLS, "timestamp")))
        raws.append(f"SELECT {_lit(f.name)} AS source_file, file_row_number::BIGINT AS source_row, "
                    f"{_id_expr(u, typ[u])} AS user_raw, {_id_expr(i, typ[i])} AS item_raw, "
                    f"CAST({_q(t)} AS VARCHAR) AS ts_raw, NULL::BIGINT AS position FROM {rel}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE raw_interactions AS {' UNION ALL '.join(raws)}")

    items = []
    for f in files["items"]:
        rel, cols, clean = source(f)
        typ = dict(cols)
        i = clean[_column(list(clean), ITEM_COLS, "item id", f.name)]
        other = [(c, t) for c, t in cols if c != i]
        desc = _pick_expr(other, ("description", "desc", "detail_desc"))
        items.append(
            f"SELECT {_lit(f.name)} AS source_file, file_row_number::BIGINT AS source_row, "
            f"{_id_expr(i, typ[i])} AS item_raw, "
            f"CAST(to_json(struct_pack({', '.join(f'{_q(c)} := {_q(c)}' for c, _ in other)})) AS VARCHAR) AS payload, "
            f"{_pick_expr(other, ITEM_TITLE_KEYS)} AS title_v, {_pick_expr(other, ('brand', 'manufacturer', 'store'))} "
            f"AS brand_v, {_pick_expr(other, ITEM_CATEGORY_KEYS)} AS cat_v, {desc} AS desc_v FROM {rel}")
    has_items = bool(items)
    if has_items:
        _udf(con, f"slim_clean_{max_text_chars}", lambda v: clean_text(v, max_text_chars), "VARCHAR")
        _udf(con, "slim_clean_200", lambda v: clean_text(v, 200), "VARCHAR")
        _udf(con, "slim_categories", split_categories, "VARCHAR[]")
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE raw_items_x AS
            SELECT *, CASE WHEN item_raw IS NULL OR item_raw = '' THEN 'item record without id'
                           WHEN length(item_raw) > {max_id_chars} THEN 'item id longer than {max_id_chars} characters'
                           WHEN row_number() OVER (PARTITION BY item_raw ORDER BY source_file, source_row) > 1
                           THEN 'duplicate item record (first kept)' END AS reason
            FROM ({' UNION ALL '.join(items)})""")
        # Python text normalisation over each field's distinct values, joined back in SQL
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE items AS
            WITH ok AS (SELECT * FROM raw_items_x WHERE reason IS NULL),
                 t AS (SELECT v, slim_clean_{max_text_chars}(v) AS c FROM (SELECT DISTINCT title_v AS v FROM ok)),
                 b AS (SELECT v, slim_clean_200(v) AS c FROM (SELECT DISTINCT brand_v AS v FROM ok)),
                 k AS (SELECT v, slim_categories(v) AS c FROM (SELECT DISTINCT cat_v AS v FROM ok)),
                 d AS (SELECT v, slim_clean_{max_text_chars}(v) AS c FROM (SELECT DISTINCT desc_v AS v FROM ok)),
                 n AS (SELECT ok.item_raw AS item_id, t.c AS title, b.c AS brand,
                              coalesce(k.c, slim_categories(NULL)) AS categories, d.c AS description
                       FROM ok LEFT JOIN t ON t.v = ok.title_v LEFT JOIN b ON b.v = ok.brand_v
                       LEFT JOIN k ON k.v = ok.cat_v LEFT JOIN d ON d.v = ok.desc_v)
            SELECT *, coalesce(nullif(concat_ws(' | ', title, nullif(array_to_string(categories, ' > '), ''), brand), ''),
                               'unknown item') AS item_text,
                      sha1(item_text) AS text_hash
            FROM n""")
    base = datetime.fromisoformat(order_base_ts)
    base_us = round((base if base.tzinfo else base.replace(tzinfo=UTC)).timestamp() * 1_000_000)
    n = max_id_chars
    # build_interactions: the unit of an integer timestamp by its magnitude; text that is no number is
    # parsed as a timestamp. An integer needs all digits (DuckDB's cast would round "1.5" to 2).
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE checked AS
        WITH r AS (
            SELECT *, CASE WHEN regexp_full_match(trim(ts_raw), '[+-]?[0-9]+') THEN TRY_CAST(trim(ts_raw) AS BIGINT) END AS lng,
                      TRY_CAST(trim(ts_raw) AS DOUBLE) AS num
            FROM raw_interactions),
        p AS (
            SELECT *, CASE WHEN lng IS NOT NULL AND abs(num) < 1e11 THEN to_timestamp(lng)
                           WHEN lng IS NOT NULL AND abs(num) < 1e14 THEN epoch_ms(lng)::TIMESTAMPTZ
                           WHEN lng IS NOT NULL AND abs(num) < 1e17 THEN make_timestamp(lng)::TIMESTAMPTZ
                           WHEN lng IS NOT NULL THEN make_timestamp(lng // 1000)::TIMESTAMPTZ
                           WHEN num IS NOT NULL AND abs(num) < 1e11 THEN to_timestamp(num)
                           WHEN num IS NULL THEN TRY_CAST(ts_raw AS TIMESTAMPTZ) END AS ts_parsed
            FROM r)
        SELECT source_file, source_row, user_raw, item_raw, ts_raw, position, ts_parsed,
               CASE WHEN user_raw IS NULL OR user_raw = '' THEN 'missing user id'
                    WHEN item_raw IS NULL OR item_raw = '' THEN 'missing item id'
                    WHEN length(user_raw) > {n} OR length(item_raw) > {n} THEN 'id longer than {n} characters'
                    WHEN contains(user_raw, '\ufffd') OR contains(item_raw, '\ufffd') THEN 'non-UTF-8 bytes in id'
                    WHEN ts_raw IS NOT NULL AND ts_parsed IS NULL THEN 'unparseable timestamp: ' || substring(ts_raw, 1, 60)
                    WHEN ts_raw IS NULL AND position IS NULL THEN 'missing timestamp'
                    {"WHEN item_raw NOT IN (SELECT item_id FROM items) THEN 'unknown item id (not in the catalogue)'"
                     if has_items else ""}
               END AS reason
        FROM p""")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE events AS
        SELECT *, row_number() OVER (PARTITION BY user_id, item_id, event_ts ORDER BY source_file, source_row) AS rn
        FROM (SELECT user_raw AS user_id, item_raw AS item_id,
                     CASE WHEN ts_raw IS NULL THEN make_timestamp({base_us} + position * 1000000)::TIMESTAMPTZ
                          ELSE ts_parsed END AS event_ts,
                     CASE WHEN ts_raw IS NULL THEN position ELSE source_row END::BIGINT AS event_seq,
                     ts_raw IS NULL AS ts_derived, source_file, source_row,
                     CAST(to_json(struct_pack(user_raw := user_raw, item_raw := item_raw, ts_raw := ts_raw,
                                              "position" := "position")) AS VARCHAR) AS payload
              FROM checked WHERE reason IS NULL)""")
    q_items = ("UNION ALL SELECT 'ingest', source_file, source_row, reason, payload FROM raw_items_x "
               "WHERE reason IS NOT NULL") if has_items else ""
    outputs = {
        "raw_interactions": "SELECT * FROM raw_interactions",
        "raw_items": "SELECT source_file, source_row, item_raw, payload FROM raw_items_x" if has_items else None,
        "items": "SELECT * FROM items" if has_items else
                 ("SELECT DISTINCT item_id, NULL::VARCHAR AS title, NULL::VARCHAR AS brand, []::VARCHAR[] AS categories, "
                  "NULL::VARCHAR AS description, 'unknown item' AS item_text, sha1('unknown item') AS text_hash "
                  "FROM events WHERE rn = 1"),
        "interactions": "SELECT user_id, item_id, event_ts, event_seq, ts_derived, source_file FROM events WHERE rn = 1",
        "quarantine": f"""
            SELECT 'ingest' AS stage, source_file AS source, source_row, reason,
                   CAST(to_json(struct_pack(user_raw := user_raw, item_raw := item_raw, ts_raw := ts_raw,
                                            "position" := "position")) AS VARCHAR) AS payload
            FROM checked WHERE reason IS NOT NULL
            UNION ALL SELECT 'ingest', source_file, source_row,
                             'duplicate event (same user, item, event_ts; first kept)', payload FROM events WHERE rn > 1
            {q_items}""",
    }
    counts = {}
    for table, sql in outputs.items():
        if sql is None:
            continue
        path = out_dir / f"{table}.parquet"
        con.execute(f"COPY ({sql}) TO {_lit(str(path))} (FORMAT parquet)")
        counts[table] = con.sql(f"SELECT count(*) FROM read_parquet({_lit(str(path))})").fetchone()[0]
    con.execute("DROP TABLE IF EXISTS raw_interactions; DROP TABLE IF EXISTS raw_items_x; DROP TABLE IF EXISTS items; "
                "DROP TABLE IF EXISTS checked; DROP TABLE IF EXISTS events")
    return counts


# ----------------------------------------------------------------------------- DuckDB prompts baseline
def duck_prompts(con, sequences: str, items: str, out: str, version: str = "v1", max_items: int = 20,
                 max_chars: int = 4000, max_item_title_chars: int = 120, student_max_items: int = 10,
                 student_title_chars: int = 60) -> int:
    """build_prompts' work in DuckDB: ``sequences`` (user_sequences) and ``items`` are relations
    (``delta_scan(...)``, ``read_parquet(...)``); writes the prompts columns (no lineage) to Parquet ``out``
    and returns the row count.

    The same rendering as slimrec.sequences.build_prompts and slimrec.prompts: the last ``max_items``
    history items, oldest first, one ``- title | category path | brand`` line each, the oldest dropped
    until the teacher prompt fits ``max_chars`` characters (at least one kept), the student prompt the last
    ``student_max_items`` of the lines shown, prompt_hash = sha1(version, 0x1F, teacher prompt). Users with
    an empty history get no prompt, as in Spark (posexplode of nothing).

    Differs in how, not what: an item's two lines are sanitised once per catalogue item in Python
    (slimrec.prompts.item_line / short_item_line: NFC, control characters, the injection regex are
    Python-only), not once per history event; the templates come from slimrec.prompts (rendered around a
    marker line). The rest is SQL: the fit to ``max_chars`` is a running sum of line lengths from the
    newest line back (a window), the prompts are string_agg over the kept lines, the hash is sha1.
    """
    from slimrec import prompts as P

    if max_items <= 0:
        raise NotImplementedError("the DuckDB prompts baseline needs prompts.max_items > 0")
    (tpre, tsuf), (spre, ssuf) = P.template_parts(version)
    fixed = len(tpre) + len(tsuf)
    cat = con.sql(f"SELECT item_id, title, categories, brand FROM {items}").arrow().read_all()
    con.register("_item_lines", P.item_lines_table(cat, max_item_title_chars, student_title_chars))
    # an item missing from the catalogue (Spark's left join gives nulls)
    none_t, none_s = P.missing_item_lines(max_item_title_chars, student_title_chars)
    student_filter = f"keep AND k <= {student_max_items}" if student_max_items > 0 else "TRUE"
    sql = f"""
        WITH s AS (SELECT user_id, seq_hash, len(history)::INT AS history_len, history[-{max_items}:] AS recent
                   FROM {sequences}),
        e AS (SELECT user_id, seq_hash, history_len, unnest(recent) AS item_id,
                     unnest(generate_series(1, len(recent))) AS pos FROM s),
        j AS (SELECT e.*, coalesce(l.tline, {_lit(none_t)}) AS tline, coalesce(l.sline, {_lit(none_s)}) AS sline
              FROM e LEFT JOIN _item_lines l USING (item_id)),
        w AS (SELECT *, row_number() OVER n AS k, sum(length(tline) + 3) OVER n AS tail FROM j
              WINDOW n AS (PARTITION BY user_id ORDER BY pos DESC ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)),
        kept AS (SELECT *, k = 1 OR {fixed - 1} + tail <= {max_chars} AS keep FROM w),
        g AS (SELECT user_id,
                     {_lit(tpre)} || string_agg('- ' || tline, chr(10) ORDER BY pos) FILTER (WHERE keep)
                         || {_lit(tsuf)} AS teacher_prompt,
                     {_lit(spre)} || string_agg('- ' || sline, chr(10) ORDER BY pos) FILTER (WHERE {student_filter})
                         || {_lit(ssuf)} AS student_prompt,
                     any_value(history_len) AS history_len, (count(*) FILTER (WHERE keep))::INT AS n_prompt_items,
                     list(item_id ORDER BY pos) FILTER (WHERE keep) AS prompt_item_ids, any_value(seq_hash) AS seq_hash
              FROM kept GROUP BY user_id)
        SELECT user_id, teacher_prompt, student_prompt, {_lit(version)} AS prompt_version,
               sha1({_lit(version)} || chr(31) || teacher_prompt) AS prompt_hash, history_len, n_prompt_items,
               prompt_item_ids, seq_hash
        FROM g"""
    con.execute(f"COPY ({sql}) TO {_lit(out)} (FORMAT parquet)")
    con.unregister("_item_lines")
    return con.sql(f"SELECT count(*) FROM read_parquet({_lit(out)})").fetchone()[0]


# ----------------------------------------------------------------------------- DuckDB runs (child process)
def _duck_job(con, job: str, args: dict) -> int:
    if job == "build_sequences":
        a = dict(args)
        out = a.pop("out")
        con.execute(f"COPY ({duck_sql(**a)}) TO {_lit(out)} (FORMAT parquet)")
        return con.sql(f"SELECT count(*) FROM read_parquet({_lit(out)})").fetchone()[0]
    if job == "ingest":
        return duck_ingest(con, Path(args["dataset"]), Path(args["out_dir"]), **args["cfg"])["interactions"]
    if job == "build_prompts":
        return duck_prompts(con, args["sequences"], args["items"], args["out"], **args["cfg"])
    raise ValueError(job)


def _duck_child(job: str, args: dict, threads: int, warm_runs: int) -> dict:
    con = _duck_connect(threads)
    runs = []
    for _ in range(1 + warm_runs):  # first run in a fresh process, then the same work again (warm)
        t0 = time.perf_counter()
        rows = _duck_job(con, job, args)
        runs.append(time.perf_counter() - t0)
    return {"seconds": runs[0], "warm_seconds": statistics.median(runs[1:]) if warm_runs else runs[0],
            "warm_runs": runs[1:], "rows": rows, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def duck_run(job: str, args: dict, threads: int = 2, warm_runs: int = WARM_RUNS) -> dict:
    """Run a DuckDB baseline in a fresh process: its own timing and peak memory."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_duck_child, (job, args, threads, warm_runs))


def duck_build(interactions: str, out: str, max_len: int, min_len: int, variant: str, threads: int = 2,
               warm_runs: int = WARM_RUNS) -> dict:
    """The sequences baseline in a fresh process."""
    return duck_run("build_sequences", {"interactions": interactions, "out": out, "max_len": max_len,
                                        "min_len": min_len, "variant": variant}, threads, warm_runs)


SEQUENCE_COLUMNS = ["user_id", "item_ids", "history", "valid_target", "test_target", "seq_len", "last_event_ts",
                    "seq_hash"]
PROMPT_COLUMNS = ["user_id", "teacher_prompt", "student_prompt", "prompt_version", "prompt_hash", "history_len",
                  "n_prompt_items", "prompt_item_ids", "seq_hash"]
INGEST_CHECKS = {  # table: (columns compared, sort key)
    "raw_interactions": (["source_file", "source_row", "user_raw", "item_raw", "ts_raw", "position"],
                         ["source_file", "source_row"]),
    "raw_items": (["source_file", "source_row", "item_raw"], ["source_file", "source_row"]),
    "items": (["item_id", "title", "brand", "categories", "description", "item_text", "text_hash"], ["item_id"]),
    "interactions": (["user_id", "item_id", "event_ts", "event_seq", "ts_derived", "source_file"],
                     ["user_id", "item_id", "event_ts"]),
    "quarantine": (["stage", "source", "source_row", "reason"], ["source", "source_row", "reason"]),
}


def compare_with_spark(user_sequences: str, duck_parquet: str) -> dict:
    """Row-by-row comparison of Spark's user_sequences (Delta) with DuckDB's Parquet."""
    return compare_tables(_duck_connect(), f"delta_scan({_lit(user_sequences)})",
                          f"read_parquet({_lit(duck_parquet)})", SEQUENCE_COLUMNS, ["user_id"])


# ----------------------------------------------------------------------------- Spark stages
def jvm_thread_cpu() -> dict[str, float]:
    """CPU seconds so far of the local Spark JVM's threads, by kind: C2 and C1 (the JIT compilers), GC,
    task (executor task threads) and other. Linux /proc only; {} where it cannot be read."""
    import collections

    import psutil

    try:
        jvm = next(p for p in psutil.Process().children(recursive=True) if p.name() == "java")
        tick = os.sysconf("SC_CLK_TCK")
        tids = os.listdir(f"/proc/{jvm.pid}/task")
    except (StopIteration, OSError, ValueError, psutil.Error):
        return {}
    out: collections.Counter = collections.Counter()
    for tid in tids:
        try:
            name = Path(f"/proc/{jvm.pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{jvm.pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        kind = ("C2" if name.startswith("C2") else "C1" if name.startswith("C1")
                else "GC" if "GC" in name or name.startswith("G1") else "task" if name.startswith("Executor task")
                else "other")
        out[kind] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return dict(out)


def _cpu_delta(before: dict, after: dict) -> dict[str, float]:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 2) for k in ("task", "C2", "C1", "GC")}


# each stage's warm runs go into a new lake holding copies of the tables it reads
WARM_INPUTS = {"ingest": [], "build_sequences": ["interactions"], "build_prompts": ["user_sequences", "items"]}


def _duck_label(stage: str, variant: str) -> str:
    """The baseline's case name: the sequences query's formulation, or the stage it stands for."""
    return f"duckdb_{variant}" if stage == "build_sequences" else f"duckdb_{stage}"


def _spread(runs: list[float]) -> str:
    return f"{min(runs):.1f}-{max(runs):.1f} s over {len(runs)} runs"


def _stage_runs(stage: str, name: str, lake, dataset: Path, spark, cfg, workdir: Path, n: int):
    """The stage ``n`` more times, each into a new lake holding copies of its inputs (in its own lake a
    rerun would find nothing changed); wall seconds and JVM CPU seconds per run."""
    from slimrec.lake import Lake
    from slimrec.pipeline import run_stage
    from slimrec.stages.base import StageContext

    runs, cpus = [], []
    for k in range(n):
        warm_lake = Lake(workdir / f"lake-{name}-{stage}-warm{k}")
        for table in WARM_INPUTS[stage]:
            shutil.copytree(lake.path(table), warm_lake.path(table))
        warm_ctx = StageContext(cfg=cfg, lake=warm_lake, run_date=RUN_DATE, dataset_dir=str(dataset), _spark=spark)
        cpu0 = jvm_thread_cpu()
        t0 = time.perf_counter()
        run_stage(stage, warm_ctx, check=False)
        runs.append(time.perf_counter() - t0)
        cpus.append(_cpu_delta(cpu0, jvm_thread_cpu()) if cpu0 else {})
        shutil.rmtree(warm_lake.root, ignore_errors=True)
    return runs, cpus


def _duck_baselines(name: str, lake, dataset: Path, cfg, workdir: Path, warm_runs: int) -> tuple[dict, list[str]]:
    """Every DuckDB baseline of this case, each checked equal to the Spark stage's tables:
    ``({stage: {variant: result}}, [mismatch messages])``."""
    seq_cfg = cfg.sequences
    duck: dict = {"build_sequences": {}, "ingest": {}, "build_prompts": {}}
    mismatches: list[str] = []

    def check(stage: str, variant: str, d: dict, checks: dict[str, dict]) -> None:
        d["check"] = checks
        d["same_output"] = all(c["same"] for c in checks.values())
        for table, c in checks.items():
            try:
                assert_same(c, f"[{name}] duckdb {stage} ({variant}) {table}")
            except OutputMismatch as e:
                mismatches.append(str(e))
                log.error("%s", e)
        counts = {t: (c.get("total"), c.get("only_spark"), c.get("only_duckdb")) for t, c in checks.items()}
        print(f"[{name}] duckdb {stage} {variant}: {d['seconds']:.1f}s (again, median of {warm_runs}: "
              f"{d['warm_seconds']:.1f}s), {d['rows']:,} rows, peak RSS {d['peak_rss'] / 2**30:.2f} GiB, same output "
              f"as Spark: {d['same_output']} (table: rows, only Spark, only DuckDB: {counts})", flush=True)
        duck[stage][variant] = d

    con = _duck_connect()
    for variant in ("list_sort", "list_order_by"):
        out = str(workdir / f"duck-{name}-{variant}.parquet")
        d = duck_build(lake.path("interactions"), out, seq_cfg.max_seq_len, seq_cfg.min_seq_len, variant,
                       warm_runs=warm_runs)
        check("build_sequences", variant, d, {"user_sequences": compare_with_spark(lake.path("user_sequences"), out)})

    out_dir = workdir / f"duck-{name}-ingest"
    try:
        d = duck_run("ingest", {"dataset": str(dataset), "out_dir": str(out_dir),
                                "cfg": cfg.ingest.model_dump()}, warm_runs=warm_runs)
    except NotImplementedError as e:
        print(f"[{name}] no DuckDB ingest baseline: {e}", flush=True)
    else:
        checks = {}
        for table, (columns, key) in INGEST_CHECKS.items():
            spark_rel = f"delta_scan({_lit(lake.path(table))})"
            if table == "quarantine":
                spark_rel = f"(SELECT * FROM {spark_rel} WHERE stage = 'ingest')"
            checks[table] = compare_tables(con, spark_rel, f"read_parquet({_lit(str(out_dir / f'{table}.parquet'))})",
                                           columns, key)
        check("ingest", "sql", d, checks)
        by_reason = con.sql(f"SELECT reason, count(*) FROM read_parquet({_lit(str(out_dir / 'quarantine.parquet'))}) "
                            "GROUP BY reason ORDER BY 2 DESC").fetchall()
        d["quarantine_by_reason"] = dict(by_reason)
        print(f"[{name}] duckdb ingest quarantine by reason: {d['quarantine_by_reason']}", flush=True)

    out = str(workdir / f"duck-{name}-prompts.parquet")
    d = duck_run("build_prompts", {"sequences": f"delta_scan({_lit(lake.path('user_sequences'))})",
                                   "items": f"delta_scan({_lit(lake.path('items'))})", "out": out,
                                   "cfg": cfg.prompts.model_dump()}, warm_runs=warm_runs)
    spark_prompts = f"(SELECT * FROM delta_scan({_lit(lake.path('prompts'))}) WHERE run_date = DATE '{RUN_DATE}')"
    check("build_prompts", "sql", d, {"prompts": compare_tables(con, spark_prompts, f"read_parquet({_lit(out)})",
                                                                PROMPT_COLUMNS, ["user_id"])})
    con.close()
    return duck, mismatches


def run_case(name: str, dataset: Path, spark, cfg, workdir: Path, rows: list[dict], extra: dict,
             warm_runs: int = WARM_RUNS) -> list[str]:
    """The three stages cold, warm and against their DuckDB baselines; returns the output mismatches."""
    from slimrec.lake import Lake
    from slimrec.pipeline import run_stage
    from slimrec.stages.base import StageContext

    lake = Lake(workdir / f"lake-{name}")
    ctx = StageContext(cfg=cfg, lake=lake, run_date=RUN_DATE, dataset_dir=str(dataset), _spark=spark)
    info: dict = {}
    for stage in STAGES:
        with PeakRSS() as mem:
            cpu0 = jvm_thread_cpu()
            t0 = time.perf_counter()
            res = run_stage(stage, ctx, check=False)
            secs = time.perf_counter() - t0
            cpu = _cpu_delta(cpu0, jvm_thread_cpu()) if cpu0 else {}
        rows_in = res.rows_in
        info[stage] = {"seconds": secs, "rows_in": rows_in, "rows_out": res.rows_out, "peak_gib": mem.gib,
                       "jvm_cpu_s": cpu}
        print(f"[{name}] {stage}: {secs:.1f}s, {rows_in:,} rows in -> {res.rows_out:,} out, "
              f"peak RSS {mem.gib:.2f} GiB", flush=True)
        rows.append(row(f"{name}/{stage}", "wall", secs, "s"))
        rows.append(row(f"{name}/{stage}", "rows_per_s", rows_in / secs if secs else 0.0, "rows/s"))
        rows.append(row(f"{name}/{stage}", "peak_rss", mem.gib, "GiB"))

    # each stage again, warm (the same session, after the cold runs), warm_runs times; the median is the
    # warm figure (the JIT keeps compiling over the first runs)
    for stage in STAGES:
        if warm_runs <= 0:
            break
        warm_runs_s, warm_cpu = _stage_runs(stage, name, lake, dataset, spark, cfg, workdir, warm_runs)
        warm_s = statistics.median(warm_runs_s)
        info[stage].update(warm_seconds=warm_s, warm_runs=warm_runs_s, warm_jvm_cpu_s=warm_cpu)
        print(f"[{name}] {stage} again (warm JVM), {warm_runs} runs: "
              f"{', '.join(f'{w:.1f}' for w in warm_runs_s)} s, median {warm_s:.1f}s", flush=True)
        rows.append(row(f"{name}/{stage}_warm", "wall", warm_s, "s", spread=_spread(warm_runs_s)))
    cold_cpu = info["build_sequences"]["jvm_cpu_s"]
    warm_cpu = info["build_sequences"].get("warm_jvm_cpu_s", [])
    if cold_cpu and warm_cpu and all(warm_cpu):
        # where a first run's extra time goes: the JIT compiling the new query's code beside the tasks
        fmt = lambda d: ", ".join(f"{k} {v:.1f}" for k, v in d.items())  # noqa: E731
        print(f"[{name}] build_sequences JVM CPU s, first run: {fmt(cold_cpu)}; warm runs: "
              + " | ".join(fmt(c) for c in warm_cpu), flush=True)

    # the rerun path: build_sequences again on its own lake, which already holds user_sequences (the
    # daily refresh's case: a MERGE of changed users, after deleting users that have no sequence now)
    rerun_runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        run_stage("build_sequences", StageContext(cfg=cfg, lake=lake, run_date=RUN_DATE, dataset_dir=str(dataset),
                                                  _spark=spark), check=False)
        rerun_runs.append(time.perf_counter() - t0)
    info["build_sequences"]["rerun_seconds"] = rerun_runs
    print(f"[{name}] build_sequences rerun on a lake that has user_sequences (merge path, nothing changed): "
          f"{', '.join(f'{w:.1f}' for w in rerun_runs)} s", flush=True)
    rows.append(row(f"{name}/build_sequences_rerun", "wall", min(rerun_runs), "s"))

    # DuckDB: the same work from the same inputs, checked equal to the stages' tables
    duck, mismatches = _duck_baselines(name, lake, dataset, cfg, workdir, warm_runs)
    for stage in STAGES:
        if not duck[stage]:
            continue
        for variant, d in duck[stage].items():
            label = _duck_label(stage, variant)
            rows.append(row(f"{name}/{label}", "wall", d["seconds"], "s"))
            if d["warm_runs"]:
                rows.append(row(f"{name}/{label}_warm", "wall", d["warm_seconds"], "s", spread=_spread(d["warm_runs"])))
            rows.append(row(f"{name}/{label}", "peak_rss", d["peak_rss"] / 2**30, "GiB"))
        # the ratio is against the faster formulation, cold and warm each
        best = min(duck[stage], key=lambda v: duck[stage][v]["seconds"])
        rows.append(row(f"{name}/{stage}", "spark_vs_duckdb", info[stage]["seconds"], "s", _duck_label(stage, best),
                        duck[stage][best]["seconds"]))
        if "warm_seconds" in info[stage] and duck[stage][best]["warm_runs"]:
            best_warm = min(duck[stage], key=lambda v: duck[stage][v]["warm_seconds"])
            rows.append(row(f"{name}/{stage}_warm", "spark_vs_duckdb_warm", info[stage]["warm_seconds"], "s",
                            _duck_label(stage, best_warm), duck[stage][best_warm]["warm_seconds"],
                            spread=f"stage {_spread(info[stage]['warm_runs'])}; "
                                   f"duckdb {_spread(duck[stage][best_warm]['warm_runs'])}"))
    extra[name] = {"stages": info, "duckdb": duck, "dataset": str(dataset), "mismatches": mismatches}
    return mismatches


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="500K events, 20K users, 5K items")
    ap.add_argument("--only", choices=["bundled", "generated"], default=None)
    ap.add_argument("--profile", default="dev", help="config profile for the stages")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value")
    ap.add_argument("--keep", type=Path, default=None, help="keep the lakes in this folder")
    ap.add_argument("--warm-runs", type=int, default=WARM_RUNS,
                    help="warm runs of each stage and each DuckDB baseline (the median is the warm figure)")
    args = ap.parse_args()
    if args.quick:
        args.events, args.users, args.items = 500_000, 20_000, 5_000
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("py4j", "slimrec.lake"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from slimrec.config import load_config
    from slimrec.spark import get_spark

    from bench.gen_events import ensure

    cfg = load_config(args.profile, overrides=["quality.enabled=false", "spark.extra_conf={'spark.ui.showConsoleProgress': 'false'}", *args.sets])
    rows: list[dict] = []
    mismatches: list[str] = []
    extra: dict = {"config": cfg.model_dump(mode="json"), "cpus": os.cpu_count(),
                   "note": "shared machine: other jobs may run at the same time"}
    gen_dir = None
    if args.only != "bundled":
        t0 = time.perf_counter()
        gen_dir = ensure(args.events, args.users, args.items, args.seed)
        extra["generate_s"] = time.perf_counter() - t0
    workdir = Path(tempfile.mkdtemp(prefix="slimrec-bench-")) if args.keep is None else args.keep
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            spark = get_spark(cfg.spark)
            start_s = time.perf_counter() - t0
        print(f"spark session start: {start_s:.1f}s (peak RSS {mem.gib:.2f} GiB)", flush=True)
        rows.append(row("spark_session", "start", start_s, "s"))
        if args.only != "generated":
            mismatches += run_case("bundled", BUNDLED, spark, cfg, workdir, rows, extra, args.warm_runs)
        if gen_dir is not None:
            mismatches += run_case(f"generated_{args.events // 1000}k", gen_dir, spark, cfg, workdir, rows, extra,
                                   args.warm_runs)
        spark.stop()
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    record("foundation", rows, extra)
    for m in mismatches:  # after the figures are kept: a baseline that wrote something else is a failure
        print(f"error: {m}", file=sys.stderr)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
