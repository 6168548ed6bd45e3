"""Batch teacher (teacher.http.api=batch) over real HTTP against the fake server, with a real Delta lake.

No Ray here: the flow is driven directly (``BatchTeacher.answer``) or through the stage with
``retry_failed=batch``/``none`` (the synchronous retry path needs Ray and lives in
``test_stage_batch_expired_lines_retried_through_chat``, which uses the ``ray_local`` fixture).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
from slimrec.config import load_config
from slimrec.lake import CommitInfo
from slimrec.stages import teacher_rationales as stage
from slimrec.teacher.batch_teacher import (
    BATCH_ENDPOINT,
    TABLE,
    BatchStore,
    BatchTeacher,
    api_root,
    batch_ending,
    parse_result_line,
    request_file,
)
from slimrec.teacher.budget import Budget, estimate
from slimrec.teacher.config import TeacherConfig
from slimrec.teacher.fake_server import FakeOpenAIServer, prompt_key
from slimrec.teacher.http_teacher import HttpSettings, build_payload
from teacher_helpers import make_ctx, write_inputs

KEY = "sk-batch-test-5a4b3c2d1e0f99887766AABBCC"
KEY_ENV = "SLIMREC_TEST_BATCH_KEY"
RUN_DATE = date(2024, 1, 15)

# ---------------------------------------------------------------- pure parts


def test_request_file_lines_are_the_chat_payload_posted_to_the_batch_endpoint():
    s = HttpSettings.for_worker(TeacherConfig(kind="http", http={"model": "m", "system_prompt": "sys"}), 0)
    data = request_file(s, [("h1", "prompt one"), ("h2", "prompt \u00e9")])
    lines = [json.loads(x) for x in data.decode().splitlines()]
    assert [x["custom_id"] for x in lines] == ["h1", "h2"]
    assert {x["method"] for x in lines} == {"POST"} and {x["url"] for x in lines} == {"/v1/chat/completions"}
    assert lines[1]["body"] == build_payload(s, "prompt \u00e9")
    assert lines[0]["body"]["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "prompt one"}]


def test_result_lines_answers_errors_and_garbage():
    ok = {"id": "r1", "custom_id": "h1", "error": None, "response": {"status_code": 200, "request_id": "q", "body": {
        "choices": [{"message": {"content": "Step 1: a"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7}}}}
    assert parse_result_line(json.dumps(ok)) == ("h1", {"content": "Step 1: a", "finish_reason": "stop",
                                                        "input_tokens": 11, "output_tokens": 7, "error": None})
    expired = {"id": "r2", "custom_id": "h2", "response": None,
               "error": {"code": "batch_expired", "message": "not done in time"}}
    assert parse_result_line(json.dumps(expired)) == ("h2", {"error": "batch_expired: not done in time"})
    http500 = {"id": "r3", "custom_id": "h3", "error": None, "response": {"status_code": 500, "body": {
        "error": {"message": "boom"}}}}
    assert parse_result_line(json.dumps(http500)) == ("h3", {"error": "http 500: boom"})
    no_choices = {"custom_id": "h4", "error": None, "response": {"status_code": 200, "body": {"choices": []}}}
    assert parse_result_line(json.dumps(no_choices)) == ("h4", {"error": "malformed response: no choices"})
    assert parse_result_line(b"{not json")[0] is None


def test_batch_ending_and_api_root():
    assert batch_ending({"status": "expired"}) == "batch expired"
    assert batch_ending({"status": "failed", "errors": {"data": [{"code": "invalid_request", "message": "line 2"}]}}) \
        == "batch failed (invalid_request: line 2)"
    assert api_root("http://h:1/v1/") == "http://h:1/v1"
    assert api_root("http://h:1/v1/chat/completions") == "http://h:1/v1"
    assert BATCH_ENDPOINT == "/v1/chat/completions"


def test_estimate_prices_both_modes_by_hand():
    cfg = TeacherConfig(kind="http", est_output_tokens=100, max_cost_usd=0.0005,
                        http={"model": "fake-teacher", "system_prompt": "", "api": "batch"})
    est = estimate(pd.DataFrame({"teacher_prompt": ["x" * 400, "y" * 400]}), cfg, "fake-teacher", "", cached=0)
    # 101 input + 100 output tokens per call at 1 / 2 USD per 1M: 0.000301 USD a call synchronously
    chat = (202 * 1.0 + 200 * 2.0) / 1e6
    assert est["api"] == "batch" and est["modes"]["chat"]["cost_usd"] == pytest.approx(chat)
    assert est["modes"]["batch"]["cost_usd"] == pytest.approx(chat * 0.5) == pytest.approx(est["cost_usd"])
    # the 0.0005 USD cap holds one synchronous call (0.000301) and both batch calls (2 x 0.0001505)
    assert est["modes"]["chat"]["calls_within_budget"] == 1 and est["modes"]["batch"]["calls_within_budget"] == 2
    assert est["calls_within_budget"] == 2


# ---------------------------------------------------------------- the flow against the fake server


def _cfg(srv: FakeOpenAIServer, **extra) -> TeacherConfig:
    base = {
        "teacher.kind": "http", "teacher.http.api": "batch", "teacher.http.base_url": srv.base_url,
        "teacher.http.model": "fake-teacher", "teacher.http.api_key_env": KEY_ENV,
        "teacher.http.request_timeout_s": 2, "teacher.http.max_retries": 1, "teacher.http.backoff_base_s": 0.01,
        "teacher.http.batch.poll_interval_s": 0.01, "teacher.http.batch.poll_backoff": 1.0,
        "teacher.http.batch.retry_failed": "batch", "teacher.commit_batch_size": 3,
    }
    base.update(extra)
    return load_config("tiny", overrides=[f"{k}={v}" for k, v in base.items()]).teacher


def _pending(n: int) -> pd.DataFrame:
    """n prompts with markers the server's script can match (``Marker03`` is prompt 3's)."""
    return pd.DataFrame({
        "prompt_hash": [f"{k:040x}" for k in range(n)],
        "teacher_prompt": [f"History of Marker{k:02d}:\n- Marker{k:02d} Widget | Office > Desk | Plainco" for k in range(n)],
    })


def _store(lake) -> BatchStore:
    return BatchStore(lake, lambda: CommitInfo("teacher_rationales", RUN_DATE))


def _answer(teacher: BatchTeacher, pending: pd.DataFrame, budget: Budget | None = None) -> dict[str, dict]:
    rows = [r for chunk in teacher.answer(pending, budget or Budget()) for r in chunk]
    by_hash = {r["prompt_hash"]: r for r in rows}
    assert len(by_hash) == len(rows), "a prompt was yielded twice"
    return by_hash


def _key(pending: pd.DataFrame, k: int) -> str:
    return prompt_key(pending["teacher_prompt"][k])


def test_partial_failure_and_expiry_every_prompt_answered_or_failed_with_reason(tmp_lake):
    pending = _pending(6)
    # batch 1 expires after 3 lines; of those, prompt 1 fails (error file). Prompt 5 fails in every batch.
    script = {"Marker01": ["500", "ok"], "Marker05": ["503", "500", "503"]}
    with FakeOpenAIServer(script=script, batch_outcomes=["expired"], batch_done_lines=3) as srv:
        t = BatchTeacher(_cfg(srv, **{"teacher.http.batch.retry_rounds": 2}), None, _store(tmp_lake))
        got = _answer(t, pending)
        assert set(got) == set(pending["prompt_hash"])
        for k in (0, 1, 2, 3, 4):
            r = got[pending["prompt_hash"][k]]
            assert r["error"] is None and r["content"].startswith("Step 1:"), k
            assert r["price_factor"] == 0.5 and r["input_tokens"] > 0
        h = pending["prompt_hash"]
        # by hand: round 0 expired after lines 0-2 (1 failed); round 1 holds 1, 3, 4, 5 (5 fails); round 2 holds 5
        assert [got[h[k]]["attempts"] for k in range(6)] == [1, 2, 1, 2, 2, 3]
        bad = got[h[5]]["error"]
        assert bad.startswith("failed: batch batch_000003: http 500: fake 500; earlier: failed: batch batch_000002: "
                              "http 503: fake 503; earlier: ")
        assert bad.endswith("failed: batch batch_000001: batch_expired: not processed: the batch was expired")
        assert srv.paid_twice() == {}
        assert srv.batches_created() == ["batch_000001", "batch_000002", "batch_000003"]
        assert [srv.billed[_key(pending, k)] for k in range(6)] == [1, 1, 1, 1, 1, 0]
    st = t.run_stats
    assert (st.answered, st.failed, st.batches_created, st.retried_in_batch, st.in_flight) == (5, 1, 3, 5, 0)
    state = tmp_lake.read_pandas(TABLE).set_index("batch_id").sort_index()
    assert state["status"].tolist() == ["collected"] * 3 and state["round"].tolist() == [0, 1, 2]
    assert state.loc["batch_000001", "error"] == "batch expired"
    assert list(state.loc["batch_000002", "custom_ids"]) == [h[1], h[3], h[4], h[5]]


def test_a_batch_that_fails_is_retried_in_a_new_batch(tmp_lake):
    pending = _pending(3)
    with FakeOpenAIServer(batch_outcomes=["failed"]) as srv:
        got = _answer(BatchTeacher(_cfg(srv), None, _store(tmp_lake)), pending)
        assert all(r["error"] is None for r in got.values()) and len(got) == 3
        assert srv.batches_created() == ["batch_000001", "batch_000002"] and srv.paid_twice() == {}
    assert {r["attempts"] for r in got.values()} == {2}


def test_retry_failed_none_keeps_the_reason(tmp_lake):
    pending = _pending(2)
    with FakeOpenAIServer(script={"Marker01": ["500"]}) as srv:
        got = _answer(BatchTeacher(_cfg(srv, **{"teacher.http.batch.retry_failed": "none"}), None, _store(tmp_lake)),
                      pending)
    assert got[pending["prompt_hash"][0]]["error"] is None
    r1 = got[pending["prompt_hash"][1]]
    assert r1["error"] == "failed: batch batch_000001: http 500: fake 500" and r1["attempts"] == 1


class Killed(RuntimeError):
    pass


def test_killed_after_create_resumes_polling_the_same_batch(tmp_lake):
    pending = _pending(5)
    with FakeOpenAIServer(batch_polls=2) as srv:
        cfg = _cfg(srv)

        def kill(event, row):
            if event == "created":
                raise Killed(row["batch_id"])

        with pytest.raises(Killed, match="batch_000001"):
            _answer(BatchTeacher(cfg, None, _store(tmp_lake), hook=kill), pending)
        assert srv.batches_created() == ["batch_000001"] and srv.log == []  # created, nothing processed yet
        state = tmp_lake.read_pandas(TABLE)
        assert state[["batch_id", "status"]].values.tolist() == [["batch_000001", "validating"]]

        srv.reset_log()
        t = BatchTeacher(cfg, None, _store(tmp_lake))
        got = _answer(t, pending)
        assert all(r["error"] is None for r in got.values()) and len(got) == 5
        assert srv.batches_created() == ["batch_000001"]  # no second batch: the rerun polled the first
        assert set(srv.batch_ids_polled()) == {"batch_000001"}
        assert [r for r in srv.api_log if r.method == "POST"] == []  # nothing uploaded or created again
        assert srv.paid_twice() == {} and sorted(srv.billed.values()) == [1] * 5
        assert (t.run_stats.batches_resumed, t.run_stats.batches_created) == (1, 0)
        assert tmp_lake.read_pandas(TABLE)["status"].tolist() == ["collected"]


def test_killed_between_create_and_its_record_finds_the_batch(tmp_lake):
    """The create's answer is lost (the server made the batch, the connection dropped): the client looks the
    submission up in the batch list instead of creating a second batch."""
    pending = _pending(3)
    with FakeOpenAIServer(lose_batch_creates=1) as srv:
        t = BatchTeacher(_cfg(srv), None, _store(tmp_lake))
        got = _answer(t, pending)
        assert all(r["error"] is None for r in got.values())
        assert srv.batches_created() == ["batch_000001"] and srv.paid_twice() == {}
        creates = [r for r in srv.api_log if r.method == "POST" and r.path == "/v1/batches"]
        assert [r.status for r in creates] == [None]  # sent once, its answer lost
        assert any(r.method == "GET" and r.path == "/v1/batches" for r in srv.api_log)


def test_a_killed_submitting_row_is_looked_up_on_resume(tmp_lake):
    pending = _pending(2)
    with FakeOpenAIServer() as srv:
        cfg = _cfg(srv)

        def kill(event, row):
            if event == "submitted":
                raise Killed(row["submission_id"])

        with pytest.raises(Killed):
            _answer(BatchTeacher(cfg, None, _store(tmp_lake), hook=kill), pending)
        assert srv.batches_created() == [] and tmp_lake.read_pandas(TABLE)["status"].tolist() == ["submitting"]
        t = BatchTeacher(cfg, None, _store(tmp_lake))
        got = _answer(t, pending)  # not found in the list: created now, once
        assert all(r["error"] is None for r in got.values())
        assert srv.batches_created() == ["batch_000001"] and t.run_stats.batches_created == 1


def test_budget_caps_what_goes_into_the_batch(tmp_lake):
    pending = _pending(5)
    with FakeOpenAIServer() as srv:
        t = BatchTeacher(_cfg(srv), None, _store(tmp_lake))
        got = _answer(t, pending, Budget(max_calls=2))
        assert list(got) == list(pending["prompt_hash"][:2])
        state = tmp_lake.read_pandas(TABLE)
        assert state["request_count"].tolist() == [2]
    assert (t.run_stats.stopped_by, t.run_stats.not_sent) == ("max_calls", 3)


def test_stops_waiting_and_leaves_the_batch_for_the_next_run(tmp_lake):
    pending = _pending(2)
    with FakeOpenAIServer(batch_polls=10**6) as srv:
        t = BatchTeacher(_cfg(srv, **{"teacher.http.batch.max_wait_s": 0.2}), None, _store(tmp_lake))
        assert _answer(t, pending) == {}
        assert (t.run_stats.stopped_by, t.run_stats.in_flight) == ("max_wait_s", 2)
        assert tmp_lake.read_pandas(TABLE)["status"].tolist() == ["in_progress"]
        assert t.held_prompts() == set(pending["prompt_hash"])


def test_wrong_key_stops_the_run_and_never_leaks(tmp_lake, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer(api_key="sk-the-right-one", echo_auth=True) as srv:
        from pydantic import SecretStr

        t = BatchTeacher(_cfg(srv), SecretStr(KEY), _store(tmp_lake))
        assert _answer(t, _pending(2)) == {}
        assert srv.batches_created() == []
    assert t.run_stats.stopped_by == "batch_api_error" and "http 401" in t.run_stats.fatal_error
    for text in (caplog.text, t.run_stats.fatal_error):
        assert KEY not in text and KEY[:8] not in text and KEY[-8:] not in text


# ---------------------------------------------------------------- the stage (no Ray: retries in a batch)


def _items(n: int) -> pd.DataFrame:
    rows = [(f"i{k}", f"Marker{k:02d} Office Widget") for k in range(n)]
    rows += [("x0", "Plain Desk Lamp"), ("x1", "Plain Paper Clips")]
    return pd.DataFrame([{"item_id": i, "title": t, "categories": ["Office", "Desk"], "brand": "Plainco",
                          "description": None, "item_text": t, "text_hash": "0" * 40} for i, t in rows])


def _stage_overrides(srv: FakeOpenAIServer, **extra) -> list[str]:
    base = {
        "teacher.kind": "http", "teacher.http.api": "batch", "teacher.http.base_url": srv.base_url,
        "teacher.http.model": "fake-teacher", "teacher.http.api_key_env": KEY_ENV,
        "teacher.http.request_timeout_s": 2, "teacher.http.max_retries": 1, "teacher.http.backoff_base_s": 0.01,
        "teacher.http.batch.poll_interval_s": 0.05, "teacher.http.batch.poll_backoff": 1.0,
        "teacher.http.batch.retry_failed": "batch", "teacher.sample_size": 100, "teacher.commit_batch_size": 4,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_stage_dry_run_prices_both_modes(tmp_lake, run_date, caplog):
    caplog.set_level(logging.INFO, logger="slimrec.stages.teacher_rationales")
    n = 4
    write_inputs(tmp_lake, run_date, {f"u{k:02d}": [f"i{k}", "x0", "x1"] for k in range(n)}, items=_items(n),
                 write_sequences=False)
    with FakeOpenAIServer() as srv:
        r = stage.run(make_ctx(tmp_lake, run_date, _stage_overrides(srv), dry_run=True))
        assert srv.log == [] and srv.api_log == [] and not tmp_lake.exists(TABLE)
    est = r.extra["estimate"]
    chat, batch = est["modes"]["chat"]["cost_usd"], est["modes"]["batch"]["cost_usd"]
    assert r.skipped and est["calls"] == n and chat > 0 and batch == pytest.approx(chat / 2)
    assert r.extra["cost_usd"] == pytest.approx(batch) and r.extra["in_open_batches"] == 0
    assert f"if sent by chat: cost {chat:.4f} USD" in caplog.text
    assert f"if sent by batch: cost {batch:.4f} USD" in caplog.text


_CHILD = textwrap.dedent(
    """
    import sys
    from datetime import date
    sys.path.insert(0, {tests_dir!r})
    from teacher_helpers import make_ctx
    from slimrec.lake import Lake
    from slimrec.stages import teacher_rationales as stage
    stage.run(make_ctx(Lake({lake!r}), date.fromisoformat({run_date!r}), {overrides!r}))
    """
)


def test_stage_killed_while_polling_resumes_the_same_batch(tmp_lake, run_date, monkeypatch):
    """A real SIGKILL of the stage while it polls; the rerun collects the same batch and pays nothing twice."""
    monkeypatch.setenv(KEY_ENV, KEY)
    n = 6
    prompts = write_inputs(tmp_lake, run_date, {f"u{k:02d}": [f"i{k}", "x0", "x1"] for k in range(n)}, items=_items(n),
                           write_sequences=False)
    with FakeOpenAIServer(api_key=KEY, batch_polls=10**6, script={"Marker02": ["500", "ok"]}) as srv:
        overrides = _stage_overrides(srv)
        code = _CHILD.format(tests_dir=str(Path(__file__).parent), lake=tmp_lake.root, run_date=run_date.isoformat(),
                             overrides=overrides)
        child = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # kill once the batch is recorded and has been polled
                if srv.batch_ids_polled():
                    break
                assert child.poll() is None, "the child run ended before it could be killed"
                time.sleep(0.05)
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
        assert srv.batches_created() == ["batch_000001"] and srv.log == []
        assert not tmp_lake.exists("teacher_rationales")
        dry = stage.run(make_ctx(tmp_lake, run_date, overrides, dry_run=True))
        assert (dry.extra["in_open_batches"], dry.extra["estimate"]["calls"]) == (n, 0)  # paid already: not priced

        srv.batch_polls = 1
        srv.reset_log()
        r = stage.run(make_ctx(tmp_lake, run_date, overrides))
        assert r.extra["batch"]["batches_resumed"] == 1 and r.extra["batch"]["batch_ids"][0] == "batch_000001"
        assert srv.batches_created() == ["batch_000001", "batch_000002"]  # the second: the retry of Marker02's line
        assert srv.paid_twice() == {}
    df = tmp_lake.read_pandas("teacher_rationales").set_index("user_id").sort_index()
    assert len(df) == n and (df["status"] == "ok").all() and not df["prompt_hash"].duplicated().any()
    assert df["attempts"].tolist() == [1, 1, 2, 1, 1, 1]
    # batch price: half of (input x 1 + output x 2) USD per 1M tokens for fake-teacher
    assert df["cost_usd"].tolist() == pytest.approx(((df["input_tokens"] + 2 * df["output_tokens"]) / 2e6).tolist())
    assert list(df.loc["u01", "grounded_item_ids"]) == ["i1", "x1"]
    state = tmp_lake.read_pandas(TABLE)
    assert sorted(state["status"]) == ["collected", "collected"]
    assert set(prompts["prompt_hash"]) == set(df["prompt_hash"])
    for p in Path(tmp_lake.root).rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), f"API key found in {p}"


def test_stage_batch_expired_lines_retried_through_chat(ray_local, tmp_lake, run_date):
    """retry_failed=chat (the default): an expired batch's unfinished lines go through the synchronous path."""
    n = 5
    write_inputs(tmp_lake, run_date, {f"u{k:02d}": [f"i{k}", "x0", "x1"] for k in range(n)}, items=_items(n),
                 write_sequences=False)
    with FakeOpenAIServer(batch_outcomes=["expired"], batch_done_lines=2) as srv:
        r = stage.run(make_ctx(tmp_lake, run_date, _stage_overrides(srv, **{
            "teacher.http.batch.retry_failed": "chat", "teacher.http.requests_per_s": 50})))
        assert srv.batches_created() == ["batch_000001"] and srv.paid_twice() == {}
        vias = {rec.via.split(":")[0] for rec in srv.log}
        assert vias == {"batch", "chat"}
        assert sum(rec.via == "chat" for rec in srv.log) == n - 2
    df = tmp_lake.read_pandas("teacher_rationales")
    assert len(df) == n and (df["status"] == "ok").all()
    assert sorted(df["attempts"]) == [1, 1, 2, 2, 2]  # the batch line, then one synchronous request
    assert r.extra["batch"]["retried_chat"] == n - 2
