"""What can be checked of infra/ without Docker, Kubernetes, Maven or Airflow.

Not checked here (nothing to run them on): building the image, fetching the delta-spark jars,
applying the manifests to a cluster, submitting to Kubernetes, importing the DAG with a real
Airflow. Checked: every file parses; kinds and fields are the expected ones; versions agree with
pyproject.toml; every command they run is a command the ``slim`` CLI accepts, with config overrides
that ``load_config`` accepts; the container entrypoint builds Spark's executor command; the DAG file
runs against stand-in Airflow classes and renders to valid ``slim`` commands.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import jinja2
import pytest
import typer
import yaml
from slimrec.cli import app
from slimrec.config import load_config
from slimrec.pipeline import STAGES

try:  # typer carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer, plain click
    from click import UsageError

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(name: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)", dep)
        if m:
            return m.group(2)
    raise KeyError(name)


def check_slim_args(args: list[str]) -> None:
    """Parse ``slim <args>`` as the CLI would (no command runs); check --profile and --set overrides."""
    group = typer.main.get_command(app)
    ctx = group.make_context("slim", list(args), resilient_parsing=False)
    name, cmd, rest = group.resolve_command(ctx, [*getattr(ctx, "_protected_args", []), *ctx.args])
    sub = cmd.make_context(name, rest, parent=ctx)  # raises click.UsageError on an unknown option
    params = sub.params
    if "name" in params:
        assert params["name"] in STAGES, params["name"]
    load_config(params.get("profile", "dev"), None, list(params.get("set_") or []))


def check_entrypoint(command: str) -> None:
    """``python /opt/slimrec/jobs/X.py ...`` or ``slim ...``: the job file exists and its arguments parse."""
    argv = shlex.split(command)
    if argv[0] == "python":
        job = Path(argv[1])
        assert job.parent == Path("/opt/slimrec/jobs") and (REPO / "jobs" / job.name).exists(), job
        text = (REPO / "jobs" / job.name).read_text()
        stage = re.search(r'stage_main\("(\w+)"\)|\["stage", "(\w+)"', text)
        assert stage, f"{job.name} does not call a stage"
        check_slim_args(["stage", stage.group(1) or stage.group(2), *argv[2:]])
    else:
        assert argv[0] == "slim", argv
        check_slim_args(argv[1:])


def cron_fields_ok(fields: list[str]) -> bool:
    """Minute, hour, day of month, month, day of week: numbers, ranges, lists, steps, ``*``."""
    ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    for f, (lo, hi) in zip(fields, ranges, strict=True):
        for part in f.split(","):
            base, _, step = part.partition("/")
            if step and not step.isdigit():
                return False
            if base == "*":
                continue
            a, _, b = base.partition("-")
            if not a.isdigit() or (b and not b.isdigit()):
                return False
            if not all(lo <= int(x) <= hi for x in (a, b) if x):
                return False
    return True


# ------------------------------------------------------------------------------------------ image
def dockerfile_instructions() -> list[tuple[str, str]]:
    lines, out, buf = (INFRA / "Dockerfile").read_text().splitlines(), [], ""
    heredoc = None
    for line in lines:
        if heredoc:
            if line.strip() == heredoc:
                heredoc = None
            continue
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\") + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        m = re.search(r"<<'?(\w+)'?", buf)
        heredoc = m.group(1) if m else None
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def test_dockerfile_python_java_versions_and_sources():
    ins = dockerfile_instructions()
    args = dict(re.match(r"(\w+)=?(.*)", v).groups() for k, v in ins if k == "ARG")
    frm = [v for k, v in ins if k == "FROM"]
    assert frm == ["python:${PYTHON_VERSION}-slim-bookworm"] and args["PYTHON_VERSION"] == "3.11"
    assert PYPROJECT["project"]["requires-python"].startswith(">=3.11")
    runs = " ".join(v for k, v in ins if k == "RUN")
    assert "openjdk-17-jre-headless" in runs and "wget" in runs
    assert args["TORCH_VERSION"] == pinned("torch")
    # The delta-spark jars: opt-in build arg, same version as the pinned pip package, Scala of Spark 4.
    assert args["FETCH_DELTA_JARS"] == "0" and args["DELTA_VERSION"] == pinned("delta-spark")
    assert args["SCALA_BINARY"] == "2.13" and pinned("pyspark").startswith("4.")
    assert "io/delta/${a}/${DELTA_VERSION}" in runs and '"delta-spark_${SCALA_BINARY}" "delta-storage"' in runs
    # Every COPY source exists in the build context (the repo root) and is not excluded.
    ignored = [p.strip() for p in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    for k, v in ins:
        if k != "COPY":
            continue
        *srcs, _dest = v.split()
        for src in srcs:
            assert list(REPO.glob(src)), f"COPY {src}: nothing in the repo matches"
            assert not any(src == i or src.startswith(i.rstrip("/") + "/") for i in ignored), src
    env = " ".join(v for k, v in ins if k == "ENV")
    assert "PYSPARK_PYTHON=/usr/local/bin/python" in env and "SPARK_HOME=" in env


def test_dockerfile_dependency_step_reads_pyproject():
    """The inline Python that turns pyproject.toml into the requirements layer, run here."""
    text = (INFRA / "Dockerfile").read_text()
    code = re.search(r"<<'PY'[^\n]*\n(.*?)\nPY\n", text, re.S).group(1)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert r.stdout.splitlines() == PYPROJECT["project"]["dependencies"]


def test_entrypoint_passes_commands_through_and_builds_the_spark_executor_command(tmp_path):
    ep = INFRA / "spark" / "entrypoint.sh"
    assert subprocess.run(["bash", "-n", str(ep)]).returncode == 0
    r = subprocess.run([str(ep), "echo", "slim", "--help"], env={"SPARK_HOME": "/spark", "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "slim --help\n"
    # A stand-in java that prints its arguments, and the variables Spark on Kubernetes sets.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "java").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    (tmp_path / "bin" / "java").chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "JAVA_HOME": str(tmp_path), "SPARK_HOME": "/spark",
           "SPARK_JAVA_OPT_1": "-Dsecond", "SPARK_JAVA_OPT_0": "-Dfirst", "SPARK_JAVA_OPT_10": "-Dtenth",
           "SPARK_EXECUTOR_MEMORY": "6g", "SPARK_DRIVER_URL": "spark://CoarseGrainedScheduler@d:7078",
           "SPARK_EXECUTOR_ID": "3", "SPARK_EXECUTOR_CORES": "2", "SPARK_APPLICATION_ID": "spark-app-1",
           "SPARK_EXECUTOR_POD_IP": "10.0.0.7", "SPARK_RESOURCE_PROFILE_ID": "0", "SPARK_EXECUTOR_POD_NAME": "ex-3"}
    r = subprocess.run([str(ep), "executor"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    argv = r.stdout.splitlines()
    assert argv[:3] == ["-Dfirst", "-Dsecond", "-Dtenth"] and argv[3:5] == ["-Xms6g", "-Xmx6g"]
    assert argv[argv.index("-cp") + 1] == ":/spark/jars/*"
    assert "org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend" in argv
    assert argv[argv.index("--executor-id") + 1] == "3" and argv[argv.index("--podName") + 1] == "ex-3"


# ------------------------------------------------------------------------------------------ Spark on Kubernetes
def spark_properties() -> dict[str, str]:
    props = {}
    for line in (INFRA / "spark" / "spark-on-k8s.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, v = line.split(None, 1)
            props[k] = v.strip()
    return props


def test_spark_on_k8s_properties():
    p = spark_properties()
    assert p["spark.submit.deployMode"] == "cluster"
    assert p["spark.kubernetes.container.image"].startswith("ghcr.io/") and "spark.master" not in p
    assert p["spark.pyspark.python"] == p["spark.pyspark.driver.python"] == "/usr/local/bin/python"
    assert p["spark.sql.parquet.outputTimestampType"] == "TIMESTAMP_MICROS"
    # delta-rs engine: the driver and every executor see the lake at one path.
    for role in ("driver", "executor"):
        pre = f"spark.kubernetes.{role}.volumes.persistentVolumeClaim.lake"
        assert p[f"{pre}.mount.path"] == "/lake" and p[f"{pre}.options.claimName"] == "slimrec-lake"
    assert all(k.startswith("spark.") for k in p)


def test_submit_k8s_script_builds_the_spark_submit_command():
    script = INFRA / "spark" / "submit-k8s.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run([str(script), "user_sequences", "--lake", "/lake", "--profile", "prod", "--run-date",
                        "2024-01-15"], env={"PATH": "/usr/bin:/bin", "SPARK_SUBMIT": "echo",
                                            "SLIMREC_IMAGE": "reg/slimrec:x"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    argv = r.stdout.split()
    assert argv[argv.index("--master") + 1] == "k8s://https://kubernetes.default.svc:443"
    assert argv[argv.index("--properties-file") + 1] == str(INFRA / "spark" / "spark-on-k8s.conf")
    assert "spark.kubernetes.container.image=reg/slimrec:x" in argv
    job = argv.index("local:///opt/slimrec/jobs/user_sequences.py")
    check_entrypoint(shlex.join(["python", "/opt/slimrec/jobs/user_sequences.py", *argv[job + 1:]]))


# ------------------------------------------------------------------------------------------ KubeRay
def test_raycluster_manifest():
    docs = list(yaml.safe_load_all((INFRA / "kuberay" / "raycluster.yaml").read_text()))
    assert len(docs) == 1
    rc = docs[0]
    assert (rc["apiVersion"], rc["kind"], rc["metadata"]["name"]) == ("ray.io/v1", "RayCluster", "slimrec")
    spec = rc["spec"]
    assert spec["rayVersion"] == pinned("ray") and spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"} and groups["gpu"]["minReplicas"] == 0
    key_env = load_config("prod").teacher.http.api_key_env
    pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in groups.values())]
    for pod in pods:
        (c,) = pod["containers"]
        assert c["image"].startswith("ghcr.io/example/slimrec:0.1.0")
        env = {e["name"]: e for e in c["env"]}
        assert env[key_env]["valueFrom"]["secretKeyRef"]["name"] == "slimrec-teacher"  # from a Secret, not a literal
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts["/lake"] == "lake"
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        assert claims["lake"] == "slimrec-lake"
    assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_rayjob_manifests_run_the_stage_entry_files():
    docs = list(yaml.safe_load_all((INFRA / "kuberay" / "rayjob.yaml").read_text()))
    stages = []
    for d in docs:
        assert (d["apiVersion"], d["kind"]) == ("ray.io/v1", "RayJob")
        spec = d["spec"]
        assert spec["clusterSelector"] == {"ray.io/cluster": "slimrec"}
        assert spec["submissionMode"] == "K8sJobMode" and spec["backoffLimit"] == 0
        assert "runtimeEnvYAML" not in spec  # the key comes from the pods' env, never from the job
        check_entrypoint(spec["entrypoint"])
        stages.append(d["metadata"]["labels"]["slimrec/stage"])
    # Every Ray stage, in pipeline order.
    assert stages == ["teacher_rationales", "distill_student", "student_rationales", "embed", "retrieve_rationales",
                      "train_recommender"]
    assert [s for s in STAGES if s in stages] == stages


# ------------------------------------------------------------------------------------------ schedule
def test_crontab_line_parses():
    lines = [ln for ln in (INFRA / "schedule" / "slimrec.crontab").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    env = dict(ln.split("=", 1) for ln in lines if re.match(r"^[A-Z_]+=", ln))
    jobs = [ln for ln in lines if not re.match(r"^[A-Z_]+=", ln)]
    assert env["CRON_TZ"] == "UTC" and len(jobs) == 1
    fields = jobs[0].split(None, 5)
    assert cron_fields_ok(fields[:5]) and fields[:5] == ["15", "2", "*", "*", "*"]
    command = fields[5]
    assert "%" not in command.replace(r"\%", "")  # a bare % would end cron's command line
    # The shell command, as cron hands it to bash with the date substituted.
    refresh = command.split("; ", 1)[1].split(" >> ")[0].replace('"$d"', "2024-01-15").replace("$d", "2024-01-15")
    check_slim_args(shlex.split(refresh)[1:])


def test_kubernetes_cronjob():
    (cj,) = list(yaml.safe_load_all((INFRA / "schedule" / "cronjob.yaml").read_text()))
    assert (cj["apiVersion"], cj["kind"]) == ("batch/v1", "CronJob")
    spec = cj["spec"]
    assert cron_fields_ok(spec["schedule"].split()) and spec["concurrencyPolicy"] == "Forbid"
    (c,) = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["/bin/bash", "-c"]
    script = c["args"][0]
    refresh = script.split("exec ", 1)[1].replace('"$d"', "2024-01-15").replace("$d", "2024-01-15")
    check_slim_args(shlex.split(refresh)[1:])


def _load_dag_with_stand_in_airflow(monkeypatch):
    """Run the DAG file against minimal stand-ins for Airflow's DAG and BashOperator (no Airflow here)."""
    made: dict = {"tasks": {}, "edges": []}

    class DAG:
        def __init__(self, **kw):
            made["dag"] = kw

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class BashOperator:
        def __init__(self, task_id, bash_command, **kw):
            self.task_id, self.bash_command = task_id, bash_command
            made["tasks"][task_id] = self

        def __rshift__(self, other):
            made["edges"].append((self.task_id, other.task_id))
            return other

    mods = {"airflow": types.ModuleType("airflow"), "airflow.sdk": types.ModuleType("airflow.sdk"),
            "airflow.providers": types.ModuleType("airflow.providers"),
            "airflow.providers.standard": types.ModuleType("airflow.providers.standard"),
            "airflow.providers.standard.operators": types.ModuleType("airflow.providers.standard.operators"),
            "airflow.providers.standard.operators.bash": types.ModuleType("airflow.providers.standard.operators.bash")}
    mods["airflow.sdk"].DAG = DAG
    mods["airflow.providers.standard.operators.bash"].BashOperator = BashOperator
    for k, v in mods.items():
        monkeypatch.setitem(sys.modules, k, v)
    path = INFRA / "schedule" / "slimrec_refresh_dag.py"
    code = compile(path.read_text(), str(path), "exec")
    exec(code, {"__name__": "slimrec_refresh_dag", "__file__": str(path)})  # noqa: S102 - our own file
    return made


