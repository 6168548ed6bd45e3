"""A small synthetic catalogue, users and templated teacher answers for the student tests.

The teacher answer imitates the offline teacher's three steps (counts of the
user's categories and brands, the most recent item, then titles in double
quotes) so that a tiny model can learn it from a few dozen pairs.
"""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime

import pandas as pd
from slimrec.config import PipelineConfig
from slimrec.student.config import StudentConfig, TinyModelConfig
from slimrec.teacher.fixtures import prompt_rows

BRANDS = ["Pilot", "Mead", "Avery", "Epson", "Bic"]
CATEGORIES = ["Gel Pens", "Notebooks", "Labels", "Ink Cartridges", "Binders"]
NOUNS = {"Gel Pens": "Gel Pen Set", "Notebooks": "Spiral Notebook", "Labels": "Address Labels",
         "Ink Cartridges": "Ink Cartridge", "Binders": "Ring Binder"}
COLOURS = ["Black", "Blue", "Red", "Green"]


def items_frame() -> pd.DataFrame:
    """20 items: item k has category k % 5, brand (k // 5) % 5 (ids i00..i19)."""
    rows = []
    for k in range(20):
        cat, brand = CATEGORIES[k % 5], BRANDS[(k // 5) % 5]
        title = f"{brand} {NOUNS[cat]} {COLOURS[k % 4]} {k + 100}"
        cats = ["Office Products", cat]
        rows.append({"item_id": f"i{k:02d}", "title": title, "brand": brand, "categories": cats,
                     "description": None, "item_text": f"{title} | {' > '.join(cats)} | {brand}",
                     "text_hash": f"{k:040d}"})
    return pd.DataFrame(rows)


def histories(n_users: int, seed: int = 0) -> dict[str, list[str]]:
    """Users whose items stay mostly in one category (what a teacher can summarise)."""
    rng = random.Random(seed)
    out = {}
    for u in range(n_users):
        cat = rng.randrange(5)
        n = rng.randint(2, 5)
        hist = []
        for _ in range(n):
            c = cat if rng.random() < 0.7 else rng.randrange(5)
            k = c + 5 * rng.randrange(4)
            if f"i{k:02d}" not in hist:
                hist.append(f"i{k:02d}")
        out[f"u{u:03d}"] = hist
    return out


def teacher_answer(history: list[str], items: pd.DataFrame) -> str:
    meta = items.set_index("item_id")
    cats = Counter(meta.loc[i, "categories"][-1] for i in history)
    brands = Counter(meta.loc[i, "brand"] for i in history)
    top_cat, top_brand = cats.most_common(1)[0][0], brands.most_common(1)[0][0]
    last = history[-1]
    k = int(last[1:])
    nxt = [f"i{(k + 5 * j) % 20:02d}" for j in (1, 2)]  # the same category, next brands
    titles = [meta.loc[i, "title"] for i in nxt]
    return (
        f"Step 1: The customer has bought {len(history)} items, mostly {top_cat}, and favours the brand {top_brand}. "
        f"The most recent purchase is '{meta.loc[last, 'title']}'.\n"
        f"Step 2: Customers who bought these items next tend to buy {top_cat}; brands to suggest: {top_brand}.\n"
        "Step 3: Recommended items: " + "; ".join(f'"{t}"' for t in titles) + "."
    )


def sequences_frame(hists: dict[str, list[str]]) -> pd.DataFrame:
    return pd.DataFrame([{"user_id": u, "history": h, "seq_hash": "s" + "-".join(h)} for u, h in hists.items()])


def prompts_frame(hists: dict[str, list[str]], items: pd.DataFrame) -> pd.DataFrame:
    return prompt_rows(sequences_frame(hists), items)


def teacher_frame(prompts: pd.DataFrame, hists: dict[str, list[str]], items: pd.DataFrame,
                  teacher_model: str = "synthetic-teacher") -> pd.DataFrame:
    rows = []
    for r in prompts.itertuples(index=False):
        rows.append({
            "prompt_hash": r.prompt_hash, "teacher_model": teacher_model, "user_id": r.user_id,
            "prompt_version": r.prompt_version, "rationale": teacher_answer(hists[r.user_id], items),
            "step1": None, "step2": None, "step3": None, "grounded_item_ids": [], "status": "ok", "error": None,
            "attempts": 1, "input_tokens": None, "output_tokens": None, "cost_usd": 0.0, "latency_ms": 0.0,
            "finish_reason": "stop", "answered_ts": datetime(2024, 1, 1, tzinfo=UTC),
        })
    return pd.DataFrame(rows)


def small_tiny_config(**kw) -> TinyModelConfig:
    """A base model that builds in a few seconds."""
    base = dict(vocab_size=600, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                max_position_embeddings=512, warmup_steps=100, warmup_seq_len=64, warmup_batch_size=8,
                warmup_lr=3e-3)
    base.update(kw)
    return TinyModelConfig(**base)


def small_student_config(models_dir: str | None = None, **kw) -> StudentConfig:
    base = dict(
        models_dir=models_dir,
        tiny=small_tiny_config(),
        heldout_fraction=0.2,
        max_prompt_tokens=160,
        max_target_items=None,
        max_target_tokens=160,
        lora={"r": 16, "alpha": 32, "dropout": 0.0},
        train={"epochs": 16, "min_steps": 0, "batch_size": 4, "learning_rate": 1e-2, "torch_threads": 1,
               "cpus_per_worker": 0.5},
        eval_max_users=8,
        eval_batch_size=8,
        min_rouge_gain=0.05,
        infer={"max_new_tokens": 120, "batch_size": 8, "num_actors": 1, "cpus_per_actor": 0.5, "torch_threads": 1,
               "write_batch_rows": 16},
    )
    base.update(kw)
    return StudentConfig.model_validate(base)


def make_ctx(lake, run_date, student: StudentConfig, dry_run: bool = False, force: bool = False):
    # Imported here, not at the top: the GPU tests use these helpers where deltalake is not installed.
    from slimrec.stages.base import StageContext

    cfg = PipelineConfig(profile="tiny", student=student)
    return StageContext(cfg=cfg, lake=lake, run_date=run_date, dry_run=dry_run, force=force)


def write_lake(lake, run_date, hists, items=None, teacher_users: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """items, prompts (dated run_date) and teacher_rationales for the first ``teacher_users`` users."""
    from slimrec.lake import CommitInfo

    items = items_frame() if items is None else items
    prompts = prompts_frame(hists, items)
    info = CommitInfo("fixture", run_date)
    lake.write_arrow("items", items, "overwrite", info)
    lake.write_arrow("prompts", prompts, "replace_date", info)
    teach = teacher_frame(prompts.head(teacher_users) if teacher_users else prompts, hists, items)
    lake.write_arrow("teacher_rationales", teach, "merge", info)
    return prompts, teach
