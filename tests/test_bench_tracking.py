"""bench.tracking's reading of a lake's run records (the step itself is timed against a real lake by the bench)."""

from __future__ import annotations

import json
import os

import pytest

from bench.tracking import latest_run_record, run_wall_seconds


def _write(lake, run_id: str, rec: dict, mtime: float) -> None:
    p = lake / "_runs" / f"{run_id}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(rec))
    os.utime(p, (mtime, mtime))


def test_the_latest_run_with_stage_costs_and_its_stages_wall(tmp_path):
    costs = [{"stage": "ingest", "wall_s": 60.5}, {"stage": "embed", "wall_s": 39.5}, {"stage": "x", "wall_s": None}]
    _write(tmp_path, "old", {"profile": "dev", "stage_costs": [{"stage": "ingest", "wall_s": 1.0}]}, 1_000)
    _write(tmp_path, "mine", {"profile": "dev", "stage_costs": costs}, 2_000)
    _write(tmp_path, "refused", {"profile": "dev"}, 3_000)  # a run the lock refused: no stages, not a candidate
    run_id, rec = latest_run_record(str(tmp_path))
    assert run_id == "mine" and run_wall_seconds(rec) == 100.0


def test_a_lake_without_a_finished_run_is_a_clear_stop(tmp_path):
    with pytest.raises(SystemExit, match="no run record with stage costs"):
        latest_run_record(str(tmp_path))
