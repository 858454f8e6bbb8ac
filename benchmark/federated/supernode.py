"""A clinic's side of a SuperLink deployment: its site worker and its Flower SuperNode.

``privseg federated supernode`` (:func:`serve_site`) loads the site's data from a local path,
starts a :class:`SiteWorker` on a private Unix socket, and runs Flower's ``flower-supernode``
(TLS towards the SuperLink, node authentication with the site's private key) with the socket
in its node config. Flower runs the App's ``ClientApp`` in a new process per message; that
process (:func:`privseg.federated.app.forward_to_site_worker`) hands the message to the worker,
which answers it with the site's :class:`~privseg.federated.client.SiteClient`, one per run,
inside the ``ClientApp`` of :func:`privseg.federated.secagg.site_app` (with SecAgg+: the
``secaggplus_mod``/``fixedclipping_mod`` stack; otherwise no mods), exactly as the simulation
does. The worker keeps the site's DP optimizer, loader position, accountant and random streams
between rounds, so a deployed run computes what the simulation computes.

Before its first answer in a run the worker checks that the federation's run config is the one
this site agreed to (same :func:`agreement_id`: everything but machine-local paths), so a site
never trains under a privacy budget it did not accept.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import Listener
from pathlib import Path

import numpy as np
from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.common import serde
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from privseg.config import ConfigError, RunConfig, parse_config
from privseg.dp.accounting import MAX_DEFAULT_DELTA
from privseg.dp.ledger import SiteLedger, Spend
from privseg.dp.randomness import refuse_replayable_noise
from privseg.federated.app import CONFIG_KEY, SITE_KEY, WORKER_KEY, worker_authkey_path
from privseg.federated.client import SiteClient, get_weights
from privseg.federated.federation import flower_command, flower_env
from privseg.federated.pinned_clientapp import install_shim
from privseg.federated.secagg import secagg_rounding_state, site_app
from privseg.federated.site_plans import site_level_plan
from privseg.federated.sites import SiteData, build_site, partition
from privseg.federated.sparse import svt_epsilon_per_round
from privseg.processes import stop_process

log = logging.getLogger("privseg")
#: Flower's SuperNode exit code when it cannot connect to, or be activated by, the SuperLink
#: (``flwr.supercore.exit.ExitCode.SUPERNODE_CONNECTION_ERROR``, 305, which the process exit
#: status carries modulo 256): a SuperLink refuses a quick re-activation of a restarted node
#: until its heartbeat expires
SUPERNODE_CONNECTION_ERROR = 305 % 256
#: what Flower prints for that refusal: its exit status is not always 305 % 256 (when the
#: SuperNode's runtime server already started it shuts that down and exits with 1)
REFUSED_LINE = "Exit Code: 305"
#: seconds between a refused SuperNode's exit and its next start
ACTIVATION_RETRY_S = 5.0
#: what Flower prints when its connection retries give up for good because an error's text
#: names SSL (``flwr.supercore.retry.http_retry``): a SuperLink killed mid-connection reads
#: as "UNEXPECTED_EOF_WHILE_READING (_ssl.c)", so after a SuperLink restart the SuperNode
#: lives on without heartbeats and is never again online
GAVE_UP_LINE = "SSL/TLS handshake error detected."

#: Flower error code for a reply the worker could not compute (ClientApp raised)
WORKER_ERROR_CODE = 0


#: an absolute path on the site's machine (not a ratio such as C/nan: no word character before)
_LOCAL_PATH = re.compile(r"(?<![\w.~\-])/(?:[\w.+@~\-]+/)*[\w.+@~\-]+")


def without_local_paths(text: str) -> str:
    """``text`` with every absolute path replaced: an error the server reads must not name the
    site's folders (its user's home, its data's layout); the site's own log keeps them."""
    return _LOCAL_PATH.sub("<path at the site>", text)


def agreement_id(cfg: RunConfig) -> str:
    """The run id of ``cfg`` without machine-local paths (data root, cache, device, a PACS's
    address).

    Two parties with the same agreement id run the same model, rounds, local steps, seed and
    privacy target; only where each keeps its files (and which device it computes on) differs.
    """
    dataset = {"root": None, "cache_dir": None}
    if cfg.dataset.name == "pacs":  # each site's own PACS: its address is machine-local
        dataset["options"] = {k: v for k, v in dict(cfg.dataset.options).items()
                              if k != "url"}
    local = cfg.model_copy(update={
        "dataset": cfg.dataset.model_copy(update=dataset),
        "training": cfg.training.model_copy(update={"device": "cpu"})})
    return local.run_id()


class TrainedRuns:
    """The Flower runs in which this site has been asked to train or to score a model on its
    held-out subjects: an append-only file.

    A run's DP accountant lives in the worker's memory. Were that state lost (the worker
    restarted, or the run dropped to make room for others), a fresh one would count the run's
    steps from zero: the site would report less ε than it spent and could train past the steps
    its σ was calibrated for (or score more models than a run gives). So every run is written
    here (and synced) before its first training or evaluation message is answered, and a run
    found here without state is refused.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.ids: set[int] = set()
        if path is not None and path.exists():
            self.ids = {int(line) for line in path.read_text().split()}

    def __contains__(self, run_id: int) -> bool:
        return run_id in self.ids

    def add(self, run_id: int) -> None:
        if run_id in self.ids:
            return
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(f"{run_id}\n")
                f.flush()
                os.fsync(f.fileno())
        self.ids.add(run_id)


