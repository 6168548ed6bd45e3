"""Session-scoped real engines on tiny data: Spark local[2], local Ray, Delta in a temp dir."""

from __future__ import annotations

import os
from datetime import date

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# The object-store tests' S3 server (fixture ``s3_server``) gets its port now, before any engine starts:
# Spark's Python workers and Ray's workers inherit the environment of the process that started them, and
# take their endpoint and credentials from it as they would on a cluster.
from slimrec.s3server import S3Server, client_env, free_ports  # noqa: E402 - after the environment above

S3_PORT = free_ports(1)[0]
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
for _k, _v in client_env(S3_ENDPOINT).items():
    os.environ.setdefault(_k, _v)


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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 (bucket ``slim``) for the whole session."""
    if os.environ.get("AWS_ENDPOINT_URL") != S3_ENDPOINT:
        pytest.fail("AWS_ENDPOINT_URL was set before the tests started: the object-store tests need their own server")
    with S3Server(tmp_path_factory.mktemp("s3"), s3_port=S3_PORT) as s3:
        yield s3


@pytest.fixture
def s3_lake(s3_server, request):
    """A fresh lake on the session's S3 server."""
    import re
    import uuid

    from slimrec.lake import Lake

    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40]
    return Lake(f"s3://{s3_server.bucket}/{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def tmp_lake(tmp_path):
    from slimrec.lake import Lake

    return Lake(tmp_path / "lake")


@pytest.fixture
def run_date():
    return date(2024, 1, 15)


def cut_lcrec(dst, n_users: int, src="data/amazon_office_2014"):
    """Write the first ``n_users`` users of the bundled LC-Rec data (and only their items) into ``dst``."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / src
    inter = json.loads((root / "Office.inter.json").read_text())
    items = json.loads((root / "Office.item.json").read_text())
    users = dict(list(inter.items())[:n_users])
    keep = {str(i) for seq in users.values() for i in seq}
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "Tiny.inter.json").write_text(json.dumps(users))
    (dst / "Tiny.item.json").write_text(json.dumps({k: v for k, v in items.items() if k in keep}))
    return dst


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """150 real users of the bundled data as an LC-Rec folder."""
    return cut_lcrec(tmp_path_factory.mktemp("tiny_dataset"), 150)
