"""Invariants 3 and 4: Poisson sampling of subjects; one clipped contribution per subject."""

import numpy as np
import pytest
import torch
from spine_helpers import TINY_PHANTOM, tiny_config

import privseg.dp.grad_samplers as gsamp
from privseg.architectures import build
from privseg.datasets import load_dataset
from privseg.datasets.augment import view_augmentation
from privseg.datasets.crops import SubjectCrops
from privseg.training.losses import PerSampleDiceCE
from privseg.training.setup import seed_everything
from privseg.training.step import prepare_training, train_step

#: every augmentation on (issue 17): k augmented views per subject
AUGMENT = {"flip": True, "affine": 0.1, "intensity": 0.1}


def _setup(tmp_path, k=1, mode="hooks", physical=4, clip=1.0, batch=4, sigma=0.0,
           augment=None, clipping="flat"):
    cfg = tiny_config(
        tmp_path,
        training={"crops_per_subject": k, "physical_batch_size": physical, "optimizer": "sgd",
                  "lr": 1.0, "momentum": 0.0, "expected_batch_size": batch},
        privacy={"target_epsilon": None, "noise_multiplier": sigma, "max_grad_norm": clip,
                 "grad_sample_mode": mode, "clipping": clipping},
    )
    seed_everything(0)
    ss = load_dataset("phantom", TINY_PHANTOM, None, tmp_path / "cache")
    train = SubjectCrops(ss.subjects[:16], 2, None, k, 0.9,
                         augment=view_augmentation(**augment, dims=2) if augment else None)
    model = build("unet", 2, 1, ss.num_classes, base_channels=4, depth=2).double()
    ref = build("unet", 2, 1, ss.num_classes, base_channels=4, depth=2).double()
    ref.load_state_dict(model.state_dict())
    state = prepare_training(cfg, model, train, torch.device("cpu"))
    return cfg, state, train, ref


def test_dp_batches_are_poisson_over_subjects(tmp_path):
    _, state, train, _ = _setup(tmp_path, batch=4)
    n, q = len(train), 4 / 16
    # The loader's batch sampler is Opacus' Poisson sampler over subject indices.
    sizes, seen = [], set()
    for _ in range(150):
        for batch in state.loader.batch_sampler:
            assert len(set(batch)) == len(batch)  # a subject appears at most once per step
            assert all(0 <= i < n for i in batch)
            sizes.append(len(batch))
            seen.update(batch)
    sizes = np.array(sizes)
    assert len(set(sizes.tolist())) > 3  # sizes vary: no fixed-size batches in DP mode
    stderr = np.sqrt(n * q * (1 - q) / len(sizes))
    assert abs(sizes.mean() - q * n) < 4 * stderr
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.25)
    assert seen == set(range(n))


def _subject_grad(ref, x, y, k):
    """Gradient of one subject's loss (mean over its k crops), computed on its own."""
    ref.zero_grad()
    loss = PerSampleDiceCE(reduction="none")(ref(x.double()), y).mean()
    loss.backward()
    return [p.grad.detach().clone() for p in ref.parameters()]


def _clipped_sum(grads_per_unit, clip, clipping="flat"):
    total = [torch.zeros_like(g) for g in grads_per_unit[0]]
    norms = []
    for g in grads_per_unit:
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        norms.append(float(norm))
        factor = (min(1.0, clip / (float(norm) + 1e-6)) if clipping == "flat"
                  else clip / (float(norm) + 0.01))  # automatic clipping, Bu et al. 2022
        total = [a + factor * t for a, t in zip(total, g, strict=True)]
    return total, norms


def _book_keep_every_conv(monkeypatch) -> None:
    """Every conv weight book-kept (privseg.dp.bookkeeping), not only where it is cheaper."""
    monkeypatch.setattr(gsamp, "defer_weight", lambda layer, positions: True)


@pytest.mark.parametrize("k,mode,physical,augment,clipping,book_keep_all", [
    (1, "hooks", 4, None, "flat", False), (3, "hooks", 2, None, "flat", False),
    (3, "functorch", 4, None, "flat", False), (1, "ghost", 2, None, "flat", False),
    (4, "hooks", 2, AUGMENT, "flat", False), (3, "hooks", 2, None, "automatic", False),
    (2, "functorch", 4, AUGMENT, "automatic", False), (1, "hooks", 4, None, "flat", True),
    (3, "hooks", 2, None, "flat", True), (4, "hooks", 2, AUGMENT, "automatic", True)])
