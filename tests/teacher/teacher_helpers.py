"""Tiny hand-made catalogue and lake for the teacher tests."""

from __future__ import annotations

import pandas as pd
from slimrec.config import load_config
from slimrec.lake import CommitInfo
from slimrec.stages.base import StageContext
from slimrec.teacher.fixtures import prompt_rows

# item_id -> (title, categories, brand)
CATALOGUE = {
    "A": ("Acme Cordless Phone 100", ["Office Electronics", "Telephones", "Cordless Telephones"], "Acme"),
    "B": ("Acme Phone Battery Pack 2", ["Office Electronics", "Telephones", "Phone Batteries"], "Acme"),
    "C": ("Zeta Label Maker Pro", ["Office Supplies", "Labels", "Label Makers"], "Zeta"),
    "D": ("Zeta Label Tape Refill White", ["Office Supplies", "Labels", "Label Tapes"], "Zeta"),
    "E": ("Blue Ballpoint Pens 12 Pack", ["Office Supplies", "Writing", "Ballpoint Pens"], "Inkwell"),
    "F": ("Red Gel Pens 8 Pack", ["Office Supplies", "Writing", "Gel Pens"], "Inkwell"),
    "G": ("Heavy Duty Stapler Black", ["Office Supplies", "Staplers", "Desk Staplers"], None),
    "Z": ("Target Only Shredder 3000", ["Office Electronics", "Shredders", "Shredders"], "Shredco"),
}


def items_frame() -> pd.DataFrame:
    return pd.DataFrame(
        [{"item_id": k, "title": t, "categories": c, "brand": b, "description": None,
          "item_text": f"{t} | {' > '.join(c)} | {b or ''}", "text_hash": "0" * 40}
         for k, (t, c, b) in CATALOGUE.items()]
    )


def sequences_frame(histories: dict[str, list[str]], valid: str | None = "Z", test: str | None = "Z") -> pd.DataFrame:
    rows = []
    for u, h in histories.items():
        ids = list(h) + [x for x in (valid, test) if x is not None]
        rows.append({"user_id": u, "item_ids": ids, "history": list(h), "valid_target": valid, "test_target": test,
                     "seq_len": len(ids), "last_event_ts": None, "seq_hash": "h" + "-".join(ids)})
    return pd.DataFrame(rows)


def write_inputs(lake, run_date, histories: dict[str, list[str]], items: pd.DataFrame | None = None,
                 write_sequences: bool = True) -> pd.DataFrame:
    """items, user_sequences and prompts tables for ``histories``; returns the prompts rows."""
    items = items_frame() if items is None else items
    seqs = sequences_frame(histories)
    prompts = prompt_rows(seqs, items)
    info = CommitInfo("fixture", run_date)
    lake.write_arrow("items", items, "overwrite", info)
    if write_sequences:
        lake.write_arrow("user_sequences", seqs, "overwrite", info)
    lake.write_arrow("prompts", prompts, "replace_date", info)
    return prompts


def make_ctx(lake, run_date, overrides=(), dry_run=False) -> StageContext:
    cfg = load_config("tiny", overrides=list(overrides))
    return StageContext(cfg=cfg, lake=lake, run_date=run_date, dry_run=dry_run)
