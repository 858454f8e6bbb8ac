"""Federated simulation for sweeps: Flower's own server loop, sites called in-process.

Flower's simulation engine (``flwr.simulation``) needs Ray, which is heavy and does not suit
two CPU cores. The simulation here runs the *same* objects a deployment runs: the server is
:class:`privseg.federated.server.FederatedServer` (Flower's ``Server`` round loop, our client
manager and Flower's strategies / DP wrapper), and each site is a
:class:`privseg.federated.client.SiteClient` (a Flower ``NumPyClient``, turned into a Flower
``Client`` by ``to_client()``). Only the transport differs: :class:`InProcessClientProxy` takes
the place of Flower's gRPC client proxy, and passes every instruction and reply through Flower's
protobuf serialisation (``flwr.common.serde``, the messages the gRPC transport sends), so a site
receives and returns exactly what it would over the wire. Sites run one at a time
(``max_workers=1``), which with the sites' own RNG streams makes a run deterministic for a seed.

With ``secure_aggregation`` the rounds run through Flower's SecAgg+ workflow over an in-process
``Grid`` instead (:mod:`privseg.federated.secagg`), with the same server pieces and sites.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from flwr.common import serde
from flwr.common.typing import (
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    ReconnectIns,
)
from flwr.proto.transport_pb2 import ClientMessage, ServerMessage
from flwr.server.client_proxy import ClientProxy

from privseg.config import RunConfig
from privseg.datasets import SubjectSet
from privseg.federated.client import SiteClient
from privseg.federated.secagg import SiteLink, secagg_plan, simulate_secagg
from privseg.federated.server import (
    FederatedServer,
    failed_run_record,
    fails_as_run,
    make_server,
    stopped_server,
)
from privseg.federated.sites import build_sites
from privseg.record import environment, run_dir, write_record
from privseg.training.setup import completed_record, load_subjects, seed_everything
from privseg.training.timing import process_age_s

log = logging.getLogger("privseg")


class InProcessClientProxy(ClientProxy):
    """A Flower ``ClientProxy`` calling a site's ``Client`` in this process, via protobuf."""

    def __init__(self, cid: str, client: SiteClient):
        super().__init__(cid)
        self.site = client
        self.client = client.to_client()
        self.wire = {"server_to_site": 0, "site_to_server": 0}

    def _down(self, msg: ServerMessage):
        self.wire["server_to_site"] += msg.ByteSize()
        return ServerMessage.FromString(msg.SerializeToString())

    def _up(self, msg: ClientMessage):
        self.wire["site_to_server"] += msg.ByteSize()
        return ClientMessage.FromString(msg.SerializeToString())

    def get_properties(self, ins: GetPropertiesIns, timeout, group_id) -> GetPropertiesRes:
        m = self._down(ServerMessage(get_properties_ins=serde.get_properties_ins_to_proto(ins)))
        res = self.client.get_properties(
            serde.get_properties_ins_from_proto(m.get_properties_ins))
        r = self._up(ClientMessage(get_properties_res=serde.get_properties_res_to_proto(res)))
        return serde.get_properties_res_from_proto(r.get_properties_res)

    def get_parameters(self, ins: GetParametersIns, timeout, group_id) -> GetParametersRes:
        raise RuntimeError("the server builds the initial model itself; it never asks a site")

    def fit(self, ins: FitIns, timeout, group_id) -> FitRes:
        m = self._down(ServerMessage(fit_ins=serde.fit_ins_to_proto(ins)))
        res = self.client.fit(serde.fit_ins_from_proto(m.fit_ins))
        r = self._up(ClientMessage(fit_res=serde.fit_res_to_proto(res)))
        return serde.fit_res_from_proto(r.fit_res)

    def evaluate(self, ins: EvaluateIns, timeout, group_id) -> EvaluateRes:
        m = self._down(ServerMessage(evaluate_ins=serde.evaluate_ins_to_proto(ins)))
        res = self.client.evaluate(serde.evaluate_ins_from_proto(m.evaluate_ins))
        r = self._up(ClientMessage(evaluate_res=serde.evaluate_res_to_proto(res)))
        return serde.evaluate_res_from_proto(r.evaluate_res)

    def reconnect(self, ins: ReconnectIns, timeout, group_id) -> DisconnectRes:
        return DisconnectRes(reason="simulation")


