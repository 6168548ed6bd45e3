"""Each defect a suite claims to catch, planted into an otherwise valid tiny table: exactly that expectation fails.

Great Expectations 1.x runs against the Spark DataFrame of the slice (real
Delta tables in a temp dir, the session ``spark`` fixture).
"""

from __future__ import annotations

import math

import pytest
from conftest import STALE, world, write_table, write_world
from slimrec.quality import QualityGateError, gate, validate_table
from slimrec.schemas.tables import TABLES


def _set(table, i, **values):
    def plant(w):
        w[table][i].update(values)

    return plant


def _dup(table):
    def plant(w):
        w[table].append(dict(w[table][0]))

    return plant


def _empty(table):
    def plant(w):
        w[table] = []

    return plant


def _drop_item(item_id):
    def plant(w):
        w["items"] = [r for r in w["items"] if r["item_id"] != item_id]

    return plant


U, B, NN, SET, LEN, NULL = (
    "expect_column_values_to_be_unique",
    "expect_column_values_to_be_between",
    "expect_column_values_to_not_be_null",
    "expect_column_values_to_be_in_set",
    "expect_column_value_lengths_to_be_between",
    "expect_column_values_to_be_null",
)
PAIR_EQ, PAIR_GE = "expect_column_pair_values_to_be_equal", "expect_column_pair_values_a_to_be_greater_than_b"
COMPOUND, REGEX = "expect_compound_columns_to_be_unique", "expect_column_values_to_match_regex"
ROWS = "expect_table_row_count_to_be_between"
SEQ_IDS = ["i2", "i3", "i9", "i4", "i1"]

