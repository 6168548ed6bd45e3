"""One recommender run: every (backbone, seed) group as a Ray Train ``TorchTrainer`` job, then baselines,
the metrics table, the best variant's recommendations and the run's notes.

``run_experiment(data, cfg, run_id, artifacts_root)`` takes plain numpy data
(:class:`RecData`), so it runs the same on the bundled JSON, on lake tables
and on tiny synthetic data in tests.

Ray Train layout: one ``TorchTrainer.fit()`` per run (its start-up cost is paid
once); each worker loops over the groups; rank 0 reports one checkpoint per
group holding ``group.json`` (variant metrics, chosen prior weights, fit
records) and ``<model_key>.pt`` (the best-validation state of every model the
group trained). The driver reads them back from the run's storage
(``<artifacts_root>/<run_id>``), which on a cluster is shared storage (NFS,
S3). With ``use_ray=false`` the same loop runs in this process and writes the
same checkpoint folders.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slimrec.memory import fit_and_release
from slimrec.recommender.config import RecommenderConfig
from slimrec.recommender.data import RecData
from slimrec.recommender.evaluation import Evaluator
from slimrec.recommender.runner import (
    baselines_above,
    best_variant,
    build_model,
    metrics_frame,
    model_key,
    paired_comparisons,
    plan_groups,
    priors_for,
    reference_label,
    results_table,
    run_baselines,
    run_group,
    score_fn_for,
    strongest_no_llm,
)

log = logging.getLogger(__name__)


@dataclass
class ExperimentResult:
    metrics: pd.DataFrame  # backbone, variant, protocol, split, seed, metrics..., beyond..., n_users
    groups: list[dict]  # one payload per (backbone, seed) group
    checkpoints: dict[str, str]  # "backbone/seed" -> checkpoint folder
    missing: dict[str, str]  # variant -> why it did not run
    best: tuple[str, str] | None
    recommendations: pd.DataFrame | None
    notes: dict = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)  # every evaluated model and baseline, per seed

    def table(self, split: str = "test") -> str:
        return results_table(self.metrics, split)

    def per_user_test(self) -> pd.DataFrame:
        """Long per-user test NDCG@10: backbone, variant, seed, protocol, user (row of the run's sorted user
        ids), ndcg_10; what paired comparisons across runs (``slim experiment``) read back."""
        frames = []
        for r in self.results:
            rows = r.get("per_user_rows")
            for proto, vals in (r.get("per_user_test_ndcg_10") or {}).items():
                users = np.arange(len(vals)) if rows is None else np.asarray(rows, dtype=np.int64)
                frames.append(pd.DataFrame({"backbone": r["backbone"], "variant": r["variant"],
                                            "seed": int(r["seed"]), "protocol": proto, "user": users,
                                            "ndcg_10": np.asarray(vals, dtype=np.float64)}))
        cols = ["backbone", "variant", "seed", "protocol", "user", "ndcg_10"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


SERVING_FILE = "serving.json"
SERVING_ITEMS = "serving_items.json"


def _threads(cfg: RecommenderConfig) -> int:
    return cfg.num_threads or max(1, int(cfg.cpus_per_worker))


def _save_group(folder: Path, payload: dict, states: dict[str, dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "group.json").write_text(json.dumps(payload, default=float))
    for k, st in states.items():
        torch.save(st, folder / f"{k}.pt")


def _group_payload(backbone, seed, results, fits) -> dict:
    return {"backbone": backbone, "seed": int(seed), "results": results, "fits": fits}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: run every group, report one checkpoint per group from rank 0."""
    import ray
    import ray.train
    import ray.train.torch

    if not logging.getLogger().handlers:  # a fresh worker process: per-epoch progress to its log file
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    cfg = RecommenderConfig.model_validate(config["cfg"])
    data: RecData = ray.get(config["data_ref"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(_threads(cfg))
    ddp_wrap = None
    if world > 1:
        def ddp_wrap(m):
            return ray.train.torch.prepare_model(m, parallel_strategy_kwargs={"find_unused_parameters": True})
    ev = Evaluator(data, cfg)
    for backbone, seed, variants in config["groups"]:
        results, states, fits = run_group(backbone, seed, variants, data, ev, cfg, device=device, rank=rank,
                                          world=world, ddp_wrap=ddp_wrap)
        metrics = {"group": f"{backbone}/{seed}", "n_variants": len(results)}
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                _save_group(Path(d), _group_payload(backbone, seed, results, fits), states)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def _run_ray(data: RecData, cfg: RecommenderConfig, groups, run_id: str, root: Path, ray_address=None):
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from slimrec.rayutil import ensure_ray

    ensure_ray(ray_address)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "data_ref": ray.put(data), "groups": groups},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=run_id, storage_path=str(root), checkpoint_config=CheckpointConfig(num_to_keep=None)
        ),
    )
    result = fit_and_release(trainer)
    out = []
    for ckpt, _ in result.best_checkpoints:
        # local storage: the checkpoint folder is the path itself; remote storage: download it
        folder = Path(ckpt.path) if Path(ckpt.path).exists() else Path(ckpt.to_directory())
        out.append((json.loads((folder / "group.json").read_text()), str(folder)))
    return out


