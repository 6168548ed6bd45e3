"""Executors write Parquet data files of a Delta table; the driver commits them.

Each task of a ``mapInArrow`` writes its Arrow batches as Parquet files
straight into the table folder (partition sub-folders ``col=value/`` where the
table is partitioned, with the partition columns left out of the files, as
Delta wants) and returns the add-actions (path relative to the table root,
size, partition values, stats), which the driver collects:
:class:`slimrec.lake.Lake` then commits all of them in one Delta transaction.
Until that commit the files are invisible to every Delta reader; a job that
fails removes the files its tasks wrote (their names carry the job's id).
A ``mapInArrow`` rather than a Python Data Source writer: the latter starts a
planner process on first use, about 3 s of every process's first write.

With the ``divert_column`` option (a struct column), a row whose value there
is not null is not written to the table: that struct's fields go to Parquet
files under ``divert_dir`` instead (a stage's quarantine records, for
example), so the table and its rejects come out of one pass over the data. With ``tee``, every row also
goes to a second table's files (ingest's raw_interactions beside interactions), committed by the
driver after the first.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow.fs import FileSelector, FileType
from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition

from slimrec.delta_files import file_stats, make_add_action, partition_value, split_diverted
from slimrec.storage import filesystem, join


@dataclass
class FilesWritten:
    actions: list[dict]
    diverted: list[str]  # files under divert_dir


class _Writer:
    def __init__(self, options: dict):
        self.root = options["path"]  # a local folder or an object-store URI
        # not secrets (see slimrec.storage): an executor takes its credentials from its own environment
        self.fs_options = json.loads(options.get("fs_options") or "{}")
        self.prefix = "part-" + options.get("job", "")  # every file of one job starts with it
        self.partition_by = [p for p in options.get("partition_by", "").split(",") if p]
        self.schema = pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(options["arrow_schema"])))
        self.max_rows = int(options["target_file_rows"])
        self.divert = options.get("divert_column") or None
        self.divert_dir = options.get("divert_dir")
        if self.divert and not self.divert_dir:
            raise ValueError("divert_column needs divert_dir")
        self._actions: list[dict] = []
        self._diverted: list[str] = []  # files under divert_dir
        self._side: list[pa.Table] = []  # diverted rows not yet written
        self._side_rows = 0
        self._pending: dict[tuple, list] = {}  # partition key -> [partition values, tables, rows]

    def _put(self, t: pa.Table, uri: str, **kw) -> int:
        """Write ``t`` as one Parquet file at ``uri`` (local or object store); its size in bytes."""
        fs, path = filesystem(uri, self.fs_options)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(t, path, filesystem=fs, coerce_timestamps="us", **kw)
        return fs.get_file_info(path).size

    def _write_diverted(self, parts: list[pa.Table]) -> str:
        name = f"{self.prefix}{uuid.uuid4().hex}.parquet"
        self._put(pa.concat_tables(parts), join(self.divert_dir, name))
        return name

    def _write_file(self, t: pa.Table, pvals: dict) -> dict:
        sub = "/".join(f"{k}={pvals[k] if pvals[k] is not None else '__HIVE_DEFAULT_PARTITION__'}" for k in self.partition_by)
        rel = (sub + "/" if sub else "") + f"{self.prefix}{uuid.uuid4().hex}.snappy.parquet"
        size = self._put(t, join(self.root, rel), compression="snappy")
        return {"path": rel, "size": size, "partition_values": pvals, "stats": file_stats(t)}

    def _split(self, t: pa.Table) -> list[tuple[dict, pa.Table]]:
        """``t`` -> (partition values, rows without the partition columns) per partition value present."""
        if not self.partition_by:
            return [({}, t)]
        keys = t.select(self.partition_by).group_by(self.partition_by).aggregate([]).to_pylist()
        groups = []
        for key in keys:
            mask = None
            for k, v in key.items():
                m = pc.is_null(t[k]) if v is None else pc.equal(t[k], pa.scalar(v, t.schema.field(k).type))
                mask = m if mask is None else pc.and_(mask, m)
            groups.append(({k: partition_value(v) for k, v in key.items()}, t.filter(mask).drop(self.partition_by)))
        return groups

    def write(self, iterator) -> FilesWritten:
        """Stream the task's batches into files of at most ``max_rows`` rows per partition value.

        At most one unfinished file's rows per partition value are held in memory, whatever the
        size of the task's partition.
        """
        for b in iterator:
            self.push(b)
        return self.finish()

    def push(self, b: pa.RecordBatch) -> None:
        """One batch: its diverted rows aside, the others into this task's files (see :meth:`write`)."""
        if not b.num_rows:
            return
        t = pa.Table.from_batches([b])
        if self.divert:
            t, rejected = split_diverted(t, self.divert)
            if rejected is not None:
                self._side.append(rejected)
                self._side_rows += len(rejected)
                if self._side_rows >= self.max_rows:
                    self._diverted.append(self._write_diverted(self._side))
                    self._side, self._side_rows = [], 0
            if not len(t):
                return
        t = t.select(self.schema.names).cast(self.schema, safe=False)
        for pvals, part in self._split(t):
            entry = self._pending.setdefault(tuple(sorted(pvals.items())), [pvals, [], 0])
            entry[1].append(part)
            entry[2] += len(part)
            if entry[2] >= self.max_rows:
                whole = pa.concat_tables(entry[1])
                full = len(whole) // self.max_rows * self.max_rows
                for off in range(0, full, self.max_rows):
                    self._actions.append(self._write_file(whole.slice(off, self.max_rows), pvals))
                rest = whole.slice(full)
                entry[1], entry[2] = ([rest] if len(rest) else []), len(rest)

    def finish(self) -> FilesWritten:
        """The last unfinished files written; what this task wrote."""
        for pvals, parts, n in self._pending.values():
            if n:
                self._actions.append(self._write_file(pa.concat_tables(parts), pvals))
        self._pending = {}
        if self._side:
            self._diverted.append(self._write_diverted(self._side))
            self._side, self._side_rows = [], 0
        return FilesWritten(self._actions, self._diverted)

    def remove_job_files(self) -> int:
        """Delete every file this job's tasks wrote (table and side files): a failed job's leftovers."""
        n = 0
        for uri in (self.root, self.divert_dir):
            if not uri:
                continue
            fs, path = filesystem(uri, self.fs_options)
            try:
                found = fs.get_file_info(FileSelector(path, recursive=True, allow_not_found=True))
            except OSError:
                continue
            for f in found:
                if f.type == FileType.File and f.base_name.startswith(self.prefix):
                    try:
                        fs.delete_file(f.path)
                        n += 1
                    except FileNotFoundError:
                        pass
        return n


