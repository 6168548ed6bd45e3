"""``slim experiment planted``: how much of what a rationale says reaches the ranking.

LEAKAGE BY DESIGN. The planted-signal teacher (:mod:`slimrec.teacher.planted`)
names each planted user's held-out items in step 3, so its numbers measure the
channel (prompt -> teacher -> embed -> fusion -> ranking), never the product.

The shared stages run once (ingest .. embed, with the usual teacher sample
for distillation: the student never trains on planted answers); then, for
each precision ``p``, only what depends on ``p``: ``teacher_rationales`` for
every user with a prompt (teacher_model ``<name>+planted-p<p>``, cached per
``p``), ``embed`` (vectors of unchanged texts are reused by text hash) and
``train_recommender``. Results go to the Delta table ``experiments`` and to
an HTML/Markdown/JSON page.

Rows (:func:`experiment_rows`): per precision x backbone x variant x protocol
x split x metric, the mean and std over seeds; for test NDCG@10 the paired
per-user differences (per user averaged over seeds first) against ``text``,
against the run's no-LLM reference (chosen on validation), against the same
variant at the lowest precision (``p0``: the leakage check of student
variants) and at the precision below (``prev``: the curve must not fall).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from slimrec.recommender.metrics import METRIC_NAMES
from slimrec.teacher.planted import LEAKAGE_NOTE, planted_model_name

log = logging.getLogger(__name__)

KIND = "planted"
PER_P_STAGES = ("teacher_rationales", "embed", "train_recommender")
TEACHER_VARIANTS = ("teacher", "teacher_cooc")
STUDENT_VARIANTS = ("slim", "slim_cooc")
RATIONALE_VARIANTS = (*TEACHER_VARIANTS, *STUDENT_VARIANTS, "text_matching")
CHECK_METRIC = "ndcg_10"
# what the shared stages write and every point reads: a point is reused only if these are unchanged
SHARED_TABLES = ("user_sequences", "items", "item_embeddings", "student_rationales")


@dataclass
class Point:
    """One precision's run: what the curve reads back from the lake and the run's artifacts."""

    precision: float
    teacher_model: str
    run_id: str
    metrics: pd.DataFrame  # the metrics table's rows of run_id
    per_user: pd.DataFrame  # backbone, variant, seed, protocol, user, ndcg_10 (test)
    reference: str | None  # "sasrec/cooc_prior" or "cooc" (a baseline)
    seconds: float = 0.0
    users: int = 0  # users with a teacher rationale at this precision


@dataclass
class PlantedExperiment:
    experiment_id: str
    dataset: str
    rows: pd.DataFrame
    checks: list[dict]
    seconds: dict[str, float] = field(default_factory=dict)
    users: dict[float, int] = field(default_factory=dict)


def precision_overrides(p: float, n_users: int, teacher_name: str) -> list[str]:
    """Config overrides of one precision: the planted teacher for every user, embedded and used by name."""
    return [
        f"teacher.offline.planted_precision={p}",
        f"teacher.sample_size={max(1, n_users)}",
        "teacher.kind=offline",
        f"embed.teacher_model={planted_model_name(teacher_name, p)}",
    ]


# ------------------------------------------------------------------------------------------ paired rows
def _ref_key(reference: str | None) -> tuple[str, str] | None:
    if not reference:
        return None
    return tuple(reference.split("/", 1)) if "/" in reference else ("none", reference)


def per_user_means(per_user: pd.DataFrame) -> dict[tuple[str, str, str], pd.Series]:
    """{(backbone, variant, protocol): per-user test NDCG@10 averaged over seeds, indexed by user}."""
    if per_user.empty:
        return {}
    g = per_user.groupby(["backbone", "variant", "protocol", "user"], sort=False)["ndcg_10"].mean()
    return {k: s.droplevel([0, 1, 2]) for k, s in g.groupby(level=[0, 1, 2], sort=False)}


def paired(x: pd.Series | None, y: pd.Series | None) -> tuple[float | None, float | None]:
    """Mean over shared users of ``x - y`` and its paired SE ``std(d) / sqrt(n)``; (None, None) if unpaired."""
    if x is None or y is None:
        return None, None
    d = (x - y).dropna()
    if len(d) == 0:
        return None, None
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()), se


def experiment_rows(points: list[Point], experiment_id: str, dataset: str) -> pd.DataFrame:
    """The ``experiments`` rows of a curve (see the module docstring). ``points`` in any order."""
    points = sorted(points, key=lambda pt: pt.precision)
    means = [per_user_means(pt.per_user) for pt in points]
    out = []
    for i, pt in enumerate(points):
        m = pt.metrics[~pt.metrics["variant"].str.contains("@")]  # all users, or teacher-only variants
        ref = _ref_key(pt.reference)
        for (b, v, proto, split), g in m.groupby(["backbone", "variant", "protocol", "split"], sort=False):
            key = (b, v, proto)
            for metric in METRIC_NAMES:
                row = {
                    "experiment_id": experiment_id, "kind": KIND, "dataset": dataset,
                    "precision": float(pt.precision), "run_id": pt.run_id, "teacher_model": pt.teacher_model,
                    "backbone": b, "variant": v, "protocol": proto, "split": split, "metric": metric,
                    "mean": float(g[metric].mean()),
                    "std": float(g[metric].std(ddof=1)) if len(g) > 1 else 0.0,
                    "n_seeds": int(g["seed"].nunique()), "n_users": int(g["n_users"].max()),
                    "reference": pt.reference, "leakage": LEAKAGE_NOTE,
                }
                pairs = {"text": None, "reference": None, "p0": None, "prev": None}
                if split == "test" and metric == CHECK_METRIC:
                    x = means[i].get(key)
                    pairs = {
                        "text": paired(x, means[i].get((b, "text", proto))) if v != "text" else (0.0, 0.0),
                        "reference": paired(x, means[i].get((*ref, proto))) if ref else None,
                        "p0": paired(x, means[0].get(key)),
                        "prev": paired(x, means[i - 1].get(key)) if i > 0 else None,
                    }
                for name, val in pairs.items():
                    d, se = val if val is not None else (None, None)
                    row[f"diff_vs_{name}"], row[f"se_vs_{name}"] = d, se
                out.append(row)
    return pd.DataFrame(out)


# ------------------------------------------------------------------------------------------ checks
def _test_rows(rows: pd.DataFrame, protocol: str = "full") -> pd.DataFrame:
    return rows[(rows.split == "test") & (rows.metric == CHECK_METRIC) & (rows.protocol == protocol)]


def curve_checks(rows: pd.DataFrame, protocol: str = "full") -> list[dict]:
    """The channel's acceptance figures, each ``{check, variant, backbone, precision, value, bound, ok}``.

    1. lowest p: no rationale variant below ``text`` by more than 1 paired SE (noise never hurts);
    2. teacher variants rise: each step at least the one below, within 1 paired SE;
    3. p = 0.25: teacher variants beat the no-LLM reference by at least 2 paired SE;
    4. p = 1: teacher variants reach NDCG@10 >= 0.5;
    5. student variants stay within 1 paired SE of their lowest-p value at every p (leakage check).
    """
    t = _test_rows(rows, protocol)
    if t.empty:
        return []
    p_lo = float(t.precision.min())
    out = []

    def add(check, r, value, bound, ok):
        out.append({"check": check, "backbone": r.backbone, "variant": r.variant, "precision": float(r.precision),
                    "value": None if value is None else float(value), "bound": float(bound), "ok": bool(ok)})

    for r in t.itertuples(index=False):
        if r.diff_vs_text is None or pd.isna(r.diff_vs_text):
            continue
        if r.precision == p_lo and r.variant in RATIONALE_VARIANTS:
            add("no harm at lowest p: diff vs text >= -1 SE", r, r.diff_vs_text, -r.se_vs_text,
                r.diff_vs_text >= -r.se_vs_text)
    for r in t.itertuples(index=False):
        if r.variant in TEACHER_VARIANTS:
            if r.precision > p_lo and r.diff_vs_prev is not None and not pd.isna(r.diff_vs_prev):
                add("teacher rises: diff vs previous p >= -1 SE", r, r.diff_vs_prev, -r.se_vs_prev,
                    r.diff_vs_prev >= -r.se_vs_prev)
            if abs(r.precision - 0.25) < 1e-9 and r.diff_vs_reference is not None and not pd.isna(r.diff_vs_reference):
                add("p=0.25: diff vs no-LLM reference >= 2 SE", r, r.diff_vs_reference, 2 * r.se_vs_reference,
                    r.diff_vs_reference >= 2 * r.se_vs_reference)
            if abs(r.precision - 1.0) < 1e-9:
                add("p=1: NDCG@10 >= 0.5", r, r.mean, 0.5, r.mean >= 0.5)
        if r.variant in (*STUDENT_VARIANTS, "text_matching") and r.precision > p_lo \
                and r.diff_vs_p0 is not None and not pd.isna(r.diff_vs_p0):
            se = r.se_vs_p0 if r.se_vs_p0 else 0.0
            add("student flat: |diff vs lowest p| <= 1 SE (leakage check)", r, r.diff_vs_p0, se, abs(r.diff_vs_p0) <= se)
    return out


# ------------------------------------------------------------------------------------------ tables
def curve_table(rows: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """p x variant of test NDCG@10 (mean over seeds) for one protocol, variants as columns."""
    t = _test_rows(rows, protocol)
    if t.empty:
        return pd.DataFrame()
    lab = np.where(t.backbone == "none", t.variant, t.backbone + "/" + t.variant)
    return t.assign(label=lab).pivot_table(index="precision", columns="label", values="mean", sort=False)


def format_curve(rows: pd.DataFrame) -> str:
    lines = [f"!! {LEAKAGE_NOTE}"]
    t = _test_rows(rows, "full")
    if t.empty:
        return "\n".join([*lines, "(no results)"])
    users = t.groupby("precision")["n_users"].max()
    for proto in ("full", "sampled100"):
        tab = curve_table(rows, proto)
        if tab.empty:
            continue
        cols = list(tab.columns)
        w = max(12, *(len(c) for c in cols))
        lines.append(f"\ntest NDCG@10, {proto} ranking, mean over seeds (users per point in brackets)")
        lines.append(f"{'p':>5} {'users':>6} " + " ".join(f"{c:>{w}}" for c in cols))
        for p, r in tab.iterrows():
            cells = " ".join(f"{'-' if pd.isna(r[c]) else f'{r[c]:.4f}':>{w}}" for c in cols)
            lines.append(f"{p:>5g} {int(users.get(p, 0)):>6} {cells}")
    return "\n".join(lines)


def format_checks(checks: list[dict]) -> str:
    if not checks:
        return "(no checks: nothing measured)"
    lines = [f"{'ok':<4} {'check':<60} {'variant':<24} {'p':>5} {'value':>9} {'bound':>9}"]
    for c in checks:
        lab = c["variant"] if c["backbone"] == "none" else f"{c['backbone']}/{c['variant']}"
        val = "-" if c["value"] is None else f"{c['value']:+.4f}"
        lines.append(f"{'yes' if c['ok'] else 'NO':<4} {c['check']:<60} {lab:<24} {c['precision']:>5g} "
                     f"{val:>9} {c['bound']:>+9.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ running
def _point(ctx, p: float, teacher_model: str, result, seconds: float) -> Point:
    lake = ctx.lake
    metrics = lake.read_pandas("metrics", filters=[("run_id", "=", ctx.run_id)])
    per_user = pd.read_parquet(result.extra["per_user_file"])
    return Point(p, teacher_model, ctx.run_id, metrics, per_user, result.extra.get("paired_reference"), seconds,
                 int(result.extra.get("teacher_rationale_users") or 0))


def point_run_id(experiment_id: str, p: float, taken: set[str]) -> str:
    """``<experiment>-p<p with 3 decimals>``, never one already in ``taken`` (a resumed experiment adds points)."""
    rid = f"{experiment_id}-p{p:.3f}"
    n = 1
    while rid in taken:
        n += 1
        rid = f"{experiment_id}-p{p:.3f}-r{n}"
    return rid


def reusable_points(lake, experiment_ids: list[str], precisions: list[float], base_name: str,
                    recommender_config: str, shared_versions: dict[str, int | None]
                    ) -> tuple[dict[float, Point], list[str]]:
    """Finished points of earlier runs of these experiments that this run may reuse, and why others are not.

    A point is reused only when everything it was computed from is what this run would use: the planted
    teacher of that precision, the same recommender config (compared as JSON), the same versions of the
    shared inputs (``shared_versions``: the tables the shared stages wrote), its metrics rows in the lake and
    its per-user file on disk. Anything else is recomputed, with the reason logged and returned.
    """
    if not experiment_ids or not lake.exists("recommender_runs"):
        return {}, []
    runs = lake.read_pandas("recommender_runs", columns=["run_id", "config", "notes", "input_versions",
                                                         "finished_ts"])
    want = {planted_model_name(base_name, p): p for p in precisions}
    cfg_now = json.loads(recommender_config)
    found: dict[float, Point] = {}
    why: list[str] = []
    for eid in experiment_ids:
        mine = runs[runs.run_id.str.startswith(f"{eid}-p")].sort_values("finished_ts", ascending=False)
        if mine.empty:
            why.append(f"{eid}: no finished point in recommender_runs")
        for r in mine.itertuples(index=False):
            notes = json.loads(r.notes or "{}")
            p = want.get(notes.get("teacher_model"))
            if p is None or p in found:
                continue
            versions = json.loads(r.input_versions or "{}")
            stale = {t: (versions.get(t), v) for t, v in shared_versions.items() if versions.get(t) != v}
            per_user_file = Path(notes.get("artifacts", "")) / "per_user_test.parquet"
            cfg_then = json.loads(r.config)
            if cfg_then != cfg_now:
                diff = sorted(k for k in cfg_now.keys() | cfg_then.keys() if cfg_then.get(k) != cfg_now.get(k))
                why.append(f"{r.run_id} (p={p:g}): recommender config differs ({', '.join(diff)})")
            elif stale:
                why.append(f"{r.run_id} (p={p:g}): shared inputs changed since (table: (then, now)) {stale}")
            elif not per_user_file.exists():
                why.append(f"{r.run_id} (p={p:g}): per-user file {per_user_file} is gone")
            else:
                metrics = lake.read_pandas("metrics", filters=[("run_id", "=", r.run_id)])
                if metrics.empty:
                    why.append(f"{r.run_id} (p={p:g}): no metrics rows")
                    continue
                found[p] = Point(p, notes["teacher_model"], r.run_id, metrics, pd.read_parquet(per_user_file),
                                 notes.get("paired_reference"),
                                 users=int((notes.get("data") or {}).get("teacher_rationale_users") or 0))
    return found, why


def run_planted(ctx, precisions: list[float], config_for: Callable[[list[str]], object],
                start: str | None = None, progress: Callable[[str], None] | None = None,
                resume: list[str] | None = None) -> PlantedExperiment:
    """Run the curve on ``ctx.lake``: shared stages once, then the per-precision stages.

    ``config_for(overrides)`` builds the run's config with extra ``key=value`` overrides (the CLI's
    profile, file and ``--set`` first). ``resume``: experiment ids whose finished points are reused where
    nothing they were computed from changed (:func:`reusable_points`); the experiment keeps the first id.
    Writes the experiment's rows of the ``experiments`` table in one commit (replacing that id's rows).
    """
    from slimrec.config import ConfigError
    from slimrec.pipeline import run_pipeline, run_stage
    from slimrec.stages.base import StageContext

    say = progress or (lambda msg: None)
    precisions = sorted({float(p) for p in precisions})
    if not precisions or any(not 0 <= p <= 1 for p in precisions):
        raise ConfigError(f"--precisions must be numbers in [0, 1]; got {precisions}")
    resume = [r.strip() for r in (resume or []) if r.strip()]
    bad = [r for r in resume if not re.fullmatch(r"[A-Za-z0-9_.-]+", r)]
    if bad:
        raise ConfigError(f"--resume takes experiment ids such as planted-1a2b3c4d; got {bad}")
    exp_id = resume[0] if resume else f"planted-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    say("shared stages (ingest .. embed)")
    run_pipeline(ctx, start, "embed", progress=lambda i, n, name: say(f"  [{i + 1}/{n}] {name}"))
    seconds = {"shared": round(time.perf_counter() - t0, 1)}
    n_users = ctx.lake.read_arrow("user_sequences", columns=["user_id"]).num_rows
    base_name = ctx.cfg.teacher.offline.model_name
    shared = {t: ctx.lake.version(t) for t in SHARED_TABLES}
    reuse, why = reusable_points(ctx.lake, resume, precisions, base_name,
                                 config_for([]).recommender.model_dump_json(), shared)
    for w in why:
        say(f"  not reused: {w}")
    taken = set(ctx.lake.read_pandas("metrics", columns=["run_id"]).run_id) if ctx.lake.exists("metrics") else set()
    points = []
    for k, p in enumerate(precisions):
        t1 = time.perf_counter()
        name = planted_model_name(base_name, p)
        if p in reuse:
            say(f"precision {p:g} ({k + 1}/{len(precisions)}): reused {reuse[p].run_id}")
            points.append(reuse[p])
            continue
        say(f"precision {p:g} ({k + 1}/{len(precisions)}): {name}")
        cfg_p = config_for(precision_overrides(p, n_users, base_name))
        ctx_p = StageContext(cfg=cfg_p, lake=ctx.lake, run_date=ctx.run_date,
                             run_id=point_run_id(exp_id, p, taken), _spark=ctx._spark, _spark_owned=False)
        result = None
        for stage in PER_P_STAGES:
            say(f"  {stage}")
            result = run_stage(stage, ctx_p)
        seconds[f"p={p:g}"] = round(time.perf_counter() - t1, 1)
        points.append(_point(ctx_p, p, name, result, seconds[f"p={p:g}"]))
    rows = experiment_rows(points, exp_id, ctx.cfg.dataset_name)
    seconds["total"] = round(time.perf_counter() - t0, 1)
    info = ctx.commit_info("experiment", {"user_sequences": ctx.lake.version("user_sequences")},
                           experiment_id=exp_id, kind=KIND, precisions=precisions, seconds=seconds,
                           reused={f"{p:g}": pt.run_id for p, pt in reuse.items()}, leakage=LEAKAGE_NOTE)
    ctx.lake.write_arrow("experiments", rows, "merge", info, delete_missing=f"t.experiment_id = '{exp_id}'")
    return PlantedExperiment(exp_id, ctx.cfg.dataset_name, rows, curve_checks(rows), seconds,
                            {pt.precision: pt.users for pt in points})


def write_pages(exp: PlantedExperiment, out_dir: str | Path, command: str) -> dict[str, Path]:
    """``experiment-<id>.{md,json,html}``: the curve (both protocols), the checks, the plot; flagged as leakage."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"experiment-{exp.experiment_id}"
    head = (f"# Rationale channel: planted-signal curve ({exp.experiment_id})\n\n**{LEAKAGE_NOTE}.**\n\n"
            f"dataset {exp.dataset}; command `{command}`; seconds {exp.seconds}\n")
    md = (f"{head}\n```\n{format_curve(exp.rows)}\n```\n\nChecks (full ranking, test NDCG@10, paired SE per user):\n\n"
          f"```\n{format_checks(exp.checks)}\n```\n")
    paths = {"md": stem.with_suffix(".md"), "json": stem.with_suffix(".json"), "html": stem.with_suffix(".html")}
    paths["md"].write_text(md)
    paths["json"].write_text(json.dumps({"experiment_id": exp.experiment_id, "leakage": LEAKAGE_NOTE,
                                         "command": command, "seconds": exp.seconds, "checks": exp.checks,
                                         "rows": exp.rows.to_dict("records")}, default=str, indent=1))
    from slimrec.report_html import planted_page

    paths["html"].write_text(planted_page(exp.rows, exp.checks, head, format_curve(exp.rows), format_checks(exp.checks)))
    return paths
