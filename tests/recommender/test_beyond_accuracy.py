"""Beyond-accuracy figures on tiny lists whose values are worked out by hand, and their path into the metrics rows."""

import math
from dataclasses import replace
from datetime import date

import numpy as np
import pyarrow as pa
import pytest
from rec_helpers import tiny_cfg
from slimrec.recommender.beyond import (
    BEYOND_NAMES,
    beyond_accuracy,
    coverage,
    exposure_counts,
    gini,
    intra_list_diversity,
    list_mean,
    popularity_percentiles,
    self_information,
)
from slimrec.recommender.evaluation import Evaluator, top_items
from slimrec.recommender.runner import metrics_frame, run_baselines
from slimrec.schemas.tables import spec

# Catalogue of 4 items (internal indices 1..4; index 0 is padding). Training counts: item 1 three times,
# item 2 once, items 3 and 4 never (total 4).
POP = np.array([0, 3, 1, 0, 0], dtype=np.float32)
LISTS = np.array([[1, 2], [1, 3]])  # two users' top-2 lists


def test_coverage_by_hand_with_a_short_list():
    # Catalogue of 5; the second user had only 2 candidates (0 = empty slot).
    lists = np.array([[1, 2, 3], [1, 4, 0]])
    # top 2: {1, 2} + {1, 4} = {1, 2, 4} -> 3 / 5
    assert coverage(lists, 5, 2) == pytest.approx(0.6)
    # top 3: {1, 2, 3, 4} -> 4 / 5 (the empty slot is not an item)
    assert coverage(lists, 5, 3) == pytest.approx(0.8)
    assert exposure_counts(lists, 5).tolist() == [0, 2, 1, 1, 1, 0]
    assert math.isnan(coverage(lists, 0, 2))


def test_gini_by_hand():
    # exposure of items 1..4 = [2, 1, 1, 0], sorted [0, 1, 1, 2], n = 4, sum 4; weights 2i - n - 1 = -3, -1, 1, 3:
    # (-3*0 - 1*1 + 1*1 + 3*2) / (4 * 4) = 6 / 16
    assert gini(LISTS, 4, 2) == pytest.approx(0.375)
    # every item once: perfectly even
    assert gini(np.array([[1, 2], [3, 4]]), 4, 2) == pytest.approx(0.0)
    # one item takes every slot: sorted [0, 0, 0, 2] -> 3*2 / (4*2) = 0.75 = (n - 1) / n
    assert gini(np.array([[1], [1]]), 4, 1) == pytest.approx(0.75)
    # never-recommended items count: 2 of 4 items each once -> sorted [0, 0, 1, 1]: (1 + 3) / (4 * 2) = 0.5
    assert gini(np.array([[1], [2]]), 4, 1) == pytest.approx(0.5)
    assert math.isnan(gini(np.zeros((2, 3), dtype=int), 4, 3))  # nothing recommended


def test_popularity_percentile_by_hand_with_an_item_never_seen_in_training():
    # counts [3, 1, 0, 0]: item 1 above 3 items -> (3 + 0.5) / 4; item 2 above 2 -> (2 + 0.5) / 4;
    # items 3 and 4 tie at 0 -> (0 + 0.5 * 2) / 4
    assert popularity_percentiles(POP, 4).tolist() == pytest.approx([0, 87.5, 62.5, 25.0, 25.0])
    # user means: (87.5 + 62.5) / 2 = 75 and (87.5 + 25) / 2 = 56.25 -> 65.625
    assert list_mean(LISTS, popularity_percentiles(POP, 4), 2) == pytest.approx(65.625)


def test_novelty_by_hand_with_an_item_never_seen_in_training():
    # -log2(3/4) = log2(4) - log2(3) = 2 - 1.5849625 = 0.4150375; -log2(1/4) = 2; item 3 (never seen)
    # counts as seen once: -log2(1/4) = 2
    assert self_information(POP, 4).tolist() == pytest.approx([0, 0.4150375, 2, 2, 2])
    # user 1: (0.4150375 + 2) / 2 = 1.20751875; user 2: (0.4150375 + 2) / 2 the same
    assert list_mean(LISTS, self_information(POP, 4), 2) == pytest.approx(1.20751875)


