"""The ``slim`` command line.

``slim ingest``, ``slim stage NAME``, ``slim run``, ``slim refresh``,
``slim replay``, ``slim validate``, ``slim tables``, ``slim report``, ``slim experiment planted``. Every command takes ``--lake DIR`` and the
config options ``--profile``, ``--config FILE`` and ``--set key=value``.
Known errors print one line (``error: ...``) and exit 2; an unexpected one
prints one line and the path of a log file holding the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import sys
import traceback
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="slimrec: SLIM as a batch pipeline on Spark, Ray and Delta.",
                  epilog="Example: slim run --dataset data/amazon_office_2014 --lake lake --profile dev")
log = logging.getLogger("slimrec")

LakeOpt = Annotated[str, typer.Option("--lake", help="lake root folder (one Delta table per sub-folder)")]
ProfileOpt = Annotated[str, typer.Option("--profile", help="config profile: tiny | dev | prod")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file with config overrides")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override one config field: key.path=value (repeatable)")]
DateOpt = Annotated[str | None, typer.Option("--run-date", help="logical date YYYY-MM-DD (default: today, UTC)")]


def _setup_logging(verbose: bool = False) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("py4j", "urllib3", "httpx", "filelock", "great_expectations", "ray", "asyncio", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for h in logging.getLogger().handlers:
        h.addFilter(_quiet_py4j_retry)


def _quiet_py4j_retry(record: logging.LogRecord) -> bool:
    """py4j logs a retried (and then successful) JVM call on the root logger at INFO, with a traceback."""
    return not (record.levelno < logging.WARNING and "py4j" in record.pathname)


def _parse_date(value: str | None) -> date:
    if value is None:
        return datetime.now(tz=UTC).date()
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"--run-date {value!r} is not YYYY-MM-DD") from None


def _known_errors() -> tuple[type[BaseException], ...]:
    from slimrec.config import ConfigError
    from slimrec.ingest import IngestError
    from slimrec.lake import LakeError
    from slimrec.pipeline import StageError
    from slimrec.quality import QualityError

    return (ConfigError, IngestError, LakeError, StageError, QualityError)


def _fail(exc: BaseException, lake: str | None) -> None:
    if isinstance(exc, _known_errors()):
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    from slimrec.lake import local_root_for

    logdir = local_root_for(lake or ".") / "_logs"  # an object-store lake's local folder
    logdir.mkdir(parents=True, exist_ok=True)
    path = logdir / f"error-{date.today().isoformat()}-{os.getpid()}.log"
    path.write_text("".join(traceback.format_exception(exc)))
    typer.echo(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (traceback in {path})", err=True)
    raise typer.Exit(1)


def _machine() -> str:
    """Host name, CPU model and count, memory: what a results page says a figure was measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        mem = ""
    return f"{platform.node()}: {os.cpu_count()} CPUs{' (' + model + ')' if model else ''}{mem}, {platform.system()}"


def _command_line() -> str:
    argv = sys.argv
    return shlex.join(["slim", *argv[1:]]) if Path(argv[0]).name == "slim" else shlex.join(argv)


def _context(lake: str, profile: str, config: Path | None, sets: list[str] | None, run_date: str | None,
             dataset: str | None = None, dry_run: bool = False, force: bool = False):
    from slimrec.config import load_config
    from slimrec.lake import Lake
    from slimrec.stages.base import StageContext

    overrides = list(sets or [])
    cfg = load_config(profile, config, overrides)
    ctx = StageContext(cfg=cfg, lake=Lake.from_config(lake, cfg.lake),
                       run_date=_parse_date(run_date), dry_run=dry_run, force=force,
                       dataset_dir=dataset)
    from slimrec.tracking import redacted_config

    # secret-like values (a storage key in spark.extra_conf, a password in a URL) never reach the log
    log.info("config (profile %s, hash %s): %s", profile, cfg.config_hash(),
             json.dumps(redacted_config(cfg), sort_keys=True))
    return ctx


def _record_run(ctx, profile: str) -> None:
    """Keep the command line and machine of this run id in the lake (the results page names them beside
    the run's figures). Called once the lake lock is held: a run refused by the lock writes nothing."""
    if not ctx.dry_run:
        ctx.lake.record_run(ctx.run_id, {"command": _command_line(), "machine": _machine(), "profile": profile,
                                         "started": datetime.now(tz=UTC).isoformat(timespec="seconds")})


def _close(ctx) -> None:
    """Stop the command's Spark session, unless it joined one that was already running in this process
    (an embedding application or a test session keeps its own)."""
    if ctx is not None and ctx._spark is not None and ctx._spark_owned:
        ctx._spark.stop()


