"""privseg.dp.optimizer.FlatDPOptimizer: Opacus' flat clipping and Gaussian noise, fused.

Invariant 4 (one clipped contribution per subject) and the noise the accountant assumes
(N(0, σ²C²) per coordinate of the clipped sum) must hold exactly as in Opacus' own
``DPOptimizer``, whatever the bucketing of parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from privseg.dp.optimizer import FlatDPOptimizer, _buckets


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 5, 3), nn.GroupNorm(5, 5), nn.Conv2d(5, 3, 1, bias=False),
                         nn.Flatten(), nn.Linear(12, 4)).double()


def _grad_samples(model: nn.Module, batch: int, seed: int) -> list[torch.Tensor]:
    """Per-sample gradients with norms spread around C = 1: some samples clipped, some not."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1.5, 1.0, batch, dtype=torch.float64)
    out = [torch.randn(batch, *p.shape, generator=g, dtype=torch.float64) for p in
           model.parameters()]
    total = torch.sqrt(sum(o.flatten(1).square().sum(1) for o in out))
    return [o * (scales / total).view(-1, *[1] * (o.dim() - 1)) for o in out]


def _optimizer(cls, model, sigma=0.0, clip=1.0, batch=4, seed=1):
    return cls(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=sigma,
               max_grad_norm=clip, expected_batch_size=batch, loss_reduction="mean",
               generator=torch.Generator().manual_seed(seed))


def _step(opt, model, chunks):
    """One logical step over physical chunks of per-sample gradients (skip steps between)."""
    for i, chunk in enumerate(chunks):
        for p, gs in zip(model.parameters(), chunk, strict=True):
            p.grad_sample = gs.clone()
        opt.signal_skip_step(do_skip=i < len(chunks) - 1)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("bucket", [None, 1, 60, 10**9])
@pytest.mark.parametrize("sizes", [[6], [3, 5], [0]])
def test_flat_optimizer_step_equals_opacus(bucket, sizes):
    """Same clipped, summed, scaled update as Opacus' DPOptimizer (σ = 0), for one chunk, two
    accumulated chunks, and an empty batch; bucket sizes from one parameter per bucket to all
    parameters in one."""
    ref_model, flat_model = _model(), _model()
    chunks = [_grad_samples(ref_model, n, seed=i) for i, n in enumerate(sizes)]
    opacus = _optimizer(DPOptimizer, ref_model, batch=max(sum(sizes), 1))
    flat = _optimizer(FlatDPOptimizer, flat_model, batch=max(sum(sizes), 1))
    flat.bucket_elements = bucket
    before = [p.detach().clone() for p in ref_model.parameters()]
    _step(opacus, ref_model, chunks)
    _step(flat, flat_model, chunks)
    moved = 0.0
    for p, q, b in zip(ref_model.parameters(), flat_model.parameters(), before, strict=True):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-12, atol=1e-14)
        moved += float((p.detach() - b).abs().sum())
    assert (moved > 0) == (sum(sizes) > 0)


def test_flat_optimizer_clips_each_sample_to_c():
    """With one sample per step the update is that sample's gradient scaled to norm ≤ C."""
    model = _model()
    opt = _optimizer(FlatDPOptimizer, model, clip=0.3, batch=1)
    for seed, expect_clipped in ((0, False), (1, True)):
        gs = _grad_samples(model, 2, seed)
        gs = [g[1:] if expect_clipped else g[:1] for g in gs]  # norms 10 and 10^-1.5
        norm = float(torch.sqrt(sum(g.square().sum() for g in gs)))
        before = [p.detach().clone() for p in model.parameters()]
        _step(opt, model, [gs])
        step = float(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in
                                    zip(model.parameters(), before, strict=True))))
        # Opacus' factor is C / (‖g‖ + 1e-6): the clipped norm is C·(1 - 1e-7) here
        assert step == pytest.approx(0.3 if expect_clipped else norm, rel=2e-7)


