"""bench.recbole's export: slimrec's split as RecBole atomic rows whose leave-one-out gives slimrec's targets.

No RecBole here: :func:`bench.recbole.leave_one_out` is RecBole's ``LS: valid_and_test`` rule (group by
user, order by time) written in pandas; the bench itself checks the real RecBole's split at run time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from slimrec.recommender.config import RecommenderConfig
from slimrec.recommender.data import build_rec_data, split_leave_one_out

from bench.recbole import (
    INTER_HEADER,
    check_split,
    inter_frame,
    leave_one_out,
    prefix_rows,
    read_atomic,
    recbole_settings_in_slimrec,
    score_matrix,
    slimrec_evaluations,
    write_atomic,
)

SEQS = {"u2": ["i3", "i1", "x9", "i2"], "u10": ["x9", "i3", "i7"], "a": ["i1", "i2", "i3", "i7", "x9"]}


@pytest.fixture
def data():
    d, _ = build_rec_data(split_leave_one_out(pd.Series(SEQS)))
    return d


def test_rows_are_each_users_sequence_in_time_order_with_unique_timestamps(data):
    df = inter_frame(data)
    # users in RecData order (sorted ids), each user's history, validation target, test target
    assert df.values.tolist() == [
        ["a", "i1", 0.0], ["a", "i2", 1.0], ["a", "i3", 2.0], ["a", "i7", 3.0], ["a", "x9", 4.0],
        ["u10", "x9", 5.0], ["u10", "i3", 6.0], ["u10", "i7", 7.0],
        ["u2", "i3", 8.0], ["u2", "i1", 9.0], ["u2", "x9", 10.0], ["u2", "i2", 11.0],
    ]


def test_recbole_leave_one_out_of_the_file_gives_slimrecs_split(data, tmp_path):
    path = write_atomic(data, tmp_path, "tiny")
    assert path == tmp_path / "tiny" / "tiny.inter"
    assert path.read_text().splitlines()[:2] == ["\t".join(INTER_HEADER), "a\ti1\t0.0"]
    shuffled = read_atomic(path).sample(frac=1.0, random_state=3)  # RecBole sorts by time; file order is moot
    loo = leave_one_out(shuffled).set_index("user_id")
    tok = data.item_ids
    for r, u in enumerate(data.user_ids):
        assert loo.loc[u, "test_target"] == tok[data.test_target[r] - 1] == SEQS[u][-1]
        assert loo.loc[u, "valid_target"] == tok[data.valid_target[r] - 1] == SEQS[u][-2]
        assert loo.loc[u, "history"] == list(tok[data.history(r) - 1]) == SEQS[u][:-2]


def _split_like_recbole(max_len: int) -> dict:
    out = {}
    for name, cut in (("valid", 2), ("test", 1)):
        users = sorted(SEQS, reverse=True)  # RecBole's row order is its own; the check goes by user
        out[name] = {"user": users, "target": [SEQS[u][-cut] for u in users],
                     "input": [SEQS[u][:-cut][-max_len:] for u in users]}
    return out


def test_check_split_accepts_the_same_split_and_stops_on_any_difference(data):
    assert check_split(data, _split_like_recbole(50), 50)["users_checked"] == 3
    assert check_split(data, _split_like_recbole(2), 2)["users_checked"] == 3  # inputs truncated to max_len
    bad = _split_like_recbole(50)
    bad["test"]["target"][0] = "i1"
    with pytest.raises(SystemExit, match="test target of user u2: RecBole i1, slimrec i2"):
        check_split(data, bad, 50)
    short = _split_like_recbole(50)
    short["valid"]["input"][1] = short["valid"]["input"][1][1:]
    with pytest.raises(SystemExit, match="valid input of user u10"):
        check_split(data, short, 50)


def test_recbole_scores_map_onto_slimrec_columns_and_both_candidate_rules(data):
    # RecBole's column order is its own (0 is padding); rows in its own user order
    tokens = ["[PAD]", "x9", "i7", "i3", "i2", "i1"]
    users = ["u10", "a", "u2"]
    raw = {  # token -> score per user; each user's test target is scored below one of its own history items
        "u10": {"x9": 5.0, "i3": 4.0, "i7": 3.0, "i1": 2.0, "i2": 1.0},  # target i7: beaten by x9, i3 (history)
        "a": {"i1": 9.0, "x9": 8.0, "i2": 1.0, "i3": 2.0, "i7": 3.0},  # target x9: beaten by i1 (history)
        "u2": {"i2": 1.0, "i3": 0.5, "i1": 0.2, "x9": 0.1, "i7": 0.0},  # target i2: first
    }
    scores = np.array([[0.0] + [raw[u][t] for t in tokens[1:]] for u in users], dtype=np.float32)
    S = score_matrix(data, {"user": users, "item_tokens": tokens}, scores)
    col = {t: i + 1 for i, t in enumerate(data.item_ids)}
    assert S[list(data.user_ids).index("u10"), col["i3"]] == 4.0
    res = slimrec_evaluations(data, RecommenderConfig(), S)
    # history excluded: every target first; stock: ranks 3, 2, 1
    assert res["history_excluded"]["ndcg_10"] == pytest.approx(1.0)
    assert res["stock"]["ndcg_10"] == pytest.approx((1 / np.log2(4) + 1 / np.log2(3) + 1.0) / 3)
    assert res["stock"]["hr_10"] == 1.0 and res["tied_targets"] == {"history_excluded": 0, "stock": 0}


def test_prefix_rows_are_recboles_training_rows_in_slimrecs_shape(data):
    inputs, targets, row_user = prefix_rows(data, 3)
    r = list(data.user_ids).index("a")  # history i1 i2 i3: rows <i1> -> i2, <i1, i2> -> i3
    col = {t: i + 1 for i, t in enumerate(data.item_ids)}
    mine = row_user == r
    assert inputs[mine].tolist() == [[0, 0, col["i1"]], [0, col["i1"], col["i2"]]]
    assert targets[mine].tolist() == [[0, 0, col["i2"]], [0, 0, col["i3"]]]
    assert len(inputs) == int((data.hist_len - 1).sum())  # every training target once, as slimrec's rows


def test_recbole_settings_patch_slimrecs_model_and_restore_it(data):
    import torch
    from slimrec.recommender import models, train
    from slimrec.recommender.runner import build_model

    cfg = RecommenderConfig(hidden_dim=8, max_len=4, num_blocks=2, num_heads=2, dropout=0.0)
    before = (models.make_backbone, models.ItemEncoder, train.train_rows_per_position, torch.optim.Adam)
    torch.manual_seed(0)
    with recbole_settings_in_slimrec(block="recbole", normal_init=True, rows="prefix", betas=(0.9, 0.999)):
        m = build_model("base", "sasrec", data, cfg)
        assert type(m.backbone).__name__ == "RecBoleShapedSASRec" and not hasattr(m.backbone, "last_ln")
        assert train.train_rows_per_position is prefix_rows
        assert torch.optim.Adam([torch.zeros(1, requires_grad=True)]).defaults["betas"] == (0.9, 0.999)
        emb = m.items.id_emb.weight.detach()
        assert float(emb[0].abs().sum()) == 0.0 and 0.005 < float(emb[1:].std()) < 0.05  # N(0, 0.02), padding 0
        ids = torch.tensor([[0, 0, 1, 2], [1, 2, 3, 1]])
        out = m.backbone(ids, m.items(ids))
        assert out.shape == (2, 4, 8) and torch.isfinite(out).all()
        # post-LN: every position of the output is a LayerNorm's output
        assert torch.allclose(out.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert (models.make_backbone, models.ItemEncoder, train.train_rows_per_position, torch.optim.Adam) == before
    assert type(build_model("base", "sasrec", data, cfg).backbone).__name__ == "SASRec"
    with pytest.raises(ValueError, match="block='recbole'"):
        recbole_settings_in_slimrec(normal_init=True)