def _echo_tracking(mlflow_run_id: str | None, ctx) -> None:
    """Name the MLflow run a command logged (slimrec.tracking); a failure was already logged as a warning."""
    if mlflow_run_id:
        from slimrec.tracking import redact_uri, resolve_uri

        uri = redact_uri(resolve_uri(ctx.cfg.tracking, ctx.lake.local_root) or "")
        typer.echo(f"mlflow: run {mlflow_run_id} in experiment {ctx.cfg.tracking.experiment} at {uri}")


class _Command:
    """Around a command's body: any failure becomes one line (:func:`_fail`), and Spark is stopped."""

    def __init__(self, lake: str | None):
        self.lake, self.ctx = lake, None

    def __enter__(self) -> _Command:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        _close(self.ctx)
        if isinstance(exc, Exception) and not isinstance(exc, (typer.Exit, typer.BadParameter)):
            # raises typer.Exit with the one-line message; the traceback goes to the lake's local folder
            _fail(exc, str(self.ctx.lake.local_root) if self.ctx is not None else self.lake)
        return False


@app.command(epilog="Example: slim ingest --dataset data/amazon_office_2014 --lake lake")
def ingest(
    dataset: Annotated[str, typer.Option("--dataset", help="folder with the source files")],
    lake: LakeOpt = "lake",
    format: Annotated[str, typer.Option("--format", help="auto | lcrec | amazon | events")] = "auto",
    profile: ProfileOpt = "dev",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_date: DateOpt = None,
    verbose: bool = False,
):
    """Read a dataset folder into raw_*, items, interactions (bad rows to quarantine)."""
    _setup_logging(verbose)
    with _Command(lake) as cmd:
        ctx = cmd.ctx = _context(lake, profile, config, [*(set_ or []), f"ingest.format={format}"], run_date, dataset=dataset)
        from slimrec.pipeline import run_stage

        with ctx.lake.lock():
            r = run_stage("ingest", ctx)
        typer.echo(f"ingest: {r.rows_in} rows read, {r.rows_out} interactions, {r.extra.get('items')} items, "
                   f"{r.extra.get('quarantined')} quarantined -> {ctx.lake.root}")


@app.command(epilog="Example: slim stage teacher_rationales --lake lake --dry-run")
def stage(
    name: Annotated[str, typer.Argument(help="ingest | build_sequences | build_prompts | teacher_rationales | "
                                             "distill_student | student_rationales | embed | retrieve_rationales | "
                                             "train_recommender")],
    lake: LakeOpt = "lake",
    run_date: DateOpt = None,
    profile: ProfileOpt = "dev",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="dataset folder (ingest only)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan and estimate; write nothing")] = False,
    no_check: Annotated[bool, typer.Option("--no-check", help="skip the quality gate after the stage")] = False,
    verbose: bool = False,
):
    """Run one stage, then its quality gate."""
    _setup_logging(verbose)
    with _Command(lake) as cmd:
        ctx = cmd.ctx = _context(lake, profile, config, set_, run_date, dataset=dataset, dry_run=dry_run)
        from slimrec.pipeline import run_stage

        with ctx.lake.lock():
            _record_run(ctx, profile)
            r = run_stage(name, ctx, check=not no_check)
        cost = r.extra.pop("cost", None)
        typer.echo(f"{name}: rows in {r.rows_in}, rows out {r.rows_out}, tables {r.tables}, {r.extra}")
        if cost is not None:
            from slimrec.cost import cost_table, format_cost_table

            typer.echo(format_cost_table(cost_table([cost], ctx.cfg.cost).iloc[:1], ctx.cfg.cost))
        if dry_run:
            from slimrec.cost import dry_run_table, format_dry_run

            last = (ctx.lake.stage_record(name) or {}).get("cost")
            typer.echo("\n" + format_dry_run(dry_run_table({name: r.extra}, {name: last}, ctx.cfg.cost)))


