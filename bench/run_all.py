"""``make bench``: run every stage's benchmark, print one table, keep the JSON.

    python -m bench.run_all [--only foundation,teacher] [--quick]

Each benchmark runs in its own process (its own Spark/Ray) and writes
``bench/results/<name>.json`` through :func:`bench.common.record`; this
harness merges them into ``bench/results/all-<commit>.json`` and regenerates
``docs/benchmarks.md`` from the latest result of every benchmark (:mod:`bench.docs`). Figures are
ratios against baselines measured in the same run; nothing is asserted.
``bench.recbole`` runs only where RecBole's own environment exists (``bash bench/recbole_env.sh``);
elsewhere it is skipped with a message, not counted as failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench.common import RESULTS, format_rows, git_commit
from bench.docs import write_benchmarks_md

BENCHES = ["foundation", "scale", "object_store", "teacher", "student", "grammar", "embed", "recommender", "recbole",
           "pipeline"]


def skip_reason(name: str) -> str | None:
    """Why ``name`` cannot run on this machine (None: it can). bench.recbole needs RecBole's own virtual
    environment, which ``make bench`` does not build."""
    if name == "recbole":
        from bench.recbole import VENV, venv_python

        if venv_python() is None:
            return f"RecBole's environment {VENV.name} is missing: `bash bench/recbole_env.sh` builds it"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated subset of " + ", ".join(BENCHES))
    ap.add_argument("--quick", action="store_true", help="pass --quick to benchmarks that support it")
    args = ap.parse_args()
    names = [n for n in (args.only.split(",") if args.only else BENCHES) if n]
    rows, failed, skipped = [], [], []
    for name in names:
        why = skip_reason(name)
        if why:
            print(f"== bench.{name}: skipped: {why}", flush=True)
            skipped.append(f"{name} ({why})")
            continue
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", f"bench.{name}"] + (["--quick"] if args.quick else [])
        print(f"== bench.{name}: {' '.join(cmd)}", flush=True)
        rc = subprocess.run(cmd).returncode
        path = RESULTS / f"{name}.json"
        if rc != 0 or not path.exists():
            failed.append(f"{name} (exit {rc})")
            continue
        data = json.loads(path.read_text())
        rows += data["rows"]
        print(f"== bench.{name}: {time.perf_counter() - t0:.0f}s", flush=True)
    print("\n" + format_rows(rows))
    out = RESULTS / f"all-{git_commit()}.json"
    out.write_text(json.dumps({"commit": git_commit(), "rows": rows, "failed": failed, "skipped": skipped},
                              indent=2, default=str))
    print(f"-> {out}")
    if rows:
        print(f"-> {write_benchmarks_md()}")
    if skipped:
        print("benchmarks skipped: " + "; ".join(skipped), file=sys.stderr)
    if failed:
        print("benchmarks that failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
