"""RecBole's side of ``bench.recbole``: run by the RecBole virtual environment's python, never imported by slimrec.

    bench/.recbole-venv/bin/python -P bench/recbole_run.py --data-dir D --dataset office --out O --seed 0 \
        --config '{"loss_type": "CE", ...}'

``-P`` (or the path clean-up below) matters: this file sits beside ``bench/recbole.py``, which would
otherwise shadow the ``recbole`` package.

Loads the atomic files ``D/office/office.inter`` with RecBole's own dataset code (leave-one-out by
user in time order), trains RecBole's ``SASRec`` with RecBole's ``Trainer`` (early stopping on the
validation split), reloads the best checkpoint and evaluates the test split twice with RecBole's own
trainer and evaluator (full ranking):

* ``stock``: as RecBole ships it. For sequential models RecBole's full-sort data loader passes no
  history, so only the padding item is excluded: the target competes with every other item,
  including the user's own history.
* ``history_excluded``: the same trainer call with the test loader's batches carrying each row's
  history (every item of the user before the target, not just the 50 the model reads) as RecBole's
  ``history_index``, so RecBole's ``_full_sort_batch_eval`` sets them to ``-inf``: slimrec's
  candidate rule. With ``--valid-history-excluded`` the validation loader does the same, so early
  stopping sees slimrec's rule too.

``--split-only`` stops after writing ``split.json`` (the bench checks the split before any training).
Writes to ``O``: ``split.json`` (RecBole's valid/test rows: user, target, model input, as tokens),
``scores.npy`` (the test rows' raw ``full_sort_predict`` scores, rows x RecBole item ids, float32,
captured inside the evaluation call that produced the metrics), ``rows.json`` (row users, targets,
the item token of every column) and ``result.json`` (both metric sets at full precision, the
training record, versions).
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _history_index_fn(seq_by_user: dict[int, np.ndarray], uid_field: str, iid_field: str, orig):
    """A collate function: RecBole's own, with ``history_index`` = every item of the row's user before its target."""

    def collate(index):
        inter, hist, pos_u, pos_i = orig(index)
        users = inter[uid_field].numpy()
        targets = inter[iid_field].numpy()
        rows, cols = [], []
        for r, (u, t) in enumerate(zip(users, targets, strict=True)):
            seq = seq_by_user[int(u)]
            k = int(np.flatnonzero(seq == t)[0])  # items are unique per user (slimrec dedups)
            h = seq[:k]
            h = h[h != t]  # a repeated target would stay a candidate, as in slimrec
            rows.append(np.full(len(h), r, dtype=np.int64))
            cols.append(h.astype(np.int64))
        hi = (torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols)))
        return inter, hi, pos_u, pos_i

    return collate


def _split_rows(ds, uid_field: str, iid_field: str, list_field: str, len_field: str) -> dict:
    inter = ds.inter_feat
    users = ds.id2token(uid_field, inter[uid_field].numpy())
    targets = ds.id2token(iid_field, inter[iid_field].numpy())
    seqs, lens = inter[list_field].numpy(), inter[len_field].numpy()
    inputs = [list(ds.id2token(iid_field, s[:n])) for s, n in zip(seqs, lens, strict=True)]
    return {"user": list(map(str, users)), "target": list(map(str, targets)), "input": inputs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="{}", help="JSON dict of RecBole settings")
    ap.add_argument("--valid-history-excluded", action="store_true",
                    help="validation (early stopping) also excludes each user's history from the candidates")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--split-only", action="store_true", help="load the data set, write split.json and stop")
    args = ap.parse_args()
    sys.argv[1:] = []  # RecBole's Config also reads `--key=value` arguments from the command line
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # RecBole writes log/ and log_tensorboard/ under the working directory

    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_logger, init_seed

    settings = {
        "data_path": str(Path(args.data_dir).resolve()),
        "checkpoint_dir": str(out / "saved"),
        "seed": args.seed,
        "reproducibility": True,
        "use_gpu": False,
        "show_progress": False,
        "worker": 0,
        "log_wandb": False,
        "save_dataset": False,
        "save_dataloaders": False,
        "metric_decimal_place": 12,
        **json.loads(args.config),
    }
    config = Config(model="SASRec", dataset=args.dataset, config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    load_s = time.perf_counter() - t0
    uid, iid = dataset.uid_field, dataset.iid_field
    list_field, len_field = iid + config["LIST_SUFFIX"], config["ITEM_LIST_LENGTH_FIELD"]

    # every user's whole sequence in time order (RecBole ids), read from the atomic file: RecBole's
    # augmented rows hold only the last MAX_ITEM_LIST_LENGTH items of an input, and the history to
    # exclude is everything before the target
    import pandas as pd

    inter = pd.read_csv(Path(config["data_path"]) / f"{args.dataset}.inter", sep="\t", dtype=str)
    inter.columns = [c.split(":")[0] for c in inter.columns]
    inter = inter.assign(t=inter[config["TIME_FIELD"]].astype(float)).sort_values([uid, "t"], kind="stable")
    seq_items = {int(dataset.token2id(uid, u)): dataset.token2id(iid, g[iid].tolist()).astype(np.int64)
                 for u, g in inter.groupby(uid, sort=False)}
    test_ds = test_data._dataset
    for u, t in zip(test_ds.inter_feat[uid].numpy(), test_ds.inter_feat[iid].numpy(), strict=True):
        if seq_items[int(u)][-1] != t:
            raise SystemExit(f"RecBole's test target of user {dataset.id2token(uid, u)} is not its last item")
    split = {"valid": _split_rows(valid_data._dataset, uid, iid, list_field, len_field),
             "test": _split_rows(test_ds, uid, iid, list_field, len_field),
             "n_train_rows": len(train_data._dataset)}
    (out / "split.json").write_text(json.dumps(split))
    if args.split_only:
        print(json.dumps({"split_rows": {k: len(split[k]["user"]) for k in ("valid", "test")},
                          "n_train_rows": split["n_train_rows"], "load_seconds": round(load_s, 1)}))
        return 0

    init_seed(config["seed"], config["reproducibility"])
    model = SASRec(config, train_data._dataset).to(config["device"])
    trainer = Trainer(config, model)
    if args.valid_history_excluded:
        valid_data.collate_fn = _history_index_fn(seq_items, uid, iid, valid_data.collate_fn)
    epoch_end: list[float] = []
    t1 = time.perf_counter()
    best_valid, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=False,
                                callback_fn=lambda epoch, score: epoch_end.append(time.perf_counter()))
    fit_s = time.perf_counter() - t1
    epochs_run = len(trainer.train_loss_dict)
    best_epoch = epochs_run - 1 - trainer.cur_step * trainer.eval_step  # RecBole's own "best eval result in epoch"

    # the best state, loaded here: torch>=2.6 loads weights only by default and RecBole's checkpoint holds its config
    ckpt = torch.load(trainer.saved_model_file, map_location=config["device"], weights_only=False)
    model.load_state_dict(ckpt["state_dict"])
    model.load_other_parameter(ckpt.get("other_parameter"))

    captured: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    predict = model.full_sort_predict

    def capture(interaction):
        s = predict(interaction)
        captured.append((interaction[uid].cpu().numpy(), interaction[iid].cpu().numpy(),
                         s.detach().cpu().numpy().astype(np.float32, copy=True)))
        return s

    model.full_sort_predict = capture
    t2 = time.perf_counter()
    stock = trainer.evaluate(test_data, load_best_model=False)
    eval_s = time.perf_counter() - t2
    stock_scores = captured[:]
    captured.clear()
    test_data.collate_fn = _history_index_fn(seq_items, uid, iid, test_data.collate_fn)
    excluded = trainer.evaluate(test_data, load_best_model=False)
    same = all(np.array_equal(a[2], b[2]) for a, b in zip(stock_scores, captured, strict=True))

    users = np.concatenate([c[0] for c in stock_scores])
    targets = np.concatenate([c[1] for c in stock_scores])
    np.save(out / "scores.npy", np.concatenate([c[2] for c in stock_scores]))
    (out / "rows.json").write_text(json.dumps({
        "user": list(map(str, dataset.id2token(uid, users))),
        "target": list(map(str, dataset.id2token(iid, targets))),
        "item_tokens": [str(t) for t in dataset.field2id_token[iid]],  # column j's token; 0 is [PAD]
    }))
    per_epoch = np.diff([t1, *epoch_end]).tolist()
    (out / "result.json").write_text(json.dumps({
        "recbole": recbole.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "python": sys.version.split()[0], "threads": torch.get_num_threads(), "seed": args.seed,
        "settings": {k: v for k, v in settings.items() if k not in ("data_path", "checkpoint_dir")},
        "valid_history_excluded": args.valid_history_excluded,
        "stock": {k: float(v) for k, v in stock.items()},
        "history_excluded": {k: float(v) for k, v in excluded.items()},
        "scores_identical_across_both_evaluations": bool(same),
        "best_valid": float(best_valid), "best_epoch": int(best_epoch) + 1, "epochs_run": epochs_run,
        "fit_seconds": fit_s, "seconds_per_epoch": per_epoch, "load_seconds": load_s, "test_eval_seconds": eval_s,
        "train_rows": len(train_data._dataset), "n_items": int(dataset.item_num), "n_users": int(dataset.user_num),
    }, indent=1))
    print(json.dumps({"stock": stock, "history_excluded": excluded, "best_epoch": int(best_epoch) + 1,
                      "epochs_run": epochs_run, "fit_seconds": round(fit_s, 1)}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
