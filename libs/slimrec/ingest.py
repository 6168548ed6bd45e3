"""Ingest: source files -> raw_interactions, raw_items, items, interactions, quarantine.

Formats (auto-detected from the folder, or named):

* ``lcrec``: ``*.inter.json`` (``{user: [item, ...]}`` in time order) and
  ``*.item.json`` (``{item: {title, description, brand, categories}}``).
  No timestamps: ``event_ts = order_base_ts + position seconds`` and
  ``event_seq = position``, so the order is kept exactly; ``ts_derived`` is true.
* ``amazon``: the review dumps as published: reviews JSON lines (``reviewerID,
  asin, unixReviewTime``) and metadata JSON lines (``asin, title, brand,
  categories`` (2014, may be Python-literal lines) or ``category`` (2018)), gzip or not;
  and the 2023 release (reviews ``user_id, parent_asin, asin, timestamp`` in ms; metadata
  ``parent_asin, title, store, categories, main_category``), whose item id is ``parent_asin``
  (the product its variants share, the key of its metadata).
* ``events``: ``*.csv|*.tsv|*.parquet`` events with user/item/timestamp columns
  (common names accepted, matched without case or separators: ``userId``, ``user_id`` and
  ``User-ID`` are one name) and an optional items file (item column and no user column, or a
  name that contains ``item``). RecBole's atomic files (``*.inter`` and ``*.item``, tab-separated,
  headers such as ``user_id:token``) are read the same way, the ``:type`` suffix dropped.

Whole-input problems (missing folder, no recognisable files, unreadable JSON
document) raise :class:`IngestError` with one line. Row problems become
``quarantine`` rows with a reason; nothing valid is dropped silently.
"""

from __future__ import annotations

import ast
import csv
import functools
import gzip
import json
import logging
import re
from datetime import datetime
from pathlib import Path

import pandas as pd

from slimrec.schemas.tables import spec
from slimrec.sequences import QUARANTINE_COLUMN, split_quarantined
from slimrec.text import clean_text, item_text, sha1, split_categories

log = logging.getLogger(__name__)

# Column names a source may use, in order of preference; matched by _name_key (MovieLens' userId and
# movieId, H&M's customer_id, article_id and t_dat, a session-based log's session_id).
USER_COLS = ("user_id", "user", "reviewerID", "customer_id", "visitor_id", "session_id", "client_id")
ITEM_COLS = ("item_id", "item", "parent_asin", "asin", "product_id", "movie_id", "article_id", "book_id",
             "track_id", "isbn", "sku")
# Amazon's item keys: the 2023 release's reviews hold both parent_asin (the product, the metadata's key)
# and asin (the variant bought); the 2014/2018 dumps only asin.
AMAZON_ITEM_KEYS = ("parent_asin", "asin", "item_id")
AMAZON_USER_KEYS = ("reviewerid", "user_id")
TS_COLS = ("event_ts", "timestamp", "ts", "time", "unixReviewTime", "datetime", "event_time", "created_at",
           "date", "t_dat")
# an item record's fields, in order of preference (matched by _name_key, as the columns above)
ITEM_TITLE_KEYS = ("title", "name", "product_title", "movie_title", "book_title", "prod_name")
ITEM_CATEGORY_KEYS = ("categories", "category", "category_path", "genres", "class", "main_category",
                      "product_type_name")
EVENT_EXT = (".csv", ".tsv", ".parquet", ".csv.gz", ".tsv.gz", ".inter", ".item")
_TAB_EXT = (".tsv", ".tsv.gz", ".inter", ".item")  # tab-separated text (RecBole's atomic files too)


class IngestError(ValueError):
    """A whole input that cannot be read; the message is one line for the user."""


# --------------------------------------------------------------------------- detection
def dataset_fingerprint(dataset_dir: str | None) -> dict[str, list[int]]:
    """``{file name: [size, mtime]}``: ingest is skipped when this is unchanged."""
    if not dataset_dir or not Path(dataset_dir).is_dir():
        return {}
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(Path(dataset_dir).iterdir()) if p.is_file()}


