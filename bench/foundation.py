"""python -m bench.foundation [--events 5000000] [--users 200000] [--items 50000] [--quick] [--only bundled|generated]

The foundation stages (ingest, build_sequences, build_prompts) through the real
stage code (``slimrec.pipeline.run_stage``, a temp lake, one local[2] Spark
session, the ``dev`` profile) on

* the bundled ``data/amazon_office_2014`` (LC-Rec JSON, 53K events), and
* a generated events table (``bench/gen_events.py``: 5M events, 200K users,
  50K items, Zipf popularity, tied timestamps; Parquet, ``events`` format).

For each stage: wall time, rows/s and the peak RSS of the process tree
(Python driver + Spark JVM + Python workers, sampled every 0.2 s).

Baseline: DuckDB builds the same sequences from the same ``interactions``
Delta table (first occurrence per user and item, order by (event_ts,
event_seq, item_id), last ``max_seq_len``, at least ``min_seq_len``,
leave-one-out, sha1 hash) and writes them to Parquet, in a child process
limited to 2 threads; two formulations (``list(... ORDER BY ...)`` and
``list_sort`` over structs). Both outputs are checked equal to Spark's
``user_sequences``, row by row. The ratio is Spark's build_sequences stage
(read Delta, build, write Delta) over the faster DuckDB query (read Delta,
build, write Parquet). Spark session start is reported on its own line.

Each side is timed cold and warm. Cold: the stage as a daily job runs it,
its first query of that shape in the JVM (after ingest in the same session),
which on 2 cores pays for the JIT compiler beside the tasks; DuckDB's first
query in a fresh process. Warm: the median of 5 more runs of the same
build_sequences stage, each into a new lake holding a copy of the same
interactions table; DuckDB's same query again, the median of as many more
runs in the same process. Both ratios are printed. Then the rerun path: the stage twice more on its own lake,
which already holds ``user_sequences`` (MERGE of changed users; nothing changed).

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
from datetime import date
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


def _duck_child(interactions: str, out: str, max_len: int, min_len: int, variant: str, threads: int) -> dict:
    con = _duck_connect(threads)
    runs = []
    for _ in range(1 + WARM_RUNS):  # first run in a fresh process, then the same query again (warm)
        t0 = time.perf_counter()
        con.execute(f"COPY ({duck_sql(interactions, max_len, min_len, variant)}) TO '{out}' (FORMAT parquet)")
        runs.append(time.perf_counter() - t0)
    rows = con.sql(f"SELECT count(*) FROM '{out}'").fetchone()[0]
    return {"seconds": runs[0], "warm_seconds": statistics.median(runs[1:]), "warm_runs": runs[1:], "rows": rows,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def duck_build(interactions: str, out: str, max_len: int, min_len: int, variant: str, threads: int = 2) -> dict:
    """Run the DuckDB baseline in a fresh process: its own timing and peak memory."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_duck_child, (interactions, out, max_len, min_len, variant, threads))


def compare_with_spark(user_sequences: str, duck_parquet: str) -> dict:
    """Row-by-row comparison of Spark's user_sequences (Delta) with DuckDB's Parquet."""
    con = _duck_connect()
    r = con.sql(f"""
        SELECT count(*) FILTER (WHERE s.user_id IS NULL) AS only_duck,
               count(*) FILTER (WHERE d.user_id IS NULL) AS only_spark,
               count(*) FILTER (WHERE s.user_id IS NOT NULL AND d.user_id IS NOT NULL AND (
                   s.item_ids <> d.item_ids OR s.history <> d.history OR s.valid_target <> d.valid_target
                   OR s.test_target <> d.test_target OR s.seq_len <> d.seq_len OR s.seq_hash <> d.seq_hash
                   OR s.last_event_ts <> d.last_event_ts)) AS different,
               count(*) AS total
        FROM delta_scan('{user_sequences}') s FULL OUTER JOIN '{duck_parquet}' d USING (user_id)
    """).fetchone()
    return dict(zip(["only_duckdb", "only_spark", "different", "total"], r, strict=True))


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


