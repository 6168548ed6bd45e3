"""Transition counts from training sequences, leave-own-user-out on training rows."""

import numpy as np
import torch
from slimrec.recommender.priors import TrainCooc, cooc_rows, grounded_rows, transition_counts


def test_counts_window_1_and_2():
    # histories [1, 2, 3] and [1, 2]
    ptr, items = np.array([0, 3, 5]), np.array([1, 2, 3, 1, 2])
    c = transition_counts(ptr, items, 3, window=1).toarray()
    assert c[1, 2] == 2 and c[2, 3] == 1 and c[1, 3] == 0 and c.sum() == 3
    c2 = transition_counts(ptr, items, 3, window=2).toarray()
    assert c2[1, 3] == 1 and c2.sum() == 4


def test_prior_rows_use_the_last_item():
    ptr, items = np.array([0, 3, 5]), np.array([1, 2, 3, 1, 2])
    c = transition_counts(ptr, items, 3)
    rows = cooc_rows(c, np.array([[0, 1], [0, 0]]))
    np.testing.assert_allclose(rows[0], [0, 0, np.log(3), 0])
    assert rows[1].sum() == 0  # an empty input has no prior


def test_leave_own_user_out_on_training_rows():
    ptr, items = np.array([0, 3, 5]), np.array([1, 2, 3, 1, 2])
    c = transition_counts(ptr, items, 3)
    tc = TrainCooc(c, 1, torch.device("cpu"))
    full = torch.tensor([[1, 2, 3]])  # user 0's whole history; inputs [1, 2], targets [2, 3]
    cand = torch.tensor([[[2, 3], [3, 1]]])  # (B=1, L=2, K=2)
    p = tc.at(full, cand)
    # C[1,2] = 2, minus the user's own 1->2 = 1; C[1,3] = 0; C[2,3] = 1 - 1 = 0; C[2,1] = 0
    np.testing.assert_allclose(p[0].numpy(), [[np.log(2), 0], [0, 0]], rtol=1e-6)
    dense = tc.full(full)
    np.testing.assert_allclose(dense[0, :, [2, 3]].numpy(), [[np.log(2), 0], [0, 0]], rtol=1e-6)


def test_grounded_rows():
    g = grounded_rows(np.array([0, 2, 2]), np.array([3, 1]), np.array([0, 1]), 3)
    assert g.tolist() == [[0, 1, 0, 1], [0, 0, 0, 0]]


def test_novel_rows_drop_the_models_own_top_items():
    from slimrec.recommender.priors import novel_rows

    g = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 0, 1]], np.float32)
    s = np.array([[99, 5, 1, 4, 3], [99, 0, 9, 5, 2]], np.float32)  # column 0 (padding) never counts
    assert novel_rows(g, s, 2).tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, 1]]
    assert novel_rows(g, s, 10).sum() == 0  # a top larger than the catalogue keeps nothing


def test_novel_rows_with_a_floor_count_only_predicted_items_as_top():
    from slimrec.recommender.priors import novel_rows

    g = np.array([[0, 1, 1, 1, 1]], np.float32)
    s = np.array([[0, 2.0, 0, 0, 0.5]], np.float32)  # a sparse prior: it predicts items 1 and 4 only
    assert novel_rows(g, s, 3, floor=0.0).tolist() == [[0, 0, 1, 1, 0]]
    assert novel_rows(g, s, 3).sum() == 1  # without the floor, one zero-score item is "top" by accident
