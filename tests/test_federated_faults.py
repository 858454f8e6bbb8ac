"""Faults survived, nothing lost: a site failing mid-run, a run that cannot go on (issue 18)."""

from __future__ import annotations

import json
import os
import signal
import warnings

import pytest
from test_federated import dp_accounting_epsilon, secagg_tiny, tiny

from privseg.config import parse_config
from privseg.federated.client import SiteClient
from privseg.federated.server import SAMPLE_DROPOUT_NOTE, SITE_DROPOUT_NOTE
from privseg.federated.simulation import run_federated
from privseg.federated.site_plans import site_level_epsilon
from privseg.record import RECORD_NAME, read_record, run_dir

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
    # site-B took no step in round 2: its accountant composed the 2 rounds it trained
    assert p["steps_per_site"]["site-B"] == 2 * 2
    assert p["epsilon_per_site"]["site-B"] == pytest.approx(dp_accounting_epsilon(
        p["noise_multiplier_per_site"]["site-B"], p["sample_rate_per_site"]["site-B"], 4,
        p["delta_per_site"]["site-B"]), rel=1e-6)
    assert p["epsilon_per_site"]["site-B"] < base["epsilon_per_site"]["site-B"]
    assert SAMPLE_DROPOUT_NOTE in p["not_covered"]
    assert SAMPLE_DROPOUT_NOTE not in base["not_covered"]


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
    for s, steps in p["steps_per_site"].items():
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


@pytest.mark.parametrize("max_wait,starts,code", [(30.0, 3, 0), (None, 1, 305 % 256)])
def test_refused_supernode_is_started_again_until_max_wait(monkeypatch, tmp_path, max_wait,
                                                           starts, code):
    """A SuperNode refused by the SuperLink (exit 305: a quick re-activation) is started
    again until ``--max-wait``; without it the refusal is the site's exit code (305 modulo
    256 as a process exit status)."""
    from privseg.federated import supernode

    count = tmp_path / "starts"
    script = tmp_path / "supernode"  # refused twice, then served and stopped cleanly
    script.write_text(f'#!/bin/sh\necho x >> {count}\n'
                      f'[ "$(wc -l < {count})" -ge 3 ] && exit 0\nexit 305\n')
    script.chmod(0o755)
    monkeypatch.setattr(supernode.SiteWorker, "load", staticmethod(lambda *a: IdleWorker()))
    monkeypatch.setattr(supernode, "supernode_command", lambda *a: [str(script)])
    monkeypatch.setattr(supernode, "ACTIVATION_RETRY_S", 0.05)
    got = supernode.serve_site([], "site-A", "127.0.0.1:9", max_wait=max_wait)
    assert got == code and len(count.read_text().splitlines()) == starts


def test_refusal_recognised_by_flowers_message_whatever_the_exit_status(monkeypatch,
                                                                        tmp_path):
    """Flower prints "Exit Code: 305" but the process exits with 1 when its runtime server had
    started (seen on the testbed: a SuperNode restarted at once after kill -9): still a
    refusal, started again; another exit 1 is not."""
    from privseg.federated import supernode

    count = tmp_path / "starts"
    script = tmp_path / "supernode"  # refused (exit 1 + Flower's line), then a real crash
    child = tmp_path / "child"  # like Flower's SuperExec: outlives it, holding its output
    script.write_text(f'#!/bin/sh\necho x >> {count}\n'
                      f'[ "$(wc -l < {count})" -ge 2 ] && exit 1\n'
                      f'sleep 600 & echo $! > {child}\n'
                      'echo "ERROR :     Exit Code: 305"\nexit 1\n')
    script.chmod(0o755)
    monkeypatch.setattr(supernode.SiteWorker, "load", staticmethod(lambda *a: IdleWorker()))
    monkeypatch.setattr(supernode, "supernode_command", lambda *a: [str(script)])
    monkeypatch.setattr(supernode, "ACTIVATION_RETRY_S", 0.05)
    got = supernode.serve_site([], "site-A", "127.0.0.1:9", max_wait=30.0)
    assert got == 1 and len(count.read_text().splitlines()) == 2
    pid = int(child.read_text())
    try:  # the retry did not wait for the SuperNode's children to close its output
        os.kill(pid, 0)
    finally:
        os.kill(pid, signal.SIGKILL)


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
