"""Both stages on a real Delta lake with real Ray (Ray Train TorchTrainer, Ray Data actor pool)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from slimrec.rationale import STATUSES, parse_rationale
from slimrec.stages import distill_student, student_rationales
from slimrec.stages.base import StageResult
from student_helpers import histories, items_frame, make_ctx, prompts_frame, small_student_config, write_lake


@pytest.fixture(scope="module")
def distilled(ray_local, tiny_base, tmp_path_factory):
    """A lake with 60 users' prompts and teacher answers, and the adapter distill_student registered from it.

    Same users and answers as the session's ``tiny_base``, so the stage finds that base (same corpus hash)
    in the same models folder and reuses it instead of building another.
    """
    from datetime import date

    from slimrec.lake import Lake

    root = tmp_path_factory.mktemp("student_lake")
    lake = Lake(root / "lake")
    run_date = date(2024, 1, 15)
    hists = histories(60, seed=1)
    write_lake(lake, run_date, hists)
    scfg = small_student_config(models_dir=str(Path(tiny_base[0]).parent))
    result = distill_student.run(make_ctx(lake, run_date, scfg))
    assert Path(lake.read_pandas("student_models")["base_model"].iloc[0]) == Path(tiny_base[0])  # reused
    return lake, run_date, hists, scfg, result


def test_distill_registers_the_adapter_with_lineage_and_quality(distilled):
    lake, _, hists, scfg, result = distilled
    assert isinstance(result, StageResult) and result.rows_out == 1
    models = lake.read_pandas("student_models")
    assert len(models) == 1
    row = models.iloc[0]
    assert row["model_version"] == result.extra["model_version"]
    assert Path(row["adapter_path"], "adapter_config.json").exists()
    assert Path(row["base_model"], "config.json").exists()
    assert json.loads(row["lora_config"])["r"] == scfg.lora.r
    assert row["train_rows"] + row["heldout_rows"] == len(hists) and row["heldout_rows"] > 0
    versions = json.loads(row["input_versions"])
    assert set(versions) == {"teacher_rationales", "prompts", "items"}
    metrics = json.loads(row["metrics"])
    assert len(metrics["history"]["val_loss"]) == scfg.train.epochs  # validation loss per epoch
    assert metrics["history"]["train_loss"][-1] < metrics["history"]["train_loss"][0]
    # fidelity under the inference grammar, adapter and base side by side: every answer parses by construction
    for who in ("student", "base"):
        assert metrics[f"heldout_constrained_parse_ok_rate_{who}"] == 1.0
        assert metrics[f"heldout_constrained_dead_ends_{who}"] == 0
        assert 0 <= metrics[f"heldout_constrained_item_precision_{who}"] <= 1
    assert metrics["heldout_constrained_rouge_l_student"] > metrics["heldout_constrained_rouge_l_base"]
    # The adapter must clearly beat the same base without it on held-out users (the stage enforces min_rouge_gain).
    assert row["heldout_rouge_l_student"] >= row["heldout_rouge_l_base"] + scfg.min_rouge_gain
    # Ray Train kept per-epoch checkpoints of the run.
    runs = Path(scfg.models_dir, "student_runs", row["model_version"])
    assert any(p.name.startswith("checkpoint") for p in runs.rglob("*") if p.is_dir())


def test_distill_rerun_with_the_same_inputs_is_skipped(distilled):
    lake, run_date, _, scfg, result = distilled
    again = distill_student.run(make_ctx(lake, run_date, scfg))
    assert again.skipped and again.extra["model_version"] == result.extra["model_version"]
    assert lake.count("student_models") == 1
    dry = distill_student.run(make_ctx(lake, run_date, scfg, dry_run=True))
    assert dry.extra["train_pairs"] + dry.extra["heldout_pairs"] == 60 and not dry.tables


def test_distill_refuses_an_adapter_that_does_not_beat_the_base(distilled, monkeypatch):
    """The registration rule, with the Ray Train job replaced by one whose adapter only ties with the base."""
    import contextlib

    from slimrec.student import train

    lake, run_date, _, scfg, _ = distilled
    adapter = lake.read_pandas("student_models")["adapter_path"].iloc[0]

    class TiedResult:
        error = None
        metrics = {"train_loss": 1.0, "val_loss": 1.0, "heldout_rouge_l_student": 0.20,
                   "heldout_rouge_l_base": 0.18, "history": {}}

        class checkpoint:  # noqa: N801 - stands in for ray.train.Checkpoint
            @staticmethod
            def as_directory():
                return contextlib.nullcontext(adapter)

    monkeypatch.setattr(train, "run_trainer", lambda *a, **k: TiedResult())
    other = scfg.model_copy(update={"train": scfg.train.model_copy(update={"epochs": 1})})  # a new model_version
    with pytest.raises(distill_student.StudentQualityError, match="nothing registered"):
        distill_student.run(make_ctx(lake, run_date, other))
    assert lake.count("student_models") == 1


def test_inference_is_incremental(distilled):
    lake, run_date, hists, scfg, result = distilled
    version = result.extra["model_version"]
    first = student_rationales.run(make_ctx(lake, run_date, scfg))
    rows = lake.read_pandas("student_rationales")
    assert first.rows_out == len(hists) == len(rows) == rows["user_id"].nunique()  # one row per user
    assert set(rows["model_version"]) == {version}
    assert set(rows["status"]) <= set(STATUSES)
    ok = rows[rows["status"] == "ok"]
    assert len(ok) > 0 and ok["step3"].notna().all() and ok["step1"].notna().all()
    assert rows[rows["status"] != "ok"]["error"].notna().all()  # every other status says why
    item_ids = set(items_frame()["item_id"])
    assert all(set(ids) <= item_ids for ids in rows["grounded_item_ids"])
    assert sum(len(ids) > 0 for ids in ok["grounded_item_ids"]) > 0  # step-3 titles ground to catalogue ids
    assert (rows["output_tokens"] > 0).all()
    # constrained decoding (the default): every answer parses, none is cut, every named title is an item
    assert first.extra["constrained"] and first.extra["grammar_titles"] == len(item_ids)
    assert first.extra["statuses"] == {"ok": len(hists)}
    named = [len(set(p.item_names)) for p in (parse_rationale(t)[0] for t in rows["rationale"])]
    assert [len(ids) for ids in rows["grounded_item_ids"]] == named
    assert (rows["output_tokens"] <= first.extra["max_new_tokens"]).all()
    v1 = lake.version("student_rationales")

    # Same prompts, same model: nothing to generate, no commit.
    again = student_rationales.run(make_ctx(lake, run_date, scfg))
    assert again.rows_out == 0 and again.extra["users_to_generate"] == 0
    assert lake.version("student_rationales") == v1

    # One user's prompt changes the next day: exactly that user is generated, dated that day.
    changed = "u007"
    new_hist = {changed: hists[changed] + ["i19"]}
    from slimrec.lake import CommitInfo

    day2 = run_date + timedelta(days=1)
    lake.write_arrow("prompts", prompts_frame(new_hist, items_frame()), "replace_date", CommitInfo("fixture", day2))
    third = student_rationales.run(make_ctx(lake, day2, scfg))
    assert third.rows_out == 1
    rows = lake.read_pandas("student_rationales")
    assert len(rows) == len(hists) + 1
    assert rows[rows["run_date"] == day2]["user_id"].tolist() == [changed]
    dry = student_rationales.run(make_ctx(lake, day2, scfg, dry_run=True))
    assert dry.extra["users_to_generate"] == 0


def test_constrained_inference_without_xgrammar_stops_with_the_reason(distilled, monkeypatch):
    import sys

    from slimrec.lake import CommitInfo
    from slimrec.pipeline import StageError

    lake, run_date, hists, scfg, _ = distilled
    day = run_date + timedelta(days=5)  # one user with a new prompt: something to generate
    lake.write_arrow("prompts", prompts_frame({"u003": hists["u003"] + ["i18"]}, items_frame()), "replace_date",
                     CommitInfo("fixture", day))
    before = lake.version("student_rationales")
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar -> ImportError
    dry = student_rationales.run(make_ctx(lake, day, scfg, dry_run=True))  # the plan needs no library
    assert dry.extra["users_to_generate"] == 1 and dry.extra["est_output_tokens_max"] == dry.extra["max_new_tokens"]
    with pytest.raises(StageError, match="needs xgrammar.*constrained=false"):
        student_rationales.run(make_ctx(lake, day, scfg))
    assert lake.version("student_rationales") == before  # nothing written, nothing decoded unconstrained