@app.command(epilog="Example: slim run --dataset data/amazon_office_2014 --lake lake --profile dev")
def run(
    dataset: Annotated[str | None, typer.Option(
        "--dataset", help="folder with the source files (leave out to rerun an ingested lake from build_sequences)")] = None,
    lake: LakeOpt = "lake",
    profile: ProfileOpt = "dev",
    start: Annotated[str | None, typer.Option("--from", help="first stage to run")] = None,
    stop: Annotated[str | None, typer.Option("--to", help="last stage to run")] = None,
    run_date: DateOpt = None,
    force: Annotated[bool, typer.Option("--force", help="run stages even when their inputs are unchanged")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    report_dir: Annotated[str, typer.Option("--report-dir", help="where the run report files go")] = "reports",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the cost table (estimates from the lake as it "
                                                            "is, last measured figures per stage); run nothing")] = False,
    verbose: bool = False,
):
    """Run every stage in order with the quality gate after each; print and write the run report; log the run
    to MLflow (tracking.mlflow_uri; default lake/_mlflow/mlflow.db, null turns it off)."""
    _setup_logging(verbose)
    with _Command(lake) as cmd:
        if dry_run:
            _dry_run(cmd, lake, profile, config, set_, run_date, start, stop)
            return
        ctx = cmd.ctx = _context(lake, profile, config, set_, run_date, dataset=dataset, force=force)
        if dataset is None and start in (None, "ingest"):
            from slimrec.ingest import IngestError

            if not ctx.lake.exists("interactions"):  # through the lake's configured storage settings
                raise IngestError(f"{lake} holds no ingested data: pass --dataset DIR")
            typer.echo(f"no --dataset: {lake} is already ingested, so the run starts at build_sequences", err=True)
            start = "build_sequences"
        from slimrec.pipeline import run_pipeline
        from slimrec.report import (
            format_metrics,
            format_missing,
            format_paired,
            format_stages,
            latest_metrics,
            latest_missing,
            latest_paired,
            metrics_summary,
            paired_title,
            stage_table,
            write_report,
        )
        from slimrec.tracking import check_tracking, track_command

        check_tracking(ctx.cfg.tracking, ctx.lake.local_root)  # before hours of work, not after

        def progress(i, n, name):
            typer.echo(f"[{i + 1}/{n}] {name}", err=True)

        with ctx.lake.lock():
            _record_run(ctx, profile)
            results = run_pipeline(ctx, start, stop, progress=progress)
        typer.echo("\n" + format_stages(stage_table(results)))
        typer.echo("\nResults (test target, mean±std over seeds; full ranking over all items minus the user's "
                   "history first, 100 sampled negatives beside it):")
        typer.echo(format_metrics(metrics_summary(latest_metrics(ctx.lake))))
        if missing := latest_missing(ctx.lake):
            typer.echo(format_missing(missing))
        paired = latest_paired(ctx.lake)
        typer.echo(f"\n{paired_title(paired)}; paired per user, test NDCG@10 averaged over seeds:")
        typer.echo(format_paired(paired))
        _echo_costs(ctx, results)
        paths = write_report(ctx.lake, results, report_dir, ctx.run_id, ctx.run_date, cfg=ctx.cfg)
        typer.echo(f"\nreport: {', '.join(str(p) for p in paths.values())}")
        _echo_tracking(track_command(ctx, "run", paths), ctx)


def _echo_costs(ctx, results) -> None:
    """Print this run's cost per stage and each LLM variant's gain over text per $1,000 and per hour."""
    from slimrec.cost import COST_NOTE, format_cost_table, format_variant_costs, run_cost_tables
    from slimrec.results import latest_metrics, metrics_summary

    costs, variants = run_cost_tables(ctx.lake, results, ctx.cfg, metrics_summary(latest_metrics(ctx.lake)))
    typer.echo("\nCost per stage (this run):\n" + format_cost_table(costs, ctx.cfg.cost))
    typer.echo(f"\nGain over text per $1,000 and per hour. {COST_NOTE}\n" + format_variant_costs(variants))


def _dry_run(cmd: _Command, lake, profile, config, sets, run_date, start, stop) -> None:
    """``slim run --dry-run``: the cost table before anything is spent (nothing is written, no lock taken)."""
    from slimrec.cost import COST_NOTE, format_dry_run, format_variant_costs, lake_charges, variant_costs
    from slimrec.pipeline import dry_run_costs
    from slimrec.results import latest_metrics, metrics_summary

    ctx = cmd.ctx = _context(lake, profile, config, sets, run_date, dry_run=True)
    table = dry_run_costs(ctx, start, stop)
    t = ctx.cfg.teacher
    typer.echo(f"Dry run (teacher {t.kind}{', http.api=' + t.http.api if t.kind == 'http' else ''}): estimates "
               "from the lake as it is now; the last measured run of each stage on the right (cost.cpu_hour_usd "
               f"{ctx.cfg.cost.cpu_hour_usd:g}, cost.gpu_hour_usd {ctx.cfg.cost.gpu_hour_usd:g}):")
    typer.echo(format_dry_run(table))
    variants = variant_costs(metrics_summary(latest_metrics(ctx.lake)), lake_charges(ctx.lake, ctx.cfg),
                             ctx.cfg.cost, ctx.cfg.recommender.text_matching_source)
    typer.echo(f"\nGain over text per $1,000 and per hour, from the lake's latest run. {COST_NOTE}\n"
               + format_variant_costs(variants))


