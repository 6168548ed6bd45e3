"""bench.seed_pool's pairing on hand-made per-user rows (the lakes it reads are made by real runs only)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.seed_pool import paired, user_means


def _rows(variant: str, values: dict[int, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"backbone": "sasrec", "variant": variant, "seed": s, "protocol": "full", "user": u,
                          "ndcg_10": v} for u, vals in values.items() for s, v in enumerate(vals)])


def test_user_means_average_over_seeds_per_user():
    pu = pd.concat([_rows("slim", {0: [0.2, 0.4], 1: [0.0, 1.0]}), _rows("text", {0: [0.9, 0.9]})])
    assert user_means(pu, "slim", "full").to_dict() == {0: pytest.approx(0.3), 1: pytest.approx(0.5)}
    assert user_means(pu, "slim", "sampled100").empty


def test_paired_difference_and_its_standard_error():
    x = pd.Series([0.5, 0.2, 0.0, 1.0])
    y = pd.Series([0.4, 0.2, 0.1, 0.5])
    d, se, n = paired(x, y)
    diffs = np.array([0.1, 0.0, -0.1, 0.5])
    assert n == 4 and d == pytest.approx(diffs.mean()) and se == pytest.approx(diffs.std(ddof=1) / 2)
    d, se, n = paired(x, y, users=np.array([0, 3]))  # restricted to two users
    assert n == 2 and d == pytest.approx(0.3)
    assert paired(x, y.iloc[:0])[2] == 0  # no shared user: nothing to pair