#: environment variable naming the folder of a site's state (its ledger and trained runs)
SITE_STATE_ENV = "PRIVSEG_SITE_STATE"


def site_state_dir(state_dir: Path | str | None = None) -> Path:
    """The folder of this machine's site state: ``state_dir`` (the operator's
    ``--state-dir``), else ``$PRIVSEG_SITE_STATE``, else ``$XDG_STATE_HOME/privseg`` (default
    ``~/.local/state/privseg``).

    Not beside the data cache, as it was: the cache dir is a key of each run config, so a
    config naming another cache dir would have opened a fresh, empty ledger and spent the
    site's budget again."""
    if state_dir is not None:
        return Path(state_dir)
    if os.environ.get(SITE_STATE_ENV):
        return Path(os.environ[SITE_STATE_ENV])
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "privseg"


def trained_runs_path(site: str, state_dir: Path | str | None = None) -> Path:
    """Where a site's :class:`TrainedRuns` file lives (:func:`site_state_dir`)."""
    return site_state_dir(state_dir) / "site-runs" / f"{site}.runs"


def ledger_path(site: str, state_dir: Path | str | None = None) -> Path:
    """Where a site's privacy ledger (:class:`privseg.dp.ledger.SiteLedger`) lives."""
    return site_state_dir(state_dir) / "site-ledger" / f"{site}.jsonl"


def refuse_moved_state(configs: list[RunConfig], site: str,
                       state_dir: Path | str | None = None) -> None:
    """Refuse to start while a ledger or trained-runs file of ``site`` lies where privseg
    kept them before (beside a config's data cache) but not where it keeps them now: starting
    would open an empty ledger and forget what the site has spent."""
    from privseg.training.setup import default_cache_dir

    for cfg in configs:
        cache = Path(cfg.dataset.cache_dir) if cfg.dataset.cache_dir else default_cache_dir()
        for old, new in ((cache / "site-ledger" / f"{site}.jsonl", ledger_path(site, state_dir)),
                         (cache / "site-runs" / f"{site}.runs",
                          trained_runs_path(site, state_dir))):
            if old.exists() and not new.exists():
                raise ConfigError(
                    f"site {site}: {old} holds this site's privacy state, which now lives in "
                    f"{new} (--state-dir / ${SITE_STATE_ENV}); move it there before starting")


def run_spend(cfg: RunConfig, client: SiteClient, n_sites: int) -> Spend:
    """What one run may spend on this site's data, from its plan (all planned steps; SVT:
    all planned rounds at ε per round, local DP per site update, δ 0)."""
    p, fed = cfg.privacy, cfg.setting.federated
    if not p.enabled or fed.dp_mode == "none":
        return Spend(0.0, 1.0, 1, 0.0, "none (non-private: ε = ∞)")
    if fed.dp_mode == "svt":  # pure ε: a site answers at most once per round, every round
        return Spend.pure(svt_epsilon_per_round(cfg), fed.rounds, "svt")
    if fed.dp_mode == "sample":
        plan = client.plan
        return Spend(plan.noise_multiplier, plan.sample_rate, plan.steps, plan.delta)
    size = sum(w.size for w in get_weights(client.state.model))  # the server's model_size
    d = site_level_plan(cfg, n_sites, size)
    return Spend(d["noise_multiplier_effective"], d["sample_rate"], d["rounds"], d["delta"],
                 "site")


