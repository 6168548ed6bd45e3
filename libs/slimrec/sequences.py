"""Spark transforms: interactions -> user_sequences, and user_sequences + items -> prompts.

The Spark functions are pure ``(DataFrame, config) -> DataFrame`` functions: no session is
opened and no path is touched here. The Arrow kernels they run per partition (:func:`sequences_of`,
:func:`leave_one_out_of`) are plain functions of Arrow tables.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from slimrec import prompts as P
from slimrec.schemas.tables import spec

log = logging.getLogger(__name__)

QUARANTINE_COLUMN = "_quarantine"
QUARANTINE_FIELDS = ["stage", "source", "source_row", "reason", "payload"]  # quarantine's own columns


def build_sequences(interactions, cfg):
    """interactions -> (user_sequences without lineage, quarantine).

    Input columns: user_id, item_id, event_ts, event_seq.
    Output: user_id, item_ids, history, valid_target, test_target, seq_len, last_event_ts, seq_hash.

    Order is (event_ts, event_seq, item_id): ties on the timestamp keep the
    source order. An item repeated by a user keeps its first occurrence (or,
    with ``dedup_consecutive_only``, only immediate repeats are dropped).
    Optional iterative k-core on users and items. The most recent
    ``max_seq_len`` items are kept. Leave-one-out: the last item is the test
    target, the one before it the validation target, the rest the history.
    Users with fewer than ``min_seq_len`` items are quarantined.

    Example: ``u1: (i1, t=1), (i2, t=2), (i1, t=3), (i3, t=3, seq=5), (i4, t=4)`` ->
    ``item_ids [i1, i2, i3, i4], history [i1, i2], valid i3, test i4``.
    """
    return split_sequences(user_rows(interactions, cfg))


def user_rows(interactions, cfg):
    """interactions -> one row per user: its user_sequences row, or its quarantine record when short.

    Columns: user_sequences' own (no lineage) and ``_quarantine`` (:func:`leave_one_out_of`), so a
    writer routes each row in one pass (:meth:`slimrec.lake.Lake.write_spark_diverting`).
    :func:`split_sequences` makes the two frames of it.

    One shuffle puts each user's events in one partition; the Python worker then orders, deduplicates,
    cuts (:func:`sequences_of`) and splits (:func:`leave_one_out_of`) each partition on Arrow arrays.
    The same built in Spark SQL (collect_list, sort_array, array_distinct, slice, sha1:
    :func:`_user_item_sequences_sql` is the first half) makes the same rows, but its generated code is
    new to the JIT in every fresh JVM, which made a daily job's first run 2x its warm time on 5M
    events (bench.foundation). A partition is held whole in the worker: the stage sizes partitions
    by rows (:func:`slimrec.spark.shuffle_partitions_for`), which adaptive execution may merge up to its
    advisory size (64 MB of shuffle data: 2.5M events in a partition at 5M events).
    """
    cols = ["user_id", "item_ids", "history", "valid_target", "test_target", "seq_len", "last_event_ts", "seq_hash"]
    schema = _user_sequences_schema(cols, with_quarantine=True)
    return _map_partitions(events_by_user(interactions, cfg), user_rows_of(cfg), schema)


def user_rows_of(cfg):
    """:func:`user_rows`' work on one partition: an Arrow table of whole users' events -> their rows."""
    args, min_len = (cfg.max_seq_len, cfg.dedup_consecutive_only), cfg.min_seq_len
    return lambda events: leave_one_out_of(sequences_of(events, *args), min_len)


def user_item_sequences(interactions, cfg):
    """interactions -> every user's ordered, deduplicated, truncated sequence (short ones too).

    Output: user_id, item_ids, last_event_ts, seq_len (:func:`sequences_of`, as :func:`user_rows`).
    """
    schema = _user_sequences_schema(["user_id", "item_ids", "last_event_ts", "seq_len"])
    args = (cfg.max_seq_len, cfg.dedup_consecutive_only)
    return _map_partitions(events_by_user(interactions, cfg), lambda t: sequences_of(t, *args), schema)


def _user_sequences_schema(cols: list[str], with_quarantine: bool = False):
    """The Spark schema of a kernel's output, in its column order: ``cols`` of user_sequences (types
    from :mod:`slimrec.schemas.tables`), and the quarantine record's fields as the struct
    :data:`QUARANTINE_COLUMN`."""
    from pyspark.sql import types as T

    us = spec("user_sequences").spark_schema()
    fields = [us[c] for c in cols]
    if with_quarantine:
        q = spec("quarantine").spark_schema()
        fields.append(T.StructField(QUARANTINE_COLUMN, T.StructType([q[c] for c in QUARANTINE_FIELDS])))
    return T.StructType(fields)


def events_by_user(interactions, cfg):
    """interactions -> (user_id, item_id, event_ts, event_seq) after the k-core (if any), shuffled so
    that each user's events are in one partition."""
    df = interactions.select("user_id", "item_id", "event_ts", "event_seq")
    if cfg.k_core > 0:
        df = _k_core(df, cfg.k_core)
    return df.repartition("user_id")


