"""Expectation suites, one per table, beside the table specs (``tables.py``).

A suite is declared as data so that it can be read, listed and tested without
Great Expectations or Spark:

* :class:`Derived` columns are computed in Spark on the validated slice
  *before* Great Expectations runs, for rules GE has no expectation for: ids
  that must exist in another table (:class:`Missing`), facts about arrays
  (NaN inside an embedding, the length of a vector), values looked up in
  another table (:class:`Lookup`). Their names start with ``dq_``.
* :class:`Check` is one standard GE 1.x expectation (class name + kwargs) on
  a real or derived column, with the defect it catches in words.

``slimrec.quality`` computes the derived columns, turns the checks into a
``gx.ExpectationSuite`` (:meth:`Suite.to_gx`) and validates the Spark
DataFrame. Every threshold comes from :class:`Thresholds`, which the quality
module builds from ``QualityConfig`` (nothing is hard-coded here but facts of
the schema: a sha1 is 40 hex characters, a metric lies in [0, 1]).

Common to every table (:func:`suite_for`): non-nullable columns are not null,
the key is unique, ``run_date`` equals the run's date; tables listed in
``non_empty_tables`` must not be empty. Each table adds its own rules below.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from slimrec.schemas.tables import TABLES, TEACHER_BATCH_STATUSES, TableSpec, spec

SHA1 = r"^[0-9a-f]{40}$"


@dataclass(frozen=True)
class Thresholds:
    """The numbers and sets the suites check against (resolved from ``QualityConfig``)."""

    min_seq_len: int = 3
    max_seq_len: int = 200
    max_prompt_chars: int = 4000
    max_rationale_chars: int = 20_000
    min_three_step_share: float = 0.9
    rationale_statuses: tuple[str, ...] = ("ok", "parse_error", "empty", "truncated", "failed", "skipped_budget")
    rationale_sources: tuple[str, ...] = ("teacher", "student")
    embedding_dims: tuple[tuple[str, int], ...] = (("all-MiniLM-L6-v2", 384),)
    metric_protocol_pattern: str = r"^(full|sampled[0-9]+)$"
    non_empty_tables: tuple[str, ...] = ("raw_interactions", "items", "interactions", "user_sequences")
    # the constrained student's declared shape (slimrec.rationale_shape.shape_regex); None: unconstrained student
    student_shape_regex: str | None = None


@dataclass(frozen=True)
class Missing:
    """Ids of ``column`` (a string or an array of strings) absent from ``table.key``.

    The derived value is the row's unknown ids (an array for an array column,
    the id itself for a string column), or null when all are known (a null id
    is not "unknown": the not-null checks catch it).
    """

    column: str
    table: str
    key: str


@dataclass(frozen=True)
class Lookup:
    """Left join ``table`` on ``on``; its ``columns`` become ``ref_<column>`` for the derived SQL."""

    table: str
    on: tuple[str, ...]
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Derived:
    name: str
    description: str
    sql: str | None = None  # Spark SQL over the slice's columns (and ref_* columns of `lookup`)
    missing: Missing | None = None
    lookup: Lookup | None = None
    # Expected embedding dimension per encoder: configured value, else the slice's most common one.
    expected_dim: bool = False

    @property
    def inputs(self) -> tuple[str, ...]:
        """Tables other than the validated one that this column reads."""
        return tuple(t for t in (self.missing and self.missing.table, self.lookup and self.lookup.table) if t)


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


@dataclass(frozen=True)
class Check:
    expectation: str  # Great Expectations class name in ``gx.expectations``
    kwargs: Mapping[str, Any]
    catches: str  # the defect this check catches, in words
    show: tuple[str, ...] = ()  # columns shown beside the key in offending rows

    @property
    def type(self) -> str:
        """GE's snake-case expectation type (``expect_column_values_to_not_be_null``)."""
        return _snake(self.expectation)

    @property
    def column(self) -> str | None:
        """The column(s) checked: ``a``, ``a,b`` for pairs and compound keys, None for table checks."""
        kw = self.kwargs
        if "column" in kw:
            return kw["column"]
        if "column_A" in kw:
            return f"{kw['column_A']},{kw['column_B']}"
        if "column_list" in kw:
            return ",".join(kw["column_list"])
        return None

    @property
    def id(self) -> str:
        """Unique within a suite: the ``(expectation, column_name)`` part of the dq_results key."""
        return f"{self.type}:{self.column or '<table>'}"

    def to_gx(self):
        import great_expectations as gx

        cls = getattr(gx.expectations, self.expectation)
        return cls(**dict(self.kwargs), meta={"check_id": self.id, "catches": self.catches})