def run_case(name: str, dataset: Path, spark, cfg, workdir: Path, rows: list[dict], extra: dict) -> None:
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

    # build_sequences again, warm: the same stage code into another lake holding a copy of the same
    # interactions table (in this lake a rerun would find nothing changed and write nothing), WARM_RUNS
    # times; the median is the warm figure (the JIT keeps compiling over the first runs)
    warm_runs, warm_cpu = [], []
    for k in range(WARM_RUNS):
        warm_lake = Lake(workdir / f"lake-{name}-warm{k}")
        shutil.copytree(lake.path("interactions"), warm_lake.path("interactions"))
        warm_ctx = StageContext(cfg=cfg, lake=warm_lake, run_date=RUN_DATE, dataset_dir=str(dataset), _spark=spark)
        cpu0 = jvm_thread_cpu()
        t0 = time.perf_counter()
        run_stage("build_sequences", warm_ctx, check=False)
        warm_runs.append(time.perf_counter() - t0)
        warm_cpu.append(_cpu_delta(cpu0, jvm_thread_cpu()) if cpu0 else {})
        shutil.rmtree(warm_lake.root, ignore_errors=True)
    warm_s = statistics.median(warm_runs)
    info["build_sequences"]["warm_seconds"] = warm_s
    info["build_sequences"]["warm_runs"] = warm_runs
    info["build_sequences"]["warm_jvm_cpu_s"] = warm_cpu
    cold_cpu = info["build_sequences"]["jvm_cpu_s"]
    if cold_cpu and all(warm_cpu):
        # where a first run's extra time goes: the JIT compiling the new query's code beside the tasks
        fmt = lambda d: ", ".join(f"{k} {v:.1f}" for k, v in d.items())  # noqa: E731
        print(f"[{name}] build_sequences JVM CPU s, first run: {fmt(cold_cpu)}; warm runs: "
              + " | ".join(fmt(c) for c in warm_cpu), flush=True)
    print(f"[{name}] build_sequences again (warm JVM), {WARM_RUNS} runs: "
          f"{', '.join(f'{w:.1f}' for w in warm_runs)} s, median {warm_s:.1f}s", flush=True)
    rows.append(row(f"{name}/build_sequences_warm", "wall", warm_s, "s"))

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

    # DuckDB: the same sequences from the same interactions table
    seq_cfg = cfg.sequences
    duck: dict = {}
    for variant in ("list_sort", "list_order_by"):
        out = str(workdir / f"duck-{name}-{variant}.parquet")
        d = duck_build(lake.path("interactions"), out, seq_cfg.max_seq_len, seq_cfg.min_seq_len, variant)
        d["check"] = compare_with_spark(lake.path("user_sequences"), out)
        duck[variant] = d
        same = d["check"]["only_duckdb"] == d["check"]["only_spark"] == d["check"]["different"] == 0
        d["same_output"] = same
        print(f"[{name}] duckdb {variant}: {d['seconds']:.1f}s (again, median of {WARM_RUNS}: {d['warm_seconds']:.1f}s), {d['rows']:,} users, "
              f"peak RSS {d['peak_rss'] / 2**30:.2f} GiB, same output as Spark: {same} {d['check']}", flush=True)
        rows.append(row(f"{name}/duckdb_{variant}", "wall", d["seconds"], "s"))
        rows.append(row(f"{name}/duckdb_{variant}", "peak_rss", d["peak_rss"] / 2**30, "GiB"))
    best = min(duck, key=lambda v: duck[v]["seconds"])
    spark_s = info["build_sequences"]["seconds"]
    rows.append(row(f"{name}/build_sequences", "spark_vs_duckdb", spark_s, "s", f"duckdb_{best}",
                    duck[best]["seconds"]))
    best_warm = min(duck, key=lambda v: duck[v]["warm_seconds"])
    rows.append(row(f"{name}/build_sequences_warm", "spark_vs_duckdb_warm", warm_s, "s", f"duckdb_{best_warm}",
                    duck[best_warm]["warm_seconds"]))
    extra[name] = {"stages": info, "duckdb": duck, "dataset": str(dataset)}


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
            run_case("bundled", BUNDLED, spark, cfg, workdir, rows, extra)
        if gen_dir is not None:
            run_case(f"generated_{args.events // 1000}k", gen_dir, spark, cfg, workdir, rows, extra)
        spark.stop()
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    record("foundation", rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
