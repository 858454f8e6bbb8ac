"""Learning-rate schedules (``training.lr_schedule``): linear warm-up, then cosine or step decay.

Built from torch's own schedulers (``LinearLR`` for the warm-up, ``CosineAnnealingLR`` or
``MultiStepLR`` after it, chained by ``SequentialLR``) on the optimizer that holds the
learning rate: under DP, Opacus' ``DPOptimizer`` wraps the user's optimizer and forwards its
``param_groups``, so the scheduler acts on ``original_optimizer``. It is stepped once per
*logical* step (one Poisson batch, however many physical chunks), so its length is the run's
``epochs × steps_per_epoch`` whatever the physical batch size. The learning rate is a function
of the step count only: it reads no data and changes no accountant number.

Warm-up matters more under DP than without it (De et al. 2022 and Sander et al. 2023 use
large learning rates with a warm-up): the first noisy steps from a random initialisation are
the largest.
"""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler

from privseg.config import LRScheduleConfig


def base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer holding the learning rate (Opacus' ``original_optimizer`` under DP)."""
    return getattr(optimizer, "original_optimizer", optimizer)


def make_scheduler(schedule: LRScheduleConfig, optimizer: torch.optim.Optimizer,
                   total_steps: int) -> lr_scheduler.LRScheduler | None:
    """The scheduler of ``schedule`` over ``total_steps`` logical steps; None for a constant
    learning rate without warm-up (today's behaviour).

    - warm-up: the lr rises linearly from ``lr / (w + 1)`` to ``lr`` over the first
      ``w = round(warmup_fraction · total_steps)`` steps;
    - ``cosine``: then falls as a half cosine to ``min_lr_fraction · lr`` at the last step;
    - ``step``: then is multiplied by ``gamma`` at each of ``milestones`` (fractions of the
      run's steps);
    - ``constant``: then stays at ``lr``.
    """
    opt = base_optimizer(optimizer)
    warmup = round(schedule.warmup_fraction * total_steps)
    if schedule.kind == "constant" and not warmup:
        return None
    rest = max(total_steps - warmup, 1)
    if schedule.kind == "cosine":
        base = opt.param_groups[0]["lr"]
        main = lr_scheduler.CosineAnnealingLR(opt, T_max=rest,
                                              eta_min=schedule.min_lr_fraction * base)
    elif schedule.kind == "step":
        steps = sorted({max(round(m * total_steps) - warmup, 1) for m in schedule.milestones})
        main = lr_scheduler.MultiStepLR(opt, milestones=steps, gamma=schedule.gamma)
    else:
        main = lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    if not warmup:
        return main
    ramp = lr_scheduler.LinearLR(opt, start_factor=1.0 / (warmup + 1), total_iters=warmup)
    return lr_scheduler.SequentialLR(opt, [ramp, main], milestones=[warmup])
