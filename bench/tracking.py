"""What MLflow tracking adds to a ``slim run``: the tracking step timed on a finished lake, against the run.

    slim run --dataset data/amazon_office_2014 --lake lake --profile dev     # any finished run, tracking on or off
    python -m bench.tracking --lake lake [--repeats 3]

``slim run`` logs to MLflow once its tables and report are written (:func:`slimrec.tracking.track_command`);
before the stages it only checks that MLflow can be imported (``importlib.util.find_spec``). So a run with
tracking on takes the same stages plus that one step, and "on against off" is the step's time over the run's.
This bench times the step the way a command pays it, in a fresh process each time (MLflow's import
included), for the lake's latest run (its metrics, config, student record and report files, the same view
``slim run`` logs):

* ``new store``: into a new SQLite store (the first run on a lake: MLflow creates its schema), then
* ``existing store``: a second command into that same store (every later run).

Stores live in a scratch folder, not in the lake's ``_mlflow``. The run's own wall time comes from the
lake's record of it (``_runs/<run_id>.json``: the stages' metered wall seconds, their quality gates
included; the final report and Spark's start are not in it, so the ratio is an upper bound). The ratio of
the step to the run is printed with the range over ``--repeats``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import record, row

ONE = """
import json, sys, time
from datetime import date
t0 = time.perf_counter()
from slimrec.config import load_config
from slimrec.lake import Lake
from slimrec.stages.base import StageContext
from slimrec.tracking import track_command
lake_arg, profile, uri, run_id, run_date, reports = sys.argv[1:7]
cfg = load_config(profile, None, [f"tracking.mlflow_uri={uri}"])
ctx = StageContext(cfg=cfg, lake=Lake.from_config(lake_arg, cfg.lake), run_date=date.fromisoformat(run_date),
                   run_id=run_id)
paths = {p.rsplit("/", 1)[-1]: p for p in json.loads(reports)}
t1 = time.perf_counter()
mlflow_run = track_command(ctx, "run", paths)
t2 = time.perf_counter()
print(json.dumps({"mlflow_run": mlflow_run, "setup_s": t1 - t0, "track_s": t2 - t1}))
"""


def latest_run_record(lake: str) -> tuple[str, dict]:
    """(run_id, record) of the lake's most recently written ``_runs/<run_id>.json`` with stage costs."""
    runs = sorted(Path(lake, "_runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    for p in reversed(runs):
        rec = json.loads(p.read_text())
        if rec.get("stage_costs"):
            return p.stem, rec
    raise SystemExit(f"{lake}: no run record with stage costs under _runs/: run `slim run` on it first")


def run_wall_seconds(rec: dict) -> float:
    """The run's stages, wall seconds (quality gates included), from its record."""
    return float(sum(c.get("wall_s") or 0.0 for c in rec["stage_costs"]))


def time_step(lake: str, profile: str, uri: str, run_id: str, run_date: str, reports: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", ONE, lake, profile, uri, run_id, run_date, json.dumps(reports)],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"tracking step failed (exit {out.returncode}): {out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if not res["mlflow_run"]:
        raise SystemExit(f"tracking step logged nothing (see its warning): {out.stderr[-2000:]}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lake", required=True, help="a lake (local path) that a `slim run` has finished")
    ap.add_argument("--profile", default=None, help="profile of that run (default: the one its record names)")
    ap.add_argument("--reports", default="reports", help="folder of the run's report files (logged as artifacts)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    run_id, rec = latest_run_record(args.lake)
    profile = args.profile or rec.get("profile") or "dev"
    wall = run_wall_seconds(rec)
    run_date = str(rec["stage_costs"][0].get("run_date") or time.strftime("%Y-%m-%d"))
    reports = sorted(str(p) for p in Path(args.reports).glob("*") if p.is_file()) if Path(args.reports).is_dir() else []
    new, again = [], []
    with tempfile.TemporaryDirectory(prefix="slimrec-bench-tracking-") as tmp:
        for i in range(max(1, args.repeats)):
            uri = str(Path(tmp, f"store{i}", "mlflow.db"))
            new.append(time_step(args.lake, profile, uri, run_id, run_date, reports))
            again.append(time_step(args.lake, profile, uri, run_id, run_date, reports))
            print(f"round {i + 1}: new store {new[-1]['track_s']:.2f} s, existing store {again[-1]['track_s']:.2f} s "
                  f"(process start and slimrec import {new[-1]['setup_s']:.1f} s, not counted)", flush=True)
    rows = [row(f"run {run_id} ({profile})", "stages wall", wall, "s",
                spread=f"{len(rec['stage_costs'])} stages, from the lake's run record ({rec.get('machine', '?')})")]
    for name, res in (("new store", new), ("existing store", again)):
        t = np.array([r["track_s"] for r in res])
        rng = f"median of {len(t)}; {t.min():.2f}-{t.max():.2f} s"
        rows.append(row(f"tracking step, {name}", "wall", float(np.median(t)), "s", spread=rng))
        pct = 100 * t / wall
        rows.append(row(f"tracking step, {name}", "share of the run", float(np.median(pct)), "%",
                        spread=f"median of {len(t)}; {pct.min():.2f}-{pct.max():.2f}%"))
    record("tracking", rows, extra={"run_id": run_id, "run_record": {k: v for k, v in rec.items() if k != "stage_costs"},
                                    "stage_wall_s": {c["stage"]: c.get("wall_s") for c in rec["stage_costs"]},
                                    "new_store": new, "existing_store": again, "reports": reports,
                                    "at_unix": time.time()})
    worst = max(r["track_s"] for r in new + again) / wall
    print(f"\ntracking on adds at most {100 * worst:.2f}% to this run's {wall:.0f} s of stages "
          f"({'within' if worst <= 0.03 else 'NOT within'} 3%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
