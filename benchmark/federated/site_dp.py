"""Site-level DP (DP-FedAvg, McMahan et al. 2018): Poisson site sampling, a fixed denominator.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` averages the ⌊q·N⌋ sites its client
manager picks without replacement and adds N(0, (σC/m)²) with m the number of sites present:
the sampling is not the Poisson sampling its accounting would need, and the noise's scale
depends on how many sites there are, so adding or removing a site changes it. Here instead
(the mechanism McMahan et al. analyse):

- :class:`PoissonSiteSampler` includes each site independently with probability q, by coins
  from a secret generator (:func:`privseg.dp.randomness.dp_seed`);
- :class:`PoissonSiteDP` (a Flower ``Strategy`` around the inner FedAvg/FedProx/FedAdam) clips
  each taking part site's update to norm C (Flower's ``compute_clip_model_update``), adds
  N(0, σ²C²) to their sum, divides by the public q·N and hands the result to the inner strategy
  as the round's one aggregate, so FedAdam's server step is post-processing of the noisy
  release. A round in which no site was drawn still releases noise (an empty Poisson batch is
  still a step of the mechanism).

Noise comes from NumPy's global generator through Flower's ``add_gaussian_noise_inplace`` (as
Flower's wrappers draw it, SecAgg+ path included); the server seeds it from a secret seed.
"""

from __future__ import annotations

import numpy as np
from flwr.common import FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.typing import Code
from flwr.server.strategy import Strategy
from flwr.supercore.differential_privacy import (
    add_gaussian_noise_inplace,
    clip_inputs_inplace,
    get_norm,
)

from privseg.config import RunConfig
from privseg.dp.randomness import dp_seed, np_legacy_state


def seed_server_noise(cfg: RunConfig) -> None:
    """Seed NumPy's global generator, from which the server's DP-FedAvg noise is drawn.

    Secret by default: ``np.random.seed()`` fills the whole Mersenne-Twister state from the
    operating system's entropy. With ``privacy.noise_seed`` a seed derived from it instead.
    """
    np.random.set_state(np_legacy_state(cfg.privacy.noise_seed, "server-noise", cfg.seed))


def site_sampler(cfg: RunConfig) -> PoissonSiteSampler:
    """The server's Poisson site sampler for site-level DP (secret coins unless opted out)."""
    return PoissonSiteSampler(cfg.setting.federated.fraction_fit,
                              dp_seed(cfg.privacy.noise_seed, "site-sampling", cfg.seed))


class PoissonSiteSampler:
    """Each site takes part in a round independently with probability ``q`` (secret coins)."""

    def __init__(self, q: float, seed: int):
        self.q = q
        self.rng = np.random.default_rng(seed)

    def draw(self, names: list[str]) -> list[str]:
        """The sites taking part this round, in the given (name) order; may be empty."""
        coins = self.rng.random(len(names))
        return [n for n, c in zip(names, coins, strict=True) if c < self.q]


class ForwardingStrategy(Strategy):
    """A Flower ``Strategy`` that hands every call to an inner one (override what differs)."""

    def __init__(self, strategy: Strategy):
        super().__init__()
        self.strategy = strategy

    def initialize_parameters(self, client_manager):
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.strategy.evaluate(server_round, parameters)


class UniformWeights(ForwardingStrategy):
    """Give every site weight 1 in the inner average (DP-FedAvg's sensitivity needs it)."""

    def aggregate_fit(self, server_round, results, failures):
        equal = [(c, FitRes(r.status, r.parameters, 1, r.metrics)) for c, r in results]
        return self.strategy.aggregate_fit(server_round, equal, failures)


class PoissonSiteDP(ForwardingStrategy):
    """Clip, sum, noise, divide by the fixed q·N; the inner strategy sees the noisy aggregate."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float,
                 denominator: float):
        super().__init__(strategy)
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.denominator = denominator
        self.current: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        self.current = parameters_to_ndarrays(parameters)
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def clipped_sum(self, updates: list[list[np.ndarray]]) -> list[np.ndarray]:
        """Σ clip_C(update), array by array: the sum the noise is added to."""
        total = [np.zeros_like(a) for a in self.current]
        for update in updates:
            if not all(np.isfinite(u).all() for u in update):  # min(1, C/nan) is 1: unclipped
                raise ValueError("a site's update holds NaN or infinity, which no clipping "
                                 "bounds; the server leaves such updates out before this")
            if get_norm(update) > 0:  # Flower's clip divides by the norm
                clip_inputs_inplace(update, self.clipping_norm)
            for t, u in zip(total, update, strict=True):
                t += u
        return total

    def noisy_mean_update(self, updates: list[list[np.ndarray]]) -> list[np.ndarray]:
        """(Σ clip_C(update) + N(0, σ²C²)) / (q·N), array by array."""
        total = self.clipped_sum(updates)
        add_gaussian_noise_inplace(total, self.noise_multiplier * self.clipping_norm)
        return [t / np.asarray(self.denominator, dtype=t.dtype) for t in total]

    def aggregate_fit(self, server_round, results, failures):
        updates = [[np.subtract(x, y) for x, y in
                    zip(parameters_to_ndarrays(r.parameters), self.current, strict=True)]
                   for _, r in results]
        mean = self.noisy_mean_update(updates)
        released = [c + m for c, m in zip(self.current, mean, strict=True)]
        one = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(released), 1, {})
        return self.strategy.aggregate_fit(server_round, [(None, one)], [])