@app.command(epilog="Example: slim refresh --run-date 2024-02-01 --events replay/events-2024-02-01.csv "
                          "--lake lake")
def refresh(
    events: Annotated[str, typer.Option("--events", help="the day's events file (CSV/Parquet: user, item, timestamp)")],
    lake: LakeOpt = "lake",
    run_date: DateOpt = None,
    retrain: Annotated[bool, typer.Option("--retrain", help="fit a new recommender instead of rescoring")] = False,
    profile: ProfileOpt = "dev",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    report_dir: Annotated[str, typer.Option("--report-dir", help="where the run report files go")] = "reports",
    verbose: bool = False,
):
    """Daily refresh: merge the day's events, redo only what they change, rescore affected users; log the
    refresh to MLflow (tracking.mlflow_uri)."""
    _setup_logging(verbose)
    with _Command(lake) as cmd:
        ctx = cmd.ctx = _context(lake, profile, config, set_, run_date)
        from slimrec.refresh import refresh as do_refresh
        from slimrec.report import format_stages, stage_table, write_report
        from slimrec.tracking import check_tracking, track_command

        check_tracking(ctx.cfg.tracking, ctx.lake.local_root)

        with ctx.lake.lock():
            _record_run(ctx, profile)
            results = do_refresh(ctx, events, retrain=retrain,
                                 progress=lambda i, n, name: typer.echo(f"[{i + 1}/{n}] {name}", err=True))
        typer.echo("\n" + format_stages(stage_table(results)))
        _echo_costs(ctx, results)
        paths = write_report(ctx.lake, results, report_dir, ctx.run_id, ctx.run_date, cfg=ctx.cfg)
        typer.echo(f"\nreport: {', '.join(str(p) for p in paths.values())}")
        _echo_tracking(track_command(ctx, "refresh", paths), ctx)


@app.command(epilog="Example: slim replay --lake lake-src --out replay --days 3 --share 0.2")
def replay(
    lake: LakeOpt = "lake",
    out: Annotated[str, typer.Option("--out", help="folder for base/ and events-YYYY-MM-DD.csv files")] = "replay",
    days: Annotated[int, typer.Option("--days", help="number of later days")] = 3,
    share: Annotated[float, typer.Option("--share", help="share of eligible users whose last events arrive later")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="random seed")] = 0,
    start_date: Annotated[str, typer.Option("--start-date", help="date of the first later day")] = "2024-02-01",
):
    """Cut an ingested lake into a base data set plus daily event files, to demo and test `slim refresh`."""
    _setup_logging()
    with _Command(lake):
        from slimrec.lake import Lake
        from slimrec.replay import write_replay

        counts = write_replay(Lake(lake), out, days, share, seed, _parse_date(start_date))
        typer.echo(f"replay: base {counts['base_events']:,} events for {counts['users']:,} users -> {out}/base; "
                   + "; ".join(f"{d}: {v['events']} events, {v['users']} users" for d, v in counts["days"].items()))


@app.command(epilog="Example: slim validate user_sequences --lake lake --docs gx-docs")
def validate(
    table: Annotated[str, typer.Argument(help="table name, e.g. user_sequences")],
    lake: LakeOpt = "lake",
    version: Annotated[int | None, typer.Option("--version", help="Delta version (default: latest)")] = None,
    docs: Annotated[str | None, typer.Option("--docs", help="render Great Expectations Data Docs (HTML) here")] = None,
    profile: ProfileOpt = "dev",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: bool = False,
):
    """Validate a table (the slice its last, or the given, version wrote). Exit 0 on pass, 1 on failure."""
    _setup_logging(verbose)
    with _Command(lake) as cmd:
        ctx = cmd.ctx = _context(lake, profile, config, set_, None)
        from slimrec.quality import validate_table, write_dq_results

        report = validate_table(ctx.lake, table, cfg=ctx.cfg, spark=ctx.spark(), version=version, docs_dir=docs,
                                run_id=ctx.run_id)
        typer.echo(report.summary())
        if not report.missing:
            write_dq_results(ctx.lake, report)
        if not report.success:
            raise typer.Exit(1)


