"""``privseg federated testbed``: a whole federation on this machine, over shaped links.

One SuperLink (TLS, node authentication, its own database), one SuperNode per site (``privseg
federated supernode``), each site in its own network namespace where the machine allows it
(:mod:`privseg.federated.netns`), joined to the SuperLink through a userspace relay per site
(:mod:`privseg.federated.relay`) that shapes what the kernel does not and counts the bytes
really crossing the link. The federated config is submitted as an operator would
(:func:`privseg.federated.federation.run_federation`); faults are injected on the live
processes (:class:`Fault`); the run's record gets a ``links`` section (bytes up/down and times
per round per site, measured at the relay) and a ``testbed`` section (mechanism, profiles,
faults injected). Everything started is stopped on exit, on an error and on Ctrl-C/SIGTERM:
processes (whole process groups), relays, namespaces.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from privseg.config import ConfigError, LinkProfile, RunConfig
from privseg.federated import netns
from privseg.federated.certs import make_certificates
from privseg.federated.deadline import checked_round_timeout
from privseg.federated.federation import flower_command, flower_env, run_federation
from privseg.federated.relay import LinkRelay, Shaping
from privseg.record import read_any_record, run_dir, write_record

FAULT_KINDS = ("kill", "restart", "linkdown", "straggle", "superlink")
FAULT_SYNTAX = ("KIND[:SITE]@ROUND[+SECONDS], KIND one of kill (kill -9 the site's SuperNode "
                "and its worker), restart (kill -9, start again after SECONDS, same key and "
                "cache), linkdown (the site's link down for SECONDS), straggle (the site's "
                "answers held back SECONDS), superlink (kill -9 the SuperLink, restart it on "
                "its database after SECONDS)")
#: a site worker's log line for each message it answers (privseg.federated.supernode)
ROUND_LINE = re.compile(r"site (\S+): run \d+: (\S+) message of round (\d+)")
CLI = [sys.executable, "-c", "from privseg.cli import main; main()", "federated"]


@dataclass(frozen=True)
class Fault:
    """A fault injected when ``site`` (any site for ``superlink``) gets round ``round``'s
    training message."""

    kind: str
    round: int
    site: str | None = None
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Fault:
        """``kill:site-B@2``, ``restart:site-B@2+60``, ``linkdown:site-B@2+20``,
        ``straggle:site-C@2+40``, ``superlink@2+5``."""
        m = re.fullmatch(r"(\w+)(?::([\w.-]+))?@(\d+)(?:\+([\d.]+))?", text.strip())
        if m is None or m.group(1) not in FAULT_KINDS:
            raise ConfigError(f"--fault {text!r}: expected {FAULT_SYNTAX}")
        kind, site, rnd, secs = m.group(1), m.group(2), int(m.group(3)), float(m.group(4) or 0)
        if (kind == "superlink") != (site is None):
            what = "superlink takes no SITE" if site else f"{kind} needs a SITE"
            raise ConfigError(f"--fault {text!r}: {what}")
        if kind in ("linkdown", "straggle") and secs <= 0:
            raise ConfigError(f"--fault {text!r}: {kind} needs +SECONDS > 0")
        return cls(kind, rnd, site, secs)


def site_profiles(cfg: RunConfig, sites: list[str]) -> dict[str, LinkProfile]:
    """Each site's link profile: ``setting.federated.links.<site>``, else ``.default``, else
    an ideal link. A profile naming no site of the federation is an error naming its key."""
    links = cfg.setting.federated.links or {}
    unknown = sorted(set(links) - set(sites) - {"default"})
    if unknown:
        raise ConfigError(f"setting.federated.links.{unknown[0]}: no such site (sites: "
                          f"{', '.join(sites)}; or 'default')")
    default = links.get("default", LinkProfile())
    return {s: links.get(s, default) for s in sites}


def relay_shaping(profile: LinkProfile, caps: netns.Capabilities) -> Shaping:
    """What the relay must add to a link on top of what the kernel shapes."""
    kernel_rate = caps.netns and (caps.netem or caps.tbf)
    return Shaping(
        delay_s=0.0 if caps.netns and caps.netem else profile.latency_ms / 1000.0,
        rate_bytes_s=None if kernel_rate or not profile.bandwidth_mbit
        else profile.bandwidth_mbit * 1e6 / 8,
        loss=0.0 if caps.netns and caps.netem else profile.loss)


def mechanism_line(caps: netns.Capabilities, profiles: dict[str, LinkProfile]) -> str:
    """The one line the testbed prints: which mechanism shapes what."""
    ps = list(profiles.values())
    if not any(p.shaped() for p in ps):
        where = "network namespaces" if caps.netns else "loopback"
        return f"links unshaped (no profile in setting.federated.links); sites in {where}"
    return caps.mechanism(any(p.latency_ms for p in ps), any(p.bandwidth_mbit for p in ps),
                          any(p.loss for p in ps))


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (from ``/proc``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def processes_under(folder: Path) -> list[int]:
    """Living processes whose command line names ``folder``, and all their descendants
    (neither this process nor its ancestors)."""
    mark = str(folder).encode()
    mine = {os.getpid()}  # this process and its ancestors (a shell that named the folder)
    pid = os.getpid()
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
        mine.add(pid)
    found = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if mark in p.read_bytes() and int(p.parent.name) not in mine:
                found.append(int(p.parent.name))
        except OSError:
            continue
    return sorted({d for pid in found for d in (pid, *descendants(pid))})


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to ``proc``'s process group (it was started in a session of its own)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@dataclass
class Site:
    """One site of the testbed: its namespace (or None), relay, SuperNode command and process."""

    name: str
    profile: LinkProfile
    relay: LinkRelay
    address: str
    ns: netns.SiteNamespace | None = None
    cmd: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None


class Testbed:
    """The processes, namespaces and relays of one testbed federation (a context manager)."""

    def __init__(self, cfg: RunConfig, config_path: Path, sites: list[str], workdir: Path,
                 use_netns: bool = True, max_wait: float = 300.0, log=print,
                 pacs: bool = False):
        self.cfg = cfg
        #: each site reads its subjects from its own Orthanc (the data set uploaded into it)
        self.pacs = pacs
        #: the config submitted to the federation (the pacs variant with ``pacs``)
        self.federation_cfg = cfg
        self.config_path = Path(config_path)
        self.names = sites
        self.work = Path(workdir)
        self.max_wait = max_wait
        self.log = log
        self.caps = netns.capabilities() if use_netns else netns.Capabilities(
            False, False, False, "--no-netns")
        self.profiles = site_profiles(cfg, sites)
        self.tag = f"{os.getpid() % 100000:05d}"
        self.sites: dict[str, Site] = {}
        self.procs: list[subprocess.Popen] = []
        self.superlink: subprocess.Popen | None = None
        self.port = 0
        self.events: list[dict] = []
        self._timers: list[threading.Timer] = []
        self.certs = self.work / "certs"
        self._before = set(descendants(os.getpid()))
        self.operator = self.work / "home-operator"

    # -- processes ---------------------------------------------------------------------------
    def _start(self, name: str, cmd: list[str], home: Path) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        env = flower_env(FLWR_HOME=str(home), OMP_NUM_THREADS=os.environ.get(
            "OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
        with open(self.work / f"{name}.log", "a") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.work, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _superlink_cmd(self) -> list[str]:
        c = self.certs
        return [flower_command("flower-superlink"), "--ssl-ca-certfile", str(c / "ca.crt"),
                "--ssl-certfile", str(c / "server.pem"), "--ssl-keyfile", str(c / "server.key"),
                "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(self.work / "superlink.db"),
                # the ServerApp's SuperExec runs on its own (start_superexec), not as the
                # SuperLink's child: in Flower's default subprocess isolation it watches its
                # parent and stops (taking the ServerApp with it) when the SuperLink dies
                "--isolation", "process"]

    def start_superexec(self) -> None:
        """Flower's SuperExec for ServerApps (``flower-superexec``), outside the SuperLink's
        process tree, so that a ServerApp outlives a SuperLink restart."""
        self._start("superexec", [
            flower_command("flower-superexec"), "--runtime-api-address",
            f"127.0.0.1:{self.port}", "--root-certificates", str(self.certs / "ca.crt")],
            self.work / "home-superexec")

    def start_superlink(self) -> None:
        """Start (or restart, on the same database) the SuperLink; wait until it listens."""
        self.superlink = self._start("superlink", self._superlink_cmd(), self.work / "home-link")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise RuntimeError("the SuperLink exited; log "
                                   f"{self.work / 'superlink.log'}:\n"
                                   + (self.work / "superlink.log").read_text()[-2000:])
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the SuperLink did not listen on 127.0.0.1:{self.port} in 60 s")

    def start_site(self, site: Site) -> None:
        """Start (or restart: same key, cache and ledger) the site's SuperNode."""
        site.proc = self._start(f"site-{site.name}", site.cmd, self.work / f"home-{site.name}")

    def check_sites(self, faulted: set[str]) -> None:
        """Raise if a site's SuperNode exited on its own (not killed by a fault in
        ``faulted``): a site that refuses to start (a bad config, a ledger to move, a budget)
        would otherwise leave the run waiting for it until the round deadline."""
        for site in self.sites.values():
            if site.name in faulted or site.proc is None or site.proc.poll() is None:
                continue
            log = self.work / f"site-{site.name}.log"
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise RuntimeError(f"site {site.name}'s SuperNode exited ({site.proc.returncode}) "
                               f"during the run; {log} ends:\n{tail}")

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Testbed:
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _up(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        blocks = sorted(set(range(1, 255)) - netns.used_blocks()) if self.caps.netns else []
        for i, name in enumerate(self.names):
            ns = None
            if self.caps.netns:
                ns = netns.create_site_namespace(self.tag, i, blocks[i])
                p = self.profiles[name]
                netns.shape_kernel(ns, self.caps, p.latency_ms, p.bandwidth_mbit, p.loss)
            host = ns.host_addr if ns else "127.0.0.1"
            relay = LinkRelay((host, 0), ("127.0.0.1", 0),
                              relay_shaping(self.profiles[name], self.caps))
            self.sites[name] = Site(name, self.profiles[name], relay, host, ns)
        make_certificates(self.certs, self.names,
                          ["127.0.0.1"] + [s.address for s in self.sites.values() if s.ns])
        self.port = free_port()
        self.start_superlink()
        self.start_superexec()
        self._register_keys()
        site_configs = self._start_pacs() if self.pacs else {}
        for site in self.sites.values():
            site.relay.target = ("127.0.0.1", self.port)
            port = site.relay.start()
            site.cmd = self._supernode_cmd(site, f"{site.address}:{port}",
                                           site_configs.get(site.name, self.config_path))
            self.start_site(site)

    def _start_pacs(self, timeout: float = 180.0) -> dict[str, Path]:
        """One Orthanc per site (in its namespace) holding the data set; each site's config
        file reads it back over DICOMweb. Sets :attr:`federation_cfg` to the pacs variant."""
        import json

        import yaml

        from privseg.config import parse_config
        from privseg.federated.site_pacs import pacs_dataset
        from privseg.training.setup import default_cache_dir

        d = self.cfg.dataset
        cache = str(Path(d.cache_dir) if d.cache_dir else default_cache_dir())
        procs = {}
        for site in self.sites.values():
            folder = self.work / f"pacs-{site.name}"
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "privseg.federated.site_pacs", str(folder), d.name,
                   json.dumps(dict(d.options)), cache]
            procs[site.name] = self._start(
                f"pacs-{site.name}", (site.ns.exec_prefix() if site.ns else []) + cmd,
                folder / "home")
        configs, base = {}, self.cfg.model_dump(mode="json")
        deadline = time.monotonic() + timeout
        for site in self.sites.values():
            url = self.work / f"pacs-{site.name}" / "url"
            while not url.exists():
                if time.monotonic() > deadline or procs[site.name].poll() is not None:
                    raise RuntimeError(f"{site.name}'s PACS did not start; log "
                                       f"{self.work / f'pacs-{site.name}.log'}")
                time.sleep(0.2)
            site_cfg = {**base, "dataset": pacs_dataset(base["dataset"], url.read_text())}
            configs[site.name] = self.work / f"config-{site.name}.yaml"
            configs[site.name].write_text(yaml.safe_dump(site_cfg, sort_keys=False))
            self.federation_cfg = parse_config(site_cfg)
        self._note("one Orthanc per site holding the data set; sites read it over DICOMweb")
        return configs

    def _register_keys(self) -> None:
        from privseg.federated.federation import connection_toml

        self.operator.mkdir(parents=True, exist_ok=True)
        (self.operator / "config.toml").write_text(connection_toml(
            f"127.0.0.1:{self.port}", self.certs / "ca.crt"))
        for s in self.names:
            r = subprocess.run([flower_command("flwr"), "supernode", "register",
                                str(self.certs / f"site-{s}.pub"), "privseg", "--name", s],
                               capture_output=True, text=True, timeout=120,
                               env=flower_env(FLWR_HOME=str(self.operator)))
            if r.returncode != 0:
                raise RuntimeError(f"registering {s}'s key failed:\n{r.stdout}{r.stderr}")

    def _supernode_cmd(self, site: Site, superlink: str, config: Path) -> list[str]:
        cmd = CLI + ["supernode", str(config), "--site", site.name,
                     "--superlink", superlink, "--ca-cert", str(self.certs / "ca.crt"),
                     "--auth-key", str(self.certs / f"site-{site.name}"),
                     "--max-wait", str(self.max_wait),
                     # emulated sites: their ledgers are the testbed's, not this machine's
                     "--state-dir", str(self.work / "site-state")]
        if site.ns is None:
            cmd += ["--runtime-port", str(free_port())]
        if self.cfg.privacy.noise_seed is not None:
            cmd.append("--allow-reproducible-noise")
        return (site.ns.exec_prefix() if site.ns else []) + cmd

    def close(self) -> None:
        """Stop everything this testbed started; leaves no process, namespace or relay."""
        for t in self._timers:
            t.cancel()
        for p in self.procs:
            if p.poll() is None:
                signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            signal_group(p, signal.SIGKILL)  # stragglers in the group (superexec, clientapps)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for pid in set(descendants(os.getpid())) - self._before:  # `flwr run` (a thread's)
            try:
                if b"flwr" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, FileNotFoundError):
                pass
        # what Flower started in sessions of its own (the SuperLink's SuperExec and its
        # ServerApp outlive a SuperLink stopped mid-run), found by this testbed's folder
        for pid in processes_under(self.work):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for site in self.sites.values():
            site.relay.stop()
            if site.ns is not None:
                netns.delete_namespace(site.ns)

    # -- faults ------------------------------------------------------------------------------
    def _note(self, what: str, **info) -> None:
        self.events.append({"t": time.time(), "what": what, **info})
        self.log(f"testbed: {what}")

    def schedule_downtimes(self) -> None:
        """The ``down`` windows of the profiles, from now (the run's submission)."""
        for site in self.sites.values():
            for w in site.profile.down:
                def down(site=site, w=w):
                    site.relay.set_down(w.for_s)
                    self._note(f"link of {site.name} down for {w.for_s:g} s (profile)",
                               site=site.name)
                t = threading.Timer(w.at_s, down)
                t.daemon = True
                t.start()
                self._timers.append(t)

    def rounds_seen(self) -> dict[str, int]:
        """The latest training round each site's worker was asked for, from its log."""
        seen: dict[str, int] = {}
        for name in self.names:
            log = self.work / f"site-{name}.log"
            if not log.exists():
                continue
            for m in ROUND_LINE.finditer(log.read_text(errors="replace")):
                if m.group(2) == "train":
                    seen[name] = max(seen.get(name, 0), int(m.group(3)))
        return seen

    def inject(self, fault: Fault) -> None:
        """Do ``fault`` now (on the live processes and links)."""
        if fault.kind == "superlink":
            self.superlink.send_signal(signal.SIGKILL)  # the SuperLink only: its ServerApp
            self.superlink.wait()                      # and the sites live on
            self._note(f"SuperLink killed (kill -9) in round {fault.round}")
            time.sleep(fault.seconds)
            self.start_superlink()
            self._note(f"SuperLink restarted on its database after {fault.seconds:g} s")
            return
        site = self.sites[fault.site]
        if fault.kind in ("kill", "restart"):
            signal_group(site.proc, signal.SIGKILL)
            site.proc.wait()
            self._note(f"{site.name} killed (kill -9) in round {fault.round}", site=site.name)
            if fault.kind == "restart":
                time.sleep(fault.seconds)
                self.start_site(site)
                self._note(f"{site.name} restarted after {fault.seconds:g} s (same key, "
                           "cache and ledger)", site=site.name)
        elif fault.kind == "linkdown":
            site.relay.set_down(fault.seconds)
            self._note(f"link of {site.name} down for {fault.seconds:g} s in round "
                       f"{fault.round}", site=site.name)
        elif fault.kind == "straggle":
            site.relay.stall("up", fault.seconds)
            self._note(f"{site.name}'s answers held back {fault.seconds:g} s in round "
                       f"{fault.round} (a straggler)", site=site.name)

    def watch(self, faults: list[Fault], done: threading.Event, poll_s: float = 0.05) -> None:
        """Inject each fault when its round's training message reaches its site."""
        todo = list(faults)
        unknown = [f.site for f in todo if f.site is not None and f.site not in self.sites]
        if unknown:
            raise ConfigError(f"--fault: no site {unknown[0]!r} (sites: {', '.join(self.names)})")
        while todo and not done.is_set():
            seen = self.rounds_seen()
            for f in list(todo):
                at = seen.get(f.site, 0) if f.site else max(seen.values(), default=0)
                if at >= f.round:
                    todo.remove(f)
                    self.inject(f)
            time.sleep(poll_s)

    # -- the record's link measurements ---------------------------------------------------
    def links_section(self, record: dict, mechanism: str) -> dict:
        """Per round and site: bytes up/down on the wire (counted at the relay) and the time
        from the round's start until the site's last byte up (its answer arrived)."""
        rounds = []
        for h in record.get("history", []):
            t0, t1 = h.get("started_at"), h.get("ended_at")
            if t0 is None or t1 is None:
                continue
            per_site = {}
            for name, site in self.sites.items():
                tr = site.relay.traffic(t0, t1)
                per_site[name] = {
                    "bytes_up": tr["bytes_up"], "bytes_down": tr["bytes_down"],
                    "last_up_s": None if tr["last_up"] is None else tr["last_up"] - t0}
            rounds.append({"round": h["round"], "wall_s": t1 - t0, "sites": per_site})
            h["links"] = per_site
        totals = {name: {k: v for k, v in site.relay.traffic(0.0, float("inf")).items()
                         if k.startswith("bytes")} | {"refused_connections": site.relay.refused}
                  for name, site in self.sites.items()}
        return {"measured_at": "userspace relay between each SuperNode and the SuperLink "
                               "(TCP payload bytes: gRPC, HTTP/2 and TLS included; TCP/IP "
                               "headers not)",
                "mechanism": mechanism,
                "profiles": {n: p.model_dump(mode="json") for n, p in self.profiles.items()},
                "relay_shaping": {n: s.relay.shaping.describe()
                                  for n, s in self.sites.items()},
                "per_round": rounds, "total": totals,
                "transfers": {n: s.relay.transfer_log() for n, s in self.sites.items()}}