@dataclass(frozen=True)
class Suite:
    table: str
    derived: tuple[Derived, ...]
    checks: tuple[Check, ...]
    version: str = "v1"

    @property
    def name(self) -> str:
        return f"{self.table}.{self.version}"

    def check(self, check_id: str) -> Check:
        for c in self.checks:
            if c.id == check_id:
                return c
        raise KeyError(f"suite {self.name} has no check {check_id!r}; it has {[c.id for c in self.checks]}")

    def to_gx(self, checks: tuple[Check, ...] | None = None):
        """A ``gx.ExpectationSuite`` (needs an active GE context: ``slimrec.quality.validate.gx_context()``)."""
        import great_expectations as gx

        suite = gx.ExpectationSuite(name=self.name)
        for c in self.checks if checks is None else checks:
            suite.add_expectation(c.to_gx())
        return suite


# ---------------------------------------------------------------------- building blocks
def _check(expectation: str, catches: str, show: tuple[str, ...] = (), **kwargs: Any) -> Check:
    return Check(expectation, kwargs, catches, show)


def _not_null(col: str) -> Check:
    return _check("ExpectColumnValuesToNotBeNull", f"null {col}", column=col)


def _between(col: str, catches: str, lo: float | None = None, hi: float | None = None, **kw: Any) -> Check:
    return _check("ExpectColumnValuesToBeBetween", catches, column=col, min_value=lo, max_value=hi, **kw)


def _non_negative(*cols: str) -> list[Check]:
    return [_between(c, f"negative {c}", 0) for c in cols]


def _sha1(col: str) -> Check:
    return _check("ExpectColumnValuesToMatchRegex", f"{col} is not a sha1 hex digest", column=col, regex=SHA1)


def _no_unknown(name: str, column: str, table: str, key: str) -> tuple[Derived, Check]:
    d = Derived(name, f"ids in {column} that {table}.{key} lacks (null: none)", missing=Missing(column, table, key))
    c = _check("ExpectColumnValuesToBeNull", f"{column} names ids missing from {table}", (column,), column=name)
    return d, c


def _in_set(col: str, values: tuple[str, ...] | list[Any], catches: str) -> Check:
    return _check("ExpectColumnValuesToBeInSet", catches, column=col, value_set=list(values))


def _common(s: TableSpec, th: Thresholds, run_date: date) -> list[Check]:
    checks: list[Check] = []
    if s.name in th.non_empty_tables:
        checks.append(_check("ExpectTableRowCountToBeBetween", "empty table", min_value=1))
    checks += [_not_null(c.name) for c in s.columns if not c.nullable]
    if len(s.key) == 1:
        checks.append(_check("ExpectColumnValuesToBeUnique", f"duplicate key {s.key[0]}", column=s.key[0]))
    else:
        checks.append(
            _check("ExpectCompoundColumnsToBeUnique", f"duplicate key ({', '.join(s.key)})", column_list=list(s.key))
        )
    if "run_date" in s.column_names:
        checks.append(_in_set("run_date", [run_date.isoformat()], f"run_date other than the run's date {run_date}"))
    return checks