def test_list_means_weigh_every_user_the_same_and_skip_empty_slots_and_lists():
    per_item = np.array([0.0, 10.0, 20.0, 30.0])
    # user 1 [1, 2] -> 15; user 2 [3] (one candidate) -> 30; user 3 no candidate -> left out; mean (15 + 30) / 2
    lists = np.array([[1, 2], [3, 0], [0, 0]])
    assert list_mean(lists, per_item, 2) == pytest.approx(22.5)
    assert math.isnan(list_mean(np.zeros((2, 2), dtype=int), per_item, 2))


def test_intra_list_diversity_by_hand():
    r = 1 / math.sqrt(2)
    vectors = np.array([[0, 0], [1, 0], [0, 1], [r, r], [3, 3]], dtype=np.float32)  # item 4: same direction as 3
    # list [1, 2, 3]: cos(1,2) = 0, cos(1,3) = cos(2,3) = 1/sqrt(2); mean distance 1 - (2/sqrt(2)) / 3
    # = 1 - sqrt(2)/3 = 0.52859548; list [1, 2]: 1 - 0 = 1; mean over users 0.76429774
    lists = np.array([[1, 2, 3], [1, 2, 0]])
    assert intra_list_diversity(lists, vectors, 3) == pytest.approx(0.76429774)
    # length does not matter, direction does: items 3 and 4 are at distance 0
    assert intra_list_diversity(np.array([[3, 4]]), vectors, 2) == pytest.approx(0.0, abs=1e-7)
    # batching users gives the same mean
    assert intra_list_diversity(lists, vectors, 3, batch_users=1) == pytest.approx(0.76429774)
    # item 3 without a vector: list 1 keeps the pair (1, 2) only -> 1; list 2 -> 1
    present = np.array([False, True, True, False, True])
    assert intra_list_diversity(lists, vectors, 3, present) == pytest.approx(1.0)
    # no list has two items with a vector
    assert math.isnan(intra_list_diversity(np.array([[1, 0], [2, 0]]), vectors, 2))


def test_intra_list_diversity_against_every_pair():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(31, 5)).astype(np.float32)
    vectors[0] = 0
    lists = np.array([rng.choice(np.arange(1, 31), size=10, replace=False) for _ in range(7)])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    per_user = [np.mean([1 - unit[a] @ unit[b] for i, a in enumerate(row) for b in row[i + 1 :]]) for row in lists]
    assert intra_list_diversity(lists, vectors, 10) == pytest.approx(np.mean(per_user), rel=1e-5)


def test_all_figures_at_once_and_ild_absent_without_vectors():
    lists = np.array([[1, 2], [1, 3]])
    values, reasons = beyond_accuracy(lists, POP, 4)
    assert "ild_10" not in values and reasons == {"ild_10": "no item text vectors in this run"}
    # with K = 2 lists, the @10 and @20 figures are those of the whole lists (worked out above)
    assert values == pytest.approx({"coverage_10": 0.75, "coverage_20": 0.75, "gini_10": 0.375,
                                    "popularity_pct_10": 65.625, "novelty_10": 1.20751875})
    vectors = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [1, 1]], dtype=np.float32)
    values, reasons = beyond_accuracy(lists, POP, 4, vectors)
    # list [1, 2]: 1 - 0 = 1; list [1, 3]: 1 - 1/sqrt(2) = 0.29289322; mean 0.64644661
    assert values["ild_10"] == pytest.approx(0.64644661) and reasons == {}
    assert set(values) == set(BEYOND_NAMES)


@pytest.mark.parametrize("lists, why", [
    (np.zeros((0, 20), dtype=int), "no users"),
    (np.zeros((3, 20), dtype=int), "no recommended item (every top-K list is empty)"),
])
def test_no_users_or_empty_lists_give_nan_and_a_reason(lists, why):
    vectors = np.eye(5, dtype=np.float32)
    values, reasons = beyond_accuracy(lists, POP, 4, vectors)
    assert set(values) == set(BEYOND_NAMES) and all(math.isnan(v) for v in values.values())
    assert reasons == {n: why for n in BEYOND_NAMES}


def test_no_training_interactions_leaves_only_novelty_unmeasured():
    values, reasons = beyond_accuracy(LISTS, np.zeros(5), 4)
    assert math.isnan(values["novelty_10"]) and reasons["novelty_10"] == "no training interactions"
    # every count ties at 0: each item sits at (0 + 0.5 * 4) / 4 = 50
    assert values["popularity_pct_10"] == pytest.approx(50.0) and values["coverage_10"] == pytest.approx(0.75)
    values, reasons = beyond_accuracy(LISTS, POP, 0)
    assert reasons["coverage_10"] == "empty catalogue"


