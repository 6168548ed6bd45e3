"""The gate around the suites: which slice is validated, missing tables, dq_results, Data Docs, the runner stopping."""

from __future__ import annotations

import types
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
from conftest import RUN_DATE, STALE, commit_info, world, write_table
from slimrec.quality import QualityError, QualityGateError, gate, validate_table

DAY1 = date(2024, 1, 14)


def test_table_never_written_is_reported_not_crashed(tmp_lake, qcfg):
    report = validate_table(tmp_lake, "recommendations", cfg=qcfg)  # no Spark needed for this answer
    assert report.missing and not report.success
    assert "recommendations: NOT VALIDATED: table recommendations has never been written" in report.summary()
    with pytest.raises(QualityGateError, match="has never been written"):
        gate(tmp_lake, "recommendations", cfg=qcfg)
    assert not tmp_lake.exists("dq_results")


def test_version_never_written_is_reported(tmp_lake, qcfg):
    write_table(tmp_lake, "items", world()["items"])
    report = validate_table(tmp_lake, "items", cfg=qcfg, version=3)
    assert report.missing and not report.success
    assert "table items has no version 3 (versions 0..0)" in report.summary()


def test_unknown_table_name_raises_a_clear_error(tmp_lake, qcfg):
    with pytest.raises(QualityError, match="unknown table 'itemz'; known: .*items"):
        validate_table(tmp_lake, "itemz", cfg=qcfg)


def test_merge_validates_only_the_rows_of_its_run(spark, tmp_lake, qcfg):
    w = world()
    write_table(tmp_lake, "items", w["items"])
    write_table(tmp_lake, "user_sequences", w["user_sequences"], mode="overwrite", run_date=DAY1)
    changed = dict(w["user_sequences"][1], seq_len=4)
    version = write_table(tmp_lake, "user_sequences", [changed], mode="merge", run_date=RUN_DATE)
    report = validate_table(tmp_lake, "user_sequences", cfg=qcfg, spark=spark)
    assert report.success, report.summary()
    # u1 keeps its older run_date: history, not this run's output.
    assert (report.version, report.rows, report.run_date) == (version, 1, RUN_DATE)
    assert report.slice == f"rows of version {version} with run_date = 2024-01-15 (MERGE)"
    # The first version: the whole table, checked against the date stored with that commit.
    first = validate_table(tmp_lake, "user_sequences", cfg=qcfg, spark=spark, version=0)
    assert first.success and (first.rows, first.run_date) == (2, DAY1)
    assert first.slice == "whole table at version 0 (WRITE Overwrite)"


def test_append_validates_the_added_rows_and_catches_a_stale_date_among_them(spark, tmp_lake, qcfg):
    w = world()
    write_table(tmp_lake, "items", w["items"])
    write_table(tmp_lake, "teacher_rationales", w["teacher_rationales"], run_date=DAY1)
    new = [dict(w["teacher_rationales"][0], prompt_hash="a" * 40), dict(w["teacher_rationales"][1], prompt_hash="b" * 40)]
    new[1]["run_date"] = STALE
    version = write_table(tmp_lake, "teacher_rationales", new, run_date=RUN_DATE)
    report = validate_table(tmp_lake, "teacher_rationales", cfg=qcfg, spark=spark)
    assert report.rows == 2 and report.slice == f"1 file(s) added by version {version} (WRITE Append)"
    assert [o.check_id for o in report.failures] == ["expect_column_values_to_be_in_set:run_date"]
    assert report.failures[0].offending_rows == [
        {"prompt_hash": "b" * 40, "teacher_model": "offline-v1", "run_date": "2024-01-14"}
    ]


def test_replace_date_validates_that_date_only(spark, tmp_lake, qcfg):
    w = world()
    for t in ("items", "user_sequences"):
        write_table(tmp_lake, t, w[t])
    write_table(tmp_lake, "prompts", w["prompts"], mode="replace_date", run_date=DAY1)
    version = write_table(tmp_lake, "prompts", w["prompts"][:1], mode="replace_date", run_date=RUN_DATE)
    report = validate_table(tmp_lake, "prompts", cfg=qcfg, spark=spark)
    assert report.success, report.summary()
    assert (report.rows, report.run_date) == (1, RUN_DATE)
    assert report.slice.startswith(f"1 file(s) added by version {version} (WRITE Overwrite)")


