"""The server's side: Flower strategies (FedAvg / FedProx / FedAdam), DP-FedAvg, the round loop.

One :func:`make_server` builds what both the simulation and the deployed server run: Flower's
own ``Server`` (its round loop: configure_fit -> clients' fit -> aggregate_fit -> configure /
aggregate evaluate), with

- :class:`SiteClientManager`: Flower's ``SimpleClientManager`` that samples sites in the order
  of their names with a seeded RNG (Flower's samples by random connection ids, which would make
  a deployment choose differently from a simulation);
- the inner strategy, Flower's ``FedAvg``, ``FedProx`` or ``FedAdam``; in ``site`` DP mode
  wrapped in Flower's ``DifferentialPrivacyServerSideFixedClipping`` over equal site weights
  (with ``secure_aggregation``: ``DifferentialPrivacyClientSideFixedClipping``, the sites clip
  and the server only ever sees the SecAgg+ sum; see :mod:`privseg.federated.secagg`);
- :class:`RecordingStrategy` outermost: it builds the initial model (server-side, from the
  seed, once the sites have said their channel and class counts), orders the sites' results
  by site name before aggregation (float sums do not depend on arrival order), counts the
  bytes of parameters sent and received, checks what crossed the wire, and keeps the metrics
  for the run record.

After the rounds, :class:`FederatedServer` asks every site to evaluate the final global model
on its held-out test subjects. No data reaches the server: it sees parameters, counts and the
sites' aggregate scalar metrics only.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from logging import INFO

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    EvaluateIns,
    FitRes,
    GetPropertiesIns,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import MessageTypeLegacy
from flwr.compat.common import recorddict_compat as compat
from flwr.server import Server, SimpleClientManager
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from privseg.architectures import build, get_entry
from privseg.config import RunConfig
from privseg.dp.accounting import delta_warning
from privseg.dp.randomness import noise_note
from privseg.dp.svt import FORMULA, advanced_composition, basic_composition
from privseg.federated.site_dp import (
    PoissonSiteDP,
    PoissonSiteSampler,
    UniformWeights,
    seed_server_noise,
    site_sampler,
)
from privseg.federated.site_plans import (
    sample_epsilon_bound,
    site_level_epsilon,
    site_level_plan,
    sites_per_round,
)
from privseg.federated.sparse import (
    Densify,
    check_sparse,
    is_sparse,
    n_selected,
    round_budget,
)
from privseg.record import environment
from privseg.training.setup import model_knobs

try:  # flwr's logger
    from flwr.common.logger import log as flwr_log
except ImportError:  # pragma: no cover
    flwr_log = None


#: what a sample-level DP run discloses outside its guarantee (the record says so)
SAMPLE_NOT_COVERED = [
    "each site's exact number of training subjects (FedAvg weight, num_examples) and its split "
    "counts, sent to the server and in the record",
    "each site's local wall time per round (it tracks the site's Poisson batch sizes), sent "
    "to the server",
    "per-round validation and final test metrics of every site's held-out subjects "
    "(un-noised aggregates, of one subject where a site holds one) under models the server "
    "chooses, at most one validation per round and one test per run, sent to the server and "
    "in the record",
]
#: what a site-level DP run discloses outside its guarantee (the record says so)
SITE_NOT_COVERED = [
    "which sites took part in each round, which ε assumes the server keeps secret: "
    "history[].sites and fit_s, federated.bytes_per_round (bytes up and sites per round) and "
    "federated.wire_bytes (per site): do not publish these parts of the record",
    "every site's wall time and held-out metrics per round (un-noised), sent to the server",
    "the sites' numbers of training subjects, sent to the server",
    "the roster of sites (dataset.sites): the guarantee is for one enrolled site's data, "
    "present or not, in a federation of N sites fixed beforehand",
]


#: why a site-level DP run's accounting survives a site that was drawn but did not answer
SITE_DROPOUT_NOTE = (
    "a site drawn in a round that did not answer (history[].missed) is an update left out of "
    "the sum, which is still divided by the fixed q·N and noised: the accounting holds only "
    "because whether a site drops depends on nothing but that site itself (its own machine, "
    "link or data), never on another site's data; a dropout that depended on other sites' "
    "data is not covered; history[].missed names drawn sites, revealing the coins as "
    "history[].sites does: do not publish it")
#: what a sample-level DP record cannot know about a site that failed mid-round
SAMPLE_DROPOUT_NOTE = (
    "a site that missed a round it was sent (history[].missed) may have taken that round's DP "
    "steps without its reply arriving: its ε here counts every step of every round it was "
    "sent (steps_bound_per_site; its last report is epsilon_reported_per_site), and a site "
    "that never answered is bounded by its calibration (target ε); its own ledger "
    "(privseg.dp.ledger, charged with the planned spend before training) holds the same bound")


#: the metric names a site's fit and evaluate replies may carry (besides per-class keys)
SITE_METRIC_KEYS = frozenset({
    "site", "steps", "fit_s", "train_loss", "shared", "svt_queries", "svt_selected",
    "epsilon", "delta", "noise_multiplier", "sample_rate", "planned_steps", "accountant",
    "split", "eval_s", "n_subjects", "mean_dice", "mean_hd95"})


def failure_reason(failure) -> tuple[str | None, str]:
    """(cid or None, why) of one of Flower's fit/evaluate failures: an exception (the site is
    not named) or a ``(ClientProxy, result)`` whose status is not OK."""
    if isinstance(failure, BaseException):
        return None, f"{type(failure).__name__}: {failure}"
    proxy, res = failure
    return str(proxy.cid), f"status {res.status.code.name}: {res.status.message}"


def missed_sites(asked: list[str], answered: set[str], failures: list,
                 site_of: dict[str, str]) -> list[dict]:
    """The sites asked but not answering, each with why (Flower's failure, where it names
    the site or is the only one; else every unnamed failure, or no reply at all)."""
    named, unnamed = {}, []
    for f in failures:
        cid, why = failure_reason(f)
        if cid is not None:
            named[site_of.get(cid, cid)] = why
        else:
            unnamed.append(why)
    missed = [s for s in asked if s not in answered]
    rest = [s for s in missed if s not in named]
    out = []
    for s in missed:
        if s in named:
            why = named[s]
        elif unnamed:
            why = unnamed[0] if len(rest) == len(unnamed) == 1 else "; ".join(unnamed)
        else:
            why = "no reply within the round"
        out.append({"site": s, "reason": why})
    return out


#: why a site's update was left out of a round's aggregate for holding NaN or infinity
NONFINITE_UPDATE = "its update held non-finite values (NaN or infinity): left out of the round"


def finite_results(results: list) -> tuple[list, set[str]]:
    """The round's fit results whose parameters are all finite, and the sites of the others.

    A non-finite update has no norm, so site-level DP cannot clip it (``min(1, C / nan)`` is 1:
    its finite coordinates would enter the sum unclipped) and it would poison every mean; it
    is left out as a failed site is, which the accounting of a missing site already covers."""
    kept, left_out = [], set()
    for proxy, res in results:
        if all(np.isfinite(a).all() for a in parameters_to_ndarrays(res.parameters)
               if a.dtype.kind in "fc"):
            kept.append((proxy, res))
        else:
            left_out.add(str(res.metrics.get("site")))
    return kept, left_out


_STOPPED = "privseg_stopped_server"


@contextmanager
def fails_as_run(server: FederatedServer) -> Iterator[None]:
    """Mark any error of the rounds with ``server`` (what the run had done and spent) and
    let it pass unchanged, so that the caller can write the failed run's record
    (:func:`stopped_server`, :func:`failed_run_record`)."""
    try:
        yield
    except Exception as e:
        if getattr(e, _STOPPED, None) is None:
            setattr(e, _STOPPED, server)
        raise


def stopped_server(error: BaseException) -> FederatedServer | None:
    """The server of the federated run that ``error`` stopped (see :func:`fails_as_run`)."""
    return getattr(error, _STOPPED, None)


def payload_bytes(parameters: Parameters) -> int:
    """Bytes of a Flower ``Parameters`` payload (the serialised arrays)."""
    return sum(len(t) for t in parameters.tensors)


#: seconds a round waits for an enrolled site that is not connected (a SuperNode killed,
#: unregistered after Flower's heartbeat expired) before going on without it, where
#: ``min_fit_sites`` allows; without a minimum it waits for all sites (Flower's one day)
ABSENT_SITE_WAIT_S = 120.0


class SiteClientManager(SimpleClientManager):
    """Flower's client manager, sampling by site name with its own seeded RNG.

    Sites are drawn among all enrolled sites (every site seen so far), connected or not, so
    that a site gone missing changes neither the draw nor the others' coins; a drawn site not
    connected is left out of the round and listed in :attr:`absent` (the record names it).
    """

    def __init__(self, n_sites: int, seed: int, poisson: PoissonSiteSampler | None = None,
                 min_sites: int | None = None, absent_wait_s: float = ABSENT_SITE_WAIT_S):
        super().__init__()
        self.n_sites = n_sites
        self.rng = random.Random(seed)
        #: site-level DP: each site drawn independently (secret coins) instead of m of N
        self.poisson = poisson
        self.site_of: dict[str, str] = {}
        self.props: dict[str, dict] = {}
        self.min_sites = min_sites
        self.absent_wait_s = absent_wait_s
        #: sites drawn in the last sample that were not connected
        self.absent: list[str] = []

    def site_name(self, cid: str) -> str:
        if cid not in self.site_of:
            res = self.clients[cid].get_properties(GetPropertiesIns({}), timeout=None,
                                                   group_id=0)
            self.props[cid] = dict(res.properties)
            self.site_of[cid] = str(res.properties["site"])
        return self.site_of[cid]

    def num_available(self) -> int:
        """Enrolled sites, connected or not (at least those connected): Flower's strategies
        size a round's sample from it, so a site gone missing leaves the draw unchanged."""
        return max(super().num_available(), len(set(self.site_of.values())))

    def sites(self) -> dict[str, str]:
        """site name -> cid of every connected site (waits for all of them; once all were
        seen, with ``min_sites``, for :attr:`absent_wait_s` and at least ``min_sites``)."""
        self.num_available()  # a Grid-backed manager (SecAgg+ workflow) registers nodes here
        enrolled = len(set(self.site_of.values())) >= self.n_sites
        if not (self.min_sites and enrolled and self.wait_for(self.n_sites,
                                                               self.absent_wait_s)):
            self.wait_for(self.min_sites if self.min_sites and enrolled else self.n_sites)
        by_site = {self.site_name(cid): cid for cid in list(self.clients)}
        if len(by_site) != len(self.clients):
            raise RuntimeError(f"two connected clients claim the same site: {self.site_of}")
        return dict(sorted(by_site.items()))

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        by_site = self.sites()
        names = sorted(set(self.site_of.values()) | set(by_site))  # every enrolled site
        if self.poisson is not None:
            chosen = self.poisson.draw(names)
        else:
            chosen = names if num_clients >= len(names) else sorted(
                self.rng.sample(names, num_clients))
        self.absent = [n for n in chosen if n not in by_site]
        return [self.clients[by_site[n]] for n in chosen if n in by_site]


