"""Stage retrieve_rationales: a rationale for every user the student did not write for, from the nearest users.

Runs with ``retrieval.student_users=seed_pool`` (skipped otherwise): the
student wrote only for the seed pool (stage ``student_rationales``), ``embed``
encoded the items and the pool's rationales, and this stage gives every other
user with a prompt the rationale of the ``retrieval.k`` nearest users that have
one (:mod:`slimrec.retrieval`):

1. Model: ``student.model_version`` (``latest``: the newest ``student_models``
   row), the one whose rationales are retrieved.
2. Donors: users whose latest ok ``student_rationales`` row of that model was
   written by the student and has a vector in ``rationale_embeddings``
   (this encoder). Receivers: the users outside the seed pool with a prompt
   dated on or before the run date and no such row (a pool user the student
   failed keeps its failed row and reason).
3. User vectors: the mean of the text vectors of the items in the user's
   history (``user_sequences.history``, ``item_embeddings``); faiss finds each
   receiver's k nearest donors by cosine.
4. Rows: ``student_rationales`` gets one row per receiver with
   ``rationale_source = retrieved`` (text of the nearest donor, grounded items
   by the donors' similarity-weighted vote, ``retrieved_from`` = the donors);
   ``rationale_embeddings`` gets its vector (``source = student``,
   ``rationale_source = retrieved``), the donors' similarity-weighted mean. A
   receiver without any item vector in its history gets a ``failed`` row with
   the reason, never silently nothing.
5. Incremental: a receiver whose prompt, donors and donors' texts are the same
   as in the stored row is not written again; a rerun on unchanged inputs
   commits nothing. One MERGE commit per table.

Command: ``slim stage retrieve_rationales --lake lake --set retrieval.student_users=seed_pool`` (or
``python jobs/retrieve_rationales.py``).
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import pandas as pd

from slimrec.embed.encoder import resolve_encoder
from slimrec.pipeline import StageError
from slimrec.retrieval import blend_vectors, in_seed_pool, nearest, user_vectors, vote_items
from slimrec.stages.base import StageContext, StageResult
from slimrec.stages.student_rationales import PROMPT_COLUMNS, latest_prompts, select_model

log = logging.getLogger(__name__)

STAGE = "retrieve_rationales"
INPUTS = ["prompts", "user_sequences", "student_models", "student_rationales", "item_embeddings",
          "rationale_embeddings"]
OUTPUTS = ["student_rationales", "rationale_embeddings"]
_NEEDS = ["student_models", "student_rationales", "item_embeddings", "rationale_embeddings"]
_RAT_COLS = ["user_id", "run_date", "model_version", "prompt_hash", "rationale", "step1", "step2", "step3",
             "grounded_item_ids", "status", "rationale_source"]
_TEXT_COLS = ["rationale", "step1", "step2", "step3"]
NO_VECTOR = "no item of the user's history has a text vector (item_embeddings): no neighbours to retrieve from"
NO_DONORS = "no user has a student rationale with a vector yet: nothing to retrieve from"


def _latest(rats: pd.DataFrame) -> pd.DataFrame:
    """Each user's latest row (run_date order)."""
    return rats.sort_values(["user_id", "run_date"], kind="stable").drop_duplicates("user_id", keep="last")


def signature(prompt_hash: str, status: str, donors: list[str], donor_hashes: list[str]) -> str:
    """What a retrieved row is made of: same signature, same row (the stage skips it)."""
    return hashlib.sha1("\x1f".join(["retrieved", prompt_hash or "", status, *donors, *donor_hashes]).encode()
                        ).hexdigest()