def _rationale(th: Thresholds) -> tuple[list[Derived], list[Check]]:
    """Rules shared by teacher_rationales and student_rationales."""
    derived = [
        Derived(
            "dq_ok_rationale_chars",
            "length of the trimmed rationale of status=ok rows (null for other statuses)",
            sql="CASE WHEN status = 'ok' THEN length(trim(coalesce(rationale, ''))) END",
        ),
        Derived(
            "dq_ok_has_three_steps",
            "status=ok rows: step1, step2 and step3 all non-empty (null for other statuses)",
            sql="CASE WHEN status = 'ok' THEN length(trim(coalesce(step1, ''))) > 0 "
            "AND length(trim(coalesce(step2, ''))) > 0 AND length(trim(coalesce(step3, ''))) > 0 END",
        ),
    ]
    checks = [
        _in_set("status", th.rationale_statuses, "status outside the allowed set"),
        _between(
            "dq_ok_rationale_chars",
            f"status=ok rationale empty or longer than {th.max_rationale_chars} characters",
            1,
            th.max_rationale_chars,
        ),
        _check(
            "ExpectColumnValuesToBeInSet",
            f"fewer than {th.min_three_step_share:.0%} of status=ok rationales have all three steps",
            ("step1", "step2", "step3"),
            column="dq_ok_has_three_steps",
            value_set=[True],
            mostly=th.min_three_step_share,
        ),
    ]
    return derived, checks


def _embedding(th: Thresholds) -> tuple[list[Derived], list[Check]]:
    derived = [
        Derived("dq_embedding_len", "number of values in the embedding", sql="size(embedding)"),
        Derived(
            "dq_embedding_non_finite",
            "values of the embedding that are null, NaN or infinite",
            sql="size(filter(embedding, x -> x IS NULL OR isnan(x) OR abs(x) = double('infinity')))",
        ),
        Derived(
            "dq_expected_dim",
            "the encoder's configured dimension, else its most common dim in the slice",
            expected_dim=True,
        ),
    ]
    checks = [
        _check(
            "ExpectColumnPairValuesToBeEqual",
            "dim column disagrees with the embedding's length",
            column_A="dq_embedding_len",
            column_B="dim",
        ),
        _check(
            "ExpectColumnPairValuesToBeEqual",
            "embedding dimension other than the encoder's",
            ("encoder",),
            column_A="dim",
            column_B="dq_expected_dim",
        ),
        _between("dq_embedding_non_finite", "NaN, infinite or null value in an embedding", 0, 0),
    ]
    return derived, checks