def initial_model_weights(cfg: RunConfig, in_channels: int, num_classes: int,
                          roi: tuple[int, ...] | None = None) -> list:
    """The global model's initial weights: built on the server from the run seed, for the
    sites' crop size ``roi`` where the model's input size is fixed (UNETR)."""
    knobs = model_knobs(cfg, roi) if roi is not None else dict(cfg.model.options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build(cfg.model.name, cfg.dataset.dims, in_channels, num_classes, **knobs)
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def inner_strategy(cfg: RunConfig, n_sites: int, initial: Parameters) -> Strategy:
    """Flower's FedAvg / FedProx / FedAdam, configured from the run config."""
    fed = cfg.setting.federated
    common = dict(
        fraction_fit=fed.fraction_fit, min_fit_clients=1, min_available_clients=n_sites,
        fraction_evaluate=1.0, min_evaluate_clients=n_sites, initial_parameters=initial,
        on_evaluate_config_fn=lambda rnd: {"split": "val", "round": rnd},
        on_fit_config_fn=lambda rnd: {"round": rnd},
        fit_metrics_aggregation_fn=lambda m: {}, evaluate_metrics_aggregation_fn=lambda m: {},
    )
    if fed.strategy == "fedavg":
        return FedAvg(**common)
    if fed.strategy == "fedprox":
        return FedProx(proximal_mu=fed.proximal_mu, **common)
    return FedAdam(eta=fed.server_lr, eta_l=cfg.training.lr, tau=fed.server_tau, **common)


class RecordingStrategy(Strategy):
    """Outermost strategy: initial model, site order, byte counts, wire audit, metrics."""

    def __init__(self, cfg: RunConfig, n_sites: int):
        super().__init__()
        self.cfg = cfg
        self.fed = cfg.setting.federated
        self.n_sites = n_sites
        self.strategy: Strategy | None = None
        self.dp_site: dict | None = None
        self.properties: dict[str, dict] = {}
        self.rounds: list[dict] = []
        self.audit = {"fit_results": 0, "evaluate_results": 0, "violations": [],
                      "fitres_fields": None, "metric_types": set()}
        self.param_shapes: list[tuple] | None = None
        self.param_dtypes: list[np.dtype] | None = None
        #: the SecAgg+ parameters (set by privseg.federated.secagg) when secure_aggregation
        self.secagg: dict | None = None
        self.site_fit_metrics: dict[str, dict] = {}
        self.site_train_subjects: dict[str, int] = {}
        #: cid -> site name (the client manager's), to name the sites of failures
        self.site_of: dict[str, str] = {}
        self.final_test: dict[str, dict] = {}
        self.compute_s = 0.0
        #: called whenever a round's instructions went out or its replies are in (a deployed
        #: ServerApp keeps its progress record with it: privseg.federated.progress)
        self.on_progress: Callable[[], None] | None = None

    def min_sites(self, asked: int) -> int:
        """Least answers a round of ``asked`` sites needs (``min_fit_sites``, default all)."""
        return min(self.fed.min_fit_sites or asked, asked)

    def rounds_released(self) -> int:
        """Rounds whose aggregate (and, in site-level DP, noise) was released."""
        return sum(1 for r in self.rounds if "fit_s" in r)

    # -- setup ----------------------------------------------------------------------------
    def initialize_parameters(self, client_manager: SiteClientManager):
        by_site = client_manager.sites()
        props = {s: client_manager.props[cid] for s, cid in by_site.items()}
        keys = ("in_channels", "num_classes", "class_names", "dims")
        if len({tuple(p[k] for k in keys) for p in props.values()}) != 1:
            raise RuntimeError(f"sites disagree on channels/classes/dims: {props}")
        self.properties = props
        self.site_of = client_manager.site_of  # connection -> site, for the sender check
        first = next(iter(props.values()))
        crops = {str(p.get("crop")) for p in props.values()}
        if "img_size" in get_entry(self.cfg.model.name).knobs() and len(crops) != 1:
            raise RuntimeError(f"{self.cfg.model.name} is built for one input size, but the "
                               f"sites' crops differ ({sorted(crops)}): set dataset.patch_size")
        roi = tuple(int(v) for v in str(first["crop"]).split("x")) if "crop" in first else None
        weights = initial_model_weights(self.cfg, int(first["in_channels"]),
                                        int(first["num_classes"]), roi)
        self.param_shapes = [tuple(w.shape) for w in weights]
        self.param_dtypes = [w.dtype for w in weights]
        initial = ndarrays_to_parameters(weights)
        strategy = inner_strategy(self.cfg, self.n_sites, initial)
        if self.fed.dp_mode == "site":
            d = self.dp_site = site_level_plan(self.cfg, self.n_sites, self.model_size())
            if self.fed.secure_aggregation:
                # The server never holds a single update: the sites clip (fixedclipping_mod)
                # and Flower's wrapper adds N(0, (σC/N)²) to the unmasked mean of all N sites
                # (secure aggregation runs with every site in every round: q = 1).
                strategy = DifferentialPrivacyClientSideFixedClipping(
                    UniformWeights(strategy), d["noise_multiplier"], d["clipping_norm"],
                    self.n_sites)
            else:
                strategy = PoissonSiteDP(strategy, d["noise_multiplier"], d["clipping_norm"],
                                         d["denominator"])
        if is_sparse(self.fed):  # sites send indices + values: rebuild dense models first
            strategy = Densify(strategy)
        self.strategy = strategy
        return initial

    # -- rounds ---------------------------------------------------------------------------
    def _round(self, server_round: int) -> dict:
        while len(self.rounds) < server_round:
            self.rounds.append({"round": len(self.rounds) + 1, "bytes_down": 0, "bytes_up": 0,
                                "eval_bytes_down": 0, "sites": []})
        return self.rounds[server_round - 1]

    def configure_fit(self, server_round, parameters, client_manager):
        ins = self.strategy.configure_fit(server_round, parameters, client_manager)
        row = self._round(server_round)
        row["t_start"] = time.perf_counter()
        row["started_at"] = time.time()  # wall clock: the testbed's link counters use it
        self.site_of = getattr(client_manager, "site_of", {})
        absent = list(getattr(client_manager, "absent", []))
        row["asked"] = sorted([self.site_of.get(p.cid, p.cid) for p, _ in ins] + absent)
        row["absent"] = absent
        if not self.fed.secure_aggregation:  # SecAgg+: the grid counts all four stages
            row["bytes_down"] += sum(payload_bytes(fi.parameters) for _, fi in ins)
        self._progress()
        return ins

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress()

    def _check_fitres(self, res: FitRes) -> None:
        self.audit["fit_results"] += 1
        fields = sorted(vars(res))
        self.audit["fitres_fields"] = fields
        if fields != ["metrics", "num_examples", "parameters", "status"]:
            self.audit["violations"].append(f"FitRes fields {fields}")
        if is_sparse(self.fed):
            self._check_sparse(res)
        else:
            self._check_dense(res)
        if not isinstance(res.num_examples, int):
            self.audit["violations"].append("num_examples is not an int")
        self._check_metrics(res.metrics)

    def _genuine(self, results: list) -> tuple[list, dict[str, str]]:
        """The replies that name the site of the connection they came on, and for each other
        one its connection's site with why it is left out. A site cannot speak for another:
        its ε, subjects and metrics would be recorded under the other's name (and its update
        aggregated while the site it names counted missed). A reply naming no site is left
        out too (its metrics could not be filed)."""
        kept, left_out = [], {}
        for proxy, res in results:
            expected = self.site_of.get(str(getattr(proxy, "cid", "")))
            named = res.metrics.get("site")
            if named is None or (expected is not None and named != expected):
                where = expected or str(getattr(proxy, "cid", "?"))
                self.audit["violations"].append(
                    f"a reply on {where}'s connection names site {named!r}")
                left_out[where] = f"its reply named site {named!r}: left out"
            else:
                kept.append((proxy, res))
        return kept, left_out

    def model_size(self) -> int:
        """d: the number of coordinates of the model's state (all its arrays)."""
        return int(sum(np.prod(s, dtype=np.int64) for s in self.param_shapes))

    def _check_sparse(self, res: FitRes) -> None:
        """A sparse message holds indices and at most c (SVT) or exactly k values: no dense
        array (checked by content, :func:`privseg.federated.sparse.check_sparse`)."""
        d = self.model_size()
        svt = self.fed.dp_mode == "svt"
        limit = n_selected(self.fed.share_fraction, d)
        try:
            arrays = parameters_to_ndarrays(res.parameters)
        except Exception as e:  # noqa: BLE001
            self.audit["violations"].append(f"parameters not decodable: {e}")
            return
        self.audit["violations"].extend(
            check_sparse(arrays, d, limit, exact=not svt, dtypes=self.param_dtypes))

    def _check_dense(self, res: FitRes) -> None:
        shapes = None
        try:
            shapes = [tuple(a.shape) for a in parameters_to_ndarrays(res.parameters)]
        except Exception as e:  # noqa: BLE001
            self.audit["violations"].append(f"parameters not decodable: {e}")
        if shapes != self.param_shapes:
            self.audit["violations"].append("parameters are not the model's arrays")
        elif (not self.fed.secure_aggregation  # SecAgg+'s unmasked sum is dequantised
              and [a.dtype for a in parameters_to_ndarrays(res.parameters)] != self.param_dtypes):
            self.audit["violations"].append("parameters are not of the model's dtypes")

    def _metric_keys(self) -> set[str]:
        """Every metric name a site may send: :data:`SITE_METRIC_KEYS` and the per-class
        (and per-region) evaluation keys of the classes the sites declared. A name outside
        this set is reported: a key is a string the site chooses, so it could carry data."""
        names = set()
        for props in self.properties.values():
            for field in ("class_names", "regions"):
                names.update(c for c in str(props.get(field, "")).split(",") if c)
        per_class = {f"{m}{part}/{c}" for m in ("dice", "hd95") for part in ("", "_sum", "_n")
                     for c in names}
        return SITE_METRIC_KEYS | per_class

    def _check_metrics(self, metrics: dict) -> None:
        """Content, not only types: known names (:meth:`_metric_keys`), numbers, plus strings
        the server already knows (the site's own name, the split it asked for, the config's
        accountant). Any other name or string could carry data."""
        known = {"site": set(self.properties), "split": {"val", "test"},
                 "accountant": {"prv", "rdp"}}
        allowed = self._metric_keys()
        for k, v in metrics.items():
            self.audit["metric_types"].add(type(v).__name__)
            if k not in allowed:
                self.audit["violations"].append(f"metric name {str(k)[:40]!r} is not one a "
                                                "site sends")
            if isinstance(v, str):
                if v not in known.get(k, ()):
                    self.audit["violations"].append(f"metric {k} is a string the server did "
                                                    "not send")
            elif not isinstance(v, (bool, int, float)):
                self.audit["violations"].append(f"metric {k} is a {type(v).__name__}")

    def aggregate_fit(self, server_round, results, failures):
        """Aggregate the sites that answered; a round with fewer than ``min_fit_sites``
        answers stops the run (after noting what the answering sites reported)."""
        row = self._round(server_round)
        asked = row.get("asked", [])
        results, impostors = self._genuine(results)
        nonfinite: set[str] = set()
        if not self.fed.secure_aggregation:  # SecAgg+ refuses non-finite inputs at the site
            results, nonfinite = finite_results(results)
        answered = {str(r.metrics.get("site")) for _, r in results}
        missed = missed_sites(asked, answered, failures, self.site_of)
        for m in missed:
            if m["site"] in row.get("absent", ()):
                m["reason"] = "not connected when the round began"
            elif m["site"] in impostors:
                m["reason"] = impostors[m["site"]]
            elif m["site"] in nonfinite:
                m["reason"] = NONFINITE_UPDATE
        if missed:
            row["missed"] = missed
        if self.dp_site is not None and self.fed.secure_aggregation and (
                len(results) != self.n_sites):
            # Flower's SecAgg+ workflow drops a silent site without a failure; the noise
            # σC/N assumes all N sites in the mean, so fewer would be under-noised.
            raise RuntimeError(f"round {server_round}: only {len(results)} of {self.n_sites} "
                               "sites' masked updates were aggregated; site-level DP with "
                               "secure aggregation adds noise for all of them: stopping")
        if len(results) < self.min_sites(len(asked)) or (failures and not asked):
            for _, res in results:  # their steps are spent: their ε goes in the record
                self.site_fit_metrics[str(res.metrics["site"])] = dict(res.metrics)
            raise RuntimeError(
                f"round {server_round}: {len(results)} of {len(asked)} site(s) answered, "
                f"fewer than setting.federated.min_fit_sites="
                f"{self.min_sites(len(asked))}; missed: {missed}")
        results = sorted(results, key=lambda cr: str(cr[1].metrics.get("site")))
        for _, res in results:
            self._check_fitres(res)
            if not self.fed.secure_aggregation:  # SecAgg+: every result holds the sum
                row["bytes_up"] += payload_bytes(res.parameters)
            site = str(res.metrics["site"])
            row["sites"].append(site)
            self.site_fit_metrics[site] = dict(res.metrics)
            self.site_train_subjects[site] = int(res.num_examples)
            self.compute_s += float(res.metrics.get("fit_s", 0.0))
        row["site_metrics"] = {str(r.metrics["site"]): {k: v for k, v in r.metrics.items()
                                                        if k != "site"} for _, r in results}
        losses = [(r.metrics["train_loss"], r.num_examples) for _, r in results
                  if "train_loss" in r.metrics and math.isfinite(r.metrics["train_loss"])]
        if losses:
            row["train_loss"] = sum(v * n for v, n in losses) / sum(n for _, n in losses)
        # the failures are noted above; Flower's DP wrappers would refuse the whole round
        params, _ = self.strategy.aggregate_fit(server_round, results, [])
        if params is not None and self.fed.secure_aggregation:
            # SecAgg+ dequantises to float64: back to the model's dtypes (payload, equality)
            params = ndarrays_to_parameters([
                a.astype(dt, copy=False) for a, dt in
                zip(parameters_to_ndarrays(params), self.param_dtypes, strict=True)])
        row["fit_s"] = time.perf_counter() - row.pop("t_start")
        row["ended_at"] = time.time()
        self._progress()
        return params, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        every = self.fed.eval_every
        if not every or (server_round % every and server_round != self.fed.rounds):
            return []
        ins = self.strategy.configure_evaluate(server_round, parameters, client_manager)
        self._round(server_round)["eval_bytes_down"] += sum(payload_bytes(e.parameters)
                                                            for _, e in ins)
        return ins

    def aggregate_evaluate(self, server_round, results, failures):
        row = self._round(server_round)
        if failures:
            asked = sorted(self.site_of.values()) or [str(i) for i in range(self.n_sites)]
            answered = {str(r.metrics.get("site")) for _, r in results}
            row["missed_eval"] = missed_sites(asked, answered, failures, self.site_of)
            if len(results) < self.min_sites(self.n_sites):
                raise RuntimeError(f"round {server_round}: evaluation answered by "
                                   f"{len(results)} of {self.n_sites} site(s), fewer than "
                                   f"setting.federated.min_fit_sites: {row['missed_eval']}")
        per_site = self._collect_eval(results)
        # a site without validation subjects answers n_subjects 0 and no Dice
        row["val_mean_dice"] = pooled(per_site, ["dice"]).get("mean_dice", math.nan)
        row["val_per_site"] = {s: m["mean_dice"] for s, m in per_site.items()
                               if "mean_dice" in m}
        # all the sites' validation subjects, or a subset before the last round (val_subjects)
        row["val_n_subjects"] = sum(int(m.get("n_subjects", 0)) for m in per_site.values())
        row["ended_at"] = time.time()
        self._progress()
        return None, {}

    def _collect_eval(self, results) -> dict[str, dict]:
        per_site = {}
        results, _ = self._genuine(results)  # the wire audit names any left out
        for _, res in sorted(results, key=lambda cr: str(cr[1].metrics.get("site"))):
            self.audit["evaluate_results"] += 1
            self._check_metrics(res.metrics)
            self.compute_s += float(res.metrics.get("eval_s", 0.0))
            per_site[str(res.metrics["site"])] = dict(res.metrics)
        return per_site

    def evaluate(self, server_round, parameters):
        return None  # no data on the server: evaluation happens at the sites

    # -- results --------------------------------------------------------------------------
    def sample_epsilon_bounds(self) -> tuple[dict[str, float], dict[str, int | None]]:
        """Per site, (ε, steps) at most spent in sample mode: every step of every round the
        site was sent, answered or not (:func:`~privseg.federated.site_plans.sample_epsilon_bound`);
        equal to the sites' own reports when every site answered every round it was sent."""
        sent: dict[str, int] = {}
        for r in self.rounds:
            for s in r.get("asked", []):
                if s not in r.get("absent", []):  # an absent site was sent nothing
                    sent[s] = sent.get(s, 0) + 1
        eps, steps = {}, {}
        for s in sorted(set(sent) | set(self.site_fit_metrics)):
            eps[s], steps[s] = sample_epsilon_bound(
                self.site_fit_metrics.get(s), sent.get(s, 0), self.fed.rounds,
                self.cfg.privacy.target_epsilon)
        return eps, steps

    def privacy(self) -> dict:
        """The privacy block of the run record, with the guarantee in words."""
        mode = self.fed.dp_mode
        noise = noise_note(self.cfg.privacy.noise_seed)
        dropped = any(r.get("missed") for r in self.rounds)
        if mode == "none":
            return {"enabled": False, "mode": "none", "epsilon": math.inf, "unit": "subject",
                    "guarantee": "none (non-private federated training; only model parameters "
                                 "and aggregate metrics leave the sites)"}
        if mode == "svt":
            return self._svt_privacy(noise)
        if mode == "sample":
            m = self.site_fit_metrics
            reported = {s: float(v["epsilon"]) for s, v in m.items()}
            eps, steps_bound = self.sample_epsilon_bounds()
            worst = max(eps.values()) if eps else math.inf
            replay = ("" if self.cfg.privacy.noise_seed is None else
                      " NOT against whoever holds the config: its noise_seed replays the noise.")
            return {
                "enabled": True, "mode": "sample", "unit": "subject",
                "epsilon": worst, "epsilon_per_site": eps,
                **({"epsilon_reported_per_site": reported,
                    "steps_bound_per_site": steps_bound} if reported != eps else {}),
                "delta_per_site": {s: v["delta"] for s, v in m.items()},
                "noise_multiplier_per_site": {s: v["noise_multiplier"] for s, v in m.items()},
                "sample_rate_per_site": {s: v["sample_rate"] for s, v in m.items()},
                "steps_per_site": {s: v["steps"] for s, v in m.items()},
                "planned_steps_per_site": {s: v["planned_steps"] for s, v in m.items()},
                "target_epsilon": self.cfg.privacy.target_epsilon,
                "accountant": self.cfg.privacy.accountant,
                "max_grad_norm": self.cfg.privacy.max_grad_norm,
                "crops_per_subject": self.cfg.training.crops_per_subject,
                "delta_warning_per_site": {
                    s: w for s, v in m.items()
                    if (w := delta_warning(v["delta"], self.site_train_subjects.get(s, 1)))},
                "sampling": "Poisson sampling of each site's subjects (secret coins at the site)",
                "neighbouring": "add or remove one subject of a site",
                "noise": noise,
                "guarantee": (
                    f"sample-level: each site's training is ({worst:.4g}, δ_site)-DP or better "
                    "per subject of that site (DP-SGD inside the site, Poisson sampling of its "
                    "subjects, its accountant composing all its local steps over all rounds; "
                    "max over sites reported). Holds against the server and other sites for "
                    f"the model updates; {noise}.{replay}"),
                "not_covered": SAMPLE_NOT_COVERED + ([SAMPLE_DROPOUT_NOTE] if dropped else []),
            }
        d = self.dp_site
        if d is None:  # stopped before the first round: nothing released
            return {"enabled": True, "mode": "site", "rounds_done": 0, "epsilon": 0.0,
                    "noise": noise, "guarantee": "site-level: no model was released"}
        rounds_done = self.rounds_released()
        eps = site_level_epsilon(d["noise_multiplier_effective"], d["sample_rate"], rounds_done,
                                 d["delta"], d["accountant"])
        common = {"enabled": True, "mode": "site", **d, "rounds_done": rounds_done,
                  "epsilon": eps, "noise": noise,
                  "not_covered": SITE_NOT_COVERED + ([SITE_DROPOUT_NOTE] if dropped else [])}
        if self.fed.secure_aggregation:
            return {**common, "secure_aggregation": True, "secagg": dict(self.secagg or {}),
                    "guarantee": self._secagg_guarantee(eps)}
        return {
            **common, "secure_aggregation": False,
            "guarantee": (
                f"site-level: ({eps:.4g}, {d['delta']:.3g})-DP with respect to one whole "
                f"site's data being present or absent among the {d['n_sites']} enrolled sites "
                "(DP-FedAvg, McMahan et al. 2018): "
                f"{d['sampling']}; each taking part site's update clipped to L2 norm "
                f"{d['clipping_norm']:g}; Gaussian noise σ·C (σ = {d['noise_multiplier']:.4g}) "
                f"added by the server to their sum, divided by the fixed q·N = "
                f"{d['denominator']:g}; accounted as {rounds_done} Poisson-subsampled Gaussian "
                f"steps at q = {d['sample_rate']:g} ({d['accountant']}); {noise}. The server is "
                "trusted with raw updates and with the coins; the guarantee covers the "
                "released global models against everyone else."
                + (f" Dropouts: {SITE_DROPOUT_NOTE}." if dropped else "")),
        }

    def _svt_privacy(self, noise: str) -> dict:
        """The privacy block of an SVT run (Li et al. 2019; Lyu, Su & Li 2017 Alg. 1)."""
        d = self.model_size()
        budget = round_budget(self.cfg, d)
        rounds_done = len(self.rounds)
        delta = self.cfg.privacy.delta or 1e-5
        basic = basic_composition(budget.epsilon, rounds_done)
        advanced = advanced_composition(budget.epsilon, rounds_done, delta)
        queries = {r["round"]: {s: m.get("svt_queries") for s, m in r.get("site_metrics",
                                                                        {}).items()}
                   for r in self.rounds}
        return {
            "enabled": True, "mode": "svt", "unit": "one site's whole update (local DP)",
            "neighbouring": "replace one site's whole update by any other (each coordinate "
                            f"clipped to [-{budget.gamma:g}, {budget.gamma:g}])",
            "epsilon": basic, "delta": 0.0,
            "epsilon_advanced": advanced, "delta_advanced": delta,
            "composition": "basic" if basic <= advanced else "advanced is tighter",
            "rounds_done": rounds_done, "d": d, "threshold": self.fed.svt_threshold,
            "fraction": self.fed.share_fraction, "release_share": self.fed.svt_release_share,
            **budget.as_dict(), "epsilon_per_round_source": "privacy.target_epsilon / rounds",
            "queries_per_round_per_site": queries, "formula": FORMULA, "noise": noise,
            "guarantee": (
                f"local DP per site: each site's sequence of sparse messages is "
                f"({basic:.4g}, 0)-DP (basic composition of {rounds_done} rounds of ε = "
                f"{budget.epsilon:.4g}; advanced composition gives ({advanced:.4g}, "
                f"{delta:.3g})) with respect to replacing that site's whole update; the server "
                "and other sites need not be trusted. SVT (Lyu, Su & Li 2017, Alg. 1) selects "
                f"≤ {budget.c} of {d} coordinates; the selected clipped values are released "
                f"with Laplace noise of scale {budget.release_scale:.4g}; {noise}."),
            "not_covered": SITE_NOT_COVERED[1:3] + [
                "the updates' relation to the site's subjects: the unit is the whole update, "
                "so one subject's influence is bounded only through it"],
        }

    def _secagg_guarantee(self, eps: float) -> str:
        """The site-level guarantee in words when the sites clip and SecAgg+ hides updates."""
        d, sa = self.dp_site, self.secagg or {}
        step = 2 * sa.get("clipping_range", math.nan) / sa.get("quantization_range", math.nan)
        return (
            f"site-level: ({eps:.4g}, {d['delta']:.3g})-DP with respect to one whole site's "
            f"data being present or absent among the {d['n_sites']} enrolled sites (DP-FedAvg, "
            "McMahan et al. 2018), with secure aggregation: "
            f"each site clips its own update to L2 norm {d['clipping_norm']:g} (Flower "
            "fixedclipping_mod) and sends it masked under SecAgg+ (secaggplus_mod; "
            f"{sa.get('reconstruction_threshold')} of {sa.get('num_shares')} shares unmask), so "
            f"the server learns only the equal-weight sum of all {d['n_sites']} sites (every "
            "site in every round: no amplification), to which it adds Gaussian noise σ·C/N "
            f"(σ = {d['noise_multiplier']:.4g}; Flower DifferentialPrivacyClientSideFixedClipping; "
            f"{noise_note(self.cfg.privacy.noise_seed)}). Trust: the server is trusted to add "
            "the noise, not with single updates; masking holds against an honest-but-curious "
            "server colluding with fewer than the threshold of sites. SecAgg+ quantises model "
            f"values in ±{sa.get('clipping_range')} with stochastic rounding (step {step:.3g}), "
            f"which moves a site's message by at most √d·step = "
            f"{d['secagg_rounding_bound']:.3g} (d = {d['model_size']}): accounted as sensitivity "
            f"C + √d·step = {d['sensitivity']:.6g}, effective σ = "
            f"{d['noise_multiplier_effective']:.4g}. The guarantee covers the released global "
            "models.")

    def bytes_per_round(self) -> list[dict]:
        return [{"round": r["round"], "down": r["bytes_down"], "up": r["bytes_up"],
                 "eval_down": r["eval_bytes_down"], "sites": len(r["sites"])}
                for r in self.rounds]


def pooled(per_site: dict[str, dict], metrics=("dice", "hd95")) -> dict:
    """Pool sites' per-class sums/counts into the mean over all their subjects."""
    out: dict = {"n_subjects": sum(int(m.get("n_subjects", 0)) for m in per_site.values())}
    for metric in metrics:
        classes = sorted({k.split("/", 1)[1] for m in per_site.values() for k in m
                          if k.startswith(f"{metric}_sum/")})
        if not classes:
            continue
        per_class = {}
        for c in classes:
            s = sum(float(m.get(f"{metric}_sum/{c}", 0.0)) for m in per_site.values())
            n = sum(int(m.get(f"{metric}_n/{c}", 0)) for m in per_site.values())
            per_class[c] = s / n if n else float("nan")
        out[metric] = per_class
        finite = [v for v in per_class.values() if math.isfinite(v)]
        out[f"mean_{metric}"] = float(np.mean(finite)) if finite else float("nan")
    return out


def site_summary(m: dict) -> dict:
    """A site's aggregate test metrics in the central record's shape."""
    out: dict = {"n_subjects": m.get("n_subjects", 0)}
    for metric in ("dice", "hd95"):
        per = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"{metric}/")}
        if per:
            out[metric] = per
            out[f"mean_{metric}"] = m.get(f"mean_{metric}")
    return out


