"""privseg.dp.conv_math: per-sample conv weight gradients in in-channel blocks, chosen by timing.

The block is picked by measurement, so it must never change a number: a block is used only if
its result is bitwise equal to the one-call result, and a blocked result must be each sample's
exact gradient (against one-at-a-time autograd, float64).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import privseg.dp.conv_math as cm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(cm, "_measured_blocks", {})
    monkeypatch.setattr(cm, "_bitwise_equal", {})


def _layer(dims=2, c_in=80, c_out=6, **kw):
    torch.manual_seed(0)
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims](c_in, c_out, 3, **kw).double()
    x = torch.randn(3, c_in, *(6,) * dims, dtype=torch.float64)
    g = torch.randn_like(conv(x))
    return conv, x, g


def _autograd_per_sample(conv, x, g):
    return torch.stack([torch.autograd.grad((conv(x[i:i + 1]) * g[i:i + 1]).sum(),
                                            conv.weight)[0] for i in range(len(x))])


@pytest.mark.parametrize("dims,kw", [(2, {"padding": 1}), (2, {"stride": 2}),
                                     (3, {"padding": 1, "dilation": 2}),
                                     (2, {"padding": "same", "padding_mode": "reflect"})])
def test_blocked_per_sample_grads_are_exact(monkeypatch, dims, kw):
    """Only 32-channel blocks allowed: 80 input channels in blocks of 32, 32 and 16."""
    monkeypatch.setattr(cm, "CHANNEL_BLOCKS", (32,))
    conv, x, g = _layer(dims, **kw)
    got = cm.per_sample_conv_weight_grad(conv, x, g)
    assert list(cm._measured_blocks.values()) == [32]
    ref = _autograd_per_sample(conv, x, g)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_blocked_equals_one_call_bitwise():
    conv, x, g = _layer(c_in=128)
    xp, padding = cm.padded_input(conv, x)
    one = cm._blocked_weight_grad(conv, xp, g, padding, None)
    for block in (64, 32):
        assert torch.equal(cm._blocked_weight_grad(conv, xp, g, padding, block), one)


def test_a_block_that_changes_the_result_is_never_chosen(monkeypatch):
    real = cm._blocked_weight_grad

    def off_by_rounding(layer, x, g, padding, block):
        out = real(layer, x, g, padding, block)
        return out if block is None else out * (1 + 1e-15)

    monkeypatch.setattr(cm, "_blocked_weight_grad", off_by_rounding)
    monkeypatch.setattr(cm, "CHANNEL_BLOCKS", (None, 64, 32))
    conv, x, g = _layer(c_in=128)
    cm.per_sample_conv_weight_grad(conv, x, g)
    assert list(cm._measured_blocks.values()) == [None]


def test_choice_is_timed_once_per_layer_shape_and_checked_per_batch_size(monkeypatch):
    calls = []
    real = cm._blocked_weight_grad
    monkeypatch.setattr(cm, "_blocked_weight_grad",
                        lambda *a: calls.append(a[-1]) or real(*a))
    monkeypatch.setattr(cm, "CHANNEL_BLOCKS", (None, 32))
    monkeypatch.setattr(cm, "_measured_blocks", {})
    conv, x, g = _layer(c_in=128)
    cm.per_sample_conv_weight_grad(conv, x, g)
    first = len(calls)
    assert first > 1 + len(cm.CHANNEL_BLOCKS)  # every block timed
    cm.per_sample_conv_weight_grad(conv, x, g)
    assert len(calls) == first + 1  # then one call with the stored choice
    cm.per_sample_conv_weight_grad(conv, x[:2], g[:2])  # another batch size: not re-timed
    assert len(cm._measured_blocks) == 1 and len(calls) <= first + 4


def test_a_block_unequal_at_another_batch_size_is_not_used_there(monkeypatch):
    monkeypatch.setattr(cm, "CHANNEL_BLOCKS", (32,))
    conv, x, g = _layer(c_in=128)
    xp, padding = cm.padded_input(conv, x)
    assert cm.channel_block(conv, xp, g, padding) == 32
    real = cm._blocked_weight_grad
    monkeypatch.setattr(cm, "_blocked_weight_grad",
                        lambda *a: real(*a) * (1 + 1e-15) if a[1].shape[0] == 2 else real(*a))
    xp, padding = cm.padded_input(conv, x[:2])
    assert cm.channel_block(conv, xp, g[:2], padding) is None
    xp, padding = cm.padded_input(conv, x)
    assert cm.channel_block(conv, xp, g, padding) == 32


@pytest.mark.parametrize("what", ["few channels", "grouped"])
def test_no_blocks_where_they_cannot_apply(what):
    conv, x, g = (_layer(c_in=24) if what == "few channels"
                  else _layer(c_in=128, c_out=8, groups=4))
    xp, padding = cm.padded_input(conv, x)
    assert cm.channel_block(conv, xp, g, padding) is None
    assert cm._measured_blocks == {}