def test_each_subject_contributes_one_clipped_gradient(tmp_path, monkeypatch, k, mode, physical,
                                                       augment, clipping, book_keep_all):
    """The update is the (flat or automatic) clipped sum of per-subject gradients computed
    one subject at a time: per-sample gradients exact, clipping after them (invariants 1, 4).
    ``book_keep_all``: every conv weight's norms and clipped sum come from book-keeping
    (the tiny U-Net has no layer where it is cheaper), so each subject's norm over its k
    crops and its factor on its own gradient are checked there too."""
    if book_keep_all:
        _book_keep_every_conv(monkeypatch)
    _, _, train, ref = _setup(tmp_path, k=k, mode=mode, physical=physical, augment=augment)
    torch.manual_seed(1)
    items = [train[i] for i in range(5)]
    x = torch.stack([it[0] for it in items]).double()
    y = torch.stack([it[1] for it in items])
    if augment:  # the views are augmented: not the crops the same draw gives without
        train.augment = None
        torch.manual_seed(1)
        plain = torch.stack([train[i][0] for i in range(5)]).double()
        assert float((plain - x).abs().max()) > 0.1
    per_subject = [_subject_grad(ref, x[i], y[i], k) for i in range(5)]
    _, norms = _clipped_sum(per_subject, 1.0)
    # C between the subjects' gradient norms: some clipped, some not, so both a wrong
    # clipping and a wrong scale of the unclipped gradients (e.g. k x) would show
    clip = sorted(norms)[2]
    cfg, state, _, ref = _setup(tmp_path, k=k, mode=mode, physical=physical, clip=clip,
                                clipping=clipping)
    before = [p.detach().clone() for p in ref.parameters()]
    train_step(state, x, y, cfg, torch.device("cpu"))
    after = list(state.model.parameters())
    update = [(b - a.detach()) for a, b in zip(after, before, strict=True)]  # SGD, lr 1
    expected, norms = _clipped_sum(per_subject, clip, clipping)
    assert min(norms) < clip < max(norms)
    expected = [e / 4 for e in expected]  # averaged over the expected batch size
    for u, e in zip(update, expected, strict=True):
        torch.testing.assert_close(u, e, rtol=1e-4, atol=1e-9)
    # No subject's contribution exceeds the clipping norm.
    total_norm = torch.sqrt(sum((u**2).sum() for u in update)) * 4
    assert float(total_norm) <= 5 * clip * (1 + 1e-6)
    if k > 1:
        # Treating crops as units (k clipped contributions per subject) is a different update.
        crops = [_subject_grad(ref, x[i, j:j + 1], y[i, j:j + 1], 1) for i in range(5)
                 for j in range(k)]
        per_crop, _ = _clipped_sum(crops, clip, clipping)
        diff = sum(float(((e * 4 - c / k) ** 2).sum()) for e, c in
                   zip(expected, per_crop, strict=True))
        assert diff > 1e-12


def test_empty_poisson_batch_is_a_noise_only_step(tmp_path):
    cfg, state, train, ref = _setup(tmp_path, sigma=1.0)
    x = torch.zeros(0, 1, 1, 16, 16, dtype=torch.float64)
    y = torch.zeros(0, 1, 16, 16, dtype=torch.long)
    before = [p.detach().clone() for p in state.model.parameters()]
    loss = train_step(state, x, y, cfg, torch.device("cpu"))
    assert loss.shape == () and torch.isnan(loss)
    moved = [float((p.detach() - b).abs().max()) for p, b in
             zip(state.model.parameters(), before, strict=True)]
    assert min(moved) > 0  # noise was added to every parameter
    assert sum(n for _, _, n in state.accountant.history) == 1  # and the step was accounted


@pytest.mark.parametrize("mode", ["hooks", "functorch", "hooks-book-keep-all"])
def test_bf16_autocast_keeps_the_clipping_bound_exact(tmp_path, monkeypatch, mode):
    """Under bf16 autocast one subject's clipped contribution has norm C to fp32 precision.

    Without upcasting its bf16 per-sample gradient first, Opacus would take the norm in bf16
    and the clipped vector's true norm would miss C by bf16 rounding (~1e-3), breaking the
    sensitivity the accountant assumes.
    """
    clip = 0.01
    if mode == "hooks-book-keep-all":  # bf16 input and output gradients, fp32 norms and sum
        _book_keep_every_conv(monkeypatch)
        mode = "hooks"
    cfg, state, train, _ = _setup(tmp_path, mode=mode, clip=clip, batch=1, physical=1)
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"amp": True})})
    state.model.float()
    x, y = train[0]
    before = [p.detach().clone() for p in state.model.parameters()]
    train_step(state, x[None].float(), y[None], cfg, torch.device("cpu"))
    # SGD, lr 1, no noise, expected batch 1: the parameter change is minus the clipped gradient
    step = torch.sqrt(sum(((p.detach() - b).double() ** 2).sum()
                          for p, b in zip(state.model.parameters(), before, strict=True)))
    assert float(step) == pytest.approx(clip, rel=2e-5)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_automatic_clipping_normalises_every_contribution_below_one(tmp_path, mode):
    """Automatic clipping (C = 1): each subject's contribution is g/(‖g‖+γ), norm < 1, also
    for a gradient far below 1 (which flat clipping would leave as it is)."""
    sizes = []
    for scale in (1e-3, 1.0):
        cfg, state, train, _ = _setup(tmp_path, k=2, mode=mode, batch=1, physical=1,
                                      clipping="automatic")
        torch.manual_seed(0)
        x, y = train[0]
        before = [p.detach().clone() for p in state.model.parameters()]
        state.per_sample_loss = _Scaled(state.per_sample_loss, scale)
        train_step(state, x[None].double(), y[None], cfg, torch.device("cpu"))
        step = torch.sqrt(sum(((p.detach() - b) ** 2).sum()
                              for p, b in zip(state.model.parameters(), before, strict=True)))
        sizes.append(float(step))
    assert all(s < 1.0 for s in sizes)
    assert sizes[1] > 0.9  # a large gradient is normalised to almost 1 ...
    assert sizes[0] > 10 * 1e-3 * sizes[1]  # ... and a tiny one scaled up towards it


class _Scaled(torch.nn.Module):
    """A loss times a constant: scales every per-sample gradient by it."""

    def __init__(self, loss, scale):
        super().__init__()
        self.loss, self.scale = loss, scale

    def forward(self, *args):
        return self.loss(*args) * self.scale