def _writer_options(table_uri: str, spec, target_file_rows: int, divert_column, divert_dir,
                    fs_options: dict | None = None) -> dict:
    opts = {"path": table_uri, "partition_by": ",".join(spec.partition_by),
            "arrow_schema": spec.arrow_schema().serialize().to_pybytes().hex(),
            "target_file_rows": str(target_file_rows), "fs_options": json.dumps(fs_options or {}),
            "job": uuid.uuid4().hex[:12] + "-"}
    if divert_column:
        opts |= {"divert_column": divert_column, "divert_dir": divert_dir}
    return opts


def collect_mapped_add_actions(df, fn, table_uri: str, spec, target_file_rows: int,
                               divert_column: str | None = None, divert_dir: str | None = None,
                               fs_options: dict | None = None, tee=None) -> tuple[list, list[str], list]:
    """:func:`collect_add_actions` of ``fn`` applied to each partition of ``df``, in one pass.

    ``fn`` takes a partition as one Arrow table and returns the rows to write (``spec``'s columns,
    and ``divert_column`` if given); ``None`` writes ``df``'s batches as they stream in. The
    Python worker that runs ``fn`` writes its output itself: the rows never go back to the JVM
    (for build_sequences at 5M events, 200K rows of two string lists each). If the job fails, the
    files its tasks wrote are removed before the error goes on (a task attempt that dies with its
    worker may still leave some, unreferenced and invisible to Delta readers).

    ``tee``: ``(table_uri, spec)`` of a second table that every row goes to as well, diverted or
    not, before ``fn`` (its columns must be among the rows'): ingest writes raw_interactions in the
    same pass as interactions. Returns the add-actions, the diverted files and the second table's
    add-actions (empty without ``tee``).
    """
    opts = _writer_options(table_uri, spec, target_file_rows, divert_column, divert_dir, fs_options)
    tee_opts = _writer_options(tee[0], tee[1], target_file_rows, None, None, fs_options) if tee else None

    def task(batches):
        tee_writer = _Writer(tee_opts) if tee_opts else None
        if tee_writer is not None:
            batches = _teed(batches, tee_writer)
        if fn is None:
            msg = _Writer(opts).write(batches)
        else:
            batches = list(batches)
            if not batches:
                return
            msg = _Writer(opts).write(iter(fn(pa.Table.from_batches(batches)).to_batches()))
        teed = tee_writer.finish().actions if tee_writer is not None else []
        yield pa.RecordBatch.from_pydict({"actions": [json.dumps(msg.actions)], "diverted": [json.dumps(msg.diverted)],
                                          "tee": [json.dumps(teed)]})

    try:
        rows = df.mapInArrow(task, "actions string, diverted string, tee string").collect()
    except BaseException:
        _remove_written(opts, tee_opts)
        raise

    def actions(column: str) -> list:
        return [make_add_action(a["path"], a["size"], a["partition_values"], a["stats"])
                for r in rows for a in json.loads(r[column])]

    diverted = [join(divert_dir, p) for r in rows for p in json.loads(r.diverted)] if divert_column else []
    return actions("actions"), diverted, actions("tee") if tee else []


