"""Run report: the summary maths by hand, and the HTML page rendered by headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, date, datetime

import pandas as pd
import pytest
from slimrec.lake import CommitInfo
from slimrec.report import metrics_summary, write_report
from slimrec.stages.base import StageResult

INFO = CommitInfo("test", date(2024, 1, 2), "r1")


def _metrics(rows):
    base = dict(run_id="run1", dataset="d", split="test", hr_20=0.0, ndcg_20=0.0, mrr=0.0, n_users=10)
    return pd.DataFrame([{**base, **r} for r in rows])


def test_metrics_summary_mean_std_and_order():
    m = _metrics([
        dict(backbone="sasrec", variant="base", protocol="sampled100", seed=0, hr_10=0.5, ndcg_10=0.30),
        dict(backbone="sasrec", variant="base", protocol="sampled100", seed=1, hr_10=0.7, ndcg_10=0.40),
        dict(backbone="sasrec", variant="base", protocol="full", seed=0, hr_10=0.1, ndcg_10=0.05),
        dict(backbone="sasrec", variant="random", protocol="full", seed=0, hr_10=0.01, ndcg_10=0.002),
        dict(backbone="sasrec", variant="base", protocol="full", seed=0, hr_10=0.9, ndcg_10=0.9, split="valid"),
    ])
    s = metrics_summary(m)
    assert list(zip(s["protocol"], s["variant"], strict=True)) == [("full", "base"), ("full", "random"),
                                                                   ("sampled100", "base")]
    sampled = s[s["protocol"] == "sampled100"].iloc[0]
    assert sampled["seeds"] == 2
    assert sampled["ndcg_10_mean"] == pytest.approx(0.35)
    assert sampled["ndcg_10_std"] == pytest.approx(0.0707107, rel=1e-5)  # sample std of (0.3, 0.4)
    assert s[s["protocol"] == "full"].iloc[0]["ndcg_10_std"] == 0.0  # one seed: std shown as 0


def _tiny_lake(lake, notes=None):
    now = datetime(2024, 1, 2, tzinfo=UTC)
    lake.write_arrow("items", pd.DataFrame({
        "item_id": ["i1", "i2", "i3"], "title": ["Blue Pen", "Red Ink", "Stapler"], "brand": ["B", None, "S"],
        "categories": [["Pens"], ["Ink"], ["Staplers"]], "description": [None] * 3,
        "item_text": ["Blue Pen", "Red Ink", "Stapler"], "text_hash": ["a", "b", "c"]}), "overwrite", INFO)
    lake.write_arrow("user_sequences", pd.DataFrame({
        "user_id": ["u1"], "item_ids": [["i1", "i2", "i3"]], "history": [["i1"]], "valid_target": ["i2"],
        "test_target": ["i3"], "seq_len": [3], "last_event_ts": [now], "seq_hash": ["h"]}), "overwrite", INFO)
    lake.write_arrow("recommendations", pd.DataFrame({
        "user_id": ["u1"], "item_ids": [["i3", "i2"]], "scores": [[0.9, 0.1]], "run_id": ["run1"],
        "backbone": ["sasrec"], "variant": ["base"]}), "overwrite", INFO)
    m = _metrics([
        dict(backbone="sasrec", variant=v, protocol=p, seed=s, hr_10=h, ndcg_10=h / 2)
        for v, h in (("base", 0.5), ("slim", 0.6), ("random", 0.1), ("popular", 0.2))
        for p in ("full", "sampled100") for s in (0, 1)
    ])
    lake.write_arrow("metrics", m, "append", INFO)
    lake.write_arrow("recommender_runs", pd.DataFrame({
        "run_id": ["run1"], "dataset": ["d"], "config": ["{}"], "best_backbone": ["sasrec"], "best_variant": ["slim"],
        "n_users": [1], "n_items": [3], "notes": [json.dumps(notes or {"paired_reference": "sasrec/cooc_prior",
                                                                       "paired_vs_reference": [PAIRED]})],
        "started_ts": [now], "finished_ts": [now]}), "append", INFO)


PAIRED = {"backbone": "sasrec", "variant": "slim", "reference": "sasrec/cooc_prior", "protocol": "full", "n_users": 4905,
          "n_seeds": 3, "variant_ndcg_10": 0.0555, "reference_ndcg_10": 0.0552, "mean_diff": 0.0003, "se": 0.0004,
          "users_better": 193, "users_worse": 164}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_html_report_renders_table_and_charts(tmp_lake, tmp_path):
    _tiny_lake(tmp_lake)
    paths = write_report(tmp_lake, [StageResult("ingest", rows_in=10, rows_out=9, extra={"seconds": 1.5})],
                         tmp_path / "reports", "run1", date(2024, 1, 2))
    page = paths["html"].resolve().as_uri()
    prof = tmp_path / "chrome-profile"
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={prof}", "--dump-dom", page],
                         capture_output=True, text=True, timeout=120).stdout
    assert '<table id="metrics">' in dom
    assert '<table id="paired">' in dom and "+0.0003" in dom and "193 / 164" in dom
    assert "<th>sasrec/cooc_prior</th>" in dom and "Against sasrec/cooc_prior" in dom
    assert dom.count("<tr") >= 1 + 8 + 2 + 2  # header + 4 variants x 2 protocols + stage table + paired
    assert "slim" in dom and "popular" in dom
    assert dom.count("data:image/png;base64,") == 3  # NDCG@10, HR@10, stages (no rationale tables here)
    assert "Stapler (test target)" in dom  # the example user's top-1 is the target, marked
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={prof}", "--window-size=1200,2400",
                    f"--screenshot={shot}", page], capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("L")
    dark = sum(1 for p in img.getdata() if p < 200)
    assert dark > 20_000, "the page rendered (nearly) blank"


def test_paired_table_says_same_when_no_user_differs():
    import pandas as pd
    from slimrec.report import format_paired

    same = {**PAIRED, "variant": "text", "mean_diff": 0.0, "se": 0.0, "users_better": 0, "users_worse": 0}
    lines = format_paired(pd.DataFrame([PAIRED, same])).splitlines()
    assert lines[1].split()[-2:] == ["+0.75", "193/164"]  # 0.0003 / 0.0004
    assert lines[2].split()[-2:] == ["same", "0/0"] and "nan" not in lines[2]


def test_report_names_the_reference_and_reads_older_runs(tmp_lake, tmp_path):
    from slimrec.report import latest_paired

    _tiny_lake(tmp_lake)
    md = write_report(tmp_lake, [], tmp_path / "r", "run1", date(2024, 1, 2))["md"].read_text()
    assert "## Against sasrec/cooc_prior, the strongest model or baseline without an LLM on validation" in md
    header = next(line for line in md.split("## Against")[1].splitlines() if line.startswith("protocol"))
    assert header.split()[6] == "sasrec/cooc_prior"  # the reference column
    assert "Variants configured but not run" not in md
    # a run written before the reference was chosen on validation stored its rows under the old key
    older = tmp_path / "older"
    from slimrec.lake import Lake

    old_lake = Lake(older)
    _tiny_lake(old_lake, notes={"paired_vs_cooc_prior": [{**PAIRED, "reference": "cooc_prior"}]})
    paired = latest_paired(old_lake)
    assert paired["reference"].tolist() == ["cooc_prior"] and paired["mean_diff"].tolist() == [0.0003]


def test_report_lists_variants_that_did_not_run(tmp_lake, tmp_path):
    _tiny_lake(tmp_lake, notes={"missing_variants": {"slim": "no student rationale vectors"},
                                "paired_vs_reference": [PAIRED]})
    md = write_report(tmp_lake, [], tmp_path / "r", "run1", date(2024, 1, 2))["md"].read_text()
    assert "not run: slim: no student rationale vectors" in md


def _beyond_lake(lake):
    """_tiny_lake's run with beyond-accuracy figures on its full-ranking rows (no item vectors: no ILD)."""
    _tiny_lake(lake, notes={"paired_vs_reference": [PAIRED],
                            "beyond_not_measured": {"all/ild_10": ["no item text vectors in this run"]}})
    m = lake.read_pandas("metrics")
    full = m["protocol"] == "full"
    # popular: coverage 0.1 on both seeds; slim 0.4 and 0.6 -> 0.5 ± 0.1414 (sample std)
    cov = {("popular", 0): 0.1, ("popular", 1): 0.1, ("slim", 0): 0.4, ("slim", 1): 0.6,
           ("base", 0): 0.3, ("base", 1): 0.3, ("random", 0): 0.9, ("random", 1): 0.9}
    m.loc[full, "coverage_10"] = [cov[(v, s)] for v, s in zip(m.variant[full], m.seed[full], strict=True)]
    m.loc[full, "coverage_20"] = m.loc[full, "coverage_10"] + 0.05
    m.loc[full, ["gini_10", "popularity_pct_10", "novelty_10"]] = [0.5, 75.0, 3.25]
    lake.write_arrow("metrics", m.drop(columns=["run_date", "input_versions"]), "overwrite", INFO)