def _first_record(path: Path, max_lines: int = 50) -> dict | None:
    """The first JSON record among the first ``max_lines`` non-empty lines (a truncated or broken
    first line does not hide a whole file; ingest quarantines it later)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            seen = 0
            for line in f:
                line = line.strip()
                if not line:
                    continue
                rec, _ = parse_json_line(line)
                if isinstance(rec, dict):
                    return rec
                seen += 1
                if seen >= max_lines:
                    break
    except (OSError, EOFError):
        return None
    return None


# words that make an events/CSV file name a catalogue, and words that keep it an events file
_CATALOGUE_WORDS = ("item", "product", "catalog", "meta")
_EVENT_WORDS = ("interaction", "event", "rating", "review", "click", "purchase", "transaction", "inter")


def _is_catalogue_name(name: str) -> bool:
    n = name.lower()
    return any(w in n for w in _CATALOGUE_WORDS) and not any(w in n for w in _EVENT_WORDS)


def _header(path: Path) -> list[str] | None:
    """The column names of a CSV/TSV (gzip or not) or Parquet file; None where they cannot be read."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_schema(path).names
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
            line = f.readline()
        return next(csv.reader([line], delimiter=_sep(name)))
    except (OSError, EOFError, ValueError, csv.Error, StopIteration):
        return None


def _sep(name: str) -> str:
    return "\t" if name.lower().endswith(_TAB_EXT) else ","


def _clean_name(col: str) -> str:
    """A header's column name without outer spaces, a UTF-8 byte-order mark (``\ufeffuser_id``,
    `` item_id``) or a RecBole type suffix (``user_id:token``, ``timestamp:float``)."""
    return re.sub(r":(token|float|token_seq|float_seq)$", "", col.strip().lstrip("\ufeff").strip())


@functools.lru_cache(maxsize=4096)  # per record in the JSON readers: a source repeats the same few keys
def _name_key(col: str) -> str:
    """A column or record key as matched against known names (USER_COLS, ITEM_COLS, TS_COLS, the item
    fields :func:`_pick` reads): cleaned, lower case, without separators, so ``userId``, ``user_id``,
    ``User-ID`` and ``user id`` are all ``userid``."""
    return re.sub(r"[\s_\-.]", "", _clean_name(col).lower())


def _is_catalogue(path: Path) -> bool:
    """A table file is a catalogue when its columns name an item but no user (``Office_Products.csv``
    with user_id, parent_asin, timestamp is events); by its name where the columns cannot be read."""
    cols = _header(path)
    if cols:
        keys = {_name_key(c) for c in cols}
        if any(_name_key(n) in keys for n in USER_COLS):
            return False
        if any(_name_key(n) in keys for n in ITEM_COLS):
            return True
    return _is_catalogue_name(path.name)


def find_formats(dataset: Path) -> dict[str, dict[str, list[Path]]]:
    """Every format whose files the folder holds: ``{format: {"interactions": [...], "items": [...]}}``,
    in detection order (lcrec, amazon, events)."""
    files = sorted(p for p in dataset.iterdir() if p.is_file() and not p.name.startswith("."))
    found: dict[str, dict[str, list[Path]]] = {}
    inter = [p for p in files if p.name.endswith(".inter.json")]
    if inter:
        found["lcrec"] = {"interactions": inter, "items": [p for p in files if p.name.endswith(".item.json")]}
    reviews, meta = [], []
    for p in files:
        if not p.name.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz")) or p in inter:
            continue
        rec = _first_record(p)
        if not isinstance(rec, dict):
            continue
        keys = {k.lower() for k in rec}
        if not keys & {"asin", "parent_asin"}:
            continue
        if keys & set(AMAZON_USER_KEYS):  # a review: who bought which item (2014/2018 or 2023 keys)
            reviews.append(p)
        else:
            meta.append(p)
    if reviews:
        found["amazon"] = {"interactions": reviews, "items": meta}
    ev = [p for p in files if p.name.lower().endswith(EVENT_EXT)]
    ev_items = [p for p in ev if _is_catalogue(p)]
    ev_inter = [p for p in ev if p not in ev_items]
    if ev_inter:
        found["events"] = {"interactions": ev_inter, "items": ev_items}
    return found


