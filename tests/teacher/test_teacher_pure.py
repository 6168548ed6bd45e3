"""Pure parts of the teacher: no Ray, no server, no lake. Expected values worked out by hand."""

from __future__ import annotations

import random

import pandas as pd
import pytest
from slimrec.rationale import parse_rationale
from slimrec.teacher.budget import Budget, estimate
from slimrec.teacher.cache import plan_requests, to_table_rows
from slimrec.teacher.config import ModelPrice, OfflineTeacherConfig, TeacherConfig
from slimrec.teacher.grounding import TitleIndex, normalize_title
from slimrec.teacher.http_teacher import backoff_delay, parse_completion, parse_retry_after, redact
from slimrec.teacher.offline import OfflineTeacher, build_stats
from slimrec.teacher.sampling import allocate, stratified_sample
from teacher_helpers import items_frame

# ---------------------------------------------------------------- rationale parser


def test_numbered_points_inside_a_step_are_not_step_headers():
    text = 'Step 1: Likes\n1. phones\n2. labels\n3. pens\nStep 2: Label Tapes\nStep 3: "Zeta Label Tape Refill"'
    p, err = parse_rationale(text, "stop")
    assert err is None
    assert p.step1 == "Likes\n1. phones\n2. labels\n3. pens"
    assert p.step2 == "Label Tapes"
    assert p.item_names == ("Zeta Label Tape Refill",)


def test_bare_numbers_still_work_without_step_headers():
    p, err = parse_rationale('1. likes pens\n2. Gel Pens\n3. "Red Gel Pens 8 Pack"', "stop")
    assert err is None and p.step2 == "Gel Pens" and p.item_names == ("Red Gel Pens 8 Pack",)


# ---------------------------------------------------------------- sampling


def test_allocate_proportional_with_a_floor_per_stratum():
    assert allocate([80, 15, 5], 20, 0.1) == [14, 4, 2]
    assert allocate([10, 10], 30, 0.1) == [10, 10]  # asks for more than there is: everyone


def test_stratified_sample_has_short_and_long_histories_and_is_reproducible():
    lens = [3, 3, 4, 4, 3, 4, 3, 4, 9, 12, 30, 50]  # 8 short, 4 long
    df = pd.DataFrame({"user_id": [f"u{i}" for i in range(12)], "history_len": lens})
    a = stratified_sample(df, 4, seed=7, n_strata=2, min_share=0.5)
    b = stratified_sample(df, 4, seed=7, n_strata=2, min_share=0.5)
    assert a["user_id"].tolist() == b["user_id"].tolist()
    assert sorted(a["history_len"] <= 4) == [False, False, True, True]  # 2 short and 2 long
    c = stratified_sample(df, 4, seed=8, n_strata=2, min_share=0.5)
    assert set(c["user_id"]) != set(a["user_id"])  # another seed, another draw (checked: differs for 7 vs 8)
    bigger = stratified_sample(df, 8, seed=7, n_strata=2, min_share=0.5)
    assert set(a["user_id"]) <= set(bigger["user_id"])  # growing the sample only adds users


# ---------------------------------------------------------------- cache anti-join and rows


