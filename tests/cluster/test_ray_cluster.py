"""The Ray stages, unchanged, under ``ray job submit`` on a real 2-node Ray cluster on 127.0.0.1.

A head (``ray start --head``, 1 CPU, dashboard/job server on a free port) and
a worker node (``ray start --address``, 1 CPU) are started with this venv's
``bin`` first on PATH, so the job entrypoint's ``python`` is the project's.
``jobs/teacher_rationales.py`` runs the HTTP teacher against a fake
OpenAI-compatible endpoint with two actors of 1 CPU each, which forces one
actor onto each node; ``jobs/embed.py`` then encodes items and the teacher's
rationales on a Ray Data actor pool. The API key reaches the job the way a
Kubernetes secret would: as an environment variable of the Ray node
processes, never in the job submission (whose runtime_env the job API shows
to anyone).
"""

from __future__ import annotations

import json
import uuid

import pytest
from clusterkit import (
    RUN_DATE,
    VENV_BIN,
    Procs,
    free_ports,
    http_json,
    lake_files,
    place_lake,
    project_env,
    run,
    wait_for,
)
from slimrec.lake import Lake
from slimrec.teacher.fake_server import FakeOpenAIServer

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

KEY_ENV = "SLIMREC_CLUSTER_TEST_TEACHER_KEY"
KEY = "sk-cluster-test-" + uuid.uuid4().hex  # must reach the teacher, and never be written anywhere


def _node_ports(n: int) -> list[str]:
    # Every port a node opens, chosen free; the GCS port must lie outside Ray's worker range 10002-19999.
    names = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port", "--node-manager-port", "--object-manager-port"]
    out: list[str] = []
    for name, port in zip(names, free_ports(len(names), avoid=range(10002, 20000)), strict=True):
        out += [name, str(port)]
    return out


@pytest.fixture
def ray_cluster(short_tmp):
    gcs, dash, client = free_ports(3, avoid=range(10002, 20000))
    env = project_env(**{KEY_ENV: KEY})
    ray = str(VENV_BIN / "ray")
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(200 * 1024**2),
              "--disable-usage-stats"]
    procs = Procs(markers=(str(short_tmp), f":{gcs} ", f":{gcs}\n", f"address=127.0.0.1:{gcs}",
                           f"--port={client}"))
    procs.watch(remove=(short_tmp,))
    try:
        r = run([ray, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                 str(dash), "--include-dashboard", "true", "--ray-client-server-port", str(client),
                 "--temp-dir", str(short_tmp / "head"), *common, *_node_ports(6)],
                env=env, timeout_s=300, log=short_tmp / "ray-start.log")
        procs.ours()  # remember the daemons while their command lines are fresh
        assert r.returncode == 0, r.stderr[-3000:]
        r = run([ray, "start", "--address", f"127.0.0.1:{gcs}", "--temp-dir", str(short_tmp / "worker"), *common,
                 *_node_ports(6)], env=env, timeout_s=300, log=short_tmp / "ray-start.log")
        procs.ours()
        assert r.returncode == 0, r.stderr[-3000:]
        url = f"http://127.0.0.1:{dash}"
        wait_for(lambda: len([n for n in http_json(f"{url}/api/v0/nodes")["data"]["result"]["result"]
                              if n["state"] == "ALIVE"]) == 2, 120, "two alive Ray nodes")
        yield dict(url=url, env=env, dir=short_tmp, procs=procs)
    finally:
        procs.ours()
        procs.stop()


def _submit(cluster, sid: str, entrypoint: list[str], log) -> dict:
    r = run([str(VENV_BIN / "ray"), "job", "submit", "--address", cluster["url"], "--submission-id", sid, "--",
             *entrypoint], env=project_env(), timeout_s=600, log=log)
    info = http_json(f"{cluster['url']}/api/jobs/{sid}")
    assert info["status"] == "SUCCEEDED" and r.returncode == 0, f"job {sid}: {info['status']}\n{r.stdout[-4000:]}"
    return info


@pytest.mark.parametrize("where", ["local", "s3"])
def test_ray_stages_run_unchanged_under_ray_job_submit(ray_cluster, prompted_lake, tmp_path, where, request):
    """On local disk and on a real S3 server (the nodes take the endpoint and credentials from their
    environment, as they take the teacher's key)."""
    lake_dir = place_lake(prompted_lake, where, tmp_path, request)
    log = tmp_path / "jobs.log"
    common = ["--lake", str(lake_dir), "--profile", "tiny", "--run-date", RUN_DATE.isoformat(), "--no-check",
              "--set", f"lake.local_dir={tmp_path / 'local'}"]
    tag = ray_cluster["dir"].name
    with FakeOpenAIServer(api_key=KEY) as srv:
        teacher = _submit(ray_cluster, f"teacher-{tag}", [
            "python", str(VENV_BIN.parents[1] / "jobs" / "teacher_rationales.py"), *common,
            "--set", "teacher.kind=http", "--set", f"teacher.http.base_url={srv.base_url}",
            "--set", "teacher.http.model=fake-teacher", "--set", f"teacher.http.api_key_env={KEY_ENV}",
            "--set", "teacher.sample_size=20", "--set", "teacher.http.num_workers=2",
            "--set", "teacher.http.worker_num_cpus=1", "--set", "teacher.http.requests_per_s=50",
            "--set", "teacher.commit_batch_size=5"], log)
        answered = sum(srv.answered.values())
        auth = set(srv.auth_headers)
    embed = _submit(ray_cluster, f"embed-{tag}", [
        "python", str(VENV_BIN.parents[1] / "jobs" / "embed.py"), *common, "--set", "embed.sources=[teacher]"], log)

    lake = Lake(lake_dir)
    tr = lake.read_pandas("teacher_rationales")
    assert len(tr) == 20 and (tr["status"] == "ok").all() and set(tr["teacher_model"]) == {"fake-teacher"}
    assert not tr.duplicated(["prompt_hash", "teacher_model"]).any()
    assert answered == 20 and auth == {f"Bearer {KEY}"}  # every answer came with the key from the node's env
    assert lake.count("item_embeddings") == lake.count("items") == 874
    re_ = lake.read_pandas("rationale_embeddings")
    assert len(re_) == 20 and set(re_["source"]) == {"teacher"} and set(re_["dim"]) == {384}

    # The teacher's two 1-CPU actors could only fit one per node: both nodes did work.
    actors = http_json(f"{ray_cluster['url']}/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
    teacher_nodes = {a["node_id"] for a in actors if a.get("class_name") == "HttpTeacherWorker"}
    assert len(teacher_nodes) == 2, actors
    # The drivers joined the cluster (RAY_ADDRESS set by the job server) instead of starting a local Ray.
    logs = log.read_text()
    assert "joining Ray cluster at" in logs
    # The key travelled in the nodes' environment only: not in the job records, logs or tables.
    for text in (json.dumps(teacher), json.dumps(embed), logs):
        assert KEY not in text
    for path, data in lake_files(str(lake_dir)):
        assert KEY.encode() not in data, path
