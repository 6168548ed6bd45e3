"""The planted-signal teacher (an experiment that leaks targets on purpose) and what keeps it out of defaults."""

from __future__ import annotations

import numpy as np
import pandas as pd
from slimrec.stages import teacher_rationales as stage
from slimrec.stages.train_recommender import _teacher_rows
from slimrec.student.data import training_pairs
from slimrec.teacher.planted import (
    drop_planted,
    insert_planted,
    is_planted,
    planted_draw,
    planted_model_name,
    planted_targets,
    precision_of,
)
from teacher_helpers import make_ctx, write_inputs

HISTORIES = {"u1": ["A", "B"], "u3": ["A", "C"], "u4": ["C", "D"], "u6": ["E", "F"], "t": ["E", "A"]}
OFFLINE = ["teacher.offline.window=1", "teacher.offline.n_items=3"]


def test_names_and_precision_round_trip():
    name = planted_model_name("offline-cooc-v1", 0.25)
    assert name == "offline-cooc-v1+planted-p0.25" and is_planted(name) and precision_of(name) == 0.25
    assert not is_planted("offline-cooc-v1") and precision_of("gpt-4o-mini") is None and not is_planted(None)


def test_planted_users_are_nested_across_precisions_and_stable():
    users = [f"u{i}" for i in range(2000)]
    d = planted_draw(users, seed=0)
    assert np.array_equal(d, planted_draw(users, seed=0)) and not np.array_equal(d, planted_draw(users, seed=1))
    seqs = pd.DataFrame({"user_id": users, "valid_target": "v", "test_target": "t"})
    lo, hi = (planted_targets(seqs, p, 0)["planted_item_ids"].map(len) > 0 for p in (0.1, 0.5))
    assert (lo <= hi).all()  # every user planted at 0.1 is planted at 0.5
    assert 0.07 < lo.mean() < 0.13 and 0.45 < hi.mean() < 0.55
    at1 = planted_targets(seqs, 1.0, 0)["planted_item_ids"]
    assert all(list(x) == ["v", "t"] for x in at1)
    assert (planted_targets(seqs, 0.0, 0)["planted_item_ids"].map(len) == 0).all()


def test_insert_planted_keeps_the_list_length_and_never_repeats():
    out = insert_planted([1, 2, 3, 4, 5], [9, 8], 5, "h1")
    assert len(out) == 5 and {9, 8} <= set(out) and set(out) - {9, 8} == {1, 2, 3}  # the 2 lowest picks go
    assert insert_planted([1, 2, 3, 4, 5], [9, 8], 5, "h1") == out  # same prompt, same text
    assert sorted(insert_planted([1, 2, 3], [2], 3, "h")) == [1, 2, 3]  # already picked: named once
    assert insert_planted([1, 2], [], 2, "h") == [1, 2]


def test_planted_stage_names_held_out_items_and_caches_per_precision(tmp_lake, run_date):
    write_inputs(tmp_lake, run_date, HISTORIES)  # every user's valid and test target is Z
    plain = stage.run(make_ctx(tmp_lake, run_date, OFFLINE))
    r0 = stage.run(make_ctx(tmp_lake, run_date, [*OFFLINE, "teacher.offline.planted_precision=0"]))
    r1 = stage.run(make_ctx(tmp_lake, run_date, [*OFFLINE, "teacher.offline.planted_precision=1"]))
    assert plain.extra["calls"] == r0.extra["calls"] == r1.extra["calls"] == 5  # its own cache key per p
    df = tmp_lake.read_pandas("teacher_rationales")
    by = {m: g.set_index("user_id") for m, g in df.groupby("teacher_model")}
    assert set(by) == {"offline-cooc-v1", "offline-cooc-v1+planted-p0", "offline-cooc-v1+planted-p1"}
    base, p0, p1 = by["offline-cooc-v1"], by["offline-cooc-v1+planted-p0"], by["offline-cooc-v1+planted-p1"]
    assert (p0.loc[base.index, "rationale"] == base["rationale"]).all()  # p = 0 is the offline teacher
    for u in base.index:
        assert "Z" in list(p1.loc[u, "grounded_item_ids"]) and "Z" not in list(base.loc[u, "grounded_item_ids"])
        assert '"Target Only Shredder 3000"' in p1.loc[u, "step3"]
        assert len(p1.loc[u, "grounded_item_ids"]) == len(base.loc[u, "grounded_item_ids"])


def test_default_consumers_leave_planted_rows_out():
    teacher = pd.DataFrame({
        "user_id": ["u1", "u1"], "prompt_hash": ["h", "h"], "status": "ok", "rationale": ["plain", "planted"],
        "teacher_model": ["offline-cooc-v1", "offline-cooc-v1+planted-p1"], "grounded_item_ids": [["A"], ["Z"]],
    })
    assert drop_planted(teacher, "teacher_model")["rationale"].tolist() == ["plain"]
    prompts = pd.DataFrame({"prompt_hash": ["h"], "student_prompt": ["sp"]})
    # distill_student drops planted rows before training_pairs when student.teacher_model is None
    assert training_pairs(drop_planted(teacher, "teacher_model"), prompts)["rationale"].tolist() == ["plain"]
    emb = pd.DataFrame({"user_id": ["u1", "u1", "u1"], "source": ["teacher", "teacher", "student"],
                        "model_version": ["offline-cooc-v1", "offline-cooc-v1+planted-p1", "student-x"]})
    t, e = _teacher_rows(teacher, emb, None)
    assert t["rationale"].tolist() == ["plain"] and e["model_version"].tolist() == ["offline-cooc-v1", "student-x"]
    t, e = _teacher_rows(teacher, emb, "offline-cooc-v1+planted-p1")  # named explicitly: only that model
    assert t["rationale"].tolist() == ["planted"]
    assert e["model_version"].tolist() == ["offline-cooc-v1+planted-p1", "student-x"]


def test_users_sharing_a_prompt_each_get_their_own_planted_rationale(tmp_lake, run_date):
    twins = {**HISTORIES, "u7": ["A", "B"]}  # u7 is shown u1's prompt
    prompts = write_inputs(tmp_lake, run_date, twins)
    assert prompts.prompt_hash.nunique() == len(twins) - 1
    plain = stage.run(make_ctx(tmp_lake, run_date, OFFLINE))
    planted = stage.run(make_ctx(tmp_lake, run_date, [*OFFLINE, "teacher.offline.planted_precision=1"]))
    assert plain.extra["duplicate_prompts"] == 1 and plain.extra["calls"] == len(twins) - 1
    assert planted.extra["duplicate_prompts"] == 0 and planted.extra["calls"] == len(twins)
    df = tmp_lake.read_pandas("teacher_rationales")
    p1 = df[df.teacher_model == "offline-cooc-v1+planted-p1"].set_index("user_id")
    assert set(p1.index) == set(twins) and p1.prompt_hash.str.fullmatch("[0-9a-f]{40}").all()
    assert not set(p1.prompt_hash) & set(prompts.prompt_hash)  # never mistaken for a prompts row's answer
    assert all("Z" in list(p1.loc[u, "grounded_item_ids"]) for u in ("u1", "u7"))
    again = stage.run(make_ctx(tmp_lake, run_date, [*OFFLINE, "teacher.offline.planted_precision=1"]))
    assert again.extra["calls"] == 0 and again.extra["cached_ok"] == len(twins)  # the per-user key caches
