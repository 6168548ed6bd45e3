"""bench.seed_pool's pairing on a subset of users (the lakes it reads are made by real runs only)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.seed_pool import pair


def test_pair_on_all_shared_users_and_on_a_subset():
    x = pd.Series([0.5, 0.2, 0.0, 1.0])
    y = pd.Series([0.4, 0.2, 0.1, 0.5])
    d, se, n = pair(x, y)
    diffs = np.array([0.1, 0.0, -0.1, 0.5])
    assert n == 4 and d == pytest.approx(diffs.mean()) and se == pytest.approx(diffs.std(ddof=1) / 2)
    d, se, n = pair(x, y, users=np.array([0, 3]))  # the retrieved users, say
    assert n == 2 and d == pytest.approx(0.3)
    assert pair(x, y.iloc[:0])[2] == 0 and np.isnan(pair(None, y)[0])  # nothing shared: nothing paired
