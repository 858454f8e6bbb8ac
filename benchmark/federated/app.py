"""privseg as a Flower App: the ``ServerApp`` and ``ClientApp`` that ``flwr run`` deploys.

The SuperLink/SuperNode runtime of Flower (1.41) runs a ``ServerApp`` once per run, in a process
next to the SuperLink, and a ``ClientApp`` once per *message*, in a fresh ``flwr-clientapp``
process next to each SuperNode (only ``Context.state`` survives between messages). The App
directory shipped with this package (:data:`APP_DIR`, its ``pyproject.toml`` names the two
objects below) holds no code of its own: privseg must be installed where the SuperLink and the
SuperNodes run.

- :data:`server_app` parses the run config the federation submitted (the whole privseg
  ``RunConfig`` as JSON, :data:`CONFIG_KEY`), builds the *same*
  :class:`~privseg.federated.server.FederatedServer` as the simulation and runs
  :func:`privseg.federated.secagg.run_workflow` over the grid Flower hands it (Flower's
  ``DefaultWorkflow``; ``SecAggPlusWorkflow`` as its fit workflow with ``secure_aggregation``),
  then writes the run record (:mod:`privseg.record`, the simulation's format) to
  ``OUTPUT_DIR/RUN_ID/record.json`` on the SuperLink's machine.
- :data:`client_app` is a thin forwarder. A site's training state (its model, DP optimizer,
  Poisson loader position, accountant and random streams) must live across rounds, exactly as in
  the simulation, and a per-message process cannot hold it. So each message (and the SuperNode's
  ``Context``) is passed, as Flower's protobuf, over a local Unix socket to the site's
  long-lived worker (:mod:`privseg.federated.supernode`, started by ``privseg federated
  supernode`` beside its SuperNode), which answers with the unchanged
  :class:`~privseg.federated.client.SiteClient` inside the same ``ClientApp`` and mods as the
  SecAgg+ simulation (:func:`privseg.federated.secagg.site_app`).

This module imports only Flower at import time: ``flwr-clientapp`` loads it for every message.
"""

from __future__ import annotations

import json
import math
import time
from multiprocessing.connection import Client as SocketClient
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import serde
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid, ServerApp

#: the Flower App directory (``pyproject.toml`` only) that ``flwr run`` packages
APP_DIR = Path(__file__).resolve().parent / "flower_app"
#: run-config keys (``[tool.flwr.app.config]`` of the App)
CONFIG_KEY = "privseg-config"  # the privseg RunConfig, JSON
SITES_KEY = "n-sites"
OUTPUT_KEY = "output-dir"  # where the ServerApp writes OUTPUT_DIR/RUN_ID/record.json
TIMEOUT_KEY = "round-timeout"  # seconds; 0: none
#: seconds after its "Node Unavailable" error that an instruction is resent for, once its site
#: is back (at most until the round's deadline): SuperNodes reconnect within ~20 s of a
#: SuperLink restart, and a site that is really gone should not hold the round much longer
RESEND_WAIT_S = 45.0
#: seconds at most between the ServerApp's retries of a call to the SuperLink (Flower's: 20)
RUNTIME_RETRY_MAX_S = 1.0
#: the message types of a round's call, which --round-timeout bounds (CountingGrid)
ROUND_MESSAGE_TYPES = (MessageType.TRAIN, MessageType.EVALUATE)
#: node-config keys (``flower-supernode --node-config``)
WORKER_KEY = "privseg-worker"  # the site worker's Unix socket
SITE_KEY = "site"


def worker_authkey_path(socket_path: str | Path) -> Path:
    """The file holding the worker socket's shared secret (0600, beside the socket)."""
    return Path(f"{socket_path}.key")


def exchange(socket_path: str, message: Message, context: Context) -> tuple[Message, Context]:
    """Send a message and its context to a site worker; return its reply and new context."""
    key = worker_authkey_path(socket_path).read_bytes()
    with SocketClient(socket_path, family="AF_UNIX", authkey=key) as conn:
        conn.send_bytes(serde.message_to_proto(message).SerializeToString())
        conn.send_bytes(serde.context_to_proto(context).SerializeToString())
        reply = serde.message_from_proto(ProtoMessage.FromString(conn.recv_bytes()))
        new_context = serde.context_from_proto(ProtoContext.FromString(conn.recv_bytes()))
    return reply, new_context