def detect_format(dataset: Path, fmt: str = "auto") -> tuple[str, dict[str, list[Path]]]:
    """``(format, {"interactions": [...], "items": [...]})`` for a dataset folder.

    ``fmt="auto"`` takes the first format found (lcrec, amazon, events); a named format takes that
    format's files and leaves the others alone (a stray file of another kind does not matter).
    """
    if not dataset.exists():
        raise IngestError(f"dataset folder {dataset} does not exist")
    if not dataset.is_dir():
        raise IngestError(f"{dataset} is not a folder; pass the folder that holds the data files")
    found = find_formats(dataset)
    if fmt != "auto":
        if fmt in found:
            others = [f for f in found if f != fmt]
            if others:
                log.warning("ingest: --format %s: files of format(s) %s in %s are ignored", fmt, others, dataset)
            return fmt, found[fmt]
        what = f"it looks like {', '.join(found)}" if found else "no recognisable data files"
        raise IngestError(f"--format {fmt} given, but {dataset} holds no {fmt} files ({what}); " + _EXPECTED)
    if found:
        first = next(iter(found))
        return first, found[first]
    files = sorted(p.name for p in dataset.iterdir() if p.is_file() and not p.name.startswith("."))
    names = ", ".join(files[:10]) or "no files"
    only_catalogue = [n for n in files if n.lower().endswith(EVENT_EXT) and _is_catalogue(dataset / n)]
    hint = (f"; {', '.join(only_catalogue)} look(s) like a catalogue (an item column and no user column, or a "
            f"name with {'/'.join(_CATALOGUE_WORDS)}): an events file needs user, item and timestamp columns; "
            "name the events file e.g. events.csv") if only_catalogue else ""
    raise IngestError(f"no recognisable data in {dataset} ({names}){hint}; " + _EXPECTED)


_EXPECTED = ("expected *.inter.json + *.item.json (lcrec), Amazon reviews/metadata JSON lines (reviewerID, asin, "
             "unixReviewTime; or user_id, parent_asin, timestamp), or events CSV/Parquet (user, item, timestamp) with an optional items file")


# --------------------------------------------------------------------------- parsing helpers
def parse_json_line(line: str) -> tuple[dict | None, str | None]:
    """A JSON (or Python-literal, as in the 2014 Amazon metadata) object; ``(None, reason)`` if not."""
    try:
        rec = json.loads(line)
    except ValueError:
        try:
            rec = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None, "unreadable JSON line"
    if not isinstance(rec, dict):
        return None, "JSON line is not an object"
    return rec, None


def _keyed(rec: dict) -> dict:
    """``rec`` by :func:`_name_key` of its keys (the first of two keys with the same name wins)."""
    keys: dict[str, object] = {}
    for k, v in rec.items():
        keys.setdefault(_name_key(k), v)
    return keys


def _pick(keys: dict, names: tuple[str, ...]):
    """The value of the first of ``names`` (matched by :func:`_name_key`) that a record holds with a value;
    ``keys``: the record as :func:`_keyed` gives it (once per record, for every field picked)."""
    for n in names:  # the first name with a value; an empty string or list is no value
        v = keys.get(_name_key(n))
        if v is not None and not (isinstance(v, str | list | dict) and len(v) == 0):
            return v
    return None


