"""privseg.dp.bookkeeping: book-kept conv weights give exact norms and the exact clipped sum.

A book-kept weight's per-sample gradients are never instantiated; what the privacy of a step
rests on is that its per-sample (per-subject) norms are the true ones and that each sample's
clip factor scales that sample's gradient. Both are checked against ``torch.func`` per-subject
gradients of a registry U-Net (float64), and the checks are shown to catch a wrong norm and a
factor applied to the wrong sample.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_grad_samplers import _TwiceConv
from torch import nn

import privseg.dp.grad_samplers as gsamp
from privseg.architectures import build
from privseg.dp.bookkeeping import DeferredConvGrad
from privseg.dp.exactness import clipped_sum_error, per_sample_loss, reference_grads
from privseg.dp.functional_step import per_subject_grads
from privseg.dp.grad_samplers import prepare_module

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]


def _unet(dims: int, batch: int = 4, crops: int = 1):
    torch.manual_seed(0)
    side = 16 if dims == 2 else 8
    model = build("unet", dims, 1, 3, base_channels=4).double()
    x = torch.randn(batch, crops, 1, *(side,) * dims, dtype=torch.float64)
    y = torch.randint(0, 3, (batch, crops, *(side,) * dims))
    return model, x, y


def _deferred(model, x, y, crops):
    """Wrap as the engine does (hooks, book-keeping), backward the crops' summed loss, group
    the crops into subjects; the book-kept weights by name."""
    wrapped = prepare_module(copy.deepcopy(model).train(), "hooks", "bookkeeping",
                             batch_first=True, loss_reduction="sum")
    per_sample_loss(wrapped(x.flatten(0, 1)), y.flatten(0, 1)).sum().backward()
    # the engine's loss is the sum of crop losses; a subject's gradient is their mean
    out = {}
    for n, p in wrapped._module.named_parameters():
        if isinstance(p.grad_sample, DeferredConvGrad):
            out[n] = p.grad_sample.group(crops)
    return out


@pytest.mark.parametrize("dims,crops", [(2, 1), (2, 2), (3, 1), (3, 3)])
def test_deferred_norms_sums_and_gradients_equal_torch_func(dims, crops):
    model, x, y = _unet(dims, crops=crops)
    ref = per_subject_grads(copy.deepcopy(model), x, y, per_sample_loss)
    deferred = _deferred(model, x, y, crops)
    assert deferred, "no weight was book-kept: the check would be vacuous"
    b = x.shape[0]
    for n, d in deferred.items():
        r = ref[n]
        assert d.shape == r.shape
        scale = float(r.norm())
        # each subject's squared norm (the ghost norm over its crops' positions)
        torch.testing.assert_close(d.sq_norms(), r.flatten(1).pow(2).sum(1),
                                   rtol=1e-9, atol=1e-12 * scale**2)
        # a one-hot factor picks exactly that subject's gradient: factors land on their sample
        for j in range(b):
            onehot = torch.zeros(b, dtype=torch.float64)
            onehot[j] = 1.0
            torch.testing.assert_close(d.weighted_sum(onehot), r[j], rtol=1e-9,
                                       atol=1e-12 * scale)
        f = torch.rand(b, dtype=torch.float64)
        torch.testing.assert_close(d.weighted_sum(f), torch.einsum("i,i...->...", f, r),
                                   rtol=1e-9, atol=1e-12 * scale)
        torch.testing.assert_close(d.materialize(), r, rtol=1e-9, atol=1e-12 * scale)


def test_clipped_sum_check_catches_a_wrong_norm_and_a_misplaced_factor(monkeypatch):
    """:func:`clipped_sum_error` (the registry's check of the default path) passes as is and
    fails when a book-kept norm is wrong or the clip factors are applied to the wrong
    samples (reversed)."""
    model, x, y = _unet(2, batch=5)
    x, y = x[:, 0], y[:, 0]
    ref = reference_grads(model, x, y)
    err, kept = clipped_sum_error(model, x, y, reference=ref)
    assert kept > 0 and err < 1e-8
    sq_norms, weighted_sum = DeferredConvGrad.sq_norms, DeferredConvGrad.weighted_sum
    monkeypatch.setattr(DeferredConvGrad, "sq_norms", lambda self: 0.5 * sq_norms(self))
    assert clipped_sum_error(model, x, y, reference=ref)[0] > 1e-3
    monkeypatch.setattr(DeferredConvGrad, "sq_norms", sq_norms)
    monkeypatch.setattr(DeferredConvGrad, "weighted_sum",
                        lambda self, f: weighted_sum(self, f.flip(0)))
    assert clipped_sum_error(model, x, y, reference=ref)[0] > 1e-3


def test_a_weight_used_twice_is_instantiated_and_summed(monkeypatch):
    monkeypatch.setattr(gsamp, "defer_weight", lambda layer, positions: True)
    torch.manual_seed(0)
    model = _TwiceConv().double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 6, 6))
    wrapped = prepare_module(copy.deepcopy(model), "hooks", "bookkeeping", batch_first=True,
                             loss_reduction="sum")
    per_sample_loss(wrapped(x), y).sum().backward()
    params = dict(wrapped._module.named_parameters())
    assert isinstance(params["head.weight"].grad_sample, DeferredConvGrad)  # used once: kept
    assert isinstance(params["conv.weight"].grad_sample, torch.Tensor)
    for n, r in reference_grads(model, x, y).items():
        got = params[n].grad_sample
        got = got.materialize() if isinstance(got, DeferredConvGrad) else got
        torch.testing.assert_close(got, r, rtol=1e-9, atol=1e-12)


def test_grouping_needs_whole_subjects():
    layer = nn.Conv2d(2, 3, 3, padding=1)
    d = DeferredConvGrad(layer, torch.randn(6, 2, 4, 4), torch.randn(6, 3, 4, 4))
    assert len(d.group(3)) == 2
    with pytest.raises(ValueError, match="divide by crops=4"):
        d.group(4)


@pytest.mark.parametrize("bucket", [None, 1 << 14])
def test_clipped_sum_with_interleaved_book_kept_and_bucketed_weights(monkeypatch, bucket):
    """Book-kept weights between runs of instantiated ones (concatenated into buckets as on
    CUDA): the clipped sum is still exact and in parameter order."""
    from privseg.dp.optimizer import FlatDPOptimizer

    monkeypatch.setattr(gsamp, "defer_weight", lambda layer, positions: positions < 100)
    monkeypatch.setattr(FlatDPOptimizer, "bucket_elements", bucket)
    model, x, y = _unet(2, batch=5)
    err, kept = clipped_sum_error(model, x[:, 0], y[:, 0])
    assert kept > 2 and err < 1e-8
