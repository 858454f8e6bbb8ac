"""Federated training on Flower: sites, privacy accounting, simulation, loopback deployment."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from privseg.config import ConfigError, parse_config
from privseg.datasets import load_dataset
from privseg.federated.privacy import plan_site_sample, site_level_epsilon, site_level_plan
from privseg.federated.simulation import run_federated
from privseg.federated.sites import build_sites

warnings.filterwarnings("ignore", module="opacus")


def tiny(tmp: Path, **federated) -> dict:
    """A federated phantom run small enough for CPU tests (3 sites × 5 subjects)."""
    fed = {"rounds": 2, "local_epochs": None, "local_steps": 2, "dp_mode": "sample",
           "eval_every": 1, **federated}
    return {
        "name": "tiny-fed", "seed": 3,
        "dataset": {"name": "phantom", "dims": 2, "cache_dir": str(tmp / "cache"),
                    "options": {"n_subjects": 15, "size": 16, "n_sites": 3},
                    "val_fraction": 0.1, "test_fraction": 0.2},
        "model": {"name": "unet", "options": {"width": 0.25, "depth": 2}},
        "training": {"epochs": 1, "expected_batch_size": 2, "physical_batch_size": 2,
                     "crops_per_subject": 1, "lr": 0.003, "device": "cpu"},
        "privacy": {"enabled": fed["dp_mode"] != "none", "target_epsilon": 8.0,
                    "accountant": "rdp"},
        "setting": {"kind": "federated", "federated": fed},
        "tracking": {"wandb": "off"},
        "output": {"dir": str(tmp / "runs")},
    }


def dp_accounting_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Google's dp_accounting (independent of Opacus) at the same integer RDP orders."""
    from dp_accounting import dp_event, rdp

    from privseg.privacy import RDP_ORDERS

    acc = rdp.RdpAccountant(orders=RDP_ORDERS)
    event = dp_event.GaussianDpEvent(sigma)
    if q < 1:
        event = dp_event.PoissonSampledDpEvent(q, event)
    acc.compose(event, steps)
    return acc.get_epsilon(delta)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fed")


@pytest.fixture(scope="module")
def sample_record(workdir):
    cfg = parse_config(tiny(workdir))
    return run_federated(cfg, progress=False, force=True)


def test_phantom_splits_into_three_sites(workdir):
    cfg = parse_config(tiny(workdir))
    ss = load_dataset("phantom", cfg.dataset.options, None, workdir / "cache")
    sites, desc = build_sites(cfg, ss)
    assert sorted(sites) == ["site-A", "site-B", "site-C"]
    assert desc["method"] == "natural"
    seen = []
    for name, s in sites.items():
        members = s.train + s.val + s.test
        assert all(m.site == name for m in members)
        assert len(s.train) >= 2 and len(s.test) >= 1
        seen += [m.subject_id for m in members]
    assert sorted(seen) == sorted(x.subject_id for x in ss.subjects)


def test_config_checks():
    base = tiny(Path("/tmp"))
    bad = dict(base, privacy=dict(base["privacy"], enabled=False))
    with pytest.raises(ConfigError, match="dp_mode"):
        parse_config(bad)
    bad = tiny(Path("/tmp"), dp_mode="site", strategy="fedadam")
    with pytest.raises(ConfigError, match="fedadam|FedAdam"):
        parse_config(bad)
    with pytest.raises(ConfigError, match="local_epochs"):
        parse_config(tiny(Path("/tmp"), local_epochs=1))
    central = parse_config({"setting": {"kind": "central"}, "tracking": {"wandb": "off"}})
    assert "federated" not in central.model_dump(mode="json")["setting"] or (
        central.setting.federated is None)


def test_sample_mode_epsilon_per_site_matches_independent_accountant(sample_record):
    p = sample_record["privacy"]
    assert p["mode"] == "sample" and p["unit"] == "subject"
    assert set(p["epsilon_per_site"]) == {"site-A", "site-B", "site-C"}
    for site, eps in p["epsilon_per_site"].items():
        sigma, q = p["noise_multiplier_per_site"][site], p["sample_rate_per_site"][site]
        steps, delta = p["steps_per_site"][site], p["delta_per_site"][site]
        assert steps == p["planned_steps_per_site"][site] == 2 * 2  # rounds × local steps
        assert eps == pytest.approx(dp_accounting_epsilon(sigma, q, steps, delta), rel=1e-6)
        assert eps <= 8.0 + 0.05
    assert p["epsilon"] == max(p["epsilon_per_site"].values())


def test_sample_mode_calibration_counts_all_rounds(workdir):
    cfg = parse_config(tiny(workdir, rounds=5, local_steps=3))
    plan = plan_site_sample(cfg, 10)
    assert plan.steps == 15 and plan.sample_rate == pytest.approx(0.2)
    eps = dp_accounting_epsilon(plan.noise_multiplier, 0.2, 15, plan.delta)
    assert eps == pytest.approx(8.0, abs=0.05)


