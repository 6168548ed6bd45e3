"""The stage on a real Delta lake: reads what exists, reports what is missing, writes its three tables."""

import json
from datetime import UTC, datetime

import pandas as pd
import pytest
from rec_helpers import synthetic_frames
from slimrec.config import load_config
from slimrec.lake import CommitInfo
from slimrec.schemas.tables import spec
from slimrec.stages import train_recommender
from slimrec.stages.base import StageContext

_FILL = {"string": "x", "int32": 0, "int64": 0, "float64": 0.0, "bool": False}


def _put(lake, table, df, run_date):
    df = df.copy()
    for c in spec(table).columns:
        if c.name in df.columns or c.name in ("run_date", "input_versions"):
            continue
        if c.type == "timestamp":
            df[c.name] = datetime(2024, 1, 1, tzinfo=UTC)
        elif c.type.startswith("list<"):
            df[c.name] = [[] for _ in range(len(df))]
        else:
            df[c.name] = None if c.nullable else _FILL[c.type]
    if table == "item_embeddings" or table == "rationale_embeddings":
        df["dim"] = df["embedding"].map(len).astype("int32")
    lake.write_arrow(table, df, "overwrite", CommitInfo("test", run_date))


def _ctx(lake, run_date, tmp_path, **over):
    sets = [
        "recommender.max_len=8", "recommender.hidden_dim=16", "recommender.num_blocks=1", "recommender.epochs=2",
        "recommender.finetune_epochs=1", "recommender.text_matching_epochs=1", "recommender.batch_size=16",
        "recommender.num_sampled_negatives=10", "recommender.prior_weight_grid=[0.0,1.0]",
        "recommender.use_ray=false", f"recommender.artifacts_dir={tmp_path / 'artifacts'}",
        "recommender.seeds=[0,1]", "recommender.num_threads=1", "recommender.top_k=5",
    ] + [f"recommender.{k}={v}" for k, v in over.items()]
    return StageContext(cfg=load_config("tiny", overrides=sets), lake=lake, run_date=run_date)


def test_stage_with_only_sequences_reports_missing_variants(tmp_lake, run_date, tmp_path):
    seqs, items, *_ = synthetic_frames()
    _put(tmp_lake, "user_sequences", seqs, run_date)
    _put(tmp_lake, "items", items, run_date)
    r = train_recommender.run(_ctx(tmp_lake, run_date, tmp_path))
    assert set(r.extra["missing_variants"]) == {"text", "cooc_prior", "teacher", "slim", "teacher_cooc",
                                                "slim_cooc", "text_matching"}
    m = tmp_lake.read_pandas("metrics")
    assert set(m.variant) == {"base", "random", "popular", "cooc"}
    runs = tmp_lake.read_pandas("recommender_runs")
    notes = json.loads(runs.notes[0])
    assert "teacher" in notes["missing_variants"] and runs.best_variant[0] == "base"
    # beyond accuracy without item vectors: every figure but diversity, which is absent (null), with its reason
    on = (m.split == "test") & (m.protocol == "full")
    assert m.loc[on, ["coverage_10", "coverage_20", "gini_10", "popularity_pct_10", "novelty_10"]].notna().all().all()
    assert m["ild_10"].isna().all() and m.loc[~on, "coverage_10"].isna().all()
    assert notes["beyond_not_measured"]["all/ild_10"] == ["no item text vectors in this run"]


