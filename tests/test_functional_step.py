"""privseg.dp.functional_step: the plain torch.func DP step the bench measures privseg against.

Per-subject gradients (k crops, the training loss) against one-crop-at-a-time autograd, and
the clip / sum / noise / divide arithmetic against a hand computation.
"""

from __future__ import annotations

import pytest
import torch

from privseg.architectures import build
from privseg.dp.functional_step import FunctionalDPStep, clip_sum_noise, per_subject_grads
from privseg.training.losses import PerSampleDiceCE

pytestmark = pytest.mark.usefixtures("one_thread")


def _model_batch(dims: int, b: int = 3, k: int = 2, side: int = 16):
    torch.manual_seed(0)
    model = build("unet", dims, 1, 3, base_channels=4, depth=2).double()
    x = torch.randn(b, k, 1, *(side,) * dims, dtype=torch.float64)
    y = torch.randint(0, 3, (b, k, *(side,) * dims))
    return model, x, y


@pytest.mark.parametrize("dims", [2, 3])
def test_subject_grads_are_mean_of_crop_grads_under_dice_ce(dims):
    """A subject's gradient is the mean over its k crops of each crop's Dice+CE gradient
    (MONAI's Dice under vmap included), computed here one crop at a time."""
    model, x, y = _model_batch(dims, side=16 if dims == 2 else 8)
    loss = PerSampleDiceCE(reduction="none")
    got = per_subject_grads(model, x, y, loss)
    params = dict(model.named_parameters())
    for i in range(x.shape[0]):
        ref = {n: torch.zeros_like(p) for n, p in params.items()}
        for j in range(x.shape[1]):
            model.zero_grad(set_to_none=True)
            loss(model(x[i, j:j + 1]), y[i, j:j + 1]).sum().backward()
            for n, p in params.items():
                ref[n] += p.grad / x.shape[1]
        for n in params:
            torch.testing.assert_close(got[n][i], ref[n], rtol=1e-7, atol=1e-10)


def test_clip_sum_noise_matches_hand_computation():
    """Clipped sum (factor min(1, C/(‖g‖+1e-6)) over all parameters), plus the generator's
    N(0, σ²C²) draws parameter by parameter, divided by the expected batch."""
    g = torch.Generator().manual_seed(1)
    grads = {"a": torch.randn(4, 3, 2, generator=g, dtype=torch.float64),
             "b": torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.01}
    grads["a"][0] *= 1e-3  # one sample below the clipping norm: left as is
    c, sigma, batch = 0.5, 1.3, 6
    out = clip_sum_noise(grads, c, sigma, batch, torch.Generator().manual_seed(7))
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in grads.values()))
    factor = torch.clamp(c / (norms + 1e-6), max=1.0)
    assert factor[0] == 1.0 and (factor[1:] < 1).all()
    noise_gen = torch.Generator().manual_seed(7)
    for n, v in grads.items():
        noise = torch.normal(0.0, sigma * c, size=v.shape[1:], generator=noise_gen,
                             dtype=v.dtype)
        expected = ((v * factor.view(-1, *[1] * (v.ndim - 1))).sum(0) + noise) / batch
        torch.testing.assert_close(out[n], expected)


def test_step_without_noise_bounds_each_subject_by_clipping_norm():
    """σ = 0, one subject, SGD lr 1: the update is that subject's gradient clipped to C over
    the expected batch, so its norm is min(‖g‖, C)/B."""
    model, x, y = _model_batch(2, b=1, k=1)
    loss = PerSampleDiceCE(reduction="none")
    g = per_subject_grads(model, x, y, loss)
    g_norm = float(torch.sqrt(sum(v.pow(2).sum() for v in g.values())))
    c, batch = g_norm / 4, 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = FunctionalDPStep(model, torch.optim.SGD(model.parameters(), lr=1.0), loss, c, 0.0,
                            batch)
    step.step(x, y)
    delta = torch.sqrt(sum((before[n] - p.detach()).pow(2).sum()
                           for n, p in model.named_parameters()))
    assert float(delta) == pytest.approx(c / batch, rel=1e-5)


def test_dice_ce_equals_monai_onehot_dice_bitwise():
    """The out-of-place one-hot (vmap-able) gives exactly MONAI's ``to_onehot_y`` loss and
    gradient, so training losses did not change."""
    import torch.nn.functional as F
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    logits = torch.randn(3, 4, 8, 8, 8, requires_grad=True)
    y = torch.randint(0, 4, (3, 8, 8, 8))
    monai_dice = DiceLoss(softmax=True, to_onehot_y=True, reduction="none", batch=False)
    old = (F.cross_entropy(logits, y, reduction="none").mean(dim=(1, 2, 3))
           + monai_dice(logits, y.unsqueeze(1)).flatten(1).mean(1))
    new = PerSampleDiceCE(reduction="none")(logits, y)
    assert torch.equal(new, old)
    assert torch.equal(*(torch.autograd.grad(v.sum(), logits)[0] for v in (new, old)))
