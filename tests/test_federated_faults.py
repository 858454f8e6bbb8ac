"""Faults survived, nothing lost: a site failing mid-run, a run that cannot go on (issue 18)."""

from __future__ import annotations

import json
import math
import os
import signal
import time
import warnings
from pathlib import Path

import pytest
from test_federated import dp_accounting_epsilon, secagg_tiny, tiny

from privseg.config import parse_config
from privseg.federated.client import SiteClient
from privseg.federated.progress import read_progress, record_from_progress, write_progress
from privseg.federated.server import SAMPLE_DROPOUT_NOTE, SITE_DROPOUT_NOTE
from privseg.federated.simulation import run_federated
from privseg.federated.site_plans import sample_epsilon_bound, site_level_epsilon
from privseg.record import RECORD_NAME, RECORD_SCHEMA, read_any_record, read_record, run_dir

warnings.filterwarnings("ignore", module="opacus")


def fail_site_in_round(monkeypatch, site: str, rnd: int) -> None:
    """``site``'s fit raises in round ``rnd`` (before it takes any step)."""
    fit = SiteClient.fit

    def faulty(self, parameters, config):
        if self.site == site and int(config["round"]) == rnd:
            raise RuntimeError(f"injected fault at {site} in round {rnd}")
        return fit(self, parameters, config)

    monkeypatch.setattr(SiteClient, "fit", faulty)


def raw_record(cfg) -> dict:
    return json.loads((run_dir(cfg.output.dir, cfg.run_id()) / RECORD_NAME).read_text())


@pytest.fixture(scope="module")
def sample_cfg(tmp_path_factory):
    return parse_config(tiny(tmp_path_factory.mktemp("faults"), rounds=3, min_fit_sites=2))


@pytest.fixture(scope="module")
def sample_baseline(sample_cfg):
    return run_federated(sample_cfg, progress=False, force=True)



def test_site_failing_in_round_2_is_missed_and_rejoins(monkeypatch, sample_cfg,
                                                       sample_baseline):
    fail_site_in_round(monkeypatch, "site-B", 2)
    rec = run_federated(sample_cfg, progress=False, force=True)
    assert raw_record(sample_cfg)["status"] == "complete"
    h = rec["history"]
    assert [r["sites"] for r in h] == [["site-A", "site-B", "site-C"], ["site-A", "site-C"],
                                       ["site-A", "site-B", "site-C"]]
    assert "missed" not in h[0] and "missed" not in h[2]
    (miss,) = h[1]["missed"]
    assert miss["site"] == "site-B" and "injected fault at site-B in round 2" in miss["reason"]
    p, base = rec["privacy"], sample_baseline["privacy"]
    for s in ("site-A", "site-C"):  # the others' ε is unchanged by the fault
        assert p["epsilon_per_site"][s] == base["epsilon_per_site"][s]
        assert p["steps_per_site"][s] == base["steps_per_site"][s] == 3 * 2
    # site-B took no step in round 2: its accountant composed the 2 rounds it trained ...
    assert p["steps_per_site"]["site-B"] == 2 * 2
    assert p["epsilon_reported_per_site"]["site-B"] == pytest.approx(dp_accounting_epsilon(
        p["noise_multiplier_per_site"]["site-B"], p["sample_rate_per_site"]["site-B"], 4,
        p["delta_per_site"]["site-B"]), rel=1e-6)
    # ... but the server cannot know that: the record's ε counts all 3 rounds it was sent
    assert p["steps_bound_per_site"]["site-B"] == 3 * 2
    assert p["epsilon_per_site"]["site-B"] == pytest.approx(
        base["epsilon_per_site"]["site-B"], rel=1e-9)
    assert p["epsilon_reported_per_site"]["site-B"] < p["epsilon_per_site"]["site-B"]
    assert p["epsilon"] == max(p["epsilon_per_site"].values())
    assert "epsilon_reported_per_site" not in base  # no fault: the bound is the report
    assert SAMPLE_DROPOUT_NOTE in p["not_covered"]
    assert SAMPLE_DROPOUT_NOTE not in base["not_covered"]


def test_straggler_that_trained_but_never_answered_is_not_under_reported(monkeypatch,
                                                                          sample_cfg):
    """site-C takes the last round's DP steps, then its reply is lost (a straggler past the
    deadline, a site killed after training): its accountant has spent 6 steps, its last report
    (round 2) says 4. The record's ε must be the 6-step one."""
    fit = SiteClient.fit
    spent = {}

    def trains_then_is_lost(self, parameters, config):
        out = fit(self, parameters, config)
        if self.site == "site-C" and int(config["round"]) == 3:
            spent["steps"], spent["epsilon"] = self.steps_done, self.epsilon()
            raise TimeoutError("site-C's reply did not arrive before the round deadline")
        return out

    monkeypatch.setattr(SiteClient, "fit", trains_then_is_lost)
    rec = run_federated(sample_cfg, progress=False, force=True)
    p = rec["privacy"]
    assert rec["history"][2]["missed"][0]["site"] == "site-C"
    assert p["steps_per_site"]["site-C"] == 4  # its last report
    assert p["epsilon_reported_per_site"]["site-C"] < spent["epsilon"]
    assert spent["steps"] == p["steps_bound_per_site"]["site-C"] == 6
    assert p["epsilon_per_site"]["site-C"] >= spent["epsilon"] * (1 - 1e-9)
    assert p["epsilon_per_site"]["site-C"] == pytest.approx(dp_accounting_epsilon(
        p["noise_multiplier_per_site"]["site-C"], p["sample_rate_per_site"]["site-C"], 6,
        p["delta_per_site"]["site-C"]), rel=1e-6)
    assert p["epsilon"] >= spent["epsilon"] * (1 - 1e-9)