# ---------------------------------------------------------------------- per table
def _specific(table: str, th: Thresholds) -> tuple[list[Derived], list[Check]]:
    d: list[Derived] = []
    c: list[Check] = []

    def unknown(name: str, column: str, ref: str, key: str) -> None:
        dd, cc = _no_unknown(name, column, ref, key)
        d.append(dd)
        c.append(cc)

    if table in ("raw_interactions", "raw_items"):
        c += _non_negative("source_row")
    elif table == "items":
        c += [
            _check("ExpectColumnValueLengthsToBeBetween", "empty item_text", column="item_text", min_value=1),
            _sha1("text_hash"),
        ]
    elif table == "interactions":
        c += _non_negative("event_seq")
        unknown("dq_unknown_item_id", "item_id", "items", "item_id")
    elif table == "user_sequences":
        c.append(
            _between(
                "seq_len",
                f"sequence length outside [{th.min_seq_len}, {th.max_seq_len}]",
                th.min_seq_len,
                th.max_seq_len,
            )
        )
        d += [
            Derived("dq_item_ids_len", "number of items in item_ids", sql="size(item_ids)"),
            Derived(
                "dq_targets_in_history",
                "valid/test targets found in the user's own history (null: none)",
                sql="nullif(filter(array(valid_target, test_target), t -> array_contains(history, t)), array())",
            ),
        ]
        c += [
            _check(
                "ExpectColumnPairValuesToBeEqual",
                "seq_len disagrees with the length of item_ids",
                column_A="seq_len",
                column_B="dq_item_ids_len",
            ),
            _check(
                "ExpectColumnValuesToBeNull",
                "a target item in its own history (leakage)",
                ("valid_target", "test_target"),
                column="dq_targets_in_history",
            ),
            _sha1("seq_hash"),
        ]
        unknown("dq_unknown_item_ids", "item_ids", "items", "item_id")
    elif table == "prompts":
        for col in ("teacher_prompt", "student_prompt"):
            c.append(
                _check(
                    "ExpectColumnValueLengthsToBeBetween",
                    f"{col} empty or over the {th.max_prompt_chars}-character budget",
                    column=col,
                    min_value=1,
                    max_value=th.max_prompt_chars,
                )
            )
        c += [
            _sha1("prompt_hash"),
            _check(
                "ExpectColumnPairValuesAToBeGreaterThanB",
                "more prompt items than history items",
                column_A="history_len",
                column_B="n_prompt_items",
                or_equal=True,
            ),
        ]
        d.append(
            Derived(
                "dq_prompt_items_not_in_history",
                "prompt items absent from the user's user_sequences.history (null: none)",
                sql="nullif(array_except(prompt_item_ids, coalesce(ref_history, array())), array())",
                lookup=Lookup("user_sequences", ("user_id",), ("history",)),
            )
        )
        c.append(
            _check(
                "ExpectColumnValuesToBeNull",
                "prompt shows items outside the user's history (leakage of targets)",
                ("prompt_item_ids",),
                column="dq_prompt_items_not_in_history",
            )
        )
        unknown("dq_unknown_prompt_item_ids", "prompt_item_ids", "items", "item_id")
    elif table == "teacher_rationales":
        dd, cc = _rationale(th)
        d += dd
        c += cc + _non_negative("attempts", "input_tokens", "output_tokens", "cost_usd", "latency_ms")
        c.append(_sha1("prompt_hash"))
        unknown("dq_unknown_grounded_item_ids", "grounded_item_ids", "items", "item_id")
    elif table == "teacher_batches":
        c += [_in_set("status", TEACHER_BATCH_STATUSES, "status outside the allowed set")]
        c += _non_negative("round", "request_count", "completed_count", "failed_count")
    elif table == "student_rationales":
        dd, cc = _rationale(th)
        d += dd
        c += cc + _non_negative("output_tokens", "latency_ms")
        unknown("dq_unknown_grounded_item_ids", "grounded_item_ids", "items", "item_id")
        unknown("dq_unknown_model_version", "model_version", "student_models", "model_version")
        c.append(_in_set("rationale_source", ("student", "retrieved"), "rationale_source outside student | retrieved"))
        if th.student_shape_regex:
            d.append(Derived("dq_ok_student_rationale", "the rationale of status=ok rows (null for other statuses)",
                             sql="CASE WHEN status = 'ok' THEN rationale END"))
            c.append(_check(
                "ExpectColumnValuesToMatchRegex",
                f"fewer than {th.min_three_step_share:.0%} of status=ok rationales in the constrained student's "
                "declared shape (slimrec.rationale_shape)",
                ("user_id", "model_version"),
                column="dq_ok_student_rationale",
                regex=th.student_shape_regex,
                mostly=th.min_three_step_share,
            ))
    elif table == "student_models":
        c += _non_negative("train_rows", "heldout_rows", "train_loss", "val_loss")
        c += [
            _between(m, f"{m} outside [0, 1]", 0, 1)
            for m in ("heldout_rouge_l_student", "heldout_rouge_l_base")
        ]
    elif table == "rationale_embeddings":
        dd, cc = _embedding(th)
        d += dd
        c += cc + [_in_set("source", th.rationale_sources, "source outside the allowed set"), _sha1("text_hash"),
                   _in_set("rationale_source", ("teacher", "student", "retrieved"),
                           "rationale_source outside teacher | student | retrieved")]
    elif table == "item_embeddings":
        dd, cc = _embedding(th)
        d += dd
        c += cc + [_sha1("text_hash")]
        unknown("dq_unknown_item_id", "item_id", "items", "item_id")
    elif table == "recommender_runs":
        c += _non_negative("n_users", "n_items")
        c.append(
            _check(
                "ExpectColumnPairValuesAToBeGreaterThanB",
                "finished_ts before started_ts",
                column_A="finished_ts",
                column_B="started_ts",
                or_equal=True,
            )
        )
    elif table == "metrics":
        c += [_between(m, f"{m} outside [0, 1]", 0, 1) for m in ("hr_10", "hr_20", "ndcg_10", "ndcg_20", "mrr")]
        c += _non_negative("n_users")
        # beyond accuracy (null off the test/full rows and where not measured: GE skips nulls)
        c += [_between(m, f"{m} outside [0, 1]", 0, 1) for m in ("coverage_10", "coverage_20", "gini_10")]
        c += [
            _between("popularity_pct_10", "popularity_pct_10 outside [0, 100]", 0, 100),
            _between("ild_10", "ild_10 outside [0, 2] (a cosine distance)", 0, 2),
            *_non_negative("novelty_10"),
            _check(
                "ExpectColumnPairValuesAToBeGreaterThanB",
                "coverage_20 below coverage_10",
                column_A="coverage_20",
                column_B="coverage_10",
                or_equal=True,
                ignore_row_if="either_value_is_missing",
            ),
        ]
        c += [
            _check(
                "ExpectColumnValuesToMatchRegex",
                "protocol not full or sampledN",
                column="protocol",
                regex=th.metric_protocol_pattern,
            ),
            _in_set("split", ("valid", "test"), "split other than valid or test"),
            _check(
                "ExpectColumnPairValuesAToBeGreaterThanB",
                "hr_20 below hr_10",
                column_A="hr_20",
                column_B="hr_10",
                or_equal=True,
            ),
            _check(
                "ExpectColumnPairValuesAToBeGreaterThanB",
                "ndcg_20 below ndcg_10",
                column_A="ndcg_20",
                column_B="ndcg_10",
                or_equal=True,
            ),
        ]
        unknown("dq_unknown_run_id", "run_id", "recommender_runs", "run_id")
    elif table == "recommendations":
        d += [
            Derived("dq_n_items", "number of recommended items", sql="size(item_ids)"),
            Derived("dq_n_scores", "number of scores", sql="size(scores)"),
            Derived(
                "dq_items_distinct_sorted",
                "item_ids distinct and scores finite and non-increasing",
                sql="size(array_distinct(item_ids)) = size(item_ids) AND NOT exists(scores, x -> x IS NULL "
                "OR isnan(x) OR abs(x) = double('infinity')) AND (size(scores) < 2 OR "
                "forall(sequence(1, size(scores) - 1), i -> scores[i - 1] >= scores[i]))",
            ),
        ]
        c += [
            _between("dq_n_items", "empty recommendation list", 1),
            _check(
                "ExpectColumnPairValuesToBeEqual",
                "scores and item_ids of different lengths",
                column_A="dq_n_items",
                column_B="dq_n_scores",
            ),
            _in_set("dq_items_distinct_sorted", [True], "repeated items, or scores not finite and best first"),
        ]
        unknown("dq_unknown_item_ids", "item_ids", "items", "item_id")
        unknown("dq_unknown_run_id", "run_id", "recommender_runs", "run_id")
    elif table == "experiments":
        c += [_between("mean", "metric mean outside [0, 1]", 0, 1), *_non_negative("std", "n_users"),
              _between("precision", "precision outside [0, 1]", 0, 1), _between("n_seeds", "no seed", 1),
              *_non_negative("se_vs_text", "se_vs_reference", "se_vs_p0", "se_vs_prev"),
              _in_set("metric", ("hr_10", "hr_20", "ndcg_10", "ndcg_20", "mrr"), "unknown metric name"),
              _in_set("split", ("valid", "test"), "split other than valid or test"),
              _in_set("kind", ("planted",), "unknown experiment kind")]
        unknown("dq_unknown_run_id", "run_id", "recommender_runs", "run_id")
    elif table == "quarantine":
        pass  # the common checks: stage, source, reason present; key unique
    elif table == "dq_results":
        c += _non_negative("unexpected_count", "table_version")
        c.append(_in_set("table_name", sorted(TABLES), "table_name not a lake table"))
    return d, c


def suite_for(table: str, th: Thresholds, run_date: date) -> Suite:
    """The expectation suite of ``table`` for a run dated ``run_date``."""
    s = spec(table)
    derived, specific = _specific(table, th)
    return Suite(table, tuple(derived), tuple(_common(s, th, run_date) + specific))


SUITE_TABLES: tuple[str, ...] = tuple(TABLES)  # every table has a suite (at least the common checks)

__all__ = [
    "Check",
    "Derived",
    "Lookup",
    "Missing",
    "SHA1",
    "SUITE_TABLES",
    "Suite",
    "Thresholds",
    "suite_for",
]
