"""Stage embed on real Delta tables, local Ray and the real MiniLM: incremental by text and encoder."""

from __future__ import annotations

import hashlib
import logging
from datetime import date

import numpy as np
import pandas as pd
import pytest
from slimrec.config import PipelineConfig
from slimrec.embed.config import EmbedConfig
from slimrec.embed.encoder import load_encoder, resolve_encoder
from slimrec.schemas.tables import spec
from slimrec.stages import embed
from slimrec.stages.base import StageContext

ENCODER = "all-MiniLM-L6-v2:st:norm:256"
D1, D2 = date(2024, 1, 14), date(2024, 1, 15)
STUDENT_U1_NEW = (
    'Step 1: The user buys cordless phones from VTech.\nStep 2: Cordless Telephones; VTech.\n'
    'Step 3: "VTECH CS6114 DECT 6.0 Cordless Phone".'
)


def _frame(table: str, records: list[dict]) -> pd.DataFrame:
    """Rows of ``table`` with every column present; the ones a test does not care about are null."""
    cols = [c for c in spec(table).column_names if c != "input_versions"]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in records], columns=cols)


def _items(texts: dict[str, str]) -> pd.DataFrame:
    return _frame(
        "items",
        [{"item_id": i, "item_text": t, "text_hash": hashlib.sha1(t.encode()).hexdigest(), "run_date": D2}
         for i, t in texts.items()],
    )


def _rationale(user, status, text, **kw):
    steps = {}
    if text and "Step 3:" in text:  # the three bodies, as parse_rationale would give them
        b = text.split("Step 1:")[1]
        s1, b = b.split("Step 2:")
        s2, s3 = b.split("Step 3:")
        steps = {"step1": s1.strip(), "step2": s2.strip(), "step3": s3.strip()}
    return {"user_id": user, "status": status, "rationale": text, "prompt_hash": f"p-{user}", **steps, **kw}


ITEMS = {
    "1": "VTECH CS6114 DECT 6.0 Cordless Phone | Office Electronics > Telephones | VTech",
    "2": "Brother P-Touch PT-D210 Label Maker | Office Products > Labels | Brother",
    "3": "Swingline Stapler | Office Products > Staplers | Swingline",
    "4": "Swingline Stapler | Office Products > Staplers | Swingline",  # same text as item 3
}
STUDENT = [
    _rationale("u1", "ok", "Step 1: old.\nStep 2: old.\nStep 3: old.", run_date=D1, model_version="s1"),
    _rationale("u1", "ok", STUDENT_U1_NEW, run_date=D2, model_version="s1"),
    _rationale("u2", "failed", None, run_date=D2, model_version="s1"),
    _rationale("u3", "ok", "Step 1: Labels.\nStep 2: Brother.\nStep 3: \"Brother P-Touch\".", run_date=D2,
               model_version="s1"),
]
TEACHER = [
    _rationale("u1", "ok", "Step 1: Phones.\nStep 2: VTech.\nStep 3: \"VTECH CS6114\".", run_date=D2,
               teacher_model="offline-cooc-v1", prompt_version="v1", attempts=1),
]


def _ctx(lake, run_date, **embed_cfg) -> StageContext:
    return StageContext(cfg=PipelineConfig(embed=EmbedConfig(**embed_cfg)), lake=lake, run_date=run_date)


def _vectors(lake, table, key) -> dict:
    df = lake.read_pandas(table)
    return {tuple(r[k] for k in key): np.asarray(r["embedding"], np.float32) for _, r in df.iterrows()}


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(resolve_encoder(EmbedConfig()))