def test_plan_requests_sends_only_what_the_cache_lacks():
    sample = pd.DataFrame({"prompt_hash": ["a", "b", "c", "c", "d"], "user_id": ["u1", "u2", "u3", "u4", "u5"]})
    cached = pd.DataFrame(
        {"prompt_hash": ["a", "b", "d"], "teacher_model": "m", "status": ["ok", "failed", "empty"],
         "attempts": [1, 10, 3], "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
    )
    pending, counts = plan_requests(sample, cached, max_attempts=10)
    assert pending["prompt_hash"].tolist() == ["c", "d"]  # a answered, b exhausted; c once (first user)
    assert pending["user_id"].tolist() == ["u3", "u5"]
    assert counts == {"sampled": 5, "duplicate_prompts": 1, "cached_ok": 1, "exhausted": 1, "retry": 1}


def test_to_table_rows_statuses_grounding_and_cumulative_accounting():
    pending = pd.DataFrame({"prompt_hash": ["h1", "h2", "h3"], "user_id": ["u1", "u2", "u3"],
                            "prompt_version": "v1", "teacher_prompt": ["p" * 40] * 3})
    raw = [
        {"prompt_hash": "h1", "content": 'Step 1: x\nStep 2: y\nStep 3: "acme phone battery pack 2"; "Nonexistent Sofa Bed XL"',
         "finish_reason": "stop", "error": None, "attempts": 2, "input_tokens": 100, "output_tokens": 50,
         "latency_ms": 12.5},
        {"prompt_hash": "h2", "content": "", "finish_reason": "stop", "error": None, "attempts": 1,
         "input_tokens": 100, "output_tokens": 0, "latency_ms": 3.0},
        {"prompt_hash": "h3", "content": None, "error": "failed: 3 attempt(s); last: http 500: boom", "attempts": 3,
         "input_tokens": None, "output_tokens": None, "latency_ms": 1.0},
    ]
    previous = pd.DataFrame({"prompt_hash": ["h1"], "teacher_model": "m", "status": ["failed"], "attempts": [4],
                             "input_tokens": [0], "output_tokens": [0], "cost_usd": [0.5]})
    price = ModelPrice(input_per_1m=1000.0, output_per_1m=2000.0)  # 0.001 USD per input token, 0.002 per output
    rows = to_table_rows(raw, pending, "m", previous, price, TitleIndex(items_frame()), 88.0, 4.0).set_index("prompt_hash")
    assert rows.loc["h1", "status"] == "ok"
    assert list(rows.loc["h1", "grounded_item_ids"]) == ["B"]  # exact after normalising; the sofa matches nothing
    assert rows.loc["h1", "attempts"] == 6  # 4 earlier + 2 now
    assert rows.loc["h1", "cost_usd"] == pytest.approx(0.5 + 100 * 0.001 + 50 * 0.002)
    assert rows.loc["h1", "run_cost_usd"] == pytest.approx(0.2)
    assert rows.loc["h2", "status"] == "empty" and rows.loc["h2", "error"].startswith("empty")
    assert rows.loc["h3", "status"] == "failed" and "http 500" in rows.loc["h3", "error"]
    assert rows.loc["h3", "input_tokens"] == 0 and rows.loc["h3", "cost_usd"] == 0.0


# ---------------------------------------------------------------- budget


def test_dry_run_estimate_by_hand():
    cfg = TeacherConfig(kind="http", est_output_tokens=100, max_calls=1,
                        http={"model": "fake-teacher", "system_prompt": ""})
    pending = pd.DataFrame({"teacher_prompt": ["x" * 400, "y" * 400]})
    est = estimate(pending, cfg, "fake-teacher", "", cached=7)
    # "\n" + 400 chars = 401 chars -> ceil(401 / 4) = 101 tokens each; fake-teacher costs 1 / 2 USD per 1M
    assert (est["calls"], est["input_tokens"], est["output_tokens"]) == (2, 202, 200)
    assert est["cost_usd"] == pytest.approx((202 * 1.0 + 200 * 2.0) / 1e6)
    assert est["cached"] == 7 and est["calls_within_budget"] == 1


def test_budget_stops_before_crossing_the_cost_cap():
    b = Budget(max_cost_usd=0.0025, price=ModelPrice(input_per_1m=1000.0, output_per_1m=0.0))
    assert b.try_reserve(1, 0) and b.try_reserve(1, 0)  # 0.001 each
    assert not b.try_reserve(1, 0) and b.stopped_by == "max_cost_usd"  # 0.003 would cross 0.0025
    b.settle(1, 0, 0, 0)  # one call came back with no usage: its reservation is freed
    assert b.try_reserve(1, 0)


# ---------------------------------------------------------------- HTTP helpers


def test_retry_after_forms():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_backoff_doubles_with_equal_jitter_and_a_cap():
    rng = random.Random(0)
    waits = [backoff_delay(3, 0.5, 30.0, rng) for _ in range(200)]  # d = 0.5 * 2**2 = 2.0 -> [1.0, 2.0]
    assert min(waits) >= 1.0 and max(waits) <= 2.0 and max(waits) - min(waits) > 0.5
    assert backoff_delay(20, 0.5, 30.0, rng) <= 30.0


def test_redact_masks_the_key_and_its_echoed_pieces():
    key = "sk-live-0123456789abcdefXYZ"
    msg = f"Incorrect API key provided: {key}; also sk-live-...defXYZ and 'sk-live-0'"
    out = redact(msg, [key])
    assert key not in out and key[:8] not in out and key[-8:] not in out
    assert out.startswith("Incorrect API key provided: [redacted]")


def test_parse_completion_bad_and_good_bodies():
    assert parse_completion(b"{not json")[1].startswith("malformed response")
    assert parse_completion(b'{"choices": []}')[1] == "malformed response: no choices"
    ok, err = parse_completion(
        b'{"choices":[{"message":{"content":"Step 1: a"},"finish_reason":"length"}],'
        b'"usage":{"prompt_tokens":11,"completion_tokens":5}}'
    )
    assert err is None and ok == {"content": "Step 1: a", "finish_reason": "length", "input_tokens": 11, "output_tokens": 5}
    empty, err = parse_completion(b'{"choices":[{"message":{"content":null},"finish_reason":"stop"}]}')
    assert err is None and empty["content"] == "" and empty["input_tokens"] is None


# ---------------------------------------------------------------- grounding


def test_grounding_exact_prefix_fuzzy_and_misses():
    ix = TitleIndex(items_frame())
    assert normalize_title("Zeta Label-Maker  PRO!") == "zeta label maker pro"
    got = ix.ground([
        ["ZETA label maker pro", "Zeta Label Tape Refill…", "Acme Cordless Phone 100 (silver)", "Pens",
         "Garden Hose Reel 50 ft", "zeta label maker pro"],
        [],
    ])
    # exact (normalised), ellipsis prefix, fuzzy, too short, no match, repeat dropped
    assert got == [["C", "D", "A"], []]


# ---------------------------------------------------------------- offline teacher


def _toy_stats(**cfg):
    histories = [["A", "B"], ["A", "B"], ["A", "C"], ["C", "D"], ["C", "D"], ["E", "F"], ["E", "A"], ["G"]]
    c = OfflineTeacherConfig(window=1, n_items=3, **cfg)
    return build_stats(histories, items_frame(), c), c


def test_offline_rationale_for_a_hand_made_user():
    stats, cfg = _toy_stats()
    out = OfflineTeacher(stats, cfg)(pd.DataFrame({"prompt_hash": ["h"], "prompt_item_ids": [["E", "A"]]}))
    # Follows A (weight 1): B twice, C once; follows E (weight 0.4): F, A (owned). -> B 2.0, C 1.0, F 0.4
    assert list(out.loc[0, "grounded_item_ids"]) == ["B", "C", "F"]
    # Category pairs seen >= 2 times: Cordless -> Phone Batteries (PMI log(3 / (1 + 3*2/7)) > 0), Label Makers ->
    # Label Tapes; brands: Acme -> Acme, Zeta -> Zeta. The user's recent category/brand is Cordless/Acme.
    assert out.loc[0, "rationale"] == (
        "Step 1: The customer has bought 2 items, mostly Cordless Telephones and Ballpoint Pens, and favours the "
        "brands Acme and Inkwell. The most recent purchase is 'Acme Cordless Phone 100' (Cordless Telephones).\n"
        "Step 2: Customers who bought these items next tend to buy Phone Batteries; brands to suggest: Acme.\n"
        'Step 3: Recommended items: "Acme Phone Battery Pack 2"; "Zeta Label Maker Pro"; "Red Gel Pens 8 Pack".'
    )
    parsed, err = parse_rationale(out.loc[0, "rationale"], "stop")
    assert err is None and parsed.item_names == ("Acme Phone Battery Pack 2", "Zeta Label Maker Pro", "Red Gel Pens 8 Pack")


def test_offline_cold_user_falls_back_to_own_category_then_popularity():
    stats, cfg = _toy_stats()
    out = OfflineTeacher(stats, cfg)(pd.DataFrame({"prompt_hash": ["h"], "prompt_item_ids": [["G"]]}))
    # Nothing follows G and it has no brand; its category holds only G. Popularity in histories:
    # A 4, C 3, then B, D, E with 2 each (smaller id first).
    assert list(out.loc[0, "grounded_item_ids"]) == ["A", "C", "B"]
    assert "Step 2: Customers with this history tend to stay with Desk Staplers; no brand stands out." in out.loc[0, "rationale"]
    assert "no brand is listed for them" in out.loc[0, "rationale"]


def test_offline_teacher_on_a_catalogue_without_brands_or_categories():
    """MovieLens has no brands: no label of a kind at all must not break the scoring."""
    histories = [["A", "B"], ["A", "B"], ["A", "C"]]
    c = OfflineTeacherConfig(window=1, n_items=2)
    for drop in (["brand"], ["brand", "categories"]):
        items = items_frame().assign(**{k: None for k in drop})
        stats = build_stats(histories, items, c)
        assert stats.brands == [] and (stats.cats == []) == ("categories" in drop)
        out = OfflineTeacher(stats, c)(pd.DataFrame({"prompt_hash": ["h"], "prompt_item_ids": [["A"]]}))
        assert list(out.loc[0, "grounded_item_ids"]) == ["B", "C"]  # B follows A twice, C once
        assert "no brand stands out" in out.loc[0, "rationale"]


def test_cut_right_after_the_step_3_header_is_truncated_not_a_parse_error():
    assert parse_rationale("Step 1: a\nStep 2: b\nStep 3: ", "length") == (
        None, "truncated: the answer hit the token limit inside step 3")
    assert parse_rationale("Step 1: a\nStep 2: b\nStep 3: ", "stop") == (None, "parse_error: step(s) [3] empty")
