"""Spark transforms: interactions -> user_sequences, and user_sequences + items -> prompts.

Both are pure ``(DataFrame, config) -> DataFrame`` functions: no session is
opened and no path is touched here.
"""

from __future__ import annotations

import logging

import pandas as pd

from slimrec import prompts as P

log = logging.getLogger(__name__)


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
    return split_sequences(user_item_sequences(interactions, cfg), cfg)


def user_item_sequences(interactions, cfg):
    """interactions -> every user's ordered, deduplicated, truncated sequence (short ones too).

    Output: user_id, item_ids, last_event_ts, seq_len. :func:`split_sequences` turns it into
    (user_sequences, quarantine); a caller that wants both from one computation caches this frame.
    """
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


QUARANTINE_COLUMN = "_quarantine"


def leave_one_out(seq, cfg):
    """:func:`user_item_sequences` output -> user_sequences rows, short users flagged, in one frame.

    Columns: user_sequences' own, and ``_quarantine`` (:data:`QUARANTINE_COLUMN`): null for a user
    with at least ``min_seq_len`` items, and for a shorter one the quarantine record (stage, source,
    source_row, reason, payload), whose history, targets and hash are null. One frame for both lets
    a writer route each row in one pass (:meth:`slimrec.lake.Lake.write_spark_diverting`).
    """
    from pyspark.sql import functions as F

    short = F.col("seq_len") < cfg.min_seq_len

    def kept(c):  # evaluated for long-enough users only (slice and element_at fail on short arrays)
        return F.when(~short, c)

    record = F.struct(
        F.lit("build_sequences").alias("stage"),
        # one row per user: the user is part of the source, so the quarantine key stays unique
        # (a MERGE of several rows with one key fails on the next run)
        F.concat(F.lit("interactions user_id="), F.col("user_id")).alias("source"),
        F.lit(None).cast("long").alias("source_row"),
        F.lit(f"sequence shorter than {cfg.min_seq_len} items after dedup/filtering").alias("reason"),
        F.to_json(F.struct("user_id", "item_ids")).alias("payload"),
    )
    return seq.select(
        "user_id",
        "item_ids",
        kept(F.slice("item_ids", 1, F.col("seq_len") - 2)).alias("history"),
        kept(F.element_at("item_ids", -2)).alias("valid_target"),
        kept(F.element_at("item_ids", -1)).alias("test_target"),
        "seq_len",
        "last_event_ts",
        kept(F.sha1(F.array_join("item_ids", "\u001f"))).alias("seq_hash"),
        F.when(short, record).alias(QUARANTINE_COLUMN),
    )


def split_sequences(seq, cfg):
    """:func:`user_item_sequences` output -> (leave-one-out user_sequences, quarantine of short users)."""
    from pyspark.sql import functions as F

    flagged = leave_one_out(seq, cfg)
    q = F.col(QUARANTINE_COLUMN)
    return flagged.where(q.isNull()).drop(QUARANTINE_COLUMN), flagged.where(q.isNotNull()).select(f"{QUARANTINE_COLUMN}.*")


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


def _render_batch(pdf: pd.DataFrame, version: str, max_items: int, max_chars: int, max_title: int,
                  student_items: int, student_title: int) -> pd.DataFrame:
    out = []
    for r in pdf.itertuples(index=False):
        evs = sorted(r.events, key=lambda e: e["pos"])
        lines = [P.item_line(e["title"], e["categories"], e["brand"], max_title) for e in evs]
        short = [P.short_item_line(e["title"], e["categories"], e["brand"], student_title) for e in evs]
        teacher, student, shown = P.render(version, lines, max_items, max_chars, short, student_items)
        ids = [e["item_id"] for e in evs][-shown:]
        out.append(
            (r.user_id, teacher, student, version, P.prompt_hash(version, teacher), int(r.history_len), shown, ids, r.seq_hash)
        )
    return pd.DataFrame(
        out,
        columns=["user_id", "teacher_prompt", "student_prompt", "prompt_version", "prompt_hash",
                 "history_len", "n_prompt_items", "prompt_item_ids", "seq_hash"],
    )


def build_prompts(sequences, items, cfg):
    """user_sequences + items -> prompts rows (without lineage).

    Input: user_sequences(user_id, history, seq_hash), items(item_id, title, categories, brand).
    Output: user_id, teacher_prompt, student_prompt, prompt_version, prompt_hash,
    history_len, n_prompt_items, prompt_item_ids, seq_hash.

    Only ``history`` is used (never the validation or test target: leakage
    guard). The most recent ``max_items`` history items are shown, oldest
    first, then the oldest are dropped until the teacher prompt fits
    ``max_chars``.

    Example: history ``[i1, i2]`` with titles "Pen", "Ink" -> a teacher prompt
    listing ``- Pen | ... `` then ``- Ink | ...`` and the three-step instructions.
    """
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    recent = sequences.select(
        "user_id", "seq_hash", F.size("history").cast("int").alias("history_len"),
        # the last max_items of the history (slice with a negative start past the length returns nothing)
        F.posexplode(F.slice("history", F.greatest(F.size("history") - cfg.max_items + 1, F.lit(1)),
                             F.lit(cfg.max_items))).alias("pos", "item_id"),
    )
    joined = recent.join(items.select("item_id", "title", "categories", "brand"), "item_id", "left")
    grouped = joined.groupBy("user_id", "seq_hash", "history_len").agg(
        F.collect_list(F.struct("pos", "item_id", "title", "categories", "brand")).alias("events")
    )
    out_schema = T.StructType([
        T.StructField("user_id", T.StringType()), T.StructField("teacher_prompt", T.StringType()),
        T.StructField("student_prompt", T.StringType()), T.StructField("prompt_version", T.StringType()),
        T.StructField("prompt_hash", T.StringType()), T.StructField("history_len", T.IntegerType()),
        T.StructField("n_prompt_items", T.IntegerType()), T.StructField("prompt_item_ids", T.ArrayType(T.StringType())),
        T.StructField("seq_hash", T.StringType()),
    ])
    args = (cfg.version, cfg.max_items, cfg.max_chars, cfg.max_item_title_chars,
            cfg.student_max_items, cfg.student_title_chars)

    def render(batches):
        for pdf in batches:
            yield _render_batch(pdf, *args)

    return grouped.mapInPandas(render, out_schema)
