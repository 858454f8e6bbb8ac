"""Deployment on Flower's SuperLink/SuperNode runtime, on loopback, with TLS and node auth.

One SuperLink (TLS, ``--enable-supernode-auth``) and three site SuperNodes
(``privseg federated supernode``, each with its registered EC key) run as subprocesses; a fourth
SuperNode whose key was never registered must be refused. Two runs go through
``privseg federated run`` at once (Flower serves several runs; each site keeps one state per
run): a plain sample-DP run, which must give the in-process simulation's record exactly, a
SecAgg+ run with site-level DP, compared with the simulated SecAgg+ run, and an SVT run
(selective sharing, sparse messages, pure-ε local DP charged to each site's ledger), which must
give its simulation's record exactly.
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
from test_federated import assert_dice_close, dp_accounting_epsilon, secagg_tiny, tiny

from privseg.config import parse_config
from privseg.dp.ledger import SiteLedger
from privseg.federated import certs
from privseg.federated.federation import connection_toml, flower_command, flower_env
from privseg.federated.progress import read_progress
from privseg.federated.simulation import run_federated
from privseg.federated.supernode import ledger_path
from privseg.record import read_any_record, read_record

warnings.filterwarnings("ignore", module="opacus")
# a deployed federation: 5-7 min of Flower processes on a 2-core CPU, outside the fast suite
pytestmark = pytest.mark.slow

SITES = ("A", "B", "C")
CLI = [sys.executable, "-c", "from privseg.cli import main; main()", "federated"]


def make_certificates(d: Path) -> None:
    """A test CA, the SuperLink's certificate for 127.0.0.1, and EC keys for four sites."""
    certs.make_certificates(d, (*SITES, "X"))


def svt_tiny(work: Path) -> dict:
    """The tiny federation with SVT: 40% of each update, ε = 2000 per site (1000 per round),
    reproducible noise (``privacy.noise_seed``; the sites opt in); no validation rounds (fewer
    messages: the final test compares the models)."""
    d = tiny(work, dp_mode="svt", share_fraction=0.4, eval_every=0)
    d["privacy"]["target_epsilon"] = 2000.0
    return d


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
    cfg = {"plain": tiny(work), "secagg": secagg_tiny(work, site_clip_norm=0.1),
           "svt": svt_tiny(work), "killed": tiny(work, rounds=3)}
    paths = {}
    for k, d in cfg.items():
        paths[k] = work / f"{k}.yaml"
        paths[k].write_text(yaml.safe_dump(d))
    # the data cache exists before four processes read it (the simulation fills it)
    simulated = {"plain": simulate(cfg["plain"])}
    for s in (*SITES, "X"):  # X says it is site-A: only its key tells it apart
        site = f"site-{s}" if s != "X" else "site-A"
        start(f"site-{s}", CLI + [
            "supernode", *(str(paths[k]) for k in cfg),
            "--site", site, "--superlink",
            f"127.0.0.1:{port}", "--ca-cert", str(certs / "ca.crt"),
            "--auth-key", str(certs / f"site-{s}"), "--runtime-port", str(_free_port()),
            "--max-wait", "60", "--allow-reproducible-noise",
            "--state-dir", str(work / "site-state")], work / f"home-site-{s}")
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
            code = p.wait(timeout=400)  # a slow start (sites load 3 configs) on a busy CI
        except subprocess.TimeoutExpired:
            code = None
        log = f.logs[f"run-{k}"].read_text()
        assert code == 0, (f"{k}: exit {code}\n{log[-4000:]}\nsuperlink:\n"
                           + f.logs["superlink"].read_text()[-3000:])
        records[k] = read_record(out / f.simulated[k]["run_id"])
    return records