def run_testbed(cfg: RunConfig, config_path: Path, n_sites: int, workdir: Path, *,
                faults: list[Fault] = (), use_netns: bool = True,
                round_timeout: float | None = None, max_wait: float = 300.0,
                lost_wait: float = 600.0, output_dir: Path | None = None,
                log=print, pacs: bool = False) -> dict:
    """Run ``cfg`` on a testbed federation of ``n_sites``; return the record (links included).

    The record is read back whatever the run's outcome: a failed run's record (what was spent)
    also gets its ``links`` and ``testbed`` sections; then the failure is raised
    (``RuntimeError``) as :func:`run_federation` reports it.
    """
    from privseg.datasets import load_dataset
    from privseg.federated.sites import partition
    from privseg.training.setup import default_cache_dir

    round_timeout = checked_round_timeout(round_timeout)
    d = cfg.dataset
    subject_set = load_dataset(d.name, d.options, d.root,
                               Path(d.cache_dir) if d.cache_dir else default_cache_dir())
    names = sorted(set(partition(cfg, subject_set)[0].values()))
    if len(names) != n_sites:
        raise ConfigError(f"--sites {n_sites}: the config's partition makes {len(names)} "
                          f"sites ({', '.join(names)})")
    output = Path(output_dir or cfg.output.dir).resolve()
    with Testbed(cfg, config_path, names, workdir, use_netns, max_wait, log, pacs) as tb:
        cfg = tb.federation_cfg
        mechanism = mechanism_line(tb.caps, tb.profiles)
        log(mechanism)
        done = threading.Event()
        outcome: dict = {}

        def submit() -> None:
            try:
                outcome["record"] = run_federation(
                    cfg, n_sites, superlink=f"127.0.0.1:{tb.port}",
                    root_certificates=tb.certs / "ca.crt", output_dir=output,
                    round_timeout=round_timeout, log_path=tb.work / "flwr-run.log",
                    lost_wait=lost_wait)
            except Exception as e:  # noqa: BLE001 - reported after the record is completed
                outcome["error"] = e
            finally:
                done.set()

        tb.schedule_downtimes()
        runner = threading.Thread(target=submit, daemon=True)
        runner.start()
        tb.watch(faults, done)
        faulted = {f.site for f in faults if f.kind in ("kill", "restart")}
        while not done.wait(0.5):
            tb.check_sites(faulted)
        record = read_any_record(run_dir(output, cfg.run_id()))
        if record is None:
            raise outcome.get("error") or RuntimeError("the run left no record")
        record["links"] = tb.links_section(record, mechanism)
        record["testbed"] = {"sites": n_sites, "namespaces": tb.caps.netns, "pacs": pacs,
                             "namespace_prefix": netns.PREFIX + tb.tag,
                             "faults": [asdict(f) for f in faults], "events": tb.events,
                             "outcome": "failed: " + str(outcome["error"]) if "error" in outcome
                             else "complete"}
        write_record(run_dir(output, cfg.run_id()), record)
    if "error" in outcome:
        raise outcome["error"]
    return record
