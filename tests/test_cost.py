"""The cost table: the stage meter on real child processes, the tables' numbers by hand, the records a
stage run leaves, the dry run's table and the report. No Spark, no Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import date
from types import SimpleNamespace

import pandas as pd
import pytest
from slimrec import pipeline
from slimrec.config import CostConfig, load_config
from slimrec.cost import (
    Charges,
    StageMeter,
    add_totals,
    charged_stages,
    cost_table,
    dry_run_table,
    format_cost_table,
    format_dry_run,
    format_variant_costs,
    lake_charges,
    skipped_cost,
    stage_cost,
    variant_costs,
)
from slimrec.lake import CommitInfo
from slimrec.results import metrics_summary
from slimrec.stages.base import StageContext, StageResult

PRICES = CostConfig(cpu_hour_usd=0.05, gpu_hour_usd=2.5)
# a child that spends `cpu` seconds of CPU time (not wall time: the machine may be busy), says so, then sleeps `rest`
BURN = "import time,sys\nwhile time.process_time() < {cpu}: pass\nprint('burnt', flush=True)\ntime.sleep({rest})"


def _burner(cpu: float, rest: float = 0.0) -> list[str]:
    return [sys.executable, "-c", BURN.format(cpu=cpu, rest=rest)]


def _start_burnt(cpu: float, rest: float) -> subprocess.Popen:
    """A child that has spent its ``cpu`` seconds and is asleep when this returns: it says so on stdout, so a
    busy machine cannot leave part of the burn for later (polling its CPU time could)."""
    p = subprocess.Popen(_burner(cpu, rest), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "burnt"
    return p


def test_meter_counts_a_live_child_from_the_tree():
    with StageMeter(interval_s=0.1) as m:
        p = _start_burnt(0.6, rest=1.0)  # burnt, now asleep and still alive when the meter closes
    p.communicate()
    # at least the child's 0.6 s; above it, at most what the session's JVM and Ray daemons (also in the
    # tree during a full test session) can spend meanwhile
    assert 0.45 <= m.figures["cpu_children_s"] < 1.0
    assert m.figures["processes"] >= 1


def test_meter_counts_a_reaped_child_it_never_sampled():
    with StageMeter(interval_s=60) as m:  # no sample while the child lives: only RUSAGE_CHILDREN sees it
        subprocess.run(_burner(0.5), check=True, stdout=subprocess.DEVNULL)
    assert 0.35 <= m.figures["cpu_children_s"] < 0.9  # the child's 0.5 s (and the session's daemons)


def test_meter_leaves_out_what_a_child_spent_before_the_stage():
    p = _start_burnt(1.5, rest=1.5)
    with StageMeter(interval_s=0.1) as m:
        time.sleep(0.3)  # the child sleeps: it spends nothing while the stage runs
    p.communicate()
    # The meter reads this process's whole tree, which in a full test session also holds the session's
    # Spark JVM and Ray daemons (up to ~0.1 s of theirs in 0.3 s): the bound tells "none of the child's
    # 1.5 s before the stage" from "counted it", whatever else runs.
    assert m.figures["cpu_children_s"] < 0.6
    assert m.figures["run_wall_s"] == m.figures["wall_s"]  # no mark_run_end: the whole span


def _measured(wall: float, cpu: float = 0.0) -> dict:
    return {"wall_s": wall, "run_wall_s": wall, "cpu_driver_s": cpu, "cpu_children_s": 0.0, "processes": 0}


def test_stage_cost_gpu_hours_are_an_allocation_and_a_skip_costs_nothing():
    cfg = load_config("dev", None, ["student.infer.gpus_per_actor=1", "student.infer.num_actors=2"])
    ran = StageResult("student_rationales", rows_out=5, extra={"rows_written": 5, "output_tokens": 400})
    c = stage_cost(ran, _measured(1800.0, cpu=360.0), cfg, date(2024, 1, 2))
    assert (c["gpus"], c["gpu_hours"], c["cpu_hours"]) == (2.0, 1.0, 0.1)  # 2 GPUs x 0.5 h; 360 s CPU
    assert (c["calls"], c["output_tokens"], c["input_tokens"]) == (5, 400, None)
    idle = StageResult("student_rationales", skipped=True, extra={"reason": "nothing to generate"})
    assert stage_cost(idle, _measured(3.0), cfg)["gpu_hours"] == 0.0
    s = skipped_cost("embed", "inputs unchanged")
    assert (s["status"], s["cpu_hours"], s["gpu_hours"]) == ("skipped", 0.0, 0.0)
    assert "costs nothing" in s["note"]


def test_cost_table_by_hand():
    costs = [
        {"stage": "teacher_rationales", "status": "ran", "calls": 10, "input_tokens": 5000, "output_tokens": 2000,
         "api_usd": 1.2, "wall_s": 30.0, "cpu_hours": 0.1, "gpu_hours": 0.0, "note": ""},
        {"stage": "student_rationales", "status": "ran", "calls": 40, "output_tokens": 8000, "api_usd": None,
         "wall_s": 7200.0, "cpu_hours": 1.0, "gpu_hours": 2.0, "note": "", "unmeasured": ["Ray workers of x:1"]},
        skipped_cost("embed", "inputs unchanged"),
    ]
    t = cost_table(costs, PRICES).set_index("stage")
    assert t.loc["teacher_rationales", "compute_usd"] == pytest.approx(0.1 * 0.05)
    assert t.loc["teacher_rationales", "usd"] == pytest.approx(1.2 + 0.005)
    assert t.loc["student_rationales", "usd"] == pytest.approx(1.0 * 0.05 + 2.0 * 2.5)  # 5.05
    assert "not counted: Ray workers of x:1" in t.loc["student_rationales", "note"]
    assert t.loc["embed", "usd"] == 0.0
    assert t.loc["total", "usd"] == pytest.approx(1.205 + 5.05)
    assert t.loc["total", "calls"] == 50 and t.loc["total", "input_tokens"] == 5000
    assert t.loc["total", "texts"] is None  # no stage encoded texts
    text = format_cost_table(cost_table(costs, PRICES), PRICES)
    assert "skipped (inputs unchanged): costs nothing" in text and "6.2550" in text


def test_add_totals_sums_runs_and_texts_by_source():
    first = add_totals(None, {"run_date": "2024-01-01", "cpu_hours": 0.5, "calls": None,
                              "texts_by_source": {"item": 10, "teacher": 3}})
    both = add_totals(first, {"run_date": "2024-01-02", "cpu_hours": 0.25, "calls": 4,
                              "texts_by_source": {"teacher": 2, "student": 5}})
    assert (both["runs"], both["since"], both["cpu_hours"], both["calls"]) == (2, "2024-01-01", 0.75, 4)
    assert both["texts_by_source"] == {"item": 10, "teacher": 5, "student": 5}
    assert both["gpu_hours"] is None  # never recorded


def _summary() -> pd.DataFrame:
    base = dict(run_id="r", dataset="d", split="test", hr_10=0.0, hr_20=0.0, ndcg_20=0.0, mrr=0.0, n_users=9)
    rows = [dict(base, backbone="sasrec", variant=v, protocol=p, seed=s, ndcg_10=x)
            for v, p, s, x in [("text", "full", 0, 0.030), ("text", "full", 1, 0.034),
                               ("slim", "full", 0, 0.036), ("slim", "full", 1, 0.040),
                               ("teacher", "full", 0, 0.035), ("teacher", "full", 1, 0.033),
                               ("base", "full", 0, 0.020), ("slim", "sampled100", 0, 0.5),
                               ("text", "sampled100", 0, 0.4)]]
    return metrics_summary(pd.DataFrame(rows))


def _charges(student_gpu: float = 0.0, distill: bool = True) -> Charges:
    return Charges(totals={
        "teacher_rationales": {"cpu_hours": 0.2, "gpu_hours": 0.0},
        "distill_student": {"cpu_hours": 1.0, "gpu_hours": 0.0} if distill else None,
        "student_rationales": {"cpu_hours": 2.0, "gpu_hours": student_gpu},
        "embed": {"cpu_hours": 0.5, "gpu_hours": 0.0,
                  "texts_by_source": {"item": 600, "teacher": 100, "student": 300}},
    }, teacher_usd=4.0)


def test_variant_costs_by_hand_on_cpu():
    v = variant_costs(_summary(), _charges(), PRICES).set_index("variant")
    assert sorted(v.index) == ["slim", "teacher"]  # no-LLM variants are charged nothing and not listed
    # teacher: means 0.034 vs text 0.032 -> +0.002; 0.2 h teacher + 10% of embed's 0.5 h = 0.25 CPU-hours;
    # $4 of answers + 0.25 h x $0.05 = $4.0125
    t = v.loc["teacher"]
    assert t["gain"] == pytest.approx(0.002)
    assert (t["hours"], t["hour_unit"]) == (pytest.approx(0.25), "CPU-hour")
    assert t["usd"] == pytest.approx(4.0125)
    assert t["gain_per_1k_usd"] == pytest.approx(0.002 / 4.0125 * 1000)  # 0.4984
    assert t["gain_per_hour"] == pytest.approx(0.008)
    # slim: 0.038 - 0.032 = +0.006; 0.2 + 1.0 + 2.0 + 30% of 0.5 = 3.35 CPU-hours; $4 + 3.35 x 0.05 = $4.1675
    s = v.loc["slim"]
    assert s["gain"] == pytest.approx(0.006)
    assert s["hours"] == pytest.approx(3.35) and s["usd"] == pytest.approx(4.1675)
    assert s["gain_per_1k_usd"] == pytest.approx(1.439712, rel=1e-5)
    assert s["gain_per_hour"] == pytest.approx(0.0017910, rel=1e-4)
    assert "distill_student" in s["charged"] and "embed (student share)" in s["charged"]


def test_variant_costs_per_gpu_hour_and_what_is_not_measured():
    v = variant_costs(_summary(), _charges(student_gpu=0.5, distill=False), PRICES).set_index("variant")
    s = v.loc["slim"]
    assert s["hour_unit"] == "GPU-hour" and s["hours"] == pytest.approx(0.5)
    assert s["gain_per_hour"] == pytest.approx(0.012)
    # distill_student not measured: left out of the charge and named
    assert s["usd"] == pytest.approx(4.0 + (0.2 + 2.0 + 0.15) * 0.05 + 0.5 * 2.5)
    assert "not measured yet: distill_student" in s["note"]
    assert v.loc["teacher", "hour_unit"] == "CPU-hour"
    assert "per $1,000" not in format_variant_costs(variant_costs(_summary(), _charges(), PRICES))


def test_variant_costs_set_text_matching_against_each_backbones_text():
    s = _summary()
    extra = s[s["variant"] == "slim"].assign(backbone="none", variant="text_matching", ndcg_10_mean=0.012)
    v = variant_costs(pd.concat([s, extra]), _charges(), PRICES)
    tm = v[v["variant"] == "text_matching"].iloc[0]
    assert len(v[v["variant"] == "text_matching"]) == 1  # one backbone in the run: one row
    assert tm["gain"] == pytest.approx(0.012 - 0.032) and tm["note"] == "against sasrec's text"


def test_charged_stages():
    assert charged_stages("text") == () and charged_stages("cooc_prior") == ()
    assert charged_stages("teacher_cooc") == ("teacher_rationales", ("embed", "teacher"))
    assert charged_stages("slim@teacher_users")[:3] == ("teacher_rationales", "distill_student", "student_rationales")
    assert charged_stages("text_matching", "teacher") == charged_stages("teacher")


def test_lake_charges_reads_teacher_money_and_stage_records(tmp_lake):
    from slimrec.teacher.planted import planted_model_name

    info = CommitInfo("teacher_rationales", date(2024, 1, 2), "r1")
    rows = [dict(prompt_hash=h, teacher_model=m, user_id=u, prompt_version="v1", rationale="x", step1="a",
                 step2="b", step3="c", grounded_item_ids=[], status=st, error=None, attempts=a, input_tokens=100,
                 output_tokens=50, cost_usd=c, latency_ms=1.0, finish_reason="stop", answered_ts=None)
            for h, m, u, st, a, c in [("h1", "gpt-4o-mini", "u1", "ok", 1, 0.25),
                                      ("h2", "gpt-4o-mini", "u2", "failed", 3, 0.5),
                                      ("h3", planted_model_name("offline-cooc-v1", 0.5), "u3", "ok", 1, 9.0)]]
    tmp_lake.write_arrow("teacher_rationales", pd.DataFrame(rows), "merge", info)
    tmp_lake.record_stage("embed", {"cost_total": {"runs": 2, "cpu_hours": 0.5}})
    ch = lake_charges(tmp_lake, load_config("dev"))
    # the planted experiment's answers are not what the rationale variants read; a failed row was paid
    assert (ch.teacher_usd, ch.teacher_calls, ch.teacher_input_tokens) == (0.75, 4, 200)
    assert ch.totals["embed"] == {"runs": 2, "cpu_hours": 0.5} and ch.totals["distill_student"] is None


def _fake_stage(texts: dict[str, int]):
    def run(ctx):
        return StageResult("embed", rows_out=1, extra={"texts_encoded": sum(texts.values()), "texts_by_source": texts})

    return SimpleNamespace(INPUTS=[], OUTPUTS=[], run=run)


def test_run_stage_records_cost_in_the_run_and_stage_records(tmp_lake, monkeypatch):
    monkeypatch.setattr(pipeline, "stage_module", lambda name: _fake_stage({"item": 3, "teacher": 1}))
    ctx = StageContext(cfg=load_config("dev"), lake=tmp_lake, run_date=date(2024, 1, 2), run_id="run1")
    r = pipeline.run_stage("embed", ctx, check=False)
    assert r.extra["cost"]["status"] == "ran" and r.extra["cost"]["texts"] == 4
    pipeline.run_stage("embed", ctx, check=False)
    rec = tmp_lake.stage_record("embed")
    assert rec["cost"]["texts_by_source"] == {"item": 3, "teacher": 1}
    assert rec["cost_total"]["runs"] == 2 and rec["cost_total"]["texts_by_source"] == {"item": 6, "teacher": 2}
    assert rec["cost_total"]["since"] == "2024-01-02"
    skipped = pipeline.skipped_stage(ctx, "train_recommender", "inputs unchanged")
    assert skipped.extra["cost"]["status"] == "skipped"
    run = tmp_lake.run_record("run1")
    assert [c["stage"] for c in run["stage_costs"]] == ["embed", "embed", "train_recommender"]
    # another embed config: the count starts again
    ctx2 = StageContext(cfg=load_config("dev", None, ["embed.batch_size=7"]), lake=tmp_lake,
                        run_date=date(2024, 1, 3), run_id="run2")
    pipeline.run_stage("embed", ctx2, check=False)
    assert tmp_lake.stage_record("embed")["cost_total"]["runs"] == 1
    # a dry run writes no record
    dry = StageContext(cfg=load_config("dev"), lake=tmp_lake, run_date=date(2024, 1, 4), run_id="run3",
                       dry_run=True)
    pipeline.run_stage("embed", dry, check=False)
    assert tmp_lake.run_record("run3") is None


def test_dry_run_table_estimates_both_teacher_modes_and_last_measured():
    est = {"calls": 100, "input_tokens": 40000, "output_tokens": 30000, "cost_usd": 0.012, "api": "chat",
           "teacher_model": "gpt-4o-mini",
           "modes": {"chat": {"cost_usd": 0.024}, "batch": {"cost_usd": 0.012}}}
    estimates = {"teacher_rationales": {"estimate": est},
                 "student_rationales": {"users_to_generate": 20, "est_output_tokens_max": 17580},
                 "embed": {"texts_encoded": 120},
                 "train_recommender": {"reason": "no estimate for this stage"}}
    last = {"run_date": "2024-01-02", "wall_s": 60.0, "cpu_hours": 0.02, "gpu_hours": 0.0, "api_usd": 0.5}
    t = dry_run_table(estimates, {"teacher_rationales": last, "embed": None}, PRICES)
    teacher = t[t["stage"] == "teacher_rationales"].set_index("mode")
    assert teacher.loc["chat (configured)", "api_usd"] == 0.024 and teacher.loc["batch", "api_usd"] == 0.012
    assert teacher.loc["batch", "calls"] == 100
    assert teacher.loc["batch", "last_usd"] == pytest.approx(0.5 + 0.02 * 0.05)
    rows = t.set_index("stage")
    assert rows.loc["student_rationales", "output_tokens"] == 17580
    assert rows.loc["embed", "texts"] == 120 and "not measured yet" in rows.loc["embed", "note"]
    assert "no estimate for this stage; not measured yet" in format_dry_run(t)


def test_report_has_the_cost_tables(tmp_lake, tmp_path):
    from slimrec.report import write_report

    cost = stage_cost(StageResult("teacher_rationales", extra={"calls": 3, "input_tokens": 900,
                                                               "output_tokens": 300, "cost_usd": 0.01}),
                      _measured(36.0, cpu=72.0), load_config("dev"))
    results = [StageResult("teacher_rationales", extra={"seconds": 36.0, "cost": cost})]
    paths = write_report(tmp_lake, results, tmp_path / "r", "run1", date(2024, 1, 2), cfg=load_config("dev"))
    md = paths["md"].read_text()
    assert "## Cost per stage (this run)" in md and "0.0200" in md  # 72 CPU-seconds = 0.02 CPU-hours
    assert "(no LLM variant in the latest train_recommender run)" in md
    payload = json.loads(paths["json"].read_text())
    assert payload["stage_costs"][0]["usd"] == pytest.approx(0.01 + 0.02 * 0.05)
    assert "id='cost'" in paths["html"].read_text()
