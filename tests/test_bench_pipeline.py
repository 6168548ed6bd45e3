"""bench.pipeline reads a run's stage log lines and samples its process tree."""

from __future__ import annotations

import sys

from bench.pipeline import run_pipeline


def test_run_pipeline_reads_stages_and_memory(tmp_path):
    script = (
        "import time, logging, sys\n"
        "logging.basicConfig(stream=sys.stderr, level=logging.INFO, format='%(asctime)s INFO slimrec.pipeline: %(message)s')\n"
        "log = logging.getLogger()\n"
        "log.info('stage ingest: start (run_date=2024-01-15, run_id=x)')\n"
        "block = bytearray(300 * 2**20)  # 300 MiB held while ingest runs\n"
        "time.sleep(1.5)\n"
        "log.info('stage ingest: done in 1.5s, rows in 3, rows out 2, tables {}')\n"
        "del block\n"
        "log.info('stage embed: skipped (nothing changed)')\n"
    )
    res = run_pipeline([sys.executable, "-c", script], tmp_path / "run.log")
    assert res["returncode"] == 0
    assert set(res["stages"]) == {"ingest", "embed"}
    assert res["stages"]["ingest"]["seconds"] == 1.5 and res["stages"]["embed"]["seconds"] == 0.0
    assert res["stages"]["ingest"]["peak_gib"] > 0.29  # the 300 MiB block was seen while ingest ran
    assert res["peak_gib"] >= res["stages"]["ingest"]["peak_gib"]
    assert res["stages"]["embed"]["peak_gib"] > 0  # a stage shorter than the sampling interval is sampled too
    assert 0 < res["peak_pss_gib"] <= res["peak_gib"] + 0.01  # PSS splits shared pages: never above RSS
    assert "stage ingest: done" in (tmp_path / "run.log").read_text()
    kinds = res["stages"]["ingest"]["rss_gib_at_peak_by_process"]  # the child python held the block
    assert max(kinds, key=kinds.get).startswith("python") and max(kinds.values()) > 0.29
