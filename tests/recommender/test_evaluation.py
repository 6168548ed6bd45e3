"""Both protocols: exclusions, sampled negatives, weights chosen on validation, planted signals."""

import numpy as np
import pytest
import torch
from rec_helpers import tiny_cfg
from slimrec.recommender.evaluation import Evaluator, sample_negatives
from slimrec.recommender.models import TextMatching
from slimrec.recommender.train import match_score_fn


def test_sampled_negatives_never_the_users_items(tiny_data):
    neg, ok = sample_negatives(tiny_data, 10, seed=7)
    ptr, items = tiny_data.split_sequences("serve")
    for u in range(tiny_data.n_users):
        seen = set(items[ptr[u] : ptr[u + 1]].tolist())
        drawn = neg[u][ok[u]].tolist()
        assert not seen & set(drawn)
        assert len(set(drawn)) == len(drawn) == 10
        assert all(1 <= i <= tiny_data.n_items for i in drawn)


def test_sampled_negatives_seeded_and_short_catalogue(tiny_data):
    a, _ = sample_negatives(tiny_data, 10, seed=7)
    b, _ = sample_negatives(tiny_data, 10, seed=7)
    c, _ = sample_negatives(tiny_data, 10, seed=8)
    assert (a == b).all() and (a != c).any()
    neg, ok = sample_negatives(tiny_data, 100, seed=7)  # only 24 - len(seq) items are free
    lens = np.diff(tiny_data.split_sequences("serve")[0])
    assert ok.sum(1).tolist() == (tiny_data.n_items - lens).tolist()


def _planted(data, which):
    def fn(split, users):
        s = np.zeros((len(users), data.n_items + 1), np.float32)
        s[np.arange(len(users)), data.targets(split)[users] if which == "target" else data.valid_target[users]] = 2
        if which == "valid_then_test":
            s[np.arange(len(users)), data.test_target[users]] = 1
        s[:, 1:] += np.linspace(0, 0.5, data.n_items, dtype=np.float32)  # no ties elsewhere
        return s

    return fn


def test_planted_perfect_signal_ranks_target_first(tiny_data):
    ev = Evaluator(tiny_data, tiny_cfg())
    res = ev.per_user(_planted(tiny_data, "target"))
    for m in res.values():
        for name, v in m.items():
            assert v.min() == pytest.approx(1.0), name


def test_full_ranking_excludes_history_and_valid_target(tiny_data):
    # the valid target outscores the test target; at test time it is history, so it is excluded
    ev = Evaluator(tiny_data, tiny_cfg())
    res = ev.per_user(_planted(tiny_data, "valid_then_test"), splits=("test",))
    assert res[("test", "full")]["mrr"].min() == 1.0
    assert res[("test", "sampled100")]["mrr"].min() == 1.0


def test_history_items_never_counted_against_target(tiny_data):
    def fn(split, users):  # every history item scores highest, the target next
        s = np.zeros((len(users), tiny_data.n_items + 1), np.float32)
        ptr, items = tiny_data.split_sequences(split)
        for r, u in enumerate(users):
            s[r, items[ptr[u] : ptr[u + 1]]] = 5
        s[np.arange(len(users)), tiny_data.targets(split)[users]] = 3
        return s

    res = Evaluator(tiny_data, tiny_cfg()).per_user(fn, protocols=("full",))
    assert res[("valid", "full")]["hr_10"].min() == 1.0 and res[("test", "full")]["mrr"].min() == 1.0


def test_weights_chosen_on_validation(tiny_data):
    ev = Evaluator(tiny_data, tiny_cfg(prior_weight_grid=[0.0, 0.5, 3.0]))
    noise = ev.random_fn(3)
    w, v = ev.choose_weights(noise, [_planted(tiny_data, "target")])
    assert w[0] > 0 and v == pytest.approx(1.0)
    w, _ = ev.choose_weights(_planted(tiny_data, "target"), [noise])
    assert w == (0.0,)  # the smallest of the equally good weights


