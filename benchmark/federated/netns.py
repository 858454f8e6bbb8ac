"""Network namespaces for the testbed: one per site, joined to the host by a veth pair.

Site ``i`` lives in namespace ``<prefix>s<i>`` with address ``10.77.X.2/30``; the host end of
its veth pair has ``10.77.X.1/30`` (``X`` a /30 block not already in use on this machine), so
only namespace-local addresses are used. The kernel shapes the link where it can: ``tbf``
(token bucket) for bandwidth on both ends of the pair, ``netem`` for latency and loss where the
kernel has it (Hemminger 2005). What it cannot do the userspace relay does
(:mod:`privseg.federated.relay`). All of it needs root (``CAP_NET_ADMIN``) and ``ip``/``tc``;
:func:`capabilities` finds out, by trying, on a scratch namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

#: every namespace and veth the testbed makes starts with this (teardown and tests find them)
PREFIX = "psg"
#: the /16 the namespace-local addresses come from
NET = "10.77"


@dataclass(frozen=True)
class Capabilities:
    """What this machine lets the testbed do."""

    netns: bool
    tbf: bool
    netem: bool
    why: str = ""

    def mechanism(self, shaped_latency: bool, shaped_rate: bool, shaped_loss: bool) -> str:
        """One line: which mechanism shapes what (the testbed prints it)."""
        if not self.netns:
            return (f"no network namespaces ({self.why}): sites on loopback; latency, "
                    "bandwidth, loss and outages by userspace relay")
        kernel = [x for x, on in (("bandwidth", shaped_rate and self.tbf and not self.netem),
                                  ("latency, loss and bandwidth",
                                   self.netem and (shaped_latency or shaped_loss
                                                   or shaped_rate))) if on]
        relay = ["outages"] + ([] if self.netem else ["latency", "loss"]) + (
            [] if (self.tbf or self.netem) else ["bandwidth"])
        parts = ["sites in network namespaces (veth, 10.77.x.y/30)"]
        if not self.netem:
            parts.append("netem unavailable")
        if kernel:
            parts.append(f"{' and '.join(kernel)} by {'netem' if self.netem else 'tbf'}")
        parts.append(f"{', '.join(relay)} by userspace relay")
        return "; ".join(parts)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["tc", *args], capture_output=True, text=True, check=check)


def capabilities() -> Capabilities:
    """Try a scratch namespace with a veth pair, a ``tbf`` and a ``netem`` qdisc on it."""
    if os.geteuid() != 0:
        return Capabilities(False, False, False, "not root")
    if shutil.which("ip") is None:
        return Capabilities(False, False, False, "no `ip` command")
    name = f"{PREFIX}probe{os.getpid() % 100000}"
    if _ip("netns", "add", name, check=False).returncode != 0:
        return Capabilities(False, False, False, "`ip netns add` refused")
    try:
        veth = _ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b",
                   "netns", name, check=False).returncode == 0
        if not veth:
            return Capabilities(False, False, False, "no veth pairs")
        tc = shutil.which("tc") is not None
        tbf = tc and _tc("qdisc", "add", "dev", f"{name}a", "root", "tbf", "rate", "10mbit",
                         "burst", "32kbit", "latency", "100ms", check=False).returncode == 0
        if tbf:
            _tc("qdisc", "del", "dev", f"{name}a", "root", check=False)
        netem = tc and _tc("qdisc", "add", "dev", f"{name}a", "root", "netem", "delay",
                           "1ms", check=False).returncode == 0
        return Capabilities(True, tbf, netem)
    finally:
        _ip("link", "del", f"{name}a", check=False)
        _ip("netns", "del", name, check=False)


def used_blocks() -> set[int]:
    """Third octets of 10.77.X.* addresses already on this machine (host namespace)."""
    out = _ip("-o", "-4", "addr", "show", check=False).stdout
    return {int(w.split(".")[2]) for w in out.split() if w.startswith(f"{NET}.")}


@dataclass
class SiteNamespace:
    """One site's namespace: its name, the host and site addresses of its veth pair."""

    name: str
    host_veth: str
    host_addr: str
    site_addr: str

    def exec_prefix(self) -> list[str]:
        """The command prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.name]


def create_site_namespace(tag: str, index: int, block: int) -> SiteNamespace:
    """Namespace ``{PREFIX}{tag}s{index}`` joined to the host by a veth pair on 10.77.block.0/30."""
    name = f"{PREFIX}{tag}s{index}"
    host, peer = f"{name}h", f"{name}n"
    if len(host) > 15:
        raise ValueError(f"interface name {host!r} is longer than the kernel's 15 characters")
    ns = SiteNamespace(name, host, f"{NET}.{block}.1", f"{NET}.{block}.2")
    _ip("netns", "add", name)
    try:
        _ip("link", "add", host, "type", "veth", "peer", "name", peer, "netns", name)
        _ip("addr", "add", f"{ns.host_addr}/30", "dev", host)
        _ip("link", "set", host, "up")
        _ip("-n", name, "addr", "add", f"{ns.site_addr}/30", "dev", peer)
        _ip("-n", name, "link", "set", peer, "up")
        _ip("-n", name, "link", "set", "lo", "up")
    except subprocess.CalledProcessError:
        delete_namespace(ns)
        raise
    return ns


def shape_kernel(ns: SiteNamespace, caps: Capabilities, latency_ms: float,
                 bandwidth_mbit: float | None, loss: float) -> None:
    """Shape both directions of the veth pair: netem (delay, loss, rate) where the kernel has
    it, else tbf for the rate; the relay does the rest."""
    ends = [("ip", "netns", "exec", ns.name, "tc", "qdisc", "add", "dev", f"{ns.name}n"),
            ("tc", "qdisc", "add", "dev", ns.host_veth)]
    if caps.netem and (latency_ms or loss or bandwidth_mbit):
        args = ["root", "netem", "delay", f"{latency_ms:g}ms", "loss", f"{100 * loss:g}%"]
        if bandwidth_mbit:
            args += ["rate", f"{bandwidth_mbit:g}mbit"]
    elif caps.tbf and bandwidth_mbit:
        # burst: at least one MTU and 10 ms at the rate (the kernel needs rate/HZ)
        burst = max(1600, int(bandwidth_mbit * 1e6 / 8 * 0.01))
        args = ["root", "tbf", "rate", f"{bandwidth_mbit:g}mbit", "burst", str(burst),
                "latency", "1s"]
    else:
        return
    for end in ends:
        subprocess.run([*end, *args], capture_output=True, text=True, check=True)


def delete_namespace(ns: SiteNamespace) -> None:
    """Delete the namespace (its veth pair goes with it) and the host end, if still there."""
    _ip("netns", "del", ns.name, check=False)
    _ip("link", "del", ns.host_veth, check=False)


def leftovers(tag: str = "") -> list[str]:
    """Namespaces and interfaces of testbed ``tag`` (all testbeds: ``""``) still present."""
    if shutil.which("ip") is None:
        return []
    names = _ip("netns", "list", check=False).stdout.split()
    links = [w.rstrip(":").split("@")[0] for w in _ip("-o", "link", "show",
                                                       check=False).stdout.split()]
    start = f"{PREFIX}{tag}"
    return sorted({n for n in names + links if n.startswith(start) and "probe" not in n})
