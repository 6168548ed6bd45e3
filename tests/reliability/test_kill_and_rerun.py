"""SIGKILL ``slim run`` in the middle of each stage, rerun, and compare every table with a clean run.

One lake goes through a chain: run 1 is killed in ingest, its rerun is
killed in build_sequences, that rerun's rerun in build_prompts, and so on;
the last rerun completes. After every kill, what readers see is checked
(delta-rs and DuckDB through the Delta log): no duplicate key, the same rows
from both readers, a table written in one commit either absent or complete,
a table written in batches holding only whole, clean-run rows. At the end
every table is compared with the clean run's (keys, counts, duplicates and,
for deterministic tables, content), and the current version of every table
the clean run validated must carry a passing quality-gate result.

Where a kill lands: between two of ingest's commits; after build_sequences
committed, before its quality gate (the rerun finds nothing to change and
commits nothing, so its gate must still validate that commit); in
build_prompts once executors have written Parquet files and before the
driver commits them; after the teacher's first batch of ten; in embed once
the Ray Data encoder actor is up; other stages (SLIMREC_RELIABILITY_ALL=1)
half-way through their clean-run duration.
"""

from __future__ import annotations

import shutil

import pytest
from clusterkit import compare_lakes, validated_tables, visible_state
from killkit import FIGURES, UNDER_TEST, Kill, Pipeline, files_appear, process_appears
from slimrec.lake import Lake

pytestmark = [pytest.mark.slow]

# Tables each run writes in one commit: after a kill they are absent or complete, never partial.
ONE_COMMIT = {"raw_interactions", "raw_items", "items", "interactions", "user_sequences", "prompts",
              "item_embeddings", "rationale_embeddings"}


def kill_plan(clean_seconds: dict[str, float]) -> list[Kill]:
    """One kill per stage under test; the mid-stage ones fire on what the run is doing, not on a clock."""
    half = {s: 0.5 * clean_seconds.get(s, 10) for s in UNDER_TEST}
    plan = {
        "ingest": Kill("ingest", r"lake: raw_interactions overwrite", what="between two of its commits"),
        "build_sequences": Kill("build_sequences", r"lake: user_sequences (overwrite|merge)",
                                what="committed, before its gate"),
        # Executors have written Parquet files, the driver has not committed them.
        "build_prompts": Kill("build_prompts", r"stage build_prompts: start", 4 * half["build_prompts"] + 60,
                              until=files_appear("prompts"), what="files written, not committed"),
        "teacher_rationales": Kill("teacher_rationales", r"teacher: committed \d+ rows \(batch 1,",
                                   what="after batch 1 of 10"),
        # Ray Data's encoder actor is up (loading the model or encoding).
        "embed": Kill("embed", r"stage embed: start", 4 * half["embed"] + 60,
                      until=process_appears("MapWorker(MapBatches(EncodeBatch))"), what="Ray actor pool up"),
    }
    return [plan.get(s) or Kill(s, rf"stage {s}: start", half[s], what="half its clean duration")
            for s in UNDER_TEST]


def check_visible(lake: Lake, clean: dict[str, dict]) -> list[str]:
    """What a reader sees right after a kill: only whole commits of clean-run rows."""
    problems = []
    for t, v in visible_state(lake).items():
        if v["duplicate_keys"]:
            problems.append(f"{t}: {v['duplicate_keys']} duplicate keys visible")
        if v["duckdb_rows"] != v["rows"]:
            problems.append(f"{t}: DuckDB sees {v['duckdb_rows']} rows, delta-rs {v['rows']}")
        if t not in clean or t == "dq_results":
            continue
        if t in ONE_COMMIT and v["rows"] != clean[t]["rows"]:
            problems.append(f"{t}: {v['rows']} rows visible, a whole commit has {clean[t]['rows']}")
        if t not in ("student_models", "recommender_runs", "metrics") and not v["keys"] <= clean[t]["keys"]:
            problems.append(f"{t}: {len(v['keys'] - clean[t]['keys'])} keys a clean run never writes")
    return problems


def test_sigkill_in_each_stage_then_rerun_equals_clean_run(clean_run, rel_dataset, rel_tmp):
    clean_lake_dir, clean_res = clean_run
    d, procs = rel_tmp
    clean_lake = Lake(clean_lake_dir)
    clean_state = visible_state(clean_lake)
    work = d / "killed"
    work.mkdir()
    pipe = Pipeline(rel_dataset, work / "lake", work, procs)

    kills, survivors, orphans, visible_problems, late_gates = [], [], 0, [], 0
    late: list[str] = []  # kills that came after their stage had finished, with the run's last lines
    for k in kill_plan(clean_res.stage_seconds):
        res = pipe.run(kill=k)
        assert res.killed, f"the run ended (rc {res.rc}) before the kill in {k.stage}; log {pipe.log}:\n" \
                           f"{res.output[-4000:]}"
        if res.stage_done_before_kill:
            late.append(f"{k.stage} ({k.what}), killed {res.kill_after_stage_start_s}s after its start; "
                        f"last lines:\n{res.output[-3000:]}")
        survivors += [f"{k.stage}:{n}" for n in res.survivors]
        late_gates += res.output.count("was committed but never validated")
        kills.append(f"{k.stage}@{res.kill_after_stage_start_s}s ({k.what})")
        state = visible_state(Lake(pipe.lake))
        orphans += sum(v["orphan_files"] for v in state.values())
        visible_problems += [f"after kill in {k.stage}: {p}" for p in check_visible(Lake(pipe.lake), clean_state)]

    final = pipe.run()
    late_gates += final.output.count("was committed but never validated")
    assert final.rc == 0, f"the rerun after the last kill failed; log {pipe.log}:\n{final.output[-4000:]}"
    lake = Lake(pipe.lake)
    compared, diffs = compare_lakes(clean_lake, lake)
    clean_valid, valid = validated_tables(clean_lake), validated_tables(lake)
    unvalidated = sorted(t for t, ok in clean_valid.items() if ok and not valid.get(t))
    FIGURES.append(("kill and rerun", {
        "runs killed": len(kills), "kills inside their stage": len(kills) - len(late), "where": " ".join(kills),
        "tables compared": len(compared), "differences found": len(diffs),
        "half-written states visible": len(visible_problems), "tables read unvalidated": len(unvalidated),
        "commits validated late by a rerun": late_gates,
        "orphan files left (invisible)": orphans,
        "processes outliving the driver 5 s": f"{len(survivors)} {sorted(set(survivors))}",
    }))
    assert visible_problems == []
    assert diffs == [], diffs
    assert unvalidated == [], f"current versions never validated by the quality gate: {unvalidated}"
    assert late == [], "some kills came after their stage had finished:\n" + "\n".join(late)
    shutil.rmtree(work / "reports", ignore_errors=True)
