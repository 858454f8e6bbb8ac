"""Privacy plans and accounting for the two federated DP modes (Opacus accountants).

``sample``: each site runs DP-SGD on its own subjects. Its σ is calibrated, at the site, from
its number of training subjects n, its q = B / n and its total local steps over *all* rounds
(local epochs × ⌊1/q⌋ or local steps, × rounds), as if it were chosen every round; its
accountant composes every step it actually takes, so a site chosen less often spends less.

``site``: DP-FedAvg (McMahan et al. 2018). Each round m = max(1, ⌊fraction × N⌋) of N sites
are chosen; each site's model update is clipped to norm C, the server averages the clipped
updates with equal weights and adds N(0, (σC/m)²) noise (Flower's
``DifferentialPrivacyServerSideFixedClipping``), i.e. the sum of clipped updates has
sensitivity C under adding or removing one site. Flower has no accountant: ε comes from
Opacus' accountant for ``rounds`` subsampled Gaussian steps with q = m / N. Flower picks m sites
without replacement; accounting it as Poisson sampling at q = m / N is the approximation
McMahan et al. make; with fraction 1 (q = 1) there is no sampling and the bound is exact.
"""

from __future__ import annotations

from privseg.config import RunConfig
from privseg.dp.accounting import (
    PrivacyPlan,
    calibrate_noise,
    check_delta,
    default_delta,
    epsilon_of_history,
    steps_per_epoch,
)


def local_steps_per_round(cfg: RunConfig, sample_rate: float, n_train: int) -> int:
    """Local steps a chosen site takes in one round."""
    fed = cfg.setting.federated
    if fed.local_steps is not None:
        return fed.local_steps
    if cfg.privacy.enabled and fed.dp_mode == "sample":
        return fed.local_epochs * steps_per_epoch(sample_rate)
    # non-DP loader: ceil(n / B) batches per epoch
    b = cfg.training.expected_batch_size
    return fed.local_epochs * -(-n_train // b)


def plan_site_sample(cfg: RunConfig, n_train: int) -> PrivacyPlan:
    """A site's DP-SGD plan over all rounds (sample mode), calibrated on its own n and q."""
    p, t, fed = cfg.privacy, cfg.training, cfg.setting.federated
    if n_train < 2:
        raise ValueError("DP training needs at least 2 training subjects at each site")
    if t.expected_batch_size > n_train:
        raise ValueError(f"training.expected_batch_size={t.expected_batch_size} exceeds this "
                         f"site's {n_train} training subjects")
    delta = default_delta(n_train) if p.delta is None else p.delta
    check_delta(delta, n_train)
    q = t.expected_batch_size / n_train
    steps = local_steps_per_round(cfg, q, n_train) * fed.rounds
    sigma = p.noise_multiplier
    if sigma is None:  # as a central run: the same calibration, so the reported ε ≤ target
        sigma = calibrate_noise(p.target_epsilon, delta, q, steps, p.accountant)
    return PrivacyPlan(n_train, t.expected_batch_size, q, steps_per_epoch(q), fed.rounds, steps,
                       delta, float(sigma), p.target_epsilon, p.accountant, p.max_grad_norm)


def sites_per_round(n_sites: int, fraction: float) -> int:
    """m: Flower's FedAvg samples max(⌊fraction × N⌋, min_fit_clients=1) sites."""
    return max(int(n_sites * fraction), 1)


def site_level_plan(cfg: RunConfig, n_sites: int) -> dict:
    """σ, q, δ, rounds of DP-FedAvg (site mode); σ calibrated to privacy.target_epsilon."""
    p, fed = cfg.privacy, cfg.setting.federated
    m = sites_per_round(n_sites, fed.fraction_fit)
    q = m / n_sites
    delta = default_delta(n_sites) if p.delta is None else p.delta
    check_delta(delta, n_sites)
    sigma = p.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise(p.target_epsilon, delta, q, fed.rounds, p.accountant)
    return {"n_sites": n_sites, "sites_per_round": m, "sample_rate": q, "rounds": fed.rounds,
            "delta": delta, "noise_multiplier": float(sigma), "clipping_norm": fed.site_clip_norm,
            "target_epsilon": p.target_epsilon, "accountant": p.accountant, "unit": "site"}


def site_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
                       accountant: str = "prv") -> float:
    """ε of DP-FedAvg after ``rounds`` rounds (Opacus accountant)."""
    return epsilon_of_history([(noise_multiplier, sample_rate, rounds)], delta, accountant)