def test_replace_date_from_spark_validates_that_date_only(spark, tmp_lake, qcfg):
    """The Spark path commits through create_write_transaction, whose log entry shows a plain WRITE
    Overwrite (no predicate): the lake's own slimrec.write_mode says it replaced one date only."""
    from slimrec.schemas.tables import spec

    w = world()
    for t in ("items", "user_sequences"):
        write_table(tmp_lake, t, w[t])
    cols = spec("prompts").spark_schema().fieldNames()

    def frame(rows, day):
        pdf = pd.DataFrame(rows).assign(run_date=day, input_versions="{}")
        return spark.createDataFrame(pdf[cols], schema=spec("prompts").spark_schema())

    tmp_lake.write_spark(frame(w["prompts"], DAY1), "prompts", "replace_date", commit_info(run_date=DAY1))
    version = tmp_lake.write_spark(frame(w["prompts"][:1], RUN_DATE), "prompts", "replace_date",
                                   commit_info(run_date=RUN_DATE))
    assert tmp_lake.last_commit("prompts")["slimrec.write_mode"] == "replace_date"
    report = validate_table(tmp_lake, "prompts", cfg=qcfg, spark=spark)
    assert report.success, report.summary()
    assert (report.rows, report.run_date, report.version) == (1, RUN_DATE, version)
    assert tmp_lake.count("prompts") == len(w["prompts"]) + 1


def test_gate_records_dq_results_and_returns_the_report(spark, tmp_lake, qcfg):
    version = write_table(tmp_lake, "items", world()["items"])
    report = gate(tmp_lake, "items", cfg=qcfg, spark=spark, run_id="r42")
    assert report.success
    dq = tmp_lake.read_pandas("dq_results")
    assert len(dq) == len(report.outcomes)
    assert set(dq["validation_id"]) == {f"r42:items@{version}"}
    assert set(dq["table_name"]) == {"items"} and set(dq["table_version"]) == {version}
    assert set(dq["suite"]) == {"items.v1"} and dq["suite_success"].all() and dq["success"].all()
    assert list(dq.loc[dq["expectation"] == "expect_table_row_count_to_be_between", "observed"]) == ["5"]
    commit = tmp_lake.last_commit("dq_results")
    assert commit["slimrec.stage"] == "quality" and commit["slimrec.run_id"] == "r42"
    # dq_results holds to its own suite.
    assert validate_table(tmp_lake, "dq_results", cfg=qcfg, spark=spark).success


def test_data_docs_rendered_into_the_named_folder_only(spark, tmp_lake, qcfg, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    w = world()
    w["items"][0]["item_text"] = ""
    write_table(tmp_lake, "items", w["items"])
    docs = tmp_path / "docs"
    report = validate_table(tmp_lake, "items", cfg=qcfg, spark=spark, docs_dir=docs)
    assert not report.success
    assert report.docs_index == str(docs / "index.html") and Path(report.docs_index).exists()
    pages = list((docs / "validations").rglob("*.html"))
    assert len(pages) == 1
    html = pages[0].read_text()
    assert "item_text" in html and "items.v1" in html
    assert list(work.iterdir()) == []  # ephemeral context: nothing in the working directory


def test_pipeline_stops_before_a_later_stage_reads_a_failed_table(spark, tmp_lake, monkeypatch):
    from slimrec import pipeline
    from slimrec.config import load_config
    from slimrec.stages.base import StageContext, StageResult

    ran: list[str] = []

    def writer(ctx):
        ran.append("write_items")
        rows = world()["items"]
        rows.append(dict(rows[0]))  # duplicate item_id
        return StageResult("write_items", {"items": write_table(ctx.lake, "items", rows)})

    def reader(ctx):
        ran.append("read_items")
        return StageResult("read_items", {})

    stages = {
        "write_items": types.SimpleNamespace(INPUTS=[], OUTPUTS=["items"], run=writer),
        "read_items": types.SimpleNamespace(INPUTS=["items"], OUTPUTS=["recommendations"], run=reader),
    }
    monkeypatch.setattr(pipeline, "STAGES", list(stages))
    monkeypatch.setattr(pipeline, "stage_module", lambda name: stages[name])
    ctx = StageContext(cfg=load_config("tiny"), lake=tmp_lake, run_date=RUN_DATE, _spark=spark)
    with pytest.raises(QualityGateError, match="expect_column_values_to_be_unique\\(column='item_id'\\)"):
        pipeline.run_pipeline(ctx)
    assert ran == ["write_items"]
    dq = tmp_lake.read_pandas("dq_results")
    assert list(dq.loc[~dq["success"], "column_name"]) == ["item_id"]