def _teed(batches, writer: _Writer):
    """``batches`` as they are, each also pushed to ``writer`` (its table's columns)."""
    names = writer.schema.names
    for b in batches:
        writer.push(b.select(names))
        yield b


def _remove_written(*writer_options: dict | None) -> int:
    """Delete every file the jobs of these writer options wrote: a failed or abandoned job's files."""
    return sum(_Writer(o).remove_job_files() for o in writer_options if o)


def collect_add_actions(df, table_uri: str, spec, target_file_rows: int, divert_column: str | None = None,
                        divert_dir: str | None = None, fs_options: dict | None = None) -> tuple[list, list[str]]:
    """Let the executors write ``df`` (``spec``'s columns, and ``divert_column`` if given) as files.

    Returns the add-actions and the paths of the files that hold the diverted rows (see the module
    docstring; none without ``divert_column``).
    """
    return collect_mapped_add_actions(df, None, table_uri, spec, target_file_rows, divert_column, divert_dir,
                                      fs_options)[:2]


# ---------------------------------------------------------------------------------------------- reading
class _FileGroup(InputPartition):
    def __init__(self, files: list):
        self.files = files  # [uri, {partition column: value as text or None}]


class _Reader(DataSourceReader):
    def __init__(self, options: dict, schema):
        from pyspark.sql.pandas.types import to_arrow_schema

        self.files = json.loads(options["files"])
        self.fs_options = json.loads(options.get("fs_options") or "{}")
        # the batches must carry exactly the Arrow schema Spark derives from the DataFrame's schema
        self.schema = to_arrow_schema(schema, timezone="UTC")
        self.files_per_task = max(1, int(options.get("files_per_task", "1")))

    def partitions(self):
        n = self.files_per_task
        return [_FileGroup(self.files[i:i + n]) for i in range(0, len(self.files), n)]

    def read(self, partition):
        """Each file's record batches, its partition values as constant columns, columns the file lacks
        (added to the table later) as nulls, all cast to the table's schema."""
        for uri, pvals in partition.files:
            fs, path = filesystem(uri, self.fs_options)
            pf = pq.ParquetFile(fs.open_input_file(path))
            stored = set(pf.schema_arrow.names)
            cols = [f.name for f in self.schema if f.name in stored and f.name not in pvals]
            for b in pf.iter_batches(columns=cols):
                out = []
                for f in self.schema:
                    if f.name in pvals:
                        v = pvals[f.name]
                        out.append(pa.nulls(b.num_rows, f.type) if v is None
                                   else pa.array([v] * b.num_rows, pa.string()).cast(f.type))
                    elif f.name in stored:
                        out.append(b.column(f.name).cast(f.type, safe=False))
                    else:
                        out.append(pa.nulls(b.num_rows, f.type))
                yield pa.RecordBatch.from_arrays(out, schema=self.schema)


class DeltaFilesReadSource(DataSource):
    """``spark.read.format("slimrec_delta_read")``: the given data files of a Delta snapshot, read by the
    executors with pyarrow's filesystems (local disk, S3, GCS, Azure: no Hadoop connector jars), one task per
    ``files_per_task`` files. :meth:`slimrec.lake.Lake.read_spark` fills the options from delta-rs."""

    @classmethod
    def name(cls):
        return "slimrec_delta_read"

    def reader(self, schema):
        return _Reader(self.options, schema)


def read_files(spark, files: list[tuple[str, dict]], spark_schema, fs_options: dict | None = None,
               files_per_task: int = 1):
    """A DataFrame over Delta data ``files`` ([uri, partition values]) through :class:`DeltaFilesReadSource`."""
    def text(v):
        return None if v is None else v.isoformat() if hasattr(v, "isoformat") else str(v)

    payload = [[uri, {k: text(v) for k, v in pv.items()}] for uri, pv in files]
    return (spark.read.format("slimrec_delta_read").schema(spark_schema)
            .option("files", json.dumps(payload)).option("fs_options", json.dumps(fs_options or {}))
            .option("files_per_task", str(files_per_task)).load())