def test_text_matching_planted_rationale_ranks_test_target_first(tiny_data):
    # the synthetic student rationale IS the test target's text vector: cosine 1
    ev = Evaluator(tiny_data, tiny_cfg())
    tm = TextMatching(torch.as_tensor(tiny_data.item_text))
    res = ev.per_user(match_score_fn(tm, tiny_data.rationales["student"], "cpu"), splits=("test",))
    assert res[("test", "full")]["ndcg_10"].mean() == pytest.approx(1.0)


def test_top_k_excludes_the_whole_sequence(tiny_data):
    ev = Evaluator(tiny_data, tiny_cfg())
    items, scores = ev.top_k(ev.random_fn(0), k=5)
    ptr, seq = tiny_data.split_sequences("serve")
    for u in range(tiny_data.n_users):
        assert not set(items[u].tolist()) & set(seq[ptr[u] : ptr[u + 1]].tolist())
        assert (np.diff(scores[u]) <= 0).all() and 0 not in items[u]


def test_a_user_with_fewer_candidates_than_k_is_served_only_candidates(tiny_data):
    from slimrec.recommender.experiment import top_k_frame

    ev = Evaluator(tiny_data, tiny_cfg())
    k = tiny_data.n_items  # more than any user's candidates: every list has excluded (-inf) fill
    rows = np.arange(tiny_data.n_users)
    items, scores = ev.top_k(ev.random_fn(0), k=k)
    recs = top_k_frame(tiny_data, rows, items, scores)
    ptr, seq = tiny_data.split_sequences("serve")
    for u, (ids, sc) in enumerate(zip(recs["item_ids"], recs["scores"], strict=True)):
        seen = {tiny_data.item_ids[i - 1] for i in seq[ptr[u] : ptr[u + 1]].tolist()}
        assert len(ids) == len(sc) == tiny_data.n_items - len(seen)  # every candidate once, nothing else
        assert not set(ids) & seen and np.isfinite(sc).all()


def test_baselines_random_and_popular(tiny_data):
    ev = Evaluator(tiny_data, tiny_cfg())
    full = ev.per_user(ev.random_fn(0), protocols=("sampled100",), splits=("test",))
    # 10 sampled negatives + target: random HR@10 is about 10/11
    assert 0.7 < full[("test", "sampled100")]["hr_10"].mean() <= 1.0
    pop = ev.popularity
    assert pop[0] == 0 and pop.sum() == len(tiny_data.hist_items)


def test_two_priors_coordinate_ascent_keeps_the_useless_one_at_zero(tiny_data):
    ev = Evaluator(tiny_data, tiny_cfg(prior_weight_grid=[0.0, 0.5, 3.0]))
    w, v = ev.choose_weights(ev.random_fn(3), [ev.random_fn(4), _planted(tiny_data, "target")])
    assert w[0] == 0.0 and w[1] > 0 and v == pytest.approx(1.0)


def test_novel_grounded_prior_lifts_what_the_model_does_not_already_rank(tiny_data):
    """A rationale names the model's own top items (decoys) and both held-out targets: the plain grounded
    prior ties the target with the decoys; the novel part, weighted on validation, ranks it first."""
    n = tiny_data.n_items
    decoys = np.arange(n - 3, n + 1)  # the 4 last items: the model's favourites for every user

    def model(split, users):
        s = np.zeros((len(users), n + 1), np.float32)
        s[:, decoys] = 1.0
        return s

    def grounded(split, users):
        g = np.zeros((len(users), n + 1), np.float32)
        g[:, decoys] = 1.0
        g[np.arange(len(users)), tiny_data.targets("valid")[users]] = 1.0
        g[np.arange(len(users)), tiny_data.targets("test")[users]] = 1.0
        return g

    ev = Evaluator(tiny_data, tiny_cfg(prior_weight_grid=[0.0, 1.0, 4.0]))
    ev.grounded_fn = lambda source: grounded
    plain = [ev.grounded_fn("teacher")]
    both = [*plain, ev.grounded_novel_fn("teacher", model, len(decoys))]
    w1, _ = ev.choose_weights(model, plain)
    w2, _ = ev.choose_weights(model, both)
    target_in_decoys = np.isin(tiny_data.targets("test"), decoys)
    one = ev.per_user(model, plain, w1, splits=("test",), protocols=("full",))[("test", "full")]["ndcg_10"]
    two = ev.per_user(model, both, w2, splits=("test",), protocols=("full",))[("test", "full")]["ndcg_10"]
    assert w2[1] > 0
    assert one[~target_in_decoys].mean() < 0.8  # tied with the decoys (unless they are history)
    assert two[~target_in_decoys].min() == pytest.approx(1.0)