def test_report_shows_beyond_accuracy_beside_ndcg_and_the_accuracy_coverage_plot(tmp_lake, tmp_path):
    from slimrec.report import beyond_summary
    from slimrec.report_html import render_html

    _beyond_lake(tmp_lake)
    b = beyond_summary(metrics_summary(tmp_lake.read_pandas("metrics")))
    assert set(b["protocol"]) == {"full"} and len(b) == 4  # sampled100 rows carry no figure
    slim = b[b.variant == "slim"].iloc[0]
    assert slim["coverage_10_mean"] == pytest.approx(0.5) and slim["coverage_10_std"] == pytest.approx(0.1414214)
    assert slim["ndcg_10_mean"] == pytest.approx(0.3) and slim["ild_10_mean"] != slim["ild_10_mean"]  # NaN
    md = write_report(tmp_lake, [], tmp_path / "r", "run1", date(2024, 1, 2))["md"].read_text()
    section = md.split("## Beyond accuracy")[1]
    line = next(ln for ln in section.splitlines() if " slim " in ln)
    # NDCG@10, coverage@10, coverage@20, Gini, popularity pct, novelty, ILD (not measured: "-")
    assert line.split()[3:] == ["0.3000±0.0000", "0.5000±0.1414", "0.5500±0.1414", "0.5000±0.0000",
                                "75.00±0.00", "3.2500±0.0000", "-"]
    assert "not measured: all/ild_10: no item text vectors in this run" in section
    page = render_html(tmp_lake, [], "run1", date(2024, 1, 2))
    assert '<table id="beyond">' in page and '<div id="accuracy-coverage">' in page
    assert page.count("data:image/png;base64,") == 3  # NDCG@10, HR@10, accuracy against coverage
    assert "0.5000 ± 0.1414" in page and "no item text vectors in this run" in page
    payload = json.loads((tmp_path / "r" / "run-2024-01-02-run1.json").read_text())  # strict JSON: no NaN
    assert any(r["ild_10_mean"] is None for r in payload["metrics"])


def test_report_of_a_run_before_beyond_accuracy_says_so(tmp_lake, tmp_path):
    from slimrec.report_html import render_html

    _tiny_lake(tmp_lake)  # metrics rows written without the figures
    md = write_report(tmp_lake, [], tmp_path / "r", "run1", date(2024, 1, 2))["md"].read_text()
    assert "(no beyond-accuracy figures: the run predates them or measured none)" in md
    page = render_html(tmp_lake, [], "run1", date(2024, 1, 2))
    assert "No beyond-accuracy figures" in page and "accuracy-coverage" not in page