@dataclass
class SiteRun:
    """A site's state in one Flower run: its client, ClientApp and SecAgg+ random stream."""

    client: SiteClient
    app: ClientApp
    np_state: tuple


class SiteWorker:
    """One site's long-lived worker: answers the SuperNode's messages with its SiteClient.

    A site may agree to several run configs (studies); a run must carry one of them. Messages
    are handled one at a time (a lock), so concurrent runs each see their own random streams
    swapped in, as sites sharing one simulation process do.
    """

    def __init__(self, site: str, agreed: dict[str, tuple[RunConfig, SiteData, object]],
                 keep_runs: int = 4, trained: TrainedRuns | None = None,
                 ledger: SiteLedger | None = None):
        self.site = site
        #: every run trained on this site's data, composed; refuses runs past the budget
        self.ledger = ledger
        #: agreement id -> (the site's config, its data under that config, the subject set)
        self.agreed = agreed
        self.runs: OrderedDict[int, SiteRun] = OrderedDict()
        self.keep_runs = keep_runs
        self.trained = trained if trained is not None else TrainedRuns(None)
        self.lock = threading.Lock()

    @classmethod
    def load(cls, configs: list[RunConfig], site: str, data_root: str | None = None,
             budget_epsilon: float | None = None, budget_delta: float = MAX_DEFAULT_DELTA,
             allow_reproducible_noise: bool = False,
             state_dir: Path | str | None = None, trust_server: bool = False) -> SiteWorker:
        """Load the site's data (``data_root`` or ``dataset.root``) for every agreed config.

        A config whose DP noise is replayable (``privacy.noise_seed``) is refused: a deployed
        site's noise must be its own secret (``allow_reproducible_noise``: the operator's
        explicit opt-in, for loopback tests and benchmark deployments). The site's ledger
        (:func:`ledger_path` in ``state_dir``, see :func:`site_state_dir`) holds the
        operator's budget; ``trust_server``: the operator lets site-level DP runs (the server
        sees raw updates) count against it (see :mod:`privseg.dp.ledger`)."""
        refuse_moved_state(configs, site, state_dir)
        for cfg in configs:
            if not allow_reproducible_noise:
                refuse_replayable_noise(cfg, f"site {site}")
        from privseg.datasets import load_dataset
        from privseg.training.setup import default_cache_dir

        agreed = {}
        for cfg in configs:
            d = cfg.dataset
            root = data_root if data_root is not None else d.root
            subject_set = load_dataset(d.name, d.options, root, Path(d.cache_dir)
                                       if d.cache_dir else default_cache_dir())
            data = build_site(cfg, subject_set, site)
            agreed[agreement_id(cfg)] = (cfg, data, subject_set)
            log.info("site %s: run config %s (%s): %s subjects (train/val/test)", site,
                     cfg.name, agreement_id(cfg), data.counts())
        ledger = SiteLedger(ledger_path(site, state_dir), budget_epsilon, budget_delta,
                            trusted_server=trust_server)
        log.info("site %s: %s", site, ledger.report().splitlines()[-1])
        return cls(site, agreed, trained=TrainedRuns(trained_runs_path(site, state_dir)),
                   ledger=ledger)

    def _site_run(self, context: Context, spends: bool = False) -> SiteRun:
        """The run's state (made on its first message). ``spends``: a message that uses the
        site's data (training, or scoring a model on its held-out subjects): the run's first
        is charged to the ledger and recorded first. Charging at an evaluation too keeps runs
        that only score models from costing nothing (each run's client caps its scorings);
        a site not yet drawn to train is charged early, never less."""
        run = self.runs.get(context.run_id)
        if run is not None:
            self.runs.move_to_end(context.run_id)
        else:
            run = self._join(context)
        if spends and context.run_id not in self.trained:
            if self.ledger is not None:
                cfg = run.client.cfg
                subject_set = self.agreed[agreement_id(cfg)][2]
                n_sites = len(set(partition(cfg, subject_set)[0].values()))
                total = self.ledger.charge(context.run_id, agreement_id(cfg),
                                           run_spend(cfg, run.client, n_sites))
                log.info("site %s: run %s charged to the ledger; composed ε = %.4g",
                         self.site, context.run_id, total)
            self.trained.add(context.run_id)
        return run

    def _join(self, context: Context) -> SiteRun:
        if context.run_id in self.trained:
            raise RuntimeError(
                f"site {self.site} has trained in run {context.run_id} before but holds no "
                "state for it (the worker restarted, or the run was dropped for newer ones): "
                "its privacy accountant would count from zero and under-report ε; refusing. "
                f"Trained runs are listed in {self.trained.path}")
        federation = parse_config_json(str(context.run_config.get(CONFIG_KEY, "")))
        aid = agreement_id(federation)
        if aid not in self.agreed:
            raise ConfigError(
                f"site {self.site}: the federation's run config (agreement id {aid}) is not "
                f"one this site agreed to ({', '.join(self.agreed)}); refusing to train")
        cfg, data, subject_set = self.agreed[aid]
        fed = cfg.setting.federated
        client = SiteClient(cfg, data, subject_set)
        app = site_app({context.node_id: client},
                       fed.secagg_clipping_range if fed.secure_aggregation else None)
        run = SiteRun(client, app, secagg_rounding_state(cfg, self.site))  # as InProcessGrid
        self.runs[context.run_id] = run
        while len(self.runs) > self.keep_runs:
            self._drop_one(keep=context.run_id)
        log.info("site %s: joined run %s", self.site, context.run_id)
        return run

    def _drop_one(self, keep: int) -> None:
        """Make room for run ``keep``: drop a run that never trained here, else the least
        recently used one (which is then refused if it comes back: see :class:`TrainedRuns`)."""
        others = [rid for rid in self.runs if rid != keep]
        victim = next((rid for rid in others if rid not in self.trained), others[0])
        if victim in self.trained:
            log.warning("site %s: dropping the state of run %s to serve newer runs; that run "
                        "can no longer train at this site", self.site, victim)
        del self.runs[victim]

    def handle(self, msg: Message, context: Context) -> Message:
        """Answer one message (Flower's ``ClientApp`` call) with this site's state."""
        log.info("site %s: run %s: %s message of round %s", self.site, context.run_id,
                 msg.metadata.message_type, msg.metadata.group_id or "-")
        with self.lock:
            try:
                run = self._site_run(context, spends=msg.metadata.message_type in (
                    MessageType.TRAIN, MessageType.EVALUATE))
                outer = np.random.get_state()
                np.random.set_state(run.np_state)
                try:
                    return run.app(msg, context)
                finally:
                    run.np_state = np.random.get_state()
                    np.random.set_state(outer)
            except Exception as e:  # noqa: BLE001 - the server must learn that the site failed
                log.error("site %s: %s", self.site, traceback.format_exc())
                reason = without_local_paths(f"{type(e).__name__}: {e}")
                return Message(Error(code=WORKER_ERROR_CODE, reason=f"site {self.site}: {reason}"),
                               reply_to=msg)

    def serve(self, listener: Listener) -> None:
        """Answer connections from the ClientApp processes until the listener is closed."""
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError):
                return  # closed
            except Exception:  # noqa: BLE001 - a bad handshake must not stop the worker
                log.warning("site %s: refused a worker connection", self.site)
                continue
            with conn:
                try:
                    msg = serde.message_from_proto(ProtoMessage.FromString(conn.recv_bytes()))
                    context = serde.context_from_proto(ProtoContext.FromString(
                        conn.recv_bytes()))
                    reply = self.handle(msg, context)
                    conn.send_bytes(serde.message_to_proto(reply).SerializeToString())
                    conn.send_bytes(serde.context_to_proto(context).SerializeToString())
                except (OSError, EOFError) as e:
                    log.warning("site %s: worker connection dropped: %s", self.site, e)


