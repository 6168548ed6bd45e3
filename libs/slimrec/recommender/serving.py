"""Rescore users with the current recommender, without retraining (the daily refresh's last step).

``train_recommender`` leaves ``serving.json`` beside its checkpoints: which
(backbone, variant, seed) served the recommendations, its checkpoint, its
prior weights (chosen on validation) and the item index the model was
trained with. Rescoring:

1. finds the users whose inputs changed since ``recommendations`` was last
   written: the ``seq_hash`` in ``user_sequences`` and, for a rationale
   variant, the ``text_hash`` of that source's rationale vector, compared
   with the table versions recorded in that last commit (time travel);
2. maps their whole sequences onto the trained item index (items the model
   has never seen cannot be scored as inputs or candidates; they are dropped
   from the input and counted);
3. scores them with the saved model plus its priors (co-occurrence counts
   recomputed from today's histories) and MERGEs their top-K into
   ``recommendations`` under the refresh's run date.

A user's current recommendations are the row with the latest ``run_date``.
Nothing changed -> nothing written, so running the same date twice is a no-op.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slimrec.recommender.config import RecommenderConfig
from slimrec.recommender.data import build_rec_data
from slimrec.recommender.evaluation import Evaluator
from slimrec.recommender.experiment import SERVING_FILE, top_k_frame
from slimrec.recommender.runner import build_model, priors_for, score_fn_for, variant_spec
from slimrec.report import latest_run

log = logging.getLogger(__name__)

STEP = "rescore_recommendations"
READS = ["user_sequences", "items", "item_embeddings", "rationale_embeddings", "teacher_rationales",
         "student_rationales"]
MIN_ITEMS = 3  # history + valid + test: the shape every recommender input has


class ServingError(RuntimeError):
    """The served model cannot be loaded (missing or unreadable serving files)."""


def load_serving(folder: str | Path) -> dict:
    f = Path(folder) / SERVING_FILE
    if not f.exists():
        raise ServingError(f"{f} does not exist: the recommender run predates rescoring or wrote no "
                           "recommendations; run `slim refresh --retrain` once")
    manifest = json.loads(f.read_text())
    manifest["item_ids"] = json.loads((Path(folder) / manifest["items_file"]).read_text())
    if not Path(manifest["checkpoint"]).exists():
        raise ServingError(f"checkpoint {manifest['checkpoint']} named by {f} does not exist")
    return manifest


def _changed(lake, table: str, old_version: int | None, key: list[str], col: str, where=None) -> set[str]:
    """user_ids whose ``col`` differs between ``old_version`` and the latest version (new rows included)."""
    cur = lake.read_pandas(table, columns=key + [col])
    if where is not None:
        cur = cur[where(cur)]
    if old_version is None:
        return set(cur["user_id"].astype(str))
    old = lake.read_pandas(table, version=old_version, columns=key + [col])
    if where is not None:
        old = old[where(old)]
    m = cur.merge(old, on=key + [col], how="left", indicator=True)
    return set(m.loc[m["_merge"] == "left_only", "user_id"].astype(str))


def _watermark(lake) -> dict[str, int | None]:
    """Input table versions recorded by the last write of ``recommendations``."""
    commit = lake.last_commit("recommendations")
    raw = commit.get("slimrec.input_versions")
    if raw is None:
        raise ServingError("the last commit of recommendations carries no slimrec.input_versions")
    return json.loads(raw)


def _serving_frame(seqs: pd.DataFrame, vocab: set[str]) -> tuple[pd.DataFrame, int, int]:
    """Whole sequences restricted to trained items, re-split (history, valid, test) so ``serve`` = all of it."""
    whole = seqs["item_ids"].map(lambda xs: [str(x) for x in xs if str(x) in vocab])
    dropped = int((seqs["item_ids"].map(len) - whole.map(len)).sum())
    ok = whole.map(len) >= MIN_ITEMS
    out = pd.DataFrame({
        "user_id": seqs.loc[ok, "user_id"].astype(str),
        "history": whole[ok].map(lambda xs: xs[:-2]),
        "valid_target": whole[ok].map(lambda xs: xs[-2]),
        "test_target": whole[ok].map(lambda xs: xs[-1]),
    })
    return out, dropped, int((~ok).sum())


def rescore(ctx, artifacts_root: str | Path, users: set[str] | None = None, write: bool = True) -> dict:
    """Rescore changed users; returns facts for the StageResult (``skipped_reason`` when nothing to do).

    ``users``: score exactly these instead of the changed ones; ``write=False``: return the rows as
    ``facts["recommendations"]`` instead of writing them (checks and what-if runs).
    """
    lake = ctx.lake
    t0 = time.perf_counter()
    last = latest_run(lake)
    if last is None or not lake.exists("recommendations"):
        return {"skipped_reason": "no recommender has been trained yet (run `slim run` or `slim refresh --retrain`)"}
    folder = json.loads(last["notes"]).get("artifacts") or str(Path(artifacts_root) / last["run_id"])
    manifest = load_serving(folder)
    cfg = RecommenderConfig.model_validate(manifest["config"])
    spec = variant_spec(manifest["variant"], cfg)
    mark = _watermark(lake)

    forced = users is not None
    users = set(users) if forced else _changed(lake, "user_sequences", mark.get("user_sequences"), ["user_id"],
                                               "seq_hash")
    source = spec.rationale
    if source and lake.exists("rationale_embeddings") and not forced:
        users |= _changed(lake, "rationale_embeddings", mark.get("rationale_embeddings"), ["user_id", "source"],
                          "text_hash", where=lambda d: d["source"] == source)
    inputs = ctx.input_versions(READS + ["recommender_runs"])
    if not users:
        return {"skipped_reason": "no user's sequence or rationale changed since recommendations were last written",
                "model_run_id": last["run_id"]}

    read = {t: (lake.read_pandas(t, version=inputs[t]) if inputs[t] is not None else None) for t in READS}
    seqs, dropped_items, too_short = _serving_frame(read["user_sequences"], set(manifest["item_ids"]))
    vocab = pd.DataFrame({"item_id": manifest["item_ids"]})
    data, _ = build_rec_data(
        seqs, vocab, read["item_embeddings"], read["rationale_embeddings"],
        {"teacher": read["teacher_rationales"], "student": read["student_rationales"]},
        encoder=manifest["encoder"],
    )
    if list(data.item_ids) != manifest["item_ids"]:
        raise ServingError("item index differs from the one the model was trained with")
    if manifest["model_key"] in ("teacher", "student", "text_matching"):
        src = manifest["model_key"] if manifest["model_key"] != "text_matching" else cfg.text_matching_source
        if src not in data.rationales:
            raise ServingError(f"the served variant needs {src} rationale vectors, and none are in the lake")
    model = build_model(manifest["model_key"], manifest["backbone"], data, cfg)
    model.load_state_dict(torch.load(manifest["checkpoint"], map_location="cpu"))
    model.eval()
    ev = Evaluator(data, cfg)
    score = score_fn_for(manifest["model_key"], model, data, ev, torch.device("cpu"))
    names, fns = priors_for(manifest["variant"], data, ev, cfg, score)
    # a prior the served model was not fitted with (no grounded items at training time) gets weight 0
    weights = tuple(float(manifest["weights"].get(n, 0.0)) for n in names)
    index = {u: i for i, u in enumerate(data.user_ids)}
    rows = np.array(sorted(index[u] for u in users if u in index), dtype=np.int64)
    not_scored = len(users) - len(rows)
    written = None
    if len(rows):
        with torch.no_grad():
            items, scores = ev.top_k(score, fns, weights, cfg.top_k, users=rows)
        recs = top_k_frame(data, rows, items, scores, run_id=last["run_id"], backbone=manifest["backbone"],
                           variant=manifest["variant"])
        if not write:
            return {"recommendations": recs, "users_rescored": int(len(rows)), "users_not_scorable": not_scored}
        info = ctx.commit_info(STEP, inputs, model_run_id=last["run_id"], users_rescored=len(rows))
        written = lake.write_arrow("recommendations", recs, "merge", info)
    log.info("%s: %d users changed, %d rescored with %s/%s (run %s), %d not scorable (fewer than %d items the "
             "model knows), %d input items unknown to the model dropped", STEP, len(users), len(rows),
             manifest["backbone"], manifest["variant"], last["run_id"], not_scored, MIN_ITEMS, dropped_items)
    return {"version": written, "users_changed": len(users), "users_rescored": int(len(rows)),
            "users_not_scorable": not_scored, "unknown_items_dropped": dropped_items, "too_short": too_short,
            "model_run_id": last["run_id"], "seconds": round(time.perf_counter() - t0, 1)}
