"""The suites as declared data: no Spark needed."""

from __future__ import annotations

from datetime import date

import pytest
from slimrec.quality.config import QualityConfig
from slimrec.schemas.expectations import SUITE_TABLES, Thresholds, suite_for
from slimrec.schemas.tables import TABLES

RUN = date(2024, 1, 15)


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_table_has_a_suite_with_the_common_checks(table):
    s = TABLES[table]
    suite = suite_for(table, Thresholds(), RUN)
    ids = [c.id for c in suite.checks]
    # (expectation, column) is part of the dq_results key: unique within a suite.
    assert len(ids) == len(set(ids)), ids
    for col in s.columns:
        if not col.nullable:
            assert f"expect_column_values_to_not_be_null:{col.name}" in ids
    if len(s.key) == 1:
        assert f"expect_column_values_to_be_unique:{s.key[0]}" in ids
    else:
        assert f"expect_compound_columns_to_be_unique:{','.join(s.key)}" in ids
    run_date_check = suite.check("expect_column_values_to_be_in_set:run_date")
    assert run_date_check.kwargs["value_set"] == ["2024-01-15"]
    assert table in SUITE_TABLES


@pytest.mark.parametrize("table", sorted(TABLES))
def test_checks_name_real_ge_expectations_and_columns(table):
    import great_expectations as gx
    from slimrec.quality.validate import gx_context

    gx_context()  # gx.ExpectationSuite needs an active context
    suite = suite_for(table, Thresholds(), RUN)
    columns = set(TABLES[table].column_names) | {d.name for d in suite.derived}
    for c in suite.checks:
        e = c.to_gx()
        assert isinstance(e, getattr(gx.expectations, c.expectation))
        assert e.expectation_type == c.type  # our snake-case id is GE's own type name
        for col in (c.column or "").split(","):
            assert not col or col in columns, (table, c.id)
    assert len(suite.to_gx().expectations) == len(suite.checks)


def test_thresholds_follow_stage_settings_unless_set():
    from slimrec.config import load_config
    from slimrec.quality.validate import resolve_thresholds

    cfg = load_config("tiny", overrides=["sequences.max_seq_len=50", "prompts.max_chars=999"])
    th = resolve_thresholds(cfg)
    assert (th.min_seq_len, th.max_seq_len, th.max_prompt_chars) == (3, 50, 999)
    cfg = load_config("tiny", overrides=["quality.max_seq_len=70", "quality.embedding_dims={e: 8}"])
    th = resolve_thresholds(cfg)
    assert th.max_seq_len == 70 and th.embedding_dims == (("e", 8),)
    # Only the quality section: the stage defaults.
    assert resolve_thresholds(QualityConfig()).max_prompt_chars == 4000


def test_thresholds_reach_the_suites():
    th = Thresholds(min_seq_len=5, max_seq_len=9, max_prompt_chars=77, min_three_step_share=0.6)
    seq = suite_for("user_sequences", th, RUN).check("expect_column_values_to_be_between:seq_len")
    assert (seq.kwargs["min_value"], seq.kwargs["max_value"]) == (5, 9)
    p = suite_for("prompts", th, RUN).check("expect_column_value_lengths_to_be_between:teacher_prompt")
    assert p.kwargs["max_value"] == 77
    share = suite_for("teacher_rationales", th, RUN).check("expect_column_values_to_be_in_set:dq_ok_has_three_steps")
    assert share.kwargs["mostly"] == 0.6


def test_quality_config_rejects_bad_values():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        QualityConfig(min_three_step_share=1.5)
    with pytest.raises(ValidationError):
        QualityConfig(embedding_dims={"e": 0})
    with pytest.raises(ValidationError):
        QualityConfig(unknown_field=1)
    for name, f in QualityConfig.model_fields.items():
        assert f.description, name