def donors_and_receivers(prompts: pd.DataFrame, rats: pd.DataFrame, vecs: pd.DataFrame, version: str,
                         rcfg) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(donors, receivers, counts).

    Donors: users whose latest ok row of ``version`` the student wrote and whose vector of that model exists
    (rationale row + ``text_hash``, ``embedding``). Receivers: users with a prompt outside the seed pool and
    without such a row (``user_id``, ``prompt_hash``); a pool user the student failed keeps its failed row.
    """
    ok = _latest(rats[rats["status"] == "ok"])
    own = ok[ok["rationale_source"] == "student"]
    own_vecs = vecs[(vecs["rationale_source"] == "student") & (vecs["model_version"] == version)]
    donors = own.merge(own_vecs[["user_id", "text_hash", "embedding"]], on="user_id", how="inner")
    pool = in_seed_pool(prompts["user_id"], rcfg.seed_pool_share, rcfg.seed)
    has_own = prompts["user_id"].isin(set(donors["user_id"])).to_numpy()
    receivers = prompts[~pool & ~has_own].reset_index(drop=True)
    counts = {"users": len(prompts), "seed_pool_users": int(pool.sum()), "donors": len(donors),
              "receivers": len(receivers), "pool_users_without_rationale": int((pool & ~has_own).sum())}
    return donors, receivers, counts


def retrieve(donors: pd.DataFrame, receivers: pd.DataFrame, histories: dict, items: pd.DataFrame, rcfg,
             version: str, encoder: str) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """(student_rationales rows with a ``signature`` column, their rationale_embeddings rows, similarities).

    Receivers with an item vector in their history get the k nearest donors' blend; the others a failed row.
    """
    item_index = {str(i): n for n, i in enumerate(items["item_id"])}
    item_mat = np.stack([np.asarray(v, np.float32) for v in items["embedding"]]) if len(items) else np.zeros((0, 0))
    d_uvec, d_has = user_vectors([list(histories.get(str(u), [])) for u in donors["user_id"]], item_index, item_mat)
    donors = donors[d_has].reset_index(drop=True)
    if donors.empty:
        raise StageError(f"retrieve_rationales: {NO_DONORS} (no donor has an item vector in its history)")
    r_uvec, r_has = user_vectors([list(histories.get(str(u), [])) for u in receivers["user_id"]], item_index,
                                 item_mat)
    sims, rows = nearest(d_uvec[d_has], r_uvec[r_has], rcfg.k, rcfg.batch_users)
    blended = blend_vectors(np.stack([np.asarray(v, np.float32) for v in donors["embedding"]]), sims, rows)
    named = [list(g) if g is not None else [] for g in donors["grounded_item_ids"]]
    grounded = vote_items([[named[j] for j in r] for r in rows], sims, rcfg.max_items)

    found = receivers[r_has].reset_index(drop=True)
    top = donors.iloc[rows[:, 0]].reset_index(drop=True)
    d_ids, d_hash = donors["user_id"].astype(str).to_numpy(), donors["text_hash"].to_numpy()
    found_rows = pd.DataFrame({
        "user_id": found["user_id"].astype(str).to_numpy(), "prompt_hash": found["prompt_hash"].to_numpy(),
        **{c: top[c].to_numpy() for c in _TEXT_COLS}, "grounded_item_ids": grounded, "status": "ok", "error": None,
        "retrieved_from": [d_ids[r].tolist() for r in rows],
        "signature": [signature(p, "ok", d_ids[r].tolist(), d_hash[r].tolist())
                      for p, r in zip(found["prompt_hash"], rows, strict=True)],
    })
    lost = receivers[~r_has]
    failed_rows = pd.DataFrame({
        "user_id": lost["user_id"].astype(str).to_numpy(), "prompt_hash": lost["prompt_hash"].to_numpy(),
        **{c: None for c in _TEXT_COLS}, "grounded_item_ids": [[] for _ in range(len(lost))], "status": "failed",
        "error": NO_VECTOR, "retrieved_from": [[] for _ in range(len(lost))],
        "signature": [signature(p, "failed", [], []) for p in lost["prompt_hash"]],
    })
    vectors = pd.DataFrame({
        "user_id": found_rows["user_id"], "source": "student", "model_version": version, "encoder": encoder,
        "text_hash": found_rows["signature"], "embedding": list(blended), "dim": np.int32(blended.shape[1]),
        "rationale_source": "retrieved",
    })
    return pd.concat([found_rows, failed_rows], ignore_index=True), vectors, sims


def run(ctx: StageContext) -> StageResult:
    rcfg = ctx.cfg.retrieval
    if rcfg.student_users != "seed_pool":
        return StageResult(STAGE, skipped=True, extra={
            "reason": "retrieval.student_users=all: the student writes for every user, nothing to retrieve"})
    lake = ctx.lake
    inputs = ctx.input_versions(INPUTS)
    missing = [t for t in _NEEDS if inputs[t] is None]
    if missing:
        raise StageError(f"retrieve_rationales needs {', '.join(missing)}: run distill_student, student_rationales "
                         "and embed first")
    enc = resolve_encoder(ctx.cfg.embed).encoder_id
    model = select_model(lake.read_pandas("student_models", version=inputs["student_models"]),
                         ctx.cfg.student.model_version)
    version = model["model_version"]
    prompts = latest_prompts(lake.read_pandas("prompts", version=inputs["prompts"], columns=PROMPT_COLUMNS),
                             ctx.run_date)[["user_id", "prompt_hash"]]
    rats = lake.read_pandas("student_rationales", version=inputs["student_rationales"], columns=_RAT_COLS,
                            filters=[("model_version", "=", version)])
    rats["rationale_source"] = rats["rationale_source"].fillna("student")
    vecs = lake.read_pandas("rationale_embeddings", version=inputs["rationale_embeddings"],
                            columns=["user_id", "model_version", "text_hash", "embedding", "rationale_source"],
                            filters=[("source", "=", "student"), ("encoder", "=", enc)])
    vecs["rationale_source"] = vecs["rationale_source"].fillna("student")

    donors, receivers, counts = donors_and_receivers(prompts, rats, vecs, version, rcfg)
    extra: dict = {"model_version": version, "encoder": enc, "k": rcfg.k, **counts}
    log.info("retrieve_rationales: model %s, %d users with a prompt (%d in the seed pool, %d of them without a "
             "rationale of their own): %d donors (a student rationale with a vector), %d to retrieve for", version,
             counts["users"], counts["seed_pool_users"], counts["pool_users_without_rationale"], len(donors),
             len(receivers))
    if receivers.empty:
        return StageResult(STAGE, rows_in=len(prompts), extra=extra)
    if donors.empty:
        raise StageError(f"retrieve_rationales: {NO_DONORS} (model {version}, encoder {enc}); run student_rationales "
                         "and embed first")

    t0 = time.perf_counter()
    seqs = lake.read_pandas("user_sequences", version=inputs["user_sequences"], columns=["user_id", "history"])
    items = lake.read_pandas("item_embeddings", version=inputs["item_embeddings"], columns=["item_id", "embedding"],
                             filters=[("encoder", "=", enc)])
    histories = dict(zip(seqs["user_id"].astype(str), seqs["history"], strict=True))
    new, vectors, sims = retrieve(donors, receivers, histories, items, rcfg, version, enc)
    retrieve_s = time.perf_counter() - t0
    # Unchanged: the user's latest row of this model is a retrieved one made of the same parts.
    last = _latest(rats)
    stored = _stored_signatures(last[last["rationale_source"] == "retrieved"], vecs, version)
    changed = new[[stored.get(u) != sig for u, sig in zip(new["user_id"], new["signature"], strict=True)]]
    failed = new[new["status"] == "failed"]
    extra.update(retrieved=len(new) - len(failed), failed=len(failed), unchanged=len(new) - len(changed),
                 written=len(changed), retrieve_s=round(retrieve_s, 3),
                 mean_similarity=round(float(sims.mean()), 4) if sims.size else None,
                 index="faiss IndexFlatIP (exact cosine)")
    log.info("retrieve_rationales: %d retrieved (mean cosine of the %d nearest %.3f), %d failed (%s), %d unchanged "
             "since the stored rows; %.2f s", extra["retrieved"], rcfg.k,
             float(sims.mean()) if sims.size else float("nan"), len(failed),
             "no item vector" if len(failed) else "-", extra["unchanged"], retrieve_s)
    if ctx.dry_run or changed.empty:
        return StageResult(STAGE, rows_in=len(prompts), skipped=ctx.dry_run, extra=extra)

    info = ctx.commit_info(STAGE, inputs, model_version=version, encoder=enc, k=rcfg.k)
    out = changed.drop(columns="signature").assign(model_version=version, output_tokens=None, latency_ms=None,
                                                   rationale_source="retrieved")
    tables = {"student_rationales": lake.write_arrow("student_rationales", out, "merge", info)}
    emb_changed = vectors[vectors["user_id"].isin(set(changed["user_id"]))]
    if len(emb_changed):
        tables["rationale_embeddings"] = lake.write_arrow("rationale_embeddings", emb_changed, "merge", info)
    # a user retrieved for before whose history has no item vector now: its old vector goes with its old row
    stale = vecs[(vecs["rationale_source"] == "retrieved") & vecs["user_id"].isin(set(failed["user_id"]))]
    if len(stale):
        import pyarrow as pa

        keys = pa.table({"user_id": stale["user_id"].astype(str).tolist(), "source": ["student"] * len(stale),
                         "encoder": [enc] * len(stale)})
        tables["rationale_embeddings"] = lake.delete_keys("rationale_embeddings", keys, info)
    return StageResult(STAGE, tables=tables, rows_in=len(prompts), rows_out=len(changed), extra=extra)


def _stored_signatures(last: pd.DataFrame, vecs: pd.DataFrame, version: str) -> dict[str, str]:
    """{user_id: signature} of the stored retrieved rows (``last``: each user's latest row, retrieved ones only).

    An ok row's signature is its vector's ``text_hash`` (written as the signature, which names the donors'
    text hashes at the time); a failed row's is made from its prompt hash.
    """
    kept = vecs[(vecs["rationale_source"] == "retrieved") & (vecs["model_version"] == version)]
    by_user = dict(zip(kept["user_id"].astype(str), kept["text_hash"], strict=True))
    out = {}
    for u, p, s in zip(last["user_id"].astype(str), last["prompt_hash"], last["status"], strict=True):
        sig = by_user.get(u) if s == "ok" else signature(p, s, [], [])
        if sig is not None:
            out[u] = sig
    return out