def _run_local(data: RecData, cfg: RecommenderConfig, groups, run_id: str, root: Path):
    torch.set_num_threads(_threads(cfg))
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    ev = Evaluator(data, cfg)
    out = []
    for backbone, seed, variants in groups:
        results, states, fits = run_group(backbone, seed, variants, data, ev, cfg, device=device)
        folder = root / run_id / f"{backbone}_seed{seed}"
        payload = _group_payload(backbone, seed, results, fits)
        _save_group(folder, payload, states)
        out.append((payload, str(folder)))
    return out


def run_experiment(
    data: RecData, cfg: RecommenderConfig, run_id: str, artifacts_root: str | Path, ray_address: str | None = None
) -> ExperimentResult:
    """Train and evaluate every runnable (backbone, variant, seed), the baselines, and recommend."""
    root = Path(artifacts_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    groups, missing = plan_groups(cfg, data)
    for v, why in missing.items():
        log.warning("variant %s not run: %s", v, why)
    log.info("recommender run %s: %d users, %d items, %d groups (%s)", run_id, data.n_users, data.n_items,
             len(groups), "Ray Train" if cfg.use_ray else "in process")
    outputs = _run_ray(data, cfg, groups, run_id, root, ray_address) if cfg.use_ray and groups else (
        _run_local(data, cfg, groups, run_id, root)
    )
    payloads = [p for p, _ in outputs]
    checkpoints = {f"{p['backbone']}/{p['seed']}": c for p, c in outputs}
    ev = Evaluator(data, cfg)
    results = [r for p in payloads for r in p["results"]] + run_baselines(data, ev, cfg)
    metrics = metrics_frame(results)
    best = best_variant(metrics, cfg) if len(metrics) else None
    above = baselines_above(metrics, best, cfg) if best else {}
    if above:
        log.warning("baseline(s) %s beat every model on validation (NDCG@10 %s); the recommendations still "
                    "come from the best model, %s/%s: look at the data and the model settings",
                    ", ".join(above), ", ".join(f"{v:.4f}" for v in above.values()), *best)
    recs = recommend(data, cfg, ev, payloads, checkpoints, best) if best else None
    if recs is not None:
        write_serving(root / run_id, data, cfg, recs, payloads, checkpoints)
    notes = run_notes(data, cfg, payloads, results, missing, best)
    return ExperimentResult(metrics, payloads, checkpoints, missing, best, recs, notes, results)


def recommend(data, cfg, ev, payloads, checkpoints, best) -> pd.DataFrame:
    """Top-K per user from the best variant's best seed (by validation), reloaded from its checkpoint.

    Input is the user's whole sequence; every item of it is excluded; priors keep their validation weights.
    """
    backbone, variant = best
    cands = [(r["valid_selected"], p["seed"], r) for p in payloads if p["backbone"] == backbone
             for r in p["results"] if r["variant"] == variant]
    _, seed, res = max(cands, key=lambda t: t[0])
    key = model_key(variant, cfg, backbone)
    model = build_model(key, backbone, data, cfg)
    state = torch.load(Path(checkpoints[f"{backbone}/{seed}"]) / f"{key}.pt", map_location="cpu")
    model.load_state_dict(state)
    score = score_fn_for(key, model, data, ev, torch.device("cpu"))
    names, fns = priors_for(variant, data, ev, cfg, score)
    weights = tuple(res["weights"].get(n, 0.0) for n in names)
    items, scores = ev.top_k(score, fns, weights, cfg.top_k)
    return top_k_frame(data, np.arange(data.n_users), items, scores, backbone=backbone, variant=variant, seed=seed)


def top_k_frame(data: RecData, rows: np.ndarray, items: np.ndarray, scores: np.ndarray, **const) -> pd.DataFrame:
    """Recommendation rows of users ``rows`` from :meth:`Evaluator.top_k` output, plus constant columns.

    A user with fewer candidates than k (a history that covers most of the catalogue) gets a shorter list:
    :meth:`Evaluator.top_k` fills the rest with excluded items scored -inf, which are never served.
    """
    keep = np.isfinite(scores)
    return pd.DataFrame({
        "user_id": data.user_ids[rows],
        "item_ids": [list(data.item_ids[r[m] - 1]) for r, m in zip(items, keep, strict=True)],
        "scores": [list(map(float, s[m])) for s, m in zip(scores, keep, strict=True)],
        **const,
    })


def write_serving(folder: Path, data: RecData, cfg, recs: pd.DataFrame, payloads, checkpoints) -> None:
    """What rescoring needs without retraining: the served model's checkpoint, prior weights and item index."""
    backbone, variant, seed = recs["backbone"].iloc[0], recs["variant"].iloc[0], int(recs["seed"].iloc[0])
    res = next(r for p in payloads if p["backbone"] == backbone and p["seed"] == seed
               for r in p["results"] if r["variant"] == variant)
    key = model_key(variant, cfg, backbone)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SERVING_ITEMS).write_text(json.dumps([str(i) for i in data.item_ids]))
    (folder / SERVING_FILE).write_text(json.dumps({
        "backbone": backbone, "variant": variant, "seed": seed, "model_key": key,
        "checkpoint": str(Path(checkpoints[f"{backbone}/{seed}"]) / f"{key}.pt"),
        "weights": res["weights"], "encoder": data.encoder, "items_file": SERVING_ITEMS,
        "config": cfg.model_dump(mode="json"),
    }, indent=1, default=float))


