"""The named override sets the benchmarks use are valid config, and each setting takes effect."""

from __future__ import annotations

import pytest
from slimrec.config import load_config
from slimrec.recommender.config import FULL_BENCHMARK_OVERRIDES, PAPER_SETTINGS_OVERRIDES


@pytest.mark.parametrize("overrides", [FULL_BENCHMARK_OVERRIDES, PAPER_SETTINGS_OVERRIDES], ids=["full", "paper"])
def test_override_set_applies(overrides):
    default = load_config("dev").recommender
    cfg = load_config("dev", overrides=list(overrides)).recommender
    for item in overrides:
        key, _, _ = item.partition("=")
        field = key.removeprefix("recommender.")
        assert getattr(cfg, field) != getattr(default, field), f"{item} changes nothing in the dev profile"


def test_paper_settings_choose_on_sampled_validation():
    cfg = load_config("dev", overrides=list(PAPER_SETTINGS_OVERRIDES)).recommender
    assert (cfg.lr, cfg.num_negatives, cfg.early_stop_protocol) == (0.001, 1, "sampled100")
