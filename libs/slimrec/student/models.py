"""Where student models live, and loading them with the real transformers / PEFT code.

Paths: ``<models_dir>/tiny-llama-*`` (built bases), ``<models_dir>/student/<model_version>/adapter``
(registered adapters), ``<models_dir>/student_runs/<model_version>`` (Ray Train runs and
checkpoints). ``models_dir`` is ``student.models_dir`` or ``<lake local root>/_models``.

Nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set before transformers is
imported here, and a Hugging Face name must already be in the local cache.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from slimrec.student.config import BUILTIN_TINY, StudentConfig

log = logging.getLogger(__name__)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def set_offline() -> None:
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


def models_dir(cfg: StudentConfig, local_root: str | Path) -> Path:
    """``student.models_dir`` or ``<local root>/_models`` (a folder: models are loaded from paths).

    ``local_root`` is :attr:`slimrec.lake.Lake.local_root`: the lake root on local disk, ``lake.local_dir``
    (or a folder under the current directory) for an object-store lake.
    """
    if cfg.models_dir:
        return Path(cfg.models_dir).expanduser().resolve()
    return Path(local_root) / "_models"


def adapter_dir(root: Path, model_version: str) -> Path:
    return root / "student" / model_version / "adapter"


def runs_dir(root: Path) -> Path:
    return root / "student_runs"


def is_builtin(base_model: str) -> bool:
    return base_model == BUILTIN_TINY


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_tokenizer(path: str, padding_side: str = "left"):
    """The base's tokenizer with a pad token (EOS when it has none) and the given padding side."""
    set_offline()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


# Below this many bytes of weights on disk the frozen base stays in fp32 under autocast. Held in bf16,
# the project's 2.8M-parameter base learned as well (train loss 2.16 against 2.08) but its greedy
# held-out rationales fell from ROUGE-L 0.72 to 0.27 (CPU bf16 autocast, the GPU test's fixture);
# on an H200 the same fixture gained only +0.084 over the base. A 7B base is where half precision pays.
HALF_PRECISION_BASE_BYTES = 1 << 30


def base_dtype(base_path: str, amp_dtype):
    """The dtype to hold the frozen base in: the autocast dtype for a large base, else fp32."""
    import torch

    if amp_dtype is None:
        return torch.float32
    weights = sum(f.stat().st_size for f in Path(base_path).glob("*.safetensors")) + sum(
        f.stat().st_size for f in Path(base_path).glob("*.bin"))
    return amp_dtype if weights >= HALF_PRECISION_BASE_BYTES else torch.float32


def load_base(path: str, dtype=None, device: str = "cpu"):
    """``AutoModelForCausalLM`` from a local directory (or a name already in the local HF cache)."""
    set_offline()
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, local_files_only=True)
    return model.to(device)


def load_student(base_path: str, adapter_path: str | None, dtype=None, device: str = "cpu", merge: bool = False):
    """Base + LoRA adapter (PEFT) in eval mode; ``merge`` folds the adapter into the weights."""
    from peft import PeftModel

    model = load_base(base_path, dtype, device)
    if adapter_path:
        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=False)
        if merge:
            model = model.merge_and_unload()
    return model.eval()
