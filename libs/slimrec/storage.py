"""Where the lake's bytes live: local disk or an object store, seen the same way by every engine.

delta-rs (the driver's commits and reads), pyarrow (the Spark executors' Parquet files, the stage and
run records) and DuckDB (``delta_scan``) each configure an object store their own way. This module
turns one description into each of them:

* the standard environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``; Google's and
  Azure's own for ``gs://`` and ``abfss://``), which is where secrets belong;
* ``lake.storage_options`` in the config, for the settings that are not secret (an endpoint, a
  region). A key that names a secret is refused there (:func:`check_storage_options`), so a config
  file, a log line or a table never carries one.

Commits on S3 are safe against concurrent writers only if the server honours conditional writes
(``If-None-Match: *``; AWS S3 since 2024, MinIO, R2, SeaweedFS): delta-rs then refuses a commit whose
version another writer took. ``lake.s3_commit`` makes that explicit: ``conditional_put`` (the
default) or ``unsafe_rename`` for a server without conditional writes, where two writers at once can
lose a commit; the lake logs a warning on every use of it.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import urlparse

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

# Environment variables delta-rs and pyarrow read for S3 (the secret ones are never copied into options
# that leave this process: an executor reads its own environment or instance role).
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP")
_SECRET_KEY = re.compile(r"(?i)secret|password|token|credential|sas|account_key|access_key|session")


class StorageError(ValueError):
    """A lake URI or storage setting that cannot be used as given."""


def is_remote(uri: str) -> bool:
    """True for an object-store URI (``s3://``, ``gs://``, ``abfss://``...); local paths and ``file://`` are not."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def scheme(uri: str) -> str:
    return urlparse(str(uri)).scheme if is_remote(uri) else "file"


def check_storage_options(options: dict[str, str]) -> None:
    """Refuse secret-looking keys in ``lake.storage_options``: they belong in the environment."""
    bad = sorted(k for k in options if _SECRET_KEY.search(k))
    if bad:
        raise StorageError(
            f"lake.storage_options must not hold secrets ({', '.join(bad)}): set them as environment variables "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, GOOGLE_APPLICATION_CREDENTIALS, "
            "AZURE_STORAGE_ACCOUNT_KEY...) on the driver and on every Spark executor and Ray worker")


def delta_options(uri: str, configured: dict[str, str] | None = None, s3_commit: str = "conditional_put") -> dict[str, str] | None:
    """The ``storage_options`` for delta-rs: ``configured`` plus the commit-safety choice on S3.

    Secrets are not added here: delta-rs reads ``AWS_ACCESS_KEY_ID`` and friends from the environment.
    None for a local lake.
    """
    if not is_remote(uri):
        return None
    opts = dict(configured or {})
    check_storage_options(opts)
    if scheme(uri) in ("s3", "s3a"):
        if s3_commit == "conditional_put":
            opts.setdefault("conditional_put", "etag")
        elif s3_commit == "unsafe_rename":
            log.warning("lake %s: lake.s3_commit=unsafe_rename: two writers committing to one table at once can "
                        "lose a commit; run one writer per table", uri)
            opts["AWS_S3_ALLOW_UNSAFE_RENAME"] = "true"
        else:
            raise StorageError(f"lake.s3_commit must be conditional_put or unsafe_rename, not {s3_commit!r}")
    return opts


def _setting(options: dict[str, str], *names: str) -> str | None:
    """The first of ``names`` set in ``options`` (any case) or in the environment."""
    lower = {k.lower(): v for k, v in options.items()}
    for n in names:
        if n.lower() in lower:
            return lower[n.lower()]
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None


def _endpoint(options: dict[str, str]):
    """The S3 endpoint from ``options`` or the environment, parsed (a bare host:port takes http when
    ``AWS_ALLOW_HTTP`` is true, https otherwise), or None."""
    endpoint = _setting(options, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "endpoint", "endpoint_url")
    if not endpoint:
        return None
    allow_http = (_setting(options, "AWS_ALLOW_HTTP", "allow_http") or "").lower() in ("1", "true", "yes")
    return urlparse(endpoint if "://" in endpoint else ("http://" if allow_http else "https://") + endpoint)


def _region(options: dict[str, str]) -> str | None:
    return _setting(options, "AWS_REGION", "AWS_DEFAULT_REGION", "region")


def filesystem(uri: str, options: dict[str, str] | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path in it for ``uri`` (a local path, ``file://``, ``s3://``, ``gs://``...).

    For S3 the endpoint, region and plain-HTTP switch come from ``options`` or the ``AWS_*`` environment;
    credentials from the environment (or the machine's role), as for delta-rs.
    """
    uri = str(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    options = options or {}
    u = urlparse(uri)
    if u.scheme in ("s3", "s3a"):
        kw: dict = {}
        e = _endpoint(options)
        if e:
            kw |= {"endpoint_override": e.netloc, "scheme": e.scheme}
        if _region(options):
            kw["region"] = _region(options)
        return pafs.S3FileSystem(**kw), f"{u.netloc}{u.path}".rstrip("/")
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended by ``/`` (works for local paths and URIs alike)."""
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def duckdb_secret_sql(uri: str, options: dict[str, str] | None = None) -> str | None:
    """A ``CREATE SECRET`` statement that lets DuckDB's ``delta_scan`` read an S3 lake with the same
    endpoint and credentials (from the environment); None for other URIs."""
    if scheme(uri) not in ("s3", "s3a"):
        return None
    options = options or {}
    parts = ["TYPE s3"]
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        parts += [f"KEY_ID '{key}'", f"SECRET '{secret}'"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            parts.append(f"SESSION_TOKEN '{os.environ['AWS_SESSION_TOKEN']}'")
    else:
        parts.append("PROVIDER credential_chain")
    if _region(options):
        parts.append(f"REGION '{_region(options)}'")
    e = _endpoint(options)
    if e:
        parts += [f"ENDPOINT '{e.netloc}'", "URL_STYLE 'path'", f"USE_SSL {'true' if e.scheme == 'https' else 'false'}"]
    return f"CREATE OR REPLACE SECRET slimrec_lake ({', '.join(parts)})"


def upload_folder(src: str | os.PathLike, dst_uri: str, options: dict[str, str] | None = None) -> None:
    """Copy the local folder ``src`` (a Delta table, a whole lake) to ``dst_uri``, file by file."""
    fs, path = filesystem(dst_uri, options)
    pafs.copy_files(str(src), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
