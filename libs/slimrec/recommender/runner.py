"""Every variant x seed x backbone of one run, on the same split, as plain functions.

A *group* is one (backbone, seed): it trains the few models its variants need
and evaluates every variant from them, so variants that differ only by a
score prior share one trained model:

=============  ======================  =================================================
variant        model                   score (weights chosen on validation)
=============  ======================  =================================================
base           ids                     model
text           ids + item text         model
cooc_prior     text (or joint)         model + w_c * log(1 + transitions)
teacher        text + teacher fusion   model + grounded(teacher)                  [teacher users]
slim           text + student fusion   model + grounded(student)
teacher_cooc   teacher model           model + w_c * cooc + grounded(teacher)
slim_cooc      slim model              model + w_c * cooc + grounded(student)
text_matching  g_t only (no backbone)  cos(g_t(rationale_u), g_t(text_i))
=============  ======================  =================================================

``grounded(r)`` is ``w_g * named + w_m * named-not-in-model-top-R + w_t * named-not-in-transition-top-R``
(``grounded_prior``, ``grounded_novel_rank``; novelty on the rationale's own input, see :mod:`priors`).
Rationale models start from the text model when ``rationale_warm_start``.
The teacher's rows are computed over the users with a teacher rationale only
(the teacher answers a sample); every other variant is also reported on that
subset as ``<variant>@teacher_users`` so the comparison is like for like.
When some student rationales were retrieved (``retrieval.student_users=seed_pool``),
every variant is also reported on the users whose student rationale the student
wrote (``@student_users``) and on those whose was retrieved (``@retrieved_users``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from slimrec.recommender.beyond import BEYOND_NAMES
from slimrec.recommender.data import RecData
from slimrec.recommender.evaluation import (
    LIST_PROTOCOL,
    LIST_SPLIT,
    PROTOCOLS,
    Evaluator,
    ScoreMemo,
    summarise,
)
from slimrec.recommender.metrics import METRIC_NAMES
from slimrec.recommender.models import SeqRecModel, TextMatching
from slimrec.recommender.train import (
    FitResult,
    PeakRSS,
    fit_seq_model,
    fit_text_matching,
    match_score_fn,
    seq_score_fn,
)

log = logging.getLogger(__name__)

NO_BACKBONE = "none"
TEACHER_SUBSET = "teacher_users"
STUDENT_SUBSET = "student_users"  # the student wrote the user's rationale (a seed-pool run)
RETRIEVED_SUBSET = "retrieved_users"  # the user's rationale was retrieved from the nearest pool users


@dataclass(frozen=True)
class VariantSpec:
    text: bool = False
    rationale: str | None = None  # teacher | student
    cooc: bool = False
    id_agnostic: bool = False


def variant_spec(variant: str, cfg) -> VariantSpec:
    return {
        "base": VariantSpec(),
        "text": VariantSpec(text=True),
        "cooc_prior": VariantSpec(text=True, cooc=True),
        "teacher": VariantSpec(text=True, rationale="teacher"),
        "slim": VariantSpec(text=True, rationale="student"),
        "teacher_cooc": VariantSpec(text=True, rationale="teacher", cooc=True),
        "slim_cooc": VariantSpec(text=True, rationale="student", cooc=True),
        "text_matching": VariantSpec(id_agnostic=True, rationale=cfg.text_matching_source),
    }[variant]


def missing_reason(variant: str, data: RecData, cfg) -> str | None:
    """Why ``variant`` cannot run on ``data`` (None: it can). Missing inputs are reported, never faked."""
    spec = variant_spec(variant, cfg)
    if (spec.text or spec.id_agnostic) and data.item_text is None:
        return "no item text vectors (item_embeddings missing or empty)"
    if spec.rationale:
        table = f"{spec.rationale}_rationales"
        rat = data.rationales.get(spec.rationale)
        if rat is None or rat.n_present == 0:
            return f"no {spec.rationale} rationale vectors (rationale_embeddings source={spec.rationale}; {table})"
        if spec.id_agnostic and rat.vectors.shape[1] != data.item_text.shape[1]:
            return f"rationale ({rat.vectors.shape[1]}) and item text ({data.item_text.shape[1]}) vectors differ in size"
    return None


def model_key(variant: str, cfg, backbone: str) -> str:
    spec = variant_spec(variant, cfg)
    if spec.id_agnostic:
        return "text_matching"
    if spec.rationale:
        return spec.rationale
    if variant == "cooc_prior" and cfg.cooc_mode == "joint" and backbone != "srgnn":
        return "cooc_joint"
    return "text" if spec.text else "base"


def build_model(key: str, backbone: str, data: RecData, cfg):
    """A fresh model for ``key`` (base | text | cooc_joint | teacher | student | text_matching)."""
    text = torch.as_tensor(data.item_text) if data.item_text is not None else None
    if key == "text_matching":
        return TextMatching(text)
    if key == "base":
        return SeqRecModel(backbone, data.n_items, cfg)
    if key in ("text", "cooc_joint"):
        return SeqRecModel(backbone, data.n_items, cfg, text, joint_prior=key == "cooc_joint")
    rdim = data.rationales[key].vectors.shape[1]
    return SeqRecModel(backbone, data.n_items, cfg, text, rationale_dim=rdim)


def score_fn_for(key: str, model, data: RecData, ev: Evaluator, device):
    if key == "text_matching":
        return match_score_fn(model, data.rationales[data_source_of(key, ev.cfg)], device)
    rat = data.rationales.get(key) if key in ("teacher", "student") else None
    return seq_score_fn(model, ev, rat, device)


def data_source_of(key: str, cfg) -> str:
    return cfg.text_matching_source if key == "text_matching" else key


def priors_for(variant: str, data: RecData, ev: Evaluator, cfg, score_fn=None) -> tuple[list[str], list]:
    """Names and score functions of ``variant``'s priors. ``score_fn``: the variant's model scores, which
    the novel-grounded prior ranks against (without it that prior is left out)."""
    spec = variant_spec(variant, cfg)
    names, fns = [], []
    if spec.cooc:
        names.append("cooc")
        fns.append(ev.cooc_fn())
    if spec.rationale and not spec.id_agnostic and cfg.grounded_prior:
        rat = data.rationales[spec.rationale]
        if rat.n_grounded_users:
            names.append(f"grounded_{spec.rationale}")
            fns.append(ev.grounded_fn(spec.rationale))
            if cfg.grounded_novel_rank and score_fn is not None:
                names.append(f"grounded_{spec.rationale}_novel")
                fns.append(ev.grounded_novel_fn(spec.rationale, score_fn, cfg.grounded_novel_rank))
            if cfg.grounded_novel_rank:
                names.append(f"grounded_{spec.rationale}_novel_cooc")
                fns.append(ev.grounded_novel_fn(spec.rationale, ev.cooc_fn(), cfg.grounded_novel_rank, floor=0.0))
    return names, fns


def teacher_mask(data: RecData) -> np.ndarray | None:
    rat = data.rationales.get("teacher")
    return None if rat is None or rat.n_present == 0 else rat.present


def source_masks(data: RecData) -> dict[str, np.ndarray]:
    """{subset: users} by where the user's student rationale came from, when some were retrieved; else {}.

    Example: users a (written), b (retrieved), c (none) -> {"student_users": [a], "retrieved_users": [b]}.
    """
    rat = data.rationales.get("student")
    if rat is None or rat.retrieved is None or not rat.retrieved.any():
        return {}
    has = rat.present | (np.diff(rat.grounded_ptr) > 0)
    return {STUDENT_SUBSET: has & ~rat.retrieved, RETRIEVED_SUBSET: has & rat.retrieved}


def _subset_rows(per_user: dict, data: RecData, cfg, lists, ev, reasons) -> list[dict]:
    """Rows on the teacher users (when the teacher variant runs on a sample) and on each rationale source."""
    rows = []
    tmask = teacher_mask(data)
    if tmask is not None and tmask.sum() < data.n_users and "teacher" in cfg.variants:
        rows += _rows(per_user, tmask, TEACHER_SUBSET, lists, ev, reasons)
    for name, mask in source_masks(data).items():
        rows += _rows(per_user, mask, name, lists, ev, reasons)
    return rows


def _per_user_test(per_user: dict) -> dict[str, list[float]]:
    """{protocol: per-user test NDCG@10, rounded}: what :func:`paired_comparisons` pairs."""
    return {p: np.round(per_user[("test", p)]["ndcg_10"], 5).tolist() for p in PROTOCOLS}


# --------------------------------------------------------------------------------------------- groups
def plan_groups(cfg, data: RecData) -> tuple[list[tuple[str, int, list[str]]], dict[str, str]]:
    """[(backbone, seed, variants)] to run, and {variant: reason} for the variants that cannot run."""
    missing = {v: r for v in cfg.variants if (r := missing_reason(v, data, cfg))}
    runnable = [v for v in cfg.variants if v not in missing]
    seq_vars = [v for v in runnable if v != "text_matching"]
    groups = [(b, s, seq_vars) for s in cfg.seeds for b in cfg.backbones if seq_vars]
    if "text_matching" in runnable:
        groups += [(NO_BACKBONE, s, ["text_matching"]) for s in cfg.seeds]
    return groups, missing


def _rows(per_user: dict, mask: np.ndarray | None, subset: str, lists: np.ndarray | None = None,
          ev: Evaluator | None = None, reasons: dict | None = None) -> list[dict]:
    """One row per (split, protocol) of the users in ``mask`` (all when None). With the test top-K ``lists``
    (and ``ev``), the test/full row also carries the beyond-accuracy figures; why any is NaN or absent goes
    into ``reasons`` (``{"<subset>/<figure>": reason}``)."""
    n = int(mask.sum()) if mask is not None else len(next(iter(next(iter(per_user.values())).values())))
    extra: dict[str, float] = {}
    if lists is not None and ev is not None:
        extra, why = ev.beyond(lists, mask)
        if reasons is not None:
            reasons.update({f"{subset}/{k}": v for k, v in why.items()})
    out = []
    for (split, protocol), m in summarise(per_user, mask).items():
        more = extra if (split, protocol) == (LIST_SPLIT, LIST_PROTOCOL) else {}
        out.append({"split": split, "protocol": protocol, "subset": subset, "n_users": n, **m, **more})
    return out


def evaluate_variant(variant: str, score_fn, data: RecData, ev: Evaluator, cfg) -> dict:
    """Choose prior weights on validation, then metrics on valid and test under both protocols."""
    memo = ScoreMemo(cfg.eval_cache_mb * 2**20)  # the model is trained: each batch scored once
    score_fn = memo(score_fn)
    names, fns = priors_for(variant, data, ev, cfg, score_fn)
    fns = [memo(f) for f in fns]
    tmask = teacher_mask(data)
    spec = variant_spec(variant, cfg)
    # a teacher-rationale variant is only meaningful where the teacher answered (a sample of users)
    users = np.nonzero(tmask)[0] if spec.rationale == "teacher" and tmask is not None else None
    weights, v_sel = ev.choose_weights(score_fn, fns, users)
    per_user, lists = ev.per_user_and_lists(score_fn, fns, weights, users=users)
    reasons: dict[str, str] = {}
    if users is not None:
        rows = _rows(per_user, None, TEACHER_SUBSET, lists, ev, reasons)
    else:
        rows = _rows(per_user, None, "all", lists, ev, reasons) + _subset_rows(per_user, data, cfg, lists, ev,
                                                                                reasons)
    # per-user test NDCG@10 (rounded), for paired comparisons between variants (paired_comparisons)
    per_user_test = _per_user_test(per_user)
    return {"variant": variant, "weights": dict(zip(names, weights, strict=True)), "valid_selected": v_sel,
            "rows": rows, "teacher_users_only": users is not None, "per_user_test_ndcg_10": per_user_test,
            "per_user_rows": None if users is None else users.tolist(), "beyond_reasons": reasons}


# Variants and baselines that need no LLM: the claim is judged against the strongest of them.
NO_LLM = ("base", "text", "cooc_prior", "popular", "cooc")


def strongest_no_llm(results: list[dict]) -> tuple[str, str] | None:
    """(backbone, variant) of the no-LLM model or baseline (:data:`NO_LLM`) with the best validation
    full-ranking NDCG@10 over all users, averaged over its seeds; None when none was evaluated.

    Chosen on validation, so the test comparison against it is not a pick of the best test score.
    Example: sasrec/cooc_prior 0.055 and popular 0.004 on validation -> ("sasrec", "cooc_prior").
    """
    scores: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if r["variant"] not in NO_LLM or not r.get("per_user_test_ndcg_10"):
            continue
        for row in r["rows"]:
            if row["split"] == "valid" and row["protocol"] == "full" and row["subset"] == "all":
                scores.setdefault((r["backbone"], r["variant"]), []).append(row["ndcg_10"])
    if not scores:
        return None
    return max(sorted(scores), key=lambda k: float(np.mean(scores[k])))  # ties: the first in name order


def reference_label(reference: tuple[str, str]) -> str:
    backbone, variant = reference
    return variant if backbone == NO_BACKBONE else f"{backbone}/{variant}"


def paired_comparisons(results: list[dict], n_users: int, reference: tuple[str, str] | None = None) -> list[dict]:
    """Every (backbone, variant) against ``reference`` on the same users: test NDCG@10, per protocol.

    ``results``: evaluated models and baselines (``backbone``, ``variant``, ``per_user_test_ndcg_10``,
    ``per_user_rows``), one per seed. ``reference`` defaults to :func:`strongest_no_llm`. Per user,
    NDCG@10 is averaged over seeds for each side; ``mean_diff`` is the mean over users of (variant -
    reference) and ``se`` its paired standard error, std(diff) / sqrt(users). It measures how sure the
    difference is across users (seed-to-seed spread is in the metrics table's std). Variants measured on
    a subset (teacher users) are paired on that subset. The random baseline is left out.
    """
    reference = reference or strongest_no_llm(results)
    if reference is None:
        return []
    by: dict[tuple[str, str, str], list[np.ndarray]] = {}
    for r in results:
        for proto, vals in (r.get("per_user_test_ndcg_10") or {}).items():
            a = np.full(n_users, np.nan)
            rows = r.get("per_user_rows")
            a[np.arange(n_users) if rows is None else np.asarray(rows, dtype=np.int64)] = vals
            by.setdefault((r["backbone"], r["variant"], proto), []).append(a)
    label = reference_label(reference)
    out = []
    for (b, v, proto), arrs in by.items():
        ref = by.get((*reference, proto))
        if (b, v) == reference or v == "random" or ref is None:
            continue
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # users outside a subset: all-NaN columns
            x = np.nanmean(np.stack(arrs), axis=0)
            y = np.nanmean(np.stack(ref), axis=0)
        ok = ~np.isnan(x) & ~np.isnan(y)
        d = x[ok] - y[ok]
        n = int(ok.sum())
        out.append({
            "backbone": b, "variant": v, "reference": label, "protocol": proto, "n_users": n,
            "n_seeds": len(arrs), "variant_ndcg_10": float(x[ok].mean()), "reference_ndcg_10": float(y[ok].mean()),
            "mean_diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
            "users_better": int((d > 0).sum()), "users_worse": int((d < 0).sum()),
        })
    return out


def run_group(
    backbone: str, seed: int, variants: list[str], data: RecData, ev: Evaluator, cfg, *,
    device=None, rank: int = 0, world: int = 1, ddp_wrap=None,
) -> tuple[list[dict], dict[str, dict], dict[str, dict]]:
    """Train what ``variants`` need for (backbone, seed) and evaluate them.

    Returns (variant results, {model key: state_dict}, {model key: fit record}).
    """
    device = device or torch.device("cpu")
    keys = []
    for v in variants:
        k = model_key(v, cfg, backbone)
        if k in ("teacher", "student") and cfg.rationale_warm_start and "text" not in keys:
            keys.append("text")
        if k not in keys:
            keys.append(k)
    order = ["base", "text", "cooc_joint", "teacher", "student", "text_matching"]
    keys.sort(key=order.index)
    models, fits, states = {}, {}, {}
    for k in keys:
        label = f"[{backbone}/{k}/seed{seed}]"
        torch.manual_seed(seed)
        model = build_model(k, backbone, data, cfg)
        common = dict(device=device, rank=rank, world=world, ddp_wrap=ddp_wrap, label=label)
        if k == "text_matching":
            fit = fit_text_matching(model, data, ev, cfg, data.rationales[cfg.text_matching_source], seed=seed,
                                    **common)
        elif k in ("teacher", "student"):
            warm = cfg.rationale_warm_start
            if warm:
                missing, unexpected = model.load_state_dict(states["text"], strict=False)
                assert not unexpected, unexpected
            fit = fit_seq_model(
                model, data, ev, cfg, seed=seed, rationale=data.rationales[k],
                epochs=cfg.finetune_epochs if warm else cfg.epochs,
                lr=(cfg.finetune_lr or cfg.lr) if warm else cfg.lr, validate_first=warm, **common,
            )
        else:
            fit = fit_seq_model(model, data, ev, cfg, seed=seed, **common)
        models[k], states[k] = model, fit.state
        fits[k] = _fit_record(fit)
        log.info("%s best epoch %d valid NDCG@10 %.4f, %.2f s/epoch, peak RSS %.0f MiB", label, fit.best_epoch,
                 fit.best_valid, fit.seconds_per_epoch, fit.peak_rss_mib)
    results = []
    for v in variants:
        k = model_key(v, cfg, backbone)
        res = evaluate_variant(v, score_fn_for(k, models[k], data, ev, device), data, ev, cfg)
        res.update(backbone=backbone, seed=seed, model_key=k)
        results.append(res)
    return results, states, fits


def _fit_record(fit: FitResult) -> dict:
    return {
        "best_epoch": fit.best_epoch, "best_valid_ndcg_10": fit.best_valid, "epochs_run": fit.epochs_run,
        "train_seconds": round(fit.train_seconds, 3), "seconds_per_epoch": round(fit.seconds_per_epoch, 4),
        "peak_rss_mib": round(fit.peak_rss_mib, 1),
        "rss_growth_mib": round(fit.peak_rss_mib - fit.rss_start_mib, 1), "history": fit.history,
    }


# --------------------------------------------------------------------------------------------- baselines
def run_baselines(data: RecData, ev: Evaluator, cfg) -> list[dict]:
    """Random (one per seed), most-popular and transition-count rankings, evaluated like the models."""
    out = []
    zeros = lambda split, users: np.zeros((len(users), ev.n_cols), np.float32)  # noqa: E731
    fns = {
        "popular": [(0, ev.popular_fn(), [], ())],
        "cooc": [(0, zeros, [ev.cooc_fn()], (1.0,))],
        "random": [(s, ev.random_fn(s), [], ()) for s in cfg.seeds],
    }
    for name in cfg.baselines:
        for seed, fn, priors, w in fns[name]:
            per_user, lists = ev.per_user_and_lists(fn, priors, w)
            reasons: dict[str, str] = {}
            rows = _rows(per_user, None, "all", lists, ev, reasons) + _subset_rows(per_user, data, cfg, lists, ev,
                                                                                    reasons)
            out.append({"backbone": NO_BACKBONE, "variant": name, "seed": seed, "weights": {}, "rows": rows,
                        "model_key": None, "per_user_test_ndcg_10": _per_user_test(per_user),
                        "per_user_rows": None, "beyond_reasons": reasons})
    return out


# --------------------------------------------------------------------------------------------- tables
def metrics_frame(results: list[dict]) -> pd.DataFrame:
    """Long metrics rows: (backbone, variant, protocol, split, seed, metrics..., beyond..., n_users).

    Rows on the teacher-user subset carry the variant name ``<variant>@teacher_users``; variants that
    need teacher rationales keep their name (they are only ever measured there, ``n_users`` says on how many).
    The beyond-accuracy columns (:data:`beyond.BEYOND_NAMES`) are filled on the test/full-ranking rows
    only and NaN elsewhere (null in the table); NaN there too when a figure could not be measured.
    """
    recs = []
    for r in results:
        for row in r["rows"]:
            v = r["variant"]
            if row["subset"] != "all" and not (row["subset"] == TEACHER_SUBSET and r.get("teacher_users_only")):
                v = f"{v}@{row['subset']}"
            recs.append({"backbone": r["backbone"], "variant": v, "protocol": row["protocol"], "split": row["split"],
                         "seed": int(r["seed"]), **{m: row[m] for m in METRIC_NAMES},
                         **{m: float(row.get(m, np.nan)) for m in BEYOND_NAMES}, "n_users": row["n_users"]})
    return pd.DataFrame(recs)


def summary_frame(metrics: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Mean and std over seeds per (backbone, variant, protocol)."""
    m = metrics[metrics["split"] == split]
    g = m.groupby(["backbone", "variant", "protocol"], sort=False)
    mean = g[list(METRIC_NAMES)].mean()
    std = g[list(METRIC_NAMES)].std(ddof=1).fillna(0.0)
    out = mean.join(std, rsuffix="_std")
    out["n_seeds"] = g.size()
    out["n_users"] = g["n_users"].max()
    return out.reset_index()


def results_table(metrics: pd.DataFrame, split: str = "test") -> str:
    """Fixed-width text: one line per (backbone, variant), mean±std over seeds, both protocols."""
    s = summary_frame(metrics, split)
    cols = ["hr_10", "ndcg_10", "hr_20", "ndcg_20", "mrr"]
    head = f"{'backbone':<9}{'variant':<30}{'users':>6}{'seeds':>6} | " + " ".join(
        f"{p[:4]}:{c:<12}" for p in ("full", "sampled100") for c in cols
    )
    lines = [f"{split} split, mean±std over seeds", head, "-" * len(head)]
    keys = s[["backbone", "variant"]].drop_duplicates().itertuples(index=False)
    for b, v in keys:
        cells = []
        for p in ("full", "sampled100"):
            row = s[(s.backbone == b) & (s.variant == v) & (s.protocol == p)]
            for c in cols:
                cells.append("-" if row.empty else f"{row[c].iloc[0]:.4f}±{row[c + '_std'].iloc[0]:.4f}".ljust(17))
        r0 = s[(s.backbone == b) & (s.variant == v)].iloc[0]
        lines.append(f"{b:<9}{v:<30}{int(r0.n_users):>6}{int(r0.n_seeds):>6} | " + " ".join(cells))
    return "\n".join(lines)


def best_variant(metrics: pd.DataFrame, cfg) -> tuple[str, str] | None:
    """(backbone, variant) with the best mean VALIDATION NDCG@10 (early-stopping protocol), all users."""
    m = metrics[(metrics.split == "valid") & (metrics.protocol == cfg.early_stop_protocol)
                & (metrics.backbone != NO_BACKBONE) & ~metrics.variant.str.contains("@")]
    if m.empty:
        return None
    m = m[m.n_users == m.n_users.max()]  # variants measured on every user (not the teacher's sample)
    g = m.groupby(["backbone", "variant"])["ndcg_10"].mean()
    return g.idxmax()


def baselines_above(metrics: pd.DataFrame, best: tuple[str, str], cfg) -> dict[str, float]:
    """{baseline: mean validation NDCG@10} of the baselines that beat the served ``best`` model there."""
    m = metrics[(metrics.split == "valid") & (metrics.protocol == cfg.early_stop_protocol)
                & ~metrics.variant.str.contains("@")]
    g = m.groupby(["backbone", "variant"])["ndcg_10"].mean()
    top = g.get(best)
    if top is None:
        return {}
    base = g[[b == NO_BACKBONE and v in cfg.baselines for b, v in g.index]]
    return {v: float(x) for (_, v), x in base.items() if x > top}


__all__ = ["PeakRSS", "run_group", "run_baselines", "plan_groups", "metrics_frame", "results_table"]
