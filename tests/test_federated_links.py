"""The testbed's links: the userspace relay on local sockets, link profiles, namespaces.

The relay's delay, rate, outages and held-back answers are measured on a local socket pair
through it and compared with bounds derived from the profile and the bytes sent (never with a
wall-time constant): each bound fails when the relay does not shape. Namespace tests need root
(they are skipped without it; the relay tests are what the fallback runs on).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from test_federated import tiny

from privseg.config import ConfigError, LinkProfile, parse_config
from privseg.federated import netns
from privseg.federated.relay import CHUNK, RTO_S, LinkRelay, Shaping
from privseg.federated.testbed import (
    Fault,
    mechanism_line,
    relay_shaping,
    site_profiles,
)


@pytest.fixture
def echo_server():
    """A local TCP echo server; yields its port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=c: _echo(c), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def _echo(c: socket.socket) -> None:
    with c:
        while data := c.recv(65536):
            c.sendall(data)


def relay_to(port: int, shaping: Shaping) -> tuple[LinkRelay, int]:
    r = LinkRelay(("127.0.0.1", 0), ("127.0.0.1", port), shaping)
    return r, r.start()


def round_trip(port: int, payload: bytes) -> float:
    """Seconds until ``payload`` came back through the relay at ``port``."""
    with socket.create_connection(("127.0.0.1", port)) as c:
        t = time.monotonic()
        threading.Thread(target=c.sendall, args=(payload,), daemon=True).start()
        got = 0
        while got < len(payload):
            chunk = c.recv(65536)
            assert chunk, "relay closed the connection"
            got += len(chunk)
        return time.monotonic() - t


def test_relay_delays_each_direction(echo_server):
    relay, port = relay_to(echo_server, Shaping(delay_s=0.15))
    try:
        rtt = round_trip(port, b"x")
    finally:
        relay.stop()
    assert rtt >= 2 * 0.15  # one delay down the link, one back
    tr = relay.traffic(0, float("inf"))
    assert tr["bytes_up"] == tr["bytes_down"] == 1
    assert tr["last_down"] - tr["first_up"] >= 0.15 - 1e-3  # the echo left after the delay


def test_relay_rate_never_exceeds_the_profile(echo_server):
    rate, n = 400_000.0, 300_000  # bytes/s; bytes each way
    relay, port = relay_to(echo_server, Shaping(rate_bytes_s=rate))
    try:
        elapsed = round_trip(port, os.urandom(n))
    finally:
        relay.stop()
    # both directions serialise n bytes at `rate`, pipelined: at least one of them, less the
    # one chunk in flight
    assert elapsed >= (n - CHUNK) / rate
    for d in ("up", "down"):
        xs = [x for x in relay.transfers if x.direction == d]
        assert sum(x.n for x in xs) == n  # the relay counts every byte, once
        # over any span, what was delivered fits the rate (plus the chunk that opened it)
        for i in range(0, len(xs), 4):
            for j in range(i + 1, len(xs)):
                span = xs[j].t - xs[i].t
                delivered = sum(x.n for x in xs[i + 1:j + 1])
                assert delivered <= rate * span + CHUNK + 1


def test_relay_loss_delays_by_a_retransmission(echo_server):
    relay, port = relay_to(echo_server, Shaping(loss=1.0))  # every chunk lost once
    try:
        rtt = round_trip(port, b"x")
    finally:
        relay.stop()
    assert rtt >= 2 * RTO_S


def test_link_down_refuses_new_and_stalls_open_connections(echo_server):
    relay, port = relay_to(echo_server, Shaping())
    try:
        with socket.create_connection(("127.0.0.1", port)) as open_conn:
            open_conn.sendall(b"a")
            assert open_conn.recv(1) == b"a"  # the connection is up
            relay.set_down(0.6)
            t = time.monotonic()
            with socket.create_connection(("127.0.0.1", port)) as new:
                new.settimeout(5)
                assert new.recv(1) == b""  # refused: closed at once
            open_conn.sendall(b"b")
            assert open_conn.recv(1) == b"b"
            assert time.monotonic() - t >= 0.6 - 1e-3  # held until the link came back
        assert relay.refused == 1
        assert round_trip(port, b"c") < 0.6 + 5  # new connections accepted again
    finally:
        relay.stop()


def test_straggler_holds_back_only_its_answers(echo_server):
    relay, port = relay_to(echo_server, Shaping())
    try:
        relay.stall("up", 0.5)
        assert round_trip(port, b"x") >= 0.5
        relay.stall("down", 0.0)
        with pytest.raises(ValueError, match="direction"):
            relay.stall("sideways", 1)
    finally:
        relay.stop()
    up = [x.t for x in relay.transfers if x.direction == "up"]
    down = [x.t for x in relay.transfers if x.direction == "down"]
    assert min(down) >= min(up)  # nothing came back before the held answer went up