def _map_partitions(df, fn, schema):
    """``fn`` (a partition as one Arrow table -> an Arrow table) over each partition of ``df``."""

    def build(batches):
        batches = list(batches)
        if batches:
            yield from fn(pa.Table.from_batches(batches)).to_batches()

    return df.mapInArrow(build, schema)


def _codes(col, ordered: bool) -> np.ndarray:
    """int64 codes of a string column: equal strings, equal codes; ``ordered``: codes sort as the strings do (bytewise)."""
    enc = pc.dictionary_encode(col).combine_chunks()
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    if not ordered:
        return codes
    rank = np.empty(len(enc.dictionary), dtype=np.int64)
    rank[pc.sort_indices(enc.dictionary).to_numpy()] = np.arange(len(enc.dictionary))
    return rank[codes]


def _dense(col) -> np.ndarray:
    """An integer or timestamp column -> non-negative int64 in the same order: ``x - min`` when the
    range is small (a few times the row count), else ranks of the distinct values (a hash, then a sort
    of the distinct values only)."""
    x = pc.cast(col, pa.int64()).to_numpy()
    lo, hi = int(x.min()), int(x.max())
    if hi - lo <= 4 * len(x):
        return x.astype(np.int64) - lo
    return _codes(col, ordered=True)


def _sort_order(keys: list[np.ndarray]) -> np.ndarray:
    """Row indices sorting by non-negative int64 ``keys``, the first most significant.

    The keys are packed into as few 63-bit words as their ranges allow and the first word is sorted
    (one argsort of int64 rather than np.lexsort's pass per key); the others are only needed, and
    only then sorted on, where the first has ties. Rows equal on every key come in any order.
    """
    words: list[np.ndarray] = []
    room = 0
    for k in keys:
        bits = max(int(k.max()).bit_length(), 1)
        if words and bits <= room:
            words[-1] = (words[-1] << bits) | k
            room -= bits
        else:
            words.append(k.copy())
            room = 63 - bits
    order = np.argsort(words[0])
    if len(words) == 1:
        return order
    first = words[0][order]
    if not (first[1:] == first[:-1]).any():  # no ties on the leading keys: the others cannot reorder
        return order
    return np.lexsort(words[::-1])


def sequences_of(events: pa.Table, max_seq_len: int, consecutive_only: bool = False) -> pa.Table:
    """Events of whole users (user_id, item_id, event_ts, event_seq) -> one row per user.

    Output columns as :func:`user_item_sequences`'. Each user's events are ordered by (event_ts,
    event_seq, item_id); an item seen again keeps its first event (``consecutive_only``: only an
    immediate repeat is dropped); the last ``max_seq_len`` items are kept, and ``last_event_ts`` is
    the time of the last item's kept event. Users come in no particular order.
    """
    n = events.num_rows
    if n == 0:
        return pa.table({"user_id": pa.array([], pa.string()), "item_ids": pa.array([], pa.list_(pa.string())),
                         "last_event_ts": events["event_ts"].slice(0, 0), "seq_len": pa.array([], pa.int32())})
    user = _codes(events["user_id"], ordered=False)  # users only need grouping, not their order
    item = _codes(events["item_id"], ordered=True)
    order = _sort_order([user, _dense(events["event_ts"]), _dense(events["event_seq"]), item])
    user, item = user[order], item[order]
    first_of_user = np.ones(n, dtype=bool)
    np.not_equal(user[1:], user[:-1], out=first_of_user[1:])
    if consecutive_only:
        keep = first_of_user.copy()
        keep[1:] |= item[1:] != item[:-1]
    else:
        # the first occurrence of each (user, item) in event order (a hash, no sort)
        keep = ~pd.Series(user * (int(item.max()) + 1) + item).duplicated().to_numpy()
    rows = order[keep]
    starts = np.flatnonzero(first_of_user[keep])
    ends = np.append(starts[1:], len(rows))
    # the last max_seq_len rows of each user: those less than max_seq_len from their user's end
    rows = rows[np.repeat(ends, ends - starts) - np.arange(len(rows)) <= max_seq_len]
    lens = np.minimum(ends - starts, max_seq_len).astype(np.int32)
    offsets = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    return pa.table({
        "user_id": events["user_id"].take(rows[offsets[:-1]]),
        "item_ids": pa.ListArray.from_arrays(offsets, events["item_id"].take(rows).combine_chunks()),
        "last_event_ts": events["event_ts"].take(rows[offsets[1:] - 1]),
        "seq_len": lens,
    })


