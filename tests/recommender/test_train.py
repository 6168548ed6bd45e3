"""Every backbone and variant learns on a tiny table; SR-GNN graphs; warm starts; one whole group."""

import numpy as np
import pytest
import torch
from rec_helpers import tiny_cfg
from slimrec.recommender.data import train_rows_per_position, train_rows_prefix
from slimrec.recommender.evaluation import Evaluator
from slimrec.recommender.models import SRGNN
from slimrec.recommender.priors import TrainCooc
from slimrec.recommender.runner import build_model, metrics_frame, results_table, run_baselines, run_group
from slimrec.recommender.train import MatchLoss, NegativeSampler, SeqLoss, seq_score_fn

BACKBONES = ["sasrec", "gru4rec", "srgnn"]
KEYS = ["base", "text", "teacher", "student"]


def _loss_falls(loss_mod, batch, steps=40, lr=1e-2):
    torch.manual_seed(0)
    opt = torch.optim.Adam(loss_mod.parameters(), lr=lr)
    loss_mod.train()
    first = None
    for _ in range(steps):
        loss = loss_mod(**batch)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss_mod.eval()
    with torch.no_grad():
        last = float(loss_mod(**batch))
    return first, last


def _seq_batch(data, cfg, model, rationale=None, joint=False):
    rng = np.random.default_rng(0)
    if model.per_position:
        inp, tgt, users = train_rows_per_position(data, cfg.max_len)
    else:
        inp, tgt, users = train_rows_prefix(data, cfg.max_len)
    inp, tgt, users = inp[:32], tgt[:32], users[:32]
    b = {"inp": torch.as_tensor(inp), "tgt": torch.as_tensor(tgt)}
    if cfg.loss != "ce":
        b["neg"] = torch.as_tensor(NegativeSampler(data).sample(rng, users, tgt.shape + (2,)))
    if rationale is not None:
        b["r"] = torch.as_tensor(rationale.vectors[users])
        b["pres"] = torch.as_tensor(rationale.present[users]).float()
    if joint:
        b["full"] = torch.as_tensor(np.concatenate([inp[:, :1], tgt], axis=1))
    return b


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("key", KEYS)
def test_every_backbone_and_variant_learns(tiny_data, backbone, key):
    cfg = tiny_cfg(dropout=0.0, rationale_dropout=0.0)
    torch.manual_seed(0)
    model = build_model(key, backbone, tiny_data, cfg)
    rat = tiny_data.rationales.get(key)
    first, last = _loss_falls(SeqLoss(model, cfg.loss), _seq_batch(tiny_data, cfg, model, rat))
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("loss", ["bpr", "ce"])
def test_other_losses_learn(tiny_data, loss):
    cfg = tiny_cfg(dropout=0.0, loss=loss)
    model = build_model("text", "sasrec", tiny_data, cfg)
    first, last = _loss_falls(SeqLoss(model, loss), _seq_batch(tiny_data, cfg, model))
    assert last < 0.8 * first


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_joint_transition_prior_learns(tiny_data, loss):
    cfg = tiny_cfg(dropout=0.0, loss=loss, cooc_mode="joint")
    model = build_model("cooc_joint", "sasrec", tiny_data, cfg)
    ev = Evaluator(tiny_data, cfg)
    lm = SeqLoss(model, loss, TrainCooc(ev.counts, 1, torch.device("cpu")))
    first, last = _loss_falls(lm, _seq_batch(tiny_data, cfg, model, joint=True))
    assert last < 0.8 * first


@pytest.mark.parametrize("joint", [False, True])
def test_ce_scores_only_positions_with_a_target(tiny_data, joint):
    """The loss over the positions with a target equals softmax cross-entropy of every position's full
    score row (padding item excluded), with and without the joint prior."""
    cfg = tiny_cfg(dropout=0.0, loss="ce", cooc_mode="joint")
    torch.manual_seed(0)
    model = build_model("cooc_joint" if joint else "base", "sasrec", tiny_data, cfg)
    cooc = TrainCooc(Evaluator(tiny_data, cfg).counts, 1, torch.device("cpu")) if joint else None
    b = _seq_batch(tiny_data, cfg, model, joint=joint)
    assert (b["tgt"] == 0).any() and (b["tgt"] > 0).any()  # padded positions are there to be left out
    model.eval()
    with torch.no_grad():
        got = SeqLoss(model, "ce", cooc)(**b)
        table = model.items.all_items()
        logits = model.user(b["inp"], None, None, table) @ table.T  # (B, L, N): every position
        if joint:
            logits = logits + model.prior_weight * cooc.full(b["full"])
        logits[..., 0] = float("-inf")
        keep = b["tgt"] > 0
        want = torch.nn.functional.cross_entropy(logits[keep], b["tgt"][keep])
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_text_matching_learns(tiny_data):
    cfg = tiny_cfg()
    model = build_model("text_matching", "none", tiny_data, cfg)
    rat = tiny_data.rationales["student"]
    users = np.repeat(np.arange(tiny_data.n_users), tiny_data.hist_len)[:64]
    items = tiny_data.hist_items[:64]
    neg = NegativeSampler(tiny_data).sample(np.random.default_rng(0), users, (64, 2))
    batch = {"r": torch.as_tensor(rat.vectors[users]), "pos_ids": torch.as_tensor(items), "neg_ids": torch.as_tensor(neg)}
    first, last = _loss_falls(MatchLoss(model, "bce"), batch)
    assert last < 0.8 * first


