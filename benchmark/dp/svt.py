"""The sparse vector technique (SVT) for selective parameter sharing, with sound accounting.

Li et al. 2019 ("Privacy-preserving federated brain tumour segmentation", MLMI, arXiv
1910.00962) let each site share only a fraction of its model update, chosen with SVT and
released with Laplace noise. This module is that mechanism, as Lyu, Su & Li 2017
("Understanding the sparse vector technique for differential privacy", PVLDB 10(6)) prove it:
their Algorithm 1 (Theorem 2: ε-DP for any sequence of queries of sensitivity Δ and at most c
positive answers):

    ε1 = ε_select / (1 + (2c)^(2/3)),  ε2 = ε_select − ε1     (their §4.2 optimal split,
                                                                non-monotonic queries)
    ρ ~ Lap(Δ/ε1), drawn once
    for each query q_i:  ν_i ~ Lap(2cΔ/ε2);  if q_i + ν_i ≥ τ + ρ: ⊤ (stop after c ⊤), else ⊥

Here a site's *update* u (its new weights minus the global model, every state-dict entry) is
first clipped coordinate-wise to [−γ, γ]; the queries are |clip(u)_i| in a random order drawn
from the site's secret DP stream (data-independent). The neighbouring relation is
**replace-one of the site's whole update** (local DP: any update in [−γ, γ]^d may replace any
other; the server need not be trusted), so each query changes by at most Δ = γ, and the queries
are not monotonic (some rise, some fall). The selected (≤ c) values are released as
clip(u)_i + Lap(2cγ/ε3): the release vector of at most c coordinates, each in [−γ, γ], has L1
sensitivity 2γ·c under that relation (Laplace mechanism, Dwork et al. 2006). The round costs
ε = ε1 + ε2 + ε3 (sequential composition; the release is conditioned on the SVT output, which
only says which coordinates are released), δ = 0; rounds compose by basic composition
(T·ε) or, where tighter, advanced composition (Dwork, Rothblum & Vadhan 2010).

Unlike NVFlare's legacy filter (noise on unclipped values, NVFlare issue #462) every released
value is clipped before its noise, every query answered is covered by ε1 + ε2 (no re-query with
fresh noise), and the release is charged for all c coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: the accounting formula, in words, for the record
FORMULA = ("per round: ε = ε1 + ε2 + ε3 with ε_select = ε1 + ε2, ε1 : ε2 = 1 : (2c)^(2/3) "
           "(Lyu, Su & Li 2017, Alg. 1, Thm. 2, §4.2), threshold noise Lap(γ/ε1), query noise "
           "Lap(2cγ/ε2), release noise Lap(2cγ/ε3) per selected coordinate; δ = 0; over T "
           "rounds: basic composition T·ε, or advanced composition "
           "ε·sqrt(2T ln(1/δ')) + T·ε·(e^ε − 1) at δ' when smaller")


@dataclass(frozen=True)
class SVTBudget:
    """One round's SVT budget at a site: the ε split and the Laplace scales it implies."""

    epsilon: float  #: ε per round = ε1 + ε2 + ε3
    eps1: float  #: threshold noise
    eps2: float  #: query noise
    eps3: float  #: release noise
    c: int  #: at most c coordinates selected
    gamma: float  #: coordinate clip γ (Δ = γ for the queries)

    @property
    def threshold_scale(self) -> float:
        """Scale of ρ ~ Lap(Δ/ε1), Δ = γ."""
        return _scale(self.gamma, self.eps1)

    @property
    def query_scale(self) -> float:
        """Scale of ν_i ~ Lap(2cΔ/ε2) (Alg. 1, non-monotonic queries)."""
        return _scale(2 * self.c * self.gamma, self.eps2)

    @property
    def release_scale(self) -> float:
        """Scale of the release noise Lap(2cγ/ε3): L1 sensitivity 2γ·c of ≤ c clipped values."""
        return _scale(2 * self.c * self.gamma, self.eps3)

    def as_dict(self) -> dict:
        return {"epsilon_per_round": self.epsilon, "eps1_threshold": self.eps1,
                "eps2_queries": self.eps2, "eps3_release": self.eps3, "c": self.c,
                "clip_gamma": self.gamma, "threshold_scale": self.threshold_scale,
                "query_scale": self.query_scale, "release_scale": self.release_scale}


def _scale(sensitivity: float, eps: float) -> float:
    return 0.0 if math.isinf(eps) else sensitivity / eps


def svt_budget(epsilon_round: float, c: int, gamma: float,
               release_share: float = 0.5) -> SVTBudget:
    """Split one round's ε: ``release_share`` of it to the release (ε3), the rest to SVT's
    selection, divided ε1 : ε2 = 1 : (2c)^(2/3) (Lyu, Su & Li 2017, §4.2, non-monotonic)."""
    if c < 1:
        raise ValueError(f"SVT needs c >= 1 selected coordinates (got {c})")
    if math.isinf(epsilon_round):
        return SVTBudget(math.inf, math.inf, math.inf, math.inf, c, gamma)
    eps3 = release_share * epsilon_round
    select = epsilon_round - eps3
    eps1 = select / (1 + (2 * c) ** (2 / 3))
    return SVTBudget(epsilon_round, eps1, select - eps1, eps3, c, gamma)


@dataclass
class SVTRelease:
    """What SVT lets leave the site: selected flat indices (ascending) and their noisy values."""

    indices: np.ndarray  #: int64, ascending, into the flattened update
    values: np.ndarray  #: float64: clip(u)_i + Lap(release_scale)
    queries: int  #: queries answered (⊤ and ⊥), all covered by ε1 + ε2


def svt_select(update: np.ndarray, budget: SVTBudget, threshold: float,
               rng: np.random.Generator) -> SVTRelease:
    """Lyu, Su & Li 2017 Alg. 1 over |clip_γ(u)_i| in a random order, then the Laplace release.

    ``update`` is the flattened site update (any float dtype; computed in float64); ``rng`` a
    secret DP stream (:func:`privseg.dp.randomness.dp_seed`).
    """
    u = np.clip(np.asarray(update, dtype=np.float64), -budget.gamma, budget.gamma)
    d = u.size
    order = rng.permutation(d)  # data-independent query order
    rho = rng.laplace(0.0, budget.threshold_scale)
    nu = rng.laplace(0.0, budget.query_scale, size=d)
    positive = np.abs(u[order]) + nu >= threshold + rho
    hits = np.flatnonzero(positive)[:budget.c]  # stop after c ⊤ answers
    queries = int(hits[-1]) + 1 if hits.size == budget.c else d
    chosen = np.sort(order[hits])
    values = u[chosen] + rng.laplace(0.0, budget.release_scale, size=chosen.size)
    return SVTRelease(chosen.astype(np.int64), values, queries)


def basic_composition(epsilon_round: float, rounds: int) -> float:
    """T rounds of a pure ε-DP mechanism: T·ε (δ = 0)."""
    return epsilon_round * rounds


def advanced_composition(epsilon_round: float, rounds: int, delta: float) -> float:
    """Dwork, Rothblum & Vadhan 2010 (Dwork & Roth 2014, Thm. 3.20): T rounds of ε-DP are
    (ε·sqrt(2T ln(1/δ')) + T·ε·(e^ε − 1), δ')-DP."""
    if rounds == 0:
        return 0.0
    e = epsilon_round
    if e > 700:  # e^ε overflows a float: the bound is useless there
        return math.inf
    return e * math.sqrt(2 * rounds * math.log(1 / delta)) + rounds * e * math.expm1(e)
