"""The recommender's CPU dropout and attention: same distribution and maths as torch's, drawn faster."""

import pytest
import torch
import torch.nn.functional as F
from slimrec.recommender import models
from slimrec.recommender.models import Dropout, attention, dropout


def test_eval_and_zero_rate_leave_the_input_alone():
    x = torch.randn(4, 5)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    m = Dropout(0.5).eval()
    assert torch.equal(m(x), x)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_keeps_one_minus_p_and_scales_what_it_keeps(p):
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5  # no zeros, so a zero in the output is a dropped element
    y = dropout(x, p)
    kept = y != 0
    n = kept.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))


def test_seeded_like_torch_and_gradient_is_the_mask():
    x = torch.randn(64, 50, requires_grad=True)
    torch.manual_seed(7)
    a = dropout(x, 0.5)
    torch.manual_seed(7)
    b = dropout(x, 0.5)
    assert torch.equal(a, b)
    a.sum().backward()
    torch.testing.assert_close(x.grad, (a != 0).float() * 2.0)


def test_rate_one_drops_everything():
    assert torch.count_nonzero(dropout(torch.ones(10, 10), 1.0)) == 0


def test_module_keeps_nn_dropout_state_and_repr():
    assert Dropout(0.3).state_dict() == torch.nn.Dropout(0.3).state_dict() == {}
    assert repr(Dropout(0.3)).endswith("(p=0.3, inplace=False)")


def test_written_out_attention_equals_sdpa(monkeypatch):
    """With the weights' dropout taken out, the CPU training path is torch's attention exactly."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(3, 2, 7, 8) for _ in range(3))
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()
    mask = torch.zeros(3, 1, 7, 7).masked_fill_(~allowed, float("-inf"))
    monkeypatch.setattr(models, "dropout", lambda w, p, training=True: w)
    torch.testing.assert_close(attention(q, k, v, mask, 0.5), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    # without dropout (eval), torch's kernel itself
    torch.testing.assert_close(attention(q, k, v, mask, 0.0), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_fast_dropout_swaps_every_nn_dropout_and_keeps_the_state_dict():
    """What the student does to PEFT's LoRA dropout: same rates, same weights and keys, eval unchanged."""
    from slimrec.torch_ops import fast_dropout

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.2),
                              torch.nn.ModuleDict({"a": torch.nn.Dropout(0.05), "b": Dropout(0.3)}))
    before = net.state_dict()
    assert fast_dropout(net) == 2  # the one already fast is left alone
    assert type(net[1]) is Dropout and net[1].p == 0.2 and type(net[2]["a"]) is Dropout and net[2]["a"].p == 0.05
    assert net.state_dict().keys() == before.keys()
    x = torch.randn(3, 4)
    torch.testing.assert_close(net[:2].eval()(x), net[0](x))
