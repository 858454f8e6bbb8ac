"""Canary site updates: white-box audit of site-level DP-FedAvg (:class:`PoissonSiteDP`).

The site-level analogue of Nasr et al. 2023's Dirac gradient canaries (arXiv 2302.07956), for
the one-run audit of Steinke, Nasr & Jagielski 2023 (arXiv 2305.08846): each of m canary
"sites" contributes, whenever it takes part, a pseudo-update of norm exactly C (the clipping
norm) along its own model coordinate (distinct per canary, so canaries are orthogonal). An
included canary takes part in each round with the run's Poisson rate q, by coins of its own
like a real site's; its update joins the sum of the real sites' clipped updates *before* the
server adds N(0, σ²C²), so it is released through the mechanism's own noise and fixed
denominator q·N. The auditor sees every released global model and scores canary i by the sum
over rounds of the release delta's coordinate i.

:class:`SiteUpdateCanaries` attaches to a built :class:`privseg.federated.site_dp.PoissonSiteDP`
by wrapping the instance's ``clipped_sum`` and ``noisy_mean_update``; the strategy's code and
the run's accounting are unchanged. ``noise_fraction`` < 1 is a deliberate fault: that fraction
of the calibrated noise is added while the accountant counts the calibrated σ.
"""

from __future__ import annotations

import numpy as np


class SiteUpdateCanaries:
    """``m`` Dirac canary site updates inside a DP-FedAvg strategy; :attr:`scores` after."""

    def __init__(self, strategy, included: np.ndarray, sample_rate: float, *,
                 noise_fraction: float = 1.0) -> None:
        if not hasattr(strategy, "clipped_sum") or not hasattr(strategy, "noisy_mean_update"):
            raise ValueError("canary site updates need privseg's PoissonSiteDP strategy "
                             f"(got {type(strategy).__name__})")
        self.strategy = strategy
        self.included = np.asarray(included, dtype=bool)
        self.m = len(self.included)
        self.sample_rate = sample_rate
        self.noise_fraction = noise_fraction
        self._rng = np.random.default_rng()  # secret: coordinates and canary sampling
        self.coords: np.ndarray | None = None  # flat indices over the float arrays
        self.scores = np.zeros(self.m)
        self.times_sampled = np.zeros(self.m, dtype=np.int64)
        self.rounds = 0
        self._sum = strategy.clipped_sum
        self._mean = strategy.noisy_mean_update
        strategy.clipped_sum = self._sum_with_canaries
        strategy.noisy_mean_update = self._noise_and_observe

    def _locate(self, arrays: list[np.ndarray]) -> list[tuple[int, int]]:
        """(array, flat offset) of each canary's coordinate; drawn once, among float arrays."""
        floats = [j for j, a in enumerate(arrays) if np.issubdtype(a.dtype, np.floating)]
        sizes = np.array([arrays[j].size for j in floats])
        if self.coords is None:
            if self.m > sizes.sum():
                raise ValueError(f"{self.m} canary site updates need as many model "
                                 f"parameters; the model has {int(sizes.sum())}")
            self.coords = np.sort(self._rng.choice(int(sizes.sum()), self.m, replace=False))
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        which = np.searchsorted(offsets, self.coords, side="right") - 1
        return [(floats[w], int(c - offsets[w])) for w, c in zip(which, self.coords,
                                                                  strict=True)]

    def _sum_with_canaries(self, updates: list[list[np.ndarray]]) -> list[np.ndarray]:
        total = self._sum(updates)
        where = self._locate(total)
        sampled = self.included & (self._rng.random(self.m) < self.sample_rate)
        self.times_sampled += sampled
        norm = self.strategy.clipping_norm  # a pseudo-update of norm exactly C: clip is a no-op
        for i in np.flatnonzero(sampled):
            j, k = where[i]
            total[j].reshape(-1)[k] += norm
        return total

    def _noise_and_observe(self, updates: list[list[np.ndarray]]) -> list[np.ndarray]:
        sigma = self.strategy.noise_multiplier
        self.strategy.noise_multiplier = sigma * self.noise_fraction  # 1: unchanged
        try:
            mean = self._mean(updates)
        finally:
            self.strategy.noise_multiplier = sigma
        for i, (j, k) in enumerate(self._locate(mean)):
            self.scores[i] += float(mean[j].reshape(-1)[k])  # the release delta, coordinate i
        self.rounds += 1
        return mean
