"""Stage build_sequences: interactions -> user_sequences (changed users only are written)."""

from __future__ import annotations

import logging

from slimrec.sequences import split_sequences, user_item_sequences
from slimrec.spark import shuffle_partitions_for
from slimrec.stages.base import StageContext, StageResult

log = logging.getLogger(__name__)

INPUTS = ["interactions"]
OUTPUTS = ["user_sequences", "quarantine"]


def run(ctx: StageContext) -> StageResult:
    spark, lake = ctx.spark(), ctx.lake
    inputs = ctx.input_versions(INPUTS)
    n_in = lake.count("interactions")
    if ctx.cfg.spark.shuffle_partitions is None:
        spark.conf.set("spark.sql.shuffle.partitions", str(shuffle_partitions_for(n_in)))
    interactions = lake.read_spark(spark, "interactions")
    # build_sequences in two steps, so that the sequences and the quarantine come from one cached
    # computation (the shuffle and sort of every event) instead of two
    all_users = user_item_sequences(interactions, ctx.cfg.sequences).cache()
    seqs, quarantine = split_sequences(all_users, ctx.cfg.sequences)
    n_users = seqs.count()
    info = ctx.commit_info("build_sequences", inputs)
    versions = {}
    if lake.exists("user_sequences"):
        # Write only users whose sequence changed; MERGE on user_id keeps the rest as they are.
        old = lake.read_spark(spark, "user_sequences").select("user_id", "seq_hash")
        changed = seqs.join(old, ["user_id", "seq_hash"], "left_anti").cache()
        n_changed = changed.count()
        if n_changed:
            versions["user_sequences"] = lake.write_spark(changed, "user_sequences", "merge", info)
        else:
            versions["user_sequences"] = None
        changed.unpersist()
    else:
        n_changed = n_users
        versions["user_sequences"] = lake.write_spark(seqs, "user_sequences", "overwrite", info,
                                                      engine=ctx.cfg.spark.delta_engine)
    q = quarantine.toPandas()
    if len(q):
        q["source_row"] = q["source_row"].astype("Int64")
        versions["quarantine"] = lake.write_arrow("quarantine", q, "merge", info)
        log.warning("build_sequences: quarantined %d users: %s", len(q), q["reason"].iloc[0])
    all_users.unpersist()
    log.info("build_sequences: %d interactions -> %d users (%d written as changed)", n_in, n_users, n_changed)
    return StageResult("build_sequences", versions, rows_in=n_in, rows_out=n_users,
                       extra={"changed_users": n_changed, "quarantined_users": int(len(q))})