def test_run_that_cannot_go_on_writes_a_failed_record(monkeypatch, tmp_path):
    cfg = parse_config(tiny(tmp_path, rounds=3))  # min_fit_sites: all three
    fail_site_in_round(monkeypatch, "site-B", 2)
    with pytest.raises(RuntimeError, match="min_fit_sites=3"):
        run_federated(cfg, progress=False, force=True)
    rec = raw_record(cfg)
    assert rec["status"] == "failed" and rec["run_id"] == cfg.run_id()
    assert "2 of 3 site(s) answered" in rec["error"]
    assert rec["rounds_done"] == 1
    assert rec["history"][1]["missed"][0]["site"] == "site-B"
    p = rec["privacy"]
    # A and C trained in round 2 before the run stopped: their spend is in the record
    assert p["steps_per_site"] == {"site-A": 4, "site-B": 2, "site-C": 4}
    # site-B was sent round 2 too: the server cannot tell whether it trained before failing
    assert p["steps_bound_per_site"] == {"site-A": 4, "site-B": 4, "site-C": 4}
    for s, steps in p["steps_bound_per_site"].items():
        assert p["epsilon_per_site"][s] == pytest.approx(dp_accounting_epsilon(
            p["noise_multiplier_per_site"][s], p["sample_rate_per_site"][s], steps,
            p["delta_per_site"][s]), rel=1e-6)
    assert SAMPLE_DROPOUT_NOTE in p["not_covered"]
    # a failed record is not a complete one: the rerun is not blocked by it
    assert read_record(run_dir(cfg.output.dir, cfg.run_id())) is None
    monkeypatch.undo()
    again = run_federated(cfg, progress=False)
    assert raw_record(cfg)["status"] == "complete" and "error" not in again


@pytest.mark.parametrize("min_fit_sites", [2, None])
def test_site_level_dp_drops_a_failed_site_or_stops(monkeypatch, tmp_path, min_fit_sites):
    """Site-level DP: a drawn site that failed is an update left out (denominator and noise
    unchanged, the record says why that is sound); below the minimum the run stops and the
    record accounts the rounds released."""
    cfg = parse_config(tiny(tmp_path, dp_mode="site", rounds=3, local_steps=1, eval_every=0,
                            min_fit_sites=min_fit_sites))
    fail_site_in_round(monkeypatch, "site-B", 2)
    if min_fit_sites is None:
        with pytest.raises(RuntimeError, match="min_fit_sites"):
            run_federated(cfg, progress=False, force=True)
        rec = raw_record(cfg)
        assert rec["status"] == "failed" and rec["rounds_done"] == 1
    else:
        rec = run_federated(cfg, progress=False, force=True)
        assert raw_record(cfg)["status"] == "complete" and rec["history"][1]["sites"] == ["site-A",
                                                                              "site-C"]
    p = rec["privacy"]
    released = 3 if min_fit_sites else 1
    assert p["rounds_done"] == released
    assert p["epsilon"] == pytest.approx(site_level_epsilon(
        p["noise_multiplier"], p["sample_rate"], released, p["delta"], "rdp"), rel=1e-9)
    assert rec["history"][1]["missed"][0]["site"] == "site-B"
    assert SITE_DROPOUT_NOTE in p["not_covered"] and "Dropouts" in p["guarantee"]


def test_min_fit_sites_default_keeps_run_ids(tmp_path):
    cfg = parse_config(tiny(tmp_path))
    data = cfg.model_dump(mode="json")
    assert data["setting"]["federated"]["min_fit_sites"] is None
    data["setting"]["federated"].pop("min_fit_sites")
    assert parse_config(data).run_id() == cfg.run_id()
    assert parse_config(tiny(tmp_path, min_fit_sites=2)).run_id() != cfg.run_id()


class IdleWorker:
    """A site worker stand-in: serve_site's retry loop needs no data."""

    def serve(self, listener) -> None:
        pass


def serve_fake_supernode(monkeypatch, tmp_path, body: str, max_wait: float | None) -> tuple:
    """serve_site over a shell script standing in for ``flower-supernode`` (``body``, after a
    line counting its starts in ``$COUNT``); returns (serve_site's code, number of starts)."""
    from privseg.federated import supernode

    count = tmp_path / "starts"
    script = tmp_path / "supernode"
    script.write_text(f"#!/bin/sh\nCOUNT={count}\necho x >> $COUNT\n{body}")
    script.chmod(0o755)
    monkeypatch.setattr(supernode.SiteWorker, "load", staticmethod(lambda *a: IdleWorker()))
    monkeypatch.setattr(supernode, "supernode_command", lambda *a: [str(script)])
    monkeypatch.setattr(supernode, "ACTIVATION_RETRY_S", 0.05)
    got = supernode.serve_site([], "site-A", "127.0.0.1:9", max_wait=max_wait)
    return got, len(count.read_text().splitlines())