def forward_to_site_worker(msg: Message, context: Context,
                           call_next: ClientAppCallable) -> Message:
    """ClientApp mod: hand the message to the site's worker (never to ``call_next``)."""
    socket_path = context.node_config.get(WORKER_KEY)
    if not socket_path:
        raise RuntimeError(f"this SuperNode has no node config {WORKER_KEY!r}: start it with "
                           "`privseg federated supernode`, which runs the site's worker")
    reply, new_context = exchange(str(socket_path), msg, context)
    context.state = new_context.state  # the SuperNode keeps it for the next message
    return reply


def _no_local_client(context: Context):
    raise RuntimeError("privseg's ClientApp forwards every message to the site worker")


client_app = ClientApp(client_fn=_no_local_client, mods=[forward_to_site_worker])
server_app = ServerApp()


def _fresh_copy(ins: Message) -> Message:
    """A new instruction (new id) with ``ins``'s content, destination, type and round."""
    return Message(content=ins.content, dst_node_id=ins.metadata.dst_node_id,
                   message_type=ins.metadata.message_type, group_id=ins.metadata.group_id)


class CountingGrid(Grid):
    """A Flower ``Grid`` that counts the serialised bytes of what it sends and receives.

    Wraps the grid the SuperLink hands the ServerApp; counts per group id (the round) and
    message type, in the shape :class:`privseg.federated.secagg.InProcessGrid` uses, so the
    record's SecAgg+ ``bytes_per_round`` (all four stages) is filled the same way. Sizes are
    those of Flower's protobuf ``Message`` (content and metadata; the SuperLink's own framing
    and object chunking are not included).
    """

    def __init__(self, grid: Grid, poll_s: float = 0.2, resend: bool = False,
                 resend_wait_s: float = RESEND_WAIT_S, round_timeout: float | None = None):
        self.grid = grid
        self.poll_s = poll_s
        #: seconds a call without its own ``timeout`` waits (see send_and_receive)
        self.round_timeout = round_timeout
        #: resend an instruction a site never got an answer to through (see send_and_receive)
        self.resend = resend
        self.resend_wait_s = resend_wait_s
        #: seconds between looks at the nodes' activations (see send_and_receive)
        self.activation_check_s = 1.0
        self.by_round: dict[str, dict[str, dict[str, int]]] = {}
        #: (group id, destination node) of each instruction sent again
        self.resent: list[tuple[str, int]] = []

    def _count(self, msg: Message, direction: str) -> None:
        size = serde.message_to_proto(msg).ByteSize()
        per = self.by_round.setdefault(msg.metadata.group_id, {}).setdefault(
            msg.metadata.message_type, {"server_to_site": 0, "site_to_server": 0})
        per[direction] += size

    def set_run(self, run_id: int) -> None:
        """Set the run (delegated)."""
        self.grid.set_run(run_id)

    @property
    def run(self):
        """The run this grid operates in (delegated)."""
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """A new message (delegated)."""
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self):
        """The connected nodes (delegated)."""
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        """Push messages (delegated), counting them."""
        messages = list(messages)
        for m in messages:
            self._count(m, "server_to_site")
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        """Pull replies (delegated), counting them."""
        replies = list(self.grid.pull_messages(message_ids))
        for r in replies:
            self._count(r, "site_to_server")
        return replies

    def send_and_receive(self, messages, *, timeout: float | None = None):
        """Push, then pull the replies every :attr:`poll_s` until all came or ``timeout``.

        Flower's own loop (``HttpGrid.send_and_receive``) polls every 3 s; here every
        ``poll_s`` (0.2 s), which matters for SecAgg+'s four round trips per round.

        A round's call (train or evaluate instructions) without a ``timeout`` waits
        :attr:`round_timeout` (the run's ``--round-timeout``; the sites' first contact,
        properties and parameters, is not bounded by it): Flower 1.42's fit and evaluate
        workflows pass none, so a reply lost without any sign would hold the round for ever,
        and the operator's ``--round-timeout`` would bound only SecAgg+'s stages, the final
        test and the wait for an absent site. A site whose reply is not in by then is missed
        ("no reply within the round"), as one that failed; the deadline is fixed when the
        round is sent, so whether a site misses it depends on that site alone (what
        site-level DP's accounting of a dropped site needs, ``SITE_DROPOUT_NOTE``).

        With :attr:`resend`, an instruction answered by the SuperLink's "Node Unavailable"
        error is pushed again once its site is back among the connected nodes, if that is
        within :attr:`resend_wait_s` of the error and the round's ``timeout``. That is what a
        SuperLink restart leaves: the site trained, but its reply was sent while the SuperLink
        was down and is lost. The site answers a resent instruction with the reply it already
        computed (:meth:`privseg.federated.client.SiteClient.fit`): no DP step is taken twice.
        An instruction whose site's node was activated again after it was sent (a SuperNode
        restarted) is resent the same way: its reply was lost too, but the SuperLink flags it
        only if a pull falls in the node's offline spell, which can last 0.3 s (seen in CI:
        the round then waited for that reply for ever, as Flower's fit workflow gives no
        timeout).
        """
        messages = list(messages)
        if timeout is None and all(m.metadata.message_type in ROUND_MESSAGE_TYPES
                                   for m in messages):
            timeout = self.round_timeout
        # an id Flower could not push (None) would be awaited forever
        pending = {i: m for i, m in zip(self.push_messages(messages), messages, strict=True)
                   if i is not None}
        activated = self._activations() if self.resend else None
        #: per pending instruction: its node's activation when it was sent
        sent_to = ({i: activated.get(m.metadata.dst_node_id) for i, m in pending.items()}
                   if activated is not None else {})
        start = time.monotonic()
        next_check = start + self.activation_check_s
        end = None if timeout is None else start + timeout
        replies: list[Message] = []
        #: (instruction, its error reply, resend no later than)
        waiting: list[tuple[Message, Message, float]] = []
        while pending or waiting:
            got = list(self.pull_messages(list(pending))) if pending else []
            for r in got:
                ins = pending.pop(r.metadata.reply_to_message_id)
                now = time.monotonic()
                if (self.resend and r.has_error() and r.error.code == ErrorCode.NODE_UNAVAILABLE
                        and (end is None or now < end)):
                    waiting.append((ins, r, min(now + self.resend_wait_s,
                                                end if end is not None else math.inf)))
                else:
                    replies.append(r)
            if (pending and sent_to and time.monotonic() >= next_check
                    and (end is None or time.monotonic() < end)):
                self._resend_to_reactivated(pending, sent_to)
                next_check = time.monotonic() + self.activation_check_s
            if waiting:
                online = set(self.get_node_ids())
                again = [_fresh_copy(i) for i, _, _ in waiting
                         if i.metadata.dst_node_id in online]
                if again:
                    self._push_again(again, pending, sent_to)
                now = time.monotonic()  # not back in time: the error stands
                waiting = [w for w in waiting if w[0].metadata.dst_node_id not in online]
                replies += [r for _, r, until in waiting if now >= until]
                waiting = [w for w in waiting if now < w[2]]
            if not (pending or waiting) or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll_s)
        return replies

    def _activations(self) -> dict[int, str] | None:
        """Each connected node's last activation (Flower's ``NodeInfo``); None where the
        grid does not tell (the in-process grids)."""
        get_nodes = getattr(self.grid, "get_nodes", None)
        if get_nodes is None:
            return None
        return {int(n.node_id): str(n.last_activated_at) for n in get_nodes()}

    def _push_again(self, again: list[Message], pending: dict, sent_to: dict,
                    activated: dict[int, str] | None = None) -> None:
        """Push copies of instructions whose replies were lost, awaiting them instead;
        ``activated``: the nodes' activations if the caller just read them."""
        self.resent += [(m.metadata.group_id, m.metadata.dst_node_id) for m in again]
        if activated is None and sent_to:
            activated = self._activations()
        for i, m in zip(self.push_messages(again), again, strict=True):
            if i is not None:
                pending[i] = m
                if activated is not None:
                    sent_to[i] = activated.get(m.metadata.dst_node_id)

    def _resend_to_reactivated(self, pending: dict, sent_to: dict) -> None:
        """Resend each pending instruction whose node was activated again since it was sent."""
        now = self._activations()
        if not now:  # the grid does not tell, or no node is connected: none re-activated
            return
        lost = [i for i, m in pending.items() if sent_to.get(i) is not None
                and now.get(m.metadata.dst_node_id) not in (None, sent_to[i])]
        again = []
        for i in lost:
            ins = pending.pop(i)
            sent_to.pop(i, None)
            again.append(_fresh_copy(ins))
        if again:
            self._push_again(again, pending, sent_to, activated=now)