def simulate(cfg: RunConfig, subject_set: SubjectSet, sites: dict | None = None,
             prepare: Callable[[FederatedServer, dict[str, SiteClient]], None] | None = None,
             ) -> tuple[FederatedServer, dict[str, InProcessClientProxy | SiteLink], dict]:
    """Run the federation in-process; return the server, the site proxies and the partition.

    ``prepare(server, clients)``, when given, sees the built server and sites before the first
    round (the privacy audit attaches its canaries there, :mod:`privseg.audit`)."""
    if sites is None:
        sites, desc = build_sites(cfg, subject_set)
    else:
        desc = {}
    if cfg.setting.federated.secure_aggregation:
        secagg_plan(cfg, len(sites))  # refuse before building the sites
    clients = {name: SiteClient(cfg, data, subject_set) for name, data in sites.items()}
    if cfg.setting.federated.secure_aggregation:
        server, links, _ = simulate_secagg(cfg, clients)
        return server, links, desc
    server = make_server(cfg, len(clients))
    server.set_max_workers(1)  # sites one at a time: deterministic, and fair to 2 cores
    if prepare is not None:
        prepare(server, clients)
    proxies = {}
    for name, client in clients.items():
        proxies[name] = InProcessClientProxy(name, client)
        server.client_manager().register(proxies[name])
    with fails_as_run(server):
        server.fit(cfg.setting.federated.rounds, timeout=None)
    return server, proxies, desc


def local_baseline(cfg: RunConfig, subject_set: SubjectSet, sites: dict) -> dict:
    """Each site trained alone for the same rounds (a one-site federation), tested at home.

    Alone, a site has nothing to aggregate securely: the baseline runs without SecAgg+.
    """
    fed = cfg.setting.federated
    solo = cfg.model_copy(update={"setting": cfg.setting.model_copy(update={
        "federated": fed.model_copy(update={"secure_aggregation": False})})})
    out = {}
    for name, data in sites.items():
        server, _, _ = simulate(solo, subject_set, {name: data})
        rec = server.record()
        out[name] = {"test": rec["test"]["per_site"][name], "privacy": {
            k: rec["privacy"].get(k) for k in ("mode", "epsilon", "unit")}}
    return out


def run_federated(cfg: RunConfig, *, progress: bool = True, force: bool = False,
                  subject_set: SubjectSet | None = None) -> dict:
    """Simulate one federated run; write and return its record (same writer as central).

    A run that cannot go on (fewer than ``min_fit_sites`` answered a round) still writes a
    record of what it spent (status ``failed``, :meth:`FederatedServer.failed_record`), then
    raises the run's error; a failed record does not block a
    rerun of the config.
    """
    run_id = cfg.run_id()
    out = run_dir(cfg.output.dir, run_id)
    if not force and (existing := completed_record(out)) is not None:
        return existing
    startup_s = process_age_s()  # the interpreter, imports and command line before the run
    seed_everything(cfg.seed)
    t_load = time.perf_counter()
    subject_set = subject_set or load_subjects(cfg)
    t0 = time.perf_counter()
    sites, desc = build_sites(cfg, subject_set)
    try:
        server, proxies, _ = simulate(cfg, subject_set, sites)
    except Exception as e:
        if (stopped := stopped_server(e)) is None:
            raise
        write_record(out, failed_run_record(cfg, stopped, e, cfg.training.device))
        log.error("federated run %s failed (record written to %s): %s", run_id, out, e)
        raise
    wall = time.perf_counter() - t0
    record = server.record()
    site_compute = sum(p.site.compute_s for p in proxies.values())
    record["dataset"]["n_subjects"] = len(subject_set.subjects)
    record["splits"] = {name: s.counts() for name, s in sites.items()}
    record["federated"]["partition_description"] = desc
    record["federated"]["wire_bytes"] = {n: p.wire for n, p in proxies.items()}
    record["timing"] = {
        "total_s": wall, "site_compute_s": site_compute,
        # where the sites' compute went, summed over sites (SiteClient.compute_split_s)
        "site_compute_split_s": {k: sum(p.site.compute_split_s[k] for p in proxies.values())
                                 for k in next(iter(proxies.values())).site.compute_split_s},
        "simulation_overhead": (wall - site_compute) / site_compute if site_compute else None,
        # of the sites' train_s, batch loading
        "site_data_s": sum(p.site.data_s for p in proxies.values()),
        "load_s": t0 - t_load, "startup_s": startup_s,
        "mode": "simulation (in-process, sites sequential"
                + (", Flower SecAgg+ workflow)" if cfg.setting.federated.secure_aggregation
                   else ")"),
    }
    if cfg.setting.federated.local_baseline:
        tb = time.perf_counter()
        record["local_baseline"] = local_baseline(cfg, subject_set, sites)
        record["timing"]["local_baseline_s"] = time.perf_counter() - tb
    record.update(run_id=run_id, name=cfg.name, config=cfg.model_dump(mode="json"),
                  environment=environment(str(sites and next(iter(proxies.values())).site.device)))
    write_record(out, record)
    if progress:
        eps = record["privacy"]["epsilon"]
        log.info("federated run %s: test mean Dice %.4f, ε %s, %.1fs (%.1f%% overhead)", run_id,
                 record["test"].get("mean_dice", math.nan), eps, wall,
                 100 * (record["timing"]["simulation_overhead"] or 0))
    return record
