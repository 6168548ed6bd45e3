"""torch operations the CPU runs faster written another way, with the same maths.

:func:`dropout` and :class:`Dropout` serve the recommender's models and the student's LoRA branch
(:func:`fast_dropout`); on other devices they are torch's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout``, with the CPU mask drawn by ``uniform_``.

    torch's CPU dropout draws its mask with ``bernoulli_``, which took 3.8 ms on a (128, 50, 50) batch
    against 1.2 ms for ``uniform_`` + compare on two threads (torch 2.13): 35% of SASRec's CPU training
    time. Same distribution (each element kept with probability 1 - p, scaled by 1 / (1 - p)), drawn
    from torch's default generator, so ``torch.manual_seed`` still fixes it. Other devices use ``F.dropout``.
    """
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    keep = torch.empty_like(x).uniform_().ge_(p)  # 1.0 with probability 1 - p, else 0.0
    return x * keep.mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same parameters, same state dict) running :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def fast_dropout(model: nn.Module) -> int:
    """Replace every ``nn.Dropout`` inside ``model`` (PEFT's LoRA dropout, say) by :class:`Dropout`.

    Same rate, no parameters, so state dicts and saved adapters are unchanged. Returns how many.
    """
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Dropout]
    for parent, name, child in swaps:
        setattr(parent, name, Dropout(child.p))
    return len(swaps)