# -- profiles, faults, mechanisms -------------------------------------------------------------

def test_link_profiles_are_validated_naming_the_key(tmp_path):
    d = tiny(tmp_path)
    d["setting"]["federated"]["links"] = {"site-A": {"bandwidth_mbit": -1}}
    with pytest.raises(ConfigError, match=r"setting\.federated\.links\.site-A\.bandwidth_mbit"):
        parse_config(d)
    d["setting"]["federated"]["links"] = {"site-A": {"down": [{"at_s": 1}]}}
    with pytest.raises(ConfigError, match=r"links\.site-A\.down\.0\.for_s"):
        parse_config(d)
    d["setting"]["federated"]["links"] = {"site-Z": {"latency_ms": 10}}
    with pytest.raises(ConfigError, match=r"setting\.federated\.links\.site-Z: no such site"):
        site_profiles(parse_config(d), ["site-A", "site-B"])


def test_links_shape_the_machine_not_the_run(tmp_path):
    d = tiny(tmp_path)
    plain = parse_config(d)
    d["setting"]["federated"]["links"] = {"default": {"latency_ms": 50},
                                          "site-B": {"bandwidth_mbit": 1}}
    shaped = parse_config(d)
    assert shaped.run_id() == plain.run_id()
    p = site_profiles(shaped, ["site-A", "site-B"])
    assert p["site-A"].latency_ms == 50 and p["site-A"].bandwidth_mbit is None
    assert p["site-B"].bandwidth_mbit == 1 and p["site-B"].latency_ms == 0


@pytest.mark.parametrize("text,fault", [
    ("kill:site-B@2", Fault("kill", 2, "site-B", 0.0)),
    ("restart:site-B@2+60", Fault("restart", 2, "site-B", 60.0)),
    ("linkdown:site-A@3+12.5", Fault("linkdown", 3, "site-A", 12.5)),
    ("superlink@2+5", Fault("superlink", 2, None, 5.0)),
])
def test_fault_syntax(text, fault):
    assert Fault.parse(text) == fault


@pytest.mark.parametrize("text", ["kill@2", "superlink:site-A@2", "linkdown:site-A@2",
                                  "explode:site-A@2", "kill:site-A"])
def test_bad_fault_is_refused_naming_it(text):
    with pytest.raises(ConfigError, match=f"--fault {text!r}"):
        Fault.parse(text)


def test_mechanism_line_and_who_shapes_what():
    profile = LinkProfile(latency_ms=100, bandwidth_mbit=10, loss=0.01)
    no_root = netns.Capabilities(False, False, False, "not root")
    tbf_only = netns.Capabilities(True, True, False)
    netem = netns.Capabilities(True, True, True)
    line = mechanism_line(tbf_only, {"site-A": profile})
    assert "netem unavailable" in line and "bandwidth by tbf" in line
    assert "latency, loss by userspace relay" in line
    assert "userspace relay" in mechanism_line(no_root, {"site-A": profile})
    assert "not root" in mechanism_line(no_root, {"site-A": profile})
    assert "by netem" in mechanism_line(netem, {"site-A": profile})
    assert "unshaped" in mechanism_line(tbf_only, {"site-A": LinkProfile()})
    # the relay adds exactly what the kernel does not
    assert relay_shaping(profile, tbf_only) == Shaping(0.1, None, 0.01)
    assert relay_shaping(profile, no_root) == Shaping(0.1, 10e6 / 8, 0.01)
    assert relay_shaping(profile, netem) == Shaping(0.0, None, 0.0)


# -- network namespaces (root) ----------------------------------------------------------------

needs_netns = pytest.mark.skipif(not netns.capabilities().netns,
                                 reason="network namespaces need root and ip/veth")


