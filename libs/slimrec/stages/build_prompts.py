"""Stage build_prompts: user_sequences + items -> prompts for the run date (changed users only)."""

from __future__ import annotations

import logging

from pyspark.sql import functions as F

from slimrec.sequences import BROADCAST_MAX_ITEMS, build_prompts
from slimrec.spark import session_conf, shuffle_partitions_for
from slimrec.stages.base import StageContext, StageResult

log = logging.getLogger(__name__)

INPUTS = ["user_sequences", "items"]
OUTPUTS = ["prompts"]


def run(ctx: StageContext) -> StageResult:
    # the shuffle carries up to max_items history lines per user: size its partitions by those, so that a
    # task never holds more than a few hundred thousand lines (800k users in 4 partitions ran out of heap)
    n_in = ctx.lake.count("user_sequences")
    lines = n_in * max(ctx.cfg.prompts.max_items, 1)
    conf = {} if ctx.cfg.spark.shuffle_partitions else {"spark.sql.shuffle.partitions": str(shuffle_partitions_for(lines))}
    with session_conf(ctx.spark(), conf):  # for this stage's queries only
        return _run(ctx, n_in)


def _run(ctx: StageContext, n_in: int) -> StageResult:
    spark, lake = ctx.spark(), ctx.lake
    inputs = ctx.input_versions(INPUTS)
    seqs = lake.read_spark(spark, "user_sequences")
    if lake.exists("prompts"):
        # A user gets a new prompt when their sequence or the template changed since an earlier date.
        # Rows of this run date are ignored here, so a rerun of the same date rebuilds the same slice.
        earlier = (
            lake.read_spark(spark, "prompts")
            .where(F.col("run_date") < F.lit(ctx.run_date))
            .where(F.col("prompt_version") == ctx.cfg.prompts.version)
            .select("user_id", "seq_hash")
        )
        seqs = seqs.join(earlier, ["user_id", "seq_hash"], "left_anti")
    items = lake.read_spark(spark, "items")
    prompts = build_prompts(seqs, items, ctx.cfg.prompts, broadcast_items=lake.count("items") <= BROADCAST_MAX_ITEMS)
    info = ctx.commit_info("build_prompts", inputs, prompt_version=ctx.cfg.prompts.version)
    # no cache: the prompts are written as they are made; the figures come from the written date's rows
    version = lake.write_spark(prompts, "prompts", "replace_date", info, engine=ctx.cfg.spark.delta_engine)
    written = lake.read_spark(spark, "prompts").where(F.col("run_date") == F.lit(ctx.run_date))
    n_out, mean, longest = written.agg(F.count(F.lit(1)), F.avg(F.length("teacher_prompt")),
                                       F.max(F.length("teacher_prompt"))).first()
    log.info("build_prompts: %d users -> %d prompts for %s (mean %.0f chars, max %s)",
             n_in, n_out, ctx.run_date, mean or 0, longest)
    return StageResult("build_prompts", {"prompts": version}, rows_in=n_in, rows_out=n_out,
                       extra={"mean_prompt_chars": round(float(mean or 0), 1)})