def _id(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    s = str(value).strip()
    return s or None


def _truncate(s: str, n: int = 500) -> str:
    return s if len(s) <= n else s[:n] + "…"


def _qrow(source: str, row: int | None, reason: str, payload) -> dict:
    text = payload if isinstance(payload, str) else json.dumps(payload, default=str, ensure_ascii=False)
    return {"stage": "ingest", "source": source, "source_row": row, "reason": reason, "payload": _truncate(text)}


# --------------------------------------------------------------------------- readers (pure; pandas out)
def read_lcrec(inter_files: list[Path], item_files: list[Path]):
    """LC-Rec JSON documents -> (raw_interactions, raw_items, quarantine) as pandas frames."""
    raw, raw_items, quarantine = [], [], []
    for f in inter_files:
        doc = _load_json_document(f)
        if not isinstance(doc, dict):
            raise IngestError(f"{f.name}: expected an object {{user: [items]}}, got {type(doc).__name__}")
        row = 0
        for n_user, (user, seq) in enumerate(doc.items()):
            if not isinstance(seq, list):
                # source_row: the user's 0-based place in the document (keeps the quarantine key unique)
                quarantine.append(_qrow(f.name, n_user, "user value is not a list of items", {user: seq}))
                continue
            for pos, item in enumerate(seq):
                raw.append((f.name, row, _id(user), _id(item), None, pos))
                row += 1
    for f in item_files:
        doc = _load_json_document(f)
        if not isinstance(doc, dict):
            raise IngestError(f"{f.name}: expected an object {{item: {{...}}}}, got {type(doc).__name__}")
        for row, (item, rec) in enumerate(doc.items()):
            if not isinstance(rec, dict):
                quarantine.append(_qrow(f.name, row, "item record is not an object", {item: rec}))
                continue
            raw_items.append((f.name, row, _id(item), json.dumps(rec, ensure_ascii=False)))
    return _frames(raw, raw_items, quarantine)


def _load_json_document(f: Path):
    try:
        data = f.read_bytes()
        if f.suffix == ".gz":
            data = gzip.decompress(data)
    except OSError as e:
        raise IngestError(f"cannot read {f}: {e.strerror or e}") from None
    text = data.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError as e:
        raise IngestError(f"{f.name} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None


def _frames(raw, raw_items, quarantine):
    ri = pd.DataFrame(raw, columns=["source_file", "source_row", "user_raw", "item_raw", "ts_raw", "position"])
    rit = pd.DataFrame(raw_items, columns=["source_file", "source_row", "item_raw", "payload"])
    q = pd.DataFrame(quarantine, columns=["stage", "source", "source_row", "reason", "payload"])
    for df in (ri, rit):
        df["source_row"] = df["source_row"].astype("int64")
    ri["position"] = ri["position"].astype("Int64")
    q["source_row"] = q["source_row"].astype("Int64")
    return ri, rit, q


def parse_review_lines(source: str, rows: list[tuple[int, str]]):
    """Amazon review lines -> raw interaction tuples and quarantine rows."""
    raw, quarantine = [], []
    for row, line in rows:
        if not line.strip():
            continue
        rec, err = parse_json_line(line)
        if err:
            quarantine.append(_qrow(source, row, err, line))
            continue
        keys = _keyed(rec)
        ts = _pick(keys, ("unixreviewtime", "timestamp", "time"))
        raw.append((source, row, _id(_pick(keys, AMAZON_USER_KEYS)), _id(_pick(keys, AMAZON_ITEM_KEYS)),
                    None if ts is None else str(ts), None))
    return raw, quarantine


def parse_meta_lines(source: str, rows: list[tuple[int, str]]):
    """Amazon metadata lines -> raw item tuples and quarantine rows."""
    raw, quarantine = [], []
    for row, line in rows:
        if not line.strip():
            continue
        rec, err = parse_json_line(line)
        if err:
            quarantine.append(_qrow(source, row, err, line))
            continue
        item = _id(_pick(_keyed(rec), AMAZON_ITEM_KEYS))
        raw.append((source, row, item, json.dumps(rec, ensure_ascii=False, default=str)))
    return raw, quarantine


def _iter_lines(f: Path):
    opener = gzip.open if f.suffix == ".gz" else open
    try:
        with opener(f, "rb") as fh:
            for row, b in enumerate(fh):
                yield row, b.decode("utf-8", errors="replace")
    except (OSError, EOFError) as e:
        raise IngestError(f"cannot read {f.name}: {e}") from None


def read_amazon(review_files: list[Path], meta_files: list[Path], chunk: int = 200_000):
    """Amazon review + metadata JSON lines -> pandas frames (streamed in chunks)."""
    raw, raw_items, quarantine = [], [], []
    for f in review_files:
        buf = []
        for row, line in _iter_lines(f):
            buf.append((row, line))
            if len(buf) >= chunk:
                r, q = parse_review_lines(f.name, buf)
                raw += r
                quarantine += q
                buf = []
        r, q = parse_review_lines(f.name, buf)
        raw += r
        quarantine += q
    for f in meta_files:
        r, q = parse_meta_lines(f.name, list(_iter_lines(f)))
        raw_items += r
        quarantine += q
    return _frames(raw, raw_items, quarantine)


def _column(df_cols: list[str], names: tuple[str, ...], what: str, source: str) -> str:
    """The first of ``names`` (by :func:`_name_key`) among ``df_cols``; a one-line error if none is."""
    keys: dict[str, str] = {}
    for c in df_cols:
        keys.setdefault(_name_key(c), c)
    for n in names:
        if (c := keys.get(_name_key(n))) is not None:
            return c
    raise IngestError(f"{source}: no {what} column (looked for {', '.join(names)}; found {', '.join(df_cols)})")


# --------------------------------------------------------------------------- Spark readers for events
def _id_string(df, name: str):
    """An id column as trimmed text. Whole floats lose their ".0": a pandas integer column with a
    missing value is written as float (100000.0), and must still match the catalogue's "100000"."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    c = F.col(name)
    if isinstance(df.schema[name].dataType, T.FloatType | T.DoubleType | T.DecimalType):
        whole = (c == F.floor(c)) & (F.abs(c) < 1e18)
        return F.when(whole, c.cast("long").cast("string")).otherwise(F.trim(c.cast("string")))
    return F.trim(c.cast("string"))


_ROW = "__slimrec_source_row"  # a file's row index, where the reader gives it (Parquet)
TS_LONG = "__slimrec_ts_long"  # an integer timestamp column's value, beside its text ts_raw


def read_events_spark(spark, inter_files: list[Path], item_files: list[Path]):
    """Events CSV/Parquet read by Spark -> (raw_interactions, raw_items) Spark frames, quarantine rows."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    def load(f: Path, multiline: bool = False):
        # the names as format detection read them (_is_catalogue), so the columns it saw are found
        df = _read(f, multiline)
        if f.name.lower().endswith(".parquet") and "_metadata" not in df.columns:
            # Parquet's own row index within the file: the exact source row, with no counting job
            df = df.withColumn(_ROW, F.col("_metadata.row_index"))
        names = [c if c == _ROW else _clean_name(c) for c in df.columns]
        return df.toDF(*names) if names != df.columns and len(set(names)) == len(names) else df

    def _read(f: Path, multiline: bool):
        name = f.name.lower()
        if name.endswith(".parquet"):
            # pandas writes nanosecond timestamps, which Spark refuses; read them as longs (ns),
            # which build_interactions converts. Delta tables here are written in microseconds.
            spark.conf.set("spark.sql.legacy.parquet.nanosAsLong", "true")
            return spark.read.parquet(str(f))
        sep = _sep(name)
        # RFC 4180, as pandas and spreadsheets write it: a quote inside a quoted field is doubled. A
        # quoted field of a catalogue (a description) may hold line breaks: ``multiline`` reads such a
        # file whole, in one task; events files (ids and times) keep being split across tasks.
        return (spark.read.option("header", True).option("sep", sep).option("mode", "PERMISSIVE")
                .option("quote", '"').option("escape", '"').option("multiLine", multiline).csv(str(f)))

    def with_row(df, source):
        if _ROW in df.columns:
            return df.withColumnRenamed(_ROW, "source_row").withColumn("source_file", F.lit(source))
        # The exact 0-based row of the source file (the stable tie-break), numbered in the JVM like
        # RDD.zipWithIndex but without shipping every row through Python: one small job counts the
        # rows of each partition (the file's splits, in file order), then row = rows in earlier
        # partitions + position within the partition (monotonically_increasing_id's low 33 bits).
        df = df.withColumn("_pid", F.spark_partition_id()).withColumn("_mid", F.monotonically_increasing_id())
        counts = dict(df.groupBy("_pid").count().collect())
        offsets, total = [], 0
        for pid in range(max(counts, default=-1) + 1):
            offsets.append(total)
            total += counts.get(pid, 0)
        offset = F.element_at(F.array(*[F.lit(o) for o in offsets]), F.col("_pid") + 1) if offsets else F.lit(0)
        local = F.col("_mid") - F.shiftleft(F.col("_pid").cast("long"), 33)
        return df.withColumn("source_row", (offset + local).cast("long")).withColumn(
            "source_file", F.lit(source)).drop("_pid", "_mid")

    raws, items = None, None
    for f in inter_files:
        df = load(f)
        u = _column(df.columns, USER_COLS, "user id", f.name)
        i = _column(df.columns, ITEM_COLS, "item id", f.name)
        t = _column(df.columns, TS_COLS, "timestamp", f.name)
        df = with_row(df.select(u, i, t, *[c for c in df.columns if c == _ROW]), f.name)
        df = df.select(
            "source_file", "source_row",
            _id_string(df, u).alias("user_raw"),
            _id_string(df, i).alias("item_raw"),
            F.col(t).cast("string").alias("ts_raw"),
            F.lit(None).cast("long").alias("position"),
            # an integer timestamp column as it is: checked_raw need not parse its text back
            *([F.col(t).cast("long").alias(TS_LONG)] if isinstance(df.schema[t].dataType, T.IntegralType) else []),
        )
        raws = df if raws is None else raws.unionByName(df, allowMissingColumns=True)
    for f in item_files:
        df = load(f, multiline=True)
        i = _column(df.columns, ITEM_COLS, "item id", f.name)
        other = [c for c in df.columns if c not in (i, _ROW)]
        df = with_row(df, f.name)
        df = df.select(
            "source_file", "source_row", _id_string(df, i).alias("item_raw"),
            F.to_json(F.struct(*[F.col(c) for c in other])).alias("payload"),
        )
        items = df if items is None else items.unionByName(df)
    return raws, items


# --------------------------------------------------------------------------- transforms
ITEM_OUT_COLS = ["item_id", "title", "brand", "categories", "description", "item_text", "text_hash"]


def normalise_items(raw_items: pd.DataFrame, max_text_chars: int, max_id_chars: int):
    """raw_items rows -> (items, quarantine) pandas frames.

    Input columns: source_file, source_row, item_raw, payload (JSON).
    Output: item_id, title, brand, categories (list), description, item_text, text_hash.
    The first record of an item id wins; later ones are quarantined as duplicates.

    Example: ``("f", 0, "7", '{"title": "Pen &amp; Ink,", "categories": "A, B"}')`` ->
    ``("7", "Pen & Ink", None, ["A", "B"], None, "Pen & Ink | A > B", sha1(...))``.
    """
    out, quarantine, seen = [], [], set()
    for r in raw_items.sort_values(["source_file", "source_row"]).itertuples(index=False):
        item = r.item_raw
        if not item:
            quarantine.append(_qrow(r.source_file, r.source_row, "item record without id", r.payload))
            continue
        if len(item) > max_id_chars:
            quarantine.append(_qrow(r.source_file, r.source_row, f"item id longer than {max_id_chars} characters", item))
            continue
        if item in seen:
            quarantine.append(_qrow(r.source_file, r.source_row, "duplicate item record (first kept)", r.payload))
            continue
        rec, err = parse_json_line(r.payload) if isinstance(r.payload, str) else (None, "empty payload")
        if err:
            quarantine.append(_qrow(r.source_file, r.source_row, err, r.payload or ""))
            continue
        seen.add(item)
        keys = _keyed(rec)
        title = clean_text(_pick(keys, ITEM_TITLE_KEYS), max_text_chars)
        brand = clean_text(_pick(keys, ("brand", "manufacturer", "store")), 200)
        # the 2023 Amazon metadata often has empty categories and a main_category only
        cats = split_categories(_pick(keys, ITEM_CATEGORY_KEYS))
        desc = _pick(keys, ("description", "desc", "detail_desc"))
        if isinstance(desc, list):
            desc = " ".join(str(d) for d in desc)
        desc = clean_text(desc, max_text_chars)
        text = item_text(title, cats, brand)
        out.append((item, title, brand, cats, desc, text, sha1(text)))
    items = pd.DataFrame(out, columns=ITEM_OUT_COLS)
    q = pd.DataFrame(quarantine, columns=["stage", "source", "source_row", "reason", "payload"])
    return items, q


def checked_raw(raw_df, items_df, max_id_chars: int):
    """raw_interactions rows with ``ts_parsed`` and ``reason`` (null: the row is a valid event).

    Reasons: missing or over-long ids; unparseable timestamp (integers are unix seconds, or ms above
    1e11, us above 1e14, ns above 1e17; decimals are seconds; strings are ISO-8601); no timestamp and
    no position; item not in ``items`` (when a catalogue exists). Duplicates are found later
    (:func:`interaction_rows`). No shuffle of the events: the catalogue's ids are broadcast.
    """
    from pyspark.sql import functions as F

    # try_cast: Spark 4 runs in ANSI mode, where a plain cast of "yesterday" fails the whole job.
    lng = F.col("ts_raw").try_cast("long")
    num = F.col("ts_raw").try_cast("double")
    if TS_LONG in raw_df.columns:  # the integers ts_raw was written from; null: a file of other types, parsed
        lng, num = F.coalesce(F.col(TS_LONG), lng), F.coalesce(F.col(TS_LONG).cast("double"), num)
    mag = F.abs(num)  # magnitude picks the unit (abs of a double cannot overflow)
    parsed = (
        F.when(lng.isNotNull() & (mag < 1e11), F.timestamp_seconds(lng))
        .when(lng.isNotNull() & (mag < 1e14), F.timestamp_millis(lng))
        .when(lng.isNotNull() & (mag < 1e17), F.timestamp_micros(lng))
        .when(lng.isNotNull(), F.timestamp_micros(F.expr("try_cast(ts_raw AS long) div 1000")))  # ns
        .when(num.isNotNull() & (mag < 1e11), F.timestamp_seconds(num))  # fractional seconds
        .when(num.isNull(), F.try_to_timestamp(F.col("ts_raw")))
    )
    df = raw_df.withColumn("ts_parsed", parsed)
    unknown = F.lit(False)
    if items_df is not None:
        known = items_df.select(F.col("item_id").alias("item_raw")).distinct().withColumn("_known", F.lit(True))
        df = df.join(F.broadcast(known), "item_raw", "left")
        unknown = F.col("_known").isNull()
    reason = (
        F.when(F.col("user_raw").isNull() | (F.col("user_raw") == ""), F.lit("missing user id"))
        .when(F.col("item_raw").isNull() | (F.col("item_raw") == ""), F.lit("missing item id"))
        .when((F.length("user_raw") > max_id_chars) | (F.length("item_raw") > max_id_chars), F.lit(f"id longer than {max_id_chars} characters"))
        .when(F.col("user_raw").contains("\ufffd") | F.col("item_raw").contains("\ufffd"), F.lit("non-UTF-8 bytes in id"))
        .when(F.col("ts_raw").isNotNull() & F.col("ts_parsed").isNull(), F.concat(F.lit("unparseable timestamp: "), F.substring("ts_raw", 1, 60)))
        .when(F.col("ts_raw").isNull() & F.col("position").isNull(), F.lit("missing timestamp"))
        .when(unknown, F.lit("unknown item id (not in the catalogue)"))
    )
    return df.withColumn("reason", reason).drop("_known", TS_LONG)


def interaction_rows(checked, base_ts: str, keep_raw: bool = False):
    """:func:`checked_raw` rows -> one row per raw row: an interaction, or its quarantine record.

    Output: user_id, item_id, event_ts, event_seq, ts_derived, source_file and the struct
    :data:`QUARANTINE_COLUMN` (stage, source, source_row, reason, payload), null for an interaction.
    The same (user, item, event_ts) again is a duplicate (first by source row kept). Order-only
    sources get ``event_ts = base_ts + position`` seconds and ``event_seq = position``; others
    ``event_seq = source_row``. One shuffle (the duplicate check); a writer routes each row
    (:meth:`slimrec.lake.Lake.write_spark_diverting`), so nothing is cached or counted twice.
    ``keep_raw``: raw_interactions' columns of the raw row too, so that it can be written in the same pass.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    base = F.lit(datetime.fromisoformat(base_ts)).cast("timestamp")
    derived = F.col("ts_raw").isNull()
    df = checked.withColumn(
        "event_ts",
        F.when(derived, base + F.make_interval(secs=F.col("position").cast("decimal(18,6)"))).otherwise(F.col("ts_parsed")))
    # refused rows sort after valid ones, so a valid event is never taken for the duplicate of a refused row
    # the key's 64-bit hash first: the sort compares longs, and the strings only on a hash tie
    key = ("user_raw", "item_raw", "event_ts")
    w = Window.partitionBy(F.xxhash64(*key), *key).orderBy(
        F.col("reason").isNotNull(), "source_file", "source_row")
    df = df.withColumn("_rn", F.row_number().over(w))
    why = F.when(F.col("reason").isNotNull(), F.col("reason")).when(
        F.col("_rn") > 1, F.lit("duplicate event (same user, item, event_ts; first kept)"))
    record = F.struct(
        F.lit("ingest").alias("stage"), F.col("source_file").alias("source"), F.col("source_row"),
        why.alias("reason"), F.to_json(F.struct("user_raw", "item_raw", "ts_raw", "position")).alias("payload"))
    return df.select(
        F.col("user_raw").alias("user_id"),
        F.col("item_raw").alias("item_id"),
        "event_ts",
        F.when(derived, F.col("position")).otherwise(F.col("source_row")).cast("long").alias("event_seq"),
        derived.alias("ts_derived"),
        "source_file",
        F.when(why.isNotNull(), record).alias(QUARANTINE_COLUMN),
        *[c for c in (spec("raw_interactions").column_names if keep_raw else []) if c in checked.columns
          and c != "source_file"],
    )


def build_interactions(raw_df, items_df, base_ts: str, max_id_chars: int):
    """Spark: raw_interactions -> (interactions, quarantine), both from :func:`interaction_rows`.

    Input columns: source_file, source_row, user_raw, item_raw, ts_raw, position.
    Output: user_id, item_id, event_ts, event_seq, ts_derived, source_file; and the quarantine
    rows (stage, source, source_row, reason, payload). Every raw row is in exactly one of them.

    Example: ``("f", 0, "u1", "i9", "1400000000", None)`` ->
    ``("u1", "i9", 2014-05-13 16:53:20, 0, false, "f")``.
    """
    return split_quarantined(interaction_rows(checked_raw(raw_df, items_df, max_id_chars), base_ts))
