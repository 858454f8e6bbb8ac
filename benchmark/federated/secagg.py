"""Secure aggregation (Flower SecAgg+) with site-level DP, simulated in this process.

With ``setting.federated.secure_aggregation: true`` (``dp_mode: site`` only) the rounds run
through Flower's own message-based workflow instead of its ``Server`` loop:

- server: ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` over a ``LegacyContext``
  holding the *same* :class:`~privseg.federated.server.FederatedServer` pieces as a plain run
  (its :class:`~privseg.federated.server.RecordingStrategy` and site client manager), whose
  site-level DP wrapper is then Flower's ``DifferentialPrivacyClientSideFixedClipping``: the
  server adds the noise to the unmasked mean and never clips (it never holds an update);
- site: the unchanged :class:`~privseg.federated.client.SiteClient` in a Flower ``ClientApp``
  with ``mods=[secaggplus_mod, site_update_mod, fixedclipping_mod]``. Mods wrap outermost first,
  so the reply is clipped (``fixedclipping_mod``), then checked and given weight 1
  (:func:`make_site_update_mod`: DP-FedAvg averages sites with equal weights, and under SecAgg+
  the weight is chosen by the site, since the server sees only the weighted sum), then
  quantised and masked (``secaggplus_mod``), as in Flower's ``fl-dp-sa`` example;
- transport: :class:`InProcessGrid`, a Flower ``Grid`` that hands each message to the
  ``ClientApp`` of its destination node in this process, through Flower's protobuf
  serialisation (``flwr.common.serde.message_to_proto``), counting the bytes that would cross,
  with one persistent ``Context`` per node (``secaggplus_mod`` keeps its protocol state there).

Flower's ``flwr.simulation.run_simulation`` would do the same through Ray, which this project
does not install. Sites run one at a time; each site's SecAgg+ stochastic rounding draws from
its own NumPy stream (swapped in around its messages), so the server's DP noise stream is the
one a run without SecAgg+ draws.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client import ClientApp
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import NDArrays, parameters_to_ndarrays, serde
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.compat.common import recorddict_compat as compat
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from privseg.config import ConfigError, RunConfig
from privseg.dp.randomness import np_legacy_state
from privseg.federated.client import SiteClient
from privseg.federated.server import (
    FederatedServer,
    fails_as_run,
    make_server,
    prefetch_site_properties,
)
from privseg.federated.site_dp import seed_server_noise
from privseg.federated.site_plans import sites_per_round
from privseg.federated.sites import site_seed

log = logging.getLogger("privseg")
KEY = "setting.federated.secure_aggregation"
MODULUS_RANGE = 2**32  # Flower's default and largest SecAgg+ modulus

#: called with (instruction as the site received it, reply as the server received it)
MessageObserver = Callable[[Message, Message], None]
#: called with (node id, round, the site's clipped parameters before masking)
UpdateObserver = Callable[[int, int, NDArrays], None]


def refuse_sampled_site_dp(cfg: RunConfig) -> None:
    """Raise ConfigError for site-level DP with ``fraction_fit < 1`` on Flower's workflow.

    Flower's fit workflow (SuperLink deployment, SecAgg+) ends a round whose Poisson coins drew
    no site before any aggregation: that round would release the unchanged model instead of
    noise, and whether the model moved would tell whether any site was drawn. The simulation
    and the legacy server release the noise (:meth:`FederatedServer.fit_round`).
    """
    fed = cfg.setting.federated
    if fed.dp_mode == "site" and cfg.privacy.enabled and fed.fraction_fit < 1:
        raise ConfigError("site-level DP with setting.federated.fraction_fit < 1 runs in the "
                          "simulation and the legacy server only: Flower's workflow (SuperLink "
                          "deployment, SecAgg+) skips the noise of a round that drew no site; "
                          "set fraction_fit=1")


def secagg_rounding_state(cfg: RunConfig, site: str) -> tuple:
    """A site's SecAgg+ stochastic-rounding stream (NumPy state; secret unless opted out)."""
    return np_legacy_state(cfg.privacy.noise_seed, "secagg-rounding", site_seed(cfg.seed, site))


