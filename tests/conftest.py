"""Session-scoped real engines on tiny data: Spark local[2], local Ray, Delta in a temp dir."""

from __future__ import annotations

import os
from datetime import date

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def spark():
    from slimrec.config import SparkConfig
    from slimrec.spark import get_spark

    s = get_spark(SparkConfig(master="local[2]", shuffle_partitions=2, app_name="slimrec-tests"))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from slimrec.rayutil import ensure_ray

    ensure_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def tmp_lake(tmp_path):
    from slimrec.lake import Lake

    return Lake(tmp_path / "lake")


@pytest.fixture
def run_date():
    return date(2024, 1, 15)