@pytest.mark.parametrize("max_wait,starts,code", [(30.0, 3, 0), (None, 1, 305 % 256)])
def test_refused_supernode_is_started_again_until_max_wait(monkeypatch, tmp_path, max_wait,
                                                           starts, code):
    """A SuperNode refused by the SuperLink (exit 305: a quick re-activation) is started
    again until ``--max-wait``; without it the refusal is the site's exit code (305 modulo
    256 as a process exit status)."""
    # refused twice, then served and stopped cleanly
    got, n = serve_fake_supernode(monkeypatch, tmp_path,
                                  '[ "$(wc -l < $COUNT)" -ge 3 ] && exit 0\nexit 305\n', max_wait)
    assert got == code and n == starts


def test_refusal_recognised_by_flowers_message_whatever_the_exit_status(monkeypatch,
                                                                        tmp_path):
    """Flower prints "Exit Code: 305" but the process exits with 1 when its runtime server had
    started (seen on the testbed: a SuperNode restarted at once after kill -9): still a
    refusal, started again; another exit 1 is not."""
    child = tmp_path / "child"  # like Flower's SuperExec: outlives it, holding its output
    # refused (exit 1 + Flower's line), then a real crash
    got, n = serve_fake_supernode(monkeypatch, tmp_path,
                                  '[ "$(wc -l < $COUNT)" -ge 2 ] && exit 1\n'
                                  f'sleep 600 & echo $! > {child}\n'
                                  'echo "ERROR :     Exit Code: 305"\nexit 1\n', 30.0)
    assert got == 1 and n == 2
    pid = int(child.read_text())
    try:  # the retry did not wait for the SuperNode's children to close its output
        os.kill(pid, 0)
    finally:
        os.kill(pid, signal.SIGKILL)


def test_supernode_that_gave_up_its_connection_is_stopped_and_started_again(monkeypatch,
                                                                             tmp_path):
    """Flower's SuperNode gives up for good when an error's text names SSL (a SuperLink killed
    mid-connection) yet lives on, never again online: it is stopped and started afresh (the
    worker, holding the site's state, lives on); the second start serves and exits cleanly."""
    from privseg.federated.supernode import GAVE_UP_LINE

    # 1st start: gives up and hangs; 2nd: serves, exits 0
    got, n = serve_fake_supernode(monkeypatch, tmp_path,
                                  '[ "$(wc -l < $COUNT)" -ge 2 ] && exit 0\n'
                                  f'echo "ERROR :     {GAVE_UP_LINE}"\nexec sleep 600\n', 30.0)
    assert got == 0 and n == 2


def test_secure_aggregation_still_refuses_fewer_than_all_sites(monkeypatch, tmp_path):
    """min_fit_sites=2 does not lower site-level DP with SecAgg+: its noise σC/N is sized for
    all N sites, so a round with one site missing stops the run (with a failed record)."""
    cfg = parse_config(secagg_tiny(tmp_path, sigma=None, rounds=2, local_steps=1,
                                   min_fit_sites=2))
    fail_site_in_round(monkeypatch, "site-B", 2)
    # the in-process SecAgg+ grid passes a site's error on at once; over a SuperLink the
    # workflow drops the site and aggregate_fit refuses the N-1 masked updates
    with pytest.raises(RuntimeError, match="injected fault|adds noise for all of them"):
        run_federated(cfg, progress=False, force=True)
    rec = raw_record(cfg)
    assert rec["status"] == "failed" and rec["rounds_done"] == 1
    assert rec["privacy"]["rounds_done"] == 1


