"""Helpers for tests that start real processes: ports, environments, shutdown by pid, lake comparison.

Used by ``tests/cluster`` (Spark standalone, Ray head + worker) and
``tests/reliability`` (SIGKILLed ``slim run``). Every process a test starts
is stopped by pid: the ones it started, their descendants, and any process
whose command line holds the test's own unique temp dir. Nothing is stopped
by name, so other people's Spark and Ray on the same machine are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PYSPARK_HOME = Path(__import__("pyspark").__file__).parent
RUN_DATE = date(2024, 1, 15)


def cut_dataset(dst: Path, n_users: int, src: Path = REPO / "data" / "amazon_office_2014") -> Path:
    """The first ``n_users`` users of the bundled LC-Rec data and only their items, as an LC-Rec folder."""
    inter = json.loads((src / "Office.inter.json").read_text())
    items = json.loads((src / "Office.item.json").read_text())
    users = dict(list(inter.items())[:n_users])
    keep = {str(i) for seq in users.values() for i in seq}
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "Tiny.inter.json").write_text(json.dumps(users))
    (dst / "Tiny.item.json").write_text(json.dumps({k: v for k, v in items.items() if k in keep}))
    return dst


def run_stages_here(spark, lake_dir: Path, names: list[str], dataset: Path | None = None,
                    overrides: tuple[str, ...] = ()) -> None:
    """Run stages in this process on the session's local Spark (no quality gate), like ``slim stage``."""
    from slimrec.config import load_config
    from slimrec.lake import Lake
    from slimrec.pipeline import run_stage
    from slimrec.stages.base import StageContext

    ctx = StageContext(cfg=load_config("tiny", None, list(overrides)), lake=Lake(lake_dir), run_date=RUN_DATE,
                       dataset_dir=str(dataset) if dataset else None, _spark=spark)
    for name in names:
        run_stage(name, ctx, check=False)


# ---------------------------------------------------------------------------------------------- ports, env
def free_port(avoid: range | None = None) -> int:
    """A TCP port free right now on 127.0.0.1 (outside ``avoid``)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if avoid is None or port not in avoid:
            return port
    raise RuntimeError("no free port found")


def free_ports(n: int, avoid: range | None = None) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        p = free_port(avoid)
        if p not in out:
            out.append(p)
    return out


def project_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: this venv first on PATH, offline models, local-test Ray settings."""
    env = dict(os.environ)
    env.pop("PYSPARK_GATEWAY_PORT", None)
    env.pop("PYSPARK_GATEWAY_SECRET", None)
    env.pop("RAY_ADDRESS", None)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_HOME=str(PYSPARK_HOME),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DEDUP_LOGS="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll ``predicate()`` until it returns a truthy value; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            got = predicate()
            if got:
                return got
        except Exception as e:  # noqa: BLE001 - a service that is still starting raises; keep polling
            last_exc = e
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