def secagg_plan(cfg: RunConfig, n_sites: int) -> dict:
    """SecAgg+ parameters for ``n_sites`` sites, checked; a ConfigError names the bad key.

    Shares default to every site chosen in a round (cross-silo federations are small) and the
    threshold to a majority of them. At least 3 sites per round: with 2, each could subtract
    its own update from the sum and read the other's.
    """
    fed = cfg.setting.federated
    if fed.fraction_fit != 1:
        raise ConfigError(f"{KEY}=true needs setting.federated.fraction_fit=1 (got "
                          f"{fed.fraction_fit:g}): site-level DP samples sites by Poisson "
                          "coins, and SecAgg+ needs a fixed set of sites in every round")
    m = sites_per_round(n_sites, fed.fraction_fit)
    if n_sites < 3 or m < 3:
        raise ConfigError(f"{KEY}=true needs at least 3 sites in every round; this federation "
                          f"has {n_sites} site(s) and setting.federated.fraction_fit="
                          f"{fed.fraction_fit:g} chooses {m}")
    shares = fed.secagg_num_shares if fed.secagg_num_shares is not None else m
    if shares > m:
        raise ConfigError(f"setting.federated.secagg_num_shares={shares} exceeds the {m} sites "
                          "chosen per round")
    threshold = fed.secagg_reconstruction_threshold
    threshold = threshold if threshold is not None else shares // 2 + 1
    if not 2 <= threshold < shares:
        raise ConfigError(f"setting.federated.secagg_reconstruction_threshold={threshold} must "
                          f"be at least 2 and below secagg_num_shares={shares}")
    if m * fed.secagg_quantization_range >= MODULUS_RANGE:
        raise ConfigError(f"setting.federated.secagg_quantization_range="
                          f"{fed.secagg_quantization_range} × {m} sites per round overflows "
                          f"the SecAgg+ modulus 2^32")
    return {"num_shares": shares, "reconstruction_threshold": threshold,
            "clipping_range": fed.secagg_clipping_range,
            "quantization_range": fed.secagg_quantization_range, "modulus_range": MODULUS_RANGE,
            "max_weight": 1.0, "sites_per_round": m, "protocol": "SecAgg+ (Flower)"}


def make_site_update_mod(clipping_range: float, observe: UpdateObserver | None = None) -> Mod:
    """A client mod for the clipped reply: check it fits SecAgg+'s range, give it weight 1.

    Sits between ``secaggplus_mod`` (outside) and ``fixedclipping_mod`` (inside). A value
    outside ``[-clipping_range, clipping_range]`` would be clipped silently by SecAgg+'s
    quantiser, so the site stops instead, naming the key.
    """

    def site_update_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        out = call_next(msg, ctxt)
        if out.has_error():
            return out
        fit_res = compat.recorddict_to_fitres(out.content, keep_input=True)
        arrays = parameters_to_ndarrays(fit_res.parameters)
        # np.max, not max(): a NaN must win (built-in max keeps a NaN only in first place).
        # The magnitude is logged here only: in the error the server reads it would be a
        # statistic of this site's unmasked update.
        worst = float(np.max([np.max(np.abs(a)) for a in arrays if a.size] or [0.0]))
        if not worst <= clipping_range:  # also catches NaN
            log.warning("node %s: a model value of magnitude %.4g lies outside SecAgg+'s "
                        "range ±%g", msg.metadata.dst_node_id, worst, clipping_range)
            raise ValueError(f"node {msg.metadata.dst_node_id}: a model value is not finite or "
                             f"lies outside setting.federated.secagg_clipping_range="
                             f"{clipping_range:g} (SecAgg+ would clip it silently)")
        if observe is not None:
            observe(msg.metadata.dst_node_id, int(msg.metadata.group_id), arrays)
        fit_res.num_examples = 1  # DP-FedAvg: equal site weights (the server sees the sum)
        out.content = compat.fitres_to_recorddict(fit_res, keep_input=True)
        return out

    return site_update_mod


