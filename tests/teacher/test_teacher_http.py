"""HTTP teacher end to end: real fault-injecting server on 127.0.0.1, real Ray actors, real Delta tables."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from slimrec.stages import teacher_rationales as stage
from slimrec.teacher.fake_server import FakeOpenAIServer, prompt_key
from teacher_helpers import make_ctx, write_inputs

KEY = "sk-test-9f8e7d6c5b4a39281706ABCDEF"  # the fake endpoint's key; must never be written anywhere
KEY_ENV = "SLIMREC_TEST_TEACHER_KEY"


def _items_with_markers(n: int) -> pd.DataFrame:
    """Item i<k> per user k, titled with a marker the server's script matches on, plus two plain items."""
    rows = [(f"i{k}", f"Marker{k:02d} Office Widget") for k in range(n)]
    rows += [("x0", "Plain Desk Lamp"), ("x1", "Plain Paper Clips")]
    return pd.DataFrame(
        [{"item_id": i, "title": t, "categories": ["Office", "Desk"], "brand": "Plainco", "description": None,
          "item_text": t, "text_hash": "0" * 40} for i, t in rows]
    )


def _histories(n: int) -> dict[str, list[str]]:
    return {f"u{k:02d}": [f"i{k}", "x0", "x1"] for k in range(n)}


