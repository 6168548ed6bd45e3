"""python -m bench.object_store [--events 5000000] [--users 200000] [--items 50000] [--runs 3] [--quick]

build_sequences with the lake in three places, through the real stage code (``run_stage``, the ``dev``
profile, one local[2] Spark session):

* ``local/parquet`` (the baseline): local disk, Spark's own Parquet reader (``lake.spark_reader=parquet``);
* ``local/datasource``: local disk, the Python Data Source reader (pyarrow on the executors);
* ``s3/datasource``: a SeaweedFS S3 server on 127.0.0.1 (``slimrec.s3server``), the Data Source reader
  (what ``auto`` picks for an object store); executors write through pyarrow's S3 filesystem.

The input is ``bench/gen_events.py``'s events table, ingested once into a local lake. Each run goes into a
new lake holding a copy of that ``interactions`` table (uploaded to the server for the S3 case); the cases
take turns, round after round, so a busy moment of the machine falls on all of them. Reported: the
median wall time of ``--runs`` runs per case with their range, and its ratio to ``local/parquet``
measured in the same process; plus the time to upload the input table. Every case's ``user_sequences``
is checked equal (user count and the multiset of sequence hashes) to the baseline's.

Writes ``bench/results/object_store.json``. Never asserts times.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from bench.common import PeakRSS, record, row

RUN_DATE = date(2024, 1, 15)
CASES = [("local", "parquet"), ("local", "datasource"), ("s3", "datasource")]


def _fingerprint(lake) -> tuple[int, list[str]]:
    t = lake.read_arrow("user_sequences", columns=["seq_hash"])
    return len(t), sorted(t.column(0).to_pylist())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=3, help="runs per case (median reported)")
    ap.add_argument("--quick", action="store_true", help="500K events, 20K users, 5K items, 2 runs")
    ap.add_argument("--workdir", type=Path, default=None, help="lakes and server data here (default: a temp dir)")
    a = ap.parse_args()
    if a.quick:
        a.events, a.users, a.items, a.runs = 500_000, 20_000, 5_000, 2
    logging.basicConfig(level=logging.WARNING)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-objstore-"))
    work.mkdir(parents=True, exist_ok=True)

    from slimrec.s3server import S3Server

    from bench import gen_events

    dataset = gen_events.ensure(a.events, a.users, a.items, 0)
    server = S3Server(work / "s3").start()
    os.environ.update(server.env)  # before Spark starts: its Python workers inherit the environment
    try:
        from slimrec.config import load_config
        from slimrec.lake import Lake
        from slimrec.pipeline import run_stage
        from slimrec.spark import get_spark
        from slimrec.stages.base import StageContext
        from slimrec.storage import upload_folder

        cfg = load_config("dev", None, ["ingest.format=events"])
        spark = get_spark(cfg.spark)
        src = Lake(work / "src", spark_reader="parquet")
        t0 = time.perf_counter()
        run_stage("ingest", StageContext(cfg=cfg, lake=src, run_date=RUN_DATE, dataset_dir=str(dataset), _spark=spark),
                  check=False)
        n_events = src.count("interactions")
        print(f"ingest (once, local): {n_events:,} interactions in {time.perf_counter() - t0:.1f}s", flush=True)

        walls: dict[str, list[float]] = {f"{w}/{r}": [] for w, r in CASES}
        peaks: dict[str, float] = {}
        uploads: list[float] = []
        prints: dict[str, tuple] = {}
        for k in range(a.runs):
            for where, reader in CASES:
                case = f"{where}/{reader}"
                root = str(work / f"lake-{where}-{reader}-{k}") if where == "local" else f"s3://{server.bucket}/run{k}/lake"
                lake = Lake(root, spark_reader=reader)
                if where == "local":
                    shutil.copytree(src.path("interactions"), lake.path("interactions"))
                else:
                    t0 = time.perf_counter()
                    upload_folder(src.path("interactions"), lake.path("interactions"))
                    uploads.append(time.perf_counter() - t0)
                ctx = StageContext(cfg=cfg, lake=lake, run_date=RUN_DATE, dataset_dir=str(dataset), _spark=spark)
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    run_stage("build_sequences", ctx, check=False)
                    secs = time.perf_counter() - t0
                walls[case].append(secs)
                peaks[case] = max(peaks.get(case, 0.0), mem.gib)
                if k == 0:
                    prints[case] = _fingerprint(lake)
                print(f"round {k + 1}: {case}: build_sequences {secs:.1f}s (peak RSS {mem.gib:.2f} GiB)", flush=True)
        spark.stop()
    finally:
        server.stop()

    base = prints["local/parquet"]
    mismatched = [c for c, fp in prints.items() if fp != base]
    rows = []
    base_med = statistics.median(walls["local/parquet"])
    for case, runs in walls.items():
        med = statistics.median(runs)
        spread = f"{min(runs):.1f}-{max(runs):.1f} s over {len(runs)} runs"
        rows.append(row(f"{n_events}ev/build_sequences/{case}", "wall", med, "s",
                        None if case == "local/parquet" else "local/parquet",
                        None if case == "local/parquet" else base_med, spread=spread))
        rows.append(row(f"{n_events}ev/build_sequences/{case}", "peak_rss", peaks[case], "GiB"))
    rows.append(row(f"{n_events}ev/upload_interactions_to_s3", "wall", statistics.median(uploads), "s",
                    spread=f"{min(uploads):.1f}-{max(uploads):.1f} s over {len(uploads)} uploads"))
    print(f"user_sequences: {base[0]:,} users in every case" if not mismatched
          else f"user_sequences DIFFER from local/parquet in: {mismatched}", flush=True)
    record("object_store", rows, {"events": n_events, "runs": a.runs, "users_out": base[0],
                                  "mismatched_cases": mismatched, "walls": walls})
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