def run_notes(data: RecData, cfg, payloads, results: list[dict], missing, best) -> dict:
    """JSON-able facts of the run: missing variants, rationale coverage, chosen weights, time and memory,
    and the paired comparison with the strongest no-LLM model or baseline (``results``: models and baselines)."""
    perf: dict[str, dict] = {}
    for p in payloads:
        for key, fit in p["fits"].items():
            d = perf.setdefault(f"{p['backbone']}/{key}", {"seconds_per_epoch": [], "peak_rss_mib": [],
                                                           "best_epoch": [], "epochs_run": []})
            for k in d:
                d[k].append(fit[k])
    perf_summary = {
        k: {"seconds_per_epoch_mean": float(np.mean(v["seconds_per_epoch"])),
            "peak_rss_mib_max": float(np.max(v["peak_rss_mib"])),
            "best_epoch": v["best_epoch"], "epochs_run": v["epochs_run"]}
        for k, v in perf.items()
    }
    ref = strongest_no_llm(results)
    weights = {f"{r['backbone']}/{r['variant']}/{r['seed']}": r["weights"] for p in payloads for r in p["results"]
               if r["weights"]}
    coverage = {s: {"users_with_vector": r.n_present, "users_with_grounded_items": r.n_grounded_users,
                    "model_version": r.model_version} for s, r in data.rationales.items()}
    not_measured: dict[str, set[str]] = {}  # "<subset>/<figure>" -> why it is NaN or absent somewhere
    for r in results:
        for k, why in (r.get("beyond_reasons") or {}).items():
            not_measured.setdefault(k, set()).add(why)
    return {
        "missing_variants": missing,
        "rationale_coverage": coverage,
        "n_users": data.n_users,
        "item_text": data.item_text is not None,
        "encoder": data.encoder,
        "prior_weights": weights,
        "performance": perf_summary,
        "best": list(best) if best else None,
        "paired_reference": reference_label(ref) if ref else None,
        "paired_vs_reference": paired_comparisons(results, data.n_users, ref) if ref else [],
        "beyond_not_measured": {k: sorted(v) for k, v in sorted(not_measured.items())},
    }