class FederatedServer(Server):
    """Flower's ``Server``; after the rounds, every site evaluates the model on its test set."""

    def __init__(self, cfg: RunConfig, n_sites: int):
        self.recorder = RecordingStrategy(cfg, n_sites)
        site_dp = cfg.setting.federated.dp_mode == "site" and cfg.privacy.enabled
        super().__init__(client_manager=SiteClientManager(
            n_sites, cfg.seed, site_sampler(cfg) if site_dp else None,
            cfg.setting.federated.min_fit_sites), strategy=self.recorder)
        self.cfg = cfg
        self.n_sites = n_sites
        self.test_metrics: dict[str, dict] = {}
        self.test_missed: list[dict] = []
        self.wall_s = 0.0

    def fit(self, num_rounds, timeout):
        t0 = time.perf_counter()
        seed_server_noise(self.cfg)  # the DP-FedAvg noise is drawn from NumPy's generator
        history, elapsed = super().fit(num_rounds, timeout)
        self.final_test(num_rounds, timeout)
        self.wall_s = time.perf_counter() - t0
        return history, elapsed

    def fit_round(self, server_round, timeout):
        """Flower's round; in site-level DP a round whose coins drew no site still releases
        the noise (Flower's loop would skip it: an empty Poisson sample is a step too)."""
        res = super().fit_round(server_round, timeout)
        if res is None and self.recorder.dp_site is not None:
            params, metrics = self.strategy.aggregate_fit(server_round, [], [])
            return params, metrics, ([], [])
        return res

    def final_test(self, num_rounds: int, timeout: float | None = None, grid=None) -> None:
        """Every site evaluates the final global model (``self.parameters``) on its test set.

        Shared by Flower's ``Server`` round loop (:meth:`fit`) and Flower's workflows
        (:func:`privseg.federated.secagg.run_workflow`), which run the rounds without
        ``Server.fit``. With a ``grid`` (Flower ``Grid``) the instructions go out in one batch,
        so deployed sites evaluate at the same time instead of one round trip after another.
        """
        by_site = self._client_manager.sites()
        ins = EvaluateIns(self.parameters, {"split": "test", "round": num_rounds})
        failures: list = []
        if grid is not None:
            replies = ask_sites(grid, {int(cid): compat.evaluateins_to_recorddict(ins, True)
                                       for cid in by_site.values()},
                                MessageType.EVALUATE, str(num_rounds), timeout, failures)
            results = [(self._client_manager.clients[str(nid)],
                        compat.recorddict_to_evaluateres(rd)) for nid, rd in replies.items()]
        else:
            results = []
            for cid in by_site.values():
                proxy = self._client_manager.clients[cid]
                try:
                    results.append((proxy, proxy.evaluate(ins, timeout=timeout,
                                                           group_id=num_rounds)))
                except Exception as e:  # noqa: BLE001 - a site lost: noted, counted below
                    failures.append(RuntimeError(f"{type(e).__name__}: {e}"))
                    failures[-1].site = cid
        site_of = self._client_manager.site_of
        absent = sorted(set(site_of.values()) - set(by_site))
        if failures or absent:
            self.test_missed = [{"site": site_of.get(f.site, f.site), "reason": str(f)}
                                for f in failures] + [
                {"site": s, "reason": "not connected at the final test"} for s in absent]
            if len(results) < self.recorder.min_sites(len(by_site) + len(absent)):
                raise RuntimeError(f"final test: {len(results)} of {len(by_site)} site(s) "
                                   "answered, fewer than setting.federated.min_fit_sites: "
                                   f"{self.test_missed}")
        self.recorder.final_test_bytes_down = payload_bytes(self.parameters) * len(results)
        self.test_metrics = self.recorder._collect_eval(results)
        if flwr_log is not None:
            flwr_log(INFO, "privseg: final test evaluation at %d sites done", len(results))

    def history(self) -> list[dict]:
        """Per round: sites aggregated, those asked that missed it (and why), metrics, ε."""
        history = []
        for r in self.recorder.rounds:
            row = {"round": r["round"], "sites": r["sites"], "fit_s": r.get("fit_s")}
            for k in ("missed", "missed_eval", "train_loss", "val_mean_dice", "val_per_site",
                      "val_n_subjects", "started_at", "ended_at"):
                if k in r:
                    row[k] = r[k]
            eps = {s: m["epsilon"] for s, m in r.get("site_metrics", {}).items()
                   if "epsilon" in m}
            if eps:
                row["epsilon_per_site"] = eps
            history.append(row)
        return history

    def failed_record(self, error: BaseException) -> dict:
        """The record of a run that could not go on: status ``failed``, the error, the rounds
        released and what was spent so far (sample-level: each site's last reported ε, with
        the answering sites' reports of the failed round; site-level: the server's accountant
        over the rounds released). Not a complete record: a rerun is not blocked by it."""
        rec = self.recorder
        fed = self.cfg.setting.federated
        return {
            "status": "failed", "error": f"{type(error).__name__}: {error}",
            "setting": "federated", "rounds_done": rec.rounds_released(),
            "dataset": {"name": self.cfg.dataset.name, "sites": sorted(rec.properties)},
            "federated": {"strategy": fed.strategy, "dp_mode": fed.dp_mode,
                          "rounds": fed.rounds, "n_sites": self.n_sites,
                          "min_fit_sites": fed.min_fit_sites,
                          "bytes_per_round": rec.bytes_per_round()},
            "history": self.history(),
            "privacy": rec.privacy(),
        }

    def record(self) -> dict:
        """The run record (minus run id/config/environment, added by the caller)."""
        rec = self.recorder
        fed = self.cfg.setting.federated
        props = next(iter(rec.properties.values()))
        test = pooled(self.test_metrics)
        test["per_site"] = {s: site_summary(m) for s, m in self.test_metrics.items()}
        if self.test_missed:
            test["missed"] = self.test_missed
        history = self.history()
        bpr = rec.bytes_per_round()
        audit = dict(rec.audit, metric_types=sorted(rec.audit["metric_types"]))
        return {
            "setting": "federated",
            "dataset": {"name": self.cfg.dataset.name,
                        "class_names": str(props["class_names"]).split(","),
                        "sites": sorted(rec.properties)},
            "federated": {
                "strategy": fed.strategy, "dp_mode": fed.dp_mode, "rounds": fed.rounds,
                "local_epochs": fed.local_epochs, "local_steps": fed.local_steps,
                "fraction_fit": fed.fraction_fit,
                # site-level DP samples by Poisson coins: q·N sites per round on average
                "sites_per_round": (fed.fraction_fit * self.n_sites if rec.dp_site is not None
                                    else sites_per_round(self.n_sites, fed.fraction_fit)),
                "n_sites": self.n_sites, "partition": fed.partition,
                "parameter_payload_bytes": payload_bytes(self.parameters),
                "sparse": self.sparse_summary(bpr),
                "bytes_per_round": bpr,
                "mean_bytes_per_round": statistics.fmean(b["down"] + b["up"] for b in bpr)
                if bpr else 0,
                "final_test_bytes_down": getattr(rec, "final_test_bytes_down", 0),
                "wire_audit": audit,
                "secure_aggregation": fed.secure_aggregation,
                **({"secagg": dict(rec.secagg or {})} if fed.secure_aggregation else {}),
            },
            "history": history,
            "test": test,
            "privacy": rec.privacy(),
        }


    def sparse_summary(self, bpr: list[dict]) -> dict | None:
        """Sparse sharing: what was selected and the bytes up against full sharing."""
        fed = self.cfg.setting.federated
        if not is_sparse(fed):
            return None
        dense = payload_bytes(self.parameters)
        up = [b["up"] / b["sites"] for b in bpr if b["sites"]]
        mean_up = statistics.fmean(up) if up else 0.0
        svt = fed.dp_mode == "svt"
        return {"rule": "svt" if svt else fed.share_rule,
                "fraction": fed.share_fraction,
                "d": self.recorder.model_size(),
                "aggregation": "unsent coordinates count as zero update (the global model's "
                               "value), then the inner strategy's weighted mean",
                "mean_bytes_up_per_site": mean_up, "dense_bytes_up_per_site": dense,
                "bytes_ratio": mean_up / dense if dense else math.nan}


