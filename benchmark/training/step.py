"""The training step both settings share: optimizer, Opacus wrapping, one logical step.

A central run (:mod:`privseg.central`) and a federated site (:mod:`privseg.federated.client`)
train through the same :func:`prepare_training` and :func:`train_step`. Logical (Poisson)
batches are split into physical chunks through Opacus' own skip-step mechanism, so memory is
bounded whatever the logical batch size. The DP pieces come from :mod:`privseg.dp.private`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from opacus.accountants import IAccountant
from torch import nn
from torch.utils.data import DataLoader

from privseg.config import RunConfig
from privseg.datasets.crops import SubjectCrops
from privseg.dp.accounting import PrivacyPlan
from privseg.dp.private import group_crop_grad_samples, make_private, upcast_grad_samples
from privseg.training.cpu_memory import keep_freed_cpu_memory
from privseg.training.ema import WeightAverages, make_averages
from privseg.training.losses import PerSampleDiceCE, per_subject
from privseg.training.schedule import make_scheduler

# Opacus' hooks on the first layer fire although the input needs no gradient; harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def _chunks(x: torch.Tensor, y: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    if len(x) == 0:
        yield x, y
        return
    for i in range(0, len(x), size):
        yield x[i:i + size], y[i:i + size]


@dataclass
class TrainState:
    """What a training loop needs, private or not."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    criterion: nn.Module
    accountant: IAccountant | None = None
    plan: PrivacyPlan | None = None
    per_sample_loss: nn.Module = PerSampleDiceCE(reduction="none")
    #: how DP backward passes reduce the loss (:func:`privseg.dp.private.grad_sample_reduction`)
    grad_reduction: str = "sum"
    #: seconds :func:`prepare_training` spent calibrating σ
    calibration_s: float = 0.0
    #: EMA / Polyak averages of the weights (:mod:`privseg.training.ema`), if the config asks
    averages: WeightAverages | None = None
    #: the lr schedule (:mod:`privseg.training.schedule`), stepped once per logical step
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None


def make_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    t = cfg.training
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def prepare_training(cfg: RunConfig, model: nn.Module, train_set: SubjectCrops,
                     device: torch.device, plan: PrivacyPlan | None = None,
                     stock_opacus: bool = False) -> TrainState:
    """Model, optimizer, loader and loss; wrapped by Opacus when privacy is enabled
    (:func:`privseg.dp.private.make_private`, which takes ``plan`` and ``stock_opacus``)."""
    t, p = cfg.training, cfg.privacy
    if device.type == "cpu":
        keep_freed_cpu_memory()
    optimizer = make_optimizer(cfg, model.parameters())
    # the averages copy the user's model before Opacus wraps it (no grad-sample hooks)
    template = copy.deepcopy(model) if t.ema is not None or t.polyak_epochs else None
    loader_kw = dict(num_workers=t.num_workers, persistent_workers=t.num_workers > 0,
                     pin_memory=device.type == "cuda")
    if not p.enabled:
        loader = DataLoader(train_set, batch_size=t.expected_batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(cfg.seed), **loader_kw)
        return TrainState(model, optimizer, loader, PerSampleDiceCE(reduction="mean"),
                          averages=_averages(cfg, template, len(loader)),
                          scheduler=make_scheduler(t.lr_schedule, optimizer,
                                                   t.epochs * len(loader)))
    dp = make_private(cfg, model, optimizer, train_set, PerSampleDiceCE(reduction="mean"),
                      device, loader_kw, plan=plan, stock_opacus=stock_opacus)
    return TrainState(dp.model, dp.optimizer, dp.loader, dp.criterion, dp.accountant, dp.plan,
                      grad_reduction=dp.grad_reduction, calibration_s=dp.calibration_s,
                      averages=_averages(cfg, template, dp.plan.steps_per_epoch),
                      scheduler=make_scheduler(t.lr_schedule, dp.optimizer, dp.plan.steps))


def _averages(cfg: RunConfig, template: nn.Module | None,
              steps_per_epoch: int) -> WeightAverages | None:
    t = cfg.training
    if template is None:
        return None
    return make_averages(template, t.ema, t.polyak_epochs, t.epochs, steps_per_epoch)


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor, cfg: RunConfig,
               device: torch.device) -> torch.Tensor:
    """One logical step over a (Poisson) batch of subjects, in physical chunks.

    ``x`` is ``[B, k, C, *S]``; returns the mean per-subject loss as a detached 0-d tensor on
    ``device`` (NaN for an empty batch). Nothing here waits for the GPU: the loss stays a
    device tensor so that the host can queue the next step while this one runs.
    """
    t = cfg.training
    k = t.crops_per_subject
    dp = state.accountant is not None
    amp = t.amp
    batch = len(x)
    total = torch.zeros((), device=device)
    chunks = list(_chunks(x, y, t.physical_batch_size))
    for i, (xc, yc) in enumerate(chunks):
        last = i == len(chunks) - 1
        xc = xc.to(device, non_blocking=True).flatten(0, 1)
        yc = yc.to(device, non_blocking=True).flatten(0, 1)
        if len(xc) == 0:
            # An empty Poisson batch is still a DP step: zero gradient plus noise. Ghost
            # clipping's optimizer reads the clipped sum from .grad, the others per-sample
            # gradients from .grad_sample.
            ghost = cfg.privacy.grad_sample_mode == "ghost"
            for p in state.model.parameters():
                if p.requires_grad and ghost:
                    p.grad = torch.zeros_like(p)
                elif p.requires_grad:
                    p.grad_sample = torch.zeros(0, *p.shape, device=device, dtype=p.dtype)
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext():
                logits = state.model(xc)
            if dp and cfg.privacy.grad_sample_mode == "ghost":
                loss = state.criterion(logits.float(), yc)
                total = total + loss.detach().float() * len(xc)
                loss.backward()
            else:
                crop_loss = state.per_sample_loss(logits.float(), yc)
                subject_loss = per_subject(crop_loss, k)
                total = total + subject_loss.detach().float().sum()
                # DP: the sum of crop losses (see grad_sample_reduction). Non-DP: sum over
                # the logical batch / its size, accumulated over chunks.
                if not dp:
                    (subject_loss.sum() / batch).backward()
                elif state.grad_reduction == "sum":
                    crop_loss.sum().backward()
                else:  # Opacus rescales the per-sample gradients by the chunk size
                    subject_loss.mean().backward()
                if dp:
                    if amp:
                        upcast_grad_samples(state.model)
                    group_crop_grad_samples(state.model, k)
        if dp:
            state.optimizer.signal_skip_step(do_skip=not last)
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
        elif last:
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
    _after_logical_step(state)
    return total / batch if batch else torch.full((), float("nan"), device=device)


def _after_logical_step(state: TrainState) -> None:
    """After each logical step: the averages of its released weights (post-processing, no
    privacy cost) and the lr schedule's step."""
    if state.averages is not None:
        state.averages.update(unwrap(state.model))
    if state.scheduler is not None:
        state.scheduler.step()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside Opacus' GradSampleModule (if wrapped)."""
    return getattr(model, "_module", model)
