"""The Spark stages, unchanged, under spark-submit on a real Spark standalone cluster on 127.0.0.1.

A master and a worker are started with ``spark-class`` (pyspark's pip
package ships no ``sbin/`` scripts); ``jobs/user_sequences.py`` and
``jobs/prompts.py`` go through ``spark-submit --master spark://...`` with the
package installed where the driver and executors run (the venv, as in the
image); the master's JSON status page must list both applications as
finished, and the tables they wrote must equal the tables the same stages
write on ``local[2]``.

Shipping the package as ``--py-files slimrec.zip`` instead is checked apart
(``test_package_as_py_files_zip_loads_its_profiles``): the config reads its
profiles through importlib.resources, so they load from inside the zip.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from clusterkit import (
    REPO,
    RUN_DATE,
    VENV_BIN,
    Procs,
    compare_lakes,
    free_ports,
    http_json,
    place_lake,
    project_env,
    run,
    wait_for,
)
from slimrec.lake import Lake

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def spark_cluster(short_tmp):
    """A real standalone master + one worker (2 cores, 2 GiB) on free ports; stopped by pid."""
    master_port, master_ui, worker_ui, worker_port = free_ports(4)
    env = project_env(
        SPARK_LOCAL_IP="127.0.0.1",
        SPARK_LOG_DIR=str(short_tmp / "logs"),
        SPARK_WORKER_DIR=str(short_tmp / "work"),
        SPARK_LOCAL_DIRS=str(short_tmp / "local"),
        SPARK_DAEMON_MEMORY="512m",
    )
    procs = Procs(markers=(str(short_tmp),))
    procs.watch(remove=(short_tmp,))
    spark_class = str(VENV_BIN / "spark-class")
    # The temp dir is in every command line (as a system property) so leftovers are found by it.
    tag = f"-Dslimrec.test.dir={short_tmp}"
    env["SPARK_DAEMON_JAVA_OPTS"] = tag
    url = f"spark://127.0.0.1:{master_port}"
    try:
        procs.popen([spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                     "--port", str(master_port), "--webui-port", str(master_ui)], short_tmp / "master.log", env)
        wait_for(lambda: http_json(f"http://127.0.0.1:{master_ui}/json/")["status"] == "ALIVE", 120, "the Spark master")
        procs.popen([spark_class, "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1",
                     "--port", str(worker_port), "--webui-port", str(worker_ui), "--cores", "2", "--memory", "2g",
                     "--work-dir", str(short_tmp / "work")], short_tmp / "worker.log", env)
        wait_for(lambda: http_json(f"http://127.0.0.1:{master_ui}/json/")["aliveworkers"] == 1, 120,
                 "the Spark worker to register")
        yield dict(url=url, ui=f"http://127.0.0.1:{master_ui}", env=env, dir=short_tmp, procs=procs)
    finally:
        procs.stop()


def _py_files(dest: Path) -> Path:
    """``slimrec`` as a zip for ``--py-files`` (here the venv's editable install would also be found)."""
    z = dest / "slimrec.zip"
    with zipfile.ZipFile(z, "w") as f:
        for p in (REPO / "libs").rglob("*.py"):
            f.write(p, p.relative_to(REPO / "libs"))
        for p in (REPO / "schemas").rglob("*.py"):
            f.write(p, Path("slimrec/schemas") / p.relative_to(REPO / "schemas"))
        for p in (REPO / "libs/slimrec/profiles").glob("*.yaml"):
            f.write(p, p.relative_to(REPO / "libs"))
    return z


@pytest.mark.parametrize("where", ["local", "s3"])
def test_spark_stages_run_unchanged_under_spark_submit(spark_cluster, ingested_lake, prompted_lake, tmp_path, where,
                                                       request):
    """On local disk and on a real S3 server: the cluster's executors write and read the lake themselves."""
    lake_dir = place_lake(ingested_lake, where, tmp_path, request)
    log = tmp_path / "submit.log"
    apps = {}
    for job, stage in (("user_sequences", "build_sequences"), ("prompts", "build_prompts")):
        app_name = f"slimrec-cluster-test-{stage}-{spark_cluster['dir'].name}"
        r = run([str(VENV_BIN / "spark-submit"), "--master", spark_cluster["url"], "--deploy-mode", "client",
                 "--name", app_name,
                 "--conf", "spark.cores.max=2", "--executor-memory", "1g", "--driver-memory", "1g",
                 "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.ui.enabled=false",
                 str(REPO / "jobs" / f"{job}.py"),
                 "--lake", str(lake_dir), "--profile", "tiny", "--run-date", RUN_DATE.isoformat(),
                 "--set", f"spark.app_name={app_name}", "--set", f"lake.local_dir={tmp_path / 'local'}", "--no-check"],
                env=spark_cluster["env"], timeout_s=600, log=log)
        out = r.stdout + r.stderr  # spark-submit sends the Python driver's stderr to its stdout
        assert r.returncode == 0, f"spark-submit {job}.py failed:\n{out[-3000:]}"
        # get_spark() left the master to spark-submit, and says so.
        assert f"spark: master={spark_cluster['url']}" in out and "(from spark-submit)" in out
        apps[app_name] = stage

    status = http_json(f"{spark_cluster['ui']}/json/")
    finished = {a["name"]: a["state"] for a in status["completedapps"]}
    for name in apps:
        assert finished.get(name) == "FINISHED", f"{name} not finished on the cluster: {finished}"
    # Executors ran on the worker: its work dir holds one folder per application.
    assert len([p for p in (spark_cluster["dir"] / "work").iterdir() if p.name.startswith("app-")]) == 2

    lake, local = Lake(lake_dir), Lake(prompted_lake)
    assert lake.count("user_sequences") == 150 and lake.count("prompts") == 150
    stages = {lake.last_commit(t)["slimrec.stage"] for t in ("user_sequences", "prompts")}
    assert stages == {"build_sequences", "build_prompts"}
    # Same tables as the same stages on local[2].
    compared, diffs = compare_lakes(local, lake, ["user_sequences", "prompts"])
    assert compared == ["user_sequences", "prompts"] and diffs == []


def test_package_as_py_files_zip_loads_its_profiles(tmp_path):
    z = _py_files(tmp_path)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import slimrec.config as c; "
            "assert c.__file__.startswith(sys.argv[1]), c.__file__; c.load_config('tiny')")
    r = run([str(VENV_BIN / "python"), "-c", code, str(z)], env=project_env(), timeout_s=120)
    assert r.returncode == 0, r.stderr[-2000:]
