"""Fixtures of the recommender tests (data in rec_helpers)."""

from __future__ import annotations

import pytest
from rec_helpers import synthetic_frames


@pytest.fixture(scope="session")
def frames():
    return synthetic_frames()


@pytest.fixture(scope="session")
def tiny_data(frames):
    from slimrec.recommender.data import build_rec_data

    seqs, items, item_emb, rat_emb, rats = frames
    data, _ = build_rec_data(seqs, items, item_emb, rat_emb, rats)
    return data


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and the 2 cores are shared: do not oversubscribe."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
