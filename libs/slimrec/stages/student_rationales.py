"""Stage student_rationales: prompts + student_models (+ items) -> student_rationales, incrementally.

1. Model: ``student.model_version`` (``latest``: the newest registered row of
   ``student_models``) gives the base model and adapter path.
2. Population: the latest prompt of each user dated on or before the run date;
   with ``retrieval.student_users=seed_pool`` only the users of the seed pool
   (:func:`slimrec.retrieval.in_seed_pool`), the others get theirs from
   ``retrieve_rationales`` after ``embed``.
3. Anti-join (:func:`plan_users`): a user needs a rationale when no row of
   ``student_rationales`` that the student wrote has this ``(user_id,
   prompt_hash, model_version)``, i.e. when the prompt or the model changed
   since the last run (rows whose status is ``failed`` are retried when
   ``infer.retry_failed``; a retrieved row never counts as written).
4. Ray Data: prompts sorted by length, one block per generate batch, through
   an actor pool of :class:`~slimrec.student.generate.TransformersGenerator`
   (CPU default, fractional CPUs per actor) or
   :class:`~slimrec.student.generate.VllmGenerator` (GPUs, ``infer.engine=vllm``).
   With ``infer.constrained`` (the default) both engines decode under the
   grammar of :mod:`slimrec.rationale_shape`, built here from the ``items``
   table (:func:`constraint`): three steps within their length bounds, step 3
   naming only catalogue titles, ``max_new_tokens`` derived from the bounds.
5. Each answer is split into its steps (:func:`~slimrec.student.generate.parse_outputs`;
   a bad answer is a status, never an exception), step-3 titles are grounded
   to catalogue item_ids (exactly when constrained, fuzzily otherwise), and
   every ``infer.write_batch_rows`` rows are MERGEd
   on (user_id, run_date, model_version): a crash loses at most the rows in
   flight, and a rerun generates only what is still missing.

``ctx.dry_run``: users to generate, token bound and GPU-hour estimate; no
model is loaded. Command: ``slim stage student_rationales --lake lake`` (or
``python jobs/student_rationales.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass

import pandas as pd

from slimrec.pipeline import StageError
from slimrec.rationale_shape import CatalogueTitles
from slimrec.stages.base import StageContext, StageResult, delete_rows_naming_unknown_items
from slimrec.student.config import StudentConfig

log = logging.getLogger(__name__)

STAGE = "student_rationales"
INPUTS = ["prompts", "student_models", "items"]
OUTPUTS = ["student_rationales"]
PROMPT_COLUMNS = ["user_id", "run_date", "student_prompt", "prompt_hash"]
EXISTING_COLUMNS = ["user_id", "prompt_hash", "model_version", "status", "rationale_source"]


def select_model(models: pd.DataFrame, model_version: str) -> dict:
    """The ``student_models`` row to use: ``latest`` (newest ``created_ts``) or the named version."""
    if models.empty:
        raise StageError("student_models is empty: run distill_student first")
    if model_version == "latest":
        return models.sort_values(["created_ts", "model_version"]).iloc[-1].to_dict()
    hit = models[models["model_version"] == model_version]
    if hit.empty:
        known = ", ".join(sorted(models["model_version"]))
        raise StageError(f"student model {model_version!r} is not registered; known: {known}")
    return hit.iloc[0].to_dict()


def latest_prompts(prompts: pd.DataFrame, run_date) -> pd.DataFrame:
    """Latest prompt per user dated on or before ``run_date``.

    Example: u1 has prompts on 01-10 and 01-15, u2 on 01-12; run_date 01-14 -> u1@01-10, u2@01-12.
    """
    p = prompts[pd.to_datetime(prompts["run_date"]) <= pd.Timestamp(run_date)]
    return p.sort_values(["user_id", "run_date"]).drop_duplicates("user_id", keep="last").reset_index(drop=True)


def seed_pool(prompts: pd.DataFrame, rcfg) -> tuple[pd.DataFrame, dict]:
    """The prompts the student writes for under ``retrieval`` (:class:`slimrec.config.RetrievalConfig`), and
    what to report: all of them, or those of the seed pool."""
    if rcfg.student_users != "seed_pool":
        return prompts, {"student_users": "all"}
    from slimrec.retrieval import in_seed_pool

    pool = in_seed_pool(prompts["user_id"], rcfg.seed_pool_share, rcfg.seed)
    log.info("student_rationales: seed pool of %d of %d users (share %.2f, seed %d); the others are retrieved "
             "by retrieve_rationales", int(pool.sum()), len(prompts), rcfg.seed_pool_share, rcfg.seed)
    return prompts[pool].reset_index(drop=True), {"student_users": "seed_pool", "users_with_a_prompt": len(prompts),
                                                  "seed_pool_users": int(pool.sum())}


def plan_users(prompts: pd.DataFrame, existing: pd.DataFrame, model_version: str, retry_failed: bool) -> pd.DataFrame:
    """Prompts whose (user_id, prompt_hash, model_version) has no row the student wrote yet (or only failed
    rows, when retried).

    ``prompts``: one row per user (``user_id``, ``prompt_hash``, ...);
    ``existing``: :data:`EXISTING_COLUMNS` of ``student_rationales`` (``rationale_source`` null: the student).

    Example: existing (u1, h1, m1, ok), (u2, h2, m1, failed), (u4, h4, m1, ok, retrieved); prompts u1@h1,
    u2@h2, u3@h3, u4@h4 under m1 -> u2, u3, u4 (u2 only with retry_failed); under m2 -> all four.
    """
    done = existing[existing["model_version"] == model_version]
    if "rationale_source" in done.columns:
        done = done[done["rationale_source"].fillna("student") != "retrieved"]
    if retry_failed:
        done = done[done["status"] != "failed"]
    keys = set(zip(done["user_id"], done["prompt_hash"], strict=True))
    mask = [(u, h) not in keys for u, h in zip(prompts["user_id"], prompts["prompt_hash"], strict=True)]
    return prompts[mask].reset_index(drop=True)


def to_rows(parsed: pd.DataFrame, grounded: list[list[str]], model_version: str) -> pd.DataFrame:
    """Parsed answers (:func:`~slimrec.student.generate.parse_outputs`) + grounded ids -> table rows."""
    return pd.DataFrame(
        {
            "user_id": parsed["user_id"].astype(str).to_numpy(),
            "model_version": model_version,
            "prompt_hash": parsed["prompt_hash"].to_numpy(),
            "rationale": parsed["rationale"].to_numpy(),
            "step1": parsed["step1"].to_numpy(),
            "step2": parsed["step2"].to_numpy(),
            "step3": parsed["step3"].to_numpy(),
            "grounded_item_ids": grounded,
            "status": parsed["status"].to_numpy(),
            "error": parsed["error"].to_numpy(),
            "output_tokens": parsed["output_tokens"].astype("int64").to_numpy(),
            "latency_ms": parsed["latency_ms"].astype("float64").to_numpy(),
            "rationale_source": "student",
            "retrieved_from": None,
        }
    )


@dataclass(frozen=True)
class Constraint:
    """What constrained decoding needs from the driver: the grammar text, its token bound, the titles it names.

    ``ebnf`` counts the words of steps 1 and 2 itself (vLLM gets it); ``ebnf_uncounted`` leaves them to the
    decoder, which counts them with a :class:`~slimrec.rationale_shape.WordBudget` of ``shape``
    (transformers: the same answers for less memory and time, see :func:`~slimrec.rationale_shape.grammar_ebnf`).
    """

    ebnf: str
    max_new_tokens: int
    titles: CatalogueTitles
    build_seconds: float
    ebnf_uncounted: str
    shape: dict

    def actor_kwargs(self, engine: str) -> dict:
        """The grammar arguments of an ``engine`` actor: vLLM's counts words itself, transformers' counts them
        (:class:`~slimrec.student.generate.TransformersGenerator`'s ``shape``)."""
        if engine == "vllm":
            return {"grammar": self.ebnf, "max_new_tokens": self.max_new_tokens}
        return {"grammar": self.ebnf_uncounted, "max_new_tokens": self.max_new_tokens, "shape": self.shape}


def constraint(cfg: StudentConfig, items: pd.DataFrame) -> Constraint:
    """The grammar of this run's rationales over the ``items`` table (``item_id``, ``title``)."""
    from slimrec.rationale_shape import grammar_ebnf, max_new_tokens
    from slimrec.student.config import rationale_shape

    t0 = time.perf_counter()
    shape = rationale_shape(cfg)
    titles = CatalogueTitles(items, cfg.infer.title_max_chars)
    ebnf = grammar_ebnf(shape, titles.titles)
    uncounted = grammar_ebnf(shape, titles.titles, count_words=False)
    bound = max_new_tokens(shape, titles.titles)
    if cfg.infer.engine == "vllm" and cfg.max_prompt_tokens + bound > cfg.vllm.max_model_len:
        raise StageError(f"student_rationales: prompt ({cfg.max_prompt_tokens}) + the grammar's longest rationale "
                         f"({bound} tokens) exceed vllm.max_model_len={cfg.vllm.max_model_len}; raise it or lower "
                         "student.infer.step1_max_words / step2_max_words / word_max_chars / max_items")
    secs = time.perf_counter() - t0
    log.info("student_rationales: grammar over %d catalogue titles (%d items cannot be named), %s, "
             "max_new_tokens %d, %d EBNF chars, built in %.2f s", len(titles), titles.dropped, shape, bound,
             len(ebnf), secs)
    return Constraint(ebnf, bound, titles, secs, uncounted, dataclasses.asdict(shape))


def _generator(cfg: StudentConfig, model: dict, con: Constraint | None = None):
    """(callable class, constructor kwargs, Ray resources) for the configured engine."""
    infer = cfg.infer.model_dump(mode="json")
    if cfg.infer.constrained and con is None:
        raise StageError("student_rationales: infer.constrained=true needs the grammar (stages.student_rationales"
                         ".constraint)")
    grammar = con.actor_kwargs(cfg.infer.engine) if cfg.infer.constrained else {}
    if cfg.infer.engine == "vllm":
        from slimrec.student.generate import VllmGenerator, vllm_max_lora_rank

        rank = int(json.loads(model["lora_config"]).get("r", 16))
        try:  # checked here, on the driver: a bad rank is one clear error, not a dead actor pool
            vllm_max_lora_rank(rank)
        except ValueError as e:
            raise StageError(f"student_rationales: {e}") from None
        kwargs = dict(base_path=model["base_model"], adapter_path=model["adapter_path"], infer=infer,
                      vllm_cfg=cfg.vllm.model_dump(mode="json"), max_prompt_tokens=cfg.max_prompt_tokens,
                      lora_rank=rank, **grammar)
        gpus = cfg.infer.gpus_per_actor or float(cfg.vllm.tensor_parallel_size)
        return VllmGenerator, kwargs, {"num_cpus": cfg.infer.cpus_per_actor, "num_gpus": gpus}
    from slimrec.student.generate import TransformersGenerator

    kwargs = dict(base_path=model["base_model"], adapter_path=model["adapter_path"], infer=infer,
                  max_prompt_tokens=cfg.max_prompt_tokens, **grammar)
    res = {"num_cpus": cfg.infer.cpus_per_actor}
    if cfg.infer.gpus_per_actor:
        res["num_gpus"] = cfg.infer.gpus_per_actor
    return TransformersGenerator, kwargs, res


def generate_dataset(todo: pd.DataFrame, cfg: StudentConfig, model: dict, con: Constraint | None = None):
    """Ray Dataset of raw answers for ``todo`` (sorted by prompt length; one block per generate batch)."""
    import ray

    todo = todo.assign(_len=todo["student_prompt"].str.len()).sort_values("_len").drop(columns="_len")
    bs = cfg.infer.batch_size
    blocks = [todo.iloc[i : i + bs].reset_index(drop=True) for i in range(0, len(todo), bs)]
    cls, kwargs, res = _generator(cfg, model, con)
    ds = ray.data.from_pandas(blocks)
    return ds.map_batches(
        cls,
        fn_constructor_kwargs=kwargs,
        batch_size=bs,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=cfg.infer.num_actors),
        **res,
    )