def _user_item_sequences_sql(interactions, cfg):
    """:func:`user_item_sequences` in Spark SQL: the reference the tests compare the Arrow kernel with (same rows)."""
    from pyspark.sql import functions as F

    df = interactions.select("user_id", "item_id", "event_ts", "event_seq")
    order = ["event_ts", "event_seq", "item_id"]
    if cfg.k_core > 0:
        df = _k_core(df, cfg.k_core)
    # One shuffle: each user's events as one array sorted by (ts, seq, item) (collect_list alone does
    # not keep order), deduplicated inside the array. A window per (user, item) for the dedup would
    # cost a second shuffle and sort of every event.
    seq = df.groupBy("user_id").agg(F.sort_array(F.collect_list(F.struct(*order))).alias("_evs"))
    evs = F.col("_evs")
    if cfg.dedup_consecutive_only:
        # keep an event unless the one just before it is the same item (ANSI-safe: get() is null at -1)
        evs = F.filter(evs, lambda e, i: F.when(i == 0, F.lit(True)).otherwise(
            e["item_id"] != F.get(F.col("_evs"), i - 1)["item_id"]))
        items = evs.getField("item_id")
        last_ts = F.element_at(evs, -1)["event_ts"]
    else:
        # array_distinct keeps first occurrences in order; the last item's time is its first time.
        # evs.item_id (a field of every struct, code-generated) rather than transform(), whose lambda
        # is interpreted per element (5M events, warm: 3.5 s against 4.0 s).
        all_items = evs.getField("item_id")
        items = F.array_distinct(all_items)
        last_ts = F.element_at(evs, F.array_position(all_items, F.element_at(items, -1)).cast("int"))["event_ts"]
    seq = seq.select("user_id", items.alias("_items"), last_ts.alias("last_event_ts"))
    items = F.col("_items")
    n = F.size(items)
    items = F.when(n > cfg.max_seq_len, F.slice(items, -cfg.max_seq_len, cfg.max_seq_len)).otherwise(items)
    seq = seq.select("user_id", items.alias("item_ids"), "last_event_ts").withColumn(
        "seq_len", F.size("item_ids").cast("int"))
    return seq


def leave_one_out_of(seq: pa.Table, min_seq_len: int) -> pa.Table:
    """:func:`sequences_of` output -> user_sequences rows, short users flagged, in one table.

    Adds history (all items but the last two), valid_target (the one before the last), test_target
    (the last), seq_hash (sha1 hex of the items joined by U+001F) and ``_quarantine``
    (:data:`QUARANTINE_COLUMN`): null for a user with at least ``min_seq_len`` items; for a shorter one
    the quarantine record (stage, source, source_row, reason, payload), and its history, targets and
    hash are null. One table for both lets a writer route each row in one pass
    (:meth:`slimrec.lake.Lake.write_spark_diverting`).
    """
    n = seq.num_rows
    lists = seq["item_ids"].combine_chunks()
    users = seq["user_id"].combine_chunks()
    lens = np.asarray(seq["seq_len"].to_numpy(zero_copy_only=False), dtype=np.int64)
    short = lens < min_seq_len
    starts = np.asarray(lists.offsets.to_numpy()[:-1], dtype=np.int64)
    ends = starts + lens
    values = lists.values

    def target(pos):  # the item at flat position pos for users long enough, else null
        return pc.if_else(pa.array(~short), values.take(np.where(short, 0, pos)), pa.scalar(None, pa.string()))

    hist_len = np.where(short, 0, lens - 2)
    hist_off = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(hist_len, out=hist_off[1:])
    hist_rows = np.repeat(starts - hist_off[:-1], hist_len) + np.arange(hist_off[-1])
    joined = pc.binary_join(lists, "\u001f").to_pylist()
    hashes = [None if s else hashlib.sha1(j.encode()).hexdigest() for j, s in zip(joined, short, strict=True)]
    payload = [None] * n
    for i in np.flatnonzero(short).tolist():
        payload[i] = json.dumps({"user_id": users[i].as_py(), "item_ids": lists[i].as_py()},
                                ensure_ascii=False, separators=(",", ":"))
    record = pa.StructArray.from_arrays(
        [pa.array(["build_sequences"] * n, pa.string()),
         # one row per user: the user is part of the source, so the quarantine key stays unique
         # (a MERGE of several rows with one key fails on the next run)
         pc.binary_join_element_wise("interactions user_id=", users, ""),
         pa.nulls(n, pa.int64()),
         pa.array([f"sequence shorter than {min_seq_len} items after dedup/filtering"] * n, pa.string()),
         pa.array(payload, pa.string())],
        names=QUARANTINE_FIELDS,
        mask=pa.array(~short),
    )
    return pa.table({
        "user_id": users,
        "item_ids": lists,
        "history": pa.ListArray.from_arrays(pa.array(hist_off), values.take(hist_rows), mask=pa.array(short)),
        "valid_target": target(ends - 2),
        "test_target": target(ends - 1),
        "seq_len": seq["seq_len"],
        "last_event_ts": seq["last_event_ts"],
        "seq_hash": pa.array(hashes, pa.string()),
        QUARANTINE_COLUMN: record,
    })