# (table, defect, plant, the one check id that must fail). One planting per rule and kind of table:
# a rule generated the same way for many columns or tables (not-null, >= 0, run_date) is planted on
# representatives; tests/quality/test_quality_suites.py checks that every table's suite has it.
DEFECTS = [
    # --- common rules, on tables of every key shape: single, compound, partitioned, nullable key part
    ("items", "duplicate key", _dup("items"), f"{U}:item_id"),
    ("metrics", "duplicate key", _dup("metrics"), f"{COMPOUND}:run_id,backbone,variant,protocol,split,seed"),
    ("prompts", "duplicate key", _dup("prompts"), f"{COMPOUND}:user_id,run_date"),
    ("quarantine", "duplicate key", _dup("quarantine"), f"{COMPOUND}:stage,source,source_row,reason"),
    ("items", "stale run_date", _set("items", 0, run_date=STALE), f"{SET}:run_date"),
    ("prompts", "stale run_date", _set("prompts", 1, run_date=STALE), f"{SET}:run_date"),
    ("items", "empty table", _empty("items"), f"{ROWS}:<table>"),
    ("raw_interactions", "negative source_row", _set("raw_interactions", 0, source_row=-1), f"{B}:source_row"),
    # --- items / interactions
    ("items", "empty item_text", _set("items", 2, item_text=""), f"{LEN}:item_text"),
    ("items", "bad text_hash", _set("items", 2, text_hash="not-a-sha1"), f"{REGEX}:text_hash"),
    ("interactions", "dangling item id", _set("interactions", 3, item_id="i9"), f"{NULL}:dq_unknown_item_id"),
    ("interactions", "negative event_seq", _set("interactions", 0, event_seq=-1), f"{B}:event_seq"),
    # --- user_sequences
    (
        "user_sequences",
        "dangling item id",
        _set("user_sequences", 1, item_ids=SEQ_IDS, history=SEQ_IDS[:3], seq_len=5),
        f"{NULL}:dq_unknown_item_ids",
    ),
    (
        "user_sequences",
        "sequence too short",
        _set("user_sequences", 0, item_ids=["i1", "i2"], history=[], valid_target="i1", test_target="i2", seq_len=2),
        f"{B}:seq_len",
    ),
    ("user_sequences", "seq_len disagrees", _set("user_sequences", 0, seq_len=4), f"{PAIR_EQ}:seq_len,dq_item_ids_len"),
    (
        "user_sequences",
        "target in own history",
        _set("user_sequences", 0, history=["i1", "i3"]),
        f"{NULL}:dq_targets_in_history",
    ),
    # --- prompts
    ("prompts", "empty teacher prompt", _set("prompts", 0, teacher_prompt=""), f"{LEN}:teacher_prompt"),
    ("prompts", "prompt over budget", _set("prompts", 1, student_prompt="x" * 4001), f"{LEN}:student_prompt"),
    ("prompts", "dangling prompt item", _drop_item("i1"), f"{NULL}:dq_unknown_prompt_item_ids"),
    (
        "prompts",
        "target shown in prompt (leakage)",
        _set("prompts", 0, prompt_item_ids=["i1", "i3"]),
        f"{NULL}:dq_prompt_items_not_in_history",
    ),
    ("prompts", "more prompt items than history", _set("prompts", 0, n_prompt_items=3), f"{PAIR_GE}:history_len,n_prompt_items"),
    # --- teacher_rationales
    ("teacher_rationales", "bad status", _set("teacher_rationales", 0, status="great"), f"{SET}:status"),
    ("teacher_rationales", "empty rationale", _set("teacher_rationales", 1, rationale="  "), f"{B}:dq_ok_rationale_chars"),
    (
        "teacher_rationales",
        "three steps missing in too many rows",
        _set("teacher_rationales", 0, step3=None),
        f"{SET}:dq_ok_has_three_steps",
    ),
    ("teacher_rationales", "negative cost", _set("teacher_rationales", 3, cost_usd=-0.01), f"{B}:cost_usd"),
    (
        "teacher_rationales",
        "dangling grounded item",
        _set("teacher_rationales", 2, grounded_item_ids=["i1", "i9"]),
        f"{NULL}:dq_unknown_grounded_item_ids",
    ),
    # --- teacher_batches
    ("teacher_batches", "unknown status", _set("teacher_batches", 1, status="done"), f"{SET}:status"),
    ("teacher_batches", "negative request count", _set("teacher_batches", 0, request_count=-1), f"{B}:request_count"),
    # --- student_models / student_rationales
    ("student_models", "rouge above 1", _set("student_models", 0, heldout_rouge_l_student=1.2), f"{B}:heldout_rouge_l_student"),
    ("student_rationales", "empty rationale", _set("student_rationales", 0, rationale=""), f"{B}:dq_ok_rationale_chars"),
    (
        "student_rationales",
        "three steps missing in too many rows",
        _set("student_rationales", 1, step2=""),
        f"{SET}:dq_ok_has_three_steps",
    ),
    (
        "student_rationales",
        "unregistered model_version",
        _set("student_rationales", 1, model_version="m9"),
        f"{NULL}:dq_unknown_model_version",
    ),
    # --- embeddings
    (
        "rationale_embeddings",
        "NaN in an embedding",
        _set("rationale_embeddings", 0, embedding=[0.1, math.nan, 0.3, 0.4]),
        f"{B}:dq_embedding_non_finite",
    ),
    (
        "rationale_embeddings",
        "wrong dimension",
        _set("rationale_embeddings", 1, embedding=[0.1, 0.2, 0.3], dim=3),
        f"{PAIR_EQ}:dim,dq_expected_dim",
    ),
    (
        "rationale_embeddings",
        "dim column disagrees with the vector",
        _set("rationale_embeddings", 1, embedding=[0.1, 0.2, 0.3]),
        f"{PAIR_EQ}:dq_embedding_len,dim",
    ),
    ("rationale_embeddings", "bad source", _set("rationale_embeddings", 0, source="oracle"), f"{SET}:source"),
    (
        "item_embeddings",
        "infinite value in an embedding",
        _set("item_embeddings", 2, embedding=[0.1, math.inf, 0.3, 0.4]),
        f"{B}:dq_embedding_non_finite",
    ),
    ("item_embeddings", "dangling item id", _set("item_embeddings", 2, item_id="i9"), f"{NULL}:dq_unknown_item_id"),
    (
        "item_embeddings",
        "wrong dimension",
        _set("item_embeddings", 0, embedding=[0.5] * 5, dim=5),
        f"{PAIR_EQ}:dim,dq_expected_dim",
    ),
    # --- recommender_runs / metrics / recommendations
    (
        "recommender_runs",
        "finished before started",
        _set("recommender_runs", 0, finished_ts=world()["recommender_runs"][0]["started_ts"].replace(hour=6)),
        f"{PAIR_GE}:finished_ts,started_ts",
    ),
    ("metrics", "metric out of range", _set("metrics", 1, mrr=1.2), f"{B}:mrr"),
    ("metrics", "hr_20 below hr_10", _set("metrics", 0, hr_20=0.4), f"{PAIR_GE}:hr_20,hr_10"),
    ("metrics", "bad split", _set("metrics", 0, split="train"), f"{SET}:split"),
    ("metrics", "bad protocol", _set("metrics", 3, protocol="sampled"), f"{REGEX}:protocol"),
    ("metrics", "dangling run_id", _set("metrics", 3, run_id="r9"), f"{NULL}:dq_unknown_run_id"),
    ("metrics", "coverage_20 below coverage_10", _set("metrics", 0, coverage_20=0.1),
     f"{PAIR_GE}:coverage_20,coverage_10"),
    ("metrics", "popularity percentile above 100", _set("metrics", 2, popularity_pct_10=101.0),
     f"{B}:popularity_pct_10"),
    ("metrics", "negative novelty", _set("metrics", 2, novelty_10=-0.5), f"{B}:novelty_10"),
    ("experiments", "precision above 1", _set("experiments", 1, precision=1.5), f"{B}:precision"),
    ("experiments", "unknown kind", _set("experiments", 0, kind="oracle"), f"{SET}:kind"),
    ("experiments", "dangling run_id", _set("experiments", 1, run_id="r9"), f"{NULL}:dq_unknown_run_id"),
    ("recommendations", "dangling item id", _set("recommendations", 0, item_ids=["i9", "i4"]), f"{NULL}:dq_unknown_item_ids"),
    ("recommendations", "empty list", _set("recommendations", 1, item_ids=[], scores=[]), f"{B}:dq_n_items"),
    ("recommendations", "scores not best first", _set("recommendations", 0, scores=[0.5, 0.9]), f"{SET}:dq_items_distinct_sorted"),
    ("recommendations", "scores and items differ in length", _set("recommendations", 1, scores=[0.9]), f"{PAIR_EQ}:dq_n_items,dq_n_scores"),
    # --- dq_results
    ("dq_results", "unknown table_name", _set("dq_results", 0, table_name="itemz"), f"{SET}:table_name"),
    ("dq_results", "negative unexpected_count", _set("dq_results", 1, unexpected_count=-1), f"{B}:unexpected_count"),
]