def test_top_items_best_first_and_empty_slots():
    s = np.array([[-np.inf, 0.2, -np.inf, 0.9], [-np.inf, 0.1, 0.3, 0.2]], dtype=np.float32)
    # row 1: only columns 1 and 3 are candidates -> [3, 1, 0]; row 2: 2 (0.3), 3 (0.2), 1 (0.1)
    assert top_items(s, 3).tolist() == [[3, 1, 0], [2, 3, 1]]
    # k beyond the number of columns: padded with 0
    assert top_items(s, 6).tolist() == [[3, 1, 0, 0, 0, 0], [2, 3, 1, 0, 0, 0]]
    assert top_items(np.zeros((0, 4), np.float32), 3).shape == (0, 3)


def test_lists_are_the_full_ranking_candidates_of_the_test_split(tiny_data):
    ev = Evaluator(tiny_data, tiny_cfg())
    per_user, lists = ev.per_user_and_lists(ev.popular_fn())
    assert lists.shape == (tiny_data.n_users, 20)
    same = ev.per_user(ev.popular_fn())
    for key in same:  # the lists come from the same pass, which measures exactly what per_user does
        np.testing.assert_array_equal(per_user[key]["ndcg_10"], same[key]["ndcg_10"])
    ptr, seq = tiny_data.split_sequences("test")
    for u in range(tiny_data.n_users):
        excluded = set(seq[ptr[u] : ptr[u + 1]].tolist()) - {int(tiny_data.test_target[u])}
        row = lists[u][lists[u] > 0]
        # 24 items, at least 5 distinct in the input: fewer than 20 candidates, so the tail is empty
        assert len(row) == tiny_data.n_items - len(excluded) < 20
        assert not set(row.tolist()) & excluded and (lists[u][len(row) :] == 0).all()
        pops = ev.popularity[row]
        assert (np.diff(pops) <= 0).all()  # most popular first


def test_metrics_rows_carry_the_figures_on_test_full_only(tiny_data):
    cfg = tiny_cfg(seeds=[0, 1])
    ev = Evaluator(tiny_data, cfg)
    m = metrics_frame(run_baselines(tiny_data, ev, cfg))
    assert set(BEYOND_NAMES) <= set(m.columns)
    on = (m.split == "test") & (m.protocol == "full")
    assert m.loc[~on, list(BEYOND_NAMES)].isna().all().all()
    assert m.loc[on, list(BEYOND_NAMES)].notna().all().all()  # the tiny data has item text vectors
    full = m[on & ~m.variant.str.contains("@")].groupby("variant")[list(BEYOND_NAMES)].mean()
    # most-popular lists concentrate on the catalogue's head; random ones spread over it
    assert full.loc["popular", "popularity_pct_10"] > full.loc["random", "popularity_pct_10"]
    assert full.loc["popular", "gini_10"] > full.loc["random", "gini_10"]
    assert full.loc["popular", "novelty_10"] < full.loc["random", "novelty_10"]
    assert (m.loc[on, "coverage_20"] >= m.loc[on, "coverage_10"]).all()
    # the metrics table takes these rows as they are (nulls where a figure is not measured)
    rows = m.assign(run_id="r", dataset="d", seed=m.seed.astype("int32"), run_date=date(2024, 1, 1),
                    input_versions="{}")
    t = spec("metrics").conform_arrow(pa.Table.from_pandas(rows, preserve_index=False))
    assert t.column("ild_10").null_count == int((~on).sum())


def test_a_run_without_item_vectors_has_no_diversity(tiny_data):
    data = replace(tiny_data, item_text=None, item_text_present=None)
    cfg = tiny_cfg()
    ev = Evaluator(data, cfg)
    res = run_baselines(data, ev, cfg)
    m = metrics_frame(res)
    on = (m.split == "test") & (m.protocol == "full")
    assert m.loc[on, "ild_10"].isna().all() and m.loc[on, "coverage_10"].notna().all()
    assert res[0]["beyond_reasons"]["all/ild_10"] == "no item text vectors in this run"