def retry_runtime_promptly(grid: Grid, max_delay_s: float = RUNTIME_RETRY_MAX_S) -> bool:
    """Cap the backoff of the ServerApp's retries to the SuperLink at ``max_delay_s``; False
    where ``grid`` has no such retries (the simulation's in-memory grid).

    Why: Flower (1.42) sends the ServerApp's task heartbeat through the grid's own retry
    invoker, whose jittered waits grow to 20 s, are taken one at a time under a lock shared
    with the run's calls, and are slept out in full even once the SuperLink answers again. The
    SuperLink expires the task 60 s after its last heartbeat (``HEARTBEAT_PATIENCE`` x 30 s),
    and an expired task's next call is answered 401, on which Flower SIGINTs the ServerApp: a
    SuperLink restarted within seconds could still end the run when the queued waits outlast
    what was left of that minute. The ServerApp runs next to the SuperLink, so retrying every
    second costs nothing. Flower has no setting for this; the invoker's wait generator is its
    own, documented knob (``RetryInvoker.wait_gen_factory``).
    """
    from flwr.supercore.retry.retry_invoker import exponential

    invoker = getattr(grid, "_retry_invoker", None)
    if invoker is None or not hasattr(invoker, "wait_gen_factory"):
        return False
    invoker.wait_gen_factory = lambda: exponential(base_delay=max_delay_s / 4,
                                                   max_delay=max_delay_s)
    return True