def test_secagg_round_with_a_site_dropped_is_refused_whatever_min_fit_sites(tmp_path):
    """The SecAgg+ workflow over a SuperLink drops a silent site: aggregate_fit then sees
    N-1 results, which min_fit_sites=2 would accept in plain site-level DP, but not here."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from privseg.federated.server import RecordingStrategy

    cfg = parse_config(secagg_tiny(tmp_path, sigma=None, rounds=2, min_fit_sites=2))
    strategy = RecordingStrategy(cfg, 3)
    strategy.dp_site = {"n_sites": 3}
    strategy._round(1)["asked"] = ["site-A", "site-B", "site-C"]
    res = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([]), 4, {"site": s}))
           for s in ("site-A", "site-C")]
    with pytest.raises(RuntimeError, match="only 2 of 3 sites' masked updates"):
        strategy.aggregate_fit(1, res, [TimeoutError("site-B: no reply")])
    assert strategy.rounds[0]["missed"] == [{"site": "site-B",
                                             "reason": "TimeoutError: site-B: no reply"}]


class NamedProxy:
    """A connected site as the client manager sees it: a cid that answers its name."""

    def __init__(self, cid: str, site: str):
        self.cid, self.site = cid, site

    def get_properties(self, ins, timeout, group_id):
        from flwr.common import Code, GetPropertiesRes, Status

        return GetPropertiesRes(Status(Code.OK, ""), {"site": self.site})


@pytest.mark.parametrize("fraction", [1.0, 2 / 3])
def test_round_goes_on_without_a_site_gone_from_the_federation(fraction):
    """A SuperNode killed is unregistered once its heartbeat expires: with min_fit_sites the
    next round waits a bounded time, then goes on with the others; the draw is over all
    enrolled sites (the same as if it were there), the absent site is named."""
    from privseg.federated.server import SiteClientManager

    def manager():
        cm = SiteClientManager(3, seed=3, min_sites=2, absent_wait_s=0.1)
        proxies = {s: NamedProxy(str(i), s) for i, s in enumerate(["a", "b", "c"])}
        for p in proxies.values():
            cm.register(p)
        cm.sites()
        return cm, proxies

    full, _ = manager()
    cm, proxies = manager()
    cm.unregister(proxies["b"])
    want = [p.site for p in full.sample(round(3 * fraction))]
    got = cm.sample(round(3 * fraction))
    assert [p.site for p in got] == [s for s in want if s != "b"]
    assert cm.absent == (["b"] if "b" in want else [])


def test_a_site_that_left_is_named_absent_and_the_run_completes(monkeypatch, sample_cfg,
                                                                 sample_baseline):
    """site-B fails in round 2 and is gone (unregistered) from round 3 on: the run finishes
    with A and C, names B as missed (why) in rounds 2 and 3 and at the final test."""
    from privseg.federated import server as srv

    fail_site_in_round(monkeypatch, "site-B", 2)
    fit_round = srv.FederatedServer.fit_round

    def leaving(self, server_round, timeout):
        cm = self.client_manager()
        cm.absent_wait_s = 0.1
        if server_round == 3:
            cm.unregister(cm.clients[cm.sites()["site-B"]])
        return fit_round(self, server_round, timeout)

    monkeypatch.setattr(srv.FederatedServer, "fit_round", leaving)
    rec = run_federated(sample_cfg, progress=False, force=True)
    assert raw_record(sample_cfg)["status"] == "complete"
    h = rec["history"]
    assert [r["sites"] for r in h[1:]] == [["site-A", "site-C"]] * 2
    assert h[2]["missed"] == [{"site": "site-B", "reason": "not connected when the round began"}]
    assert rec["test"]["missed"] == [{"site": "site-B",
                                      "reason": "not connected at the final test"}]
    assert set(rec["test"]["per_site"]) == {"site-A", "site-C"}
    p, base = rec["privacy"], sample_baseline["privacy"]
    assert p["steps_per_site"]["site-B"] == 2  # round 1 only
    for s in ("site-A", "site-C"):
        assert p["epsilon_per_site"][s] == base["epsilon_per_site"][s]


def test_epsilon_bound_of_a_site_that_never_answered_is_its_calibration_target():
    """No report, no σ or q at the server: the bound is the target ε the site calibrated σ to
    (its planned steps spend at most that), ∞ when σ was set by hand; not sent: nothing."""
    assert sample_epsilon_bound(None, 2, 3, 8.0) == (8.0, None)
    assert sample_epsilon_bound(None, 2, 3, None) == (math.inf, None)
    assert sample_epsilon_bound(None, 0, 3, 8.0) == (0.0, 0)
    report = {"planned_steps": 6, "steps": 2, "epsilon": 1.0, "noise_multiplier": 1.1,
              "sample_rate": 0.5, "delta": 1e-5, "accountant": "rdp"}
    eps, steps = sample_epsilon_bound(report, 3, 3, 8.0)
    assert steps == 6 and eps == pytest.approx(dp_accounting_epsilon(1.1, 0.5, 6, 1e-5),
                                               rel=1e-3)  # RDP vs dp_accounting's RDP
    assert sample_epsilon_bound(report, 1, 3, 8.0) == (1.0, 2)  # answered all it was sent


def test_progress_becomes_the_failed_record_only_for_its_own_flower_run(tmp_path):
    """A killed ServerApp's progress is turned into its failed record, status failed, the
    reason first; another Flower run's progress (a rerun of the same config) is left alone."""
    progress = {"run_id": "r", "error": "RuntimeError: the ServerApp stopped in round 2",
                "privacy": {"epsilon": 3.0}, "federated": {"transport": {"flower_run_id": 7}}}
    write_progress(tmp_path, progress)
    assert read_progress(tmp_path)["status"] == "running"
    assert read_any_record(tmp_path) is None
    assert record_from_progress(tmp_path, 8, "lost") is None  # not this run's
    assert read_any_record(tmp_path) is None and read_progress(tmp_path) is not None
    rec = record_from_progress(tmp_path, 7, "no record within 5 s")
    assert read_any_record(tmp_path) == {"schema": RECORD_SCHEMA, **rec}
    assert rec["status"] == "failed" and rec["privacy"] == {"epsilon": 3.0}
    assert rec["error"].startswith("no record within 5 s; RuntimeError: the ServerApp stopped")
    assert read_progress(tmp_path) is None
    assert read_record(tmp_path) is None  # a failed record does not block a rerun


def test_a_resent_instruction_gets_the_same_reply_without_new_steps(tmp_path):
    """A site whose reply was lost (a SuperLink restart) and that is sent the same round's
    instruction again answers with its first reply: no DP step twice, ε unchanged. Another
    global model in that round is a new instruction and is trained on (and accounted)."""
    from privseg.datasets import load_dataset
    from privseg.federated.client import get_weights, make_client
    from privseg.federated.sites import build_site

    cfg = parse_config(tiny(tmp_path, rounds=3))
    d = cfg.dataset
    subject_set = load_dataset(d.name, d.options, d.root, Path(d.cache_dir))
    client = make_client(cfg, build_site(cfg, subject_set, "site-A"), subject_set)
    w0 = get_weights(client.state.model)
    first = client.fit(w0, {"round": 1})
    steps, eps = client.steps_done, client.epsilon()
    again = client.fit([a.copy() for a in w0], {"round": 1})
    assert again is first and client.steps_done == steps and client.epsilon() == eps
    other = [a + 1e-3 for a in w0]
    client.fit(other, {"round": 1})
    assert client.steps_done == 2 * steps and client.epsilon() > eps


