"""Parameter averaging of the trained model: an EMA of the weights and a Polyak average.

De et al. 2022 (arXiv 2204.13650, §3) close much of DP-SGD's gap with averaging: the noisy
iterates wander around a good point, and their average sits nearer to it. Averaging reads
only the released iterates, so it is post-processing: it costs no privacy and changes no
accountant number (the accountant counts the DP steps, not what is done with their results).

Both averages are :class:`torch.optim.swa_utils.AveragedModel` copies of the user's model
(taken before Opacus wraps it, so no grad-sample hooks come along), updated once per logical
step after the optimizer step:

- ``ema``: exponential moving average with decay ``min(decay, (1 + t) / (10 + t))`` at update
  ``t`` (the warm-up of TensorFlow's ``ExponentialMovingAverage``), so a short run's average is
  not dominated by the initial weights when ``1 / (1 - decay)`` exceeds its step count;
- ``polyak``: the plain mean of the iterates of the last ``polyak_epochs`` epochs (Polyak &
  Juditsky 1992; De et al.'s "Polyak averaging").

Buffers (e.g. norm statistics) are averaged as well (``use_buffers=True``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def _ema_update(decay: float):
    """``multi_avg_fn`` for :class:`AveragedModel`: a warmed-up EMA step over all tensors."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor],
               num_averaged: torch.Tensor) -> None:
        t = float(num_averaged)
        d = min(decay, (1.0 + t) / (10.0 + t))
        floats = [(a, c) for a, c in zip(averaged, current, strict=True)
                  if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - d)
        for a, c in zip(averaged, current, strict=True):
            if not a.is_floating_point():  # integer buffers (counters): take the current
                a.copy_(c)

    return update


class WeightAverages:
    """The averaged copies of one model (``ema`` and/or ``polyak``), updated per logical step.

    ``polyak_start_step``: the number of steps after which the Polyak mean starts (steps before
    it are not averaged).
    """

    def __init__(self, model: nn.Module, ema_decay: float | None = None,
                 polyak_start_step: int | None = None):
        template = copy.deepcopy(model)
        self.models: dict[str, AveragedModel] = {}
        if ema_decay is not None:
            self.models["ema"] = AveragedModel(template, multi_avg_fn=_ema_update(ema_decay),
                                               use_buffers=True)
        if polyak_start_step is not None:
            self.models["polyak"] = AveragedModel(template, use_buffers=True)
        self.ema_decay = ema_decay
        self.polyak_start_step = polyak_start_step
        self.steps = 0

    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights (after a logical step) into the averages."""
        self.steps += 1
        for name, avg in self.models.items():
            if name == "polyak" and self.steps <= self.polyak_start_step:
                continue
            avg.update_parameters(model)

    def averaged(self) -> dict[str, nn.Module]:
        """The averaged models by name (``AveragedModel.module``: the user's model class);
        a Polyak average that has not started yet is left out."""
        return {name: avg.module for name, avg in self.models.items()
                if int(avg.n_averaged) > 0}

    def describe(self) -> dict:
        """What the record says about each average (kind, decay, steps averaged)."""
        out = {}
        for name, avg in self.models.items():
            entry = {"updates": int(avg.n_averaged)}
            if name == "ema":
                entry.update(decay=self.ema_decay, warmup="min(decay, (1+t)/(10+t))")
            else:
                entry.update(start_step=self.polyak_start_step)
            out[name] = entry
        return out


def make_averages(model: nn.Module, ema_decay: float | None, polyak_epochs: int,
                  epochs: int, steps_per_epoch: int) -> WeightAverages | None:
    """The run's :class:`WeightAverages` (None when neither average is asked for).

    ``model`` must be the user's model before Opacus wraps it.
    """
    if ema_decay is None and not polyak_epochs:
        return None
    start = (epochs - polyak_epochs) * steps_per_epoch if polyak_epochs else None
    return WeightAverages(model, ema_decay, start)


def evaluate_averages(averages: WeightAverages | None, evaluate_fn,
                      validate_fn=None) -> dict:
    """Record entries ``{name: {"test": metrics, "val": metrics, **describe}}`` for each
    averaged model, ``evaluate_fn(model) -> metrics`` evaluating it as the raw model is
    evaluated on the test subjects and ``validate_fn`` (optional) on the validation subjects:
    a recipe that keeps an EMA is selected on its EMA's validation Dice, never on test."""
    if averages is None:
        return {}
    info = averages.describe()
    out = {}
    for name, model in averages.averaged().items():
        out[name] = {**info[name], "test": evaluate_fn(model)}
        if validate_fn is not None:
            out[name]["val"] = validate_fn(model)
    return out
