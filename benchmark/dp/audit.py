"""Empirical lower bounds on ε from one training run (Steinke, Nasr & Jagielski 2023).

"Privacy auditing with one (1) training run" (arXiv 2305.08846): m canaries are each included
with probability ½ by secret coins, the model is trained once, every canary is scored, and the
auditor guesses "in" for the highest scores and "out" for the lowest, abstaining on the rest.
If the training run is (ε, δ)-DP, the number W of correct guesses out of r satisfies their main
theorem (Theorem 3.1 there):

    P[W ≥ v] ≤ f(v) + 2mδ · max_{i=1..v} (f(v − i) − f(v)) / i,
    f(v) = P[Binomial(r, e^ε / (1 + e^ε)) ≥ v],

so observing v correct guesses rejects "(ε, δ)-DP" at confidence 1 − p when this bound is below
p. The audited lower bound is the largest ε rejected at the chosen confidence. It holds for any
scoring rule and any fixed choice of how many guesses to make; both must be fixed before looking
at the coins (here: by the caller, before scoring).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The one-run p-value of "the run is (ε, δ)-DP" after ``v`` correct guesses out of ``r``.

    Steinke et al. 2023, Theorem 3.1: the binomial tail of ε-DP randomised response,
    ``P[Binomial(r, e^ε/(1+e^ε)) ≥ v]``, plus the δ term
    ``2mδ · max_{1≤i≤v} P[v−i ≤ Binomial(r, ·) < v] / i`` (``m`` canaries in all). Capped at 1.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m} r={r} v={v}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomised response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha = 0.0
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        # P[v - i <= Binomial < v] for i = 1..v, as cumulative sums of the pmf below v
        below = np.cumsum(stats.binom.pmf(v - i, r, q))
        alpha = float(np.max(below / i))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower_bound(r: int, v: int, delta: float, confidence: float = 0.95,
                        m: int | None = None, tol: float = 1e-6) -> float:
    """The largest ε that ``v`` correct guesses out of ``r`` reject at ``confidence``.

    Bisection on :func:`p_value`, which grows with ε (a larger ε explains more correct
    guesses): 0 when even ε = 0 is not rejected. ``m`` (canaries in all, for the δ
    term) defaults to ``r``. Steinke et al. 2023, Section 5 / their Algorithm for ε lower bounds.
    """
    m = r if m is None else m
    alpha = 1.0 - confidence
    if not 0 < alpha < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:
            return math.inf
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class AuditResult:
    """One audit's outcome, as written into the run record under ``audit``."""

    kind: str
    canaries_m: int
    guesses_r: int
    correct_v: int
    epsilon_lower: float
    confidence: float
    epsilon_claimed: float
    delta: float
    canaries_in: int

    def as_dict(self) -> dict:
        return asdict(self)


def guess_and_count(scores: np.ndarray, included: np.ndarray, k_in: int,
                    k_out: int) -> tuple[int, int]:
    """Guess "in" for the ``k_in`` highest scores and "out" for the ``k_out`` lowest; return
    ``(r, v)``: guesses made and how many are right. Ties are broken at random so that equal
    scores (e.g. an input canary the model never saw) carry no information."""
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if len(included) != m or k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise ValueError(f"need k_in + k_out <= m = {m} (got {k_in} + {k_out})")
    tiebreak = np.random.default_rng().random(m)
    order = np.lexsort((tiebreak, scores))  # ascending by score
    ins, outs = order[m - k_in:] if k_in else order[:0], order[:k_out]
    v = int(included[ins].sum() + (~included[outs]).sum())
    return k_in + k_out, v


def audit_scores(scores: np.ndarray, included: np.ndarray, *, kind: str, delta: float,
                 epsilon_claimed: float, guess_fraction: float = 0.1,
                 confidence: float = 0.95) -> AuditResult:
    """Score -> guesses -> lower bound, with ``guess_fraction`` of the canaries guessed "in"
    (highest scores) and as many guessed "out" (lowest); the rest abstain.

    The guess counts are fixed in advance (not tuned on the outcome, which would need a
    correction for multiple testing). Steinke et al. 2023 use the same top-k / bottom-k rule.
    """
    m = len(scores)
    k = max(1, int(round(guess_fraction * m))) if m >= 2 else 0
    k = min(k, m // 2)
    r, v = guess_and_count(scores, included, k, k)
    eps = epsilon_lower_bound(r, v, delta, confidence, m=m)
    return AuditResult(kind=kind, canaries_m=m, guesses_r=r, correct_v=v, epsilon_lower=eps,
                       confidence=confidence, epsilon_claimed=epsilon_claimed, delta=delta,
                       canaries_in=int(np.sum(included)))


def secret_coins(m: int) -> np.ndarray:
    """Each of ``m`` canaries in with probability ½, from operating-system entropy (never
    from the run config: an auditor's coins must be unknown to the trainer)."""
    return np.random.default_rng().random(m) < 0.5
