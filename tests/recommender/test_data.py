"""Input building: padding, training rows, splits, alignment of optional inputs."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
from slimrec.recommender.data import (
    build_rec_data,
    items_from_item_json,
    pad_left,
    sequences_from_inter_json,
    train_rows_per_position,
    train_rows_prefix,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "amazon_office_2014"


def small():
    seqs = pd.DataFrame(
        [("u1", ["a", "b", "c", "d", "e"], ["a", "b", "c"], "d", "e"), ("u0", ["c", "a", "x"], ["c"], "a", "x")],
        columns=["user_id", "item_ids", "history", "valid_target", "test_target"],
    )
    items = pd.DataFrame({"item_id": ["a", "b", "c", "d", "e", "x"]})
    return build_rec_data(seqs, items)[0]


def test_pad_left_keeps_the_most_recent():
    items = np.array([1, 2, 3, 4, 5])
    out = pad_left(items, np.array([0, 3]), np.array([5, 4]), 3)
    assert out.tolist() == [[3, 4, 5], [0, 0, 4]]


def test_users_sorted_items_indexed_from_1():
    d = small()
    assert d.user_ids.tolist() == ["u0", "u1"]
    idx = {iid: i + 1 for i, iid in enumerate(d.item_ids)}
    assert d.history(1).tolist() == [idx["a"], idx["b"], idx["c"]]
    assert d.valid_target.tolist() == [idx["a"], idx["d"]]


def test_splits_valid_test_serve():
    d = small()
    idx = {iid: i + 1 for i, iid in enumerate(d.item_ids)}
    ptr, items = d.split_sequences("test")
    assert items[ptr[1] : ptr[2]].tolist() == [idx[c] for c in "abcd"]
    ptr, items = d.split_sequences("serve")
    assert items[ptr[0] : ptr[1]].tolist() == [idx["c"], idx["a"], idx["x"]]


def test_training_rows_never_touch_targets():
    d = small()
    inp, tgt, users = train_rows_per_position(d, 4)
    assert users.tolist() == [1]  # u0's history has one item: nothing to predict
    a, b, c = (list(d.item_ids).index(x) + 1 for x in "abc")
    assert inp.tolist() == [[0, 0, a, b]] and tgt.tolist() == [[0, 0, b, c]]
    pin, ptgt, pusers = train_rows_prefix(d, 4)
    assert pin.tolist() == [[0, 0, 0, a], [0, 0, a, b]] and ptgt.tolist() == [b, c]
    assert pusers.tolist() == [1, 1]


def test_optional_inputs_aligned_and_absent_ones_stay_absent(frames):
    seqs, items, item_emb, rat_emb, rats = frames
    d, notes = build_rec_data(seqs, items)
    assert d.item_text is None and d.rationales == {}
    d, notes = build_rec_data(seqs, items, item_emb, rat_emb, rats)
    u = list(d.user_ids).index("u4")
    tgt = d.test_target[u]
    np.testing.assert_allclose(d.rationales["student"].vectors[u], d.item_text[tgt], rtol=1e-6)
    assert notes["teacher_rationale_users"] == len(seqs) // 2
    g = d.rationales["student"]
    assert g.grounded_items[g.grounded_ptr[u] : g.grounded_ptr[u + 1]][0] == tgt


def test_bundled_json():
    inter = json.loads((DATA / "Office.inter.json").read_text())
    seqs = sequences_from_inter_json(inter)
    assert len(seqs) == 4905
    r = seqs.iloc[0]
    assert r.history + [r.valid_target, r.test_target] == r.item_ids
    items = items_from_item_json(json.loads((DATA / "Office.item.json").read_text()))
    d, _ = build_rec_data(seqs, items)
    assert d.n_items == 2420 and len(d.hist_items) == 53258 - 2 * 4905


def test_indices_do_not_depend_on_the_order_of_input_rows():
    """A compaction or another writer may reorder a table's rows: the same data must index the same way."""
    seqs = sequences_from_inter_json(json.loads((DATA / "Office.inter.json").read_text())).head(300)
    items = pd.DataFrame({"item_id": sorted({str(i) for h in seqs["item_ids"] for i in h})})
    a = build_rec_data(seqs, items)[0]
    b = build_rec_data(seqs.sample(frac=1, random_state=1), items.sample(frac=1, random_state=2))[0]
    assert a.item_ids.tolist() == sorted(a.item_ids.tolist())
    assert a.user_ids.tolist() == b.user_ids.tolist() and a.item_ids.tolist() == b.item_ids.tolist()
    for f in ("hist_ptr", "hist_items", "valid_target", "test_target"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
