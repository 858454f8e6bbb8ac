"""Privacy calibration and accounting, through Opacus' accountants.

The unit is the subject: ``q = expected_batch / n_subjects`` and one step is one Poisson-sampled
logical batch of subjects. Calibration finds the noise multiplier σ that spends a target ε at δ
over all steps (Opacus' ``get_noise_multiplier`` search over RDP, then a PRV bisection);
accounting reports the ε actually spent.
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
prv_analysis = _opacus.analysis.prv
Domain = prv_analysis.Domain


@contextlib.contextmanager
def _without_smallest_order_warning():
    """Silence Opacus' warning that the optimal RDP order is the smallest one tried: a loose
    RDP bound is still a valid one, and a run's log stays quiet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


#: Opacus' ceiling on σ in ``get_noise_multiplier`` (``opacus.accountants.utils.MAX_SIGMA``)
MAX_SIGMA = 1e6


def rdp_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         epsilon_tolerance: float) -> float:
    """σ by RDP at :data:`RDP_ORDERS`: Opacus' ``get_noise_multiplier`` search, step for step
    (σ doubled from 20 until ε ≤ target, then bisected from [0, σ] until ε is within
    ``epsilon_tolerance`` below the target), over :func:`rdp_epsilon`. Opacus' own call
    evaluates each probe's RDP in a Python loop (~50 ms a probe, 13-20 probes a calibration);
    same probes, same σ (``tests/test_privacy_accounting.py`` compares the two)."""
    eps_high = math.inf
    sigma_low, sigma_high = 0.0, 10.0
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = rdp_epsilon([(sigma_high, sample_rate, steps)], delta)
        if sigma_high > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = rdp_epsilon([(sigma, sample_rate, steps)], delta)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


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