def stopped_by_flower(exit_: BaseException, server: Any) -> RuntimeError:
    """The failed record's error when Flower ends the ServerApp (``SystemExit`` from its
    signal handler, ``KeyboardInterrupt``): written at once, so that the operator's
    ``privseg federated run`` reads why instead of waiting out ``--lost-wait`` for a record."""
    return RuntimeError(
        f"Flower stopped the ServerApp in round {len(server.recorder.rounds)} "
        f"({type(exit_).__name__}{f' {exit_}' if str(exit_) else ''}): a signal to its "
        "process, or the SuperLink refused its task (401: expired after 60 s without a "
        "heartbeat, e.g. down that long)")


@server_app.main()
def serve_federation(grid: Grid, context: Context) -> None:
    """ServerApp main: the rounds, the final test and the run record (see the module doc)."""
    from privseg.config import parse_config
    from privseg.federated.deadline import checked_round_timeout
    from privseg.federated.progress import clear_progress, write_progress
    from privseg.federated.secagg import _fill_round_bytes, run_workflow
    from privseg.federated.server import (
        deployment_record,
        failed_run_record,
        fails_as_run,
        make_server,
    )
    from privseg.record import run_dir, write_record
    from privseg.training.setup import seed_everything

    retry_runtime_promptly(grid)
    rc = context.run_config
    cfg = parse_config(json.loads(str(rc[CONFIG_KEY])))
    n_sites = int(rc[SITES_KEY])
    timeout = checked_round_timeout(float(rc.get(TIMEOUT_KEY, 0.0)) or None)
    output = str(rc.get(OUTPUT_KEY) or cfg.output.dir)
    seed_everything(cfg.seed)
    server = make_server(cfg, n_sites)
    if timeout:  # a site gone from the federation is awaited no longer than a round's deadline
        manager = server.client_manager()
        manager.absent_wait_s = min(manager.absent_wait_s, timeout)
    counting = CountingGrid(grid, resend=not cfg.setting.federated.secure_aggregation,
                            round_timeout=timeout)
    t0 = time.perf_counter()
    transport = {"runtime": "flower-superlink", "flower_run_id": int(context.run_id),
                 "wire_bytes_by_round": counting.by_round, "resent": counting.resent}
    directory = run_dir(output, cfg.run_id())

    def failed(error: BaseException) -> dict:  # what was spent so far, with the transport
        record = failed_run_record(cfg, server, error, "server",
                                   timing={"total_s": time.perf_counter() - t0})
        record["federated"]["transport"] = transport
        return record

    def keep_progress() -> None:  # should this process be killed
        write_progress(directory, failed(RuntimeError(
            f"the ServerApp stopped in round {len(server.recorder.rounds)} without writing "
            "its record")))

    server.recorder.on_progress = keep_progress
    try:
        with fails_as_run(server):
            run_workflow(cfg, server, counting, round_timeout=timeout)
    except BaseException as e:  # what was spent is written down before the ServerApp fails
        error = e if isinstance(e, Exception) else stopped_by_flower(e, server)
        path = write_record(directory, failed(error))
        clear_progress(directory)
        print(f"privseg: run failed, record written to {path}", flush=True)
        raise
    if cfg.setting.federated.secure_aggregation:
        _fill_round_bytes(server, counting)
    record = deployment_record(
        cfg, server, time.perf_counter() - t0,
        "deployment (Flower SuperLink/SuperNode"
        + (", SecAgg+)" if cfg.setting.federated.secure_aggregation else ")"),
        transport)
    path = write_record(directory, record)
    clear_progress(directory)
    print(f"privseg: record written to {path}", flush=True)