def parse_config_json(text: str) -> RunConfig:
    """The federation's run config from the ServerApp's run config (JSON)."""
    import json

    if not text:
        raise ConfigError(f"the run carries no {CONFIG_KEY!r}: start it with "
                          "`privseg federated run`")
    return parse_config(json.loads(text))


def supernode_command(superlink: str, socket_path: Path, site: str,
                      root_certificates: Path | None, auth_key: Path | None,
                      runtime_port: int | None, max_wait: float | None) -> list[str]:
    """The ``flower-supernode`` command line for this site (TLS unless no CA certificate)."""
    cmd = [flower_command("flower-supernode"), "--superlink", superlink,
           "--node-config", f'{WORKER_KEY}="{socket_path}" {SITE_KEY}="{site}"']
    cmd += ["--root-certificates", str(root_certificates)] if root_certificates else [
        "--insecure"]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    if runtime_port is not None:
        cmd += ["--port", str(runtime_port)]
    if max_wait is not None:
        cmd += ["--max-wait-time", str(max_wait)]
    return cmd


def _pass_on(stream, refused: threading.Event, gave_up: threading.Event) -> None:
    """Copy the SuperNode's output to ours; set ``refused`` on Flower's refusal line and
    ``gave_up`` when its connection retries gave up (:data:`GAVE_UP_LINE`)."""
    for line in stream:
        print(line, end="", flush=True)
        if REFUSED_LINE in line:
            refused.set()
        if GAVE_UP_LINE in line:
            gave_up.set()


