"""slimrec's SASRec and evaluator side by side with RecBole's, on the same leave-one-out split.

    bash bench/recbole_env.sh          # once: RecBole in its own virtual environment, bench/.recbole-venv
    python -m bench.recbole [--seeds 0,1] [--explain-seeds 0] [--epochs 10] [--patience 5] [--no-explain] [--quick]
                            [--reuse-recbole bench/results/recbole.json]

Why a separate environment: RecBole 1.2.1 (the latest release) requires ``ray<=2.6.3``, and
``pip install --dry-run recbole==1.2.1`` in the project's venv would replace the pinned
``ray==2.60.0`` with 2.6.3. Its code also predates numpy 2, so ``bench/recbole_env.sh`` gives it
numpy 1.26 and pandas 2.2 next to the project's torch 2.13 (CPU wheel), in ``bench/.recbole-venv``.
RecBole's side runs there as a subprocess (:mod:`bench.recbole_run`); nothing of RecBole is
imported here.

Steps (one results file, ``bench/results/recbole.json``):

1. slimrec's split of the bundled data (the :class:`RecData` that ``bench.recommender`` builds) is
   written as RecBole atomic files (:func:`write_atomic`): one ``.inter`` row per interaction,
   users in RecData order, each user's history, validation target and test target in that order,
   ``timestamp`` the row number (unique, so RecBole's time ordering has no ties). RecBole reads it
   with ``eval_args: {group_by: user, order: TO, split: {LS: valid_and_test}, mode: full}``.
2. RecBole's SASRec trains per seed in the RecBole venv; its validation and test rows (users,
   targets, model inputs) come back and are checked against slimrec's split: every user's test
   and validation target, and the input RecBole's model reads (the last ``max_len`` items before
   the target). A mismatch stops the bench.
3. RecBole's test scores (every user x every item, captured inside RecBole's own evaluation call)
   are re-evaluated by slimrec's evaluator. RecBole's full ranking for sequential models excludes
   only the padding item, not the user's history (its full-sort loader passes no history for
   them); slimrec excludes the history. Both rules are compared on the same scores: RecBole's stock
   figures against slimrec's metric code with only the padding excluded, and RecBole's trainer
   given the history (``history_index``) against slimrec's :class:`Evaluator` (full protocol).
4. slimrec's SASRec ``base`` trains on the same RecData through ``run_experiment`` (in this
   process, one torch thread), same seeds, and is compared with RecBole's under slimrec's rule.
5. Unless ``--no-explain``: the measured explanation of a gap. The loss swapped: slimrec's SASRec
   with RecBole's default loss (softmax cross-entropy over every item, ``--seeds``), and a pair
   with one loss both sides can run, BPR with one sampled negative (``--explain-seeds``). On that
   pair, slimrec again with one of RecBole's training settings at a time, patched into slimrec's
   loop in this process only (:class:`recbole_settings_in_slimrec`): RecBole's training rows (one
   row per history prefix with its target in the last column, 1,024 rows a step; slimrec's rows
   predict every position of a user at once) and RecBole's Adam betas (0.9, 0.999) instead of
   slimrec's (0.9, 0.98). The same with RecBole's default loss (CE): slimrec's SASRec with RecBole's
   rows (``--explain-seeds``), with a block shaped like RecBole's (:func:`recbole_shaped_sasrec`:
   post-LN, LayerNorm on the embeddings, no sqrt(d) scaling; ``--seeds``), that block with RecBole's
   N(0, 0.02) initialisation (``--seeds``), and all of these with RecBole's Adam betas
   (``--explain-seeds``). The prefix rows cost 8x more compute an epoch than slimrec's own rows.
   ``--reuse-recbole`` takes RecBole's side from an earlier results file instead of training it
   again (its rows say so); slimrec's side always runs.

Time: RecBole's SASRec trains on one row per prefix (38,543 rows of 50 positions an epoch on this
data, against slimrec's 4,905 user rows that predict at every position), so its epoch costs about
15 times slimrec's on one core. The defaults (two seeds, one for the BPR pair, slimrec's 10 epochs)
took 40 minutes on a shared 2-core machine, 27 of them RecBole's three runs; ``--no-explain`` leaves
the two main seeds (about 20 minutes).

Settings matched (slimrec's ``dev`` defaults, :mod:`slimrec.recommender.config`): hidden size 50,
2 blocks, 1 head, feed-forward inner size 50 with ReLU, dropout 0.5 (embeddings, blocks and
attention weights), 50 most recent items, Adam at lr 0.003, ``--epochs`` epochs with early stopping
on validation NDCG@10 (full ranking, history excluded on both sides; RecBole's ``stopping_step``
is ``patience - 1`` because it stops after ``stopping_step + 1`` validations without a gain),
batches of 1,024 training targets for RecBole (one target per row, about 38 steps an epoch) against
slimrec's 128 users a step (about 1,000 targets, 39 steps). What slimrec's settings cannot match (step 5
patches them in, this process only): RecBole's SASRec is post-LN with LayerNorm on the embeddings,
no sqrt(d) scaling, N(0, 0.02) initialisation and Adam betas (0.9, 0.999); its losses are CE over
every item (default) or BPR with one negative, slimrec's default is BCE with 8 sampled negatives.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import RESULTS, record, row

log = logging.getLogger("bench.recbole")

HERE = Path(__file__).resolve().parent
VENV = HERE / ".recbole-venv"
RUNNER = HERE / "recbole_run.py"
WORK = RESULTS / "recbole"
DATASET_NAME = "office"
INTER_HEADER = ("user_id:token", "item_id:token", "timestamp:float")
KS = (10, 20)
TOL = 1e-6


# ------------------------------------------------------------------------------------------ export
def inter_frame(data) -> pd.DataFrame:
    """RecBole ``.inter`` rows of ``data`` (a :class:`RecData`): ``user_id``, ``item_id``, ``timestamp``.

    Users in RecData row order; each user's items are ``history + [valid_target, test_target]``, so
    under RecBole's leave-one-out in time order (``group_by: user``, ``order: TO``) the last row of a
    user is slimrec's test target and the one before it the validation target. ``timestamp`` is the
    row number: unique over the file, so no sort, stable or not, can reorder a user's items.
    """
    from slimrec.recommender.data import append_columns

    ptr, items = append_columns(data.hist_ptr, data.hist_items, [data.valid_target, data.test_target])
    users = np.repeat(data.user_ids.astype(str), np.diff(ptr))
    return pd.DataFrame({"user_id": users, "item_id": data.item_ids[items - 1].astype(str),
                         "timestamp": np.arange(len(items), dtype=np.float64)})


def write_atomic(data, folder: Path, name: str = DATASET_NAME) -> Path:
    """``folder/name/name.inter`` (tab-separated, RecBole's typed header); returns the file."""
    path = folder / name / f"{name}.inter"
    path.parent.mkdir(parents=True, exist_ok=True)
    df = inter_frame(data)
    bad = df["user_id"].str.contains(r"[\t\n]") | df["item_id"].str.contains(r"[\t\n]")
    if bad.any():
        raise ValueError(f"{int(bad.sum())} ids hold a tab or newline: not writable as atomic tokens")
    with path.open("w") as f:
        f.write("\t".join(INTER_HEADER) + "\n")
        for u, i, t in zip(df["user_id"], df["item_id"], df["timestamp"], strict=True):
            f.write(f"{u}\t{i}\t{t:.1f}\n")
    return path


def read_atomic(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df.assign(timestamp=df["timestamp"].astype(float))


def leave_one_out(inter: pd.DataFrame) -> pd.DataFrame:
    """RecBole's ``LS: valid_and_test`` with ``order: TO`` and ``group_by: user`` on ``.inter`` rows, in pandas.

    Returns one row per user: ``user_id``, ``history`` (list), ``valid_target``, ``test_target``.
    """
    out = []
    for u, g in inter.sort_values("timestamp", kind="stable").groupby("user_id", sort=True):
        items = g["item_id"].tolist()
        out.append((u, items[:-2], items[-2], items[-1]))
    return pd.DataFrame(out, columns=["user_id", "history", "valid_target", "test_target"])


def check_split(data, split: dict, max_len: int) -> dict:
    """Compare RecBole's loaded split (``split.json`` of the runner) with ``data``; raise on any difference.

    Per user: the test and validation targets, and the model input (the last ``max_len`` items before
    the target). Returns counts of what was checked.
    """
    tok = data.item_ids
    index = {u: i for i, u in enumerate(data.user_ids)}
    problems = []
    for name in ("valid", "test"):
        s = split[name]
        if len(s["user"]) != data.n_users or set(s["user"]) != set(index):
            problems.append(f"{name}: RecBole has {len(s['user'])} users, slimrec {data.n_users}")
            continue
        ptr, seq = data.split_sequences(name)
        target = data.targets(name)
        for u, t, inp in zip(s["user"], s["target"], s["input"], strict=True):
            r = index[u]
            want_inp = [str(x) for x in tok[seq[ptr[r]:ptr[r + 1]] - 1][-max_len:]]
            if str(tok[target[r] - 1]) != t:
                problems.append(f"{name} target of user {u}: RecBole {t}, slimrec {tok[target[r] - 1]}")
            elif inp != want_inp:
                problems.append(f"{name} input of user {u}: RecBole {inp[-3:]}..., slimrec {want_inp[-3:]}...")
            if len(problems) > 5:
                break
    if problems:
        raise SystemExit("RecBole's split differs from slimrec's:\n  " + "\n  ".join(problems))
    return {"users_checked": data.n_users, "train_rows": split.get("n_train_rows")}


# ------------------------------------------------------------------------------------------ RecBole side
def venv_python() -> Path | None:
    p = VENV / "bin" / "python"
    return p if p.exists() else None


def recbole_settings(cfg, *, loss: str, epochs: int, patience: int) -> dict:
    """RecBole settings matched to slimrec's ``cfg`` (see the module docstring); ``loss``: CE | BPR."""
    s = {
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "eval_args": {"split": {"LS": "valid_and_test"}, "group_by": "user", "order": "TO", "mode": "full"},
        "metrics": ["NDCG", "Hit"], "topk": list(KS), "valid_metric": "NDCG@10",
        "MAX_ITEM_LIST_LENGTH": cfg.max_len,
        "hidden_size": cfg.hidden_dim, "inner_size": cfg.hidden_dim, "n_layers": cfg.num_blocks,
        "n_heads": cfg.num_heads, "hidden_dropout_prob": cfg.dropout, "attn_dropout_prob": cfg.dropout,
        "hidden_act": "relu", "layer_norm_eps": 1e-8,
        "learning_rate": cfg.lr, "weight_decay": cfg.weight_decay, "train_batch_size": 1024,
        "eval_batch_size": cfg.eval_batch_size, "epochs": epochs, "stopping_step": max(patience - 1, 0),
        "eval_step": cfg.eval_every, "loss_type": loss,
    }
    s["train_neg_sample_args"] = None if loss == "CE" else {"distribution": "uniform", "sample_num": 1}
    return s


def run_recbole(data_dir: Path, out: Path, seed: int, settings: dict, timeout_s: float, split_only: bool = False) -> dict:
    py = venv_python()
    cmd = [str(py), "-P", str(RUNNER), "--data-dir", str(data_dir), "--dataset", DATASET_NAME, "--out", str(out),
           "--seed", str(seed), "--config", json.dumps(settings), "--valid-history-excluded", "--threads", "1",
           *(["--split-only"] if split_only else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with (out / "runner.log").open("w") as logf:
        rc = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
    if rc != 0:
        tail = (out / "runner.log").read_text().splitlines()[-25:]
        raise SystemExit(f"RecBole run failed (exit {rc}), {out / 'runner.log'}:\n" + "\n".join(tail))
    if split_only:
        return json.loads((out / "split.json").read_text())
    res = json.loads((out / "result.json").read_text())
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def score_matrix(data, rows: dict, scores: np.ndarray) -> np.ndarray:
    """RecBole's test scores as a (U, n_items + 1) float32 array in slimrec's user rows and item columns."""
    uindex = {u: i for i, u in enumerate(data.user_ids)}
    iindex = {iid: i + 1 for i, iid in enumerate(data.item_ids)}
    tokens = rows["item_tokens"]
    cols = np.array([iindex.get(t, -1) for t in tokens])
    if (cols[1:] < 0).any() or len(set(cols[1:])) != data.n_items or len(tokens) != data.n_items + 1:
        raise SystemExit("RecBole's item tokens do not map one to one onto slimrec's items")
    out = np.full((data.n_users, data.n_items + 1), np.nan, dtype=np.float32)
    r = np.array([uindex[u] for u in rows["user"]])
    if len(set(r)) != data.n_users:
        raise SystemExit("RecBole's test rows do not cover every slimrec user once")
    out[np.ix_(r, cols[1:])] = scores[:, 1:]
    out[:, 0] = scores[0, 0] if len(scores) else 0.0  # padding column: excluded by both evaluators
    return out


def slimrec_evaluations(data, cfg, S: np.ndarray) -> dict:
    """slimrec's evaluator on RecBole's test scores ``S`` (U, N): its rule (history excluded, through
    :class:`Evaluator`) and RecBole's stock rule (padding excluded only, slimrec's metric code)."""
    from slimrec.recommender.evaluation import Evaluator
    from slimrec.recommender.metrics import counts_from_scores, rank_metrics

    ev = Evaluator(data, cfg)
    res = ev.per_user(lambda split, users: S[users], splits=("test",), protocols=("full",))[("test", "full")]
    masked = S.copy()
    masked[:, 0] = -np.inf
    g, e = counts_from_scores(masked, data.test_target)
    stock = rank_metrics(g, e, ks=KS)
    _, e_excl = counts_from_scores(ev._masked(S, "test", np.arange(data.n_users)), data.test_target)
    keys = [f"{m}_{k}" for k in KS for m in ("ndcg", "hr")]
    return {"history_excluded": {k: float(res[k].mean()) for k in keys},
            "stock": {k: float(stock[k].mean()) for k in keys},
            "tied_targets": {"history_excluded": int((e_excl > 0).sum()), "stock": int((e > 0).sum())}}


def recbole_seed(data, cfg, data_dir: Path, seed: int, loss: str, epochs: int, patience: int, timeout_s: float,
                 tag: str) -> dict:
    out = WORK / f"{tag}_seed{seed}"
    settings = recbole_settings(cfg, loss=loss, epochs=epochs, patience=patience)
    log.info("RecBole SASRec (%s, seed %d) in %s", loss, seed, out)
    res = run_recbole(data_dir, out, seed, settings, timeout_s)
    res["split_check"] = check_split(data, json.loads((out / "split.json").read_text()), cfg.max_len)
    S = score_matrix(data, json.loads((out / "rows.json").read_text()), np.load(out / "scores.npy"))
    res["slimrec_eval"] = slimrec_evaluations(data, cfg, S)
    for rule in ("stock", "history_excluded"):
        for k in KS:
            for m, rb in (("ndcg", "ndcg"), ("hr", "hit")):
                d = abs(res["slimrec_eval"][rule][f"{m}_{k}"] - res[rule][f"{rb}@{k}"])
                res.setdefault("abs_diff", {})[f"{rule}/{m}_{k}"] = d
    worst = max(res["abs_diff"].values())
    log.info("RecBole %s seed %d: test NDCG@10 %.5f (history excluded), %.5f (stock); evaluators differ by at "
             "most %.2e; best epoch %d of %d, %.0f s", loss, seed, res["history_excluded"]["ndcg@10"],
             res["stock"]["ndcg@10"], worst, res["best_epoch"], res["epochs_run"], res["wall_seconds"])
    if worst > TOL:
        log.error("slimrec's and RecBole's evaluators differ by %.3e (> %.0e) on the same scores", worst, TOL)
    return res


# ------------------------------------------------------------------------------------------ slimrec side
def prefix_rows(data, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RecBole's training rows in the shape of :func:`slimrec.recommender.data.train_rows_per_position`:
    one row per history prefix ``h[:k]`` (k >= 1), right-aligned, whose only target is ``h[k]`` in the
    last column. The same targets as slimrec's rows, but each predicted from a row of its own with the
    most recent item in the last column, as at evaluation (slimrec's own rows predict all but the last
    target from earlier columns)."""
    from slimrec.recommender.data import train_rows_prefix

    inputs, tgt, row_user = train_rows_prefix(data, max_len)
    targets = np.zeros_like(inputs)
    targets[:, -1] = tgt
    return inputs, targets, row_user


def recbole_shaped_sasrec(normal_init: bool):
    """A SASRec backbone with the layout of RecBole's (for a measured explanation run; written here, not
    taken from RecBole): LayerNorm and dropout on the summed item and position embeddings, no sqrt(d)
    scaling; post-LN blocks ``x = LN(x + Drop(Attn(x)))``, ``x = LN(x + Drop(W2 relu(W1 x)))`` with queries,
    keys and values from the same input; no final LayerNorm. ``normal_init``: every weight N(0, 0.02) and
    biases 0 (RecBole's), else Xavier-normal like slimrec's SASRec. Positions stay slimrec's (the most
    recent item in the last column); RecBole left-aligns a sequence, so its position 0 is the oldest item."""
    import torch
    from slimrec.recommender.models import attention, causal_attention_mask
    from slimrec.torch_ops import Dropout
    from torch import nn

    class RecBoleShapedSASRec(nn.Module):
        per_position = True

        def __init__(self, d: int, max_len: int, num_blocks: int, num_heads: int, dropout: float):
            super().__init__()
            self.d, self.heads, self.p = d, num_heads, dropout
            self.pos_emb = nn.Embedding(max_len, d)
            self.emb_ln = nn.LayerNorm(d, eps=1e-8)
            self.drop = Dropout(dropout)
            self.qkv = nn.ModuleList([nn.Linear(d, 3 * d) for _ in range(num_blocks)])
            self.out = nn.ModuleList([nn.Linear(d, d) for _ in range(num_blocks)])
            self.ln_attn = nn.ModuleList([nn.LayerNorm(d, eps=1e-8) for _ in range(num_blocks)])
            self.ffn = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
                                      for _ in range(num_blocks)])
            self.ln_ffn = nn.ModuleList([nn.LayerNorm(d, eps=1e-8) for _ in range(num_blocks)])
            for name, w in self.named_parameters():
                if "ln" in name:
                    continue
                if normal_init:
                    nn.init.normal_(w, 0.0, 0.02) if w.dim() > 1 else nn.init.zeros_(w)
                elif w.dim() > 1:
                    nn.init.xavier_normal_(w)

        def forward(self, ids: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            B, L = ids.shape
            x = self.drop(self.emb_ln(emb + self.pos_emb(torch.arange(L, device=ids.device))[None]))
            attn_mask = causal_attention_mask(ids, x.dtype)
            h, dh = self.heads, self.d // self.heads
            p = self.p if self.training else 0.0
            for i in range(len(self.qkv)):
                q, k, v = self.qkv[i](x).view(B, L, 3, h, dh).permute(2, 0, 3, 1, 4)
                a = attention(q, k, v, attn_mask, p).transpose(1, 2).reshape(B, L, self.d)
                x = self.ln_attn[i](x + self.drop(self.out[i](a)))
                x = self.ln_ffn[i](x + self.drop(self.ffn[i](x)))
            return x

    return RecBoleShapedSASRec


class recbole_settings_in_slimrec:  # noqa: N801 - used as a context manager
    """Patch slimrec's training (this process only, for a measured explanation run) with RecBole's
    ``rows="prefix"`` (:func:`prefix_rows`), Adam ``betas`` (RecBole: torch's default (0.9, 0.999)),
    ``block="recbole"`` (:func:`recbole_shaped_sasrec` as the SASRec backbone) and ``normal_init``
    (N(0, 0.02) for the block's weights and the item embeddings, RecBole's; slimrec: Xavier-normal)."""

    def __init__(self, rows: str | None = None, betas: tuple[float, float] | None = None,
                 block: str | None = None, normal_init: bool = False):
        if normal_init and block != "recbole":
            raise ValueError("normal_init is measured with block='recbole' only")
        self.rows, self.betas, self.block, self.normal_init = rows, betas, block, normal_init

    def __enter__(self):
        import torch
        from slimrec.recommender import models, train

        self._saved = (train.train_rows_per_position, train.torch.optim.Adam, models.make_backbone, models.ItemEncoder)
        if self.rows == "prefix":
            train.train_rows_per_position = prefix_rows
        if self.betas is not None:
            adam, betas = torch.optim.Adam, self.betas

            class Adam(adam):
                def __init__(self, params, **kw):
                    kw["betas"] = betas
                    super().__init__(params, **kw)

            train.torch.optim.Adam = Adam
        if self.block == "recbole":
            shaped, make = recbole_shaped_sasrec(self.normal_init), models.make_backbone

            def make_backbone(name, cfg):
                if name != "sasrec":
                    return make(name, cfg)
                return shaped(cfg.hidden_dim, cfg.max_len, cfg.num_blocks, cfg.num_heads, cfg.dropout)

            models.make_backbone = make_backbone
        if self.normal_init:
            encoder = models.ItemEncoder

            class ItemEncoder(encoder):
                def __init__(self, n_items, d, text=None):
                    super().__init__(n_items, d, text)
                    with torch.no_grad():
                        torch.nn.init.normal_(self.id_emb.weight, 0.0, 0.02)
                        self.id_emb.weight[0].zero_()

            models.ItemEncoder = ItemEncoder
        return self

    def __exit__(self, *exc):
        from slimrec.recommender import models, train

        (train.train_rows_per_position, train.torch.optim.Adam, models.make_backbone,
         models.ItemEncoder) = self._saved


def slimrec_runs(data, seeds: list[int], sets: list[str], tag: str) -> dict:
    from slimrec.config import load_config
    from slimrec.recommender.experiment import run_experiment

    cfg = load_config("dev", overrides=[
        "recommender.backbones=[sasrec]", "recommender.variants=[base]", "recommender.baselines=[]",
        f"recommender.seeds=[{','.join(map(str, seeds))}]", "recommender.use_ray=false",
        "recommender.num_threads=1", f"recommender.artifacts_dir={WORK / 'slimrec_artifacts'}", *sets,
    ]).recommender
    t0 = time.perf_counter()
    res = run_experiment(data, cfg, time.strftime(f"{tag}-%Y%m%d-%H%M%S"), Path(cfg.artifacts_dir))
    wall = time.perf_counter() - t0
    m = res.metrics
    m = m[(m.variant == "base") & (m.split == "test") & (m.protocol == "full")].sort_values("seed")
    fits = {p["seed"]: p["fits"]["base"] for p in res.groups}
    per_seed = {int(s): {"ndcg_10": float(r.ndcg_10), "hr_10": float(r.hr_10), "ndcg_20": float(r.ndcg_20),
                         "hr_20": float(r.hr_20), "best_epoch": fits[int(s)]["best_epoch"],
                         "epochs_run": fits[int(s)]["epochs_run"],
                         "seconds_per_epoch": fits[int(s)]["seconds_per_epoch"]}
                for s, r in zip(m.seed, m.itertuples(), strict=True)}
    log.info("slimrec SASRec base (%s): test NDCG@10 %s, %.0f s", tag,
             ", ".join(f"{v['ndcg_10']:.5f}" for v in per_seed.values()), wall)
    return {"per_seed": per_seed, "wall_seconds": wall, "config": cfg.model_dump(mode="json")}


# ------------------------------------------------------------------------------------------ rows
def _mean_spread(vals: list[float], unit: str = "") -> tuple[float, str | None]:
    a = np.asarray(vals, dtype=float)
    if len(a) < 2:
        return float(a.mean()), None
    return float(a.mean()), f"± {a.std(ddof=1):.4f}{unit} std over {len(a)} seeds ({', '.join(f'{v:.4f}' for v in a)})"


def load_data():
    from slimrec.recommender.data import build_rec_data

    from bench.recommender import load_office

    seqs, items = load_office()
    data, _ = build_rec_data(seqs, items)
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1", help="comma list of seeds of the main comparison (both sides)")
    ap.add_argument("--explain-seeds", default="0",
                    help="seeds of the BPR pair (RecBole's SASRec with BPR, slimrec with BPR and one negative)")
    ap.add_argument("--epochs", type=int, default=None, help="maximum epochs of both sides (default: slimrec's dev)")
    ap.add_argument("--patience", type=int, default=None, help="early-stopping patience (default: slimrec's dev)")
    ap.add_argument("--no-explain", action="store_true", help="skip the loss-swap runs that explain a gap")
    ap.add_argument("--quick", action="store_true", help="one seed, 2 epochs, no explanation runs (a smoke run)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one RecBole run may take")
    ap.add_argument("--reuse-recbole", metavar="JSON", default=None,
                    help="take RecBole's side (its runs and split check) from an earlier results file of this bench "
                         "instead of training it again (same seeds, epochs and patience; named in every RecBole row)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    reused = json.loads(Path(args.reuse_recbole).read_text()) if args.reuse_recbole else None
    if reused is None and venv_python() is None:
        print(f"RecBole's environment {VENV} is missing: run `bash bench/recbole_env.sh` first", file=sys.stderr)
        return 3
    import torch
    from slimrec.config import load_config

    torch.set_num_threads(1)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",") if s != ""]
    cfg0 = load_config("dev").recommender
    epochs = 2 if args.quick else (args.epochs or cfg0.epochs)
    patience = args.patience or cfg0.patience
    sets = [f"recommender.epochs={epochs}", f"recommender.patience={patience}"]
    cfg = load_config("dev", overrides=sets).recommender
    explain = not (args.no_explain or args.quick)

    t_all = time.perf_counter()
    data = load_data()
    data_dir = WORK / "atomic"
    inter_path = write_atomic(data, data_dir)
    loo = leave_one_out(read_atomic(inter_path)).set_index("user_id")
    tok = data.item_ids
    if not ((loo.loc[data.user_ids.astype(str), "test_target"].to_numpy() == tok[data.test_target - 1].astype(str)).all()
            and (loo.loc[data.user_ids.astype(str), "valid_target"].to_numpy()
                 == tok[data.valid_target - 1].astype(str)).all()):
        raise SystemExit(f"{inter_path}: leave-one-out of the exported rows does not give slimrec's targets")
    log.info("exported %d users x %d items (%d interactions) to %s", data.n_users, data.n_items,
             len(data.hist_items) + 2 * data.n_users, inter_path)
    explain_seeds = [int(s) for s in args.explain_seeds.split(",") if s != ""]
    if reused is not None:
        old = reused["extra"]
        runs = {loss: {int(k): v for k, v in res.items()} for loss, res in old["recbole"].items()}
        want = {"CE": seeds, "BPR": explain_seeds if explain else []}
        if (old["epochs"], old["patience"]) != (epochs, patience) or any(
                not set(ss) <= set(runs.get(loss, {})) for loss, ss in want.items()):
            raise SystemExit(f"{args.reuse_recbole}: RecBole ran {old['epochs']} epochs, patience {old['patience']}, "
                             f"seeds { {k: sorted(v) for k, v in runs.items()} }; this run needs {epochs}, {patience}, "
                             f"{want}")
        checked = old["split_check"]
        source = f"RecBole's runs of {reused['at']} (commit {reused['commit']}), reused"
        log.info("%s from %s", source, args.reuse_recbole)
        rb = {s: runs["CE"][s] for s in seeds}
    else:
        # RecBole's own loading of the file, checked before any training
        split = run_recbole(data_dir, WORK / "split", seeds[0], recbole_settings(cfg, loss="CE", epochs=epochs,
                                                                               patience=patience), 600, split_only=True)
        checked = check_split(data, split, cfg.max_len)
        log.info("RecBole's leave-one-out split equals slimrec's: valid and test targets and inputs of all %d users "
                 "(%s RecBole training rows)", checked["users_checked"], checked["train_rows"])
        source = None
        rb = {s: recbole_seed(data, cfg, data_dir, s, "CE", epochs, patience, args.timeout, "ce") for s in seeds}
    sl = slimrec_runs(data, seeds, sets, "slimrec-base")
    extra = {"epochs": epochs, "patience": patience, "seeds": seeds, "explain_seeds": explain_seeds if explain else [],
             "split_check": checked, "recbole": {}, "slimrec": {"base": sl}, "recbole_source": source}
    extra["recbole"]["CE"] = rb
    rows = []

    def rb_rows(res: dict, case: str):
        if source:
            case = f"{case} ({source})"
        for rule, label in (("history_excluded", "history excluded"), ("stock", "RecBole stock: history not excluded")):
            for m, rbm in (("ndcg_10", "ndcg@10"), ("hr_10", "hit@10")):
                v, sp = _mean_spread([r[rule][rbm] for r in res.values()])
                rows.append(row(f"{case} [{label}]", f"test_{m} (RecBole evaluator)", v, "", spread=sp))
                w, _ = _mean_spread([r["slimrec_eval"][rule][m] for r in res.values()])
                d = max(r["abs_diff"][f"{rule}/{m}"] for r in res.values())
                rows.append(row(f"{case} [{label}]", f"test_{m} (slimrec evaluator)", w, "", "RecBole evaluator", v))
                rows.append(row(f"{case} [{label}]", f"test_{m} max abs diff", d, "abs",
                                spread=f"largest over {len(res)} seed(s); tolerance {TOL:g}"))
        rows.append(row(f"{case}", "best_epoch", float(np.mean([r["best_epoch"] for r in res.values()])), "epoch",
                        spread=f"{[r['best_epoch'] for r in res.values()]} of {[r['epochs_run'] for r in res.values()]}"))
        rows.append(row(f"{case}", "seconds_per_epoch",
                        float(np.mean([np.mean(r["seconds_per_epoch"]) for r in res.values()])), "s"))
        rows.append(row(f"{case}", "wall (all seeds)", float(sum(r["wall_seconds"] for r in res.values())), "s"))

    def sl_rows(res: dict, case: str, ref: dict, ref_name: str):
        for m, rbm in (("ndcg_10", "ndcg@10"), ("hr_10", "hit@10")):
            v, sp = _mean_spread([r[m] for r in res["per_seed"].values()])
            b, _ = _mean_spread([r["history_excluded"][rbm] for r in ref.values()])
            rows.append(row(case, f"test_{m} (slimrec evaluator)", v, "", ref_name, b, spread=sp))
        ps = res["per_seed"].values()
        rows.append(row(case, "best_epoch", float(np.mean([r["best_epoch"] for r in ps])), "epoch",
                        spread=f"{[r['best_epoch'] for r in ps]} of {[r['epochs_run'] for r in ps]}"))
        rows.append(row(case, "seconds_per_epoch", float(np.mean([r["seconds_per_epoch"] for r in ps])), "s"))
        rows.append(row(case, "wall (all seeds)", res["wall_seconds"], "s"))

    def patched(key: str, case: str, patch: dict, run_seeds: list[int], run_sets: list[str], ref: dict,
                ref_name: str) -> None:
        """slimrec's SASRec with RecBole's settings ``patch`` in its loop (:class:`recbole_settings_in_slimrec`;
        ``{}``: none), recorded under ``key`` and compared with RecBole's runs ``ref`` of the same seeds."""
        with recbole_settings_in_slimrec(**patch):
            res = slimrec_runs(data, run_seeds, run_sets, f"slimrec-{key.replace('_', '-')}")
        extra["slimrec"][key] = res
        sl_rows(res, case, {s: ref[s] for s in run_seeds}, ref_name)

    rb_rows(rb, "recbole-sasrec CE")
    sl_rows(sl, "slimrec-sasrec base (BCE, 8 neg)", rb, "recbole-sasrec CE")
    if explain:
        ce, wide = [*sets, "recommender.loss=ce"], ["recommender.batch_size=1024"]
        patched("ce", "slimrec-sasrec loss=ce", {}, seeds, ce, rb, "recbole-sasrec CE")
        # RecBole's settings one at a time in slimrec's loop, with the same (default) loss; the prefix rows
        # cost 8x an epoch, so they run on the explanation seeds only
        ce_cases = (
            ("ce_prefix_rows", "RecBole's rows (1 per prefix, 1024 a step)", {"rows": "prefix"}, explain_seeds, wide),
            ("ce_recbole_block", "RecBole's block (post-LN, embedding LayerNorm, no sqrt(d))", {"block": "recbole"},
             seeds, []),
            ("ce_recbole_block_init", "RecBole's block and N(0, 0.02) init",
             {"block": "recbole", "normal_init": True}, seeds, []),
            ("ce_all_recbole", "RecBole's block, init, rows and Adam betas (0.9, 0.999)",
             {"block": "recbole", "normal_init": True, "rows": "prefix", "betas": (0.9, 0.999)}, explain_seeds, wide),
        )
        for key, label, patch, run_seeds, more in ce_cases:
            if run_seeds:
                patched(key, f"slimrec-sasrec loss=ce, {label}", patch, run_seeds, [*ce, *more], rb, "recbole-sasrec CE")
    if explain and explain_seeds:
        rb_bpr = ({s: runs["BPR"][s] for s in explain_seeds} if reused is not None else
                  {s: recbole_seed(data, cfg, data_dir, s, "BPR", epochs, patience, args.timeout, "bpr")
                   for s in explain_seeds})
        extra["recbole"]["BPR"] = rb_bpr
        rb_rows(rb_bpr, "recbole-sasrec BPR (1 neg)")
        bpr, ref = [*sets, "recommender.loss=bpr", "recommender.num_negatives=1"], "recbole-sasrec BPR (1 neg)"
        patched("bpr1", "slimrec-sasrec loss=bpr, 1 neg", {}, explain_seeds, bpr, rb_bpr, ref)
        # the same pair with one of RecBole's training settings at a time in slimrec's loop
        patched("bpr1_prefix_rows", "slimrec-sasrec loss=bpr, 1 neg, RecBole's rows (1 per prefix, 1024 a step)",
                {"rows": "prefix"}, explain_seeds, [*bpr, *wide], rb_bpr, ref)
        patched("bpr1_adam_betas_0.999", "slimrec-sasrec loss=bpr, 1 neg, Adam betas (0.9, 0.999)",
                {"betas": (0.9, 0.999)}, explain_seeds, bpr, rb_bpr, ref)
    wall = time.perf_counter() - t_all
    rows.append(row("whole run", "wall", wall, "s"))
    first = next(iter(rb.values()))
    extra.update(versions={k: first[k] for k in ("recbole", "torch", "numpy", "python")},
                 recbole_settings=first["settings"])
    record("recbole", rows, extra=extra)
    worst = max(d for res in extra["recbole"].values() for r in res.values() for d in r["abs_diff"].values())
    print(f"\nlargest |slimrec evaluator - RecBole evaluator| on the same scores: {worst:.2e} "
          f"({'within' if worst <= TOL else 'NOT within'} {TOL:g}); whole run {wall:.0f} s")
    return 0 if worst <= TOL else 1


if __name__ == "__main__":
    raise SystemExit(main())