@app.command(epilog="Example: slim tables --lake lake")
def tables(lake: LakeOpt = "lake"):
    """List the lake's tables: Delta version, rows, last commit time and stage."""
    _setup_logging()
    from rich.console import Console
    from rich.table import Table

    from slimrec.lake import Lake

    with _Command(lake):
        rows = Lake(lake).tables()
    if not rows:
        typer.echo(f"no tables under {lake}")
        raise typer.Exit(0)
    t = Table("table", "version", "rows", "last commit (UTC)", "stage", "run date")
    for r in rows:
        t.add_row(r["table"], str(r["version"]), f"{r['rows']:,}", r["last_commit"] or "", r["stage"] or "", r["run_date"] or "")
    # piped or redirected output has no terminal width: never cut a table name there
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(t)


@app.command(epilog="Example: slim report --lake lake")
def report(
    lake: LakeOpt = "lake",
    out: Annotated[str, typer.Option("--out", help="the results page to write")] = "docs/results.md",
    readme: Annotated[str, typer.Option("--readme", help="README whose results markers get the small table")] = (
        "README.md"),
    no_readme: Annotated[bool, typer.Option("--no-readme", help="write only --out; leave the README")] = False,
):
    """Regenerate the results page (docs/results.md) and the README's results table from the lake's latest
    train_recommender run: date, command, machine, mean ± std over seeds, both protocols, paired differences."""
    _setup_logging()
    with _Command(lake):
        from slimrec.lake import Lake
        from slimrec.results_page import write_results

        paths = write_results(Lake(lake), out, None if no_readme else readme, label=lake)
        typer.echo(f"results: {', '.join(map(str, paths))}")


experiment_app = typer.Typer(no_args_is_help=True, help="Experiments on the pipeline (never defaults; flagged "
                                                        "wherever their numbers appear).",
                             epilog="Example: slim experiment planted --lake lake --precisions 0,0.5,1")
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("planted", epilog="Example: slim experiment planted --lake lake --precisions 0,0.5,1")
def experiment_planted(
    dataset: Annotated[str | None, typer.Option(
        "--dataset", help="folder with the source files (leave out to use an ingested lake)")] = None,
    lake: LakeOpt = "lake",
    profile: ProfileOpt = "dev",
    precisions: Annotated[str, typer.Option("--precisions", help="comma-separated planted precisions in [0, 1]")] = (
        "0,0.1,0.25,0.5,1"),
    run_date: DateOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    report_dir: Annotated[str, typer.Option("--report-dir", help="where the experiment's pages go")] = "reports",
    resume: Annotated[str | None, typer.Option(
        "--resume", help="comma-separated experiment ids: reuse their finished points where the config and the "
                         "shared inputs are unchanged, run the rest; the experiment keeps the first id")] = None,
    verbose: bool = False,
):
    """Rationale-channel curve with a planted-signal teacher (LEAKS TARGETS BY DESIGN: an experiment, not a
    result). With probability p a user's teacher rationale also names that user's held-out items; the shared
    stages run once, then teacher_rationales (every user), embed and train_recommender once per p. Writes the
    `experiments` table and reports/experiment-<id>.{html,md,json}."""
    _setup_logging(verbose)
    with _Command(lake) as cmd:
        from slimrec.config import ConfigError, load_config

        try:
            ps = [float(x) for x in precisions.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--precisions {precisions!r} is not a comma-separated list of numbers") from None
        start = None
        ctx = cmd.ctx = _context(lake, profile, config, set_, run_date, dataset=dataset)
        if dataset is None:
            from slimrec.ingest import IngestError

            if not ctx.lake.exists("interactions"):
                raise IngestError(f"{lake} holds no ingested data: pass --dataset DIR")
            start = "build_sequences"
        from slimrec.planted_experiment import format_checks, format_curve, run_planted, write_pages

        def config_for(extra: list[str]):
            return load_config(profile, config, [*(set_ or []), *extra])

        with ctx.lake.lock():
            _record_run(ctx, profile)
            exp = run_planted(ctx, ps, config_for, start, progress=lambda m: typer.echo(m, err=True),
                              resume=(resume or "").split(","))
        typer.echo("\n" + format_curve(exp.rows))
        typer.echo("\nChecks (full ranking, test NDCG@10, paired SE per user):\n" + format_checks(exp.checks))
        paths = write_pages(exp, report_dir, " ".join(["slim", *sys.argv[1:]]))
        typer.echo(f"\nseconds: {exp.seconds}\nexperiment {exp.experiment_id}: {', '.join(map(str, paths.values()))}")


def stage_main(name: str) -> None:
    """Entry of the thin ``jobs/<table>.py`` files: ``slim stage NAME`` with the job's arguments."""
    app(["stage", name, *sys.argv[1:]])
