"""The only module that knows where tables live.

One Delta table per folder under ``root``. Two write paths, one commit each:

* **Spark** (:meth:`Lake.write_spark`): Spark executors write Parquet files
  in parallel into the table folder through a Python Data Source
  (:mod:`slimrec.spark_delta`); nothing is visible until the driver commits
  their add-actions in one Delta transaction with ``deltalake`` (delta-rs).
  With ``spark.delta_engine=delta-spark`` the native ``io.delta`` writer is
  used instead (cluster images that carry the Delta jars; not runnable here).
* **Arrow** (:meth:`Lake.write_arrow`): driver-side data from Ray stages,
  written by delta-rs directly.

Modes: ``append``, ``overwrite``, ``replace_date`` (overwrite only the
``run_date`` partition of this run: a rerun replaces its own slice) and
``merge`` (upsert on the table's key; ``update=False`` inserts new keys only).

Every commit carries ``slimrec.*`` custom metadata: stage, run date, run id,
config hash and the Delta versions of the inputs; written rows get
``run_date`` and ``input_versions`` filled in when the caller left them out.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import create_table_with_add_actions

from slimrec.config import LakeConfig
from slimrec.delta_files import split_diverted
from slimrec.schemas.tables import TableSpec, spec
from slimrec.storage import delta_options, filesystem, is_remote, join

log = logging.getLogger(__name__)

WriteMode = Literal["append", "overwrite", "replace_date", "merge"]


@dataclass(frozen=True)
class SplitWrite:
    """What :meth:`Lake.write_spark_diverting` did: the new version (None: nothing written), the rows
    written, and the diverted rows' fields."""

    version: int | None
    rows: int
    diverted: pa.Table
    tee_version: int | None = None  # the tee table's new version, where there is one


def _nullable_fields(dt):
    from pyspark.sql import types as T

    if not isinstance(dt, T.StructType):
        return dt
    return T.StructType([T.StructField(f.name, f.dataType, True) for f in dt.fields])


def with_lineage(data: pa.Table, s: TableSpec, info: CommitInfo) -> pa.Table:
    """``data`` with the lineage columns ``s`` has and ``data`` lacks filled from ``info`` (other columns kept)."""
    if s.lineage:
        if "run_date" not in data.column_names:
            data = data.append_column("run_date", pa.array([info.run_date] * len(data), pa.date32()))
        if "input_versions" not in data.column_names:
            iv = json.dumps(info.input_versions, sort_keys=True)
            data = data.append_column("input_versions", pa.array([iv] * len(data), pa.string()))
    return data


class LakeError(RuntimeError):
    """A table that is missing, or a write that cannot be done as asked."""


@dataclass(frozen=True)
class CommitInfo:
    stage: str
    run_date: date
    run_id: str = ""
    config_hash: str = ""
    input_versions: dict[str, int | None] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        md = {
            "slimrec.stage": self.stage,
            "slimrec.run_date": self.run_date.isoformat(),
            "slimrec.run_id": self.run_id,
            "slimrec.config_hash": self.config_hash,
            "slimrec.input_versions": json.dumps(self.input_versions, sort_keys=True),
        }
        for k, v in self.extra.items():
            md[f"slimrec.{k}"] = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
        return md

    def properties(self, mode: str | None = None) -> CommitProperties:
        """Commit properties; ``mode`` (the lake's write mode) is recorded as ``slimrec.write_mode``, because
        a Delta log entry alone does not always say it (a ``replace_date`` written through
        ``create_write_transaction`` shows as a plain WRITE Overwrite)."""
        md = self.metadata()
        if mode is not None:
            md["slimrec.write_mode"] = mode
        return CommitProperties(custom_metadata=md)


def local_root_for(root: str, local_dir: str | None = None) -> Path:
    """:attr:`Lake.local_root` of a lake at ``root``."""
    if not is_remote(root):
        return Path(str(root).removeprefix("file://")).expanduser().resolve()
    if local_dir:
        return Path(local_dir).expanduser().resolve()
    from urllib.parse import urlparse

    u = urlparse(root)
    return (Path.cwd() / ".slimrec-local" / u.netloc / u.path.strip("/")).resolve()


