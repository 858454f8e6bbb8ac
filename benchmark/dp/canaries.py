"""Gradient-space canaries: white-box audit of privseg's DP-SGD step (sampling, clipping, noise).

The adversary of Nasr et al. 2023 ("Tight auditing of differentially private machine learning",
arXiv 2302.07956): each canary is a pseudo-subject whose gradient is a Dirac vector (one model
coordinate, distinct per canary, so canaries are exactly orthogonal), larger than the clipping
norm C. An included canary is Poisson-sampled with the run's rate q at every logical step, like
a real subject; when sampled, its gradient joins the chunk's per-sample gradients *before* the
DP optimizer clips them, so it reaches the noisy sum through the optimizer's own clipping and
noise. The auditor sees every noisy clipped sum (every intermediate model) and scores canary i
by the sum over steps of the noisy gradient's coordinate i.

:class:`GradientCanaries` attaches to a built DP optimizer (Opacus' ``DPOptimizer`` or
:class:`privseg.dp.optimizer.FlatDPOptimizer`) by wrapping the instance's
``clip_and_accumulate`` and ``add_noise``; the optimizer's code and its accountant hook are
unchanged, so the accountant's ε is the one the run reports. Two deliberate faults, for tests
that the audit catches a broken mechanism: ``noise_fraction`` < 1 adds that fraction of the
calibrated noise while the accountant still counts the calibrated σ, and ``clipping=False``
sums gradients unclipped.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from opacus.optimizers import DPOptimizer

from privseg.dp.bookkeeping import DeferredConvGrad


class GradientCanaries:
    """``m`` Dirac gradient canaries inside a DP optimizer; :attr:`scores` after training."""

    def __init__(self, optimizer: DPOptimizer, included: np.ndarray, sample_rate: float, *,
                 norm_factor: float = 10.0, noise_fraction: float = 1.0,
                 clipping: bool = True) -> None:
        if not isinstance(optimizer, DPOptimizer) or type(optimizer).__name__.endswith(
                "FastGradientClipping"):
            raise ValueError("gradient canaries need privacy.grad_sample_mode hooks or "
                             "functorch (per-sample gradients in the DP optimizer)")
        self.optimizer = optimizer
        self.included = np.asarray(included, dtype=bool)
        self.m = len(self.included)
        self.sample_rate = sample_rate
        self.norm = norm_factor * optimizer.max_grad_norm
        self.noise_fraction = noise_fraction
        self.clipping = clipping
        params = optimizer.params
        self._sizes = [p.numel() for p in params]
        total = sum(self._sizes)
        if self.m > total:
            raise ValueError(f"{self.m} gradient canaries need as many model parameters; the "
                             f"model has {total}")
        self._rng = np.random.default_rng()  # secret: coordinates and canary sampling
        self.coords = np.sort(self._rng.choice(total, size=self.m, replace=False))
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)])
        self.scores = np.zeros(self.m)
        self.times_sampled = np.zeros(self.m, dtype=np.int64)
        self.steps = 0
        self._fresh = True  # the next clip_and_accumulate starts a logical step
        self._clip = optimizer.clip_and_accumulate
        self._noise = optimizer.add_noise
        optimizer.clip_and_accumulate = self._clip_with_canaries
        optimizer.add_noise = self._noise_and_observe

    def _canary_rows(self) -> list[torch.Tensor | None]:
        """This step's sampled canaries as per-sample gradient rows, one tensor per parameter."""
        sampled = self.included & (self._rng.random(self.m) < self.sample_rate)
        self.times_sampled += sampled
        idx = np.flatnonzero(sampled)
        rows: list[torch.Tensor | None] = []
        for j, p in enumerate(self.optimizer.params):
            if len(idx) == 0:
                rows.append(None)
                continue
            block = torch.zeros(len(idx), p.numel(), device=p.device, dtype=p.dtype)
            local = self.coords[idx] - self._offsets[j]
            hit = np.flatnonzero((local >= 0) & (local < self._sizes[j]))
            block[torch.as_tensor(hit), torch.as_tensor(local[hit])] = self.norm
            rows.append(block.view(len(idx), *p.shape))
        return rows

    def _clip_with_canaries(self) -> None:
        if self._fresh:
            for p, rows in zip(self.optimizer.params, self._canary_rows(), strict=True):
                if rows is not None:
                    real = self.optimizer._get_flat_grad_sample(p)
                    if isinstance(real, DeferredConvGrad):  # book-kept: instantiate to append
                        real = real.materialize()
                    p.grad_sample = torch.cat([real, rows])
            self._fresh = False
        if self.clipping:
            self._clip()
            return
        bound = self.optimizer.max_grad_norm
        self.optimizer.max_grad_norm = math.inf  # deliberate fault: nothing is clipped
        try:
            self._clip()
        finally:
            self.optimizer.max_grad_norm = bound

    def _noise_and_observe(self) -> None:
        sigma = self.optimizer.noise_multiplier
        self.optimizer.noise_multiplier = sigma * self.noise_fraction  # 1: unchanged
        try:
            self._noise()
        finally:
            self.optimizer.noise_multiplier = sigma  # what the accountant hook reads
        flat = torch.cat([p.grad.detach().reshape(-1) for p in self.optimizer.params])
        self.scores += flat[torch.as_tensor(self.coords, device=flat.device)].double().cpu(
        ).numpy()
        self.steps += 1
        self._fresh = True
