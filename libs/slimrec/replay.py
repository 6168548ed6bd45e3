"""Replay: cut an ingested data set into a base data set plus daily event files.

For a seeded share of users (those with enough events to keep a full
leave-one-out sequence), their last events arrive on later days: the base
data set holds everything else, and ``events-YYYY-MM-DD.csv`` files hold each
day's new events. Any source format works, since the cut is made from the
``interactions`` and ``items`` tables of a lake the data set was ingested into.

    slim replay --lake lake --out replay --days 3 --share 0.2 --start-date 2024-02-01
    slim run --dataset replay/base --lake lake2 --run-date 2024-01-31
    slim refresh --run-date 2024-02-01 --events replay/events-2024-02-01.csv --lake lake2
"""

from __future__ import annotations

import logging
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def cut(interactions: pd.DataFrame, days: int, share: float, seed: int, min_keep: int = 3,
        max_new_per_user: int = 2) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """Split interactions into a base frame and ``days`` frames of later events.

    Input columns: user_id, item_id, event_ts, event_seq. A chosen user keeps
    at least ``min_keep`` events in the base; their next 1..``max_new_per_user``
    most recent events go to one day, chosen at random (seeded).

    Example: user u with events e1..e6, chosen, 2 new events, day 1 ->
    base holds e1..e4, day 1 holds e5, e6.
    """
    rng = np.random.default_rng(seed)
    df = interactions.sort_values(["user_id", "event_ts", "event_seq", "item_id"]).reset_index(drop=True)
    df["_rank_from_end"] = df.groupby("user_id").cumcount(ascending=False)  # 0 = most recent
    sizes = df.groupby("user_id").size()
    eligible = sizes[sizes >= min_keep + 1].index.to_numpy()
    chosen = rng.choice(eligible, size=int(round(share * len(eligible))), replace=False) if len(eligible) else []
    n_new = pd.Series(rng.integers(1, max_new_per_user + 1, size=len(chosen)), index=chosen)
    n_new = np.minimum(n_new, sizes.loc[chosen] - min_keep)
    day_of = pd.Series(rng.integers(0, days, size=len(chosen)), index=chosen)
    df["_n_new"] = df["user_id"].map(n_new).fillna(0).astype(int)
    moved = df["_rank_from_end"] < df["_n_new"]
    base = df[~moved].drop(columns=["_rank_from_end", "_n_new"])
    later = df[moved].copy()
    later["_day"] = later["user_id"].map(day_of)
    out = [later[later["_day"] == d].drop(columns=["_rank_from_end", "_n_new", "_day"]) for d in range(days)]
    return base, out


def write_replay(lake, out_dir: str | Path, days: int, share: float, seed: int, start_date: date) -> dict:
    """Write ``base/events.csv`` + ``base/items.parquet`` and one events CSV per day; return counts."""
    out = Path(out_dir)
    (out / "base").mkdir(parents=True, exist_ok=True)
    inter = lake.read_pandas("interactions", columns=["user_id", "item_id", "event_ts", "event_seq"])
    items = lake.read_pandas("items", columns=["item_id", "title", "brand", "categories", "description"])
    base, later = cut(inter, days, share, seed)

    def events_csv(df: pd.DataFrame, path: Path) -> None:
        e = df[["user_id", "item_id", "event_ts"]].rename(columns={"event_ts": "timestamp"})
        e["timestamp"] = pd.to_datetime(e["timestamp"], utc=True).dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        e.to_csv(path, index=False)

    events_csv(base, out / "base" / "events.csv")
    items.to_parquet(out / "base" / "items.parquet", index=False)
    counts = {"base_events": len(base), "users": int(base["user_id"].nunique()), "days": {}}
    for d, df in enumerate(later):
        day = start_date + timedelta(days=d)
        events_csv(df, out / f"events-{day.isoformat()}.csv")
        counts["days"][day.isoformat()] = {"events": len(df), "users": int(df["user_id"].nunique())}
    log.info("replay: %s", counts)
    return counts
