"""Turn a model, optimizer and training set into their DP-SGD versions (Opacus' pieces).

DP-SGD (Abadi et al. 2016) through Opacus, assembled here rather than by
``PrivacyEngine.make_private``, which derives q as 1/ceil(n/B) from a plain loader's length; we
sample at exactly q = B/n and hand the accountant that same q. The loader's items are
*subjects*, so Opacus' Poisson sampler samples subjects. Each subject contributes k crops; their
per-sample gradients are averaged into the subject's one gradient before Opacus clips it
(augmentation multiplicity, De et al. 2022), so every sampled subject contributes exactly one
clipped gradient and the reported ε is per subject.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from opacus.accountants import IAccountant, create_accountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from privseg.config import RunConfig
from privseg.dp.accounting import PrivacyPlan, plan_privacy
from privseg.dp.automatic import CLIPPING_OPTIMIZERS
from privseg.dp.bookkeeping import DeferredConvGrad
from privseg.dp.grad_samplers import prepare_module
from privseg.dp.randomness import dp_generator


def group_crop_grad_samples(model: nn.Module, crops_per_subject: int) -> None:
    """Turn per-crop gradients into per-subject gradients: mean over each subject's k crops.

    Opacus computes one grad sample per forward sample (crop). With ``loss_reduction='mean'``
    each crop's grad sample is the gradient of that crop's loss; the subject's gradient is the
    mean over its crops, and that is what must be clipped. A book-kept weight
    (:class:`privseg.dp.bookkeeping.DeferredConvGrad`) records the grouping instead: its norms
    and clipped sum are then those of the subjects' mean gradients.
    """
    if crops_per_subject == 1:
        return
    for p in model.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        if isinstance(gs, DeferredConvGrad):  # book-kept: grouped where its norms are taken
            p.grad_sample = gs.group(crops_per_subject)
            continue
        p.grad_sample = gs.view(-1, crops_per_subject, *gs.shape[1:]).mean(dim=1)


def upcast_grad_samples(model: nn.Module) -> None:
    """Per-sample gradients in each parameter's own dtype (fp32) before Opacus clips them.

    Under bf16 autocast, grad samplers return bf16 per-sample gradients; Opacus would take
    their norms and clip in bf16, so a clipped gradient's true norm could exceed the clipping
    bound by bf16's rounding (~0.4 %), and the sensitivity the accountant assumes would not
    hold. Upcast first, then norms, clipping and the sum are fp32 and exact to ~1e-7.
    """
    for p in model.parameters():
        gs = getattr(p, "grad_sample", None)
        if isinstance(gs, torch.Tensor) and gs.dtype != p.dtype:  # book-kept: fp32 anyway
            p.grad_sample = gs.to(p.dtype)


def grad_sample_reduction(grad_sample_mode: str) -> str:
    """How the loss that DP backward passes start from is reduced over the chunk's crops.

    ``"sum"`` (of per-crop losses) except for ghost clipping, whose loss wrapper averages:
    with ``"mean"`` Opacus would multiply every layer's output gradient by the chunk size to
    undo the mean, an activation-sized kernel per layer. Either way each crop's per-sample
    gradient is the gradient of its own loss. The DP optimizer's own ``loss_reduction``
    (dividing the noisy sum by the expected batch size) is separate and stays ``"mean"``.
    """
    return "mean" if grad_sample_mode == "ghost" else "sum"


@dataclass
class PrivateTraining:
    """The DP versions of a run's training pieces (Opacus' wrappers) and what they spend."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    criterion: nn.Module
    accountant: IAccountant
    plan: PrivacyPlan
    #: how DP backward passes reduce the chunk's loss (:func:`grad_sample_reduction`)
    grad_reduction: str
    #: seconds spent calibrating σ here (0 when a plan was given)
    calibration_s: float = 0.0


def make_private(cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 train_set: Dataset, criterion: nn.Module, device: torch.device,
                 loader_kw: dict, plan: PrivacyPlan | None = None,
                 stock_opacus: bool = False) -> PrivateTraining:
    """Opacus' grad-sample module, DP optimizer, Poisson ``DPDataLoader`` and accountant hook.

    The Poisson sampler and the Gaussian noise draw from their own generators, seeded by
    :func:`privseg.dp.randomness.dp_generator`: secret per run unless ``privacy.noise_seed`` opts
    into reproducible streams. A given ``plan`` (a federated site's, over all its rounds)
    replaces the central one.
    ``stock_opacus`` (for ``privseg bench``'s baseline) uses Opacus as shipped: its grad-sample
    module, conv and GroupNorm samplers and DP optimizer, with a mean-reduced loss.
    """
    t, p = cfg.training, cfg.privacy
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model {cfg.model.name} is not DP-compatible: {errors}")
    t0 = time.perf_counter()
    plan = plan or plan_privacy(
        len(train_set), t.expected_batch_size, t.epochs, target_epsilon=p.target_epsilon
        if p.noise_multiplier is None else None, noise_multiplier=p.noise_multiplier,
        delta=p.delta, accountant=p.accountant, max_grad_norm=p.max_grad_norm,
    )
    calibration_s = time.perf_counter() - t0
    sampler_gen = dp_generator(p.noise_seed, "sampler", cfg.seed)
    loader = DPDataLoader(train_set, sample_rate=plan.sample_rate, generator=sampler_gen,
                          **loader_kw)
    gsm_kw = {"max_grad_norm": p.max_grad_norm} if p.grad_sample_mode == "ghost" else {}
    reduction = "mean" if stock_opacus else grad_sample_reduction(p.grad_sample_mode)
    model = prepare_module(model, grad_sample_mode=p.grad_sample_mode, batch_first=True,
                           loss_reduction=reduction, lean=not stock_opacus,
                           conv_sampler="opacus" if stock_opacus else p.conv_grad_sampler,
                           **gsm_kw)
    if p.grad_sample_mode in ("hooks", "functorch"):
        model.forbid_grad_accumulation()
    optim_cls = get_optimizer_class(clipping="flat", distributed=False,
                                    grad_sample_mode=p.grad_sample_mode)
    extra = {}
    if optim_cls is DPOptimizer and not stock_opacus:  # not ghost clipping's optimizer
        optim_cls = CLIPPING_OPTIMIZERS[p.clipping]
        if p.clipping == "automatic":
            extra["gamma"] = p.auto_clip_gamma
    elif p.clipping != "flat":
        raise ValueError(f"privacy.clipping={p.clipping} needs privseg's DP optimizer (hooks or "
                         "functorch mode, not stock Opacus)")
    optimizer = optim_cls(
        optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=p.max_grad_norm,
        expected_batch_size=t.expected_batch_size, loss_reduction="mean",
        generator=dp_generator(p.noise_seed, "noise", cfg.seed, device=device),
        **extra,
    )
    accountant = create_accountant(p.accountant)
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    if p.grad_sample_mode == "ghost":
        criterion = DPLossFastGradientClipping(model, optimizer, criterion, loss_reduction="mean")
    if len(loader) != plan.steps_per_epoch:
        raise RuntimeError(f"Opacus loader has {len(loader)} steps/epoch, the privacy plan "
                           f"{plan.steps_per_epoch}")
    return PrivateTraining(model, optimizer, loader, criterion, accountant, plan, reduction,
                           calibration_s)