def test_airflow_dag_compiles_and_renders_valid_commands(monkeypatch):
    made = _load_dag_with_stand_in_airflow(monkeypatch)
    dag = made["dag"]
    assert dag["dag_id"] == "slimrec_daily_refresh" and cron_fields_ok(dag["schedule"].split())
    assert dag["max_active_runs"] == 1 and dag["catchup"] is False
    assert made["edges"] == [("slim_refresh", "validate_recommendations")]

    class Var:  # Airflow's `var.value.get(name, default)` in templates, with no Variable set
        def get(self, name, default=None):
            return default

    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    for task in made["tasks"].values():
        cmd = env.from_string(task.bash_command).render(ds="2024-01-15", var=types.SimpleNamespace(value=Var()))
        argv = shlex.split(cmd)
        assert argv[0] == "slim"
        check_slim_args(argv[1:])
        if task.task_id == "slim_refresh":
            assert "--run-date 2024-01-15" in cmd and "--events /lake/incoming/events-2024-01-15.csv" in cmd


@pytest.mark.parametrize("bad", [["stage", "no_such_stage"], ["refresh", "--no-such-option", "x"],
                                 ["stage", "embed", "--set", "embed.no_such_field=1"]])
def test_the_command_checker_rejects_bad_commands(bad):
    with pytest.raises((UsageError, AssertionError, ValueError)):
        check_slim_args(bad)