# Both Lake write paths refuse a null in a NOT NULL column; these come from a writer outside Lake.
NULL_DEFECTS = [
    ("user_sequences", "null id", _set("user_sequences", 0, user_id=None), f"{NN}:user_id"),
    ("item_embeddings", "null key part", _set("item_embeddings", 1, encoder=None), f"{NN}:encoder"),
    ("quarantine", "null reason", _set("quarantine", 0, reason=None), f"{NN}:reason"),
]


def _failed(report):
    return sorted(o.check_id for o in report.failures)


@pytest.mark.parametrize("table", sorted(TABLES))
def test_clean_table_passes(spark, tmp_lake, qcfg, table):
    w = world()
    version = write_world(tmp_lake, w, table)
    report = validate_table(tmp_lake, table, cfg=qcfg, spark=spark)
    assert report.success, report.summary()
    assert (report.version, report.rows, report.missing) == (version, len(w[table]), False)
    assert report.outcomes and all(o.success for o in report.outcomes)


@pytest.mark.parametrize(
    "table,defect,plant,expected", DEFECTS + NULL_DEFECTS, ids=[f"{d[0]}-{d[1]}" for d in DEFECTS + NULL_DEFECTS]
)
def test_planted_defect_fails_exactly_its_expectation(spark, tmp_lake, qcfg, table, defect, plant, expected):
    w = world()
    plant(w)
    write_world(tmp_lake, w, table, unchecked=(table, defect, plant, expected) in NULL_DEFECTS)
    report = validate_table(tmp_lake, table, cfg=qcfg, spark=spark)
    assert _failed(report) == [expected], report.summary()
    bad = report.outcome(expected)
    assert bad.observed, report.summary()
    if bad.expectation != ROWS:
        assert bad.unexpected_count and bad.offending_rows, report.summary()


def test_failed_gate_message_names_table_expectation_observed_value_and_rows(spark, tmp_lake, qcfg):
    w = world()
    _set("user_sequences", 1, item_ids=SEQ_IDS, history=SEQ_IDS[:3], seq_len=5)(w)
    version = write_world(tmp_lake, w, "user_sequences")
    with pytest.raises(QualityGateError) as err:
        gate(tmp_lake, "user_sequences", cfg=qcfg, spark=spark, run_id="run7")
    msg = str(err.value)
    assert f"user_sequences version {version}" in msg
    assert "expect_column_values_to_be_null(column='dq_unknown_item_ids')" in msg
    assert "item_ids names ids missing from items" in msg
    assert '1 of 2 rows unexpected (50.0%); values [["i9"]]' in msg
    assert '"user_id": "u2"' in msg and '"item_ids": ["i2", "i3", "i9", "i4", "i1"]' in msg
    assert "pipeline stopped before any later stage reads user_sequences" in msg
    assert err.value.report.success is False
    # The results are stored even though the gate failed.
    dq = tmp_lake.read_pandas("dq_results")
    assert set(dq["validation_id"]) == {f"run7:user_sequences@{version}"}
    assert not dq["suite_success"].any()
    failed = dq[~dq["success"]]
    assert list(failed["expectation"]) == ["expect_column_values_to_be_null"]
    assert list(failed["column_name"]) == ["dq_unknown_item_ids"]
    assert list(failed["unexpected_count"]) == [1]
    assert len(dq) == len(err.value.report.outcomes)


