"""Privacy plans for the two federated DP modes; the accounting itself is :mod:`privseg.dp`'s.

``sample``: each site runs DP-SGD on its own subjects. Its σ is calibrated, at the site, from
its number of training subjects n, its q = B / n and its total local steps over *all* rounds
(local epochs × ⌊1/q⌋ or local steps, × rounds), as if it were chosen every round; its
accountant composes every step it actually takes, so a site chosen less often spends less.

``site``: DP-FedAvg (McMahan et al. 2018, arXiv 1710.06963), as privseg runs it
(:mod:`privseg.federated.site_dp`): every round each of the N sites takes part independently
with probability q = ``fraction_fit``, by secret coins at the server; each taking part clips
its model update to norm C; the server adds N(0, σ²C²) to the sum of clipped updates and
divides by the fixed, public q·N. Under adding or removing one whole site the sum moves by at
most C and nothing else depends on the data, so each round is a Poisson-subsampled Gaussian
mechanism and Opacus' accountant composes ``rounds`` of them. N is the public, fixed roster
of enrolled sites (it sets the denominator): the neighbouring relation is one enrolled site's
data present or absent (zero-out), not a change in how many sites there are. With q = 1
every site is in every round: no amplification, and the same accountant then composes plain
Gaussian mechanisms. With secure aggregation each site's message is SecAgg+'s stochastic
rounding of its clipped model, off by less than one quantum 2R/Q per coordinate, so one site
moves the sum by at most C + √d·2R/Q (d: the model's size): σ is calibrated, and ε
accounted, for that sensitivity (``noise_multiplier_effective`` = σC / (C + √d·2R/Q)).
(Flower's own fixed-size sampling of ⌊q·N⌋ sites without replacement is *not* Poisson
sampling, and accounting it as such is optimistic; Lebeda et al. 2024, arXiv 2405.20769.)
"""

from __future__ import annotations

import math

