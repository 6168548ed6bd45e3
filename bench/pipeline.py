"""python -m bench.pipeline [--profile dev] [--dataset data/amazon_office_2014] [--set key=value ...]

What ``make run`` costs: the same command (``slim run --dataset ... --profile dev``) into a fresh lake
in a temporary folder, in a child process. Prints and records the whole run's wall time and the peak
RSS of its process tree (the ``slim`` process, Spark's JVM, Ray's daemons and workers, sampled every
0.5 s), and per stage the wall time the pipeline logs, the tree's peak RSS while that stage ran and,
at that peak, the RSS of each kind of process (a Ray worker's title, else the executable's name).
PSS (shared pages split among the processes that map them) is summed every 5 s beside it. Writes
``bench/results/pipeline.json`` (shown in docs/benchmarks.md). It takes as long as the run
(about 40 minutes on 2 cores with the dev profile); never asserts times.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import record, row

ROOT = Path(__file__).resolve().parents[1]
_START = re.compile(r"stage (\w+): start\b")
_DONE = re.compile(r"stage (\w+): (?:done in ([0-9.]+)s|skipped)")


def process_kind(p) -> str:
    """What a process is, for the memory breakdown: a Ray worker's title (``ray::IDLE``,
    ``ray::MapWorker(TransformersGenerator)``...), else its executable's name (java, raylet, slim...)."""
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    return p.name()


