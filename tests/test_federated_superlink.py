"""Deployment on Flower's SuperLink/SuperNode runtime, on loopback, with TLS and node auth.

One SuperLink (TLS, ``--enable-supernode-auth``) and three site SuperNodes
(``privseg federated supernode``, each with its registered EC key) run as subprocesses; a fourth
SuperNode whose key was never registered must be refused. Two runs go through
``privseg federated run`` at once (Flower serves several runs; each site keeps one state per
run): a plain sample-DP run, which must give the in-process simulation's record exactly, and a
SecAgg+ run with site-level DP, compared with the simulated SecAgg+ run.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from test_federated import assert_dice_close, secagg_tiny, tiny

from privseg.config import parse_config
from privseg.federated import certs
from privseg.federated.federation import connection_toml, flower_command, flower_env
from privseg.federated.simulation import run_federated
from privseg.record import read_record

warnings.filterwarnings("ignore", module="opacus")

SITES = ("A", "B", "C")
CLI = [sys.executable, "-c", "from privseg.cli import main; main()", "federated"]


def make_certificates(d: Path) -> None:
    """A test CA, the SuperLink's certificate for 127.0.0.1, and EC keys for four sites."""
    certs.make_certificates(d, (*SITES, "X"))


def simulate(config: dict) -> dict:
    """The in-process simulation's record, as written to disk (NaN as the JSON writer has it)."""
    rec = run_federated(parse_config(config), progress=False, force=True)
    return read_record(Path(config["output"]["dir"]) / rec["run_id"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SuperLink exited:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"SuperLink did not listen on {port}:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory, request):
    """SuperLink + sites A, B, C (registered keys) + site X (unregistered), all on loopback."""
    work = tmp_path_factory.mktemp("superlink")
    certs = work / "certs"
    make_certificates(certs)
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}

    def stop_all():  # every subprocess's whole process group, even if a test failed
        for p in procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for p in procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # stragglers (superexec, clientapps)
            except ProcessLookupError:
                pass

    request.addfinalizer(stop_all)

    def start(name: str, cmd: list[str], home: Path) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        logs[name] = work / f"{name}.log"
        env = flower_env(FLWR_HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(logs[name], "w") as f:
            procs[name] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                           cwd=work, start_new_session=True)
        return procs[name]

    port = _free_port()
    link = start("superlink", [
        flower_command("flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
        "--enable-supernode-auth", "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", str(port), "--database", str(work / "link.db")],
        work / "home-link")
    _wait_port(port, link, logs["superlink"])

    # The operator registers the three clinics' public keys (not X's).
    operator = work / "home-operator"
    operator.mkdir()
    (operator / "config.toml").write_text(connection_toml(f"127.0.0.1:{port}",
                                                          certs / "ca.crt"))
    for s in SITES:
        r = subprocess.run([flower_command("flwr"), "supernode", "register",
                            str(certs / f"site-{s}.pub"), "privseg", "--name", f"site-{s}"],
                           capture_output=True, text=True,
                           env=flower_env(FLWR_HOME=str(operator)), timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr

    # Everyone holds the same agreed config; sites load the phantom into a shared cache.
    cfg = {"plain": tiny(work), "secagg": secagg_tiny(work, site_clip_norm=0.1)}
    paths = {}
    for k, d in cfg.items():
        paths[k] = work / f"{k}.yaml"
        paths[k].write_text(yaml.safe_dump(d))
    # the data cache exists before four processes read it (the simulation fills it)
    simulated = {"plain": simulate(cfg["plain"])}
    for s in (*SITES, "X"):  # X says it is site-A: only its key tells it apart
        site = f"site-{s}" if s != "X" else "site-A"
        start(f"site-{s}", CLI + [
            "supernode", str(paths["plain"]), str(paths["secagg"]), "--site", site, "--superlink",
            f"127.0.0.1:{port}", "--ca-cert", str(certs / "ca.crt"),
            "--auth-key", str(certs / f"site-{s}"), "--runtime-port", str(_free_port()),
            "--max-wait", "60", "--allow-reproducible-noise"], work / f"home-site-{s}")
    return SimpleNamespace(work=work, port=port, certs=certs, procs=procs, logs=logs,
                           paths=paths, cfg=cfg, simulated=simulated, start=start)


@pytest.fixture(scope="module")
def deployed(federation):
    """Both runs submitted to the SuperLink at once; their records (and the simulated ones)."""
    f = federation
    out = f.work / "deployed"
    runs = {}
    for k in ("secagg", "plain"):
        runs[k] = f.start(f"run-{k}", CLI + [
            "run", str(f.paths[k]), "--superlink", f"127.0.0.1:{f.port}",
            "--ca-cert", str(f.certs / "ca.crt"), "--sites", "3", "--output", str(out),
            "--round-timeout", "120"], f.work / f"home-run-{k}")
        time.sleep(1.0)  # the sites install the App once before both runs' messages
    # meanwhile, the simulated SecAgg+ run
    f.simulated["secagg"] = simulate(f.cfg["secagg"])

    records = {}
    for k, p in runs.items():
        try:
            code = p.wait(timeout=150)
        except subprocess.TimeoutExpired:
            code = None
        log = f.logs[f"run-{k}"].read_text()
        assert code == 0, (f"{k}: exit {code}\n{log[-4000:]}\nsuperlink:\n"
                           + f.logs["superlink"].read_text()[-3000:])
        records[k] = read_record(out / f.simulated[k]["run_id"])
    return records


def test_superlink_run_equals_simulation(deployed, federation):
    """(a) TLS + node auth + per-message ClientApps give the simulation's record exactly.

    Same seed, same SiteClient objects (kept by each site's worker between messages), the
    same server objects (Flower's DefaultWorkflow over the SuperLink's grid instead of the
    Server loop over in-process proxies): all numbers are equal, not merely close.
    """
    rec, sim = deployed["plain"], federation.simulated["plain"]
    assert rec is not None and rec["timing"]["mode"].startswith("deployment (Flower SuperLink")
    assert rec["run_id"] == sim["run_id"]
    assert rec["test"]["dice"] == sim["test"]["dice"]
    assert rec["test"]["per_site"] == sim["test"]["per_site"]
    assert [h.get("val_per_site") for h in rec["history"]] == [
        h.get("val_per_site") for h in sim["history"]]
    assert [h.get("train_loss") for h in rec["history"]] == [
        h.get("train_loss") for h in sim["history"]]
    assert rec["privacy"]["epsilon_per_site"] == sim["privacy"]["epsilon_per_site"]
    assert rec["federated"]["bytes_per_round"] == sim["federated"]["bytes_per_round"]
    audit = rec["federated"]["wire_audit"]
    assert audit["violations"] == [] and audit["fit_results"] == 6
    assert audit["fitres_fields"] == ["metrics", "num_examples", "parameters", "status"]
    assert rec["dataset"]["sites"] == ["site-A", "site-B", "site-C"]


def test_superlink_secagg_matches_simulated_secagg(deployed, federation):
    """(c) SecAgg+ with site-level DP over SuperLink/SuperNodes: the simulated SecAgg+ run.

    Tolerance as in test_federated's SecAgg+ test: 1e-3 in Dice. Each site's SecAgg+
    stochastic rounding draws from the same per-site stream as in the simulation and the masks
    cancel exactly, so equality is expected; the tolerance only admits a different rounding.
    """
    rec, sim = deployed["secagg"], federation.simulated["secagg"]
    assert rec is not None and rec["timing"]["mode"].endswith("SecAgg+)")
    assert rec["federated"]["secure_aggregation"] is True
    assert rec["privacy"]["secure_aggregation"] is True and rec["privacy"]["mode"] == "site"
    assert rec["federated"]["secagg"] == sim["federated"]["secagg"]
    assert_dice_close(rec, sim)
    assert rec["federated"]["wire_audit"]["violations"] == []
    payload = rec["federated"]["parameter_payload_bytes"]
    for row in rec["federated"]["bytes_per_round"]:  # keys, shares and masked vectors
        assert row["up"] > 3 * payload and row["down"] > 3 * payload
    assert math.isfinite(rec["test"]["mean_dice"])


def test_unregistered_site_is_refused(federation, deployed):
    """(b) A SuperNode whose public key was not registered cannot join the federation.

    Checked last: site X was started with the others, so its refusal overlapped the runs.
    """
    p = federation.procs["site-X"]
    code = p.wait(timeout=60)
    log = federation.logs["site-X"].read_text()
    assert code != 0, log[-2000:]
    assert "Failed to activate SuperNode" in log
    assert "No SuperNode found with the given public key" in (
        federation.logs["superlink"].read_text())
    for s in SITES:  # the registered ones are still serving
        assert federation.procs[f"site-{s}"].poll() is None, (
            federation.logs[f"site-{s}"].read_text()[-2000:])