def _http_overrides(srv: FakeOpenAIServer, **extra) -> list[str]:
    base = {
        "teacher.kind": "http", "teacher.http.base_url": srv.base_url, "teacher.http.model": "fake-teacher",
        "teacher.http.api_key_env": KEY_ENV, "teacher.http.requests_per_s": 50, "teacher.http.max_concurrency": 8,
        "teacher.http.request_timeout_s": 0.5, "teacher.http.max_retries": 2, "teacher.http.backoff_base_s": 0.02,
        "teacher.http.backoff_max_s": 0.1, "teacher.sample_size": 100, "teacher.commit_batch_size": 4,
        "teacher.commit_interval_s": 0.5,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _by_user(lake) -> pd.DataFrame:
    df = lake.read_pandas("teacher_rationales")
    assert not df.duplicated(["prompt_hash", "teacher_model"]).any()
    return df.set_index("user_id").sort_index()


def _assert_key_nowhere(lake_root: str, texts: list[str]) -> None:
    for t in texts:
        assert KEY not in t and KEY[:8] not in t and KEY[-8:] not in t
    for p in Path(lake_root).rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), f"API key found in {p}"


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def test_faults_retries_statuses_and_no_repeat_on_rerun(ray_local, tmp_lake, run_date, key_env, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    n = 9
    prompts = write_inputs(tmp_lake, run_date, _histories(n), items=_items_with_markers(n), write_sequences=False)
    script = {
        "Marker00": ["429", "ok"],                   # u00: Retry-After honoured, then answered
        "Marker01": ["500", "500", "ok"],            # u01: two server errors
        "Marker02": ["slow", "ok"],                  # u02: beyond the 0.5 s timeout
        "Marker03": ["drop", "ok"],                  # u03: connection dropped
        "Marker04": ["malformed", "ok"],             # u04: bad JSON
        "Marker05": ["empty", "ok"],                 # u05: empty content: recorded, retried next run
        "Marker06": ["500"] * 20,                    # u06: never answers
        "Marker07": ["truncated", "ok"],             # u07: finish_reason=length
    }                                                # u08: fine
    prompt_of = dict(zip(prompts["user_id"], prompts["teacher_prompt"], strict=True))

    with FakeOpenAIServer(script=script, retry_after_s=0.3, slow_s=1.5, api_key=KEY, echo_auth=True) as srv:
        ctx = make_ctx(tmp_lake, run_date, _http_overrides(srv))
        r1 = stage.run(ctx)
        u00 = [rec.t for rec in srv.log if rec.key == prompt_key(prompt_of["u00"])]
        assert len(u00) == 2 and u00[1] - u00[0] >= 0.3  # the retry waited out Retry-After: 0.3
        df = _by_user(tmp_lake)
        expected = {  # user: (status, attempts), by hand from the script and max_retries=2 (3 requests a run)
            "u00": ("ok", 2), "u01": ("ok", 3), "u02": ("ok", 2), "u03": ("ok", 2), "u04": ("ok", 2),
            "u05": ("empty", 1), "u06": ("failed", 3), "u07": ("truncated", 1), "u08": ("ok", 1),
        }
        assert {u: (df.loc[u, "status"], df.loc[u, "attempts"]) for u in df.index} == expected
        assert df.loc["u06", "error"].startswith("failed: 3 attempt(s); last: http 500")
        assert "[redacted]" in df.loc["u06", "error"]  # the server echoed the Authorization header
        assert df.loc["u05", "error"].startswith("empty") and df.loc["u07", "error"].startswith("truncated")
        assert df[df["status"] != "ok"]["error"].notna().all() and df[df["status"] == "ok"]["error"].isna().all()
        ok = df[df["status"] == "ok"]
        assert ok["step3"].notna().all() and (ok["input_tokens"] > 0).all() and (ok["latency_ms"] > 0).all()
        # The fake answer names the first and last history titles: u08's are items i8 and x1.
        assert list(df.loc["u08", "grounded_item_ids"]) == ["i8", "x1"]
        assert r1.extra["calls"] == 9 and r1.extra["requests"] == sum(a for _, a in expected.values())
        assert r1.extra["cost_usd"] > 0 and r1.extra["commits"] >= 2
        assert max(srv.answered.values()) == 1  # no prompt answered twice
        answered_first = {prompt_key(prompt_of[u]) for u in ok.index}

        srv.reset_log()
        r2 = stage.run(ctx)  # retries u05, u06, u07 only
        assert srv.keys_requested() == {prompt_key(prompt_of[u]) for u in ("u05", "u06", "u07")}
        assert not (srv.keys_requested() & answered_first)
        df2 = _by_user(tmp_lake)
        assert (df2.loc["u05", "status"], df2.loc["u05", "attempts"]) == ("ok", 2)
        assert (df2.loc["u06", "status"], df2.loc["u06", "attempts"]) == ("failed", 6)
        assert r2.extra["cached_ok"] == 6 and r2.extra["retry"] == 3

        srv.reset_log()
        ctx3 = make_ctx(tmp_lake, run_date, _http_overrides(srv, **{"teacher.max_attempts": 6}))
        r3 = stage.run(ctx3)  # u06 has used its 6 attempts: nothing left to send
        assert srv.log == [] and r3.extra["calls"] == 0 and r3.extra["exhausted"] == 1
        assert len(srv.auth_headers) == 1  # the key was sent, as a bearer token

    out, err = capfd.readouterr()
    meta = [json.dumps(c) for c in tmp_lake.history("teacher_rationales")]
    _assert_key_nowhere(tmp_lake.root, [caplog.text, out, err, *meta, json.dumps([r1.extra, r2.extra, r3.extra])])


def test_dry_run_sends_nothing_and_budget_caps_resume(ray_local, tmp_lake, run_date, key_env):
    n = 6
    write_inputs(tmp_lake, run_date, _histories(n), items=_items_with_markers(n), write_sequences=False)
    with FakeOpenAIServer(api_key=KEY) as srv:
        dry = stage.run(make_ctx(tmp_lake, run_date, _http_overrides(srv), dry_run=True))
        assert srv.log == [] and not tmp_lake.exists("teacher_rationales")
        assert dry.skipped and dry.extra["calls"] == 6 and dry.extra["input_tokens"] > 0
        assert dry.extra["output_tokens"] == 6 * 300 and dry.extra["cost_usd"] > 0

        capped = stage.run(make_ctx(tmp_lake, run_date, _http_overrides(srv, **{"teacher.max_calls": 2})))
        assert len(srv.log) == 2 and capped.extra["stopped_by"] == "max_calls" and capped.extra["not_sent"] == 4
        assert len(tmp_lake.read_pandas("teacher_rationales")) == 2
        first = srv.keys_requested()

        srv.reset_log()
        rest = stage.run(make_ctx(tmp_lake, run_date, _http_overrides(srv)))
        assert rest.extra["calls"] == 4 and not (srv.keys_requested() & first)
        assert (tmp_lake.read_pandas("teacher_rationales")["status"] == "ok").sum() == 6


def test_wrong_key_stops_the_run_and_never_leaks(ray_local, tmp_lake, run_date, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, KEY)
    n = 6
    write_inputs(tmp_lake, run_date, _histories(n), items=_items_with_markers(n), write_sequences=False)
    with FakeOpenAIServer(api_key="sk-the-right-one", echo_auth=True) as srv:
        r = stage.run(make_ctx(tmp_lake, run_date, _http_overrides(
            srv, **{"teacher.http.max_concurrency": 1, "teacher.http.requests_per_s": 5})))
    assert r.extra["stopped_by"] == "fatal_http_status" and "http 401" in r.extra["fatal_error"]
    df = tmp_lake.read_pandas("teacher_rationales")
    assert (df["status"] == "failed").all() and len(df) < n  # stopped early; unsent prompts stay unsent
    _assert_key_nowhere(tmp_lake.root, [caplog.text, *df["error"].tolist(), json.dumps(r.extra)])


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


def test_killed_run_resumes_without_duplicates(ray_local, tmp_lake, run_date, key_env):
    n = 40
    write_inputs(tmp_lake, run_date, _histories(n), items=_items_with_markers(n), write_sequences=False)
    with FakeOpenAIServer(latency_s=0.05, api_key=KEY) as srv:
        overrides = _http_overrides(srv, **{"teacher.http.requests_per_s": 10, "teacher.commit_batch_size": 5})
        code = _CHILD.format(tests_dir=str(Path(__file__).parent), lake=tmp_lake.root,
                             run_date=run_date.isoformat(), overrides=overrides)
        env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
        child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:  # kill after at least two commits, well before the 40 prompts are done
                if tmp_lake.exists("teacher_rationales") and tmp_lake.version("teacher_rationales") >= 1:
                    break
                assert child.poll() is None, "the child run ended before it could be killed"
                time.sleep(0.05)
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
        before = tmp_lake.read_pandas("teacher_rationales")
        assert 0 < len(before) < n
        committed = set(before.loc[before["status"] == "ok", "prompt_hash"])

        srv.reset_log()
        r = stage.run(make_ctx(tmp_lake, run_date, overrides))
        after = tmp_lake.read_pandas("teacher_rationales")
        assert len(after) == n and not after["prompt_hash"].duplicated().any()
        assert (after["status"] == "ok").all()
        key_of = {h: prompt_key(t) for h, t in zip(*_prompt_columns(tmp_lake), strict=True)}
        assert not {key_of[h] for h in committed} & srv.keys_requested()  # answered before the kill: not resent
        assert r.extra["cached_ok"] == len(committed) and r.extra["calls"] == n - len(committed)


def _prompt_columns(lake):
    p = lake.read_pandas("prompts", columns=["prompt_hash", "teacher_prompt"])
    return p["prompt_hash"].tolist(), p["teacher_prompt"].tolist()