def split_quarantined(rows):
    """Rows carrying :data:`QUARANTINE_COLUMN` -> (the rows where it is null, without it; the records
    where it is set). Two plans over ``rows``: the stages write such frames with
    :meth:`slimrec.lake.Lake.write_spark_diverting` instead, in one pass."""
    from pyspark.sql import functions as F

    q = F.col(QUARANTINE_COLUMN)
    return rows.where(q.isNull()).drop(QUARANTINE_COLUMN), rows.where(q.isNotNull()).select(f"{QUARANTINE_COLUMN}.*")


def split_sequences(users):
    """:func:`user_rows` output -> (user_sequences rows, quarantine records of short users)."""
    return split_quarantined(users)


def _k_core(df, k: int):
    """Events of the iterative k-core: every kept user has >= k distinct items, every item >= k users.

    Counted on distinct (user, item) pairs, as after first-occurrence dedup; rounds until nothing
    changes (at most 20).
    """
    from pyspark.sql import functions as F

    pairs = df.select("user_id", "item_id").distinct().cache()
    first = before = pairs.count()
    rounds, after = 0, before
    while rounds < 20:  # k-core converges in a few rounds on real data; 20 is a safety cap
        rounds += 1
        ucnt = pairs.groupBy("user_id").count().where(F.col("count") >= k).select("user_id")
        icnt = pairs.groupBy("item_id").count().where(F.col("count") >= k).select("item_id")
        kept = pairs.join(ucnt, "user_id", "left_semi").join(icnt, "item_id", "left_semi").cache()
        after = kept.count()
        pairs.unpersist()
        pairs = kept
        if after == before:
            break
        before = after
    log.info("build_sequences: %d-core kept %d of %d (user, item) pairs (%d rounds)", k, after, first, rounds)
    return df.join(pairs, ["user_id", "item_id"], "left_semi")


BROADCAST_MAX_ITEMS = 200_000  # item lines are ~200 bytes: about 40 MB shipped to every task at most


def item_lines(items, cfg):
    """items -> (item_id, tline, sline): each catalogue item's teacher and student prompt line, once.

    Sanitising (NFC, control characters, the injection regex) is Python-only; doing it once per
    catalogue item instead of once per history event is most of what makes build_prompts fast.
    """
    from pyspark.sql import types as T

    max_title, student_title = cfg.max_item_title_chars, cfg.student_title_chars

    def lines(batches):
        for b in batches:
            yield from P.item_lines_table(pa.Table.from_batches([b]), max_title, student_title).to_batches()

    schema = T.StructType([T.StructField(c, T.StringType()) for c in ("item_id", "tline", "sline")])
    return items.select("item_id", "title", "categories", "brand").mapInArrow(lines, schema)