def ask_sites(grid, contents: dict[int, RecordDict], message_type: str, group_id: str,
              timeout: float | None = None, failures: list | None = None
              ) -> dict[int, RecordDict]:
    """Send each node its instruction in one batch over a Flower ``Grid``; node -> reply.

    A site's error reply, or a missing reply, stops the run (the record would otherwise
    misstate who took part) unless ``failures`` is given: then each is appended there (an
    exception with the node id as ``site``) and the caller decides.
    """
    msgs = [Message(content, nid, message_type, group_id=group_id)
            for nid, content in contents.items()]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    out: dict[int, RecordDict] = {}
    lost: list[RuntimeError] = []
    for r in replies:
        if r.has_error():
            lost.append(RuntimeError(f"node {r.metadata.src_node_id}: {r.error.reason}"))
            lost[-1].site = str(r.metadata.src_node_id)
        else:
            out[r.metadata.src_node_id] = r.content
    for nid in sorted(set(contents) - set(out) - {int(e.site) for e in lost}):
        lost.append(RuntimeError(f"no {message_type} reply from node {nid}"))
        lost[-1].site = str(nid)
    if lost and failures is None:
        raise lost[0]
    (failures if failures is not None else []).extend(lost)
    return dict(sorted(out.items()))


def prefetch_site_properties(server: FederatedServer, grid, timeout: float | None = None,
                             poll_s: float = 0.5) -> None:
    """Ask every connected node for its site properties at once (over a Flower ``Grid``).

    :meth:`SiteClientManager.site_name` would ask one node after another, one round trip
    each; with SuperNodes that is seconds per site. Waits until ``n_sites`` nodes are online.
    """
    while len(set(grid.get_node_ids())) < server.n_sites:
        time.sleep(poll_s)
    nodes = sorted(set(grid.get_node_ids()))
    ins = compat.getpropertiesins_to_recorddict(GetPropertiesIns({}))
    replies = ask_sites(grid, {nid: ins for nid in nodes}, MessageTypeLegacy.GET_PROPERTIES,
                        "", timeout)
    cm = server.client_manager()
    for nid, content in replies.items():
        props = dict(compat.recorddict_to_getpropertiesres(content).properties)
        cm.props[str(nid)] = props
        cm.site_of[str(nid)] = str(props["site"])


