"""Partial sharing of model updates: a site sends only some coordinates (indices + values).

``setting.federated.share_fraction`` sets how many (k = ⌈fraction·d⌉, or at most that many
with SVT); two ways to choose them:

- ``dp_mode: svt`` (Li et al. 2019): the sparse vector technique with Laplace release,
  :mod:`privseg.dp.svt` (local DP per site update, the server need not be trusted);
- ``share_fraction`` < 1 without that DP (``share_rule``: ``topk`` = the largest |update|,
  ``random`` = a uniform random subset): a communication option, so that a study can separate
  the effect of sharing less from the effect of noise. In ``sample`` mode the selection is
  post-processing of the site's DP-SGD model.

The wire format is Flower ``Parameters`` with exactly two arrays: the selected flat indices
into the concatenated state-dict (ascending, ``uint32``) and the site's new values there (in
the model's float dtype): nothing dense leaves the site. The server (:class:`Densify`) rebuilds
each site's model with its unselected coordinates equal to the global model's, i.e. they count
as a *zero update*, and hands the dense results to the inner strategy (FedAvg's weighted mean
then divides by all sites' weights, the convention of Li et al.'s Clara/NVFlare filter).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.common import FitRes, ndarrays_to_parameters, parameters_to_ndarrays

from privseg.config import FederatedConfig, RunConfig
from privseg.dp.randomness import dp_seed
from privseg.dp.svt import SVTBudget, svt_budget, svt_select
from privseg.federated.site_dp import ForwardingStrategy


def is_sparse(fed: FederatedConfig) -> bool:
    """Whether sites send sparse messages (SVT, or partial sharing below fraction 1)."""
    return fed.dp_mode == "svt" or fed.share_fraction < 1


def n_selected(fraction: float, d: int) -> int:
    """Coordinates a site sends at ``fraction`` of d: ⌈fraction·d⌉, at least 1."""
    return max(1, min(d, math.ceil(fraction * d)))


def svt_epsilon_per_round(cfg: RunConfig) -> float:
    """Each site's ε per round: ``privacy.target_epsilon`` over ``rounds`` (basic composition:
    a site answers at most once per round)."""
    return cfg.privacy.target_epsilon / cfg.setting.federated.rounds


def round_budget(cfg: RunConfig, d: int) -> SVTBudget:
    """The SVT budget of one round for a model of d coordinates."""
    fed = cfg.setting.federated
    return svt_budget(svt_epsilon_per_round(cfg), n_selected(fed.share_fraction, d),
                      fed.svt_clip, fed.svt_release_share)


def value_dtype(dtypes: list[np.dtype]) -> np.dtype:
    """The dtype of the values array: the model's widest float dtype (float32 at least)."""
    return np.result_type(np.float32, *[t for t in dtypes if np.issubdtype(t, np.floating)])


def flatten(arrays: list[np.ndarray]) -> np.ndarray:
    """All arrays, flattened and concatenated, as float64."""
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


class SiteSparsifier:
    """A site's side: turns its new weights into the sparse message, drawing from its own
    stream (SVT: a secret DP stream, :func:`privseg.dp.randomness.dp_seed`)."""

    def __init__(self, cfg: RunConfig, site: str, site_seed: int):
        self.cfg = cfg
        self.fed = cfg.setting.federated
        stream = "svt" if self.fed.dp_mode == "svt" else "share-random"
        noise_seed = cfg.privacy.noise_seed if self.fed.dp_mode == "svt" else site_seed
        self.rng = np.random.default_rng(dp_seed(noise_seed, stream, cfg.seed, site))

    def message(self, current: list[np.ndarray], new: list[np.ndarray]
                ) -> tuple[list[np.ndarray], dict]:
        """[indices uint32, values] and scalar metrics (counts) for the server."""
        base, target = flatten(current), flatten(new)
        update = target - base
        d = update.size
        if self.fed.dp_mode == "svt":
            rel = svt_select(update, round_budget(self.cfg, d), self.fed.svt_threshold,
                             self.rng)
            idx, values = rel.indices, base[rel.indices] + rel.values
            metrics = {"svt_queries": rel.queries, "svt_selected": int(idx.size)}
        else:
            k = n_selected(self.fed.share_fraction, d)
            if self.fed.share_rule == "topk":
                idx = np.argpartition(-np.abs(update), k - 1)[:k]
            else:
                idx = self.rng.choice(d, size=k, replace=False)
            idx = np.sort(idx)
            values = target[idx]
            metrics = {"shared": int(k)}
        vdt = value_dtype([np.asarray(a).dtype for a in new])
        return [idx.astype(np.uint32), values.astype(vdt)], metrics


def densify(current: list[np.ndarray], sparse: list[np.ndarray]) -> list[np.ndarray]:
    """A site's dense model: the global model with the sent coordinates replaced."""
    idx, values = sparse
    flat = flatten(current)
    flat[idx.astype(np.int64)] = values.astype(np.float64)
    out, start = [], 0
    for a in current:
        part = flat[start:start + a.size].reshape(a.shape)
        start += a.size
        if np.issubdtype(a.dtype, np.integer):
            part = np.rint(part)
        out.append(part.astype(a.dtype))
    return out


def check_sparse(arrays: list[np.ndarray], d: int, limit: int, exact: bool,
                 dtypes: list[np.dtype]) -> list[str]:
    """Wire audit of a sparse message, by content: two 1-D arrays, ascending unique indices in
    [0, d), as many values, at most (``exact``: exactly) ``limit`` of them. Returns faults."""
    if len(arrays) != 2:
        return [f"sparse message has {len(arrays)} arrays, not 2 (indices, values)"]
    idx, values = arrays
    faults = []
    if idx.ndim != 1 or values.ndim != 1 or idx.size != values.size:
        faults.append("sparse message: indices and values are not 1-D arrays of one length")
    if idx.dtype != np.uint32:
        faults.append(f"sparse message: indices are {idx.dtype}, not uint32")
    if values.dtype != value_dtype(dtypes):
        faults.append(f"sparse message: values are {values.dtype}, not {value_dtype(dtypes)}")
    if idx.size and (int(idx.max()) >= d or np.any(np.diff(idx.astype(np.int64)) <= 0)):
        faults.append("sparse message: indices not ascending, unique and below d")
    if idx.size > limit or (exact and idx.size != limit):
        faults.append(f"sparse message: {idx.size} coordinates sent, allowed "
                      f"{'exactly ' if exact else 'at most '}{limit} of {d}")
    return faults


class Densify(ForwardingStrategy):
    """Rebuild each site's dense model from its sparse message (unsent coordinates: zero
    update), then hand the results to the inner strategy."""

    def __init__(self, strategy):
        super().__init__(strategy)
        self.current: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        self.current = parameters_to_ndarrays(parameters)
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        dense = [(c, FitRes(r.status, ndarrays_to_parameters(
            densify(self.current, parameters_to_ndarrays(r.parameters))), r.num_examples,
            r.metrics)) for c, r in results]
        return self.strategy.aggregate_fit(server_round, dense, failures)