@pytest.fixture(scope="module")
def deployed_svt(federation, deployed):
    """The SVT run, submitted after the other two finished; its record and the simulated one."""
    f = federation
    out = f.work / "deployed"
    p = f.start("run-svt", CLI + [
        "run", str(f.paths["svt"]), "--superlink", f"127.0.0.1:{f.port}",
        "--ca-cert", str(f.certs / "ca.crt"), "--sites", "3", "--output", str(out),
        "--round-timeout", "120"], f.work / "home-run-svt")
    f.simulated["svt"] = simulate(f.cfg["svt"])
    try:
        code = p.wait(timeout=400)
    except subprocess.TimeoutExpired:
        code = None
    assert code == 0, (f"svt: exit {code}\n{f.logs['run-svt'].read_text()[-4000:]}")
    return read_record(out / f.simulated["svt"]["run_id"])


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


def test_superlink_svt_run_equals_simulation_and_sends_only_the_selection(deployed_svt,
                                                                         federation):
    """(d) SVT over SuperLink/SuperNodes: the simulation's record exactly (same reproducible
    SVT noise at each site), sparse messages on the wire (indices + at most c values, audited
    by content at the server), and each site's ledger charged the run's pure ε."""
    rec, sim = deployed_svt, federation.simulated["svt"]
    assert rec["timing"]["mode"].startswith("deployment (Flower SuperLink")
    assert rec["run_id"] == sim["run_id"] and rec["privacy"]["mode"] == "svt"
    assert rec["test"]["dice"] == sim["test"]["dice"]
    assert rec["test"]["per_site"] == sim["test"]["per_site"]
    assert [h.get("train_loss") for h in rec["history"]] == [
        h.get("train_loss") for h in sim["history"]]
    p = rec["privacy"]
    for k in ("epsilon", "epsilon_per_round", "release_scale", "queries_per_round_per_site"):
        assert p[k] == sim["privacy"][k], k
    assert p["epsilon"] == 2000.0 and p["delta"] == 0.0
    fed = rec["federated"]
    assert fed["wire_audit"]["violations"] == [] and fed["wire_audit"]["fit_results"] == 6
    assert fed["bytes_per_round"] == sim["federated"]["bytes_per_round"]
    assert fed["sparse"] == sim["federated"]["sparse"]
    for row in fed["bytes_per_round"]:  # ≤ c (uint32 index + float32 value) + .npy headers
        assert row["up"] <= row["sites"] * (8 * p["c"] + 2 * 160)
    assert fed["sparse"]["bytes_ratio"] < 0.85  # 40% of the coordinates, 8 bytes each
    for s in SITES:
        entries = SiteLedger(ledger_path(f"site-{s}", federation.work / "site-state")).entries
        svt = [e for e in entries if e.get("pure_rounds")]
        assert len(svt) == 1 and svt[0]["epsilon"] == 2000.0 and svt[0]["delta"] == 0.0
        assert svt[0]["epsilon_per_round"] == 1000.0 and svt[0]["pure_rounds"] == 2