def build_prompts(sequences, items, cfg, broadcast_items: bool = True):
    """user_sequences + items -> prompts rows (without lineage).

    Input: user_sequences(user_id, history, seq_hash), items(item_id, title, categories, brand).
    Output: user_id, teacher_prompt, student_prompt, prompt_version, prompt_hash,
    history_len, n_prompt_items, prompt_item_ids, seq_hash.

    Only ``history`` is used (never the validation or test target: leakage
    guard). The most recent ``max_items`` history items are shown, oldest
    first, then the oldest are dropped until the teacher prompt fits
    ``max_chars`` (always at least one).

    Each catalogue item's two lines are rendered once (:func:`item_lines`); the rest is Spark SQL,
    one shuffle by user: a running sum of line lengths from the newest line back decides which lines
    fit, and the prompts are the kept lines between the template's fixed parts
    (:func:`slimrec.prompts.template_parts`). The same strings as :func:`slimrec.prompts.render`
    (tested). ``broadcast_items``: ship the item lines to every task (no shuffle of the events for
    the join); the stage turns it off above :data:`BROADCAST_MAX_ITEMS` items.

    Example: history ``[i1, i2]`` with titles "Pen", "Ink" -> a teacher prompt
    listing ``- Pen | ... `` then ``- Ink | ...`` and the three-step instructions.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    (tpre, tsuf), (spre, ssuf) = P.template_parts(cfg.version)
    lines = item_lines(items, cfg)
    if broadcast_items:
        # rendered once here (a small table, kept on the executors): both joins below broadcast it
        lines = F.broadcast(lines.localCheckpoint())
    recent = sequences.select(
        "user_id", "seq_hash", F.size("history").cast("int").alias("history_len"),
        # the last max_items of the history (slice with a negative start past the length returns nothing)
        F.posexplode(F.slice("history", F.greatest(F.size("history") - cfg.max_items + 1, F.lit(1)),
                             F.lit(cfg.max_items))).alias("pos", "item_id"),
    )
    # an item missing from the catalogue is still shown, as an untitled one
    none_t, none_s = P.missing_item_lines(cfg.max_item_title_chars, cfg.student_title_chars)
    newest_first = (Window.partitionBy("user_id").orderBy(F.col("pos").desc())
                    .rowsBetween(Window.unboundedPreceding, Window.currentRow))

    def ranked(df, length):  # k: 1 for the newest line; keep: the line fits (the newest always does)
        return (df.withColumn("k", F.row_number().over(newest_first))
                # "- " + line + "\n" per line, less the last newline: fixed + tail - 1 is the prompt's length
                .withColumn("tail", F.sum(length + 3).over(newest_first))
                .withColumn("keep", (F.col("k") == 1) | (F.lit(len(tpre) + len(tsuf) - 1) + F.col("tail") <= cfg.max_chars)))

    def with_lines(df):
        return (df.join(lines, "item_id", "left").withColumn("tline", F.coalesce("tline", F.lit(none_t)))
                .withColumn("sline", F.coalesce("sline", F.lit(none_s))))

    if broadcast_items:
        # The window's shuffle carries each line's length, not its text: the lines join again after it, on
        # the tasks that already hold each user's rows (a broadcast join; no second shuffle for the grouping).
        sized = ranked(with_lines(recent).select("user_id", "seq_hash", "history_len", "pos", "item_id",
                                                 F.length("tline").alias("tlen")), F.col("tlen"))
        if cfg.student_max_items > 0:  # with 0 the student sees every line of the window, kept or not
            sized = sized.where("keep")
        joined = with_lines(sized)
    else:  # the lines join by a shuffle on item_id: once, before the window
        joined = ranked(with_lines(recent), F.length("tline"))
    grouped = joined.groupBy("user_id", "seq_hash", "history_len").agg(
        F.array_sort(F.collect_list(F.struct("pos", "item_id", "tline", "sline", "keep", "k"))).alias("ev"))
    kept = F.filter("ev", lambda e: e["keep"])
    # render(): the student sees the last min(shown, student_max_items) lines; with 0, every line
    student_rows = (F.filter("ev", lambda e: e["keep"] & (e["k"] <= cfg.student_max_items))
                    if cfg.student_max_items > 0 else F.col("ev"))
    teacher = F.concat(F.lit(tpre), F.array_join(F.transform(kept, lambda e: F.concat(F.lit("- "), e["tline"])), "\n"),
                       F.lit(tsuf))
    student = F.concat(F.lit(spre),
                       F.array_join(F.transform(student_rows, lambda e: F.concat(F.lit("- "), e["sline"])), "\n"),
                       F.lit(ssuf))
    return grouped.select(
        "user_id", teacher.alias("teacher_prompt"), student.alias("student_prompt"),
        F.lit(cfg.version).alias("prompt_version"),
        F.sha1(F.concat(F.lit(cfg.version + "\x1f"), teacher).cast("binary")).alias("prompt_hash"),
        "history_len", F.size(kept).cast("int").alias("n_prompt_items"),
        F.transform(kept, lambda e: e["item_id"]).alias("prompt_item_ids"), "seq_hash",
    )