def test_embed_incremental(ray_local, tmp_lake, run_date, caplog, minilm):
    # The actor pool whatever the size, two actors and blocks of two texts: rows travel through several
    # blocks and both actors. Later runs encode in this process (few texts): the same encoder id, since
    # only speed knobs differ, and the same vectors.
    ctx = _ctx(tmp_lake, run_date, pool_min_texts=0, num_actors=2, block_rows=2, batch_size=2)
    one_actor = _ctx(tmp_lake, run_date, num_actors=1)
    tmp_lake.write_arrow("items", _items(ITEMS), "overwrite", ctx.commit_info("ingest", {}))
    tmp_lake.write_arrow("student_rationales", _frame("student_rationales", STUDENT), "overwrite",
                         ctx.commit_info("student_rationales", {}))

    # Dry run: counts only, no Ray, no table.
    dry = embed.run(StageContext(cfg=ctx.cfg, lake=tmp_lake, run_date=run_date, dry_run=True))
    assert dry.skipped and dry.extra["items_encoded"] == 4 and dry.extra["rationales_encoded"] == {"student": 2}
    assert not tmp_lake.exists("item_embeddings")

    # 1) first run: teacher table missing -> skipped with a log line, not an error.
    with caplog.at_level(logging.INFO, logger="slimrec.stages.embed"):
        r1 = embed.run(ctx)
    assert "teacher_rationales does not exist yet" in caplog.text
    assert r1.extra["items_encoded"] == 4 and r1.extra["rationales_encoded"] == {"student": 2}
    assert r1.rows_out == 6 and r1.tables == {"item_embeddings": 0, "rationale_embeddings": 0}
    assert r1.extra["engine"] == "pool"
    items = tmp_lake.read_pandas("item_embeddings")
    assert sorted(items["item_id"]) == ["1", "2", "3", "4"]
    assert set(items["encoder"]) == {ENCODER} and set(items["dim"]) == {384}
    iv = _vectors(tmp_lake, "item_embeddings", ["item_id"])
    np.testing.assert_allclose([np.linalg.norm(v) for v in iv.values()], 1.0, atol=1e-5)
    np.testing.assert_allclose(iv[("3",)], iv[("4",)], atol=1e-6)  # identical text -> identical vector
    rat = tmp_lake.read_pandas("rationale_embeddings")
    assert sorted(zip(rat["user_id"], rat["source"], rat["model_version"], strict=True)) == [
        ("u1", "student", "s1"), ("u3", "student", "s1")]
    rv = _vectors(tmp_lake, "rationale_embeddings", ["user_id", "source"])
    # Row order survives the length sort and the actor pool: u1 holds its newest rationale's vector.
    np.testing.assert_allclose(rv[("u1", "student")], minilm.encode([STUDENT_U1_NEW])[0], atol=1e-5)

    # 2) rerun with nothing changed: 0 rows encoded, no commit.
    r2 = embed.run(ctx)
    assert r2.rows_out == 0 and r2.tables == {"item_embeddings": None, "rationale_embeddings": None}
    assert tmp_lake.version("item_embeddings") == 0 and tmp_lake.version("rationale_embeddings") == 0

    # 3) item 2's text changes and teacher rationales appear: exactly those rows are encoded.
    changed = dict(ITEMS, **{"2": "Brother P-Touch PT-D210 Label Maker, White | Office Products > Labels | Brother"})
    tmp_lake.write_arrow("items", _items(changed), "overwrite", ctx.commit_info("ingest", {}))
    tmp_lake.write_arrow("teacher_rationales", _frame("teacher_rationales", TEACHER), "overwrite",
                         ctx.commit_info("teacher_rationales", {}))
    r3 = embed.run(one_actor)
    assert r3.extra["engine"] == "local"
    assert r3.extra["items_encoded"] == 1
    assert r3.extra["rationales_encoded"] == {"student": 0, "teacher": 1}
    iv3 = _vectors(tmp_lake, "item_embeddings", ["item_id"])
    assert float(iv3[("2",)] @ iv[("2",)]) < 0.999
    for k in [("1",), ("3",), ("4",)]:
        np.testing.assert_array_equal(iv3[k], iv[k])  # untouched rows keep their stored vector
    assert tmp_lake.count("item_embeddings") == 4 and tmp_lake.count("rationale_embeddings") == 3

    # 4) steps mode: every rationale re-encoded (its text_hash includes the mode), items untouched.
    r4 = embed.run(_ctx(tmp_lake, run_date, rationale_text="steps", num_actors=1))
    assert r4.extra["items_encoded"] == 0
    assert r4.extra["rationales_encoded"] == {"student": 2, "teacher": 1}
    steps = minilm.encode(["The user buys cordless phones from VTech.", "Cordless Telephones; VTech.",
                           '"VTECH CS6114 DECT 6.0 Cordless Phone".'])
    mean = steps.mean(0) / np.linalg.norm(steps.mean(0))
    rv4 = _vectors(tmp_lake, "rationale_embeddings", ["user_id", "source"])
    np.testing.assert_allclose(rv4[("u1", "student")], mean, atol=1e-5)
    assert tmp_lake.count("rationale_embeddings") == 3

    # 5) a re-ingest drops item 4: its vector goes, nothing is encoded, the other vectors stay
    fewer = {k: v for k, v in changed.items() if k != "4"}
    tmp_lake.write_arrow("items", _items(fewer), "overwrite", ctx.commit_info("ingest", {}))
    r5 = embed.run(_ctx(tmp_lake, run_date, rationale_text="steps", num_actors=1))
    assert r5.extra["items_deleted"] == 1 and r5.extra["items_encoded"] == 0 and r5.rows_out == 0
    assert r5.tables["item_embeddings"] == tmp_lake.version("item_embeddings")
    assert sorted(tmp_lake.read_pandas("item_embeddings")["item_id"]) == ["1", "2", "3"]
