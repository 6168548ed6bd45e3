"""A tiny-profile lake built once for the end-to-end tests: ``slim run`` on a replay base, then
``slim refresh`` for the later day, twice."""

from __future__ import annotations

import pandas as pd
import pytest
from e2ekit import BASE_DATE, DAY, slim, versions
from slimrec.lake import Lake


@pytest.fixture(scope="session")
def refreshed(tiny_dataset, tmp_path_factory, spark, ray_local):
    root = tmp_path_factory.mktemp("refresh")
    src, lake_dir, replay = root / "src", root / "lake", root / "replay"
    slim("ingest", "--dataset", tiny_dataset, "--lake", src)
    slim("replay", "--lake", src, "--out", replay, "--days", 1, "--share", 0.3, "--start-date", DAY)
    run_log = slim("run", "--dataset", replay / "base", "--lake", lake_dir, "--profile", "tiny", "--run-date", BASE_DATE,
          "--report-dir", root / "r0")
    lake = Lake(lake_dir)
    out = {"lake": lake, "root": root, "events": pd.read_csv(replay / f"events-{DAY}.csv", dtype=str),
           "v0": versions(lake), "seqs0": lake.read_pandas("user_sequences"),
           "recs0": lake.read_pandas("recommendations"), "inter0": lake.count("interactions"), "log0": run_log}
    out["log1"] = slim("refresh", "--events", replay / f"events-{DAY}.csv", "--lake", lake_dir, "--profile", "tiny",
                        "--run-date", DAY, "--report-dir", root / "r1")
    out["v1"] = versions(lake)
    out["log2"] = slim("refresh", "--events", replay / f"events-{DAY}.csv", "--lake", lake_dir, "--profile", "tiny",
                        "--run-date", DAY, "--report-dir", root / "r2")
    out["v2"] = versions(lake)
    return out


