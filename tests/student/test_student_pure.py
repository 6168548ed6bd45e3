"""Pure student functions: overlap metrics, pairs, split, trimming, parsing, anti-join. No model, no engine."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest
from slimrec.stages.distill_student import model_version_of
from slimrec.stages.student_rationales import latest_prompts, plan_users, select_model, to_rows
from slimrec.student.data import (
    IGNORE_INDEX,
    length_grouped_batches,
    split_by_user,
    training_pairs,
    trim_items,
)
from slimrec.student.generate import parse_outputs
from slimrec.student.metrics import item_overlap, lcs_len, prompt_dependence, rouge_l, token_f1
from student_helpers import small_student_config

# ---------------------------------------------------------------- metrics, by hand


def test_lcs_and_rouge_l_by_hand():
    assert lcs_len(list("abcd"), list("ace")) == 2
    # cand a b c d, ref a c e: LCS 2, P = 2/4, R = 2/3, F = 2*(1/2)(2/3)/(1/2+2/3) = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("Step 1: Pens!", "step 1 pens") == pytest.approx(1.0)  # case and punctuation do not count
    assert rouge_l("", "a") == 0.0
    assert rouge_l("x y", "a b") == 0.0


def test_token_f1_by_hand():
    # cand {a:2, b:1}, ref {a:1, c:1}: common 1, P = 1/3, R = 1/2, F = 2*(1/6)/(5/6) = 2/5
    assert token_f1("a a b", "a c") == pytest.approx(0.4)
    assert token_f1("b a", "a b") == pytest.approx(1.0)  # order does not count (ROUGE-L: 0.5)
    assert rouge_l("b a", "a b") == pytest.approx(0.5)


# ---------------------------------------------------------------- pairs and split


def _teacher(rows):
    return pd.DataFrame(rows, columns=["prompt_hash", "teacher_model", "user_id", "rationale", "status"])


def test_item_overlap_by_hand():
    # user 1: predicted {a, b}, teacher {a}; user 2: predicted {c, c}, teacher {c, d}; user 3: nothing vs {e}
    got = item_overlap([["a", "b"], ["c", "c"], []], [["a"], ["c", "d"], ["e"]])
    assert got == {"item_precision": 2 / 3, "item_recall": 2 / 4}  # hits a, c; 3 predicted ids, 4 teacher ids
    assert item_overlap([[]], [[]]) == {"item_precision": 0.0, "item_recall": 0.0}


def test_constrained_eval_set_takes_the_teachers_first_ids():
    from slimrec.stages.distill_student import constrained_eval_set
    from student_helpers import items_frame

    cfg = small_student_config(max_target_items=2)
    eval_df = pd.DataFrame({"prompt_hash": ["h1", "h2", "h3"], "teacher_model": ["t", "t", "t"]})
    teacher = pd.DataFrame({"prompt_hash": ["h1", "h2"], "teacher_model": ["t", "t"],
                            "grounded_item_ids": [["i01", "i02", "i03"], []]})
    got = constrained_eval_set(cfg, items_frame(), eval_df, teacher)
    assert got["teacher_item_ids"] == [["i01", "i02"], [], []]  # h3 has no teacher row
    assert got["title_ids"]["Pilot Gel Pen Set Black 100"] == "i00" and len(got["title_ids"]) == 20
    assert got["grammar"].startswith("root ::= ") and got["grammar_max_new_tokens"] > 0


def test_training_pairs_keeps_ok_rows_with_a_student_prompt():
    teacher = _teacher([
        ("h1", "t", "u1", "Step 1: a Step 2: b Step 3: c", "ok"),
        ("h2", "t", "u2", None, "parse_error"),
        ("h4", "t", "u4", "Step 1: orphan", "ok"),  # no prompt with this hash
    ])
    prompts = pd.DataFrame({"prompt_hash": ["h1", "h1", "h2", "h3"], "student_prompt": ["old", "new", "p2", "p3"],
                            "run_date": [date(2024, 1, 1), date(2024, 1, 2), date(2024, 1, 1), date(2024, 1, 1)]})
    pairs = training_pairs(teacher, prompts)
    assert pairs[["user_id", "prompt_hash", "student_prompt"]].values.tolist() == [["u1", "h1", "new"]]
    assert training_pairs(teacher, prompts, teacher_model="other").empty


def test_split_by_user_is_disjoint_seeded_and_stable():
    pairs = pd.DataFrame({"user_id": [f"u{i}" for i in range(200)] + ["u0"], "prompt_hash": [f"h{i}" for i in range(201)]})
    train, held = split_by_user(pairs, 0.2, seed=7)
    assert set(train.user_id).isdisjoint(held.user_id)
    assert len(train) + len(held) == 201
    assert 20 <= held.user_id.nunique() <= 60  # about 20% of 200 users
    assert (pairs[pairs.user_id == "u0"].user_id.isin(held.user_id).all()
            or pairs[pairs.user_id == "u0"].user_id.isin(train.user_id).all())  # both rows of u0 on one side
    again, _ = split_by_user(pairs.sample(frac=1, random_state=1), 0.2, seed=7)
    assert set(again.user_id) == set(train.user_id)  # order of rows does not matter
    other, _ = split_by_user(pairs, 0.2, seed=8)
    assert set(other.user_id) != set(train.user_id)
    # Two users and a tiny fraction: still one on each side.
    tr, he = split_by_user(pairs[pairs.user_id.isin(["u1", "u2"])], 0.01, seed=0)
    assert len(tr) == 1 and len(he) == 1


def test_trim_items_cuts_step3_after_k_titles():
    text = 'Step 1: pens\nStep 2: Pens; brands: Bic\nStep 3: Recommended items: "Bic Pen A"; "Bic Pen B"; "Bic Pen C".'
    assert trim_items(text, 2) == 'Step 1: pens\nStep 2: Pens; brands: Bic\nStep 3: Recommended items: "Bic Pen A"; "Bic Pen B".'
    assert trim_items(text, 3) == text
    assert trim_items(text, None) == text
    assert trim_items("no steps at all", 1) == "no steps at all"


def test_length_grouped_batches_cover_every_index_once():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]
    batches = length_grouped_batches(lengths, batch_size=3, group=2, seed=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(10))
    assert batches == length_grouped_batches(lengths, batch_size=3, group=2, seed=0)
    assert IGNORE_INDEX == -100


# ---------------------------------------------------------------- parsing generated text


def test_parse_outputs_statuses():
    raw = pd.DataFrame({
        "user_id": ["u1", "u2", "u3", "u4", "u5"],
        "prompt_hash": ["h1", "h2", "h3", "h4", "h5"],
        "rationale": ['Step 1: a\nStep 2: b\nStep 3: "Pen One"; "Pen Two".', "Step 1: a\nStep 2: b",
                      "Step 1: a\nStep 2: b\nStep 3: \"Pen", "", None],
        "finish_reason": ["stop", "stop", "length", "stop", "error"],
        "output_tokens": [20, 9, 12, 1, 0],
        "latency_ms": [1.0] * 5,
        "error": [None, None, None, None, "failed: RuntimeError: boom"],
    })
    out = parse_outputs(raw)
    assert out["status"].tolist() == ["ok", "parse_error", "truncated", "empty", "failed"]
    assert out.loc[0, "item_names"] == ["Pen One", "Pen Two"]
    assert out.loc[0, "step2"] == "b"
    assert out.loc[4, "error"] == "failed: RuntimeError: boom"
    rows = to_rows(out, [["i1"], [], [], [], []], "m1")
    assert rows["grounded_item_ids"].tolist()[0] == ["i1"]
    assert set(rows["model_version"]) == {"m1"}


# ---------------------------------------------------------------- what needs a rationale


def test_plan_users_anti_join():
    existing = pd.DataFrame({"user_id": ["u1", "u2"], "prompt_hash": ["h1", "h2"], "model_version": ["m1", "m1"],
                             "status": ["ok", "failed"]})
    prompts = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "prompt_hash": ["h1", "h2", "h3"]})
    assert plan_users(prompts, existing, "m1", retry_failed=True).user_id.tolist() == ["u2", "u3"]
    assert plan_users(prompts, existing, "m1", retry_failed=False).user_id.tolist() == ["u3"]
    assert plan_users(prompts, existing, "m2", retry_failed=True).user_id.tolist() == ["u1", "u2", "u3"]
    changed = prompts.assign(prompt_hash=["h1b", "h2", "h3"])  # u1's prompt changed
    assert plan_users(changed, existing, "m1", retry_failed=False).user_id.tolist() == ["u1", "u3"]


def test_latest_prompts_and_select_model():
    p = pd.DataFrame({"user_id": ["u1", "u1", "u2"], "prompt_hash": ["a", "b", "c"], "student_prompt": ["", "", ""],
                      "run_date": [date(2024, 1, 10), date(2024, 1, 15), date(2024, 1, 12)]})
    got = latest_prompts(p, date(2024, 1, 14))
    assert got[["user_id", "prompt_hash"]].values.tolist() == [["u1", "a"], ["u2", "c"]]
    models = pd.DataFrame({"model_version": ["m1", "m2"], "created_ts": pd.to_datetime(["2024-01-02", "2024-01-01"])})
    assert select_model(models, "latest")["model_version"] == "m1"
    assert select_model(models, "m2")["model_version"] == "m2"
    from slimrec.pipeline import StageError

    with pytest.raises(StageError, match="not registered"):
        select_model(models, "m3")


def test_model_version_depends_on_data_and_training_config_only():
    pairs = pd.DataFrame({"prompt_hash": ["h1"], "teacher_model": ["t"], "rationale": ["Step 1: a"]})
    cfg = small_student_config()
    v = model_version_of(cfg, "base-1", pairs)
    assert v.startswith("student-") and v == model_version_of(cfg, "base-1", pairs)
    assert v == model_version_of(small_student_config(infer={"batch_size": 3}), "base-1", pairs)  # inference only
    assert v != model_version_of(small_student_config(lora={"r": 4}), "base-1", pairs)
    assert v != model_version_of(cfg, "base-2", pairs)
    assert v != model_version_of(cfg, "base-1", pairs.assign(rationale=["Step 1: b"]))


def test_base_dtype_keeps_small_bases_in_fp32(tmp_path):
    import torch
    from slimrec.student.models import HALF_PRECISION_BASE_BYTES, base_dtype

    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir()
    large.mkdir()
    (small / "model.safetensors").write_bytes(b"\0" * 1024)
    with open(large / "model-00001-of-00002.safetensors", "wb") as f:
        f.truncate(HALF_PRECISION_BASE_BYTES)  # sparse: the size on record, no disk used
    assert base_dtype(str(small), torch.bfloat16) == torch.float32
    assert base_dtype(str(large), torch.bfloat16) == torch.bfloat16
    assert base_dtype(str(large), None) == torch.float32  # no autocast (CPU): fp32 whatever the size


def test_prompt_dependence_tells_a_copying_student_from_a_constant_one():
    refs = ["bought pens and ink", "likes paper clips", "wants a stapler now"]
    reading = prompt_dependence(refs, refs)
    assert (reading["own"], reading["other_users"], reading["distinct_share"]) == (1.0, 0.0, 1.0)
    constant = prompt_dependence([refs[0]] * 3, refs)
    assert constant["own"] == pytest.approx(1 / 3) and constant["other_users"] == pytest.approx(1 / 3)
    assert constant["distinct_share"] == pytest.approx(1 / 3)
    assert prompt_dependence([], [])["n"] == 0


def test_heldout_share_is_the_configured_one_on_the_teachers_sample():
    """The teacher keeps the users with the lowest sha1 draws; the held-out split must not reuse those
    draws (unsalted, it held out 35% of a 30% sample instead of 10%)."""
    from slimrec.teacher.sampling import stratified_sample

    users = pd.DataFrame({"user_id": [f"u{i}" for i in range(3000)], "history_len": [3 + i % 40 for i in range(3000)]})
    sample = stratified_sample(users, 900, seed=0)
    train, held = split_by_user(sample.assign(prompt_hash=sample.user_id), 0.1, seed=0)
    assert 0.06 <= len(held) / len(sample) <= 0.14