class InProcessGrid(Grid):
    """A Flower ``Grid`` delivering messages to ``ClientApp`` nodes in this process.

    Each message and reply is serialised to Flower's protobuf ``Message`` and parsed back
    (what a SuperLink would forward), and its size counted per node and per round. Every node
    keeps one ``Context`` for the whole run, and its own NumPy random stream.
    """

    def __init__(self, app: ClientApp, node_states: dict[int, tuple], run_id: int = 0):
        self.app = app
        self._run = Run.create_empty(run_id)
        self.contexts = {nid: Context(run_id=run_id, node_id=nid, node_config={},
                                      state=RecordDict(), run_config={})
                         for nid in node_states}
        self._np_state = dict(node_states)
        self.replies: dict[str, Message] = {}
        self.wire = {nid: {"server_to_site": 0, "site_to_server": 0} for nid in node_states}
        #: group id (the round for fit/evaluate) -> message type -> bytes down / up
        self.by_round: dict[str, dict[str, dict[str, int]]] = {}
        self.observers: list[MessageObserver] = []
        self._next_id = 0

    # -- Grid API -------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        """Set the run this grid operates in."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid operates in."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """A new instruction message (Flower's ``Message`` constructor)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The sites' node ids."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node now (sites one at a time); keep the replies."""
        ids = []
        for msg in messages:
            self._next_id += 1
            msg_id = f"{self._next_id:012d}"
            msg.metadata.__dict__["_message_id"] = msg_id
            nid = msg.metadata.dst_node_id
            if nid not in self.contexts:
                raise ValueError(f"no node {nid} in this federation")
            received = self._cross(msg, nid, "server_to_site")
            reply = self._call_site(nid, received)
            reply.metadata.__dict__["_message_id"] = f"{msg_id}-reply"
            if reply.metadata.reply_to_message_id != msg_id:
                raise RuntimeError(f"node {nid} answered another message")
            got = self._cross(reply, nid, "site_to_server")
            for observe in self.observers:
                observe(received, got)
            self.replies[msg_id] = got
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` (each handed out once)."""
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push the messages and return every reply (delivery is synchronous)."""
        return self.pull_messages(self.push_messages(messages))

    # -- transport ------------------------------------------------------------------------
    def _cross(self, msg: Message, nid: int, direction: str) -> Message:
        blob = serde.message_to_proto(msg).SerializeToString()
        self.wire[nid][direction] += len(blob)
        per = self.by_round.setdefault(msg.metadata.group_id, {}).setdefault(
            msg.metadata.message_type, {"server_to_site": 0, "site_to_server": 0})
        per[direction] += len(blob)
        return serde.message_from_proto(ProtoMessage.FromString(blob))

    def _call_site(self, nid: int, msg: Message) -> Message:
        outer = np.random.get_state()
        np.random.set_state(self._np_state[nid])
        try:
            return self.app(msg, self.contexts[nid])
        finally:
            self._np_state[nid] = np.random.get_state()
            np.random.set_state(outer)


@dataclass
class SiteLink:
    """A site and the bytes it exchanged (what ``InProcessClientProxy`` gives the record)."""

    site: SiteClient
    wire: dict[str, int]


def site_app(clients: dict[int, SiteClient], clipping_range: float | None,
             observe: UpdateObserver | None = None) -> ClientApp:
    """The sites' Flower ``ClientApp``: clip, weight 1, mask (SecAgg+).

    ``clipping_range=None`` gives the plain ``ClientApp`` (no mods) of a run without SecAgg+:
    there the server clips (``DifferentialPrivacyServerSideFixedClipping``) and weighs.
    """

    def client_fn(context: Context):
        return clients[context.node_id].to_client()

    if clipping_range is None:
        return ClientApp(client_fn=client_fn)
    return ClientApp(client_fn=client_fn, mods=[
        secaggplus_mod, make_site_update_mod(clipping_range, observe), fixedclipping_mod])


def secagg_workflow(plan: dict) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ fit workflow with the parameters of :func:`secagg_plan`."""
    return SecAggPlusWorkflow(
        num_shares=plan["num_shares"], reconstruction_threshold=plan["reconstruction_threshold"],
        max_weight=plan["max_weight"], clipping_range=plan["clipping_range"],
        quantization_range=plan["quantization_range"], modulus_range=plan["modulus_range"])


def run_workflow(cfg: RunConfig, server: FederatedServer, grid: Grid,
                 round_timeout: float | None = None) -> None:
    """Run the rounds and the final test of ``server`` over ``grid`` (Flower's workflow).

    The server side of both the in-process SecAgg+ simulation and the deployed ``ServerApp``
    (:mod:`privseg.federated.app`): Flower's ``DefaultWorkflow`` over a ``LegacyContext``
    holding the server's :class:`~privseg.federated.server.RecordingStrategy` and site client
    manager, with ``SecAggPlusWorkflow`` as fit workflow when the config asks for secure
    aggregation. Afterwards ``server.parameters`` holds the final global model and
    ``server.test_metrics`` every site's test metrics, as after ``FederatedServer.fit``.
    """
    fed = cfg.setting.federated
    refuse_sampled_site_dp(cfg)
    if fed.secure_aggregation:
        server.recorder.secagg = server.recorder.secagg or secagg_plan(cfg, server.n_sites)
        workflow = DefaultWorkflow(fit_workflow=secagg_workflow(server.recorder.secagg))
    else:
        workflow = DefaultWorkflow()
    context = LegacyContext(
        Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                run_config={}),
        config=ServerConfig(num_rounds=fed.rounds, round_timeout=round_timeout),
        strategy=server.recorder, client_manager=server.client_manager())
    prefetch_site_properties(server, grid, round_timeout)
    seed_server_noise(cfg)  # the server's DP noise, as in FederatedServer.fit
    workflow(grid, context)
    server.parameters = compat.arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    server.final_test(fed.rounds, round_timeout, grid=grid)


def simulate_secagg(cfg: RunConfig, clients: dict[str, SiteClient], *,
                    on_message: MessageObserver | None = None,
                    on_site_update: UpdateObserver | None = None
                    ) -> tuple[FederatedServer, dict[str, SiteLink], InProcessGrid]:
    """Run the federation's rounds under SecAgg+; final test as in a plain run.

    Returns the server (its ``record()`` and ``parameters`` as after ``FederatedServer.fit``),
    each site with its byte counts, and the grid. The observers are for tests and audits.
    """
    fed = cfg.setting.federated
    if not fed.secure_aggregation or fed.dp_mode != "site":
        raise ConfigError(f"{KEY}: the SecAgg+ simulation runs dp_mode=site with "
                          "secure_aggregation=true only")
    plan = secagg_plan(cfg, len(clients))
    names = sorted(clients)
    node_of = {name: 1001 + i for i, name in enumerate(names)}  # Flower node ids
    app = site_app({node_of[n]: clients[n] for n in names}, plan["clipping_range"],
                   on_site_update)
    grid = InProcessGrid(app, {node_of[n]: secagg_rounding_state(cfg, n) for n in names})
    if on_message is not None:
        grid.observers.append(on_message)
    server = make_server(cfg, len(clients))
    server.recorder.secagg = plan
    with _server_identity(grid.run.run_id), fails_as_run(server):
        run_workflow(cfg, server, grid)
    _fill_round_bytes(server, grid)
    links = {n: SiteLink(clients[n], grid.wire[node_of[n]]) for n in names}
    return server, links, grid


@contextmanager
def _server_identity(run_id: int) -> Iterator[None]:
    """Flower's process-wide task identity (stamped on new messages) as its ServerApp sets it."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = saved


def _fill_round_bytes(server: FederatedServer, grid: InProcessGrid) -> None:
    """Per round: all bytes of the four SecAgg+ fit stages (keys, shares, masked vectors)."""
    for row in server.recorder.rounds:
        train = grid.by_round.get(str(row["round"]), {}).get(MessageType.TRAIN, {})
        row["bytes_down"] = train.get("server_to_site", 0)
        row["bytes_up"] = train.get("site_to_server", 0)