@needs_netns
def test_namespace_link_shaped_by_tbf_and_torn_down():
    caps = netns.capabilities()
    if not caps.tbf:
        pytest.skip("no tbf qdisc in this kernel")
    tag = f"t{os.getpid() % 10000}"
    block = min(set(range(1, 255)) - netns.used_blocks())
    ns = netns.create_site_namespace(tag, 0, block)
    relay = None
    try:
        assert netns.leftovers(tag)  # the namespace and its host interface exist
        mbit, n = 2.0, 400_000
        netns.shape_kernel(ns, caps, 0.0, mbit, 0.0)
        sink = socket.socket()
        sink.bind(("127.0.0.1", 0))
        sink.listen()
        threading.Thread(target=lambda: _drain(sink), daemon=True).start()
        relay = LinkRelay((ns.host_addr, 0), ("127.0.0.1", sink.getsockname()[1]))
        port = relay.start()
        send = (f"import socket,time;c=socket.create_connection(('{ns.host_addr}',{port}));"
                f"t=time.monotonic();c.sendall(b'x'*{n});c.shutdown(1);c.recv(1);"
                "print(time.monotonic()-t)")
        r = subprocess.run([*ns.exec_prefix(), sys.executable, "-c", send],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        tr = relay.traffic(0, float("inf"))
        assert tr["bytes_up"] == n  # counted at the relay, on the host side of the veth
        rate = mbit * 1e6 / 8
        burst = max(1600, rate * 0.01)
        # tbf lets at most the burst through faster than the rate
        assert tr["last_up"] - tr["first_up"] >= (n - burst - CHUNK) / rate
    finally:
        if relay is not None:
            relay.stop()
        netns.delete_namespace(ns)
    assert netns.leftovers(tag) == []


def _drain(srv: socket.socket) -> None:
    c, _ = srv.accept()
    with c:
        while c.recv(65536):
            pass


# -- what the record gets ---------------------------------------------------------------------

def test_links_section_attributes_the_wire_bytes_to_rounds(tmp_path):
    """Bytes are counted in the round whose wall-clock window they crossed in; the answer time
    is the round's start to the site's last byte up."""
    from privseg.federated.link_sweep import plot_link_sweep, rows_of
    from privseg.federated.relay import Transfer
    from privseg.federated.testbed import Site, Testbed

    tb = Testbed.__new__(Testbed)
    profiles = {"site-A": LinkProfile(bandwidth_mbit=1.0), "site-B": LinkProfile()}
    tb.profiles = profiles
    tb.sites = {}
    for name, p in profiles.items():
        relay = LinkRelay(("127.0.0.1", 0), ("127.0.0.1", 9))
        relay.transfers = [Transfer(100.5, "down", 10), Transfer(101.0, "up", 7),
                           Transfer(102.5, "up", 5), Transfer(103.0, "down", 2)]
        if name == "site-B":
            relay.transfers.append(Transfer(101.5, "up", 1000))
        tb.sites[name] = Site(name, p, relay, "127.0.0.1")
    record = {"history": [{"round": 1, "started_at": 100.0, "ended_at": 102.0},
                          {"round": 2, "started_at": 102.0, "ended_at": 104.0}]}
    links = tb.links_section(record, "mechanism line")
    r1, r2 = links["per_round"]
    assert r1["sites"]["site-A"] == {"bytes_up": 7, "bytes_down": 10, "last_up_s": 1.0}
    assert r1["sites"]["site-B"] == {"bytes_up": 1007, "bytes_down": 10, "last_up_s": 1.5}
    assert r2["sites"]["site-A"] == {"bytes_up": 5, "bytes_down": 2, "last_up_s": 0.5}
    assert record["history"][0]["links"] == r1["sites"]
    assert links["total"]["site-B"]["bytes_up"] == 1012
    assert links["transfers"]["site-A"]["up"] == [[101.0, 7], [102.5, 5]]
    rows = rows_of(record | {"links": links}, 0.5)
    assert {(r["site"], r["round"], r["slowest_mbit"]) for r in rows} == {
        ("site-A", 1, 1.0), ("site-B", 1, 1.0), ("site-A", 2, 1.0), ("site-B", 2, 1.0)}
    import pandas as pd

    png = plot_link_sweep(pd.DataFrame(rows), tmp_path / "f.png")
    assert png.stat().st_size > 0


def test_testbed_stops_when_a_site_exits_on_its_own(tmp_path):
    """A SuperNode that exits by itself (here: refusing to start) stops the testbed with its
    log's end, instead of the run waiting for it; one killed by a fault does not."""
    from types import SimpleNamespace

    from privseg.federated.testbed import Testbed

    (tmp_path / "site-site-B.log").write_text("Error: site site-B: move the ledger first\n")
    gone = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tb = SimpleNamespace(work=tmp_path, sites={
            "site-A": SimpleNamespace(name="site-A", proc=alive),
            "site-B": SimpleNamespace(name="site-B", proc=gone)})
        Testbed.check_sites(tb, {"site-B"})  # B was killed by a fault: expected
        with pytest.raises(RuntimeError, match=r"site-B's SuperNode exited \(2\)(.|\n)*"
                                               r"move the ledger first"):
            Testbed.check_sites(tb, set())
    finally:
        alive.kill()
        alive.wait()
