"""Fixtures for the real-cluster tests: a tiny lake prepared in-process, short unique temp dirs."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from clusterkit import run_stages_here  # noqa: E402


@pytest.fixture(scope="session")
def ingested_lake(spark, tiny_dataset, tmp_path_factory) -> Path:
    """A lake holding what ingest wrote from the 150-user data set (do not modify: copy it)."""
    d = tmp_path_factory.mktemp("ingested") / "lake"
    run_stages_here(spark, d, ["ingest"], dataset=tiny_dataset)
    return d


@pytest.fixture(scope="session")
def prompted_lake(spark, ingested_lake, tmp_path_factory) -> Path:
    """``ingested_lake`` plus build_sequences and build_prompts, run locally (do not modify: copy it)."""
    d = tmp_path_factory.mktemp("prompted") / "lake"
    shutil.copytree(ingested_lake, d)
    run_stages_here(spark, d, ["build_sequences", "build_prompts"])
    return d


@pytest.fixture
def short_tmp():
    """A short, unique temp dir (Ray's unix sockets must fit in 107 characters); also the process marker."""
    d = Path(tempfile.mkdtemp(prefix="slimc-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