@contextmanager
def _concurrent_commit(table: str):
    """A commit that lost the race for its Delta version to another writer becomes a clear LakeError
    (delta-rs retries what it can, an append over an append; an overwrite over a new version cannot be)."""
    try:
        yield
    except CommitFailedError as e:
        raise LakeError(f"{table}: another writer committed to this table while this one was writing ({e}); "
                        "nothing of this write is visible. Run one writer per table, then rerun the stage") from None


class Lake:
    def __init__(self, root: str | os.PathLike, storage_options: dict[str, str] | None = None,
                 target_file_rows: int = LakeConfig.model_fields["target_file_rows"].default,
                 s3_commit: str = "conditional_put", local_dir: str | None = None,
                 spark_reader: str = "auto"):
        self.target_file_rows = target_file_rows  # rows per Parquet file an executor writes, at most
        root = str(root)
        self.root = root.rstrip("/") if is_remote(root) else str(Path(root).expanduser().resolve())
        # the configured (non-secret) settings, for pyarrow's filesystems; delta-rs gets them with the
        # commit-safety choice (slimrec.storage)
        self.fs_options = dict(storage_options or {})
        self.storage_options = delta_options(self.root, storage_options, s3_commit)
        self._local_dir = local_dir
        self.spark_reader = spark_reader

    @classmethod
    def from_config(cls, root: str | os.PathLike, cfg: LakeConfig) -> Lake:
        return cls(root, storage_options=cfg.storage_options or None, target_file_rows=cfg.target_file_rows,
                   s3_commit=cfg.s3_commit, local_dir=cfg.local_dir, spark_reader=cfg.spark_reader)

    @property
    def is_remote(self) -> bool:
        return is_remote(self.root)

    @property
    def local_root(self) -> Path:
        """The folder for what must be a path, not a table (models, checkpoints, run artifacts, a SQLite
        tracking store): the lake root itself on local disk; for an object-store lake ``lake.local_dir``, or
        ``.slimrec-local/<bucket>/<prefix>`` under the current directory. On a multi-node cluster it must
        be a folder every node shares (docs/clusters.md)."""
        return local_root_for(self.root, self._local_dir)

    # ------------------------------------------------------------------ locating
    def path(self, table: str) -> str:
        spec(table)  # unknown names fail here, with the list of known ones
        return f"{self.root.rstrip('/')}/{table}"

    def exists(self, table: str) -> bool:
        return DeltaTable.is_deltatable(self.path(table), storage_options=self.storage_options)

    def _dt(self, table: str, version: int | None = None) -> DeltaTable:
        if not self.exists(table):
            raise LakeError(f"table {table!r} does not exist under {self.root} (has its stage run?)")
        return DeltaTable(self.path(table), version=version, storage_options=self.storage_options)

    def version(self, table: str) -> int | None:
        """Latest Delta version, or None when the table was never written."""
        return self._dt(table).version() if self.exists(table) else None

    def history(self, table: str, limit: int | None = None) -> list[dict[str, Any]]:
        return self._dt(table).history(limit)

    def last_commit(self, table: str) -> dict[str, Any]:
        return self.history(table, 1)[0]

    def file_uris(self, table: str, version: int | None = None) -> list[str]:
        return self._dt(table, version).file_uris()

    def _stored_columns(self, table: str) -> set[str]:
        """Column names of the table's latest version (a table written before a column was added lacks it)."""
        return {f.name for f in self._dt(table).schema().fields}

    # ------------------------------------------------------------------ reading
    def read_arrow(
        self, table: str, version: int | None = None, columns: list[str] | None = None, filters=None
    ) -> pa.Table:
        """Driver-side read (delta-rs); ``filters`` as in ``DeltaTable.to_pyarrow_table``. Columns declared
        ``added_later`` that this version of the table does not hold yet read as null."""
        dt = self._dt(table, version)
        s = spec(table)
        cols = columns or s.column_names
        stored = {f.name for f in dt.schema().fields}
        late = [c for c in cols if c not in stored and s.column(c).added_later]
        t = dt.to_pyarrow_table(columns=[c for c in cols if c not in late], filters=filters)
        for c in late:
            t = t.append_column(c, pa.nulls(len(t), s.arrow_schema().field(c).type))
        return t.select(cols).cast(pa.schema([s.arrow_schema().field(c) for c in cols]), safe=False)

    def read_pandas(self, table: str, version: int | None = None, columns: list[str] | None = None, filters=None):
        return self.read_arrow(table, version, columns, filters).to_pandas()

    def count(self, table: str, version: int | None = None) -> int:
        return self._dt(table, version).count()

    def _spark_reader(self) -> str:
        if self.spark_reader != "auto":
            return self.spark_reader
        return "parquet" if not self.is_remote or self.root.startswith(("hdfs://", "dbfs:/")) else "datasource"

    def read_spark(self, spark, table: str, version: int | None = None, only_files: tuple[str, ...] | None = None):
        """A Spark DataFrame over the table's files at ``version`` (executors read in parallel); with
        ``only_files`` (URIs as :meth:`file_uris` gives them), over those of them only.

        ``lake.spark_reader``: ``parquet`` is Spark's own reader (local disk, or a scheme the cluster's
        Hadoop serves); ``datasource`` reads the files listed by delta-rs with pyarrow's filesystems on the
        executors (:class:`slimrec.spark_delta.DeltaFilesReadSource`: object stores without connector
        jars); ``auto`` takes the first for local and HDFS lakes, the second for object stores.
        """
        s = spec(table)
        if self._spark_reader() == "datasource":
            from slimrec.spark_delta import read_files

            dt = self._dt(table, version)
            adds = pa.table(dt.get_add_actions(flatten=True))
            pcols = [c for c in adds.column_names if c.startswith("partition.")]
            uri = self.path(table)
            files = [(p if "://" in p or p.startswith("/") else join(uri, p),
                      {c.removeprefix("partition."): row[c] for c in pcols})
                     for p, row in zip(adds.column("path").to_pylist(), adds.select(pcols).to_pylist(), strict=True)]
            if only_files is not None:
                from urllib.parse import unquote

                wanted = {unquote(f) for f in only_files}
                files = [f for f in files if unquote(f[0]) in wanted]
            if not files:
                return spark.createDataFrame([], s.spark_schema())
            return read_files(spark, files, s.spark_schema(), self.fs_options)
        files = self.file_uris(table, version) if only_files is None else list(only_files)
        if not files:
            return spark.createDataFrame([], s.spark_schema())
        reader = spark.read.schema(s.spark_schema())
        if s.partition_by:
            reader = reader.option("basePath", self.path(table))
        return reader.parquet(*files).select(*s.column_names)

    # ------------------------------------------------------------------ writing
    def _check_mode(self, s: TableSpec, mode: str) -> None:
        if mode == "replace_date" and "run_date" not in s.partition_by:
            raise LakeError(f"replace_date needs a table partitioned by run_date; {s.name} is not")
        if mode not in ("append", "overwrite", "replace_date", "merge"):
            raise LakeError(f"unknown write mode {mode!r}")

    def _merge_predicate(self, s: TableSpec) -> str:
        # NULL-safe on nullable key parts (quarantine's source_row may be null).
        parts = []
        for k in s.key:
            if s.column(k).nullable:
                parts.append(f"(t.{k} = s.{k} OR (t.{k} IS NULL AND s.{k} IS NULL))")
            else:
                parts.append(f"t.{k} = s.{k}")
        return " AND ".join(parts)

    def write_arrow(
        self,
        table: str,
        data: pa.Table | pd.DataFrame,
        mode: WriteMode,
        info: CommitInfo,
        update: bool = True,
        delete_missing: str | None = None,
    ) -> int:
        """Write driver-side rows in one commit and return the new Delta version.

        ``delete_missing`` (merge only): a SQL predicate on the target (alias ``t``); the target's rows
        that match it and whose key is not among ``data``'s are deleted in the same commit. A stage
        that rewrites its whole slice of a shared table uses it, e.g. ``t.stage = 'ingest'`` in
        ``quarantine``: rows of an earlier run that no longer apply go, an empty ``data`` included.
        """
        s = spec(table)
        self._check_mode(s, mode)
        if delete_missing is not None and mode != "merge":
            raise LakeError("delete_missing needs mode='merge'")
        if isinstance(data, pd.DataFrame):
            data = pa.Table.from_pandas(data, preserve_index=False)
        data = s.conform_arrow(with_lineage(data, s, info))
        uri = self.path(table)
        props = info.properties(mode)
        # a table written before a column was added (``added_later``) gains it with this commit
        stored = self._stored_columns(table) if self.exists(table) else None
        new_cols = [] if stored is None else [c for c in s.column_names if c not in stored]
        widen = bool(new_cols)
        if widen:
            log.info("lake: %s gains columns %s (added later; older rows read as null)", table, new_cols)
        if mode == "merge" and self.exists(table):
            dt = self._dt(table)
            merger = dt.merge(
                data, self._merge_predicate(s), source_alias="s", target_alias="t", commit_properties=props,
                merge_schema=widen,
            )
            if update:
                merger = merger.when_matched_update_all()
            merger = merger.when_not_matched_insert_all()
            if delete_missing is not None:
                merger = merger.when_not_matched_by_source_delete(delete_missing)
            with _concurrent_commit(table):
                merger.execute()
        else:
            kwargs: dict[str, Any] = dict(
                partition_by=list(s.partition_by) or None,
                commit_properties=props,
                storage_options=self.storage_options,
            )
            if mode == "replace_date":
                kwargs["predicate"] = f"run_date = '{info.run_date.isoformat()}'"
                bad = [d for d in set(data.column("run_date").to_pylist()) if d != info.run_date]
                if bad:
                    raise LakeError(f"replace_date into {table}: rows carry run_date {bad}, not {info.run_date}")
            write_mode = "append" if mode in ("append", "merge") else "overwrite"
            if not self.exists(table) and len(data) == 0 and write_mode == "append":
                write_mode = "overwrite"  # create the empty table so readers find it
            with _concurrent_commit(table):
                write_deltalake(uri, data, mode=write_mode, schema_mode="merge" if widen else None, **kwargs)
        v = self.version(table)
        log.info("lake: %s %s %d rows -> version %s", table, mode, len(data), v)
        return v

    def replace_quarantine(self, stage: str, rows: pa.Table | pd.DataFrame, info: CommitInfo) -> int | None:
        """Make ``rows`` the whole of ``stage``'s records in ``quarantine``, in one commit.

        For a stage that sees all of its input on every run: records an earlier run left that this run
        did not produce (the row was fixed, or the input replaced) are deleted. Returns the new version,
        or None when there is nothing to write or delete (no commit).
        """
        if isinstance(rows, pd.DataFrame):
            rows = pa.Table.from_pandas(rows, preserve_index=False) if len(rows) else None
        if rows is None or len(rows) == 0:
            if not self.exists("quarantine") or self.read_arrow(
                    "quarantine", columns=["stage"], filters=[("stage", "=", stage)]).num_rows == 0:
                return None
            rows = pa.table({c: pa.array([], spec("quarantine").arrow_schema().field(c).type)
                             for c in ("stage", "source", "source_row", "reason", "payload")})
        return self.write_arrow("quarantine", rows, "merge", info, delete_missing=f"t.stage = '{stage}'")

    def delete_keys(self, table: str, keys: pa.Table, info: CommitInfo) -> int | None:
        """Delete the rows whose key (the table's whole key) is in ``keys``, in one commit.

        Returns the new version, or None when the table does not exist or ``keys`` is empty (no commit).
        """
        s = spec(table)
        if not self.exists(table) or len(keys) == 0:
            return None
        missing = [k for k in s.key if k not in keys.column_names]
        if missing:
            raise LakeError(f"delete_keys on {table}: keys lack {missing}")
        keys = keys.select(list(s.key)).cast(pa.schema([s.arrow_schema().field(k) for k in s.key]))
        with _concurrent_commit(table):
            self._dt(table).merge(
                keys, self._merge_predicate(s), source_alias="s", target_alias="t",
                commit_properties=info.properties("delete"),
            ).when_matched_delete().execute()
        v = self.version(table)
        log.info("lake: %s deleted %d keys -> version %s", table, len(keys), v)
        return v

    def write_spark(
        self, df, table: str, mode: WriteMode, info: CommitInfo, engine: str = "delta-rs", update: bool = True
    ) -> int:
        """Write a Spark DataFrame: executors write files in parallel, one Delta commit."""
        s = spec(table)
        self._check_mode(s, mode)
        df = self._conform_spark(df, s, info)
        if mode == "merge":
            # MERGE runs in delta-rs on the driver; on clusters use delta_engine=delta-spark for a distributed MERGE.
            if engine == "delta-spark":
                return self._merge_delta_spark(df, table, s, info, update)
            return self.write_arrow(table, df.toArrow(), "merge", info, update=update)
        if engine == "delta-spark":
            return self._write_delta_spark(df, table, s, mode, info)
        return self._write_files_then_commit(df, table, s, mode, info)[0]

    def write_spark_diverting(
        self, df, table: str, mode: WriteMode, info: CommitInfo, column: str, engine: str = "delta-rs",
        skip_empty: bool = False, tee: str | None = None,
    ) -> SplitWrite:
        """:meth:`write_spark` for the rows whose struct ``column`` is null; the others come back.

        The other rows are not written: the fields of their ``column`` come back as an Arrow table
        (a stage's quarantine records, say). On the default engine both come out of one pass over
        ``df``, so nothing needs caching (the executors put the diverted rows in Parquet files under
        the table's ``_diverted/`` folder, which is read here and removed). ``skip_empty``: when no
        row is left to write, commit nothing (version None): an overwrite by an empty result keeps
        the table as it was.

        ``tee``: another table that every row of ``df`` goes to as well, diverted or not, in the same
        pass and the same ``mode`` (append or overwrite), committed right after ``table`` (not at all
        when ``table``'s commit is skipped); ``df`` holds its columns (the lineage ones are filled).
        Ingest writes raw_interactions beside interactions so. The return value is ``table``'s.
        """
        from pyspark.sql import functions as F

        s = spec(table)
        self._check_mode(s, mode)
        if column not in df.columns:
            raise LakeError(f"{table}: DataFrame lacks the diverted column {column!r}")
        tee_spec = spec(tee) if tee else None
        if tee and (mode not in ("append", "overwrite") or engine == "delta-spark"):
            raise LakeError(f"{table}: a tee table is written by the delta-rs engine's append or overwrite only")
        extra = [c for c in (tee_spec.column_names if tee_spec else []) if c not in s.column_names and c != column]
        if missing := [c for c in extra if c not in df.columns]:
            raise LakeError(f"{table}: DataFrame lacks the columns {missing} of its tee table {tee}")
        df = self._conform_spark(df, s, info, keep=[column, *extra])
        if mode == "merge" and engine != "delta-spark":
            data, diverted = split_diverted(df.toArrow(), column)
            version = self.write_arrow(table, data, "merge", info) if len(data) else None
            return SplitWrite(version, len(data), diverted if diverted is not None else pa.table({}))
        if engine == "delta-spark":  # pragma: no cover - needs Delta jars; two passes over df
            diverted = df.where(F.col(column).isNotNull()).select(f"{column}.*").toArrow()
            rows = df.where(F.col(column).isNull()).drop(column)
            if skip_empty and not rows.take(1):
                return SplitWrite(None, 0, diverted)
            version = (self._merge_delta_spark(rows, table, s, info, True) if mode == "merge"
                       else self._write_delta_spark(rows, table, s, mode, info))
            return SplitWrite(version, rows.count(), diverted)  # a third pass: this path has no manifest
        return self._write_split(df, table, s, mode, info, column, skip_empty=skip_empty, tee=tee)

    def write_mapped_diverting(self, df, fn, table: str, mode: WriteMode, info: CommitInfo, column: str) -> SplitWrite:
        """:meth:`write_spark_diverting` of ``fn`` applied to each partition of ``df``, in one pass.

        ``fn``: a partition as one Arrow table -> the rows, with ``table``'s columns but the lineage
        ones, and the struct ``column``. The executors' Python workers run it and write its output
        themselves (:func:`slimrec.spark_delta.collect_mapped_add_actions`): what ``fn`` makes never
        goes back to the JVM. The default engine only, append or overwrite.
        """
        s = spec(table)
        self._check_mode(s, mode)
        if mode not in ("append", "overwrite"):
            raise LakeError(f"{table}: write_mapped_diverting appends or overwrites, not {mode!r}")
        return self._write_split(df, table, s, mode, info, column, mapped=fn)

    def _write_split(self, df, table: str, s: TableSpec, mode: str, info: CommitInfo, column: str, mapped=None,
                     skip_empty: bool = False, tee: str | None = None) -> SplitWrite:
        staging = join(self.path(table), "_diverted", uuid.uuid4().hex)
        fs, staging_path = filesystem(staging, self.fs_options)
        try:
            version, written, files, tee_version = self._write_files_then_commit(
                df, table, s, mode, info, (column, staging), mapped, skip_empty, tee)
            diverted = (pa.concat_tables([pq.read_table(filesystem(f, self.fs_options)[1], filesystem=fs) for f in files])
                        if files else pa.table({}))
        finally:
            try:
                fs.delete_dir(staging_path)
            except (FileNotFoundError, OSError):
                pass  # nothing was diverted (the folder was never made), or already gone
        return SplitWrite(version, written, diverted, tee_version)

    def _conform_spark(self, df, s: TableSpec, info: CommitInfo, keep: list[str] = ()):
        """``df`` with the lineage columns filled, in ``s``'s column order and types (and ``keep`` after)."""
        from pyspark.sql import functions as F

        if s.lineage:
            if "run_date" not in df.columns:
                df = df.withColumn("run_date", F.lit(info.run_date))
            if "input_versions" not in df.columns:
                df = df.withColumn("input_versions", F.lit(json.dumps(info.input_versions, sort_keys=True)))
        missing = [c for c in s.column_names if c not in df.columns]
        if missing:
            raise LakeError(f"{s.name}: DataFrame lacks columns {missing}")
        # a kept struct's fields all nullable: Arrow cannot hold a null struct whose fields are
        # declared non-null (PySpark's toArrow fails on F.lit fields under F.when)
        kept = [F.col(c).cast(_nullable_fields(df.schema[c].dataType)).alias(c) for c in keep]
        return df.select(*[F.col(c).cast(s.spark_schema()[c].dataType) for c in s.column_names], *kept)

    def _write_files_then_commit(self, df, table: str, s: TableSpec, mode: str, info: CommitInfo, divert=None,
                                 mapped=None, skip_empty: bool = False, tee: str | None = None):
        from slimrec.spark_delta import collect_mapped_add_actions

        uri = self.path(table)
        tee_spec = spec(tee) if tee else None
        for u in (uri, self.path(tee) if tee else None):
            if u and not is_remote(u):
                Path(u).mkdir(parents=True, exist_ok=True)
        fn = None if mapped is None else (lambda t: with_lineage(mapped(t), s, info))  # runs in the executors
        actions, diverted, teed = collect_mapped_add_actions(
            df, fn, uri, s, self.target_file_rows, *(divert or (None, None)), fs_options=self.fs_options,
            tee=(self.path(tee), tee_spec) if tee else None)
        try:
            v, n = self._commit(table, s, mode, info, actions, skip_empty)
        except BaseException:
            self._remove_uncommitted(tee, teed)
            raise
        tee_version = None
        if tee:
            if v is None and skip_empty:  # nothing committed to the table: nor to its tee
                self._remove_uncommitted(tee, teed)
            else:
                tee_version = self._commit(tee, tee_spec, mode, info, teed, False)[0]
        return v, n, diverted, tee_version

    def _remove_uncommitted(self, table: str | None, actions: list) -> None:
        """Delete the files of add-actions that were never committed (``table``'s, relative paths)."""
        if not table:
            return
        fs, root = filesystem(self.path(table), self.fs_options)
        for a in actions:
            try:
                fs.delete_file(f"{root}/{a.path}")
            except (FileNotFoundError, OSError):
                pass

    def _commit(self, table: str, s: TableSpec, mode: str, info: CommitInfo, actions: list, skip_empty: bool):
        """One Delta transaction of files written by the executors: ``(version, rows)``; version None when
        ``skip_empty`` and there is nothing to commit."""
        uri = self.path(table)
        if mode == "replace_date":
            bad = {a.partition_values.get("run_date") for a in actions} - {info.run_date.isoformat()}
            if bad:
                raise LakeError(f"replace_date into {table}: rows carry run_date {sorted(bad)}, not {info.run_date}")
        props = info.properties(mode)
        schema = s.arrow_schema()
        if not actions and skip_empty:
            log.info("lake: %s %s of 0 rows: no commit", table, mode)
            return None, 0
        if not self.exists(table):
            with _concurrent_commit(table):
                create_table_with_add_actions(
                    uri, _delta_schema(schema), actions, mode="overwrite", partition_by=list(s.partition_by) or None,
                    commit_properties=props, storage_options=self.storage_options,
                )
        else:
            if mode == "append" and not actions:
                log.info("lake: %s append of 0 rows: no commit", table)
                return self.version(table), 0
            dt = self._dt(table)
            kwargs: dict[str, Any] = {}
            if mode == "replace_date":
                kwargs["partition_filters"] = [("run_date", "=", info.run_date.isoformat())]
            with _concurrent_commit(table):
                dt.create_write_transaction(
                    actions, "append" if mode == "append" else "overwrite", _delta_schema(schema),
                    partition_by=list(s.partition_by) or None, commit_properties=props, **kwargs,
                )
        v = self.version(table)
        n = sum(json.loads(a.stats).get("numRecords", 0) for a in actions)
        log.info("lake: %s %s %d rows in %d files -> version %s", table, mode, n, len(actions), v)
        return v, n

    # The delta-spark paths need io.delta jars (cluster images); these machines cannot fetch them.
    def _write_delta_spark(self, df, table, s, mode, info) -> int:  # pragma: no cover - needs Delta jars
        w = df.write.format("delta").option("userMetadata", json.dumps(info.metadata()))
        if s.partition_by:
            w = w.partitionBy(*s.partition_by)
        if mode == "replace_date":
            w = w.mode("overwrite").option("replaceWhere", f"run_date = '{info.run_date.isoformat()}'")
        else:
            w = w.mode(mode)
        w.save(self.path(table))
        return self.version(table)

    def _merge_delta_spark(self, df, table, s, info, update) -> int:  # pragma: no cover - needs Delta jars
        from delta.tables import DeltaTable as SparkDeltaTable

        if not self.exists(table):
            return self._write_delta_spark(df, table, s, "overwrite", info)
        spark = df.sparkSession
        spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", json.dumps(info.metadata()))
        m = SparkDeltaTable.forPath(spark, self.path(table)).alias("t").merge(df.alias("s"), self._merge_predicate(s))
        if update:
            m = m.whenMatchedUpdateAll()
        m.whenNotMatchedInsertAll().execute()
        return self.version(table)

    # ------------------------------------------------------------------ locking
    @contextmanager
    def lock(self, name: str = "pipeline"):
        """Hold an exclusive lock on this lake for one run; a second run fails at once, clearly.

        A POSIX ``flock`` on ``<root>/_locks/<name>.lock``: released by the OS when the process
        dies, so a killed run never leaves a stale lock. (Local and POSIX-shared file systems; on an
        object store, serialise runs in the scheduler instead.)
        """
        if is_remote(self.root):
            yield
            return
        d = Path(self.root) / "_locks"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{name}.lock"
        fh = open(path, "a+")
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "unknown holder"
                raise LakeError(f"another slimrec run holds the lake lock {path} ({holder}); "
                                "wait for it to finish or stop it") from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} since {datetime.now(tz=UTC).isoformat(timespec='seconds')}")
            fh.flush()
            yield
        finally:
            fh.close()

    # ------------------------------------------------------------------ stage and run records
    def _record_path(self, stage: str) -> str:
        return f"{self.root.rstrip('/')}/_stages/{stage}.json"

    def _run_record_path(self, run_id: str) -> str:
        return f"{self.root.rstrip('/')}/_runs/{run_id}.json"

    def _read_record(self, path: str) -> dict[str, Any] | None:
        if is_remote(path):
            import pyarrow.fs as pafs

            fs, p = filesystem(path, self.fs_options)
            if fs.get_file_info(p).type == pafs.FileType.NotFound:
                return None
            with fs.open_input_stream(p) as f:
                return json.loads(f.read().decode())
        try:
            return json.loads(Path(path).read_text())
        except FileNotFoundError:
            return None

    def _write_record(self, path: str, record: dict[str, Any]) -> None:
        """Replace the JSON file at ``path`` atomically (a reader sees the old or the new record)."""
        data = json.dumps(record, sort_keys=True, default=str)
        if is_remote(path):
            fs, p = filesystem(path, self.fs_options)
            with fs.open_output_stream(p) as f:  # object-store PUTs are atomic
                f.write(data.encode())
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        """What :meth:`record_stage` last stored for ``stage``, or None."""
        return self._read_record(self._record_path(stage))

    def record_stage(self, stage: str, record: dict[str, Any]) -> None:
        """Store that ``stage`` finished (and passed its gate), replacing the previous record atomically.

        A stage writes its tables in several commits; a run killed between two of them leaves no
        record, so the rerun runs the stage again instead of skipping it on the first commit's metadata.
        """
        self._write_record(self._record_path(stage), record)

    def run_record(self, run_id: str) -> dict[str, Any] | None:
        """What :meth:`record_run` stored for ``run_id`` (the command and machine), or None."""
        return self._read_record(self._run_record_path(run_id))

    def record_run(self, run_id: str, record: dict[str, Any]) -> None:
        """Store how run ``run_id`` was started (command line, machine, start time): the results page
        (:mod:`slimrec.results_page`) names them beside the figures that run wrote."""
        self._write_record(self._run_record_path(run_id), record)

    # ------------------------------------------------------------------ listing
    def tables(self) -> list[dict[str, Any]]:
        """Each existing table: name, version, rows, last commit time and stage."""
        from slimrec.schemas.tables import TABLES

        out = []
        for name in TABLES:
            if not self.exists(name):
                continue
            dt = self._dt(name)
            last = dt.history(1)[0]
            ts = last.get("timestamp")
            when = datetime.fromtimestamp(ts / 1000, tz=UTC).isoformat(timespec="seconds") if ts else None
            out.append(
                dict(table=name, version=dt.version(), rows=dt.count(), last_commit=when,
                     stage=last.get("slimrec.stage"), run_date=last.get("slimrec.run_date"))
            )
        return out


