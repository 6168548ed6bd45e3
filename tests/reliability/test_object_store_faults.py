"""Faults of an object-store lake (a real S3 server, SeaweedFS on 127.0.0.1, owned by the test session).

* The server stops while ``slim stage build_prompts`` runs in a subprocess (once its executors have
  written Parquet files under the table, when the timing allows), then starts again on the same data,
  then the stage is rerun: no half-written version is ever visible, the failed run ends on one
  ``error:`` line, and the rerun's table equals a clean run's.
* Two ``slim stage build_prompts`` at once on the same lake: both finish, or one fails with a
  clear error; the table is whole either way.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from slimrec.cli import app
from slimrec.lake import Lake
from slimrec.storage import filesystem
from typer.testing import CliRunner

pytestmark = [pytest.mark.slow]

SLIM = str(Path(sys.executable).parent / "slim")
REPO = Path(__file__).resolve().parents[2]


def slim_here(*args) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, f"slim {' '.join(map(str, args))} -> {r.exit_code}\n{r.output[-3000:]}\n{r.exception!r}"
    return r.output


def prompts_of(lake: Lake) -> list[tuple]:
    t = lake.read_arrow("prompts", columns=["user_id", "prompt_hash", "teacher_prompt", "student_prompt"])
    return sorted(tuple(r.values()) for r in t.to_pylist())


def parquet_files(uri: str) -> int:
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError:
        return 0
    return sum(1 for i in infos if i.path.endswith(".parquet") and "/_delta_log/" not in i.path)


@pytest.fixture(scope="module")
def lakes(s3_server, tiny_dataset, spark, ray_local, tmp_path_factory):
    """Two S3 lakes built up to build_sequences in this process; the first also gets a clean build_prompts."""
    tmp = tmp_path_factory.mktemp("s3faults")
    out = {}
    for name in ("clean", "faulty"):
        uri = f"s3://{s3_server.bucket}/faults-{uuid.uuid4().hex[:8]}/{name}"
        sets = ["--set", f"lake.local_dir={tmp / name}"]
        slim_here("run", "--dataset", tiny_dataset, "--lake", uri, "--profile", "tiny", "--to", "build_sequences",
                  "--run-date", "2024-01-31", "--report-dir", tmp / f"{name}-report", *sets)
        out[name] = (uri, sets)
    slim_here("stage", "build_prompts", "--lake", out["clean"][0], "--profile", "tiny", "--run-date", "2024-01-31",
              *out["clean"][1])
    return out


def _stage(uri: str, sets: list[str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([SLIM, "stage", "build_prompts", "--lake", uri, "--profile", "tiny",
                             "--run-date", "2024-01-31", *sets, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=os.environ | {"RAY_TMPDIR": "/tmp"}, start_new_session=True)


def test_server_stopped_mid_stage_then_restarted_then_rerun(lakes, s3_server):
    uri, sets = lakes["faulty"]
    lake = Lake(uri)
    users = lake.count("user_sequences")
    p = _stage(uri, sets)
    lines: list[str] = []
    started = threading.Event()

    def pump():
        for line in p.stdout:
            lines.append(line)
            if "stage build_prompts: start" in line:
                started.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    assert started.wait(180), "".join(lines[-50:])
    # stop the server once executors have written files under prompts/ (or after 30 s: the stage is running)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and parquet_files(lake.path("prompts")) == 0 and p.poll() is None:
        time.sleep(0.05)
    files_at_stop = parquet_files(lake.path("prompts"))
    s3_server.stop()
    try:
        rc = p.wait(timeout=420)
    finally:
        if p.poll() is None:
            p.kill()
        s3_server.start()
    reader.join(10)
    out = "".join(lines)
    Path(os.environ.get("SLIMREC_FAULT_LOG", "/dev/null")).write_text(out)
    if rc != 0:  # the usual outcome: the run ends on one readable line, the traceback in a file
        # (Spark's own log lines about the failed tasks come before it, as for any executor failure)
        tail = [x for x in out.strip().splitlines() if x.strip()][-1]
        assert tail.startswith("error:") and "traceback in" in tail, out[-3000:]
    # what a reader sees now: no prompts table, or a whole one
    if lake.exists("prompts"):
        assert lake.count("prompts") == users
    slim_here("stage", "build_prompts", "--lake", uri, "--profile", "tiny", "--run-date", "2024-01-31", *sets)
    assert prompts_of(lake) == prompts_of(Lake(lakes["clean"][0]))
    print(f"\ns3 fault: parquet files under prompts/ at the stop {files_at_stop}, failed run rc {rc}: "
          f"{out.strip().splitlines()[-1] if out.strip() else ''}")


def test_two_concurrent_build_prompts_on_one_s3_lake(lakes):
    uri, sets = lakes["clean"]
    lake = Lake(uri)
    want, users, v_before = prompts_of(lake), lake.count("user_sequences"), lake.version("prompts")
    procs = [_stage(uri, sets) for _ in range(2)]  # `slim stage` always runs (no skip)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    rcs = [p.returncode for p in procs]
    Path(os.environ.get("SLIMREC_FAULT_LOG", "/dev/null")).write_text("\n=====\n".join(outs))
    for rc, out in zip(rcs, outs, strict=True):
        if rc != 0:
            last = [x for x in out.strip().splitlines() if x.strip()][-1]
            assert rc == 2 and re.match(r"error: .*(another writer|lake lock)", last), out[-3000:]
    assert 0 in rcs, outs
    assert lake.version("prompts") == v_before + rcs.count(0)
    assert lake.count("prompts") == users
    assert prompts_of(lake) == want
    print(f"\ns3 concurrent build_prompts: exit codes {rcs}")