class LosingGrid:
    """A SuperLink grid that answers the first instruction to node 2 with "Node Unavailable"
    (its reply was lost in a SuperLink restart) while node 2 is offline for two polls."""

    def __init__(self):
        self.pushed, self.polls, self.n = [], 0, 0

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.n += 1
            m.metadata.__dict__["_message_id"] = f"m{self.n}"
            self.pushed.append(m)
            ids.append(f"m{self.n}")
        return ids

    def get_node_ids(self):
        self.polls += 1
        return [1, 2] if self.polls > 2 else [1]

    def pull_messages(self, ids):
        from flwr.app import Error, RecordDict
        from flwr.common.constant import ErrorCode

        out = []
        for m in [m for m in self.pushed if m.metadata.message_id in ids]:
            if m.metadata.dst_node_id == 2 and m.metadata.message_id == "m2":
                out.append(m.create_error_reply(Error(ErrorCode.NODE_UNAVAILABLE, "lost")))
            else:
                out.append(m.create_reply(RecordDict()))
        return out


@pytest.mark.parametrize("resend", [True, False])
def test_instruction_lost_in_a_superlink_restart_is_resent_once_its_site_is_back(
        monkeypatch, resend):
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from privseg.federated.app import CountingGrid

    for k in ("_run_id", "_task_id", "_node_id"):  # as in a ServerApp process
        monkeypatch.setattr(TaskIdentity, k, 1)

    grid = LosingGrid()
    counting = CountingGrid(grid, poll_s=0.0, resend=resend)
    ins = [Message(content=RecordDict(), dst_node_id=n, message_type="train", group_id="2")
           for n in (1, 2)]
    replies = counting.send_and_receive(ins, timeout=5.0)
    by_node = {grid.pushed[int(r.metadata.reply_to_message_id[1:]) - 1].metadata.dst_node_id: r
               for r in replies}
    assert sorted(by_node) == [1, 2]
    if resend:  # node 2's instruction went again after it was back; its reply is not an error
        assert counting.resent == [("2", 2)] and not by_node[2].has_error()
        assert [m.metadata.dst_node_id for m in grid.pushed] == [1, 2, 2]
        assert grid.polls >= 3
    else:  # Flower's behaviour: the error stands
        assert counting.resent == [] and by_node[2].has_error()
        assert len(grid.pushed) == 2


class ReactivatingGrid(LosingGrid):
    """A SuperLink grid whose node 2 restarts (activated again) after its first instruction
    was delivered: that instruction's reply never comes and no error says so, as when the
    SuperLink's pull missed the node's 0.3 s offline spell (seen in CI)."""

    def __init__(self, restarts: bool = True):
        super().__init__()
        self.restarts, self.looks = restarts, 0

    def get_nodes(self):
        from types import SimpleNamespace

        self.looks += 1
        again = self.restarts and self.looks > 2
        return [SimpleNamespace(node_id=1, last_activated_at="t0"),
                SimpleNamespace(node_id=2, last_activated_at="t1" if again else "t0")]

    def pull_messages(self, ids):
        from flwr.app import RecordDict

        return [m.create_reply(RecordDict()) for m in self.pushed
                if m.metadata.message_id in ids and m.metadata.message_id != "m2"]


@pytest.mark.parametrize("restarts", [True, False])
def test_instruction_to_a_restarted_supernode_is_resent_without_an_error(monkeypatch,
                                                                          restarts):
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from privseg.federated.app import CountingGrid

    for k in ("_run_id", "_task_id", "_node_id"):  # as in a ServerApp process
        monkeypatch.setattr(TaskIdentity, k, 1)

    grid = ReactivatingGrid(restarts)
    counting = CountingGrid(grid, poll_s=0.0, resend=True)
    counting.activation_check_s = 0.0
    ins = [Message(content=RecordDict(), dst_node_id=n, message_type="train", group_id="2")
           for n in (1, 2)]
    replies = counting.send_and_receive(ins, timeout=1.0)
    nodes = sorted(grid.pushed[int(r.metadata.reply_to_message_id[1:]) - 1].metadata.dst_node_id
                   for r in replies)
    if restarts:  # sent again once, to the restarted node, and answered
        assert counting.resent == [("2", 2)] and nodes == [1, 2]
        assert [m.metadata.dst_node_id for m in grid.pushed] == [1, 2, 2]
    else:  # the same session still owes its reply: nothing is resent
        assert counting.resent == [] and nodes == [1] and len(grid.pushed) == 2


class SilentGrid(ReactivatingGrid):
    """A SuperLink grid on which the nodes in :attr:`silent` never answer, restart or fail."""

    def __init__(self):
        super().__init__(restarts=False)
        self.silent = {2}

    def pull_messages(self, ids):
        from flwr.app import RecordDict

        return [m.create_reply(RecordDict()) for m in self.pushed
                if m.metadata.message_id in ids and m.metadata.dst_node_id not in self.silent]