@functools.lru_cache(maxsize=1)
def _log_binomials(max_order: int) -> np.ndarray:
    """``log C(α, i)`` for α in :data:`RDP_ORDERS` (rows), i = 0..max_order; -inf for i > α."""
    from scipy import special

    alphas = np.asarray(RDP_ORDERS, dtype=np.int64)[:, None]
    i = np.arange(max_order + 1)
    with np.errstate(divide="ignore"):
        table = np.where(i <= alphas, np.log(special.binom(alphas, i)), -np.inf)
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=4096)
def _rdp_of_one_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one sampled Gaussian step at :data:`RDP_ORDERS` (all integers): Opacus'
    ``compute_rdp`` formula (Mironov et al. 2019, section 3.3: ``log A_α = log Σ_i C(α, i)
    q^i (1-q)^(α-i) exp((i²-i)/(2σ²))``, RDP ``= log A_α / (α-1)``) with its sum over i as one
    NumPy log-sum-exp instead of Opacus' Python loop of ``_log_add`` calls, ~9,000 per (q, σ)
    (~30 ms; a calibration asks for 20 or more). Agrees with Opacus to ~1e-13 relative, and
    to ~2e-8 where RDP is tiny (q = 1e-5: float64 rounding of a log A near 0; ``tests/
    test_privacy_accounting.py``). Cached: accounting asks for the same (q, σ) again
    and again (every federated round, every PRV domain)."""
    from scipy.special import logsumexp

    q, sigma = sample_rate, noise_multiplier
    alphas = np.asarray(RDP_ORDERS)
    if q == 0:  # Opacus' special cases, in its order
        rdp = np.zeros_like(alphas)
    elif sigma == 0:
        rdp = np.full_like(alphas, np.inf)
    elif q == 1.0:
        rdp = alphas / (2 * sigma**2)
    else:
        log_binom = _log_binomials(int(alphas.max()))
        i = np.arange(log_binom.shape[1])
        terms = (log_binom + i * math.log(q) + (alphas[:, None] - i) * math.log1p(-q)
                 + (i * i - i) / (2 * sigma**2))
        rdp = logsumexp(terms, axis=1) / (alphas - 1)
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

    def _get_dprv(self, eps_error, delta_error):
        # Opacus' PRVAccountant._get_dprv, line for line, but for the truncated PRV's class
        prvs = [prv_analysis.PoissonSubsampledGaussianPRV(q, sigma)
                for sigma, q, _ in self.history]
        counts = [steps for _, _, steps in self.history]
        domain = self._get_domain(prvs=prvs, num_self_compositions=counts, eps_error=eps_error,
                                  delta_error=delta_error)
        tprvs = [ScalarCdfTruncatedPRV(prv, domain.t_min, domain.t_max) for prv in prvs]
        dprvs = [prv_analysis.discretize(tprv, domain) for tprv in tprvs]
        return prv_analysis.compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error) -> Domain:
        total = sum(num_self_compositions)
        history = [(prv.noise_multiplier, prv.sample_rate, n)
                   for prv, n in zip(prvs, num_self_compositions, strict=True)]
        bound = rdp_epsilon(history, delta_error / 4)
        for sigma, q, _ in history:
            bound = max(bound, rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total)))
        size = max(bound, eps_error) + 3
        mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        return fft_friendly(Domain.create_aligned(-size, size, mesh))


class ScalarCdfTruncatedPRV(prv_analysis.TruncatedPrivacyRandomVariable):
    """Opacus' truncated PRV of the Poisson-subsampled Gaussian, whose CDF at one float is
    computed with ``math`` rather than 0-d NumPy arrays.

    Opacus' ``mean()`` integrates the CDF with SciPy's ``quad``, which calls it at one point
    at a time, ~1,400 times per PRV query, at ~40 µs a call in NumPy: about half of a σ
    calibration. Same formula (``PoissonSubsampledGaussianPRV.cdf``), same truncation; arrays
    still take Opacus' path. Agrees with it to float64 rounding (``tests/
    test_privacy_accounting.py``).
    """

    def __init__(self, prv, t_min: float, t_max: float) -> None:
        super().__init__(prv, t_min, t_max)
        self._cdf_at_min = _sgm_cdf(prv.sample_rate, prv.noise_multiplier, float(t_min))
        self._mass = float(self._remaining_mass)

    def cdf(self, t):
        if not isinstance(t, float):
            return super().cdf(t)
        if t < self.t_min:
            return 0.0
        if t >= self.t_max:
            return 1.0
        prv = self._prv
        return (_sgm_cdf(prv.sample_rate, prv.noise_multiplier, t) - self._cdf_at_min) / self._mass


def _sgm_cdf(q: float, sigma: float, t: float) -> float:
    """``PoissonSubsampledGaussianPRV.cdf`` (Opacus) at one point, in ``math``."""
    if q < 1 and not t > math.log(1 - q):  # NumPy's log(1 - q) is -inf at q = 1
        return 0.0
    # Opacus' formula where it is well defined; q = 1 gives z = t, and where exp(t) + q - 1
    # rounds to 0 or below (t far left, q near 1: log would raise) the same z written as
    # t + log1p(-(1 - q)·exp(-t)) - log(q), which needs no cancellation
    a = math.exp(t) + q - 1
    if q == 1:
        z = t
    elif a > 0:
        z = math.log(a / q)
    else:
        z = t + math.log1p(-(1 - q) * math.exp(-t)) - math.log(q)
    root2 = math.sqrt(2)
    return (-q * math.erfc((2 * z * sigma**2 - 1) / (2 * root2 * sigma)) / 2
            - (1 - q) * math.erfc((2 * z * sigma**2 + 1) / (2 * root2 * sigma)) / 2 + 1.0)


def fft_friendly(domain: Domain) -> Domain:
    """``domain`` widened, at the same mesh, to the next even size whose FFT is fast.

    Opacus composes a PRV by ``rfft`` of its whole pmf, whose length is the domain's size: a
    size with a large prime factor (e.g. 496,232 = 8·11·5,639) makes that FFT ~30× slower
    than at a 5-smooth size close by (``scipy.fft.next_fast_len``). A wider truncation
    ``[-L', L']`` with ``L' ≥ L`` only lowers the truncated tail (Gopi et al. 2021, remark
    5.6), so the bound stays sound. The domain keeps Opacus' alignment, ``t_min = -(size/2 -
    1)·dt``, which ``_compose_fourier``'s final roll of the composed pmf relies on.
    """
    from scipy.fft import next_fast_len

    size = next_fast_len(domain.size, real=True)
    while size % 2:
        size = next_fast_len(size + 1, real=True)
    if size == domain.size:
        return domain
    half, dt = size // 2 - 1, domain.dt
    return Domain(-half * dt, (half + 1) * dt, size)


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
    (n, B, steps, δ, ε, accountant) share one calibration (0.2-1 s of PRV queries each).

    RDP (fast, :func:`rdp_noise_multiplier`) gives an upper bracket; for PRV a bisection below
    it follows, each probe a PRV query (Opacus' ``get_noise_multiplier`` starts from [0, 10]
    and costs many more PRV queries).
    """
    if not (0 < target_epsilon < math.inf) or steps < 1 or not (0 < sample_rate <= 1):
        raise ValueError(f"cannot calibrate σ to ε={target_epsilon} over {steps} steps at "
                         f"q={sample_rate}: need 0 < ε < inf, steps >= 1, 0 < q <= 1")
    hi = rdp_noise_multiplier(target_epsilon, delta, sample_rate, steps, tolerance * target_epsilon)
    if accountant == "rdp":
        return float(hi)
    kwargs = accountant_kwargs(accountant, target_epsilon)

    def epsilon(sigma: float) -> float:
        return epsilon_of_history([(sigma, sample_rate, steps)], delta, accountant, **kwargs)

    lo = hi / 2
    while True:
        answer, saw_above = _bisect(epsilon, lo, hi, target_epsilon, tolerance)
        # The bisection assumes lo is below the answer (ε(lo) > target). A probe above the
        # target shows it (ε falls as σ grows); otherwise ask lo itself, the costliest PRV
        # query of the search (largest ε, widest domain), only then. Same σ as asking first.
        if saw_above or epsilon(lo) > target_epsilon:
            hi = answer
            break
        hi, lo = lo, lo / 2
    # A run reports ε with PRV's error bound sized from its own history (epsilon_of_history's
    # default, ~0.2% of the RDP bound), which is wider than the bound above (0.2% of the target)
    # and so can put the reported upper bound over the target (seen: 8.004 for a target of 8).
    # Raise σ until the ε the run will report is within the target too.
    while epsilon_of_history([(hi, sample_rate, steps)], delta, accountant) > target_epsilon:
        hi *= 1 + tolerance / 4
    return float(hi)


def _bisect(epsilon, lo: float, hi: float, target_epsilon: float,
            tolerance: float) -> tuple[float, bool]:
    """Bisect σ in [lo, hi] for ε within ``tolerance``·target below the target: the smallest
    probe found at or below the target (else ``hi``), and whether any probe was above it."""
    saw_above = False
    for _ in range(40):
        mid = (lo + hi) / 2
        eps = epsilon(mid)
        if eps <= target_epsilon:
            hi = mid
            if target_epsilon - eps <= tolerance * target_epsilon:
                break
        else:
            lo, saw_above = mid, True
    return hi, saw_above


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