@pytest.mark.parametrize("fraction,rounds", [(1.0, 4), (2 / 3, 10)])
def test_site_mode_epsilon_matches_dp_accounting(workdir, fraction, rounds):
    cfg = parse_config(tiny(workdir, dp_mode="site", fraction_fit=fraction, rounds=rounds))
    plan = site_level_plan(cfg, 3)
    assert plan["sites_per_round"] == round(3 * fraction)
    assert plan["unit"] == "site"
    eps = site_level_epsilon(plan["noise_multiplier"], plan["sample_rate"], rounds,
                             plan["delta"], "rdp")
    indep = dp_accounting_epsilon(plan["noise_multiplier"], plan["sample_rate"], rounds,
                                  plan["delta"])
    assert eps == pytest.approx(indep, rel=1e-6)
    assert eps == pytest.approx(8.0, abs=0.05)


def test_site_mode_run_records_site_level_guarantee(workdir):
    cfg = parse_config(tiny(workdir, dp_mode="site", fraction_fit=2 / 3, rounds=2,
                            local_steps=1, eval_every=0))
    rec = run_federated(cfg, progress=False, force=True)
    p = rec["privacy"]
    assert p["mode"] == "site" and p["unit"] == "site" and p["rounds_done"] == 2
    assert p["epsilon"] == pytest.approx(
        dp_accounting_epsilon(p["noise_multiplier"], p["sample_rate"], 2, p["delta"]), rel=1e-6)
    assert "whole site" in p["guarantee"]
    assert all(r["sites"] == 2 for r in rec["federated"]["bytes_per_round"])


def test_bytes_per_round_equal_parameter_payload(sample_record):
    from flwr.common import ndarrays_to_parameters

    from privseg.federated.server import initial_model_weights

    fed = sample_record["federated"]
    weights = initial_model_weights(parse_config(sample_record["config"]), 1, 8)
    payload = sum(len(t) for t in ndarrays_to_parameters(weights).tensors)
    raw = sum(w.nbytes for w in weights)
    assert fed["parameter_payload_bytes"] == payload
    assert raw < payload < raw + 200 * len(weights)  # arrays + .npy headers
    for row in fed["bytes_per_round"]:
        assert row["down"] == row["up"] == 3 * payload > 0
    # the in-process transport sent Flower's protobuf messages: payload + small framing
    for wire in fed["wire_bytes"].values():
        assert wire["site_to_server"] >= 2 * payload
    audit = fed["wire_audit"]
    assert audit["violations"] == [] and audit["fit_results"] == 6
    assert audit["fitres_fields"] == ["metrics", "num_examples", "parameters", "status"]


def test_simulation_is_deterministic(workdir, sample_record):
    cfg = parse_config(tiny(workdir))
    again = run_federated(cfg, progress=False, force=True)
    assert again["test"]["dice"] == sample_record["test"]["dice"]
    assert again["history"][-1]["val_per_site"] == sample_record["history"][-1]["val_per_site"]
    assert again["privacy"]["epsilon_per_site"] == sample_record["privacy"]["epsilon_per_site"]
    t = again["timing"]
    assert t["site_compute_s"] > 0 and t["simulation_overhead"] is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_loopback_deployment_matches_simulation(workdir, sample_record):
    """A real server and three site processes on 127.0.0.1 give the simulation's result."""
    cfg_path = workdir / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny(workdir)))
    port = _free_port()
    out = workdir / "deployed"
    cli = [sys.executable, "-c", "from privseg.cli import main; main()", "federated"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = {n: open(workdir / f"{n}.log", "w") for n in ("server", "A", "B", "C")}  # noqa: SIM115
    procs = [subprocess.Popen(cli + ["server", str(cfg_path), "--address", f"127.0.0.1:{port}",
                                     "--sites", "3", "--output", str(out)],
                              stdout=logs["server"], stderr=subprocess.STDOUT, env=env)]
    for s in "ABC":
        procs.append(subprocess.Popen(
            cli + ["site", str(cfg_path), "--site", f"site-{s}", "--server",
                   f"127.0.0.1:{port}", "--max-wait", "60"],
            stdout=logs[s], stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + 240
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs.values():
            f.close()
    codes = [p.returncode for p in procs]
    assert codes == [0, 0, 0, 0], (workdir / "server.log").read_text()[-3000:]
    from privseg.record import read_record

    rec = read_record(out / sample_record["run_id"])
    assert rec is not None and rec["timing"]["mode"].startswith("deployment")
    # Same seed, same objects, sites run in their own processes: results are identical
    # (each site's randomness is its own; the server orders results by site before summing).
    assert rec["test"]["dice"] == sample_record["test"]["dice"]
    assert [h.get("val_per_site") for h in rec["history"]] == [
        h.get("val_per_site") for h in sample_record["history"]]
    assert rec["privacy"]["epsilon_per_site"] == sample_record["privacy"]["epsilon_per_site"]
    assert rec["federated"]["bytes_per_round"] == sample_record["federated"]["bytes_per_round"]
    # Invariant 5: what the strategy received from the sites over gRPC
    audit = rec["federated"]["wire_audit"]
    assert audit["violations"] == []
    assert audit["fitres_fields"] == ["metrics", "num_examples", "parameters", "status"]
    assert set(audit["metric_types"]) <= {"float", "int", "str", "bool"}
    assert math.isfinite(rec["test"]["mean_dice"]) and np.isfinite(rec["privacy"]["epsilon"])
