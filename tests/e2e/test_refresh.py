"""End to end: replay cuts the data into a base and a later day; ``slim run`` on the base, then
``slim refresh`` for the day (rescoring with the current recommender), then the same day again.

Everything goes through the CLI in this process (session Spark and Ray) on the tiny profile.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from e2ekit import BASE_DATE, DAY, FIGURES
from slimrec.lake import Lake

pytestmark = pytest.mark.slow


def test_refresh_merges_the_days_events_and_rebuilds_only_their_users(refreshed):
    lake, ev = refreshed["lake"], refreshed["events"]
    assert len(ev) > 0
    assert lake.count("interactions") == refreshed["inter0"] + len(ev)
    seqs1 = lake.read_pandas("user_sequences")
    old = refreshed["seqs0"].set_index("user_id")["seq_hash"]
    new = seqs1.set_index("user_id")["seq_hash"]
    changed = set(new.index[new.reindex(new.index) != old.reindex(new.index)])
    event_users = set(ev["user_id"].astype(str))
    assert changed == event_users
    # each changed sequence ends with that user's new events, in order
    last = ev.groupby("user_id")["item_id"].apply(list)
    for u in event_users:
        items = list(seqs1.set_index("user_id").loc[u, "item_ids"])
        assert items[-len(last[u]):] == [str(i) for i in last[u]]
    FIGURES["users with new events"] = len(event_users)
    FIGURES["users in the lake"] = len(seqs1)


def test_refresh_rescores_exactly_the_changed_users_with_the_current_model(refreshed):
    lake, ev = refreshed["lake"], refreshed["events"]
    recs = lake.read_pandas("recommendations")
    recs["run_date"] = recs["run_date"].astype(str)
    day = recs[recs["run_date"] == DAY]
    assert set(day["user_id"]) == set(ev["user_id"].astype(str))
    base = recs[recs["run_date"] == BASE_DATE].sort_values("user_id").reset_index(drop=True)
    before = refreshed["recs0"].sort_values("user_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(base[["user_id", "item_ids"]].map(str), before[["user_id", "item_ids"]].map(str))
    assert set(day["run_id"]) == set(before["run_id"])  # the same model, not a retrain
    seqs = lake.read_pandas("user_sequences").set_index("user_id")
    for _, r in day.iterrows():
        assert not set(r["item_ids"]) & set(seqs.loc[r["user_id"], "item_ids"])  # nothing the user already has
        assert list(r["scores"]) == sorted(r["scores"], reverse=True)
    assert "rescore_recommendations" in refreshed["log1"]


def test_rescoring_unchanged_inputs_reproduces_the_trained_recommendations(refreshed, tmp_path):
    """The serving path (saved model, item index, prior weights) gives what train_recommender gave."""
    from deltalake import DeltaTable
    from slimrec.config import load_config
    from slimrec.recommender.serving import rescore
    from slimrec.stages.base import StageContext

    lake = refreshed["lake"]
    base_lake = Lake(tmp_path / "lake")
    # a copy of the lake at the base run's versions is what the model was trained on
    shutil.copytree(lake.root, base_lake.root)
    v0 = refreshed["v0"]
    for t in ("user_sequences", "item_embeddings", "rationale_embeddings", "teacher_rationales",
              "student_rationales", "items"):
        if t in v0 and base_lake.version(t) != v0[t]:
            DeltaTable(base_lake.path(t)).restore(v0[t])
    ctx = StageContext(lake=base_lake, cfg=load_config("tiny"), run_date=pd.Timestamp(BASE_DATE).date())
    users = set(refreshed["recs0"]["user_id"])
    facts = rescore(ctx, Path(base_lake.root) / "_artifacts" / "recommender", users=users, write=False)
    got = facts["recommendations"].sort_values("user_id").reset_index(drop=True)
    want = refreshed["recs0"].sort_values("user_id").reset_index(drop=True)
    assert facts["users_rescored"] == len(want)
    assert got["item_ids"].map(list).tolist() == want["item_ids"].map(list).tolist()


def test_second_refresh_of_the_same_day_changes_nothing(refreshed):
    assert refreshed["v2"] == refreshed["v1"]
    changed = {t for t, v in refreshed["v1"].items() if refreshed["v0"].get(t) != v}
    assert {"interactions", "user_sequences", "prompts", "recommendations"} <= changed
    assert "student_models" not in changed  # the daily refresh keeps the student unless --retrain
    FIGURES["tables written by the refresh"] = sorted(changed)
    print("\nrefresh figures:", FIGURES)
    for name in ("log0", "log1", "log2"):  # the stage tables: the full run, the refresh, the rerun
        lines = refreshed[name].splitlines()
        start = next(i for i, x in enumerate(lines) if x.startswith("stage "))
        print(f"\n{name}:\n" + "\n".join(lines[start:start + 11]))
