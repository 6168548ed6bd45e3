"""Reliability harness: ``slim run`` as a subprocess, SIGKILLed when a chosen log line appears.

A *run* is ``slim run`` over the stages under test (several ``--from/--to``
commands when a stage in between is not built yet). Figures the tests record
(runs killed, tables compared, differences found) are printed at the end of
the session by ``conftest.py``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))

from clusterkit import REPO, RUN_DATE, VENV_BIN, Procs, project_env  # noqa: E402
from slimrec.lake import Lake  # noqa: E402
from slimrec.pipeline import STAGES  # noqa: E402

# The stages killed by default: every Spark stage, the teacher (batched commits) and a Ray stage.
# SLIMREC_RELIABILITY_ALL=1 adds every other stage that exists (student, recommender: minutes each).
DEFAULT_STAGES = ["ingest", "build_sequences", "build_prompts", "teacher_rationales", "embed"]
EXISTING = [s for s in STAGES if importlib.util.find_spec(f"slimrec.stages.{s}") is not None]
UNDER_TEST = EXISTING if os.environ.get("SLIMREC_RELIABILITY_ALL") else [s for s in EXISTING if s in DEFAULT_STAGES]
# Same config for every run (the config hash is part of each commit): teacher answers in 10 commits of 5.
# embed on its Ray actor pool whatever the size: a kill while actors encode is the case that can leave
# processes behind (the in-process path, the default for few texts, dies with the driver)
SETTINGS = ["teacher.commit_batch_size=5", "teacher.commit_interval_s=60", "embed.pool_min_texts=0"]

REL_USERS = 80  # users of the bundled data in the reliability runs
FIGURES: list[tuple[str, dict]] = []


def segments(stages: list[str]) -> list[tuple[str, str]]:
    """Contiguous runs of ``stages`` in pipeline order: ``[(from, to), ...]``."""
    out: list[list[str]] = []
    for s in stages:
        if out and STAGES.index(s) == STAGES.index(out[-1][-1]) + 1:
            out[-1].append(s)
        else:
            out.append([s])
    return [(seg[0], seg[-1]) for seg in out]


@dataclass
class Kill:
    """SIGKILL the run once ``stage`` has started and a stderr line matched ``trigger``.

    With ``until`` (a check polled every 50 ms: ``until(driver_process, pipeline) -> bool``) the kill
    comes when it holds, or ``delay_s`` after the trigger at the latest; without, ``delay_s`` after it.
    """

    stage: str
    trigger: str
    delay_s: float = 0.0
    until: Callable[[psutil.Process, Pipeline], bool] | None = None
    what: str = ""  # where the kill lands, in words (for the figures)


def files_appear(table: str) -> Callable[[psutil.Process, Pipeline], bool]:
    """True once a new Parquet file shows up in ``table``'s folder: executors are writing, nothing committed."""
    seen: dict[str, int] = {}

    def check(_proc, pipe) -> bool:
        n = len(list((pipe.lake / table).rglob("*.parquet"))) if (pipe.lake / table).exists() else 0
        first = seen.setdefault("n", n)
        return n > first

    return check


def process_appears(needle: str) -> Callable[[psutil.Process, Pipeline], bool]:
    """True once a process of the run has ``needle`` in its command line (a Ray actor, say)."""

    def check(proc, _pipe) -> bool:
        for c in proc.children(recursive=True):
            try:
                if needle in " ".join(c.cmdline()):
                    return True
            except psutil.Error:
                continue
        return False

    return check


@dataclass
class RunResult:
    rc: int | None
    killed: bool = False
    kill_after_stage_start_s: float | None = None
    # The killed stage had finished before the kill: its gate passed and its stage record was stored.
    # ("stage X: done" is logged before the gate, so that line alone does not say the stage finished.)
    stage_done_before_kill: bool = False
    survivors: list[str] = field(default_factory=list)  # the run's processes alive 5 s after the driver was killed
    stages_done: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    output: str = ""