class StageRSS:
    """Peak RSS of a process tree, overall and per stage (the stage named by the log lines read so far).

    RSS summed over processes counts a shared page (Ray's object store, shared libraries) once per process
    that maps it; every ``pss_every``-th sample also sums PSS (each shared page split among its mappers),
    the tree's share of the machine's memory, which costs more to read (every process's smaps)."""

    def __init__(self, pid: int, interval_s: float = 0.5, pss_every: int = 10):
        self.pid, self.interval_s, self.pss_every = pid, interval_s, pss_every
        self.stage: str | None = None
        self.peak, self.by_stage, self.kinds_at_peak = 0, {}, {}
        self.peak_pss, self.pss_by_stage, self._n = 0, {}, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self, pss: bool = False) -> tuple[int, dict[str, int]]:
        """(bytes summed over the tree, bytes per process kind: :func:`process_kind`)."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0, {}
        total, kinds = 0, {}
        for p in procs:
            try:
                b = p.memory_full_info().pss if pss else p.memory_info().rss
                kind = process_kind(p)
            except (psutil.Error, AttributeError):
                continue
            total += b
            kinds[kind] = kinds.get(kind, 0) + b
        return total, kinds

    def note(self, stage: str | None = None) -> None:
        """One sample now, counted for ``stage`` (or the current one): a stage shorter than the interval
        still gets its figure. At a stage's new peak its RSS per process kind is kept (``kinds_at_peak``)."""
        (rss, kinds), stage = self._sample(), stage or self.stage
        self.peak = max(self.peak, rss)
        if stage and rss > self.by_stage.get(stage, -1):
            self.by_stage[stage] = rss
            self.kinds_at_peak[stage] = kinds
        self._n += 1
        if self._n % self.pss_every == 1:
            pss = self._sample(pss=True)[0]
            self.peak_pss = max(self.peak_pss, pss)
            if stage:
                self.pss_by_stage[stage] = max(self.pss_by_stage.get(stage, 0), pss)

    def _run(self):
        while not self._stop.is_set():
            self.note()
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_pipeline(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd``, echo its log to ``log_path``; wall, peak RSS and per-stage figures."""
    stages: dict[str, dict] = {}
    t0 = time.perf_counter()
    with log_path.open("w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     text=True, cwd=ROOT) as p, StageRSS(p.pid) as mem:
        for line in p.stdout:
            log.write(line)
            if m := _START.search(line):
                mem.stage = m.group(1)
                stages.setdefault(m.group(1), {})
                mem.note()
            elif m := _DONE.search(line):
                stages.setdefault(m.group(1), {})["seconds"] = float(m.group(2)) if m.group(2) else 0.0
                mem.note(m.group(1))
                mem.stage = None
        rc = p.wait()
    wall = time.perf_counter() - t0
    for name, d in stages.items():
        d["peak_gib"] = mem.by_stage.get(name, 0) / 2**30
        if name in mem.pss_by_stage:
            d["peak_pss_gib"] = mem.pss_by_stage[name] / 2**30
        kinds = sorted(mem.kinds_at_peak.get(name, {}).items(), key=lambda kv: -kv[1])
        d["rss_gib_at_peak_by_process"] = {k: round(v / 2**30, 2) for k, v in kinds}
    return {"returncode": rc, "wall_s": wall, "peak_gib": mem.peak / 2**30, "peak_pss_gib": mem.peak_pss / 2**30,
            "stages": stages}


def top_processes(stage: dict, n: int = 4) -> str | None:
    """``at the peak: java 1.41 GiB, ...``: a stage's ``n`` largest kinds of process at its peak."""
    top = list(stage.get("rss_gib_at_peak_by_process", {}).items())[:n]
    return "at the peak: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in top) if top else None


def stage_rows(stages: dict) -> list[dict]:
    """Per stage: wall, peak RSS (its spread: the largest kinds of process at that peak) and peak PSS."""
    rows = []
    for name, d in stages.items():
        rows.append(row(f"make run/{name}", "wall", d.get("seconds", 0.0), "s"))
        rows.append(row(f"make run/{name}", "peak_rss", d["peak_gib"], "GiB", spread=top_processes(d)))
        if "peak_pss_gib" in d:
            rows.append(row(f"make run/{name}", "peak_pss", d["peak_pss_gib"], "GiB", spread="sampled every 5 s"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="dev")
    ap.add_argument("--dataset", default="data/amazon_office_2014")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value")
    ap.add_argument("--keep", type=Path, default=None, help="keep the lake (and the run's log) in this folder")
    args = ap.parse_args()
    slim = Path(sys.executable).parent / "slim"
    work = args.keep or Path(tempfile.mkdtemp(prefix="slimrec-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    cmd = [str(slim), "run", "--dataset", str(ROOT / args.dataset), "--lake", str(work / "lake"),
           "--profile", args.profile]
    for s in args.sets:
        cmd += ["--set", s]
    print("running:", " ".join(cmd), flush=True)
    try:
        res = run_pipeline(cmd, work / "run.log")
        if res["returncode"] != 0:
            tail = (work / "run.log").read_text().splitlines()[-20:]
            print("\n".join(tail), file=sys.stderr)
            print(f"error: the run exited {res['returncode']}", file=sys.stderr)
            return 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = [row("make run (whole)", "wall", res["wall_s"], "s"),
            row("make run (whole)", "peak_rss", res["peak_gib"], "GiB",
                spread="process tree: slim, Spark JVM, Ray daemons and workers"),
            row("make run (whole)", "peak_pss", res["peak_pss_gib"], "GiB", spread="sampled every 5 s"),
            *stage_rows(res["stages"])]
    for name, d in res["stages"].items():
        pss = f"{d['peak_pss_gib']:.2f} GiB" if "peak_pss_gib" in d else "not sampled"
        print(f"{name:<22} {d.get('seconds', 0.0):>8.1f} s  peak RSS {d['peak_gib']:.2f} GiB  PSS {pss}")
        print(f"{'':<22} {top_processes(d) or 'at the peak: no process sampled'}")
    print(f"{'whole run':<22} {res['wall_s']:>8.1f} s  peak RSS {res['peak_gib']:.2f} GiB  PSS {res['peak_pss_gib']:.2f} GiB")
    record("pipeline", rows, {"profile": args.profile, "dataset": args.dataset, "sets": args.sets,
                              "stages": res["stages"], "goal": "under 10 minutes and 6 GiB (issues 24 and 27)"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