@pytest.mark.parametrize("bucket", [None, 10**9])
def test_flat_optimizer_noise_is_gaussian_sigma_c_per_coordinate(bucket):
    """Zero gradients: ``p.grad`` is N(0, (σC/B)²) in every coordinate, fresh each step, and
    not the same draw for two parameters."""
    model = nn.Sequential(nn.Linear(100, 60), nn.Linear(60, 60)).double()
    sigma, clip, batch = 1.5, 0.7, 4
    opt = _optimizer(FlatDPOptimizer, model, sigma=sigma, clip=clip, batch=batch)
    opt.bucket_elements = bucket
    draws = []
    for _ in range(3):
        for p in model.parameters():
            p.grad_sample = torch.zeros(batch, *p.shape, dtype=torch.float64)
        opt.pre_step()
        draws.append(torch.cat([p.grad.detach().flatten().clone() for p in model.parameters()]))
        opt.zero_grad(set_to_none=True)
    noise = torch.stack(draws)  # [3, D], D = 9720
    expected = sigma * clip / batch
    assert float(noise.std()) == pytest.approx(expected, rel=0.03)
    assert abs(float(noise.mean())) < 4 * expected / noise.numel() ** 0.5
    assert not torch.equal(noise[0], noise[1])
    first, third = noise[:, :3600].flatten(), noise[:, 6060:9660].flatten()
    corr = torch.corrcoef(torch.stack([first, third]))
    assert abs(float(corr[0, 1])) < 0.05


def test_flat_optimizer_adds_the_noise_opacus_adds():
    """Same generator state, same gradients: the noisy update equals Opacus' to float
    rounding (the same Gaussian draws, parameter by parameter)."""
    ref_model, flat_model = _model(), _model()
    chunks = [_grad_samples(ref_model, 5, seed=0)]
    opacus = _optimizer(DPOptimizer, ref_model, sigma=1.3, batch=5, seed=7)
    flat = _optimizer(FlatDPOptimizer, flat_model, sigma=1.3, batch=5, seed=7)
    for _ in range(2):
        _step(opacus, ref_model, chunks)
        _step(flat, flat_model, chunks)
    for p, q in zip(ref_model.parameters(), flat_model.parameters(), strict=True):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-12, atol=1e-14)


def test_buckets_cover_parameters_in_order_within_cap():
    sizes = [5, 1, 30, 2, 2, 7]
    for cap in (1, 10, 20, 100):
        ranges = _buckets(sizes, 2, cap)
        assert [i for a, b in ranges for i in range(a, b)] == list(range(len(sizes)))
        for a, b in ranges:
            assert b - a == 1 or 2 * sum(sizes[a:b]) <= cap
    assert _buckets(sizes, 2, 10**6) == [(0, 6)]


def test_flat_optimizer_refuses_secure_mode():
    model = _model()
    with pytest.raises(ValueError, match="secure_mode"):
        FlatDPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0,
                        max_grad_norm=1.0, expected_batch_size=1, secure_mode=True)


def test_engine_uses_flat_optimizer_except_for_ghost_clipping(tmp_path):
    from spine_helpers import TINY_PHANTOM, tiny_config

    from privseg.architectures import build
    from privseg.datasets import load_dataset
    from privseg.datasets.crops import SubjectCrops
    from privseg.training.step import prepare_training

    ss = load_dataset("phantom", TINY_PHANTOM, None, tmp_path / "cache")
    train = SubjectCrops(ss.subjects[:8], 2, None, 1, 0.9)
    model = build("unet", 2, 1, ss.num_classes, base_channels=4, depth=2)
    kinds = {}
    for mode in ("hooks", "functorch", "ghost"):
        cfg = tiny_config(tmp_path, privacy={"target_epsilon": None, "noise_multiplier": 1.0,
                                             "grad_sample_mode": mode})
        state = prepare_training(cfg, copy.deepcopy(model), train, torch.device("cpu"))
        kinds[mode] = type(state.optimizer)
    assert kinds["hooks"] is FlatDPOptimizer and kinds["functorch"] is FlatDPOptimizer
    assert kinds["ghost"] is not FlatDPOptimizer
