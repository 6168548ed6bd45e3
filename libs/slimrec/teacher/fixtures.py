"""Small tables for tests and benchmarks of the teacher, without Spark.

``prompt_rows`` renders prompts exactly as ``build_prompts`` does (same
template, sanitising, truncation and hash) from pandas frames;
``lcrec_tables`` reads an LC-Rec style data set (``*.inter.json``,
``*.item.json``) into ``items`` and ``user_sequences`` frames. The pipeline's
real tables come from the ingest/build stages; these exist so that the teacher
can be tested and benchmarked on its own.
"""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path

import pandas as pd

from slimrec import prompts as P
from slimrec.config import PromptsConfig


def prompt_rows(sequences: pd.DataFrame, items: pd.DataFrame, cfg: PromptsConfig | None = None) -> pd.DataFrame:
    """``user_sequences``-like rows (user_id, history) + items -> ``prompts`` rows (without run_date)."""
    cfg = cfg or PromptsConfig()
    meta = items.set_index("item_id")
    out = []
    for r in sequences.itertuples(index=False):
        hist = [str(x) for x in r.history][-cfg.max_items :]
        lines, short = [], []
        for i in hist:
            m = meta.loc[i] if i in meta.index else None
            title = None if m is None else m["title"]
            cats = None if m is None else m["categories"]
            brand = None if m is None else m["brand"]
            lines.append(P.item_line(title, cats, brand, cfg.max_item_title_chars))
            short.append(P.short_item_line(title, cats, brand, cfg.student_title_chars))
        teacher, student, shown = P.render(cfg.version, lines, cfg.max_items, cfg.max_chars, short, cfg.student_max_items)
        seq_hash = getattr(r, "seq_hash", None) or hashlib.sha1(json.dumps(list(map(str, r.history))).encode()).hexdigest()
        out.append(
            {
                "user_id": str(r.user_id),
                "teacher_prompt": teacher,
                "student_prompt": student,
                "prompt_version": cfg.version,
                "prompt_hash": P.prompt_hash(cfg.version, teacher),
                "history_len": len(r.history),
                "n_prompt_items": shown,
                "prompt_item_ids": hist[-shown:],
                "seq_hash": seq_hash,
            }
        )
    return pd.DataFrame(out)


def lcrec_tables(dataset_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, user_sequences) frames from ``<name>.item.json`` and ``<name>.inter.json`` (leave-one-out split)."""
    d = Path(dataset_dir)
    inter = json.loads(next(d.glob("*.inter.json")).read_text())
    raw_items = json.loads(next(d.glob("*.item.json")).read_text())
    rows = []
    for k, v in raw_items.items():
        title = html.unescape(v.get("title") or "") or None
        cats = [c.strip() for c in html.unescape(v.get("categories") or "").split(",") if c.strip()]
        brand = html.unescape(v.get("brand") or "") or None
        text = " | ".join([title or "", " > ".join(cats), brand or ""])
        rows.append({"item_id": str(k), "title": title, "brand": brand, "categories": cats,
                     "description": v.get("description") or None, "item_text": text,
                     "text_hash": hashlib.sha1(text.encode()).hexdigest()})
    items = pd.DataFrame(rows)
    seqs = []
    for u, s in inter.items():
        s = [str(x) for x in s]
        if len(s) < 3:
            continue
        seqs.append({"user_id": str(u), "item_ids": s, "history": s[:-2], "valid_target": s[-2], "test_target": s[-1],
                     "seq_len": len(s), "last_event_ts": None,
                     "seq_hash": hashlib.sha1(json.dumps(s).encode()).hexdigest()})
    return items, pd.DataFrame(seqs)
