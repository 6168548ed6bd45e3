"""The same training and evaluation on a CUDA device (run with ``-m gpu`` where a GPU exists)."""

import pytest
import torch
from rec_helpers import tiny_cfg
from slimrec.recommender.evaluation import Evaluator
from slimrec.recommender.runner import run_group

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec", "srgnn"])
def test_group_on_gpu(tiny_data, backbone):
    cfg = tiny_cfg(use_gpu=True, epochs=2, finetune_epochs=1)
    ev = Evaluator(tiny_data, cfg)
    results, states, fits = run_group(backbone, 0, ["base", "slim"], tiny_data, ev, cfg, device=torch.device("cuda"))
    assert {r["variant"] for r in results} == {"base", "slim"}
    assert all(v.device.type == "cpu" for v in states["student"].values())  # checkpoints are device-free
