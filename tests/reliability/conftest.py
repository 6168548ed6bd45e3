"""Fixtures of the reliability tests: one clean run per session, figures printed at the end."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))

from clusterkit import cut_dataset  # noqa: E402
from killkit import FIGURES, REL_USERS, UNDER_TEST, Pipeline, Procs  # noqa: E402


@pytest.fixture(scope="session")
def rel_tmp():
    d = Path(tempfile.mkdtemp(prefix="slimr-", dir="/tmp"))
    procs = Procs(markers=(str(d),))
    procs.watch(remove=(d,))
    yield d, procs
    procs.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def rel_dataset(rel_tmp):
    """80 real users of the bundled data (fewer texts to embed: every run here is repeated)."""
    return cut_dataset(rel_tmp[0] / "dataset", REL_USERS)


@pytest.fixture(scope="session")
def clean_run(rel_dataset, rel_tmp):
    """A clean ``slim run`` of the stages under test: (lake dir, result)."""
    d, procs = rel_tmp
    (d / "clean").mkdir()
    pipe = Pipeline(rel_dataset, d / "clean" / "lake", d / "clean", procs)
    res = pipe.run()
    assert res.rc == 0, f"clean run failed (log {pipe.log}):\n{res.output[-4000:]}"
    assert res.stages_done == UNDER_TEST, res.stages_done
    return pipe.lake, res


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for name, fig in FIGURES:
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{k}={v}" for k, v in fig.items()))
