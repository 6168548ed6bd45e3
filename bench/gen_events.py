"""python -m bench.gen_events [--events 5000000] [--users 200000] [--items 50000] [--seed 0] [--out DIR]

A generated events table for the foundation benchmark, written as an ingest
``events`` folder: ``events.parquet`` (user_id, item_id, timestamp in unix
seconds) and ``items.parquet`` (item_id, title, brand, category).

* item popularity is Zipf-like (weight of the item at rank r is 1 / r^1.07);
* user activity is skewed too (log-normal weights), every user at least 3 events;
* timestamps are whole days inside half a year and the file is not sorted, so
  a user has many tied timestamps and the source row decides their order;
* popular items come back for the same user: repeats, and some exact
  duplicates (same user, item and day), as real logs have.

Seeded: the same arguments write the same files. Files go to
``bench/results/data/events_<N>`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("bench.gen_events")

RESULTS = Path(__file__).resolve().parent / "results"
DAY_S = 86_400
START_S = 1_388_534_400  # 2014-01-01T00:00:00Z

_NOUNS = ["Pen", "Stapler", "Notebook", "Binder", "Marker", "Folder", "Tape", "Desk Lamp", "Label Maker",
          "Paper", "Envelope", "Calculator", "Scissors", "Highlighter", "Sticky Notes", "Toner"]
_ADJS = ["Blue", "Heavy-Duty", "Compact", "Recycled", "Premium", "Ergonomic", "Wireless", "Classic"]
_BRANDS = ["Bic", "Swingline", "Moleskine", "Avery", "Sharpie", "Scotch", "Brother", "HP", "Post-it", "Pilot"]
_CATS = ["Office Products > Writing", "Office Products > Paper", "Office Products > Filing",
         "Office Electronics > Printers", "Office Products > Desk Accessories"]


def default_dir(events: int) -> Path:
    return RESULTS / "data" / f"events_{events}"


def generate(events: int = 5_000_000, users: int = 200_000, items: int = 50_000, seed: int = 0,
             days: int = 182) -> tuple[pa.Table, pa.Table]:
    """(events, items) Arrow tables; ``events`` rows in random (unsorted) order."""
    if events < 3 * users:
        raise ValueError(f"{events} events cannot give {users} users 3 events each")
    rng = np.random.default_rng(seed)
    # events per user: 3 each, the rest spread by log-normal activity weights
    w = rng.lognormal(0.0, 1.0, users)
    extra = rng.multinomial(events - 3 * users, w / w.sum())
    per_user = extra + 3
    user_idx = np.repeat(np.arange(users, dtype=np.int64), per_user)
    # Zipf-like item popularity over a random permutation of ids (popular ids are not the small ones)
    p = 1.0 / np.arange(1, items + 1) ** 1.07
    item_of_rank = rng.permutation(items)
    item_idx = item_of_rank[rng.choice(items, size=events, p=p / p.sum())]
    ts = START_S + rng.integers(0, days, size=events) * DAY_S  # whole days: many ties per user
    order = rng.permutation(events)  # the file is not sorted by user or time
    ev = pa.table({
        "user_id": pa.array(np.char.add("U", user_idx[order].astype(str))),
        "item_id": pa.array(np.char.add("I", item_idx[order].astype(str))),
        "timestamp": pa.array(ts[order], pa.int64()),
    })
    ids = np.arange(items)
    it = pa.table({
        "item_id": pa.array(np.char.add("I", ids.astype(str))),
        "title": [f"{_ADJS[i % len(_ADJS)]} {_NOUNS[(i // 7) % len(_NOUNS)]} No. {i}" for i in ids],
        "brand": [_BRANDS[(i // 3) % len(_BRANDS)] for i in ids],
        "category": [_CATS[(i // 11) % len(_CATS)] for i in ids],
    })
    return ev, it


def write(out: Path, events: int, users: int, items: int, seed: int) -> Path:
    t0 = time.perf_counter()
    ev, it = generate(events, users, items, seed)
    out.mkdir(parents=True, exist_ok=True)
    # row groups of 1M rows: Spark reads the file as several splits, in order
    pq.write_table(ev, out / "events.parquet", row_group_size=1_000_000)
    pq.write_table(it, out / "items.parquet")
    (out / "_params").write_text(f"events={events} users={users} items={items} seed={seed}\n")
    log.info("wrote %d events, %d items to %s in %.1fs", len(ev), len(it), out, time.perf_counter() - t0)
    return out


def ensure(events: int, users: int, items: int, seed: int, out: Path | None = None) -> Path:
    """The folder for these parameters, generated unless it already holds exactly them."""
    out = out or default_dir(events)
    params = out / "_params"
    want = f"events={events} users={users} items={items} seed={seed}\n"
    if params.exists() and params.read_text() == want and (out / "events.parquet").exists():
        return out
    return write(out, events, users, items, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(ensure(args.events, args.users, args.items, args.seed, args.out))


if __name__ == "__main__":
    main()
