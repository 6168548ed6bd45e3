"""python -m bench.scale [--sizes 1000000,5000000,20000000,50000000] [--baseline 5000000] [--quick]

How the foundation stages (ingest, build_sequences, build_prompts) grow with the data: each size of
generated events (``bench/gen_events.py``; users = events / 25, items = events / 100, the 5M case
of ``bench.foundation``) runs through the real stage code (``slimrec.pipeline.run_stage``, the
``dev`` profile, a fresh lake) in its own child process with its own local[2] Spark session, so no
size inherits a warm JVM or a cache from another.

For each size and stage: wall time, rows/s and the peak RSS of the child's whole process tree
(Python driver, Spark JVM, Python workers; sampled every 0.2 s); then time per million events
against the same stage at ``--baseline`` events measured in the same run (1.0: linear; above it:
growing faster than the data). The peak RSS over the whole child (Spark start included) is its own
row. Writes ``bench/results/scale.json`` and ``docs/scale.svg`` (time per million events and peak
RSS against events, log scale), which docs/benchmarks.md shows. Never asserts times.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from bench.common import PeakRSS, record, row

log = logging.getLogger("bench.scale")

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "scale.svg"
STAGES = ("ingest", "build_sequences", "build_prompts")
RUN_DATE = date(2024, 1, 15)
MARK = "SCALE-RESULT "


def shape(events: int) -> tuple[int, int]:
    """(users, items) for ``events``: 25 events per user and 100 per item, as in bench.foundation's 5M case."""
    return max(events // 25, 1), max(events // 100, 100)


def child(dataset: Path, lake_dir: Path, sets: list[str]) -> dict:
    """The three stages on ``dataset`` into a new lake at ``lake_dir``, in this process (its own Spark)."""
    from slimrec.config import load_config
    from slimrec.lake import Lake
    from slimrec.pipeline import run_stage
    from slimrec.spark import get_spark
    from slimrec.stages.base import StageContext

    cfg = load_config("dev", overrides=["quality.enabled=false", "tracking.mlflow_uri=null",
                                        "spark.extra_conf={'spark.ui.showConsoleProgress': 'false'}", *sets])
    out: dict = {}
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        spark = get_spark(cfg.spark)
        out["spark_start_s"] = time.perf_counter() - t0
    out["spark_start_gib"] = mem.gib
    ctx = StageContext(cfg=cfg, lake=Lake(lake_dir), run_date=RUN_DATE, dataset_dir=str(dataset), _spark=spark)
    for stage in STAGES:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            res = run_stage(stage, ctx, check=False)
            secs = time.perf_counter() - t0
        out[stage] = {"seconds": secs, "rows_in": res.rows_in, "rows_out": res.rows_out, "peak_gib": mem.gib}
        print(f"{stage}: {secs:.1f}s, {res.rows_in:,} rows in -> {res.rows_out:,} out, peak RSS {mem.gib:.2f} GiB",
              file=sys.stderr, flush=True)
    spark.stop()
    return out


def run_size(events: int, seed: int, workdir: Path, sets: list[str]) -> dict:
    """Generate (or reuse) ``events`` events, then the stages in a child process; its figures."""
    from bench.gen_events import default_dir

    users, items = shape(events)
    data = default_dir(events)
    # its own process (kept data is reused): generating 50M events takes several GiB that the stages'
    # figures must not carry
    subprocess.run([sys.executable, "-m", "bench.gen_events", "--events", str(events), "--users", str(users),
                    "--items", str(items), "--seed", str(seed), "--out", str(data)], check=True,
                   stdout=subprocess.DEVNULL)
    cmd = [sys.executable, "-m", "bench.scale", "--child", str(data), str(workdir / f"lake-{events}")]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{events} events: the stages' process exited {p.returncode}")
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith(MARK))
    res = json.loads(line[len(MARK):])
    res.update(events=events, users=users, items=items, child_seconds=time.perf_counter() - t0, peak_gib=mem.gib)
    return res


def scale_rows(results: list[dict], baseline: int) -> list[dict]:
    """Rows per size and stage; time per million events with the ``baseline`` size's as its baseline."""
    base = next((r for r in results if r["events"] == baseline), None)
    rows = []
    for r in results:
        n = r["events"]
        name = f"{n / 1e6:g}M events"
        for stage in STAGES:
            s = r[stage]
            rows.append(row(f"{name}/{stage}", "wall", s["seconds"], "s"))
            rows.append(row(f"{name}/{stage}", "rows_per_s", s["rows_in"] / s["seconds"] if s["seconds"] else 0.0,
                            "rows/s"))
            rows.append(row(f"{name}/{stage}", "peak_rss", s["peak_gib"], "GiB"))
            per_m = s["seconds"] / (n / 1e6)
            b = base[stage]["seconds"] / (baseline / 1e6) if base else None
            rows.append(row(f"{name}/{stage}", "s per 1M events", per_m, "s",
                            f"{baseline / 1e6:g}M events" if base else None, b))
        total = sum(r[s]["seconds"] for s in STAGES)
        rows.append(row(f"{name}/three stages", "wall", total, "s",
                        f"{baseline / 1e6:g}M events x {n / baseline:g}" if base else None,
                        sum(base[s]["seconds"] for s in STAGES) * n / baseline if base else None))
        rows.append(row(f"{name}/whole process", "peak_rss", r["peak_gib"], "GiB",
                        spread=f"Spark start {r['spark_start_s']:.1f} s included"))
    return rows


def plot(results: list[dict], out: Path = FIGURE) -> Path:
    """Time per million events by stage, and the process tree's peak RSS, against events (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["events"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for stage in STAGES:
        a.plot(xs, [r[stage]["seconds"] / (r["events"] / 1e6) for r in results], marker="o", label=stage)
    a.set(xscale="log", xlabel="events", ylabel="seconds per 1M events", title="time per million events")
    a.set_ylim(bottom=0)
    a.legend(fontsize=8)
    b.plot(xs, [r["peak_gib"] for r in results], marker="o", color="black")
    b.set(xscale="log", xlabel="events", ylabel="GiB", title="peak RSS, whole process tree")
    b.set_ylim(bottom=0)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="svg", metadata={"Date": None})
    plt.close(fig)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,5000000,20000000,50000000", help="comma-separated event counts")
    ap.add_argument("--baseline", type=int, default=5_000_000, help="the size others are compared with")
    ap.add_argument("--quick", action="store_true", help="250K and 1M events, 1M the baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value")
    ap.add_argument("--workdir", type=Path, default=None, help="where the lakes go (default: a temp folder)")
    ap.add_argument("--child", nargs=2, type=Path, metavar=("DATASET", "LAKE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("py4j", "slimrec.lake"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.child:
        print(MARK + json.dumps(child(args.child[0], args.child[1], args.sets)), flush=True)
        return 0
    if args.quick:
        args.sizes, args.baseline = "250000,1000000", 1_000_000
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not sizes:
        ap.error("--sizes names no size")
    import shutil

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="slimrec-scale-"))
    results = []
    try:
        for n in sizes:
            res = run_size(n, args.seed, workdir, args.sets)
            shutil.rmtree(workdir / f"lake-{n}", ignore_errors=True)  # the disk, for the next size
            print(f"[{n:,} events] " + ", ".join(f"{s} {res[s]['seconds']:.1f}s" for s in STAGES)
                  + f"; peak RSS {res['peak_gib']:.2f} GiB", flush=True)
            results.append(res)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    fig = plot(results)
    record("scale", scale_rows(results, args.baseline),
           {"results": results, "cpus": os.cpu_count(), "figure": str(fig.relative_to(ROOT))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
