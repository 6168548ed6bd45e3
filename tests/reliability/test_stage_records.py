"""A stage counts as done only when it finished: the skip check after a crash between two commits.

Fast, in-process counterpart of the SIGKILL test: a stage that writes two
tables dies after the first commit. The rerun must run it again (before the
fix it was skipped on the first table's commit metadata, and the next stage
failed for want of the second table, or read a table no gate had validated).
"""

from __future__ import annotations

import types
from datetime import date

import pandas as pd
import pytest
from slimrec import pipeline
from slimrec.config import load_config
from slimrec.lake import CommitInfo
from slimrec.stages.base import StageContext, StageResult

RUN_DATE = date(2024, 1, 15)


def _items(n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": [f"i{k}" for k in range(n)], "title": ["t"] * n, "brand": ["b"] * n,
        "categories": [["c"]] * n, "description": [None] * n, "item_text": ["t | c | b"] * n,
        "text_hash": ["h"] * n,
    })


def _raw_items(n: int) -> pd.DataFrame:
    return pd.DataFrame({"source_file": ["f"] * n, "source_row": list(range(n)), "item_raw": ["x"] * n,
                         "payload": ["{}"] * n})


class Crash(RuntimeError):
    """Stands for the process dying between two commits."""


@pytest.fixture
def two_table_stage(monkeypatch):
    """A stage reading raw_items and writing items, then quarantine; it can die between the two commits."""
    state = {"die": True, "runs": 0}

    def run(ctx):
        state["runs"] += 1
        inputs = ctx.input_versions(["raw_items"])
        info = ctx.commit_info("two_tables", inputs)
        v = ctx.lake.write_arrow("items", _items(3), "overwrite", info)
        if state["die"]:
            raise Crash("killed after the first commit")
        q = pd.DataFrame({"stage": ["two_tables"], "source": ["f"], "source_row": pd.array([1], "Int64"),
                          "reason": ["r"], "payload": [None]})
        return StageResult("two_tables", {"items": v, "quarantine": ctx.lake.write_arrow("quarantine", q, "merge", info)})

    mod = types.SimpleNamespace(INPUTS=["raw_items"], OUTPUTS=["items", "quarantine"], run=run)
    monkeypatch.setattr(pipeline, "STAGES", ["two_tables"])
    monkeypatch.setattr(pipeline, "stage_module", lambda name: mod)
    return state


def _ctx(lake, **kw):
    return StageContext(cfg=load_config("tiny", None, ["quality.enabled=false"]), lake=lake, run_date=RUN_DATE, **kw)


def test_a_stage_that_died_between_its_commits_is_run_again(tmp_lake, two_table_stage):
    tmp_lake.write_arrow("raw_items", _raw_items(2), "overwrite", CommitInfo("ingest", RUN_DATE))
    with pytest.raises(Crash):
        pipeline.run_pipeline(_ctx(tmp_lake))
    # The first table is committed, with the stage's name and input versions in its metadata...
    assert tmp_lake.last_commit("items")["slimrec.stage"] == "two_tables" and not tmp_lake.exists("quarantine")
    # ...yet the stage is not done: the rerun runs it.
    assert pipeline.should_skip(_ctx(tmp_lake), "two_tables") == (False, "no finished run recorded")
    two_table_stage["die"] = False
    (r,) = pipeline.run_pipeline(_ctx(tmp_lake))
    assert not r.skipped and two_table_stage["runs"] == 2 and tmp_lake.count("quarantine") == 1
    # Finished: the next run with the same inputs skips it; a new input version runs it again.
    (r,) = pipeline.run_pipeline(_ctx(tmp_lake))
    assert r.skipped and two_table_stage["runs"] == 2
    rec = tmp_lake.stage_record("two_tables")
    assert rec["versions"] == {"raw_items": 0} and rec["checked"] is False and rec["run_date"] == "2024-01-15"
    tmp_lake.write_arrow("raw_items", _raw_items(3), "overwrite", CommitInfo("ingest", RUN_DATE))
    (r,) = pipeline.run_pipeline(_ctx(tmp_lake))
    assert not r.skipped and two_table_stage["runs"] == 3


def test_a_stage_run_without_its_gate_is_not_skipped_by_a_gated_run(tmp_lake, two_table_stage):
    tmp_lake.write_arrow("raw_items", _raw_items(2), "overwrite", CommitInfo("ingest", RUN_DATE))
    two_table_stage["die"] = False
    pipeline.run_stage("two_tables", _ctx(tmp_lake), check=False)  # like `slim stage ... --no-check`
    gated = StageContext(cfg=load_config("tiny"), lake=tmp_lake, run_date=RUN_DATE)
    assert pipeline.should_skip(gated, "two_tables") == (False, "its last run skipped the quality gate")
    assert pipeline.should_skip(_ctx(tmp_lake), "two_tables")[0]  # gates off in this config: done is done