def test_srgnn_graph_by_hand():
    alias, node_item, node_mask, _, a_in, a_out = SRGNN.graph(torch.tensor([[0, 5, 7, 5, 9]]))
    assert alias.tolist() == [[0, 1, 2, 1, 3]]
    assert node_item[0, :4].tolist() == [0, 5, 7, 9] and node_mask[0, :4].tolist() == [False, True, True, True]
    # edges 5->7, 7->5, 5->9
    assert a_out[0, 1, :4].tolist() == [0, 0, 0.5, 0.5] and a_out[0, 2, :4].tolist() == [0, 1, 0, 0]
    assert a_in[0, 1, :4].tolist() == [0, 0, 1, 0] and a_in[0, 3, :4].tolist() == [0, 1, 0, 0]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_gated_fusion_warm_start_is_the_text_model(tiny_data, backbone):
    cfg = tiny_cfg()
    ev = Evaluator(tiny_data, cfg)
    text = build_model("text", backbone, tiny_data, cfg)
    slim = build_model("student", backbone, tiny_data, cfg)
    slim.load_state_dict(text.state_dict(), strict=False)
    users = np.arange(10)
    a = seq_score_fn(text, ev, None, "cpu")("valid", users)
    b = seq_score_fn(slim, ev, tiny_data.rationales["student"], "cpu")("valid", users)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_group_runs_every_variant(tiny_data, tmp_path):
    cfg = tiny_cfg(epochs=2, finetune_epochs=1, text_matching_epochs=1)
    ev = Evaluator(tiny_data, cfg)
    results, states, fits = run_group("sasrec", 0, [v for v in cfg.variants if v != "text_matching"],
                                      tiny_data, ev, cfg)
    assert set(states) == {"base", "text", "teacher", "student"}
    tm, _, _ = run_group("none", 0, ["text_matching"], tiny_data, ev, cfg)
    m = metrics_frame(results + tm + run_baselines(tiny_data, ev, cfg))
    names = set(m.variant)
    assert {"base", "text", "cooc_prior", "teacher", "slim", "slim_cooc", "text_matching", "random", "popular",
            "cooc", "slim@teacher_users", "random@teacher_users"} <= names
    assert set(m[m.variant == "teacher"].n_users) == {tiny_data.n_users // 2}
    assert set(m[m.variant == "slim"].n_users) == {tiny_data.n_users}
    assert len(m) == len(m.drop_duplicates(["backbone", "variant", "protocol", "split", "seed"]))
    assert "cooc_prior" in results_table(m)
    slim_cooc = next(r for r in results if r["variant"] == "slim_cooc")
    # the grounded prior and its two novelty parts (against the model and against the transition prior)
    assert set(slim_cooc["weights"]) == {"cooc", "grounded_student", "grounded_student_novel",
                                         "grounded_student_novel_cooc"}


def test_joint_prior_group_and_time_budget(tiny_data):
    cfg = tiny_cfg(cooc_mode="joint", epochs=50, time_budget_s=1e-9)  # any real epoch takes longer
    ev = Evaluator(tiny_data, cfg)
    results, states, fits = run_group("sasrec", 0, ["cooc_prior"], tiny_data, ev, cfg)
    assert set(states) == {"cooc_joint"} and "prior_weight" in states["cooc_joint"]
    assert fits["cooc_joint"]["epochs_run"] == 1  # the budget stops it after the first epoch
    assert set(results[0]["weights"]) == {"cooc"}


def test_users_with_a_retrieved_rationale_are_reported_apart(tiny_data):
    import copy

    data = copy.deepcopy(tiny_data)
    rat = data.rationales["student"]
    rat.retrieved = np.zeros(data.n_users, dtype=bool)
    rat.retrieved[::3] = True  # every third user's student rationale was retrieved from its neighbours
    cfg = tiny_cfg()
    m = metrics_frame(run_baselines(data, Evaluator(data, cfg), cfg))
    has = rat.present | (np.diff(rat.grounded_ptr) > 0)
    n = m[(m.split == "test") & (m.protocol == "full")].groupby("variant")["n_users"].max()
    assert n["popular@retrieved_users"] == int((has & rat.retrieved).sum()) > 0
    assert n["popular@student_users"] == int((has & ~rat.retrieved).sum()) > 0
    assert n["popular"] == data.n_users
    # without a retrieved rationale there are no such rows
    plain = metrics_frame(run_baselines(tiny_data, Evaluator(tiny_data, cfg), cfg))
    assert not plain["variant"].str.contains("retrieved_users|student_users").any()