from privseg.config import RunConfig
from privseg.dp.accounting import (
    PrivacyPlan,
    calibrate_noise,
    check_delta,
    checked_user_delta,
    default_delta,
    epsilon_for,
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
    warning = None if p.delta is None else checked_user_delta(p.delta, n_train)
    delta = default_delta(n_train) if p.delta is None else p.delta
    check_delta(delta, n_train)
    q = t.expected_batch_size / n_train
    steps = local_steps_per_round(cfg, q, n_train) * fed.rounds
    sigma = p.noise_multiplier
    if sigma is None:  # as a central run: the same calibration, so the reported ε ≤ target
        sigma = calibrate_noise(p.target_epsilon, delta, q, steps, p.accountant)
    return PrivacyPlan(n_train, t.expected_batch_size, q, steps_per_epoch(q), fed.rounds, steps,
                       delta, float(sigma), p.target_epsilon, p.accountant, p.max_grad_norm,
                       delta_warning=warning)


def sample_epsilon_bound(report: dict | None, rounds_sent: int, rounds: int,
                         target_epsilon: float | None) -> tuple[float, int | None]:
    """(ε, steps) at most spent by a sample-level site, from what the server saw of it.

    A site that was sent a round's fit instruction may have taken that round's local steps
    without its reply ever arriving (a straggler past the deadline, a site killed after
    training, a lost link): its last report then under-states its spend. This counts every
    step of every round it was sent (never more than the planned steps its σ was calibrated
    for, which the site refuses to exceed). ``report`` is its last fit metrics (σ, q, δ, planned
    and taken steps); a site that never answered has none, and is bounded by its calibration:
    σ was chosen so that all planned steps spend at most the target ε (∞ when σ was set by
    hand, as q = B/n is then unknown to the server).
    """
    if report is None:
        if rounds_sent == 0:
            return 0.0, 0
        return (math.inf if target_epsilon is None else float(target_epsilon)), None
    planned, taken = int(report["planned_steps"]), int(report["steps"])
    steps = max(taken, min(planned, planned // rounds * rounds_sent))
    if steps == taken:
        return float(report["epsilon"]), steps
    return epsilon_for(float(report["noise_multiplier"]), float(report["sample_rate"]), steps,
                       float(report["delta"]), str(report["accountant"])), steps


def sites_per_round(n_sites: int, fraction: float) -> int:
    """m: Flower's FedAvg samples max(⌊fraction × N⌋, min_fit_clients=1) sites."""
    return max(int(n_sites * fraction), 1)


def secagg_rounding_bound(cfg: RunConfig, model_size: int) -> float:
    """The L2 norm by which SecAgg+'s stochastic rounding can move one site's message: less
    than one quantum 2R/Q (R ``secagg_clipping_range``, Q ``secagg_quantization_range``) in
    each of its ``model_size`` coordinates (Flower's ``quantize``)."""
    fed = cfg.setting.federated
    return math.sqrt(model_size) * 2 * fed.secagg_clipping_range / fed.secagg_quantization_range


def site_level_plan(cfg: RunConfig, n_sites: int, model_size: int | None = None) -> dict:
    """σ, q, δ, rounds of DP-FedAvg (site mode); σ calibrated to privacy.target_epsilon.

    q = ``fraction_fit`` is each site's chance of taking part in a round (Poisson sampling);
    the noisy sum is divided by q·N, the expected number of sites, fixed before training.
    ``noise_multiplier`` σ scales the noise by the clipping norm C (σC, as Flower's wrappers
    add it); with secure aggregation the sensitivity is C plus SecAgg+'s rounding
    (:func:`secagg_rounding_bound`, which needs the model's ``model_size``), and ε is that of
    ``noise_multiplier_effective`` = σC / sensitivity.
    """
    p, fed = cfg.privacy, cfg.setting.federated
    q = float(fed.fraction_fit)
    warning = None if p.delta is None else checked_user_delta(p.delta, n_sites, "site")
    delta = default_delta(n_sites) if p.delta is None else p.delta
    clip = fed.site_clip_norm
    rounding = 0.0
    if fed.secure_aggregation:
        if model_size is None:
            raise ValueError("site-level DP with secure aggregation: the plan needs the model's "
                             "size (SecAgg+'s rounding adds √d·2R/Q to the sensitivity)")
        rounding = secagg_rounding_bound(cfg, model_size)
    sensitivity = clip + rounding
    sigma = p.noise_multiplier
    if sigma is None:
        effective = calibrate_noise(p.target_epsilon, delta, q, fed.rounds, p.accountant)
        sigma = effective * sensitivity / clip if rounding else effective
    else:
        effective = sigma * clip / sensitivity if rounding else sigma
    sampling = ("every site in every round (no subsampling, no amplification)" if q == 1 else
                f"Poisson: each site independently with probability q = {q:g} per round, "
                "secret coins at the server")
    return {"n_sites": n_sites, "sample_rate": q, "denominator": q * n_sites,
            "rounds": fed.rounds, "delta": delta, "noise_multiplier": float(sigma),
            "noise_multiplier_effective": float(effective), "sensitivity": sensitivity,
            "clipping_norm": clip, "target_epsilon": p.target_epsilon,
            "accountant": p.accountant, "unit": "site", "sampling": sampling,
            "neighbouring": ("one enrolled site's whole data present or absent (an absent "
                             "site contributes nothing), among N sites fixed beforehand: the "
                             "denominator q·N is public; sum sensitivity C"
                             + (" + SecAgg+'s rounding" if rounding else "")),
            "delta_warning": warning,
            **({"secagg_rounding_bound": rounding, "model_size": model_size} if rounding
               else {})}


def site_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
                       accountant: str = "prv") -> float:
    """ε of ``rounds`` rounds of DP-FedAvg with Poisson site sampling at ``sample_rate``
    (Opacus' accountant; ``sample_rate`` 1: every site every round)."""
    return epsilon_of_history([(noise_multiplier, sample_rate, rounds)], delta, accountant)
