"""Teacher benchmark: ``python -m bench.teacher [--quick]``.

Against the fault-injecting local server (``slimrec.teacher.fake_server``)
with 50 ms added latency, through the real stage (Ray actors, Delta MERGE
commits) on prompts built from the bundled Office data:

1. throughput: achieved requests/s (server-side arrival rate) versus the
   configured limit, for a few limits; then an immediate rerun, which must
   send zero requests (everything is cached);
2. faults: 30% of requests fail (429 with Retry-After, 500, 503, slow beyond
   the timeout, dropped connection, malformed JSON): share of prompts answered
   after retries, requests per prompt, duplicates in the table and in the
   server's good answers;
3. the offline teacher's signal: HR@10 / NDCG@10 of its step-3 items against
   the validation and test targets (full ranking, the user's history
   excluded), beside most-popular and random lists, and its speed.

Prints tables; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from slimrec.config import load_config  # noqa: E402
from slimrec.lake import CommitInfo, Lake  # noqa: E402
from slimrec.stages import teacher_rationales as stage  # noqa: E402
from slimrec.stages.base import StageContext  # noqa: E402
from slimrec.teacher.config import OfflineTeacherConfig  # noqa: E402
from slimrec.teacher.fake_server import TRANSPORT_FAULTS, FakeOpenAIServer  # noqa: E402
from slimrec.teacher.fixtures import lcrec_tables, prompt_rows  # noqa: E402
from slimrec.teacher.offline import OfflineTeacher, build_stats  # noqa: E402

from bench.common import record, row  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "amazon_office_2014"
RUN_DATE = date(2024, 1, 15)
KEY_ENV = "SLIMREC_BENCH_TEACHER_KEY"


def _lake(root: Path, items: pd.DataFrame, seqs: pd.DataFrame, n_users: int) -> Lake:
    lake = Lake(root)
    info = CommitInfo("bench", RUN_DATE)
    lake.write_arrow("items", items, "overwrite", info)
    lake.write_arrow("prompts", prompt_rows(seqs.head(n_users), items), "replace_date", info)
    return lake


def _run(lake: Lake, srv: FakeOpenAIServer, n: int, rps: float, **extra) -> tuple[dict, float]:
    sets = {
        "teacher.kind": "http", "teacher.http.base_url": srv.base_url, "teacher.http.model": "fake-teacher",
        "teacher.http.api_key_env": KEY_ENV, "teacher.http.requests_per_s": rps, "teacher.http.max_concurrency": 16,
        "teacher.http.request_timeout_s": 1.0, "teacher.http.max_retries": 4, "teacher.http.backoff_base_s": 0.1,
        "teacher.http.backoff_max_s": 2.0, "teacher.sample_size": n, "teacher.commit_batch_size": 50,
        "teacher.commit_interval_s": 2.0, **extra,
    }
    cfg = load_config("dev", overrides=[f"{k}={v}" for k, v in sets.items()])
    t0 = time.perf_counter()
    r = stage.run(StageContext(cfg=cfg, lake=lake, run_date=RUN_DATE))
    return r.extra, time.perf_counter() - t0


def _table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(pd.DataFrame(rows).to_string(index=False))


def bench_throughput(items, seqs, tmp: Path, limits: list[float], seconds: float) -> list[dict]:
    rows, out = [], []
    for rps in limits:
        n = int(rps * seconds)
        lake = _lake(tmp / f"thr{rps:g}", items, seqs, n)
        with FakeOpenAIServer(latency_s=0.05) as srv:
            extra, wall = _run(lake, srv, n, rps)
            achieved = srv.requests_per_s()
            first = len(srv.log)
            srv.reset_log()
            extra2, wall2 = _run(lake, srv, n, rps)
            rows.append({
                "limit_rps": rps, "prompts": n, "requests": first, "achieved_rps": round(achieved, 1),
                "achieved/limit": f"{achieved / rps:.0%}", "stage_s": round(wall, 1),
                "rerun_requests": len(srv.log), "rerun_cached_ok": extra2["cached_ok"], "rerun_s": round(wall2, 1),
            })
            case = f"http {rps:g} rps limit, 50 ms latency, {n} prompts"
            out.append(row(case, "achieved_rps", achieved, "req/s", "configured limit", rps))
            out.append(row(case, "rerun_requests", float(len(srv.log)), "requests", "first run requests", float(first)))
    _table("HTTP teacher throughput (fake server, 50 ms latency, concurrency 16)", rows)
    return out


def bench_faults(items, seqs, tmp: Path, n: int, rate: float) -> list[dict]:
    rows, out = [], []
    for label, kinds in [("transport faults", TRANSPORT_FAULTS),
                         ("transport + empty/truncated", (*TRANSPORT_FAULTS, "empty", "truncated"))]:
        lake = _lake(tmp / f"faults{len(kinds)}", items, seqs, n)
        with FakeOpenAIServer(latency_s=0.05, fault_rate=rate, fault_kinds=kinds, retry_after_s=0.2,
                              slow_s=1.5, seed=1) as srv:
            extra, wall = _run(lake, srv, n, 50)
            df = lake.read_pandas("teacher_rationales")
            faults = pd.Series([r.fault for r in srv.log]).value_counts()
            rows.append({
                "faults": f"{rate:.0%} {label}", "prompts": n, "answered_ok": f"{(df['status'] == 'ok').mean():.1%}",
                "statuses": dict(df["status"].value_counts()), "requests": len(srv.log),
                "req/prompt": round(len(srv.log) / n, 2), "faults_injected": int(faults.drop("ok", errors="ignore").sum()),
                "dup_rows": int(df.duplicated(["prompt_hash", "teacher_model"]).sum()),
                "max_good_answers_per_prompt": max(srv.answered.values()), "stage_s": round(wall, 1),
            })
            case = f"http {rate:.0%} {label}, {n} prompts"
            out.append(row(case, "answered_ok_share", float((df["status"] == "ok").mean()), "share"))
            out.append(row(case, "requests_per_prompt", len(srv.log) / n, "req"))
            out.append(row(case, "duplicate_rows", float(df.duplicated(["prompt_hash", "teacher_model"]).sum()), "rows"))
            out.append(row(case, "max_good_answers", float(max(srv.answered.values())), "per prompt"))
    _table("HTTP teacher under injected faults (max_retries 4)", rows)
    return out


def _hit(lists: list[list[str]], targets: list[str], k: int = 10) -> tuple[float, float]:
    hr = nd = 0.0
    for got, t in zip(lists, targets, strict=True):
        got = list(got)[:k]
        if t in got:
            hr += 1
            nd += 1 / math.log2(got.index(t) + 2)
    return hr / len(targets), nd / len(targets)


def bench_offline(items, seqs) -> list[dict]:
    """Valid target: the teacher sees the history. Test target: it sees history + valid item (as a later run
    would); statistics always come from the histories only. Every list excludes the items the teacher saw."""
    cfg = OfflineTeacherConfig()
    t0 = time.perf_counter()
    stats = build_stats(seqs["history"], items, cfg)
    t_stats = time.perf_counter() - t0
    teacher = OfflineTeacher(stats, cfg)
    pop = pd.Series([x for h in seqs["history"] for x in h]).value_counts().index.tolist()
    all_items = items["item_id"].tolist()
    rng = np.random.default_rng(0)
    rows = {name: {"list": name} for name in ("offline teacher step 3", "most popular", "random")}
    gen_rate = chars = None
    for split, inputs, targets in [
        ("valid", [list(h) for h in seqs["history"]], seqs["valid_target"].tolist()),
        ("test", [list(h) + [v] for h, v in zip(seqs["history"], seqs["valid_target"], strict=True)],
         seqs["test_target"].tolist()),
    ]:
        batch = pd.DataFrame({"prompt_hash": seqs["user_id"], "prompt_item_ids": [x[-20:] for x in inputs]})
        t0 = time.perf_counter()
        out = teacher(batch)
        gen_rate = gen_rate or len(batch) / (time.perf_counter() - t0)
        chars = chars or out["rationale"].str.len().mean()
        seen = [set(x) for x in inputs]
        lists = {
            "offline teacher step 3": list(out["grounded_item_ids"]),
            "most popular": [[i for i in pop if i not in h][:10] for h in seen],
            "random": [[all_items[j] for j in rng.permutation(len(all_items)) if all_items[j] not in h][:10] for h in seen],
        }
        for name, got in lists.items():
            hr, nd = _hit(got, targets)
            rows[name][f"HR@10 {split}"] = round(hr, 4)
            rows[name][f"NDCG@10 {split}"] = round(nd, 4)
    _table(f"Offline teacher signal on {len(seqs)} users (full ranking over {len(items)} items, seen items excluded; "
           f"stats {t_stats:.2f}s, {gen_rate:.0f} rationales/s, mean {chars:.0f} chars)", list(rows.values()))
    t = rows["offline teacher step 3"]
    out = []
    for split in ("valid", "test"):
        for base in ("random", "most popular"):
            out.append(row(f"offline teacher step-3 list, {split}", "ndcg@10 full", t[f"NDCG@10 {split}"], "ndcg",
                           base, rows[base][f"NDCG@10 {split}"]))
    out.append(row("offline teacher, 4905 users", "rationales_per_s", gen_rate, "1/s"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer prompts (a smoke run)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ[KEY_ENV] = "sk-bench-not-a-real-key"
    items, seqs = lcrec_tables(DATA)
    from slimrec.rayutil import ensure_ray

    ensure_ray(None)
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as d:
        tmp = Path(d)
        rows = bench_throughput(items, seqs, tmp, [20.0, 50.0], 3.0 if args.quick else 8.0)
        rows += bench_faults(items, seqs, tmp, 60 if args.quick else 300, 0.3)
    rows += bench_offline(items, seqs)
    print()
    record("teacher", rows, {"quick": args.quick})


if __name__ == "__main__":
    main()
