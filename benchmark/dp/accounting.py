"""Privacy calibration and accounting, through Opacus' accountants.

The unit is the subject: ``q = expected_batch / n_subjects`` and one step is one Poisson-sampled
logical batch of subjects. Calibration finds the noise multiplier σ that spends a target ε at δ
over all steps (Opacus ``get_noise_multiplier``); accounting reports the ε actually spent.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from privseg.dp.opacus_accountants import opacus_accountants

# Opacus' accountants without torch unless Opacus is already imported (privseg.dp.
# opacus_accountants): `privseg privacy` and the CLI's calibrations import no torch.
_opacus = opacus_accountants()
PRVAccountant = _opacus.PRVAccountant
rdp_analysis = _opacus.analysis.rdp
Domain = _opacus.analysis.prv.Domain


@contextlib.contextmanager
def _without_smallest_order_warning():
    """Silence Opacus' warning that the optimal RDP order is the smallest one tried: a loose
    RDP bound is still a valid one, and a run's log stays quiet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


def get_noise_multiplier(**kwargs) -> float:
    """Opacus' ``get_noise_multiplier`` (``opacus.accountants.utils``), of the loaded copy,
    without the smallest-order warning (with RDP the calibration only brackets σ for PRV)."""
    with _without_smallest_order_warning():
        return _opacus.utils.get_noise_multiplier(**kwargs)

# Opacus' RDP accountant evaluates fractional orders (1.1, 1.2, ...) with a truncated series
# that comes out *below* Google's dp_accounting at those orders (seen: α=2.2, q=0.19, σ=1.27,
# 150 steps gives ε 0.7% lower). Integer orders have a closed form both libraries agree on, so
# the RDP accountant is queried at integer orders only: never optimistic, at worst a little
# conservative. PRV is queried with an error bound of 0.2% of ε (its cost grows steeply as
# the bound shrinks) and returns Opacus' upper bound.
RDP_ORDERS = [float(a) for a in range(2, 128)] + [128.0, 256.0, 512.0]
PRV_RELATIVE_ERROR = 2e-3
PRV_MIN_EPS_ERROR = 1e-3

log = logging.getLogger("privseg")


@functools.lru_cache(maxsize=4096)
def _rdp_of_one_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    # Cached: accounting asks for the same (q, σ) again and again (every federated round, every
    # PRV domain), and one evaluation at 129 orders costs ~20 ms of pure Python.
    rdp = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                   orders=RDP_ORDERS)
    rdp.flags.writeable = False
    return rdp


def rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of an accountant history ``[(σ, q, steps), ...]`` by RDP at integer orders.

    Opacus' RDP analysis (Mironov et al. 2019, "Rényi differential privacy of the sampled
    Gaussian mechanism"; conversion of Balle et al. 2020), with ``steps`` compositions of one
    step's RDP as in Opacus' ``RDPAccountant``, and the same numbers.
    """
    if not history:
        return 0.0
    rdp = sum(steps * _rdp_of_one_step(float(q), float(sigma)) for sigma, q, steps in history)
    with _without_smallest_order_warning():
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


class IntegerOrderPRVAccountant(PRVAccountant):
    """Opacus' PRV accountant (Gopi et al. 2021) whose safe domain is sized at integer orders.

    Opacus sizes the PRV's truncation domain ``[-L, L]`` from RDP at its default orders,
    evaluated at fractional orders with the truncated series noted above, which is both the
    slow part of a PRV query (~95% of it) and a hair optimistic. Here ``L`` follows the same
    rule (remark 5.6 of the paper, as Opacus' ``compute_safe_domain_size`` implements it) from
    :func:`rdp_epsilon`: a sound bound, cached per (q, σ). The mesh is Opacus'.
    """

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error) -> Domain:
        total = sum(num_self_compositions)
        history = [(prv.noise_multiplier, prv.sample_rate, n)
                   for prv, n in zip(prvs, num_self_compositions, strict=True)]
        bound = rdp_epsilon(history, delta_error / 4)
        for sigma, q, _ in history:
            bound = max(bound, rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total)))
        size = max(bound, eps_error) + 3
        mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        return Domain.create_aligned(-size, size, mesh)


def accountant_kwargs(accountant: str, epsilon_scale: float = 1.0) -> dict:
    """Arguments to Opacus' ``get_epsilon`` that make each accountant's answer a sound bound.

    ``epsilon_scale`` is the expected size of ε; PRV's absolute error bound is set relative
    to it.
    """
    if accountant == "rdp":
        return {"alphas": RDP_ORDERS}
    if accountant == "prv":
        return {"eps_error": max(PRV_MIN_EPS_ERROR, PRV_RELATIVE_ERROR * epsilon_scale)}
    raise ValueError(f"unknown accountant {accountant!r}; allowed: prv, rdp")


@functools.lru_cache(maxsize=1024)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "prv", tolerance: float = 0.005) -> float:
    """Smallest σ (to ``tolerance``·ε) whose reported ε after ``steps`` is at most the target.

    A pure function of its arguments, cached: the sites of a federation with the same plan
    (n, B, steps, δ, ε, accountant) share one calibration (~0.7 s of PRV queries each).

    RDP (fast) gives an upper bracket; for PRV a bisection below it follows, each probe a
    PRV query (Opacus' ``get_noise_multiplier`` starts from [0, 10] and costs many more PRV
    queries).
    """
    if not (0 < target_epsilon < math.inf) or steps < 1 or not (0 < sample_rate <= 1):
        raise ValueError(f"cannot calibrate σ to ε={target_epsilon} over {steps} steps at "
                         f"q={sample_rate}: need 0 < ε < inf, steps >= 1, 0 < q <= 1")
    hi = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                              sample_rate=sample_rate, steps=steps, accountant="rdp",
                              epsilon_tolerance=tolerance * target_epsilon, alphas=RDP_ORDERS)
    if accountant == "rdp":
        return float(hi)
    kwargs = accountant_kwargs(accountant, target_epsilon)
    lo = hi / 2
    while True:  # make sure lo is below the answer
        if epsilon_of_history([(lo, sample_rate, steps)], delta, accountant, **kwargs) > (
            target_epsilon
        ):
            break
        hi, lo = lo, lo / 2
    for _ in range(40):
        mid = (lo + hi) / 2
        eps = epsilon_of_history([(mid, sample_rate, steps)], delta, accountant, **kwargs)
        if eps <= target_epsilon:
            hi = mid
            if target_epsilon - eps <= tolerance * target_epsilon:
                break
        else:
            lo = mid
    # A run reports ε with PRV's error bound sized from its own history (epsilon_of_history's
    # default, ~0.2% of the RDP bound), which is wider than the bound above (0.2% of the target)
    # and so can put the reported upper bound over the target (seen: 8.004 for a target of 8).
    # Raise σ until the ε the run will report is within the target too.
    while epsilon_of_history([(hi, sample_rate, steps)], delta, accountant) > target_epsilon:
        hi *= 1 + tolerance / 4
    return float(hi)


@dataclass
class PrivacyPlan:
    """What a DP run will do and spend; filled in before training, checked after."""

    n_subjects: int
    expected_batch_size: int
    sample_rate: float
    steps_per_epoch: int
    epochs: int
    steps: int
    delta: float
    noise_multiplier: float
    target_epsilon: float | None
    accountant: str
    max_grad_norm: float
    unit: str = "subject"
    #: :func:`delta_warning` for a user-set δ, or None
    delta_warning: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


#: the default δ never exceeds this, however few the subjects (clinical cohorts are small)
MAX_DEFAULT_DELTA = 1e-5


def default_delta(n_subjects: int) -> float:
    """δ = min(1e-5, 1/n^1.1, 1/(100·n)).

    1/n^1.1 alone is weak for clinical cohorts (0.026 for 28 subjects, about 0.7/n): a
    mechanism that publishes one random subject's data outright is (0, 1/n)-DP. 1e-5 is the
    usual ceiling in the DP-SGD literature (Abadi et al. 2016); 1/(100·n) keeps the default
    well below the 1/(10·n) that :func:`delta_warning` flags, for cohorts beyond 1,000.
    """
    return min(MAX_DEFAULT_DELTA, 1.0 / n_subjects**1.1, 1.0 / (100 * n_subjects))


def check_delta(delta: float, n_subjects: int, unit: str = "subject") -> None:
    """Reject δ ≥ 1/n (such a δ permits leaking one unit's data outright)."""
    if delta >= 1.0 / n_subjects:
        raise ValueError(
            f"privacy.delta={delta:g} must be < 1/n = {1.0 / n_subjects:g} for n={n_subjects} "
            f"training {unit}s"
        )


def delta_warning(delta: float, n_units: int, unit: str = "subject") -> str | None:
    """A warning for a δ at or above 1/(10·n), which the log and the record carry; else None.

    Such a δ is allowed (below 1/n) but weak: a mechanism that leaks each unit's data with
    probability δ is (0, δ)-DP, so δ ≈ 0.1/n leaks about one unit in ten runs.
    """
    if delta < 1.0 / (10 * n_units):
        return None
    return (f"δ = {delta:.3g} is at or above 1/(10·n) = {1 / (10 * n_units):.3g} for n = "
            f"{n_units} {unit}s: a mechanism leaking one {unit} in {1 / (delta * n_units):.3g} "
            "runs would meet it; prefer the default min(1e-5, 1/n^1.1, 1/(100n))")


def checked_user_delta(delta: float, n_units: int, unit: str = "subject") -> str | None:
    """Check a δ the user set (:func:`check_delta`); log and return its :func:`delta_warning`."""
    check_delta(delta, n_units, unit)
    warning = delta_warning(delta, n_units, unit)
    if warning:
        log.warning("warning: %s", warning)
    return warning


def steps_per_epoch(sample_rate: float) -> int:
    """Steps in one epoch of Poisson sampling (Opacus' ``DPDataLoader`` convention, 1/q)."""
    return max(1, int(1.0 / sample_rate))


def plan_privacy(
    n_subjects: int,
    expected_batch_size: int,
    epochs: int,
    *,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    delta: float | None = None,
    accountant: str = "prv",
    max_grad_norm: float = 1.0,
) -> PrivacyPlan:
    """Calibrate σ to ``target_epsilon`` (or take a fixed σ) for this many subjects and steps."""
    if n_subjects < 2:
        raise ValueError("DP training needs at least 2 training subjects")
    if expected_batch_size < 1:
        raise ValueError(f"expected batch size must be >= 1, got {expected_batch_size}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if target_epsilon is not None and not (0 < target_epsilon < math.inf):
        raise ValueError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    if noise_multiplier is not None and not (0 <= noise_multiplier < math.inf):
        raise ValueError(f"noise multiplier must be a finite number >= 0, got {noise_multiplier}")
    if delta is not None and not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if expected_batch_size > n_subjects:
        raise ValueError(
            f"expected_batch_size={expected_batch_size} exceeds the {n_subjects} training subjects"
        )
    warning = None if delta is None else checked_user_delta(delta, n_subjects)
    delta = default_delta(n_subjects) if delta is None else delta
    check_delta(delta, n_subjects)
    q = expected_batch_size / n_subjects
    spe = steps_per_epoch(q)
    steps = spe * epochs
    if noise_multiplier is None:
        if target_epsilon is None:
            raise ValueError("give a target epsilon or a noise multiplier")
        noise_multiplier = calibrate_noise(target_epsilon, delta, q, steps, accountant)
    return PrivacyPlan(n_subjects, expected_batch_size, q, spe, epochs, steps, delta,
                       float(noise_multiplier), target_epsilon, accountant, max_grad_norm,
                       delta_warning=warning)


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "prv") -> float:
    """ε spent by ``steps`` Poisson-subsampled Gaussian steps (Opacus accountant)."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def epsilon_of_history(history: list[tuple[float, float, int]], delta: float,
                       accountant: str = "prv", **kwargs) -> float:
    """ε of an Opacus accountant history ``[(σ, q, steps), ...]`` at ``delta``.

    For PRV, a quick RDP bound first sizes the error bound (0.2% of ε) unless ``kwargs``
    give one.
    """
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    if accountant == "rdp":
        return rdp_epsilon(history, delta)
    if accountant != "prv":
        raise ValueError(f"unknown accountant {accountant!r}; allowed: prv, rdp")
    kwargs = kwargs or accountant_kwargs(accountant, rdp_epsilon(history, delta))
    if set(kwargs) != {"eps_error"}:  # other Opacus options: asked as they are, uncached
        acc = IntegerOrderPRVAccountant()
        acc.history = list(history)
        return float(acc.get_epsilon(delta=delta, **kwargs))
    return _prv_epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), delta,
                        kwargs["eps_error"])


@functools.lru_cache(maxsize=1024)
def _prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float,
                 eps_error: float) -> float:
    # Cached: a calibration's last probe is the query its run (or `privseg privacy`) then
    # reports, and identical site plans ask the same questions.
    acc = IntegerOrderPRVAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta, eps_error=eps_error))