@pytest.mark.parametrize("message_type", ["train", "evaluate"])
def test_round_timeout_bounds_a_round_flower_gives_no_timeout(monkeypatch, message_type):
    """Flower 1.42's fit and evaluate workflows call ``send_and_receive`` without a timeout;
    a reply lost without any sign (node 2 neither answers nor restarts) must not hold the
    round past the run's --round-timeout: node 1's reply comes back, node 2 is missed."""
    import threading

    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from privseg.federated.app import CountingGrid

    for k in ("_run_id", "_task_id", "_node_id"):  # as in a ServerApp process
        monkeypatch.setattr(TaskIdentity, k, 1)

    grid = SilentGrid()
    counting = CountingGrid(grid, poll_s=0.01, resend=True, round_timeout=0.3)
    ins = [Message(content=RecordDict(), dst_node_id=n, message_type=message_type,
                   group_id="2") for n in (1, 2)]
    out: list = []
    call = threading.Thread(target=lambda: out.append(counting.send_and_receive(ins)),
                            daemon=True)
    t0 = time.monotonic()
    call.start()
    call.join(20.0)
    assert not call.is_alive(), "the round waited past its deadline for the lost reply"
    assert time.monotonic() - t0 >= 0.3
    (replies,) = out
    assert [grid.pushed[int(r.metadata.reply_to_message_id[1:]) - 1].metadata.dst_node_id
            for r in replies] == [1]
    # a call that is not a round's (the sites' first contact) still waits as Flower asks
    props = [Message(content=RecordDict(), dst_node_id=2, message_type="query", group_id="")]
    first = threading.Thread(target=lambda: counting.send_and_receive(props), daemon=True)
    first.start()
    first.join(1.0)
    assert first.is_alive()
    grid.silent = set()  # node 2 answers at last: that call ends
    first.join(20.0)
    assert not first.is_alive()


@pytest.mark.parametrize("command", [
    ["server"], ["run", "--superlink", "127.0.0.1:1"], ["testbed"],
    ["link-sweep", "--bandwidths", "none,none,none"]])
@pytest.mark.parametrize("seconds", ["0", "-5"])
def test_round_timeout_of_zero_or_less_is_refused_before_any_run(monkeypatch, tmp_path,
                                                                  command, seconds):
    """A deadline of zero or less would miss every site of every round (Flower's legacy
    server drops all replies; the deployed run stores 0 as "no limit"): the CLI refuses it
    before it builds a run, and a positive one reaches the run as given."""
    from typer.testing import CliRunner

    import privseg.federated.deploy as deploy
    import privseg.federated.federation as federation
    import privseg.federated.link_sweep as link_sweep
    import privseg.federated.testbed as testbed
    from privseg.cli import app

    reached: list = []

    def stop(*args, **kwargs):
        reached.append(kwargs.get("round_timeout", args[4] if len(args) > 4 else None))
        raise RuntimeError("the run was started")

    for module, name in [(deploy, "run_server"), (federation, "run_federation"),
                         (testbed, "run_testbed"), (link_sweep, "link_sweep")]:
        monkeypatch.setattr(module, name, stop)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the testbed's SIGTERM handler
    config = tmp_path / "fed.yaml"  # the testbed needs a file; the others take it as well
    config.write_text((Path(deploy.__file__).parents[1] / "configs"
                       / "phantom2d-federated.yaml").read_text())
    args = ["federated", command[0], str(config), *command[1:], "--round-timeout"]
    refused = CliRunner().invoke(app, [*args, seconds])
    assert refused.exit_code == 2 and "positive number of seconds" in refused.output
    assert reached == []
    CliRunner().invoke(app, [*args, "7.5"])
    assert reached == [7.5]


@pytest.mark.parametrize("seconds", [0.0, -5.0])
def test_round_timeout_of_zero_or_less_is_refused_by_every_entry_point(monkeypatch, tmp_path,
                                                                       seconds):
    """The programmatic entry points refuse what the CLI refuses, before they build anything:
    ``run_federation``, ``run_server``, ``run_testbed``, ``link_sweep`` and, for a negative
    one, the ServerApp reading a run config submitted by hand (``flwr run --run-config``)."""
    from types import SimpleNamespace

    import yaml

    import privseg.datasets
    import privseg.federated.deploy as deploy
    import privseg.federated.federation as federation
    import privseg.federated.server as server
    import privseg.federated.testbed as testbed
    from privseg.errors import ConfigError
    from privseg.federated.app import CONFIG_KEY, SITES_KEY, TIMEOUT_KEY, serve_federation
    from privseg.federated.link_sweep import link_sweep

    built: list[str] = []

    def building(name):
        def record(*args, **kwargs):
            built.append(name)
            raise RuntimeError(f"{name} was reached")
        return record

    monkeypatch.setattr(federation, "flower_command", building("flower_command"))
    monkeypatch.setattr(deploy, "make_server", building("make_server"))
    monkeypatch.setattr(server, "make_server", building("make_server"))
    monkeypatch.setattr(privseg.datasets, "load_dataset", building("load_dataset"))
    run_testbed = testbed.run_testbed
    monkeypatch.setattr(testbed, "run_testbed", building("run_testbed"))  # link_sweep's
    path = Path(deploy.__file__).parents[1] / "configs" / "phantom2d-federated.yaml"
    base = yaml.safe_load(path.read_text())
    cfg = parse_config(base)
    context = SimpleNamespace(run_id=1, run_config={
        CONFIG_KEY: json.dumps(cfg.model_dump(mode="json")), SITES_KEY: 3,
        TIMEOUT_KEY: seconds})
    calls = [
        lambda: federation.run_federation(cfg, 3, superlink="127.0.0.1:1",
                                          round_timeout=seconds),
        lambda: deploy.run_server(cfg, "127.0.0.1:1", 3, round_timeout=seconds),
        lambda: run_testbed(cfg, path, 3, tmp_path / "testbed", round_timeout=seconds),
        lambda: link_sweep(base, [{"a": None}], [1.0], tmp_path, round_timeout=seconds),
    ]
    if seconds < 0:  # in the run config 0 is how "no limit" is written (run_config_toml)
        calls.append(lambda: serve_federation(None, context))
    for call in calls:
        with pytest.raises(ConfigError, match="positive number of seconds"):
            call()
    assert built == []


