"""Training loops: one model fit with early stopping on validation NDCG@10, on plain numpy inputs.

Rows (see :mod:`data`): SASRec and GRU4Rec learn from every position of a
user's history at once; SR-GNN from every history prefix; text matching from
(user rationale, history item) pairs. Losses: ``bce`` (the paper: one
positive against ``num_negatives`` sampled negatives per position, negatives
never among the user's history items), ``bpr``, or ``ce`` (softmax over every
item). Early stopping keeps the state with the best validation NDCG@10 (model
scores alone, under ``early_stop_protocol``); a warm-started fit is validated
once before its first step, so it can only keep or improve its start.

Data-parallel: with ``world > 1`` (Ray Train DDP) every rank takes an equal
share of each epoch's shuffled rows and all ranks validate on the same users,
so they agree on when to stop without talking.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimrec.recommender.data import RationaleData, RecData, train_rows_per_position, train_rows_prefix
from slimrec.recommender.evaluation import Evaluator, ScoreFn
from slimrec.recommender.models import SeqRecModel, TextMatching
from slimrec.recommender.priors import TrainCooc

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ memory
class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every ``interval_s``), in MiB."""

    def __init__(self, interval_s: float = 0.05):
        import psutil

        self._proc = psutil.Process()
        self.interval_s = interval_s
        self.peak_mib = 0.0
        self.start_mib = 0.0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self._proc.memory_info().rss / 2**20)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.start_mib = self.peak_mib = self._proc.memory_info().rss / 2**20
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak_mib = max(self.peak_mib, self._proc.memory_info().rss / 2**20)