def test_a_dry_run_records_nothing(tmp_lake, two_table_stage):
    tmp_lake.write_arrow("raw_items", _raw_items(2), "overwrite", CommitInfo("ingest", RUN_DATE))
    two_table_stage["die"] = False
    pipeline.run_stage("two_tables", _ctx(tmp_lake, dry_run=True), check=False)
    assert tmp_lake.stage_record("two_tables") is None


def test_a_rerun_that_commits_nothing_still_validates_a_commit_no_gate_passed(tmp_lake, monkeypatch):
    """Killed after committing ``items`` and before its gate; the rerun finds nothing to change."""
    import slimrec.quality
    from slimrec.text import sha1

    gated: list[tuple[str, int]] = []

    def fake_gate(lake, table, *, cfg, spark=None, version=None, run_date=None, run_id="", **kw):
        gated.append((table, version))
        row = {"validation_id": f"v{len(gated)}", "table_name": table, "table_version": version, "suite": "s",
               "suite_success": True, "expectation": "e", "column_name": None, "success": True, "observed": None,
               "unexpected_count": 0, "details": None, "validated_ts": pd.Timestamp("2024-01-15", tz="UTC")}
        lake.write_arrow("dq_results", pd.DataFrame([row]), "append", CommitInfo("quality", RUN_DATE))

    def run(ctx):
        if ctx.lake.exists("items"):  # incremental: same content, no commit
            return StageResult("write_items", {"items": None})
        items = _items(2).assign(text_hash=sha1("t | c | b"))
        ctx.lake.write_arrow("items", items, "overwrite", ctx.commit_info("write_items", {}))
        raise Crash("killed after the commit, before the gate")

    mod = types.SimpleNamespace(INPUTS=[], OUTPUTS=["items", "quarantine"], run=run)
    monkeypatch.setattr(pipeline, "STAGES", ["write_items"])
    monkeypatch.setattr(pipeline, "stage_module", lambda name: mod)
    monkeypatch.setattr(slimrec.quality, "gate", fake_gate)
    gated_ctx = lambda: StageContext(cfg=load_config("tiny"), lake=tmp_lake, run_date=RUN_DATE,  # noqa: E731
                                     _spark=object())  # the fake gate needs no Spark
    with pytest.raises(Crash):
        pipeline.run_pipeline(gated_ctx())
    pipeline.run_pipeline(gated_ctx())
    assert gated == [("items", 0)]  # the rerun validated the killed run's commit
    pipeline.run_stage("write_items", gated_ctx())
    assert gated == [("items", 0)]  # already passed: not validated twice


def test_a_stage_last_run_under_other_config_runs_again(tmp_lake, two_table_stage, monkeypatch):
    """Same input versions, other config: not skipped (a planted experiment's train_recommender, whose embed
    config names the planted teacher, must not stand in for the default run's on the same lake)."""
    monkeypatch.setitem(pipeline.STAGE_CONFIG, "two_tables", ("embed",))
    tmp_lake.write_arrow("raw_items", _raw_items(2), "overwrite", CommitInfo("ingest", RUN_DATE))
    two_table_stage["die"] = False
    pipeline.run_pipeline(_ctx(tmp_lake))
    assert pipeline.should_skip(_ctx(tmp_lake), "two_tables")[0]
    planted = StageContext(cfg=load_config("tiny", None, ["quality.enabled=false",
                                                          "embed.teacher_model=offline-cooc-v1+planted-p1"]),
                           lake=tmp_lake, run_date=RUN_DATE)
    assert pipeline.should_skip(planted, "two_tables") == (False, "its config changed since its last run")
    assert pipeline.should_skip(_ctx(tmp_lake, ), "two_tables")[0]  # the recorded run's own config: done
    pipeline.run_stage("two_tables", planted, check=False)
    (r,) = pipeline.run_pipeline(_ctx(tmp_lake))  # back to the default config: runs again
    assert not r.skipped and two_table_stage["runs"] == 3
    rec = tmp_lake.stage_record("two_tables")
    rec.pop("config")
    tmp_lake.record_stage("two_tables", rec)  # a record written before config fingerprints
    assert pipeline.should_skip(_ctx(tmp_lake), "two_tables") == (False, "its last run recorded no config")