def test_record_is_awaited_while_the_superlink_says_the_run_goes_on(tmp_path):
    """``flwr run`` can end (exit 0) while the ServerApp still works (seen on the testbed:
    its stream ended while the ServerApp awaited a lost site): the record is awaited past the
    grace period for as long as the run is live, and not once it is finished."""
    from privseg.federated.federation import await_record
    from privseg.record import write_record

    asked = []

    def live() -> bool:  # the ServerApp writes its record while the operator waits
        asked.append(1)
        if len(asked) == 2:
            write_record(tmp_path, {"federated": {"transport": {"flower_run_id": 5}}})
        return True

    rec = await_record(tmp_path, 5, wait=0.0, poll_s=0.0, still_running=live, longest=60,
                       recheck_s=0.0)
    assert rec["federated"]["transport"]["flower_run_id"] == 5 and len(asked) == 2
    assert await_record(tmp_path / "none", 5, wait=0.0, poll_s=0.0,
                        still_running=lambda: False, longest=60, recheck_s=0.0) is None


def _waits_before_success(grid, failures: int) -> list[float]:
    """The waits the grid's retry invoker takes for a call that fails ``failures`` times (the
    SuperLink unreachable), recorded instead of slept."""
    import random

    import httpx

    invoker, waits, left = grid._retry_invoker, [], [failures]
    invoker.wait_function = waits.append

    def call():
        if left[0]:
            left[0] -= 1
            raise httpx.ConnectError("connection refused")
        return "answered"

    random.seed(0)  # Flower's full jitter draws from `random`
    assert invoker.invoke(call) == "answered"
    return waits


def test_serverapp_retries_a_restarting_superlink_within_a_second():
    """The ServerApp's calls and its task heartbeat share the grid's retry invoker; with
    Flower's backoff (waits growing to 20 s, slept out in full) the heartbeat could miss the
    SuperLink's 60 s task expiry across a short restart, and the 401 that follows stops the
    ServerApp (seen in CI: "the ServerApp stopped in round 2"). Capped, no wait exceeds 1 s."""
    from flwr.superlink.grid import HttpGrid

    from privseg.federated.app import RUNTIME_RETRY_MAX_S, retry_runtime_promptly

    stock = _waits_before_success(HttpGrid(token="t"), 8)
    assert max(stock) > 4 * RUNTIME_RETRY_MAX_S  # what the cap is for
    grid = HttpGrid(token="t")
    assert retry_runtime_promptly(grid) is True
    capped = _waits_before_success(grid, 8)
    assert len(capped) == 8 and max(capped) <= RUNTIME_RETRY_MAX_S
    assert sum(capped) < sum(stock) / 4
    assert retry_runtime_promptly(object()) is False  # the simulation's grid has none


@pytest.mark.parametrize("exit_", [SystemExit(1), KeyboardInterrupt()])
def test_serverapp_stopped_by_flower_writes_its_failed_record_at_once(tmp_path, monkeypatch,
                                                                      exit_):
    """Flower ends a ServerApp by ``sys.exit`` from its signal handler (a signal, or the 401
    of an expired task), which ``except Exception`` does not see: the failed record must still
    be written then, with why and for which Flower run, so that ``privseg federated run``
    reports it at once instead of waiting ``--lost-wait`` (600 s) for a record."""
    from types import SimpleNamespace

    import privseg.federated.secagg as secagg
    from privseg.federated import app

    d = tiny(tmp_path)
    cfg = parse_config(d)
    output = tmp_path / "out"

    def stopped(*args, **kwargs):
        raise exit_

    monkeypatch.setattr(secagg, "run_workflow", stopped)
    context = SimpleNamespace(run_id=42, run_config={
        app.CONFIG_KEY: json.dumps(cfg.model_dump(mode="json")), app.SITES_KEY: 3,
        app.OUTPUT_KEY: str(output), app.TIMEOUT_KEY: 0.0})
    with pytest.raises(type(exit_)):
        app.serve_federation(object(), context)
    directory = run_dir(output, cfg.run_id())
    rec = read_any_record(directory)
    assert rec["status"] == "failed"
    assert rec["error"].startswith("RuntimeError: Flower stopped the ServerApp in round 0 "
                                   f"({type(exit_).__name__}")
    assert rec["federated"]["transport"]["flower_run_id"] == 42
    assert read_progress(directory) is None