class Pipeline:
    """Runs ``slim run`` on one lake with an isolated local Ray (``RAY_TMPDIR``) and a log file."""

    def __init__(self, dataset: Path, lake: Path, workdir: Path, procs: Procs):
        self.dataset, self.lake, self.workdir, self.procs = dataset, lake, workdir, procs
        self.env = project_env(
            RAY_TMPDIR=str(workdir),
            # The marker in the Spark driver JVM's command line, so a leftover JVM is found by it.
            PYSPARK_SUBMIT_ARGS=f"--driver-java-options -Dslimrec.test.dir={workdir} pyspark-shell",
        )
        self.log = workdir / "runs.log"

    def commands(self) -> list[list[str]]:
        return [[str(VENV_BIN / "slim"), "run", "--dataset", str(self.dataset), "--lake", str(self.lake),
                 "--profile", "tiny", "--run-date", RUN_DATE.isoformat(), "--from", a, "--to", b,
                 "--report-dir", str(self.workdir / "reports"), *[x for s in SETTINGS for x in ("--set", s)]]
                for a, b in segments(UNDER_TEST)]

    def run(self, kill: Kill | None = None, timeout_s: float = 1500) -> RunResult:
        res = RunResult(rc=0)
        lines: list[str] = []
        for cmd in self.commands():
            rc = self._one(cmd, kill, res, lines, timeout_s)
            res.rc = rc
            if res.killed or rc != 0:
                break
        res.output = "".join(lines)
        return res

    def _kill_when(self, kill: Kill, p: subprocess.Popen, do_kill) -> None:
        end = time.monotonic() + kill.delay_s
        try:
            proc = psutil.Process(p.pid)
        except psutil.Error:
            return
        while p.poll() is None and time.monotonic() < end:
            try:
                if kill.until is not None and kill.until(proc, self):
                    break
            except psutil.Error:
                pass
            time.sleep(0.05)
        do_kill()

    def _one(self, cmd: list[str], kill: Kill | None, res: RunResult, lines: list[str], timeout_s: float) -> int:
        # The record the pipeline stores once a stage passed its gate (it holds the run id), or None.
        record_before = Lake(self.lake).stage_record(kill.stage) if kill else None
        with open(self.log, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=self.env,
                             cwd=REPO, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.add(p.pid)
        started: dict[str, float] = {}
        timer: threading.Thread | None = None
        deadline = time.monotonic() + timeout_s

        def do_kill():
            if p.poll() is not None:
                return
            tree = []
            try:
                tree = psutil.Process(p.pid).children(recursive=True)
            except psutil.Error:
                pass
            self.procs.add(*tree)
            res.killed = True
            res.kill_after_stage_start_s = round(time.monotonic() - started.get(kill.stage, time.monotonic()), 1)
            os.kill(p.pid, signal.SIGKILL)
            _, alive = psutil.wait_procs(tree, timeout=5)
            for a in alive:
                try:
                    res.survivors.append(a.name())
                except psutil.Error:
                    pass

        with open(self.log, "a") as f:
            for line in p.stderr:
                f.write(line)
                f.flush()
                lines.append(line)
                m = re.search(r"stage (\w+): (start|done in ([\d.]+)s)", line)
                if m and m.group(2) == "start":
                    started[m.group(1)] = time.monotonic()
                elif m:
                    res.stages_done.append(m.group(1))
                    res.stage_seconds[m.group(1)] = float(m.group(3))
                if kill and timer is None and kill.stage in started and re.search(kill.trigger, line):
                    timer = threading.Thread(target=self._kill_when, args=(kill, p, do_kill), daemon=True)
                    timer.start()
                if time.monotonic() > deadline:
                    p.kill()
                    raise TimeoutError(f"{' '.join(cmd)} ran past {timeout_s}s; log in {self.log}")
        rc = p.wait()
        if timer is not None:
            timer.join()
        if res.killed:
            # The record is written after the stage's gate: a new one means the kill came after the stage.
            res.stage_done_before_kill = Lake(self.lake).stage_record(kill.stage) != record_before
        # Whatever the dead driver left (Spark JVM, local Ray daemons) goes now, by pid.
        self.procs.stop(grace_s=5, final=False)
        return rc