def _grounder(items: pd.DataFrame):
    from slimrec.teacher.grounding import TitleIndex

    return TitleIndex(items) if len(items) else None


def run(ctx: StageContext) -> StageResult:
    from slimrec.student.generate import parse_outputs

    cfg: StudentConfig = ctx.cfg.student
    lake = ctx.lake
    inputs = ctx.input_versions(INPUTS)
    if inputs["student_models"] is None:
        raise StageError("student_rationales needs a registered student model; run distill_student first")
    model = select_model(lake.read_pandas("student_models", version=inputs["student_models"]), cfg.model_version)
    version = model["model_version"]
    prompts = latest_prompts(lake.read_pandas("prompts", version=inputs["prompts"], columns=PROMPT_COLUMNS), ctx.run_date)
    prompts, pool_extra = seed_pool(prompts, ctx.cfg.retrieval)
    deleted_version = None
    if lake.exists(STAGE) and not ctx.dry_run:
        # rationales grounded in items that a re-ingest removed from the catalogue go (any date, any
        # model): their users count as missing below and are generated again
        _, deleted_version = delete_rows_naming_unknown_items(ctx, STAGE, ["user_id", "run_date", "model_version"],
                                                              inputs)
    existing = (lake.read_pandas(STAGE, columns=EXISTING_COLUMNS, filters=[("model_version", "=", version)])
                if lake.exists(STAGE) else pd.DataFrame(columns=EXISTING_COLUMNS))
    todo = plan_users(prompts, existing, version, cfg.infer.retry_failed)
    extra: dict = {"model_version": version, "users": len(prompts), "users_to_generate": len(todo),
                   "users_unchanged": len(prompts) - len(todo), "engine": cfg.infer.engine, **pool_extra}
    log.info("student_rationales: model %s, %d users with a prompt, %d to generate, %d unchanged",
             version, len(prompts), len(todo), len(prompts) - len(todo))
    items = (lake.read_pandas("items", version=inputs["items"], columns=["item_id", "title"])
             if inputs["items"] is not None else pd.DataFrame(columns=["item_id", "title"]))
    con = constraint(cfg, items) if cfg.infer.constrained else None
    if con is not None:
        extra.update(constrained=True, grammar_titles=len(con.titles), grammar_items_unnameable=con.titles.dropped,
                     grammar_ebnf_chars=len(con.ebnf), grammar_build_seconds=round(con.build_seconds, 2),
                     max_new_tokens=con.max_new_tokens)
    else:
        extra.update(constrained=False, max_new_tokens=cfg.infer.max_new_tokens)
    if ctx.dry_run or todo.empty:
        bound = len(todo) * extra["max_new_tokens"]
        extra.update(est_output_tokens_max=bound, est_gpu_hours_at_10k_tok_s=round(bound / 1e4 / 3600, 4))
        return StageResult(STAGE, tables={STAGE: deleted_version} if deleted_version is not None else {},
                           rows_in=len(prompts), skipped=todo.empty and not ctx.dry_run, extra=extra)

    if con is not None:
        from slimrec.student.constrain import ConstraintUnavailable, require_xgrammar

        try:  # on the driver, before any actor starts: constrained decoding never silently becomes unconstrained
            require_xgrammar()
        except ConstraintUnavailable as e:
            raise StageError(f"student_rationales: {e}") from None
    grounder = con.titles if con is not None else _grounder(items)
    ctx.ray()
    info = ctx.commit_info(STAGE, inputs, model_version=version)
    t0 = time.perf_counter()
    statuses: Counter = Counter()
    written, tokens, table_version, buf = 0, 0, deleted_version, []

    def flush() -> None:
        nonlocal written, tokens, table_version, buf
        raw = pd.concat(buf, ignore_index=True)
        buf = []
        parsed = parse_outputs(raw)
        names = parsed["item_names"].tolist()
        if con is not None:  # constrained: a named title is a catalogue title, grounded exactly
            ground = grounder.ground(names)
        else:
            ground = grounder.ground(names, cfg.infer.grounding_min_score) if grounder else [[] for _ in names]
        rows = to_rows(parsed, ground, version)
        table_version = lake.write_arrow(STAGE, rows, "merge", info)
        written += len(rows)
        tokens += int(rows["output_tokens"].sum())
        statuses.update(rows["status"])
        el = time.perf_counter() - t0
        log.info("student_rationales: %d/%d rows written (%.0f output tokens/s, statuses %s)",
                 written, len(todo), tokens / max(el, 1e-9), dict(statuses))

    for out in generate_dataset(todo, cfg, model, con).iter_batches(batch_size=None, batch_format="pandas"):
        buf.append(out)
        if sum(len(b) for b in buf) >= cfg.infer.write_batch_rows:
            flush()
    if buf:
        flush()
    secs = time.perf_counter() - t0
    extra.update(rows_written=written, statuses=dict(statuses), output_tokens=tokens,
                 generate_seconds=round(secs, 1), output_tokens_per_s=round(tokens / max(secs, 1e-9), 1))
    return StageResult(STAGE, tables={STAGE: table_version}, rows_in=len(prompts), rows_out=written, extra=extra)