def test_novelty_is_measured_on_the_input_the_rationale_was_written_from(tiny_data):
    """The reference score differs by split: on the validation input (the rationale's history) it ranks
    item A first, on the test input item B. A rationale naming A and B: at the test position the novel part
    is B (A was obvious from the rationale's history), not A."""
    a, b = 1, 2
    users = np.arange(3)

    def ref(split, us):
        s = np.zeros((len(us), tiny_data.n_items + 1), np.float32)
        s[:, a if split == "valid" else b] = 5.0
        return s

    def grounded(split, us):
        g = np.zeros((len(us), tiny_data.n_items + 1), np.float32)
        g[:, [a, b]] = 1.0
        return g

    ev = Evaluator(tiny_data, tiny_cfg())
    ev.grounded_fn = lambda source: grounded
    for split in ("valid", "test"):
        n = ev.grounded_novel_fn("teacher", ref, 1)(split, users)
        assert (n[:, a] == 0).all() and (n[:, b] == 1).all() and n.sum() == len(users)


def test_score_memo_asks_each_batch_once_within_its_budget():
    from slimrec.recommender.evaluation import ScoreMemo

    calls = []

    def fn(split, users):
        calls.append((split, tuple(users)))
        return np.full((len(users), 5), float(len(calls)), np.float32)

    memo = ScoreMemo(2 * 3 * 5 * 4)  # room for two answers of 3 users x 5 columns of float32
    f = memo(fn)
    a = f("valid", np.arange(3))
    assert f("valid", np.arange(3)) is a and not a.flags.writeable  # kept, and nobody may change it
    with pytest.raises(ValueError):
        a[0, 0] = 9
    f("test", np.arange(3))
    f("valid", np.arange(3, 6))  # the budget is spent: computed, not kept
    f("valid", np.arange(3, 6))
    assert calls == [("valid", (0, 1, 2)), ("test", (0, 1, 2)), ("valid", (3, 4, 5)), ("valid", (3, 4, 5))]
    assert f("valid", np.arange(3, 6)).flags.writeable  # not kept: the caller's own copy
    # one budget for every function wrapped by the same memo; a broadcast view is never kept
    g = memo(lambda split, users: np.broadcast_to(np.zeros(5, np.float32), (len(users), 5)))
    assert g("valid", np.arange(3)) is not g("valid", np.arange(3))


def test_evaluating_a_variant_with_kept_scores_changes_no_figure(tiny_data):
    """The scores a variant's evaluation keeps (recommender.eval_cache_mb) leave every figure as it was."""
    import json

    from slimrec.recommender.runner import build_model, evaluate_variant, model_key, score_fn_for

    for variant in ("slim_cooc", "teacher_cooc"):
        results = []
        for mb in (0, 256):
            cfg = tiny_cfg(eval_cache_mb=mb, grounded_prior=True, grounded_novel_rank=3)
            ev = Evaluator(tiny_data, cfg)
            key = model_key(variant, cfg, "sasrec")
            torch.manual_seed(0)
            model = build_model(key, "sasrec", tiny_data, cfg)
            calls = []

            def counted(split, users, fn=score_fn_for(key, model, tiny_data, ev, torch.device("cpu")), calls=calls):
                calls.append(split)
                return fn(split, users)

            results.append((json.dumps(evaluate_variant(variant, counted, tiny_data, ev, cfg), sort_keys=True,
                                       default=str), len(calls)))
        (uncached, n_uncached), (cached, n_cached) = results
        assert cached == uncached, variant
        assert n_cached < n_uncached and n_cached <= 2 * -(-tiny_data.n_users // 32)  # each batch of each split once
