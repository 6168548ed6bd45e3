"""Two runs for the same date on one lake at once: the second fails at once, clearly; nothing is corrupted.

Run A (``slim stage build_prompts``, rewriting the run date's prompts) holds
the lake lock while it works; run B (``slim run`` of the same date) starts
meanwhile. B must exit 2 with one line naming the lock and A's pid, before
writing anything; A must finish; afterwards every table equals the clean
run's, and delta-rs and DuckDB agree on every table.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest
from clusterkit import REPO, RUN_DATE, VENV_BIN, compare_lakes, visible_state
from killkit import FIGURES, SETTINGS, Pipeline
from slimrec.lake import Lake
from slimrec.schemas.tables import TABLES

pytestmark = [pytest.mark.slow]


def test_a_second_run_for_the_same_date_fails_clearly_and_corrupts_nothing(clean_run, rel_dataset, rel_tmp):
    clean_dir, _ = clean_run
    d, procs = rel_tmp
    work = d / "concurrent"
    work.mkdir()
    shutil.copytree(clean_dir, work / "lake")
    lake = Lake(work / "lake")
    before = {t: lake.version(t) for t in TABLES if lake.exists(t)}
    pipe = Pipeline(rel_dataset, work / "lake", work, procs)

    a = subprocess.Popen([str(VENV_BIN / "slim"), "stage", "build_prompts", "--lake", str(lake.root), "--profile",
                          "tiny", "--run-date", RUN_DATE.isoformat(), *[x for s in SETTINGS for x in ("--set", s)]],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=pipe.env, cwd=REPO,
                         stdin=subprocess.DEVNULL)
    procs.add(a.pid)
    a_err = []
    for line in a.stderr:
        a_err.append(line)
        if "stage build_prompts: start" in line:
            break
    assert a.poll() is None, "".join(a_err)[-3000:]

    t0 = time.monotonic()
    b = subprocess.run(pipe.commands()[0], capture_output=True, text=True, env=pipe.env, cwd=REPO, timeout=300,
                       stdin=subprocess.DEVNULL)
    b_seconds = round(time.monotonic() - t0, 1)
    a_still_running = a.poll() is None
    a_err += a.stderr.readlines()
    a_rc = a.wait(timeout=900)
    assert a_rc == 0, "".join(a_err)[-3000:]

    assert a_still_running, "run A finished before run B tried: the runs did not overlap"
    assert b.returncode == 2, b.stderr[-3000:]
    errors = [ln for ln in b.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and re.search(rf"another slimrec run holds the lake lock .*_locks/pipeline\.lock "
                                          rf"\(pid {a.pid} since ", errors[0]), errors
    assert "stage " not in b.stderr  # B started no stage

    after = {t: lake.version(t) for t in TABLES if lake.exists(t)}
    changed = sorted(t for t in after if after[t] != before.get(t))
    assert changed == ["dq_results", "prompts"]  # A's slice rewrite and its gate; nothing from B
    compared, diffs = compare_lakes(Lake(clean_dir), lake)
    disagree = [t for t, v in visible_state(lake).items() if v["duckdb_rows"] != v["rows"] or v["duplicate_keys"]]
    FIGURES.append(("concurrent runs", {
        "second run exit code": b.returncode, "second run failed after (s)": b_seconds,
        "tables the second run changed": 0, "tables compared": len(compared), "differences found": len(diffs),
        "tables where readers disagree": len(disagree),
    }))
    assert diffs == [] and disagree == []