def test_stage_all_variants_and_rerun(tmp_lake, run_date, tmp_path):
    seqs, items, item_emb, rat_emb, rats = synthetic_frames()
    for t, df in [("user_sequences", seqs), ("items", items), ("item_embeddings", item_emb),
                  ("rationale_embeddings", rat_emb), ("teacher_rationales", rats["teacher"]),
                  ("student_rationales", rats["student"])]:
        _put(tmp_lake, t, df, run_date)
    ctx = _ctx(tmp_lake, run_date, tmp_path)
    r = train_recommender.run(ctx)
    assert r.extra["missing_variants"] == {}
    m = tmp_lake.read_pandas("metrics")
    assert {"base", "text", "cooc_prior", "teacher", "slim", "slim_cooc", "text_matching", "slim@teacher_users"} <= set(m.variant)
    assert set(m.seed) == {0, 1} and set(m.split) == {"valid", "test"} and set(m.protocol) == {"full", "sampled100"}
    assert (m.run_id == ctx.run_id).all()
    assert m[m.variant == "teacher"].n_users.max() == len(seqs) // 2
    # beyond accuracy on every variant, baseline and seed's test/full-ranking rows, teacher subsets included
    on = (m.split == "test") & (m.protocol == "full")
    beyond = ["coverage_10", "coverage_20", "gini_10", "popularity_pct_10", "novelty_10", "ild_10"]
    assert m.loc[on, beyond].notna().all().all() and m.loc[~on, beyond].isna().all().all()
    assert ((m.loc[on, beyond[:3]] >= 0) & (m.loc[on, beyond[:3]] <= 1)).all().all()
    recs = tmp_lake.read_pandas("recommendations")
    assert len(recs) == len(seqs) and recs.item_ids.map(len).eq(5).all()
    full = dict(zip(seqs.user_id, seqs.item_ids, strict=True))
    assert all(not set(i) & set(full[u]) for u, i in zip(recs.user_id, recs.item_ids, strict=True))
    # a second run appends metrics under a new run_id and replaces the date's recommendations
    ctx2 = _ctx(tmp_lake, run_date, tmp_path, variants="[base]", seeds="[0]")
    train_recommender.run(ctx2)
    assert len(tmp_lake.read_pandas("recommendations")) == len(seqs)
    assert set(tmp_lake.read_pandas("recommender_runs").run_id) == {ctx.run_id, ctx2.run_id}
    assert pd.Series(tmp_lake.read_pandas("metrics").run_id).nunique() == 2


def test_dry_run_writes_nothing(tmp_lake, run_date, tmp_path):
    seqs, items, *_ = synthetic_frames()
    _put(tmp_lake, "user_sequences", seqs, run_date)
    _put(tmp_lake, "items", items, run_date)
    ctx = _ctx(tmp_lake, run_date, tmp_path)
    ctx.dry_run = True
    r = train_recommender.run(ctx)
    assert r.skipped and not tmp_lake.exists("metrics")


@pytest.mark.slow
def test_ray_train_job(tiny_data, tmp_path, ray_local):
    from rec_helpers import tiny_cfg
    from slimrec.recommender.experiment import run_experiment

    # two CPU workers: data-parallel DDP (gloo), rank 0 reports the checkpoints
    cfg = tiny_cfg(use_ray=True, num_workers=2, cpus_per_worker=1, num_threads=1, variants=["base", "slim"],
                   epochs=2, finetune_epochs=1)
    res = run_experiment(tiny_data, cfg, "raytest", tmp_path)
    assert set(res.checkpoints) == {"sasrec/0"}
    ckpt = res.checkpoints["sasrec/0"]
    import os

    assert {"group.json", "base.pt", "text.pt", "student.pt"} <= set(os.listdir(ckpt))
    assert {"base", "slim"} <= set(res.metrics.variant)
    assert res.recommendations is not None and len(res.recommendations) == tiny_data.n_users


def test_a_planted_experiment_run_writes_no_recommendations(tmp_lake, run_date, tmp_path):
    """A model trained beside planted rationales (embed.teacher_model names a planted teacher) measures the
    channel: its metrics are kept, flagged, and it never writes the serving table."""
    seqs, items, *_ = synthetic_frames()
    _put(tmp_lake, "user_sequences", seqs, run_date)
    _put(tmp_lake, "items", items, run_date)
    ctx = _ctx(tmp_lake, run_date, tmp_path)
    planted = StageContext(cfg=ctx.cfg.model_copy(update={"embed": ctx.cfg.embed.model_copy(
        update={"teacher_model": "offline-cooc-v1+planted-p1"})}), lake=tmp_lake, run_date=run_date)
    r = train_recommender.run(planted)
    assert r.tables["recommendations"] is None and not tmp_lake.exists("recommendations")
    assert json.loads(tmp_lake.read_pandas("recommender_runs").notes[0])["leakage"].startswith("LEAKAGE")
    r = train_recommender.run(ctx)  # the default run on the same lake serves as usual
    assert r.tables["recommendations"] is not None and tmp_lake.count("recommendations") > 0
