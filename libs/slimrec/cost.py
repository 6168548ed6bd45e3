"""What each stage cost, and what each LLM variant's NDCG@10 gain cost.

Measured (:class:`StageMeter`, around a stage's ``run`` and its quality gate, by
:func:`slimrec.pipeline.run_stage`):

* ``wall_s``: wall clock of the stage and its gate; ``run_wall_s``: the stage alone.
* ``cpu_driver_s``: user + system CPU of the driver process (``getrusage(RUSAGE_SELF)``), all threads.
* ``cpu_children_s``: user + system CPU of the driver's process tree. Spark's JVM is a child of the
  driver (spark-submit execs java) and lives across stages; a local Ray's gcs_server and raylet are
  children of the driver (``ray.init`` starts them with Popen) and its workers are children of the
  raylet, so all of them are descendants. They are sampled with psutil every ``cost.sample_interval_s``
  (each process's own times, counted from its value at the stage's start); a child the driver reaps
  adds what sampling missed through ``getrusage(RUSAGE_CHILDREN)``. A process that ends between two
  samples and is reaped by another descendant (a Ray worker, reaped by the raylet) loses at most one
  interval. Remote executors and workers (``spark.master`` not ``local``, ``ray_address`` set) are
  not on this machine and are not counted: ``unmeasured`` says so.
* ``gpus`` x ``run_wall_s`` = ``gpu_hours``: the GPUs the stage's config reserves (actors x GPUs per
  actor, or training workers with ``use_gpu``) over the stage's wall time. An allocation, not a
  utilisation: a GPU that idles while the actors start counts all the same.

Usage comes from the stage's own figures: teacher calls, tokens and the API's dollars; the student's
generations and output tokens; the embed stage's texts. A skipped stage costs nothing and says so.

The run's figures go into its run record (``_runs/<run_id>.json``, ``stage_costs``) and each finished
stage's into its stage record (``_stages/<stage>.json``: ``cost``, that run, and ``cost_total``, summed
over the finished runs since the stage's config last changed), beside what those records already say
about the run; :func:`variant_costs` charges each LLM variant the stages it needs (:data:`CHARGED`).
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

# The stages each variant needs beyond the `text` variant it is compared with. Embed is charged only for
# the share of its texts that were that source's rationales (items are what `text` needs too).
TEACHER_STAGES = ("teacher_rationales", ("embed", "teacher"))
STUDENT_STAGES = ("teacher_rationales", "distill_student", "student_rationales", ("embed", "student"),
                  "retrieve_rationales")
LLM_STAGES = ("teacher_rationales", "distill_student", "student_rationales", "embed", "retrieve_rationales")
# Stages that only do something under a setting (retrieve_rationales: retrieval.student_users=seed_pool): a lake
# with no record of one never ran it, so it is charged nothing instead of being reported as not measured.
RUN_ONLY_WHEN_ASKED = ("retrieve_rationales",)
CHARGED: dict[str, tuple] = {
    "teacher": TEACHER_STAGES,
    "teacher_cooc": TEACHER_STAGES,
    "slim": STUDENT_STAGES,
    "slim_cooc": STUDENT_STAGES,
    # text_matching: whichever source recommender.text_matching_source names (see charged_stages)
}
# What the gain table charges, said under it in every report.
COST_NOTE = ("Gain = test NDCG@10 (full ranking, mean over seeds) minus the same backbone's `text`. A `teacher` "
             "variant is charged the teacher stage and the teacher's share of embed's texts; a `slim` variant the "
             "teacher, distill_student, student_rationales, the student's share of embed and retrieve_rationales, "
             "where it ran (text_matching: its source's). The teacher's dollars are the cost_usd of its answers in "
             "teacher_rationales; compute is each stage's CPU- or GPU-hours summed over its finished runs since its config last changed, priced "
             "by cost.cpu_hour_usd / cost.gpu_hour_usd.")
# Summed across runs in a stage record's cost_total.
_SUMMED = ("wall_s", "run_wall_s", "cpu_driver_s", "cpu_children_s", "cpu_hours", "gpu_hours", "calls",
           "input_tokens", "output_tokens", "texts", "api_usd")


def _tree_times() -> dict[tuple[int, float], tuple[float, bool]]:
    """{(pid, create time): (own user + system CPU seconds, is a direct child)} of the driver's descendants."""
    import psutil

    me = psutil.Process()
    out = {}
    for p in me.children(recursive=True):
        try:
            with p.oneshot():
                t = p.cpu_times()
                out[(p.pid, p.create_time())] = (t.user + t.system, p.ppid() == me.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def _rusage_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


@dataclass
class StageMeter:
    """Context manager: wall and CPU seconds of the driver and its process tree while it is open.

    ``mark_run_end()`` notes where the stage's own work ended (before its quality gate).
    """

    interval_s: float = 2.0
    figures: dict[str, Any] = field(default_factory=dict)

    def __enter__(self) -> StageMeter:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._run_end: float | None = None
        self._self0, self._children0 = _rusage_s(resource.RUSAGE_SELF), _rusage_s(resource.RUSAGE_CHILDREN)
        self._base = _tree_times()
        self._last = dict(self._base)
        self._thread = threading.Thread(target=self._loop, name="slimrec-stage-meter", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> dict:
        now = _tree_times()
        with self._lock:
            self._last.update(now)
        return now

    def mark_run_end(self) -> None:
        self._run_end = time.perf_counter()

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join()
        alive = self._sample()
        end = time.perf_counter()
        tree = sum(cpu - self._base.get(k, (0.0, False))[0] for k, (cpu, _) in self._last.items())
        # Children the driver reaped count in RUSAGE_CHILDREN with their whole life; what sampling saw of
        # them is already in `tree`, so only the rest is added (never below 0).
        reaped = _rusage_s(resource.RUSAGE_CHILDREN) - self._children0
        seen_reaped = sum(cpu for k, (cpu, direct) in self._last.items() if direct and k not in alive)
        self.figures = {
            "wall_s": round(end - self._t0, 3),
            "run_wall_s": round((self._run_end or end) - self._t0, 3),
            "cpu_driver_s": round(_rusage_s(resource.RUSAGE_SELF) - self._self0, 3),
            "cpu_children_s": round(max(tree, 0.0) + max(reaped - seen_reaped, 0.0), 3),
            "processes": len(self._last),
        }
        return False


def gpus_allocated(cfg, stage: str) -> float:
    """GPUs ``stage`` reserves under ``cfg`` (a PipelineConfig) while it works: actors x GPUs per actor, or
    training workers when they ask for a GPU. 0 for the teacher (a remote API or the offline teacher)."""
    s = cfg.student
    if stage == "student_rationales":
        per = s.infer.gpus_per_actor or (float(s.vllm.tensor_parallel_size) if s.infer.engine == "vllm" else 0.0)
        return per * s.infer.num_actors
    if stage == "distill_student":
        return float(s.train.num_workers) if s.train.use_gpu else 0.0
    if stage == "embed":
        return cfg.embed.actor_num_gpus * cfg.embed.num_actors
    if stage == "train_recommender":
        r = cfg.recommender
        return float(r.num_workers if r.use_ray else 1) if r.use_gpu else 0.0
    return 0.0


def unmeasured(cfg) -> list[str]:
    """What the CPU figures leave out under ``cfg``: processes on other machines."""
    out = []
    if not cfg.spark.master.startswith("local"):
        out.append(f"Spark executors of {cfg.spark.master}")
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        out.append(f"Ray workers of {cfg.ray_address or os.environ.get('RAY_ADDRESS')}")
    return out


def usage(stage: str, extra: dict) -> dict:
    """Calls, tokens, texts and API dollars out of a stage's ``StageResult.extra`` (None: not applicable).

    Example: teacher ``{"calls": 3, "input_tokens": 900, "output_tokens": 300, "cost_usd": 0.01}`` ->
    the same four figures (``api_usd`` 0.01); student ``{"rows_written": 5, "output_tokens": 400}`` ->
    calls 5, output_tokens 400.
    """
    u: dict[str, Any] = {"calls": None, "input_tokens": None, "output_tokens": None, "texts": None, "api_usd": None}
    if stage == "teacher_rationales":
        u.update(calls=extra.get("calls"), input_tokens=extra.get("input_tokens"),
                 output_tokens=extra.get("output_tokens"), api_usd=extra.get("cost_usd"))
    elif stage == "student_rationales":
        u.update(calls=extra.get("rows_written", 0), output_tokens=extra.get("output_tokens", 0))
    elif stage == "embed":
        u.update(texts=extra.get("texts_encoded"))
        if "texts_by_source" in extra:
            u["texts_by_source"] = dict(extra["texts_by_source"])
    return u


def stage_cost(result, measured: dict, cfg, run_date=None) -> dict:
    """The cost record of one stage run: ``measured`` (:class:`StageMeter` figures) plus usage and GPUs."""
    gpus = 0.0 if result.skipped else gpus_allocated(cfg, result.stage)
    cpu = measured.get("cpu_driver_s", 0.0) + measured.get("cpu_children_s", 0.0)
    rec = {
        "stage": result.stage,
        "status": "skipped" if result.skipped else "ran",
        "run_date": None if run_date is None else str(run_date),
        **measured,
        "cpu_hours": round(cpu / 3600, 6),
        "gpus": gpus,
        "gpu_hours": round(gpus * measured.get("run_wall_s", 0.0) / 3600, 6),
        **usage(result.stage, result.extra),
        "unmeasured": unmeasured(cfg),
        "note": result.extra.get("reason", ""),
    }
    return rec


def skipped_cost(stage: str, why: str, run_date=None) -> dict:
    """A skipped stage's record: zero everywhere, and why it was skipped."""
    return {"stage": stage, "status": "skipped", "run_date": None if run_date is None else str(run_date),
            "wall_s": 0.0, "run_wall_s": 0.0, "cpu_driver_s": 0.0, "cpu_children_s": 0.0, "processes": 0,
            "cpu_hours": 0.0, "gpus": 0.0, "gpu_hours": 0.0, "calls": None, "input_tokens": None,
            "output_tokens": None, "texts": None, "api_usd": None, "unmeasured": [],
            "note": f"skipped ({why}): costs nothing"}


def add_totals(previous: dict | None, cost: dict) -> dict:
    """``cost`` added to ``previous`` (a stage record's ``cost_total``, or None to start anew).

    Example: ``{"runs": 1, "cpu_hours": 0.5, "calls": None}`` + ``{"cpu_hours": 0.25, "calls": 4}`` ->
    ``{"runs": 2, "cpu_hours": 0.75, "calls": 4}``.
    """
    out: dict[str, Any] = {"runs": 1, "since": cost.get("run_date")}
    if previous:
        out = {"runs": int(previous.get("runs", 0)) + 1, "since": previous.get("since")}
    for k in _SUMMED:
        a, b = (previous or {}).get(k), cost.get(k)
        out[k] = None if a is None and b is None else round((a or 0) + (b or 0), 6)
    by = dict((previous or {}).get("texts_by_source") or {})
    for src, n in (cost.get("texts_by_source") or {}).items():
        by[src] = by.get(src, 0) + int(n)
    if by:
        out["texts_by_source"] = by
    return out


def compute_usd(row: dict, prices) -> float:
    """CPU-hours x ``cost.cpu_hour_usd`` + GPU-hours x ``cost.gpu_hour_usd`` (``prices``: a CostConfig)."""
    return (row.get("cpu_hours") or 0.0) * prices.cpu_hour_usd + (row.get("gpu_hours") or 0.0) * prices.gpu_hour_usd


def cost_table(costs: list[dict], prices) -> pd.DataFrame:
    """One row per stage record (:func:`stage_cost` / :func:`skipped_cost`): stage, status, calls,
    input/output tokens, texts, wall_s, cpu_hours, gpu_hours, api_usd, compute_usd, usd (API + compute),
    note; then a ``total`` row. Prices: ``prices`` (a CostConfig), for the compute dollars."""
    cols = ["stage", "status", "calls", "input_tokens", "output_tokens", "texts", "wall_s", "cpu_hours",
            "gpu_hours", "api_usd", "compute_usd", "usd", "note"]
    rows = []
    for c in costs:
        comp = compute_usd(c, prices)
        note = c.get("note") or ""
        if c.get("unmeasured"):
            note = "; ".join([note, "not counted: " + ", ".join(c["unmeasured"])]).strip("; ")
        rows.append({"stage": c["stage"], "status": c["status"], "calls": c.get("calls"),
                     "input_tokens": c.get("input_tokens"), "output_tokens": c.get("output_tokens"),
                     "texts": c.get("texts"), "wall_s": c.get("wall_s", 0.0), "cpu_hours": c.get("cpu_hours", 0.0),
                     "gpu_hours": c.get("gpu_hours", 0.0), "api_usd": c.get("api_usd"),
                     "compute_usd": comp, "usd": (c.get("api_usd") or 0.0) + comp, "note": note})
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows, columns=cols)
    total = {"stage": "total", "status": "", "note": ""}
    for k in ("calls", "input_tokens", "output_tokens", "texts", "api_usd"):
        total[k] = None if df[k].isna().all() else float(df[k].fillna(0).sum())
    for k in ("wall_s", "cpu_hours", "gpu_hours", "compute_usd", "usd"):
        total[k] = float(df[k].sum())
    return pd.concat([df, pd.DataFrame([total], columns=cols)], ignore_index=True)


def charged_stages(variant: str, text_matching_source: str = "student") -> tuple:
    """The stages ``variant`` (``slim``, ``slim@teacher_users``, ...) is charged for, () for no-LLM variants."""
    base = variant.split("@", 1)[0]
    if base == "text_matching":
        return STUDENT_STAGES if text_matching_source == "student" else TEACHER_STAGES
    return CHARGED.get(base, ())


@dataclass(frozen=True)
class Charges:
    """What the lake holds about each stage's cost: ``totals[stage]`` (a stage record's ``cost_total``,
    or None: not measured yet) and the teacher's dollars and usage from ``teacher_rationales``."""

    totals: dict[str, dict | None]
    teacher_usd: float = 0.0
    teacher_calls: int = 0
    teacher_input_tokens: int = 0
    teacher_output_tokens: int = 0


def lake_charges(lake, cfg) -> Charges:
    """:class:`Charges` from ``lake``: stage records for compute, ``teacher_rationales`` for the teacher's money.

    The teacher's dollars are the sum of ``cost_usd`` over the rows the rationale variants read (the
    teacher that ``embed.teacher_model`` names, or every teacher but a planted experiment's): each row's
    cost already adds up every attempt of its prompt, failed ones included, in any run.
    """
    totals = {s: ((lake.stage_record(s) or {}).get("cost_total")) for s in LLM_STAGES}
    if not lake.exists("teacher_rationales"):
        return Charges(totals)
    t = lake.read_pandas("teacher_rationales", columns=["teacher_model", "attempts", "input_tokens",
                                                         "output_tokens", "cost_usd"])
    if cfg.embed.teacher_model is None:
        from slimrec.teacher.planted import drop_planted

        t = drop_planted(t, "teacher_model")
    else:
        t = t[t["teacher_model"] == cfg.embed.teacher_model]
    return Charges(totals, float(t["cost_usd"].fillna(0).sum()), int(t["attempts"].fillna(0).sum()),
                   int(t["input_tokens"].fillna(0).sum()), int(t["output_tokens"].fillna(0).sum()))


def _share(total: dict, source: str) -> float | None:
    """Share of the embed stage's texts that were ``source``'s rationales; None when not recorded."""
    by = (total or {}).get("texts_by_source")
    if not by or not sum(by.values()):
        return None
    return by.get(source, 0) / sum(by.values())


def charge(stages: tuple, charges: Charges, prices) -> dict:
    """Dollars and hours of ``stages`` (:data:`CHARGED` entries): the teacher's API dollars from the table,
    each stage's compute from its ``cost_total`` (the embed stage's at its source's share of texts).

    Returns usd, cpu_hours, gpu_hours and ``missing`` (stages with no measured figures yet: left out)."""
    usd, cpu, gpu, missing = 0.0, 0.0, 0.0, []
    for s in stages:
        stage, source = (s, None) if isinstance(s, str) else s
        if stage == "teacher_rationales":
            usd += charges.teacher_usd
        total = charges.totals.get(stage)
        if total is None:
            if stage not in RUN_ONLY_WHEN_ASKED:  # never ran: it cost nothing; any other stage is unmeasured
                missing.append(stage)
            continue
        share = 1.0 if source is None else _share(total, source)
        if share is None:  # a record from before the per-source split: the whole stage
            share = 1.0
        cpu += (total.get("cpu_hours") or 0.0) * share
        gpu += (total.get("gpu_hours") or 0.0) * share
    usd += cpu * prices.cpu_hour_usd + gpu * prices.gpu_hour_usd
    return {"usd": usd, "cpu_hours": cpu, "gpu_hours": gpu, "missing": missing}


def _stage_names(stages: tuple) -> str:
    return " + ".join(s if isinstance(s, str) else f"{s[0]} ({s[1]} share)" for s in stages)


def variant_costs(summary: pd.DataFrame, charges: Charges, prices, text_matching_source: str = "student") -> pd.DataFrame:
    """Per (backbone, LLM variant): test NDCG@10 (full ranking, mean over seeds) minus the same backbone's
    ``text``, the dollars and hours charged (:func:`charge`) and the gain per $1,000 and per hour.

    ``summary``: :func:`slimrec.results.metrics_summary` of the metrics rows. The hour is a GPU-hour when
    the charged stages reserved GPUs, else a CPU-hour (``hour_unit``). Per-$ and per-hour figures are NaN
    where nothing was charged. A variant with an ``@subset`` suffix is compared with ``text@subset``.

    Example: text 0.030, slim 0.036 -> gain 0.006; charged $12 and 3 CPU-hours -> 0.5 per $1,000 and
    0.002 per CPU-hour.
    """
    cols = ["backbone", "variant", "ndcg_10", "text_ndcg_10", "gain", "charged", "usd", "hours", "hour_unit",
            "gain_per_1k_usd", "gain_per_hour", "note"]
    if summary.empty:
        return pd.DataFrame(columns=cols)
    full = summary[summary["protocol"] == "full"]
    ndcg = {(b, v): m for b, v, m in zip(full["backbone"], full["variant"], full["ndcg_10_mean"], strict=True)}
    rows = []
    for (b, v), m in ndcg.items():
        stages = charged_stages(v, text_matching_source)
        if not stages:
            continue
        suffix = v.split("@", 1)[1] if "@" in v else None
        text = "text" if suffix is None else f"text@{suffix}"
        # an ID-agnostic variant (text_matching, no backbone) is set against each backbone's text
        refs = [(b, ndcg[(b, text)])] if (b, text) in ndcg else [(tb, x) for (tb, tv), x in ndcg.items() if tv == text]
        c = charge(stages, charges, prices)
        gpu = c["gpu_hours"] > 0
        hours = c["gpu_hours"] if gpu else c["cpu_hours"]
        for tb, ref in refs or [(None, None)]:
            gain = float("nan") if ref is None else m - ref
            note = []
            if ref is None:
                note.append("no text row to compare with")
            elif tb != b:
                note.append(f"against {tb}'s text")
            if c["missing"]:
                note.append("not measured yet: " + ", ".join(c["missing"]))
            rows.append({"backbone": b, "variant": v, "ndcg_10": m, "text_ndcg_10": ref, "gain": gain,
                         "charged": _stage_names(stages), "usd": c["usd"], "hours": hours,
                         "hour_unit": "GPU-hour" if gpu else "CPU-hour",
                         "gain_per_1k_usd": gain / c["usd"] * 1000 if c["usd"] > 0 else float("nan"),
                         "gain_per_hour": gain / hours if hours > 0 else float("nan"), "note": "; ".join(note)})
    return pd.DataFrame(rows, columns=cols)


def run_cost_tables(lake, results: list, cfg, summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(this run's cost per stage, :func:`cost_table` of the results' ``extra["cost"]``; each LLM variant's gain
    over ``text`` per $1,000 and per hour, :func:`variant_costs`, charged from the lake)."""
    stages = cost_table([r.extra["cost"] for r in results if "cost" in r.extra], cfg.cost)
    variants = variant_costs(summary, lake_charges(lake, cfg), cfg.cost, cfg.recommender.text_matching_source)
    return stages, variants


def dry_run_table(estimates: dict[str, dict], records: dict[str, dict | None], prices) -> pd.DataFrame:
    """The dry run's table: per stage, what the lake's state says it would do now (``estimates[stage]``:
    the dry-run ``StageResult.extra``, or ``{"reason": ...}`` when it cannot estimate) beside the figures
    of its last finished run (``records[stage]``: the stage record's ``cost``, None: not measured yet).

    Columns: stage, mode (the teacher's chat / batch pricing), calls, input_tokens, output_tokens, texts,
    api_usd (estimate), last_run (date), last_wall_s, last_cpu_hours, last_gpu_hours, last_usd, note.
    """
    rows = []
    for stage, est in estimates.items():
        last = records.get(stage)
        seen = {"last_run": None, "last_wall_s": None, "last_cpu_hours": None, "last_gpu_hours": None,
                "last_usd": None}
        if last:
            seen = {"last_run": last.get("run_date"), "last_wall_s": last.get("wall_s"),
                    "last_cpu_hours": last.get("cpu_hours"), "last_gpu_hours": last.get("gpu_hours"),
                    "last_usd": (last.get("api_usd") or 0.0) + compute_usd(last, prices)}
        note = est.get("reason", "") if "reason" in est else ""
        if not last:
            note = "; ".join(x for x in (note, "not measured yet") if x)
        base = {"stage": stage, "mode": "", "calls": None, "input_tokens": None, "output_tokens": None,
                "texts": None, "api_usd": None, **seen, "note": note}
        if stage == "teacher_rationales" and "estimate" in est:
            e = est["estimate"]
            tok = {"calls": e["calls"], "input_tokens": e["input_tokens"], "output_tokens": e["output_tokens"]}
            modes = e.get("modes") or {e["api"]: {"cost_usd": e["cost_usd"]}}
            for mode, m in modes.items():
                rows.append({**base, **tok, "mode": mode + (" (configured)" if mode == e["api"] and len(modes) > 1
                                                             else ""), "api_usd": m["cost_usd"],
                             "note": note if m["cost_usd"] is not None else "; ".join(
                                 x for x in (note, f"no price for {e['teacher_model']} in teacher.prices") if x)})
            continue
        if stage == "student_rationales" and "users_to_generate" in est:
            base.update(calls=est["users_to_generate"], output_tokens=est.get("est_output_tokens_max"),
                        note="; ".join(x for x in ("output tokens: the grammar's bound", note) if x))
        elif stage == "distill_student" and "est_train_tokens_per_epoch" in est:
            base.update(input_tokens=est["est_train_tokens_per_epoch"] * est.get("epochs", 1),
                        note="; ".join(x for x in (f"{est.get('train_pairs', 0)} training pairs x "
                                                   f"{est.get('epochs', 1)} epochs (tokens trained on)", note) if x))
        elif stage == "embed" and "texts_encoded" in est:
            base.update(texts=est["texts_encoded"])
        rows.append(base)
    return pd.DataFrame(rows)


def _n(x, fmt: str = ",.0f") -> str:
    return "-" if x is None or x != x else format(x, fmt)


def format_cost_table(table: pd.DataFrame, prices) -> str:
    """The run's cost table as text (:func:`cost_table`)."""
    if table.empty:
        return "(no stage ran)"
    lines = [f"compute priced at {prices.cpu_hour_usd:g} USD per CPU-hour and {prices.gpu_hour_usd:g} per GPU-hour "
             "(cost.*; GPU-hours = GPUs reserved x wall time, an allocation)",
             f"{'stage':<20} {'status':<8} {'calls':>8} {'in tokens':>11} {'out tokens':>11} {'texts':>8} "
             f"{'wall s':>8} {'CPU-h':>8} {'GPU-h':>8} {'API $':>9} {'compute $':>9} {'total $':>9}  note"]
    for r in table.itertuples(index=False):
        lines.append(f"{r.stage:<20} {r.status:<8} {_n(r.calls):>8} {_n(r.input_tokens):>11} "
                     f"{_n(r.output_tokens):>11} {_n(r.texts):>8} {r.wall_s:>8.1f} {r.cpu_hours:>8.4f} "
                     f"{r.gpu_hours:>8.4f} {_n(r.api_usd, '.4f'):>9} {r.compute_usd:>9.4f} {r.usd:>9.4f}  {r.note}")
    return "\n".join(lines)


def format_variant_costs(table: pd.DataFrame) -> str:
    """Gain over ``text`` per $1,000 and per hour (:func:`variant_costs`) as text."""
    if table.empty:
        return "(no LLM variant in the latest train_recommender run)"
    w = max(16, int(table["variant"].str.len().max()))
    lines = [f"{'backbone':<9} {'variant':<{w}} {'NDCG@10':>8} {'text':>8} {'gain':>8} {'$ charged':>10} "
             f"{'hours':>9} {'unit':<8} {'gain/$1k':>9} {'gain/hour':>10}  charged stages; note"]
    for r in table.itertuples(index=False):
        lines.append(f"{r.backbone:<9} {r.variant:<{w}} {r.ndcg_10:>8.4f} {_n(r.text_ndcg_10, '.4f'):>8} "
                     f"{_n(r.gain, '+.4f'):>8} {r.usd:>10.4f} {r.hours:>9.4f} {r.hour_unit:<8} "
                     f"{_n(r.gain_per_1k_usd, '+.4f'):>9} {_n(r.gain_per_hour, '+.4f'):>10}  {r.charged}"
                     + (f"; {r.note}" if r.note else ""))
    return "\n".join(lines)


def format_dry_run(table: pd.DataFrame) -> str:
    """The dry run's table (:func:`dry_run_table`) as text."""
    lines = [f"{'stage':<20} {'mode':<17} {'calls':>8} {'in tokens':>11} {'out tokens':>11} {'texts':>8} "
             f"{'est. API $':>10} | {'last run':<10} {'wall s':>8} {'CPU-h':>8} {'GPU-h':>8} {'$':>9}  note"]
    for r in table.itertuples(index=False):
        lines.append(f"{r.stage:<20} {r.mode:<17} {_n(r.calls):>8} {_n(r.input_tokens):>11} "
                     f"{_n(r.output_tokens):>11} {_n(r.texts):>8} {_n(r.api_usd, '.4f'):>10} | "
                     f"{r.last_run or '-':<10} {_n(r.last_wall_s, '.1f'):>8} {_n(r.last_cpu_hours, '.4f'):>8} "
                     f"{_n(r.last_gpu_hours, '.4f'):>8} {_n(r.last_usd, '.4f'):>9}  {r.note}")
    return "\n".join(lines)