def test_a_site_update_holding_nan_is_left_out_not_summed_unclipped(monkeypatch, tmp_path):
    """Site-level DP clips each update by its norm, and ``min(1, C / nan)`` is 1: an update
    holding one NaN would enter the noisy sum with its other coordinates unclipped (here of a
    norm 1000 times the site's real update). The server leaves it out as it does a failed
    site's, and the clipped sum it adds noise to stays within (sites summed) × C."""
    import numpy as np
    from flwr.common import parameters_to_ndarrays

    from privseg.datasets import load_dataset
    from privseg.federated.server import NONFINITE_UPDATE
    from privseg.federated.simulation import simulate
    from privseg.federated.site_dp import PoissonSiteDP

    fit = SiteClient._fit

    def poisoned(self, parameters, config):
        weights, n, metrics = fit(self, parameters, config)
        if self.site == "site-B" and int(config["round"]) == 1:
            weights = [p + 1e3 * (w - p) for w, p in zip(weights, parameters, strict=True)]
            weights[0] = weights[0].copy()
            weights[0].flat[0] = np.nan
        return weights, n, metrics

    sums = []
    clipped_sum = PoissonSiteDP.clipped_sum

    def observed(self, updates):
        total = clipped_sum(self, updates)
        sums.append((len(updates), self.clipping_norm,
                     float(np.sqrt(sum(np.sum(t.astype(np.float64) ** 2) for t in total)))))
        return total

    monkeypatch.setattr(SiteClient, "_fit", poisoned)
    monkeypatch.setattr(PoissonSiteDP, "clipped_sum", observed)
    d = tiny(tmp_path, dp_mode="site", fraction_fit=1.0, rounds=2, local_steps=1,
             eval_every=0, min_fit_sites=2)
    cfg = parse_config(d)
    server, _, _ = simulate(cfg, load_dataset("phantom", cfg.dataset.options, None,
                                              tmp_path / "cache"))
    h = server.record()["history"]
    assert h[0]["missed"] == [{"site": "site-B", "reason": NONFINITE_UPDATE}]
    assert h[0]["sites"] == ["site-A", "site-C"] and "missed" not in h[1]
    assert [n for n, _, _ in sums] == [2, 3]
    for n, clip, norm in sums:
        assert norm <= n * clip * (1 + 1e-5)
    assert all(np.isfinite(a).all() for a in parameters_to_ndarrays(server.parameters))


def test_the_site_level_sum_refuses_an_update_no_clipping_bounds():
    import numpy as np

    from privseg.federated.site_dp import PoissonSiteDP

    dp = PoissonSiteDP(None, 1.0, 1.0, 1.0)
    dp.current = [np.zeros(3, np.float32)]
    assert np.linalg.norm(dp.clipped_sum([[np.array([30.0, 40.0, 0.0], np.float32)]])[0]) \
        == pytest.approx(1.0)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN or infinity"):
            dp.clipped_sum([[np.array([1e4, 0.0, bad], np.float32)]])


@pytest.mark.parametrize("where", [0, 1])
def test_under_secure_aggregation_a_site_whose_update_holds_nan_sends_nothing(
        monkeypatch, tmp_path, where):
    """Under SecAgg+ the server sees only the masked sum, so the site itself must refuse an
    update holding a NaN (there ``min(1, C / nan)`` is 1: unclipped), in whichever of its
    arrays the NaN lies. The run stops with nothing released, and the reason the server reads
    carries no statistic of the update."""
    import numpy as np

    fit = SiteClient._fit

    def poisoned(self, parameters, config):
        weights, n, metrics = fit(self, parameters, config)
        if self.site == "site-B":  # the update's other values stay within SecAgg+'s range
            weights[where] = weights[where].copy()
            weights[where].flat[0] = np.nan
        return weights, n, metrics

    monkeypatch.setattr(SiteClient, "_fit", poisoned)
    cfg = parse_config(secagg_tiny(tmp_path, rounds=1, local_steps=1, eval_every=0))
    with pytest.raises(ValueError, match="node 1002: a model value is not finite or lies"):
        run_federated(cfg, progress=False, force=True)  # in-process: the site's own error
    rec = raw_record(cfg)
    assert rec["status"] == "failed" and rec["rounds_done"] == 0
    assert "magnitude" not in json.dumps(rec)


def test_a_federation_whose_sites_have_no_validation_subjects_completes(tmp_path):
    """dataset.val_fraction 0 with the default eval_every: each site answers a validation
    round with no subjects (and no Dice); the round records none, the run goes on to its
    test (a KeyError stopped it before)."""
    d = tiny(tmp_path, rounds=2)
    d["dataset"]["val_fraction"] = 0.0
    rec = run_federated(parse_config(d), progress=False, force=True)
    assert [h["val_n_subjects"] for h in rec["history"]] == [0, 0]
    assert all(h["val_per_site"] == {} and math.isnan(h["val_mean_dice"])
               for h in rec["history"])
    assert rec["test"]["n_subjects"] > 0 and math.isfinite(rec["test"]["mean_dice"])
