"""What every benchmark reports, and where.

Each ``bench/<name>.py`` ends with ``record(name, rows)``: rows are dicts with
``case`` (what ran), ``metric``, ``value``, ``unit`` and, where a baseline was
measured in the same run, ``baseline`` (its name), ``baseline_value`` and
``ratio`` (value / baseline_value). ``record`` prints them and writes
``bench/results/<name>.json``; ``python -m bench.run_all`` (``make bench``)
runs every benchmark, prints one table and regenerates ``docs/benchmarks.md``
(:mod:`bench.docs`). Benchmarks never assert times.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """This checkout's short commit; ``SLIMREC_BENCH_COMMIT`` where the code runs from an export of one
    (``git archive``, no ``.git``); ``unknown`` otherwise."""
    if os.environ.get("SLIMREC_BENCH_COMMIT"):
        return os.environ["SLIMREC_BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "unknown"


def row(case: str, metric: str, value: float, unit: str, baseline: str | None = None,
        baseline_value: float | None = None, spread: str | None = None) -> dict:
    """One figure; ``spread`` says how much it moved over repeats where they were measured (e.g. "± 0.03 s
    std over 5 runs"), shown in docs/benchmarks.md."""
    ratio = (value / baseline_value) if baseline_value not in (None, 0) else None
    return {"case": case, "metric": metric, "value": value, "unit": unit, "baseline": baseline,
            "baseline_value": baseline_value, "ratio": ratio, "spread": spread}


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'bench':<12} {'case':<34} {'metric':<24} {'value':>12} {'unit':<10} {'baseline':<22} {'ratio':>7}"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else ""
        lines.append(f"{r.get('bench', ''):<12} {r['case'][:34]:<34} {r['metric'][:24]:<24} {r['value']:>12.4g} "
                     f"{r['unit'][:10]:<10} {(r.get('baseline') or '')[:22]:<22} {ratio:>7}")
    return "\n".join(lines)


def record(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r["bench"] = name
    payload = {"bench": name, "commit": git_commit(), "machine": f"{platform.node()} {os.cpu_count()} cpus",
               "command": shlex.join(["python", "-m", f"bench.{name}", *sys.argv[1:]]),
               "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows, "extra": extra or {}}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(format_rows(rows))
    print(f"-> {path}")
    return path


class PeakRSS:
    """Peak resident memory (bytes) of this process and all its children (Spark JVM, Ray workers), sampled."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()

    def _sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._sample())

    @property
    def gib(self) -> float:
        return self.peak / 2**30
