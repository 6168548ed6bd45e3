"""Rationales by retrieval: the seed pool, the nearest-user search and the retrieve_rationales stage on a real lake.

The lake is written directly (no model runs): users stay in one of five categories, item vectors point
at their category, and the pool users' rationale vectors name it, so the right neighbours are known.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from slimrec.config import PipelineConfig
from slimrec.lake import CommitInfo, Lake
from slimrec.pipeline import StageError
from slimrec.retrieval import blend_vectors, in_seed_pool, nearest, user_vectors, vote_items
from slimrec.stages import retrieve_rationales, student_rationales
from slimrec.stages.base import StageContext
from student_helpers import items_frame, prompts_frame

RUN = date(2024, 1, 15)
VERSION = "student-v1"
DIM = 8


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------ pure parts
def test_seed_pool_is_a_stable_share_that_does_not_depend_on_other_users():
    users = [f"user{i}" for i in range(4000)]
    pool = in_seed_pool(users, 0.2, seed=7)
    assert 0.18 < pool.mean() < 0.22
    assert (in_seed_pool(users[:100], 0.2, seed=7) == pool[:100]).all()  # same user, same answer, any batch
    assert (in_seed_pool(users, 0.2, seed=8) != pool).any()  # the seed moves the pool
    assert in_seed_pool(users, 0.4, seed=7)[pool].all()  # a bigger share keeps every user of the smaller pool


def test_nearest_is_exact_cosine_search():
    rng = np.random.default_rng(0)
    donors = rng.normal(size=(300, 16)).astype(np.float32)
    donors /= np.linalg.norm(donors, axis=1, keepdims=True)
    queries = rng.normal(size=(50, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sims, rows = nearest(donors, queries, k=5, batch=7)  # batches of 7 queries: same answer as one call
    brute = queries @ donors.T
    assert (rows == np.argsort(-brute, axis=1)[:, :5]).all()
    np.testing.assert_allclose(sims, np.take_along_axis(brute, rows, axis=1), atol=1e-5)
    sims, rows = nearest(donors[:3], queries, k=5)  # fewer donors than k: all of them
    assert rows.shape == (50, 3)


def test_blend_and_vote_weigh_neighbours_by_similarity():
    vectors = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    out = blend_vectors(vectors, np.array([[0.9, 0.3]]), np.array([[0, 1]]))
    np.testing.assert_allclose(out[0], np.array([0.9, 0.3]) / np.hypot(0.9, 0.3), atol=1e-6)
    # negative similarities weigh nothing; a row with none positive weighs its neighbours equally
    np.testing.assert_allclose(blend_vectors(vectors, np.array([[0.5, -0.2]]), np.array([[0, 1]]))[0], [1, 0])
    np.testing.assert_allclose(blend_vectors(vectors, np.array([[-0.5, -0.2]]), np.array([[0, 1]]))[0],
                               [2 ** -0.5, 2 ** -0.5], atol=1e-6)
    assert vote_items([[["a", "b"], ["c", "b", "b"]]], np.array([[0.9, 0.6]]), 2) == [["b", "a"]]


def test_user_vectors_skip_items_without_a_vector():
    vecs, has = user_vectors([["a", "x"], ["x"], []], {"a": 0}, np.array([[3.0, 4.0]], np.float32))
    np.testing.assert_allclose(vecs[0], [0.6, 0.8], atol=1e-6)
    assert has.tolist() == [True, False, False] and not vecs[1].any()


def test_a_retrieved_row_never_counts_as_written_by_the_student():
    prompts = pd.DataFrame({"user_id": ["u1", "u2"], "prompt_hash": ["h1", "h2"]})
    existing = pd.DataFrame({"user_id": ["u1", "u2"], "prompt_hash": ["h1", "h2"], "model_version": ["m", "m"],
                             "status": ["ok", "ok"], "rationale_source": [None, "retrieved"]})
    todo = student_rationales.plan_users(prompts, existing, "m", retry_failed=True)
    assert todo["user_id"].tolist() == ["u2"]  # u1's row predates the column: the student wrote it


# ------------------------------------------------------------------------------------------ the stage
def _category(user: str) -> int:
    return int(user[1:]) % 5


def _histories(n: int) -> dict[str, list[str]]:
    """User k stays in category k % 5: three of that category's four items (i{c}, i{c+5}, i{c+10}, i{c+15})."""
    out = {}
    for k in range(n):
        c = k % 5
        items = [f"i{c + 5 * j:02d}" for j in range(4)]
        out[f"u{k:03d}"] = [items[(k // 5 + j) % 4] for j in range(3)]
    return out


def _item_vectors() -> dict[str, np.ndarray]:
    """Category one-hot plus a small per-item part; i19 has no vector (the user who only bought it fails)."""
    rng = np.random.default_rng(1)
    out = {}
    for k in range(19):
        v = np.zeros(DIM, np.float32)
        v[k % 5] = 1.0
        v[5:] = 0.1 * rng.normal(size=DIM - 5)
        out[f"i{k:02d}"] = v / np.linalg.norm(v)
    return out


def _rationale_vector(c: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[(c + 2) % 5] = 1.0  # another direction than the items': the vector is the donors', not the history's
    return v


def _ctx(lake, run_date=RUN, dry_run=False, **retrieval) -> StageContext:
    cfg = PipelineConfig.model_validate({"profile": "tiny", "retrieval": {"student_users": "seed_pool",
                                                                         "seed_pool_share": 0.5, "k": 3,
                                                                         **retrieval}})
    return StageContext(cfg=cfg, lake=lake, run_date=run_date, dry_run=dry_run)


def _student_row(user: str, prompt_hash: str, items: pd.DataFrame, source) -> dict:
    c = _category(user)
    named = [f"i{c + 5 * j:02d}" for j in range(2)]
    titles = items.set_index("item_id").loc[named, "title"].tolist()
    step3 = "; ".join(f'"{t}"' for t in titles)
    return {"user_id": user, "model_version": VERSION, "prompt_hash": prompt_hash,
            "rationale": f"Step 1: category {c}.\nStep 2: more of category {c}.\nStep 3: {step3}.",
            "step1": f"category {c}.", "step2": f"more of category {c}.", "step3": step3, "grounded_item_ids": named,
            "status": "ok", "error": None, "output_tokens": 40, "latency_ms": 5.0, "rationale_source": source,
            "retrieved_from": None}


@pytest.fixture()
def pool_lake(tmp_path):
    from slimrec.embed.encoder import resolve_encoder

    lake = Lake(tmp_path / "lake")
    info = CommitInfo("fixture", RUN)
    items = items_frame()
    hists = _histories(40)
    hists["u901"] = ["i19"]  # no item vector in the history: cannot be retrieved for
    enc = resolve_encoder(PipelineConfig().embed).encoder_id
    prompts = prompts_frame(hists, items)
    lake.write_arrow("items", items, "overwrite", info)
    lake.write_arrow("prompts", prompts, "replace_date", info)
    lake.write_arrow("user_sequences", pd.DataFrame({
        "user_id": list(hists), "item_ids": [h + ["i00"] for h in hists.values()], "history": list(hists.values()),
        "valid_target": None, "test_target": None, "seq_len": [len(h) + 1 for h in hists.values()],
        "last_event_ts": datetime(2024, 1, 1, tzinfo=UTC), "seq_hash": [_sha(str(h)) for h in hists.values()]}),
        "overwrite", info)
    lake.write_arrow("student_models", pd.DataFrame([{
        "model_version": VERSION, "base_model": "/models/base", "adapter_path": "/models/adapter", "lora_config": "{}",
        "train_rows": 10, "heldout_rows": 2, "train_loss": 1.0, "val_loss": 1.0, "heldout_rouge_l_student": 0.5,
        "heldout_rouge_l_base": 0.1, "metrics": "{}", "created_ts": datetime(2024, 1, 1, tzinfo=UTC)}]),
        "merge", info)
    ivec = _item_vectors()
    lake.write_arrow("item_embeddings", pd.DataFrame({
        "item_id": list(ivec), "encoder": enc, "text_hash": [_sha(i) for i in ivec], "embedding": list(ivec.values()),
        "dim": np.int32(DIM)}), "merge", info)
    users = prompts["user_id"].tolist()
    pool = [u for u, p in zip(users, in_seed_pool(users, 0.5, 0), strict=True) if p]
    assert "u901" not in pool
    assert {_category(u) for u in pool} == set(range(5))  # every category has a donor
    hashes = dict(zip(prompts["user_id"], prompts["prompt_hash"], strict=True))
    # half of the pool's rows predate the rationale_source column (null: the student wrote them)
    rows = [_student_row(u, hashes[u], items, None if i % 2 else "student") for i, u in enumerate(pool)]
    lake.write_arrow("student_rationales", pd.DataFrame(rows), "merge", info)
    lake.write_arrow("rationale_embeddings", pd.DataFrame({
        "user_id": pool, "source": "student", "model_version": VERSION, "encoder": enc,
        "text_hash": [_sha(r["rationale"]) for r in rows], "embedding": [_rationale_vector(_category(u)) for u in pool],
        "dim": np.int32(DIM), "rationale_source": "student"}), "merge", info)
    return lake, users, pool, enc


def _student_channel(lake: Lake, enc: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    rats = lake.read_pandas("student_rationales").sort_values("run_date").drop_duplicates("user_id", keep="last")
    vecs = lake.read_pandas("rationale_embeddings")
    return rats.set_index("user_id"), vecs[(vecs["source"] == "student") & (vecs["encoder"] == enc)].set_index("user_id")


def test_every_user_outside_the_pool_gets_the_rationale_of_its_nearest_pool_users(pool_lake):
    lake, users, pool, enc = pool_lake
    res = retrieve_rationales.run(_ctx(lake))
    outside = [u for u in users if u not in pool]
    assert res.extra["donors"] == len(pool) and res.extra["receivers"] == len(outside)
    assert res.extra["retrieved"] == len(outside) - 1 and res.extra["failed"] == 1
    rats, vecs = _student_channel(lake, enc)
    assert set(rats.index) == set(users)  # every user with a prompt has a row: none lost
    assert (rats.loc[pool, "rationale_source"].fillna("student") == "student").all()
    got = rats.loc[[u for u in outside if u != "u901"]]
    assert (got["rationale_source"] == "retrieved").all() and (got["status"] == "ok").all()
    for u, row in got.iterrows():
        donors = list(row["retrieved_from"])
        assert 1 <= len(donors) <= 3 and set(donors) <= set(pool)
        assert _category(donors[0]) == _category(u)  # the nearest user shares the category
        assert row["rationale"] == rats.loc[donors[0], "rationale"]  # the text is the nearest one's
        assert set(row["grounded_item_ids"]) <= {i for d in donors for i in rats.loc[d, "grounded_item_ids"]}
        assert list(row["grounded_item_ids"])[:2] == list(rats.loc[donors[0], "grounded_item_ids"])
        # the vector blends the donors' vectors: closest to the user's own category's rationale vector
        v = np.asarray(vecs.loc[u, "embedding"])
        assert vecs.loc[u, "rationale_source"] == "retrieved" and vecs.loc[u, "model_version"] == VERSION
        assert int(np.argmax([v @ _rationale_vector(c) for c in range(5)])) == _category(u)
        assert abs(np.linalg.norm(v) - 1) < 1e-5
    failed = rats.loc["u901"]
    assert failed["status"] == "failed" and "no item of the user's history has a text vector" in failed["error"]
    assert failed["rationale_source"] == "retrieved" and "u901" not in vecs.index


def test_a_rerun_writes_only_what_changed(pool_lake):
    lake, users, pool, enc = pool_lake
    first = retrieve_rationales.run(_ctx(lake))
    versions = (lake.version("student_rationales"), lake.version("rationale_embeddings"))
    again = retrieve_rationales.run(_ctx(lake, run_date=RUN + timedelta(days=1)))
    assert again.extra["unchanged"] == first.extra["receivers"] and again.rows_out == 0 and not again.tables
    assert (lake.version("student_rationales"), lake.version("rationale_embeddings")) == versions
    # one donor's rationale changes: exactly the users it was retrieved for are written again
    donor = pool[0]
    info = CommitInfo("fixture", RUN)
    lake.write_arrow("rationale_embeddings", pd.DataFrame({
        "user_id": [donor], "source": "student", "model_version": VERSION, "encoder": enc, "text_hash": [_sha("new")],
        "embedding": [_rationale_vector(_category(donor))], "dim": np.int32(DIM), "rationale_source": "student"}),
        "merge", info)
    rats, _ = _student_channel(lake, enc)
    named = {u for u, f in rats["retrieved_from"].items() if f is not None and donor in list(f)}
    third = retrieve_rationales.run(_ctx(lake, run_date=RUN + timedelta(days=2)))
    assert named and third.rows_out == len(named)
    rats, _ = _student_channel(lake, enc)
    assert set(rats.index[rats["run_date"] == RUN + timedelta(days=2)]) == named


def test_nothing_to_do_unless_the_student_writes_for_a_seed_pool(pool_lake):
    lake, *_ = pool_lake
    before = lake.version("student_rationales")
    res = retrieve_rationales.run(_ctx(lake, student_users="all"))
    assert res.skipped and "student_users=all" in res.extra["reason"]
    dry = retrieve_rationales.run(_ctx(lake, dry_run=True))
    assert dry.skipped and dry.extra["retrieved"] > 0 and not dry.tables
    assert lake.version("student_rationales") == before


def test_without_any_donor_the_stage_says_why(pool_lake):
    lake, *_ = pool_lake
    lake.delete_keys("rationale_embeddings", lake.read_arrow("rationale_embeddings", columns=["user_id", "source",
                                                                                            "encoder"]),
                     CommitInfo("fixture", RUN))
    with pytest.raises(StageError, match="no user has a student rationale with a vector"):
        retrieve_rationales.run(_ctx(lake))


def test_the_recommender_reports_written_and_retrieved_users_apart(pool_lake):
    from slimrec.recommender.data import build_rec_data
    from slimrec.recommender.runner import RETRIEVED_SUBSET, STUDENT_SUBSET, source_masks

    lake, users, pool, enc = pool_lake
    retrieve_rationales.run(_ctx(lake))
    seqs = pd.DataFrame({"user_id": users, "history": [["i00", "i05"]] * len(users), "valid_target": "i10",
                         "test_target": "i15"})
    data, notes = build_rec_data(seqs, lake.read_pandas("items"), lake.read_pandas("item_embeddings"),
                                 lake.read_pandas("rationale_embeddings"),
                                 {"student": lake.read_pandas("student_rationales")}, encoder=enc)
    masks = source_masks(data)
    written = set(data.user_ids[masks[STUDENT_SUBSET]])
    retrieved = set(data.user_ids[masks[RETRIEVED_SUBSET]])
    assert written == set(pool) and retrieved == set(users) - set(pool) - {"u901"}
    assert notes["student_rationale_users"] == len(users) - 1  # every user but the failed one has a vector


def test_retrieved_rows_pass_the_quality_gate_and_a_bad_source_does_not(pool_lake, spark):
    from slimrec.quality import validate_table
    from slimrec.quality.config import QualityConfig

    lake, *_ = pool_lake
    res = retrieve_rationales.run(_ctx(lake))
    qcfg = QualityConfig(embedding_dims={"all-MiniLM-L6-v2": DIM})  # the fixture's vectors are short
    for table, version in res.tables.items():
        report = validate_table(lake, table, cfg=qcfg, spark=spark, version=version)
        assert report.success and report.rows > 0, report.summary()
    bad = lake.read_pandas("student_rationales").head(1).drop(columns=["run_date", "input_versions"])
    version = lake.write_arrow("student_rationales", bad.assign(rationale_source="copied"), "merge",
                               CommitInfo("fixture", RUN + timedelta(days=3)))
    report = validate_table(lake, "student_rationales", cfg=qcfg, spark=spark, version=version)
    assert not report.success and "rationale_source outside student | retrieved" in report.summary()
