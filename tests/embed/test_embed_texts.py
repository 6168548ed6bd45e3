"""Pure transforms of the embed stage, on hand-written rows."""

from __future__ import annotations

import hashlib
from datetime import date

import numpy as np
import pandas as pd
from slimrec.embed.texts import (
    changed_rows,
    flatten_texts,
    item_texts,
    pool_vectors,
    rationale_hash,
    rationale_text_parts,
    rationale_texts,
)


def _student(rows):
    cols = ["user_id", "run_date", "model_version", "status", "rationale", "step1", "step2", "step3"]
    return pd.DataFrame(rows, columns=cols)


def test_latest_ok_row_per_user_wins():
    d1, d2 = date(2024, 1, 14), date(2024, 1, 15)
    df = _student(
        [
            ("u1", d1, "s1", "ok", "old u1", "a", "b", "c"),
            ("u1", d2, "s1", "ok", "new u1", "a", "b", "c"),
            ("u2", d1, "s1", "ok", "only ok u2", "a", "b", "c"),
            ("u2", d2, "s1", "parse_error", "broken", None, None, None),
            ("u3", d2, "s1", "failed", None, None, None, None),
            ("u4", d2, "s1", "ok", "   ", None, None, None),  # ok but blank: nothing to encode
        ]
    )
    out = rationale_texts(df, "student", "whole", "model_version", None)
    assert out["user_id"].tolist() == ["u1", "u2"]
    assert out["texts"].tolist() == [["new u1"], ["only ok u2"]]
    assert out["source"].tolist() == ["student", "student"]
    assert out["text_hash"][0] == hashlib.sha1(b"whole\x1fnew u1").hexdigest()


def test_version_filter_keeps_only_that_model():
    d = date(2024, 1, 15)
    df = _student([("u1", d, "s1", "ok", "from s1", "", "", ""), ("u1", d, "s2", "ok", "from s2", "", "", "")])
    assert rationale_texts(df, "student", "whole", "model_version", "s1")["texts"].tolist() == [["from s1"]]
    # No filter: same run_date, the larger model_version wins (deterministic tie-break).
    assert rationale_texts(df, "student", "whole", "model_version", None)["model_version"].tolist() == ["s2"]


def test_steps_mode_uses_non_empty_steps_and_falls_back_to_whole():
    assert rationale_text_parts({"rationale": "R", "step1": "a", "step2": " ", "step3": "c"}, "steps") == ["a", "c"]
    assert rationale_text_parts({"rationale": "R", "step1": None, "step2": None, "step3": None}, "steps") == ["R"]
    assert rationale_text_parts({"rationale": "R", "step1": "a", "step2": "b", "step3": "c"}, "whole") == ["R"]
    # Same text, other mode: another hash, so switching the mode re-encodes.
    assert rationale_hash(["R"], "whole") != rationale_hash(["R"], "steps")


def test_changed_rows_is_an_anti_join_on_key_and_hash():
    cand = pd.DataFrame(
        {"user_id": ["u1", "u1", "u2", "u3"], "source": ["student", "teacher", "student", "student"],
         "model_version": ["s1", "t", "s1", "s1"], "text_hash": ["h1", "h2", "h3", "h4"]}
    )
    old = pd.DataFrame(
        {"user_id": ["u1", "u1", "u2"], "source": ["student", "teacher", "student"],
         "model_version": ["s1", "t", "s0"], "text_hash": ["h1", "OLD", "h3"]}
    )
    out = changed_rows(cand, old, ["user_id", "source"], ["text_hash", "model_version"])
    # u1/teacher: text changed; u2: same text, new model; u3: new key. u1/student unchanged.
    assert list(zip(out["user_id"], out["source"], strict=True)) == [("u1", "teacher"), ("u2", "student"), ("u3", "student")]
    assert changed_rows(cand, old.iloc[0:0], ["user_id", "source"], ["text_hash"]).shape[0] == 4


def test_item_texts_keeps_the_items_hash():
    items = pd.DataFrame({"item_id": ["1", "2"], "item_text": ["Pen | Office", ""], "text_hash": ["h1", "h2"]})
    out = item_texts(items)
    assert out.to_dict("list") == {"item_id": ["1"], "texts": [["Pen | Office"]], "text_hash": ["h1"]}


def test_flatten_and_pool_back():
    rows = pd.DataFrame({"texts": [["a", "b"], ["c"]]})
    flat, owner = flatten_texts(rows)
    assert flat == ["a", "b", "c"] and owner.tolist() == [0, 0, 1]
    vecs = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]], np.float32)
    pooled = pool_vectors(vecs, owner, 2, normalize=True)
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(pooled, [[s, s], [0.6, 0.8]], rtol=1e-6)
    assert pooled.dtype == np.float32


def test_a_user_whose_latest_rationale_was_retrieved_is_not_encoded_from_its_text():
    d1, d2 = date(2024, 1, 14), date(2024, 1, 15)
    df = _student([("u1", d1, "s1", "ok", "own", "", "", ""), ("u1", d2, "s1", "ok", "copied", "", "", ""),
                   ("u2", d2, "s1", "ok", "copied too", "", "", ""), ("u3", d2, "s1", "ok", "old row", "", "", "")])
    df["rationale_source"] = ["student", "retrieved", "retrieved", None]  # None: written before the column
    out = rationale_texts(df, "student", "whole", "model_version", None)
    # u1's latest row is retrieved (its vector is the neighbours', written by retrieve_rationales): not u1's
    # older text either; u3's row predates the column and is the student's
    assert out["user_id"].tolist() == ["u3"] and out["rationale_source"].tolist() == ["student"]
