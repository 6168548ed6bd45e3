"""bench.scale: rows per size and stage, time per million events against the baseline size, the plot."""

from __future__ import annotations

import json

import pytest

from bench import docs
from bench.scale import STAGES, plot, scale_rows, shape


def _result(events: int, per_m: dict[str, float], peak: float) -> dict:
    r = {"events": events, "peak_gib": peak, "spark_start_s": 5.0}
    for s in STAGES:
        r[s] = {"seconds": per_m[s] * events / 1e6, "rows_in": events, "rows_out": events // 25, "peak_gib": peak / 2}
    return r


RESULTS = [
    _result(1_000_000, {"ingest": 12.0, "build_sequences": 2.0, "build_prompts": 6.0}, 2.5),
    _result(5_000_000, {"ingest": 10.0, "build_sequences": 1.0, "build_prompts": 5.0}, 3.5),
    _result(50_000_000, {"ingest": 13.0, "build_sequences": 1.0, "build_prompts": 8.0}, 9.0),
]


def test_shape_is_the_foundation_case_at_5m():
    assert shape(5_000_000) == (200_000, 50_000)
    assert shape(50) == (2, 100)


def test_time_per_million_is_compared_with_the_baseline_size():
    rows = {(r["case"], r["metric"]): r for r in scale_rows(RESULTS, 5_000_000)}
    r = rows[("50M events/ingest", "s per 1M events")]
    assert r["value"] == pytest.approx(13.0) and r["baseline"] == "5M events"
    assert r["ratio"] == pytest.approx(1.3)
    assert rows[("50M events/build_prompts", "s per 1M events")]["ratio"] == pytest.approx(1.6)
    assert rows[("1M events/build_sequences", "s per 1M events")]["ratio"] == pytest.approx(2.0)
    assert rows[("5M events/ingest", "rows_per_s")]["value"] == pytest.approx(1e5)
    # the three stages together against the baseline's time scaled by the events
    total = rows[("50M events/three stages", "wall")]
    assert total["value"] == pytest.approx(50 * 22.0) and total["baseline_value"] == pytest.approx(10 * 16.0 * 5)
    assert rows[("50M events/whole process", "peak_rss")]["value"] == 9.0


def test_no_baseline_size_leaves_ratios_empty():
    rows = scale_rows(RESULTS[:1], 5_000_000)
    assert all(r["ratio"] is None for r in rows)


def test_plot_and_page_show_it(tmp_path, monkeypatch):
    svg = plot(RESULTS, tmp_path / "docs" / "scale.svg")
    text = svg.read_text()
    assert text.startswith("<?xml") and "time per million events" in text
    results = tmp_path / "results"
    results.mkdir()
    (results / "scale.json").write_text(json.dumps({
        "bench": "scale", "rows": scale_rows(RESULTS, 5_000_000), "extra": {"figure": "docs/scale.svg"}}))
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    page = docs.benchmarks_markdown(results)
    assert "## scale" in page and "![scale](scale.svg)" in page
    svg.unlink()  # a figure that is not there is not linked
    assert "![scale]" not in docs.benchmarks_markdown(results)