def deployment_record(cfg: RunConfig, server: FederatedServer, elapsed_s: float, mode: str,
                      transport: dict) -> dict:
    """A deployed run's record, as the server holds it: the same fields as a simulation's,
    with the deployment's timing (no overhead figure: the sites' compute runs elsewhere) and
    its transport."""
    record = server.record()
    record["timing"] = {"total_s": elapsed_s, "site_compute_s": server.recorder.compute_s,
                        "mode": mode}
    record["federated"]["transport"] = transport
    record.update(run_id=cfg.run_id(), name=cfg.name, config=cfg.model_dump(mode="json"),
                  environment=environment("server"))
    return record


def failed_run_record(cfg: RunConfig, server: FederatedServer, error: BaseException,
                      device: str, **extra) -> dict:
    """A failed run's record (:meth:`FederatedServer.failed_record`) with its run id, config
    and environment, as a complete record carries them; ``extra`` merged into it."""
    record = server.failed_record(error)
    record.update(extra)
    record.update(run_id=cfg.run_id(), name=cfg.name, config=cfg.model_dump(mode="json"),
                  environment=environment(device))
    return record


def make_server(cfg: RunConfig, n_sites: int) -> FederatedServer:
    """The server both simulation and deployment run."""
    return FederatedServer(cfg, n_sites)
