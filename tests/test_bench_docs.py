"""docs/benchmarks.md is generated from bench/results/*.json: provenance and rows, nothing typed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.docs import benchmarks_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_page_names_date_machine_command_and_rows(tmp_path):
    (tmp_path / "teacher.json").write_text(json.dumps({
        "bench": "teacher", "commit": "abc1234", "machine": "box 2 cpus", "at": "2026-01-02T03:04:05",
        "command": "python -m bench.teacher --quick",
        "rows": [{"case": "rps 20", "metric": "achieved_rps", "value": 19.5, "unit": "req/s",
                  "baseline": "configured limit", "baseline_value": 20.0, "ratio": 0.975, "spread": None}]}))
    (tmp_path / "all-abc1234.json").write_text(json.dumps({"rows": []}))  # the merged file is not a section
    page = benchmarks_markdown(tmp_path)
    assert "## teacher" in page and "## all-abc1234" not in page
    assert "- date: 2026-01-02T03:04:05" in page and "- machine: box 2 cpus" in page
    assert "- command: `python -m bench.teacher --quick`" in page and "`abc1234`" in page
    assert "| rps 20 | achieved_rps | 19.5 | req/s |  | configured limit | 20 | 0.975 |" in page
    assert "Not run yet: `python -m bench.pipeline`, `python -m bench.foundation`" in page


def test_no_results_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `make bench`"):
        benchmarks_markdown(tmp_path)
    r = subprocess.run([sys.executable, "-c", "import sys; from bench import docs; docs.RESULTS = None; "
                        "from pathlib import Path; docs.OUT = Path(sys.argv[1]) / 'b.md'; "
                        "docs.write_benchmarks_md.__defaults__ = (Path(sys.argv[1]), docs.OUT); sys.exit(docs.main())",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: no benchmark results")


def test_student_rows_carry_the_constrained_ratio_and_its_spread():
    from bench.student import report_rows

    free = {"prompts": 32, "max_new_tokens": 200, "tokens_per_s": 1000.0, "parse_ok_rate": 0.9}
    report = {"grammar": {"titles": 2410, "compile_seconds": 0.4, "compiled_mb": 3.0},
              "constrained": {"unconstrained": free, "repeats": 3,
                              "constrained": {**free, "max_new_tokens": 879, "tokens_per_s": 900.0, "parse_ok_rate": 1.0},
                              "constrained_one_pass": {**free, "max_new_tokens": 879, "tokens_per_s": 500.0},
                              "tokens_per_s_ratio_constrained_vs_unconstrained": 0.88,
                              "tokens_per_s_ratio_constrained_vs_unconstrained_min_max": [0.85, 0.95]},
              "peak_rss_mb": 900.0}
    rows = {(r["case"], r["metric"]): r for r in report_rows(report)}
    c = rows[("constrained, 32 prompts", "tokens/s")]
    assert c["ratio"] == 0.9 and c["baseline"] == "free, bound 200" and c["spread"] == "median of 3 rounds"
    paired = rows[("constrained / free", "tokens/s ratio, paired by round")]  # not the ratio of the medians
    assert paired["value"] == 0.88 and paired["spread"] == "median; 0.85-0.95 over 3 rounds"
    assert ("constrained_inline / free", "tokens/s ratio, paired by round") not in rows  # not measured: no row
    assert rows[("constrained_one_pass, 32 prompts", "tokens/s")]["ratio"] == 0.5
    assert rows[("constrained", "parse ok rate")]["ratio"] == pytest.approx(1 / 0.9)
    assert ("distill LoRA (in-process)", "seconds per epoch") not in rows  # an adapter-only run has no distill rows


def test_student_seed_rows_give_the_mean_and_the_spread_over_seeds():
    from bench.student_seeds import FIDELITY, summary_rows

    def lake(seed, usable, recall):
        return {"seed": seed, "usable_share": usable, "val_loss": 2.0, "tokens_per_s": 500.0,
                **{k: 0.5 for k, _ in FIDELITY}, "heldout_constrained_item_recall_student": recall}

    rows = {r["metric"]: r for r in summary_rows([lake(1, 1.0, 0.2), lake(2, 0.99, 0.3), lake(3, 0.98, 0.4)])}
    u = rows["usable share (status ok)"]
    assert u["case"] == "3 student seeds (1, 2, 3)" and u["value"] == pytest.approx(0.99)
    assert u["spread"] == "sd 0.01; per seed 1, 0.99, 0.98"
    assert rows["held-out step-3 recall, student"]["spread"].startswith("sd 0.1; per seed 0.2, 0.3, 0.4")


def test_a_benchmark_without_results_here_keeps_its_last_section(tmp_path):
    """Results files stay where a benchmark ran: rerunning one elsewhere must not erase the others."""
    old = ("# Benchmarks\n\nintro\n\n## foundation\n\n- date: 2026-01-01\n\n| case |\n|---|\n| x |\n\n"
           "## teacher\n\n- date: old\n")
    (tmp_path / "teacher.json").write_text(json.dumps({"bench": "teacher", "at": "2026-02-02", "rows": []}))
    page = benchmarks_markdown(tmp_path, old)
    assert "## foundation\n\n- date: 2026-01-01\n\n| case |\n|---|\n| x |\n" in page
    assert "- date: 2026-02-02" in page and "- date: old" not in page
    assert "bench.foundation" not in page.split("## foundation")[0]  # not listed as never run
    assert page.index("## foundation") < page.index("## teacher")