def http_json(url: str, timeout_s: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - 127.0.0.1 only
        return json.loads(r.read().decode())


# ---------------------------------------------------------------------------------------------- processes
# Run apart from the test: when the test process dies without its teardown (killed by `timeout`, a
# SIGKILL, a crash), stop every process whose command line holds one of the markers, then remove the
# given folders. Its settings come in an environment variable, so its own command line holds no marker.
_WATCHDOG = """
import json, os, shutil, signal, sys, time
import psutil
cfg = json.loads(os.environ["SLIMREC_TEST_WATCHDOG"])
try:
    owner = psutil.Process(cfg["pid"])
    while owner.is_running() and owner.create_time() == cfg["created"]:
        time.sleep(2)
except psutil.Error:
    pass
me = os.getpid()
left = []
for p in psutil.process_iter(["cmdline"]):
    try:
        cmd = " ".join(p.info["cmdline"] or [])
    except psutil.Error:
        continue
    if p.pid != me and any(m in cmd for m in cfg["markers"]):
        left.append(p)
for p in left:
    try:
        p.terminate()
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(left, timeout=10)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
for d in cfg["remove"]:
    shutil.rmtree(d, ignore_errors=True)
"""


@dataclass
class Procs:
    """Processes one test started, stopped by pid.

    ``markers``: strings unique to this test (its temp dir, a port of its own); any process whose
    command line holds one is ours too (daemons that ``ray start`` or a Spark worker forked and
    re-parented). :meth:`watch` starts a watchdog that does the same cleanup if the test process
    dies before :meth:`stop` (``final=True``) runs.
    """

    markers: tuple[str, ...]
    started: list[subprocess.Popen] = field(default_factory=list)
    # Every process seen as ours, kept as psutil objects: they remember their start time, so a pid the
    # OS has since given to someone else's process is never signalled.
    seen: dict[int, psutil.Process] = field(default_factory=dict)
    watchdog: subprocess.Popen | None = None

    def watch(self, remove: tuple[Path, ...] = ()) -> None:
        me = psutil.Process()
        cfg = {"pid": me.pid, "created": me.create_time(), "markers": [m for m in self.markers if m],
               "remove": [str(d) for d in remove]}
        env = dict(os.environ, SLIMREC_TEST_WATCHDOG=json.dumps(cfg))
        self.watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG], env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)

    def add(self, *procs: psutil.Process | int) -> None:
        for p in procs:
            try:
                p = p if isinstance(p, psutil.Process) else psutil.Process(p)
                old = self.seen.get(p.pid)
                if old is None or not old.is_running():
                    self.seen[p.pid] = p
            except psutil.Error:
                continue

    def popen(self, args: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        fh = open(log, "ab")
        p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd or REPO,
                             stdin=subprocess.DEVNULL)
        fh.close()
        self.started.append(p)
        self.add(p.pid)
        return p

    def ours(self) -> list[psutil.Process]:
        """Live processes that are ours: started here, their descendants, or carrying a marker."""
        found: dict[int, psutil.Process] = {}
        for proc in list(self.seen.values()):
            try:
                if not proc.is_running():  # gone, or its pid now belongs to another process
                    continue
                found[proc.pid] = proc
                for c in proc.children(recursive=True):
                    found[c.pid] = c
            except psutil.Error:
                continue
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(proc.info["cmdline"] or [])
            except psutil.Error:
                continue
            if any(m and m in cmd for m in self.markers):
                found[proc.pid] = proc
        found.pop(os.getpid(), None)
        if self.watchdog is not None:
            found.pop(self.watchdog.pid, None)
        self.add(*found.values())
        return list(found.values())

    def stop(self, grace_s: float = 10.0, final: bool = True) -> int:
        """SIGTERM every process of ours, then SIGKILL what is left after ``grace_s``; return how many were live.

        ``final``: the test is done with these processes; the watchdog goes too.
        """
        procs = self.ours()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        for p in self.started:
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        # Daemons re-parented to init after their parent died: found by the marker only.
        late = self.ours()
        for p in late:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(late, timeout=5)
        if final and self.watchdog is not None:
            self.watchdog.terminate()
            self.watchdog.wait(timeout=10)
            self.watchdog = None
        return len(procs)