def test_serverapp_killed_mid_round_leaves_a_failed_record_of_what_was_spent(
        federation, deployed, deployed_svt):
    """The ServerApp killed (kill -9, as when its SuperLink dies under Flower's subprocess
    isolation) once round 2's instructions went out: it writes nothing more, yet
    ``privseg federated run`` reports the run failed and leaves a failed record whose ε per
    site counts every step of the 2 rounds the sites were sent (whether or not round 2's
    replies came), from the progress the ServerApp kept (privseg.federated.progress)."""
    f = federation
    out = f.work / "killed"
    cfg = parse_config(f.cfg["killed"])
    directory = out / cfg.run_id()
    p = f.start("run-killed", CLI + [
        "run", str(f.paths["killed"]), "--superlink", f"127.0.0.1:{f.port}",
        "--ca-cert", str(f.certs / "ca.crt"), "--sites", "3", "--output", str(out),
        "--round-timeout", "120", "--lost-wait", "5"], f.work / "home-run-killed")
    deadline = time.monotonic() + 300
    while len((read_progress(directory) or {}).get("history", [])) < 2:
        assert time.monotonic() < deadline and p.poll() is None, (
            f.logs["run-killed"].read_text()[-3000:])
        time.sleep(0.05)
    killed = subprocess.run(["pkill", "-KILL", "-f", "flwr-serverapp"], check=False)
    assert killed.returncode == 0, "no flwr-serverapp process to kill"
    code = p.wait(timeout=400)  # Flower marks the run failed once its heartbeats stop
    log = f.logs["run-killed"].read_text()
    assert code != 0 and "failed after" in log, log[-3000:]
    rec = read_any_record(directory)
    assert rec["status"] == "failed", rec.get("status")
    assert "the ServerApp stopped in round 2 without writing its record" in rec["error"]
    assert read_progress(directory) is None  # turned into the record
    priv = rec["privacy"]
    assert priv["steps_bound_per_site"] == {f"site-{s}": 2 * 2 for s in SITES}
    for s in SITES:  # independent accountant over all 4 steps of the 2 rounds sent
        site = f"site-{s}"
        assert priv["epsilon_per_site"][site] == pytest.approx(dp_accounting_epsilon(
            priv["noise_multiplier_per_site"][site], priv["sample_rate_per_site"][site], 4,
            priv["delta_per_site"][site]), rel=1e-6)
    assert priv["epsilon"] == max(priv["epsilon_per_site"].values())


OPERATOR_SERVER = """
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

server_app = ServerApp()


@server_app.main()
def main(grid, context):
    asks = [Message(RecordDict({"q": ConfigRecord({})}), dst_node_id=n, message_type="query")
            for n in grid.get_node_ids()]
    replies = grid.send_and_receive(asks, timeout=90)
    Path(REPLIES).write_text("\\n".join(
        r.error.reason if r.has_error() else "answered: " + str(dict(r.content["r"]))
        for r in replies))
"""

OPERATOR_CLIENT = """
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

Path(MARKER).write_text("the operator's code ran at a site")
client_app = ClientApp()


@client_app.query()
def query(msg, context):
    return Message(RecordDict({"r": ConfigRecord({"key": str(context.node_config)})}),
                   reply_to=msg)
"""


def test_a_site_runs_privseg_s_clientapp_only_whatever_bundle_is_sent(federation, deployed,
                                                                       deployed_svt):
    """A federation operator submits an App bundle of its own (privseg's name, publisher and
    version; its own ClientApp): Flower would install it at every site and run that code as
    the site's user, with the site's data and the worker's key in reach. A privseg SuperNode
    refuses to load it (privseg.federated.pinned_clientapp): the bundle's code never runs."""
    f = federation
    app = f.work / "operator-app"
    (app / "operator_code").mkdir(parents=True)
    marker, replies = f.work / "operator-code-ran", f.work / "operator-replies.txt"
    ours = (Path(certs.__file__).parent / "flower_app" / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(
        ours.replace("privseg.federated.app:server_app", "operator_code.server:server_app")
        .replace("privseg.federated.app:client_app", "operator_code.client:client_app")
        + '\n[tool.hatch.build.targets.wheel]\npackages = ["."]\n')
    (app / "operator_code" / "__init__.py").write_text("")
    (app / "operator_code" / "server.py").write_text(
        f"REPLIES = {str(replies)!r}\n" + OPERATOR_SERVER)
    (app / "operator_code" / "client.py").write_text(
        f"MARKER = {str(marker)!r}\n" + OPERATOR_CLIENT)
    r = subprocess.run([flower_command("flwr"), "run", str(app), "privseg", "--stream"],
                       capture_output=True, text=True, timeout=300,
                       env=flower_env(FLWR_HOME=str(f.work / "home-operator")))
    assert replies.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    answers = replies.read_text().splitlines()
    assert len(answers) == 3 and all("load `ClientApp`" in a for a in answers), answers
    assert not marker.exists()
    for s in SITES:
        assert "runs privseg's ClientApp only" in f.logs[f"site-{s}"].read_text()


def test_unregistered_site_is_refused(federation, deployed, deployed_svt):
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
