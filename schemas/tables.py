"""Every table of the lake, declared once.

A :class:`TableSpec` lists columns (name, logical type, nullability), the key
and the partition columns. Spark and Arrow schemas are derived from it
(:meth:`TableSpec.arrow_schema`, :meth:`TableSpec.spark_schema`), so a column
is added in one place. Expectation suites live beside it in
``schemas/expectations.py``.

Logical types: ``string int32 int64 float32 float64 bool date timestamp`` and
``list<T>`` of any of them. Timestamps are microseconds, UTC (Delta wants us).

Every derived table carries lineage columns: ``run_date`` (the run's logical
date) and ``input_versions`` (JSON ``{table: delta_version}`` of its inputs).

A column added to a table that lakes already hold is declared ``added_later``
(and nullable): files written before it, and writers that predate it, lack it;
:meth:`TableSpec.conform_arrow` and the lake fill it with null, and the lake
widens the stored table's schema on the first write that carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

_SCALARS: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}


def arrow_type(logical: str) -> pa.DataType:
    """Arrow type of a logical type string (``list<float32>`` -> ``list<item: float>``)."""
    if logical.startswith("list<") and logical.endswith(">"):
        return pa.list_(arrow_type(logical[5:-1]))
    try:
        return _SCALARS[logical]
    except KeyError:
        raise ValueError(f"unknown logical type {logical!r}") from None


def spark_type(logical: str):
    """Spark SQL type of a logical type string (imported lazily: Ray workers need no pyspark)."""
    from pyspark.sql import types as T

    scalars = {
        "string": T.StringType(),
        "int32": T.IntegerType(),
        "int64": T.LongType(),
        "float32": T.FloatType(),
        "float64": T.DoubleType(),
        "bool": T.BooleanType(),
        "date": T.DateType(),
        "timestamp": T.TimestampType(),
    }
    if logical.startswith("list<") and logical.endswith(">"):
        # containsNull=True: Spark marks collect_list output NOT NULL, which breaks later MERGE inserts.
        return T.ArrayType(spark_type(logical[5:-1]), containsNull=True)
    return scalars[logical]


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool = True
    description: str = ""
    # Added after lakes already held the table: may be absent from stored files and from a writer's
    # rows, and reads as null there (see the module docstring). Must be nullable.
    added_later: bool = False

    def __post_init__(self) -> None:
        if self.added_later and not self.nullable:
            raise ValueError(f"column {self.name}: a column added later must be nullable (old rows lack it)")


@dataclass(frozen=True)
class TableSpec:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    partition_by: tuple[str, ...] = ()
    description: str = ""
    lineage: bool = field(default=True)

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"{self.name} has no column {name!r}")

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, arrow_type(c.type), nullable=c.nullable) for c in self.columns])

    def spark_schema(self):
        from pyspark.sql import types as T

        # Spark-side every field is nullable: Spark's own nullability inference differs by
        # operator and a NOT NULL mismatch would fail writes that Arrow/Delta accept. NOT NULL
        # is enforced on the Arrow schema at commit time and by the expectation suites.
        return T.StructType([T.StructField(c.name, spark_type(c.type), True) for c in self.columns])

    def conform_arrow(self, table: pa.Table) -> pa.Table:
        """Select, order and cast ``table`` to this spec; fail clearly on a missing column (columns
        ``added_later`` are filled with null instead)."""
        missing = [c for c in self.column_names if c not in table.column_names]
        late = [c for c in missing if self.column(c).added_later]
        missing = [c for c in missing if c not in late]
        if missing:
            raise ValueError(f"table {self.name}: missing columns {missing}")
        for c in late:
            table = table.append_column(c, pa.nulls(len(table), arrow_type(self.column(c).type)))
        table = table.select(self.column_names)
        return table.cast(self.arrow_schema(), safe=False)


def _lineage() -> tuple[Column, ...]:
    return (
        Column("run_date", "date", False, "logical date of the run that wrote the row"),
        Column("input_versions", "string", True, "JSON {table: delta version} of the inputs"),
    )


def _spec(name, cols, key, partition_by=(), description="", lineage=True) -> TableSpec:
    cols = tuple(cols) + (_lineage() if lineage else ())
    return TableSpec(name, cols, tuple(key), tuple(partition_by), description, lineage)


C = Column
_RATIONALE_COLS = (
    C("rationale", "string", True, "the whole answer"),
    C("step1", "string", True, "user preference summary"),
    C("step2", "string", True, "recommended categories and brands"),
    C("step3", "string", True, "recommended specific items"),
    C("grounded_item_ids", "list<string>", True, "catalogue item_ids that step 3 names"),
    C("status", "string", False, "ok | parse_error | empty | truncated | failed | skipped_budget"),
    C("error", "string", True, "why the row is not ok"),
)

# teacher_batches.status: the Batch API's own statuses, plus slimrec's before the create is answered
# (submitting) and after the answers are in teacher_rationales (collected) or no longer wanted (abandoned).
TEACHER_BATCH_STATUSES = (
    "submitting", "validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
    "cancelled", "collected", "abandoned",
)

TABLES: dict[str, TableSpec] = {
    s.name: s
    for s in [
        _spec(
            "raw_interactions",
            [
                C("source_file", "string", False),
                C("source_row", "int64", False, "0-based row/position in the source file"),
                C("user_raw", "string", True),
                C("item_raw", "string", True),
                C("ts_raw", "string", True, "timestamp as found in the source"),
                C("position", "int64", True, "position in the user's source list, when the source is ordered"),
            ],
            ["source_file", "source_row"],
            description="interactions as read, one row per source record",
        ),
        _spec(
            "raw_items",
            [
                C("source_file", "string", False),
                C("source_row", "int64", False),
                C("item_raw", "string", True),
                C("payload", "string", True, "the source record as JSON"),
            ],
            ["source_file", "source_row"],
            description="item records as read",
        ),
        _spec(
            "items",
            [
                C("item_id", "string", False),
                C("title", "string", True),
                C("brand", "string", True),
                C("categories", "list<string>", True, "category path, coarse to fine"),
                C("description", "string", True),
                C("item_text", "string", False, "title | categories | brand: what the encoder reads"),
                C("text_hash", "string", False, "sha1 of item_text"),
            ],
            ["item_id"],
            description="catalogue with normalised text",
        ),
        _spec(
            "interactions",
            [
                C("user_id", "string", False),
                C("item_id", "string", False),
                C("event_ts", "timestamp", False),
                C("event_seq", "int64", False, "stable tie-break: source order within the user"),
                C("ts_derived", "bool", False, "true when event_ts was derived from order, not read"),
                C("source_file", "string", True),
            ],
            ["user_id", "item_id", "event_ts"],
            description="deduplicated events",
        ),
        _spec(
            "user_sequences",
            [
                C("user_id", "string", False),
                C("item_ids", "list<string>", False, "whole ordered sequence, oldest first"),
                C("history", "list<string>", False, "item_ids without the valid and test targets"),
                C("valid_target", "string", True),
                C("test_target", "string", True),
                C("seq_len", "int32", False),
                C("last_event_ts", "timestamp", True),
                C("seq_hash", "string", False, "sha1 of item_ids"),
            ],
            ["user_id"],
            description="leave-one-out sequences",
        ),
        _spec(
            "prompts",
            [
                C("user_id", "string", False),
                C("teacher_prompt", "string", False),
                C("student_prompt", "string", False),
                C("prompt_version", "string", False),
                C("prompt_hash", "string", False, "sha1 over (template version, teacher prompt)"),
                C("history_len", "int32", False, "items in the user's history"),
                C("n_prompt_items", "int32", False, "items shown in the prompt after truncation"),
                C("prompt_item_ids", "list<string>", True, "the items shown, oldest first"),
                C("seq_hash", "string", False),
            ],
            ["user_id", "run_date"],
            partition_by=["run_date"],
            description="teacher and student chain-of-thought prompts",
        ),
        _spec(
            "teacher_rationales",
            [
                C("prompt_hash", "string", False),
                C("teacher_model", "string", False),
                C("user_id", "string", False),
                C("prompt_version", "string", False),
                *_RATIONALE_COLS,
                C("attempts", "int32", False),
                C("input_tokens", "int64", True),
                C("output_tokens", "int64", True),
                C("cost_usd", "float64", True),
                C("latency_ms", "float64", True),
                C("finish_reason", "string", True),
                C("answered_ts", "timestamp", True),
            ],
            ["prompt_hash", "teacher_model"],
            description="teacher answers, cached forever by prompt hash",
        ),
        _spec(
            "teacher_batches",
            [
                C("submission_id", "string", False, "slimrec's id of one request file (uuid4 hex); also in the batch's "
                  "metadata, to find a batch whose create answer was lost"),
                C("teacher_model", "string", False),
                C("base_url", "string", False, "the API root the batch lives on (a resume polls only its own)"),
                C("round", "int32", False, "0: prompts sent for the first time in a run; n: retry n of failed lines"),
                C("status", "string", False, "one of TEACHER_BATCH_STATUSES"),
                C("batch_id", "string", True, "the API's batch id (null until the create is answered)"),
                C("input_file_id", "string", True),
                C("output_file_id", "string", True),
                C("error_file_id", "string", True),
                C("custom_ids", "list<string>", False, "the prompt_hash of each request line, in file order"),
                C("request_count", "int32", False),
                C("completed_count", "int32", True, "request_counts.completed, as last polled"),
                C("failed_count", "int32", True, "request_counts.failed, as last polled"),
                C("error", "string", True, "why the batch ended without every answer, or the last API error"),
                C("created_ts", "timestamp", False),
                C("updated_ts", "timestamp", False),
            ],
            ["submission_id"],
            description="Batch API submissions of the teacher and their state (a killed run resumes them)",
        ),
        _spec(
            "student_models",
            [
                C("model_version", "string", False),
                C("base_model", "string", False),
                C("adapter_path", "string", False),
                C("lora_config", "string", False, "JSON"),
                C("train_rows", "int64", False),
                C("heldout_rows", "int64", False),
                C("train_loss", "float64", True),
                C("val_loss", "float64", True),
                C("heldout_rouge_l_student", "float64", True),
                C("heldout_rouge_l_base", "float64", True),
                C("metrics", "string", True, "JSON of every measured figure"),
                C("created_ts", "timestamp", False),
            ],
            ["model_version"],
            description="registered LoRA adapters",
        ),
        _spec(
            "student_rationales",
            [
                C("user_id", "string", False),
                C("model_version", "string", False),
                C("prompt_hash", "string", False),
                *_RATIONALE_COLS,
                C("output_tokens", "int64", True),
                C("latency_ms", "float64", True),
                C("rationale_source", "string", True, "student (the student wrote it) | retrieved (taken from "
                  "the nearest seed-pool users, stage retrieve_rationales); null: written before the column, "
                  "by the student", added_later=True),
                C("retrieved_from", "list<string>", True, "retrieved rows: the neighbours' user_ids, nearest "
                  "first (the text is the first one's)", added_later=True),
            ],
            ["user_id", "run_date", "model_version"],
            partition_by=["run_date"],
            description="student rationale per user",
        ),
        _spec(
            "rationale_embeddings",
            [
                C("user_id", "string", False),
                C("source", "string", False, "teacher | student: the variant family that uses the vector"),
                C("model_version", "string", False, "teacher_model or student model_version"),
                C("encoder", "string", False),
                C("text_hash", "string", False),
                C("embedding", "list<float32>", False),
                C("dim", "int32", False),
                C("rationale_source", "string", True, "teacher | student | retrieved (source student: the "
                  "similarity-weighted mean of the nearest seed-pool users' vectors); null: written before the "
                  "column", added_later=True),
            ],
            ["user_id", "source", "encoder"],
            description="rationale vectors",
        ),
        _spec(
            "item_embeddings",
            [
                C("item_id", "string", False),
                C("encoder", "string", False),
                C("text_hash", "string", False),
                C("embedding", "list<float32>", False),
                C("dim", "int32", False),
            ],
            ["item_id", "encoder"],
            description="item text vectors",
        ),
        _spec(
            "recommender_runs",
            [
                C("run_id", "string", False),
                C("dataset", "string", False),
                C("config", "string", False, "JSON of the resolved recommender config"),
                C("best_backbone", "string", True),
                C("best_variant", "string", True),
                C("n_users", "int64", False),
                C("n_items", "int64", False),
                C("notes", "string", True, "JSON: variants missing and why, rationale coverage"),
                C("started_ts", "timestamp", False),
                C("finished_ts", "timestamp", False),
            ],
            ["run_id"],
            description="one row per train_recommender run",
        ),
        _spec(
            "metrics",
            [
                C("run_id", "string", False),
                C("dataset", "string", False),
                C("backbone", "string", False),
                C("variant", "string", False),
                C("protocol", "string", False, "full | sampled100"),
                C("split", "string", False, "valid | test"),
                C("seed", "int32", False),
                C("hr_10", "float64", False),
                C("hr_20", "float64", False),
                C("ndcg_10", "float64", False),
                C("ndcg_20", "float64", False),
                C("mrr", "float64", False),
                C("n_users", "int64", False),
                # Beyond accuracy (slimrec.recommender.beyond): test split, full ranking rows only (null on
                # the others, in runs before them, and where a figure cannot be measured).
                C("coverage_10", "float64", True, "share of catalogue items in at least one top-10 list",
                  added_later=True),
                C("coverage_20", "float64", True, "share of catalogue items in at least one top-20 list",
                  added_later=True),
                C("gini_10", "float64", True, "Gini index of catalogue items' top-10 exposure (unseen = 0)",
                  added_later=True),
                C("popularity_pct_10", "float64", True,
                  "mean popularity percentile (0-100, training counts) of top-10 items", added_later=True),
                C("novelty_10", "float64", True, "mean self-information -log2(training share) of top-10 items, "
                  "bits", added_later=True),
                C("ild_10", "float64", True, "mean pairwise cosine distance of item text vectors in a top-10 "
                  "list (null: no item vectors)", added_later=True),
            ],
            ["run_id", "backbone", "variant", "protocol", "split", "seed"],
            description="evaluation figures",
        ),
        _spec(
            "experiments",
            [
                C("experiment_id", "string", False),
                C("kind", "string", False, "planted: the planted-signal teacher (LEAKS TARGETS by design)"),
                C("dataset", "string", False),
                C("precision", "float64", False, "share of users whose rationale names their held-out items"),
                C("run_id", "string", False, "the train_recommender run of this precision"),
                C("teacher_model", "string", False),
                C("backbone", "string", False),
                C("variant", "string", False),
                C("protocol", "string", False, "full | sampled100"),
                C("split", "string", False, "valid | test"),
                C("metric", "string", False, "hr_10 | hr_20 | ndcg_10 | ndcg_20 | mrr"),
                C("mean", "float64", False, "mean over seeds"),
                C("std", "float64", False, "std over seeds (0 for one seed)"),
                C("n_seeds", "int32", False),
                C("n_users", "int64", False),
                C("reference", "string", True, "the run's strongest no-LLM model or baseline (chosen on validation)"),
                C("diff_vs_text", "float64", True, "paired per-user difference against text (test NDCG@10 only)"),
                C("se_vs_text", "float64", True),
                C("diff_vs_reference", "float64", True, "paired per-user difference against reference"),
                C("se_vs_reference", "float64", True),
                C("diff_vs_p0", "float64", True, "paired difference against the same variant at the lowest precision"),
                C("se_vs_p0", "float64", True),
                C("diff_vs_prev", "float64", True, "paired difference against the same variant at the precision below"),
                C("se_vs_prev", "float64", True),
                C("leakage", "string", False, "why these numbers are not results"),
            ],
            ["experiment_id", "precision", "backbone", "variant", "protocol", "split", "metric"],
            description="rationale-channel experiments: one row per precision x variant x protocol x split x metric",
        ),
        _spec(
            "recommendations",
            [
                C("user_id", "string", False),
                C("item_ids", "list<string>", False, "top-K, best first"),
                C("scores", "list<float64>", False),
                C("run_id", "string", False),
                C("backbone", "string", False),
                C("variant", "string", False),
            ],
            ["user_id", "run_date"],
            partition_by=["run_date"],
            description="top-K per user for serving",
        ),
        _spec(
            "quarantine",
            [
                C("stage", "string", False),
                C("source", "string", False),
                C("source_row", "int64", True),
                C("reason", "string", False),
                C("payload", "string", True, "the offending record, truncated"),
            ],
            ["stage", "source", "source_row", "reason"],
            description="rejected input rows with reasons",
        ),
        _spec(
            "dq_results",
            [
                C("validation_id", "string", False),
                C("table_name", "string", False),
                C("table_version", "int64", True),
                C("suite", "string", False),
                C("suite_success", "bool", False),
                C("expectation", "string", False),
                C("column_name", "string", True),
                C("success", "bool", False),
                C("observed", "string", True),
                C("unexpected_count", "int64", True),
                C("details", "string", True, "JSON: kwargs and sample of offending rows"),
                C("validated_ts", "timestamp", False),
            ],
            ["validation_id", "expectation", "column_name"],
            description="Great Expectations results, one row per expectation",
        ),
    ]
}


def spec(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; known: {', '.join(sorted(TABLES))}") from None