def run(args: list[str], env: dict[str, str], timeout_s: float, cwd: Path | None = None,
        log: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion (output captured, and copied to ``log`` when given)."""
    r = subprocess.run(args, env=env, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout_s,
                       stdin=subprocess.DEVNULL)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(args)}\n--- exit {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}\n")
    return r


# ---------------------------------------------------------------------------------------------- lake comparison
# Columns that legitimately differ between two correct runs: lineage versions (a killed run's
# commits shift later versions), wall-clock times and durations, run ids.
VOLATILE = {"input_versions", "latency_ms", "answered_ts", "created_ts", "started_ts", "finished_ts",
            "validated_ts", "run_id", "validation_id", "table_version", "adapter_path"}
# Tables filled by model training or sampling whose values may differ run to run: keys and counts only.
KEYS_ONLY = {"student_models", "student_rationales", "recommender_runs", "metrics", "recommendations"}
# Append-only logs keyed by run or validation ids: checked separately (see validated_tables).
LOGS = {"dq_results"}


def _norm(v):
    if isinstance(v, np.ndarray):
        return tuple(_norm(x) for x in v.tolist())
    if isinstance(v, list | tuple):
        return tuple(_norm(x) for x in v)
    if isinstance(v, float) and v != v:
        return None
    if v is pd.NaT:
        return None
    return v


def read_table(lake, table: str) -> pd.DataFrame:
    return lake.read_arrow(table).to_pandas()


def key_of(spec, across_runs: bool = True) -> list[str]:
    """The table's key; ``across_runs`` drops run and validation ids, which differ between two runs."""
    return [k for k in spec.key if not (across_runs and k in ("run_id", "validation_id"))]


def duplicate_keys(df: pd.DataFrame, key: list[str]) -> int:
    if df.empty or not key:
        return 0
    k = df[key].map(_norm) if hasattr(df[key], "map") else df[key]
    return int(k.duplicated().sum())


def compare_table(table: str, clean: pd.DataFrame, other: pd.DataFrame, atol: float = 1e-4) -> list[str]:
    """Differences between a clean run's table and another run's: counts, keys, duplicates, content."""
    from slimrec.schemas.tables import spec

    s = spec(table)
    key = key_of(s)
    diffs: list[str] = []
    if len(clean) != len(other):
        diffs.append(f"{table}: {len(other)} rows, clean run has {len(clean)}")
    for name, df in (("clean", clean), ("other", other)):
        d = duplicate_keys(df, list(s.key))
        if d:
            diffs.append(f"{table}: {d} duplicate keys {key} in the {name} run")
    ck = set(map(tuple, clean[key].map(_norm).values.tolist())) if len(clean) else set()
    ok = set(map(tuple, other[key].map(_norm).values.tolist())) if len(other) else set()
    if ck - ok:
        diffs.append(f"{table}: {len(ck - ok)} keys missing, e.g. {sorted(ck - ok)[:2]}")
    if ok - ck:
        diffs.append(f"{table}: {len(ok - ck)} extra keys, e.g. {sorted(ok - ck)[:2]}")
    if diffs or table in KEYS_ONLY:
        return diffs
    cols = [c for c in s.column_names if c not in VOLATILE and c not in key]
    a = clean.sort_values(key).reset_index(drop=True)
    b = other.sort_values(key).reset_index(drop=True)
    for c in cols:
        x, y = a[c].map(_norm), b[c].map(_norm)
        if c == "embedding":
            bad = sum(not np.allclose(np.asarray(u, dtype=float), np.asarray(v, dtype=float), atol=atol)
                      for u, v in zip(x, y, strict=True))
        elif pd.api.types.is_float_dtype(a[c]):
            bad = int((~np.isclose(a[c].to_numpy(float), b[c].to_numpy(float), atol=atol, equal_nan=True)).sum())
        else:
            bad = int(sum(u != v for u, v in zip(x, y, strict=True)))
        if bad:
            diffs.append(f"{table}.{c}: {bad} rows differ")
    return diffs


def compare_lakes(clean_lake, other_lake, tables: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(tables compared, differences) over every table either lake holds (logs excluded)."""
    from slimrec.schemas.tables import TABLES

    names = tables or [t for t in TABLES if (clean_lake.exists(t) or other_lake.exists(t)) and t not in LOGS]
    diffs: list[str] = []
    for t in names:
        if clean_lake.exists(t) != other_lake.exists(t):
            diffs.append(f"{t}: exists in the clean run: {clean_lake.exists(t)}, in the other: {other_lake.exists(t)}")
            continue
        diffs += compare_table(t, read_table(clean_lake, t), read_table(other_lake, t))
    return names, diffs


def validated_tables(lake) -> dict[str, bool]:
    """For every table the quality gate validated: did its *current* Delta version pass a suite?

    (A table committed by a run that was killed before its gate, then skipped by the rerun, would be
    read by later stages without ever being validated.)
    """
    if not lake.exists("dq_results"):
        return {}
    dq = lake.read_pandas("dq_results", columns=["table_name", "table_version", "suite_success"])
    out = {}
    for t, g in dq.groupby("table_name"):
        if not lake.exists(t):
            continue
        cur = lake.version(t)
        out[t] = bool(g[(g["table_version"] == cur) & g["suite_success"]].shape[0] > 0)
    return out


def visible_state(lake) -> dict[str, dict]:
    """What readers see now, per table: delta-rs rows, DuckDB rows, duplicate keys, files on disk no version lists."""
    from slimrec.lake import duckdb_connection
    from slimrec.schemas.tables import TABLES

    con = duckdb_connection()
    out = {}
    for t, s in TABLES.items():
        if not lake.exists(t):
            continue
        df = read_table(lake, t)
        duck = con.sql(f"SELECT count(*) FROM delta_scan('{lake.path(t)}')").fetchone()[0]
        # Files no version references: written by a killed run, never committed (readers skip them).
        referenced = {Path(u.replace("file://", "")).resolve()
                      for v in range(lake.version(t) + 1) for u in lake.file_uris(t, v)}
        on_disk = {p.resolve() for p in Path(lake.path(t)).rglob("*.parquet")}
        out[t] = dict(rows=len(df), duckdb_rows=int(duck), version=lake.version(t),
                      duplicate_keys=duplicate_keys(df, list(s.key)), orphan_files=len(on_disk - referenced),
                      keys=set(map(tuple, df[key_of(s)].map(_norm).values.tolist())) if len(df) else set())
    con.close()
    return out


def place_lake(src: Path, where: str, tmp_path: Path, request) -> str:
    """A copy of the lake folder ``src`` on local disk (``where="local"``) or on the session's S3 server
    (``"s3"``: uploaded under a fresh prefix); the new lake's root."""
    if where == "local":
        shutil.copytree(src, tmp_path / "lake")
        return str(tmp_path / "lake")
    import uuid

    from slimrec.storage import upload_folder

    server = request.getfixturevalue("s3_server")
    uri = f"s3://{server.bucket}/cluster-{uuid.uuid4().hex[:8]}/lake"
    upload_folder(src, uri)
    return uri


def lake_files(root: str):
    """(path, bytes) of every file under a lake root, local or on an object store."""
    import pyarrow.fs as pafs
    from slimrec.storage import filesystem

    fs, path = filesystem(root)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                yield info.path, f.read()