def serve_site(configs: list[RunConfig], site: str, superlink: str, data_root: str | None = None,
               root_certificates: Path | None = None, auth_key: Path | None = None,
               runtime_port: int | None = None, max_wait: float | None = None,
               budget_epsilon: float | None = None, budget_delta: float = MAX_DEFAULT_DELTA,
               allow_reproducible_noise: bool = False,
               state_dir: Path | str | None = None, trust_server: bool = False) -> int:
    """Serve one site to a SuperLink until its SuperNode exits; return the SuperNode's code.

    Data never leave this machine: the worker answers only through the ``ClientApp`` (model
    parameters, subject counts, aggregate metrics). The worker's socket sits in a fresh
    directory only this user can enter, behind a random shared secret (file mode 0600).

    A SuperNode that exits because the SuperLink refused it (a restarted node's re-activation
    is refused until its heartbeat expires; a SuperLink restarting), or that gave up its
    connection for good (:data:`GAVE_UP_LINE`: the SuperLink was killed), is started again,
    same key, every :data:`ACTIVATION_RETRY_S` seconds until ``max_wait`` seconds have passed
    (no ``max_wait``: no retry). The worker, its ledger and its accountants live on across
    the restarts.
    """
    if root_certificates is None and auth_key is not None:
        raise ConfigError("node authentication (--auth-key) needs TLS (--ca-cert): Flower "
                          "refuses SuperNode authentication over an insecure channel")
    worker = SiteWorker.load(configs, site, data_root, budget_epsilon, budget_delta,
                             allow_reproducible_noise, state_dir, trust_server)
    sock_dir = Path(tempfile.mkdtemp(prefix="privseg-site-"))  # mode 0700
    socket_path = sock_dir / "worker.sock"
    key_path = worker_authkey_path(socket_path)
    authkey = os.urandom(32)
    key_path.touch(mode=0o600)
    key_path.write_bytes(authkey)
    listener = Listener(str(socket_path), family="AF_UNIX", authkey=authkey)
    threading.Thread(target=worker.serve, args=(listener,), daemon=True).start()
    cmd = supernode_command(superlink, socket_path, site, root_certificates, auth_key,
                            runtime_port, max_wait)
    # Flower's SuperExec looks for new ClientApp tasks every second by default; a site answers
    # several messages per round (SecAgg+: four), so look every 0.1 s.
    env = flower_env()
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    # privseg's ClientApp only, whatever App bundle a run names (privseg.federated.pinned_clientapp)
    env["PATH"] = os.pathsep.join([str(install_shim(sock_dir)), env["PATH"]])
    deadline = time.monotonic() + (max_wait or 0.0)

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    proc = None
    try:
        while True:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,  # noqa: S603
                                    stderr=subprocess.STDOUT, text=True, errors="replace")
            refused, gave_up = threading.Event(), threading.Event()
            # passed on as it comes, the refusal recognised; in a thread: the SuperNode's own
            # children (its SuperExec) may hold the pipe open after it exited
            reader = threading.Thread(target=_pass_on, args=(proc.stdout, refused, gave_up),
                                      daemon=True)
            reader.start()
            while proc.poll() is None:
                if gave_up.wait(0.5):  # alive but disconnected for good: start it afresh
                    log.warning("site %s: the SuperNode lost the SuperLink and stopped "
                                "retrying; restarting it", site)
                    stop_process(proc)
            code = proc.wait()
            reader.join(timeout=1.0)
            log.info("site %s: SuperNode exited with code %s", site, code)
            if not (refused.is_set() or gave_up.is_set()
                    or code == SUPERNODE_CONNECTION_ERROR) or time.monotonic() >= deadline:
                return code
            log.warning("site %s: the SuperLink refused or lost this SuperNode (exit %d); "
                        "starting it again in %g s (until --max-wait)", site, code,
                        ACTIVATION_RETRY_S)
            time.sleep(min(ACTIVATION_RETRY_S, max(0.0, deadline - time.monotonic())))
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc is not None:
            stop_process(proc)
        listener.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