def test_unconfigured_encoder_must_keep_one_dimension(spark, tmp_lake):
    from slimrec.quality.config import QualityConfig

    w = world()
    w["item_embeddings"][2].update(embedding=[0.1, 0.2, 0.3], dim=3)  # two rows of 4, one of 3
    write_world(tmp_lake, w, "item_embeddings")
    report = validate_table(tmp_lake, "item_embeddings", cfg=QualityConfig(embedding_dims={}), spark=spark)
    assert _failed(report) == [f"{PAIR_EQ}:dim,dq_expected_dim"]
    assert report.outcome(f"{PAIR_EQ}:dim,dq_expected_dim").offending_rows == [
        {"item_id": "i3", "encoder": "enc", "dim": 3, "dq_expected_dim": 4}
    ]


def test_default_config_knows_the_bundled_encoder_by_its_name(spark, tmp_lake):
    from slimrec.quality.config import QualityConfig

    w = world()
    enc = "all-MiniLM-L6-v2:st:norm:256"  # the encoder column value the embed stage writes
    for r in w["rationale_embeddings"]:
        r["encoder"] = enc  # dim 4 everywhere: consistent, but MiniLM vectors have 384 values
    write_world(tmp_lake, w, "rationale_embeddings")
    report = validate_table(tmp_lake, "rationale_embeddings", cfg=QualityConfig(), spark=spark)
    assert _failed(report) == [f"{PAIR_EQ}:dim,dq_expected_dim"]
    assert report.outcome(f"{PAIR_EQ}:dim,dq_expected_dim").offending_rows[0]["dq_expected_dim"] == 384


def test_three_step_share_threshold_comes_from_config(spark, tmp_lake):
    from slimrec.quality.config import QualityConfig

    w = world()
    w["teacher_rationales"][0]["step3"] = None  # 3 of 4 ok rows have three steps
    write_world(tmp_lake, w, "teacher_rationales")
    report = validate_table(tmp_lake, "teacher_rationales", cfg=QualityConfig(min_three_step_share=0.75), spark=spark)
    assert report.success, report.summary()
    share = report.outcome(f"{SET}:dq_ok_has_three_steps")
    assert share.unexpected_count == 1 and share.element_count == 4


def test_write_table_helper_writes_empty_tables(tmp_lake):
    write_table(tmp_lake, "items", [])
    assert tmp_lake.count("items") == 0


def test_constrained_student_rows_outside_the_declared_shape_fail(spark, tmp_lake):
    """With a constrained student (a pipeline config), student_rationales also checks each ok row against the
    regex of slimrec.rationale_shape; a quality config alone knows no student, so the check is absent."""
    from slimrec.config import load_config
    from slimrec.rationale_shape import format_rationale

    cfg = load_config("tiny", overrides=["quality.embedding_dims={\"enc\": 4}"])
    w = world()
    for r in w["student_rationales"]:
        r["rationale"] = format_rationale("Likes pens.", "Pens; Acme.", ["Pen 2"])
    write_world(tmp_lake, w, "student_rationales")
    assert validate_table(tmp_lake, "student_rationales", cfg=cfg, spark=spark).success

    w["student_rationales"][1]["rationale"] = format_rationale("Likes pens.", "Pens; Acme.", ["Pen 2", "Pen 3", "Pen 4"])
    write_world(tmp_lake, w, "student_rationales")
    report = validate_table(tmp_lake, "student_rationales", cfg=cfg, spark=spark)
    assert _failed(report) == ["expect_column_values_to_match_regex:dq_ok_student_rationale"], report.summary()
    assert report.outcome("expect_column_values_to_match_regex:dq_ok_student_rationale").offending_rows[0][
        "user_id"] == "u2"
    plain = validate_table(tmp_lake, "student_rationales", cfg=cfg.quality, spark=spark)
    assert plain.success and not any("dq_ok_student_rationale" in o.check_id for o in plain.outcomes)
