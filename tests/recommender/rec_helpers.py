"""Tiny synthetic recommender data: users walk a cycle of items, so the next item is learnable."""

from __future__ import annotations

import numpy as np
import pandas as pd

N_ITEMS = 24
TEXT_DIM = 8


def synthetic_frames(n_users: int = 48, seed: int = 0):
    """user_sequences, items, item_embeddings, rationale_embeddings and rationale rows.

    User u starts at item ``u % N_ITEMS`` and steps +1 (mod N_ITEMS) for 6..9 items. Item text vectors are
    random unit vectors; the student rationale of u is the text vector of u's TEST target (a planted
    perfect signal for text matching), the teacher's exists for every other user only.
    """
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(N_ITEMS, TEXT_DIM)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    seq_rows, rat_rows, teach, stud = [], [], [], []
    for u in range(n_users):
        n = int(rng.integers(6, 10))
        items = [f"i{(u + k) % N_ITEMS}" for k in range(n)]
        uid = f"u{u}"
        seq_rows.append((uid, items, items[:-2], items[-2], items[-1]))
        tgt = int(items[-1][1:])
        nxt = f"i{(tgt + 1) % N_ITEMS}"
        rat_rows.append((uid, "student", "stu-v1", "enc", text[tgt].tolist()))
        stud.append((uid, "stu-v1", "ok", [items[-1], nxt]))
        if u % 2 == 0:
            rat_rows.append((uid, "teacher", "teach-v1", "enc", text[tgt].tolist()))
            teach.append((uid, "teach-v1", "ok", [items[-1]]))
    seqs = pd.DataFrame(seq_rows, columns=["user_id", "item_ids", "history", "valid_target", "test_target"])
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(N_ITEMS)], "item_text": [f"item {i}" for i in range(N_ITEMS)]})
    item_emb = pd.DataFrame({"item_id": items.item_id, "encoder": "enc", "embedding": list(text)})
    rat_emb = pd.DataFrame(rat_rows, columns=["user_id", "source", "model_version", "encoder", "embedding"])
    teacher = pd.DataFrame(teach, columns=["user_id", "teacher_model", "status", "grounded_item_ids"])
    student = pd.DataFrame(stud, columns=["user_id", "model_version", "status", "grounded_item_ids"])
    return seqs, items, item_emb, rat_emb, {"teacher": teacher, "student": student}


def tiny_cfg(**kw):
    from slimrec.recommender.config import RecommenderConfig

    base = dict(
        max_len=8, hidden_dim=16, num_blocks=1, dropout=0.1, epochs=3, finetune_epochs=2, text_matching_epochs=2,
        batch_size=16, lr=5e-3, seeds=[0], use_ray=False, eval_batch_size=32, num_sampled_negatives=10,
        patience=50, prior_weight_grid=[0.0, 1.0],
    )
    base.update(kw)
    return RecommenderConfig(**base)