def _delta_schema(arrow_schema: pa.Schema):
    from deltalake import Schema

    return Schema.from_arrow(arrow_schema)


def _load_duckdb_extension(con, package: str, name: str) -> None:
    """``LOAD`` the extension file a ``duckdb-extension-*`` package ships (no download at run time)."""
    import importlib

    mod = importlib.import_module(package)
    found = sorted(Path(mod.__file__).parent.glob(f"extensions/*/{name}.duckdb_extension"))
    if not found:
        raise LakeError(f"{package.replace('_', '-')} is installed without its extension file")
    con.execute(f"LOAD '{found[-1]}'")


def duckdb_connection(lake: Lake | None = None):
    """A DuckDB connection with the Delta extension loaded from the ``duckdb-extension-delta`` package.

    ``con.sql(f"SELECT count(*) FROM delta_scan('{lake.path('items')}')")`` then reads any table; for an S3
    ``lake`` the connection also loads ``httpfs`` and holds a secret with the lake's endpoint and the
    environment's credentials.
    """
    import duckdb

    con = duckdb.connect()
    _load_duckdb_extension(con, "duckdb_extension_delta", "delta")
    if lake is not None and lake.is_remote:
        from slimrec.storage import duckdb_secret_sql

        sql = duckdb_secret_sql(lake.root, lake.fs_options)
        if sql:
            _load_duckdb_extension(con, "duckdb_extension_httpfs", "httpfs")
            con.execute(sql)
    return con
