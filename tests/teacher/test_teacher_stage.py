"""The stage with the offline teacher on a real Delta lake (no network, no Ray needed)."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest
from slimrec.lake import CommitInfo
from slimrec.stages import teacher_rationales as stage
from slimrec.teacher.fixtures import prompt_rows
from teacher_helpers import items_frame, make_ctx, sequences_frame, write_inputs

HISTORIES = {
    "u1": ["A", "B"], "u2": ["A", "B"], "u3": ["A", "C"], "u4": ["C", "D"], "u5": ["C", "D"],
    "u6": ["E", "F"], "t": ["E", "A"], "cold": ["G"],
}
OFFLINE = ["teacher.offline.window=1", "teacher.offline.n_items=3"]


def test_offline_stage_writes_grounded_rationales_from_histories_only(tmp_lake, run_date):
    # Every user's valid and test targets are Z (see sequences_frame): item_ids end in Z, Z. If the statistics
    # read item_ids instead of history, Z would follow A (in t's sequence) with popularity 16 and be named.
    write_inputs(tmp_lake, run_date, HISTORIES)
    r = stage.run(make_ctx(tmp_lake, run_date, OFFLINE))
    df = tmp_lake.read_pandas("teacher_rationales").set_index("user_id")
    # u1/u2 and u4/u5 have the same history, hence the same prompt: sent once, kept under the first user.
    assert sorted(df.index) == ["cold", "t", "u1", "u3", "u4", "u6"] and r.extra["duplicate_prompts"] == 2
    assert (df["status"] == "ok").all() and (df["teacher_model"] == "offline-cooc-v1").all()
    assert list(df.loc["t", "grounded_item_ids"]) == ["B", "C", "F"]
    assert not any("Z" in list(g) for g in df["grounded_item_ids"])
    assert df.loc["t", "step3"] == (
        'Recommended items: "Acme Phone Battery Pack 2"; "Zeta Label Maker Pro"; "Red Gel Pens 8 Pack".'
    )
    assert (df["attempts"] == 1).all() and (df["cost_usd"] == 0).all() and (df["input_tokens"] > 0).all()
    assert r.extra["calls"] == 6 and r.extra["cost_usd"] == 0 and r.extra["statuses"] == {"ok": 6}
    commit = tmp_lake.last_commit("teacher_rationales")
    assert commit["slimrec.stage"] == "teacher_rationales" and commit["slimrec.teacher_model"] == "offline-cooc-v1"


def test_rerun_sends_nothing_and_a_changed_user_only_itself(tmp_lake, run_date):
    write_inputs(tmp_lake, run_date, HISTORIES)
    stage.run(make_ctx(tmp_lake, run_date, OFFLINE))
    v = tmp_lake.version("teacher_rationales")
    again = stage.run(make_ctx(tmp_lake, run_date, OFFLINE))
    assert again.extra["calls"] == 0 and again.extra["cached_ok"] == 6 and again.tables == {}
    assert tmp_lake.version("teacher_rationales") == v  # no empty commit

    # Next day: u1 bought D; build_prompts writes only u1's new prompt under the new date.
    later = date(2024, 1, 16)
    seqs = sequences_frame({**HISTORIES, "u1": ["A", "B", "D"]})
    tmp_lake.write_arrow("user_sequences", seqs, "overwrite", CommitInfo("fixture", later))
    tmp_lake.write_arrow("prompts", prompt_rows(seqs[seqs["user_id"] == "u1"], items_frame()), "replace_date",
                         CommitInfo("fixture", later))
    nxt = stage.run(make_ctx(tmp_lake, later, OFFLINE))
    assert nxt.extra["calls"] == 1 and nxt.extra["cached_ok"] == 6  # u2 still has the [A, B] prompt
    df = tmp_lake.read_pandas("teacher_rationales")
    assert len(df) == 7 and sorted(df.loc[df["user_id"] == "u1", "run_date"].astype(str)) == ["2024-01-15", "2024-01-16"]


def test_dry_run_estimates_and_writes_nothing(tmp_lake, run_date):
    write_inputs(tmp_lake, run_date, HISTORIES)
    r = stage.run(make_ctx(tmp_lake, run_date, OFFLINE, dry_run=True))
    assert r.skipped and r.extra["dry_run"] and r.extra["calls"] == 6 and r.extra["cost_usd"] == 0.0
    assert r.extra["output_tokens"] == 6 * 300 and r.extra["input_tokens"] > 0
    assert not tmp_lake.exists("teacher_rationales")


def test_sample_and_budget_caps_apply_to_the_offline_teacher(tmp_lake, run_date):
    write_inputs(tmp_lake, run_date, HISTORIES)
    r = stage.run(make_ctx(tmp_lake, run_date, [*OFFLINE, "teacher.sample_size=5", "teacher.max_calls=3"]))
    unique = r.extra["sampled"] - r.extra["duplicate_prompts"]
    assert r.rows_in == 5 and unique >= 4
    assert r.extra["calls"] == 3 and r.extra["stopped_by"] == "max_calls" and r.extra["not_sent"] == unique - 3
    assert len(tmp_lake.read_pandas("teacher_rationales")) == 3


def test_offline_teacher_needs_histories(tmp_lake, run_date):
    write_inputs(tmp_lake, run_date, HISTORIES, write_sequences=False)
    with pytest.raises(RuntimeError, match="user_sequences"):
        stage.run(make_ctx(tmp_lake, run_date, OFFLINE))


def test_latest_prompt_per_user_up_to_the_run_date():
    p = pd.DataFrame({
        "user_id": ["u1", "u1", "u2", "u3"],
        "run_date": [date(2024, 1, 10), date(2024, 1, 15), date(2024, 1, 12), date(2024, 1, 12)],
        "prompt_version": ["v1", "v1", "v1", "v0"],
        "prompt_hash": ["a", "b", "c", "d"],
    })
    got = stage.latest_prompts(p, date(2024, 1, 14), "v1")
    assert got[["user_id", "prompt_hash"]].values.tolist() == [["u1", "a"], ["u2", "c"]]


def test_answers_naming_items_that_left_the_catalogue_leave_the_cache(tmp_lake, run_date):
    write_inputs(tmp_lake, run_date, HISTORIES)
    stage.run(make_ctx(tmp_lake, run_date, OFFLINE))
    before = tmp_lake.read_pandas("teacher_rationales").set_index("user_id")
    named_f = sorted(u for u, g in before["grounded_item_ids"].items() if "F" in list(g))
    assert "t" in named_f
    # a re-ingest of the same day drops item F from the catalogue
    items = items_frame()
    tmp_lake.write_arrow("items", items[items["item_id"] != "F"], "overwrite", CommitInfo("fixture", run_date))
    r = stage.run(make_ctx(tmp_lake, run_date, OFFLINE))
    assert r.extra["stale_deleted"] == len(named_f) and r.extra["calls"] == len(named_f)  # asked again
    after = tmp_lake.read_pandas("teacher_rationales").set_index("user_id")
    assert not any("F" in list(g) for g in after["grounded_item_ids"])
    assert sorted(after.index) == sorted(before.index)
    again = stage.run(make_ctx(tmp_lake, run_date, OFFLINE))  # nothing stale now: nothing deleted or sent
    assert again.extra["stale_deleted"] == 0 and again.extra["calls"] == 0 and again.tables == {}