# ------------------------------------------------------------------------------------------ negatives
class NegativeSampler:
    """Uniform item indices in 1..n_items, resampled while they hit the user's history (up to 10 rounds)."""

    def __init__(self, data: RecData):
        self.n = data.n_items
        self.stride = data.n_items + 1
        users = np.repeat(np.arange(data.n_users), data.hist_len)
        self.keys = np.unique(users * self.stride + data.hist_items)

    def member(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        u = users.reshape(users.shape + (1,) * (items.ndim - users.ndim))
        key = u * self.stride + items
        if len(self.keys) == 0:
            return np.zeros(items.shape, dtype=bool)
        pos = np.searchsorted(self.keys, key).clip(0, len(self.keys) - 1)
        return self.keys[pos] == key

    def sample(self, rng: np.random.Generator, users: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        neg = rng.integers(1, self.n + 1, size=shape)
        for _ in range(10):
            hit = self.member(users, neg)
            if not hit.any():
                break
            neg[hit] = rng.integers(1, self.n + 1, size=int(hit.sum()))
        return neg


# ------------------------------------------------------------------------------------------ losses
def _pointwise_loss(kind: str, pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pos (...,), neg (..., K), mask (...,) bool over real targets."""
    if kind == "bce":
        return F.softplus(-pos)[mask].mean() + F.softplus(neg)[mask].mean()
    if kind == "bpr":
        return -F.logsigmoid(pos.unsqueeze(-1) - neg)[mask].mean()
    raise ValueError(kind)


class SeqLoss(nn.Module):
    """The training forward of a :class:`SeqRecModel` (DDP wraps this module)."""

    def __init__(self, model: SeqRecModel, loss: str, cooc: TrainCooc | None = None):
        super().__init__()
        self.model, self.loss, self.cooc = model, loss, cooc

    def forward(self, inp, tgt, neg=None, r=None, pres=None, full=None):
        m = self.model
        # With text fusion, items are cheaper to encode once per step than per looked-up id when the
        # catalogue is smaller than the ids the step touches (inputs, targets, negatives).
        n_ids = inp.numel() + tgt.numel() + (neg.numel() if neg is not None else 0)
        table = m.items.all_items() if self.loss == "ce" or (m.items.use_text and m.items.n_rows <= n_ids) else None
        out = m.user(inp, r, pres, table)  # (B, L, d) or (B, d)
        mask = tgt > 0
        w = m.prior_weight
        if self.loss == "ce":
            # scores only where there is a target: padded positions (most of a short history's row, every
            # position but the last of a prefix row) would cost a full (B, L, N) product for nothing
            logits = out[mask] @ table.T  # (M, N)
            if w is not None and self.cooc is not None:
                logits = logits + w * self.cooc.full(full)[mask]
            logits[:, 0] = float("-inf")
            return F.cross_entropy(logits, tgt[mask])
        pos = (out * m.items(tgt, table)).sum(-1)  # (B, L) or (B,)
        negl = (out.unsqueeze(-2) * m.items(neg, table)).sum(-1)  # (B, L, K) or (B, K)
        if w is not None and self.cooc is not None:
            pos = pos + w * self.cooc.at(full, tgt.unsqueeze(-1)).squeeze(-1)
            negl = negl + w * self.cooc.at(full, neg)
        return _pointwise_loss(self.loss, pos, negl, mask)


class MatchLoss(nn.Module):
    def __init__(self, model: TextMatching, loss: str):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, r, pos_ids, neg_ids):
        u = self.model.user_vectors(r)  # (B, D)
        if self.loss == "ce":
            logits = u @ self.model.item_vectors().T
            logits[:, 0] = float("-inf")
            return F.cross_entropy(logits, pos_ids)
        pos = (u * self.model.item_vectors(pos_ids)).sum(-1)
        neg = (u.unsqueeze(1) * self.model.item_vectors(neg_ids)).sum(-1)
        return _pointwise_loss(self.loss, pos, neg, torch.ones_like(pos, dtype=torch.bool))


# ------------------------------------------------------------------------------------------ score functions
def seq_score_fn(model: SeqRecModel, ev: Evaluator, rat: RationaleData | None, device) -> ScoreFn:
    """Eval-mode scores of every item for ``users``: s_u . z_i (+ learned weight x transition prior)."""
    cooc = ev.cooc_fn() if model.prior_weight is not None else None

    def fn(split, users):
        was = model.training
        model.eval()
        with torch.inference_mode():
            ids = torch.as_tensor(ev.inputs[split][users], device=device)
            r = pres = None
            if model.fusion is not None and rat is not None:
                r = torch.as_tensor(rat.vectors[users], device=device)
                pres = torch.as_tensor(rat.present[users], device=device).float()
            s = model.user_last(ids, r, pres) @ model.items.all_items().T
            out = s.float().cpu().numpy()
        model.train(was)
        if cooc is not None:
            out = out + float(model.prior_weight.detach()) * cooc(split, users)
        return out

    return fn


def match_score_fn(model: TextMatching, rat: RationaleData, device) -> ScoreFn:
    def fn(split, users):
        with torch.inference_mode():
            u = model.user_vectors(torch.as_tensor(rat.vectors[users], device=device))
            return (u @ model.item_vectors().T).float().cpu().numpy()

    return fn


# ------------------------------------------------------------------------------------------ fit
@dataclass
class FitResult:
    state: dict
    best_epoch: int
    best_valid: float
    epochs_run: int
    train_seconds: float
    seconds_per_epoch: float
    peak_rss_mib: float
    rss_start_mib: float = 0.0
    history: list[dict] = field(default_factory=list)


def _to(x, device):
    return torch.as_tensor(x, device=device)


def _fit_loop(loss_mod, params_model, make_batches, n_rows, score_fn, ev, cfg, *, epochs, lr, seed, rank, world,
              valid_users, validate_first, label, device) -> FitResult:
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, rank])
    opt = torch.optim.Adam(loss_mod.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    best, best_epoch, bad = -np.inf, 0, 0
    best_state = copy.deepcopy(params_model.state_dict())
    history: list[dict] = []
    if validate_first:
        best = ev.ndcg10(score_fn, valid_users)
        history.append({"epoch": 0, "valid_ndcg_10": best})
        log.info("%s epoch 0 valid NDCG@10 %.4f", label, best)
    train_s, epoch = 0.0, 0
    with PeakRSS() as mem:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            loss_mod.train()
            perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
            per = len(perm) // world if world > 1 else len(perm)
            shard = perm[: per * world][rank::world] if world > 1 else perm
            total, steps = 0.0, 0
            for i in range(0, len(shard), cfg.batch_size):
                batch = make_batches(shard[i : i + cfg.batch_size], rng)
                loss = loss_mod(**{k: _to(v, device) if v is not None else None for k, v in batch.items()})
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            train_s += time.perf_counter() - t0
            rec = {"epoch": epoch, "loss": total / max(steps, 1)}
            if epoch % cfg.eval_every == 0 or epoch == epochs:
                v = ev.ndcg10(score_fn, valid_users)
                rec["valid_ndcg_10"] = v
                if v > best:
                    best, best_epoch, bad = v, epoch, 0
                    best_state = copy.deepcopy(params_model.state_dict())
                else:
                    bad += 1
            history.append(rec)
            log.info("%s epoch %d loss %.4f valid NDCG@10 %s (%.2fs)", label, epoch, rec["loss"],
                     f"{rec['valid_ndcg_10']:.4f}" if "valid_ndcg_10" in rec else "-", time.perf_counter() - t0)
            if bad >= cfg.patience:
                break
            if cfg.time_budget_s is not None and train_s >= cfg.time_budget_s:
                log.info("%s time budget of %.0f s spent after epoch %d", label, cfg.time_budget_s, epoch)
                break
    params_model.load_state_dict(best_state)
    return FitResult(
        state={k: v.detach().cpu() for k, v in best_state.items()},
        best_epoch=best_epoch,
        best_valid=float(best),
        epochs_run=epoch,
        train_seconds=train_s,
        seconds_per_epoch=train_s / max(epoch, 1),
        peak_rss_mib=mem.peak_mib,
        rss_start_mib=mem.start_mib,
        history=history,
    )


def valid_user_sample(data: RecData, cfg) -> np.ndarray | None:
    if cfg.valid_max_users is None or cfg.valid_max_users >= data.n_users:
        return None
    rng = np.random.default_rng(cfg.eval_seed)
    return np.sort(rng.choice(data.n_users, cfg.valid_max_users, replace=False))


def fit_seq_model(
    model: SeqRecModel,
    data: RecData,
    ev: Evaluator,
    cfg,
    *,
    seed: int,
    rationale: RationaleData | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    validate_first: bool = False,
    device=None,
    rank: int = 0,
    world: int = 1,
    ddp_wrap=None,
    label: str = "",
) -> FitResult:
    """Train ``model`` in place (left at its best validation state) and return the fit's record."""
    device = device or torch.device("cpu")
    model.to(device)
    cooc = None
    if model.prior_weight is not None:
        if not model.per_position:
            raise ValueError("cooc_mode=joint needs a per-position backbone (sasrec, gru4rec)")
        cooc = TrainCooc(ev.counts, cfg.cooc_window, device)
    loss_mod = SeqLoss(model, cfg.loss, cooc)
    if ddp_wrap is not None:
        loss_mod = ddp_wrap(loss_mod)
    sampler = NegativeSampler(data)
    K = cfg.num_negatives
    if model.per_position:
        inputs, targets, row_user = train_rows_per_position(data, cfg.max_len)
    else:
        inputs, targets, row_user = train_rows_prefix(data, cfg.max_len)
    use_r = model.fusion is not None and rationale is not None

    def make(idx, rng):
        u = row_user[idx]
        inp, tgt = inputs[idx], targets[idx]
        b = {"inp": inp, "tgt": tgt}
        if cfg.loss != "ce":
            b["neg"] = sampler.sample(rng, u, tgt.shape + (K,))
        if use_r:
            b["r"] = rationale.vectors[u]
            pres = rationale.present[u].astype(np.float32)
            if model.per_position and cfg.rationale_positions == "last":
                p2 = np.zeros(inp.shape, dtype=np.float32)
                p2[:, -1] = pres
                pres = p2
            b["pres"] = pres
        if cooc is not None:
            b["full"] = np.concatenate([inp[:, :1], tgt], axis=1)
        return b

    return _fit_loop(
        loss_mod, model, make, len(inputs), seq_score_fn(model, ev, rationale, device), ev, cfg,
        epochs=cfg.epochs if epochs is None else epochs, lr=lr or cfg.lr, seed=seed, rank=rank, world=world,
        valid_users=valid_user_sample(data, cfg), validate_first=validate_first, label=label, device=device,
    )


def fit_text_matching(
    model: TextMatching, data: RecData, ev: Evaluator, cfg, rationale: RationaleData, *, seed: int, device=None,
    rank: int = 0, world: int = 1, ddp_wrap=None, label: str = "",
) -> FitResult:
    """Fit g_t on (rationale_u, history item) pairs of users with a rationale; epoch 0 is plain cosine."""
    device = device or torch.device("cpu")
    model.to(device)
    loss_mod = MatchLoss(model, cfg.loss)
    if ddp_wrap is not None:
        loss_mod = ddp_wrap(loss_mod)
    sampler = NegativeSampler(data)
    users = np.repeat(np.arange(data.n_users), data.hist_len)
    keep = rationale.present[users]
    pair_user, pair_item = users[keep], data.hist_items[keep]

    def make(idx, rng):
        u = pair_user[idx]
        return {
            "r": rationale.vectors[u],
            "pos_ids": pair_item[idx],
            "neg_ids": sampler.sample(rng, u, (len(idx), cfg.num_negatives)),
        }

    return _fit_loop(
        loss_mod, model, make, len(pair_user), match_score_fn(model, rationale, device), ev, cfg,
        epochs=cfg.text_matching_epochs, lr=cfg.lr, seed=seed, rank=rank, world=world,
        valid_users=valid_user_sample(data, cfg), validate_first=True, label=label, device=device,
    )
