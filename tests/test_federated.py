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
from privseg.federated.simulation import run_federated
from privseg.federated.site_plans import plan_site_sample, site_level_epsilon, site_level_plan
from privseg.federated.sites import build_sites

warnings.filterwarnings("ignore", module="opacus")


def assert_dice_close(got: dict, want: dict, tol: float = 1e-3) -> None:
    """Two federated records agree on test Dice per class and per-round site validation Dice
    within ``tol`` (SecAgg+'s quantisation moves the model by a few quanta)."""
    for c, v in want["test"]["dice"].items():
        assert got["test"]["dice"][c] == pytest.approx(v, abs=tol)
    for hg, hw in zip(got["history"], want["history"], strict=True):
        for site, v in hw["val_per_site"].items():
            assert hg["val_per_site"][site] == pytest.approx(v, abs=tol)


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
        # noise_seed: reproducible DP noise, so that runs can be compared exactly
        "privacy": {"enabled": fed["dp_mode"] != "none", "target_epsilon": 8.0,
                    "accountant": "rdp", "noise_seed": 0},
        "setting": {"kind": "federated", "federated": fed},
        "tracking": {"wandb": "off"},
        "output": {"dir": str(tmp / "runs")},
    }


def dp_accounting_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Google's dp_accounting (independent of Opacus) at the same integer RDP orders."""
    from dp_accounting import dp_event, rdp

    from privseg.dp.accounting import RDP_ORDERS

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
    with pytest.raises(ConfigError, match="local_baseline=true needs dp_mode"):
        parse_config(tiny(Path("/tmp"), dp_mode="site", local_baseline=True))
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
    """q = fraction_fit is each site's Poisson inclusion probability (q = 1: every site every
    round, accounted without amplification as plain Gaussian compositions)."""
    cfg = parse_config(tiny(workdir, dp_mode="site", fraction_fit=fraction, rounds=rounds))
    plan = site_level_plan(cfg, 3)
    assert plan["sample_rate"] == fraction and plan["denominator"] == pytest.approx(3 * fraction)
    assert ("Poisson" in plan["sampling"]) == (fraction < 1)
    assert plan["unit"] == "site" and "enrolled site's whole data" in plan["neighbouring"]
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
    assert "whole site" in p["guarantee"] and "Poisson" in p["guarantee"]
    assert p["delta"] == 1e-5  # min(1e-5, 1/N^1.1): 0.30 for 3 sites before
    assert any("took part" in x for x in p["not_covered"])


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
    # where the sites' compute went: its parts add up to it; batch loading is part of train_s
    split = t["site_compute_split_s"]
    assert set(split) == {"calibration_s", "setup_s", "train_s", "accounting_s", "eval_s",
                     "exchange_s"}
    assert sum(split.values()) == pytest.approx(t["site_compute_s"], rel=1e-6)
    assert 0 < t["site_data_s"] <= split["train_s"] and split["eval_s"] > 0
    assert t["load_s"] > 0 and t["startup_s"] > 0


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
                                     "--sites", "3", "--output", str(out),
                                     "--allow-reproducible-noise"],
                              stdout=logs["server"], stderr=subprocess.STDOUT, env=env)]
    for s in "ABC":
        procs.append(subprocess.Popen(
            cli + ["site", str(cfg_path), "--site", f"site-{s}", "--server",
                   f"127.0.0.1:{port}", "--max-wait", "60", "--allow-reproducible-noise"],
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


# -- secure aggregation (Flower SecAgg+) with site-level DP ---------------------------------

#: SecAgg+ quantisation step: values in [-R, R] map to Q integer levels (R = 8, Q = 2^22)
QUANTUM = 2 * 8.0 / 2**22


def secagg_tiny(tmp: Path, secure: bool = True, sigma: float | None = 0.0, **federated) -> dict:
    """``tiny`` in site mode; σ fixed (0: no noise) or calibrated to ε = 8 (None); SGD.

    17 subjects: sites train on 4, 4 and 3, so weighting by subjects would show.
    """
    fed = {"dp_mode": "site", "secure_aggregation": secure, "eval_every": 1, **federated}
    d = tiny(tmp, **fed)
    d["dataset"]["options"]["n_subjects"] = 17
    # noise_seed: SecAgg+'s stochastic rounding (secret by default) repeats, so the quantisation
    # bounds below are checked on one fixed draw, as before rounding streams were secret
    d["privacy"] = {"enabled": True, "accountant": "rdp", "target_epsilon": 8.0 if sigma is None
                    else None, "noise_multiplier": sigma, "noise_seed": 0}
    # SGD: a difference of a few quanta in the round-1 model stays a few quanta after the
    # round-2 steps (Adam's first steps are ~lr·sign(g) and can amplify it in coordinates
    # whose gradient is near 0).
    d["training"].update(optimizer="sgd", lr=0.05)
    return d


def _secagg_sites(cfg):
    from privseg.federated.client import SiteClient

    ss = load_dataset("phantom", cfg.dataset.options, None, Path(cfg.dataset.cache_dir))
    sites, _ = build_sites(cfg, ss)
    return ss, {name: SiteClient(cfg, data, ss) for name, data in sites.items()}


def test_secagg_matches_plain_site_dp_within_quantisation(workdir):
    """(a) SecAgg+ with σ = 0 gives the plain site-mode model up to SecAgg+ rounding.

    Tolerance 3 quanta per value (quantum = 2R/Q = 3.8e-6): SecAgg+ rounds each site's
    values stochastically to the grid, so the round-1 mean is off by less than 1 quantum; round
    2 adds < 1 more, plus the round-1 error carried through 2 SGD steps (lr 0.05), which stays
    near 1 quantum. Metrics: the same argmax masks up to a pixel, 1e-3 in Dice.
    """
    from flwr.common import parameters_to_ndarrays

    from privseg.federated.server import initial_model_weights
    from privseg.federated.simulation import simulate

    out = {}
    for secure in (False, True):  # clipping binds (updates ~0.2): server- vs site-side clipping
        cfg = parse_config(secagg_tiny(workdir, secure, site_clip_norm=0.1))
        ss = load_dataset("phantom", cfg.dataset.options, None, workdir / "cache")
        server, _, _ = simulate(cfg, ss)
        out[secure] = (parameters_to_ndarrays(server.parameters), server.record())
    (plain, rec_p), (masked, rec_s) = out[False], out[True]
    assert rec_s["federated"]["secure_aggregation"] is True
    assert rec_p["federated"]["secure_aggregation"] is False
    assert [a.dtype for a in masked] == [a.dtype for a in plain]
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(plain, masked, strict=True))
    assert 0 < diff <= 3 * QUANTUM  # 0: the quantised path ran; bound: it changed nothing else
    init = initial_model_weights(parse_config(secagg_tiny(workdir)), 1, 8)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(plain, init, strict=True))
    assert moved > 1000 * QUANTUM  # training moved the model far more than the tolerance
    assert_dice_close(rec_s, rec_p)
    assert rec_s["federated"]["wire_audit"]["violations"] == []


def test_secagg_server_never_receives_a_plain_update(workdir):
    """(b) What crosses the grid from a site is masked; the unmasked sum is the mean update."""
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    from flwr.compat.common import recorddict_compat as compat

    from privseg.federated.secagg import simulate_secagg

    clip = 0.05  # small enough that clipping binds: the sites' updates are really clipped
    cfg = parse_config(secagg_tiny(workdir, site_clip_norm=clip, eval_every=0))
    _, clients = _secagg_sites(cfg)
    plain: dict[tuple[int, int], list] = {}  # (round, node) -> clipped parameters at the site
    masked: dict[tuple[int, int], list] = {}  # (round, node) -> masked vector that crossed
    sent_global: dict[int, list] = {}  # round -> global model sent with the fit instruction
    crossed_arrays: list = []
    weights: list[int] = []  # the weights the sites chose (DP-FedAvg: equal)

    def on_update(node, rnd, arrays):
        plain[(rnd, node)] = [a.copy() for a in arrays]

    def on_message(ins, reply):
        if ins.metadata.message_type != "train":
            return
        rnd, node = int(ins.metadata.group_id), reply.metadata.src_node_id
        for rec in reply.content.array_records.values():
            crossed_arrays.extend(rec.to_numpy_ndarrays())
        cfg_rec = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in cfg_rec:
            weights.append(compat.recorddict_to_fitres(reply.content, True).num_examples)
            masked[(rnd, node)] = [bytes_to_ndarray(b) for b in cfg_rec[Key.MASKED_PARAMETERS]]
            sent_global[rnd] = compat.recorddict_to_fitins(ins.content, True).parameters

    server, _, _ = simulate_secagg(cfg, clients, on_message=on_message,
                                   on_site_update=on_update)
    from flwr.common import parameters_to_ndarrays

    assert crossed_arrays == []  # no site reply carried a plain array
    assert weights == [1] * 6
    assert sorted(plain) == sorted(masked) and len(plain) == 2 * 3
    for (rnd, node), arrays in plain.items():
        start = parameters_to_ndarrays(sent_global[rnd])
        norm = math.sqrt(sum(float(np.sum((a - s) ** 2)) for a, s in zip(arrays, start,
                                                                            strict=True)))
        assert norm <= clip * (1 + 1e-5)  # the site clipped its update (fixedclipping_mod)
        # the masked vector, read as if it were the site's quantised values, is unrelated
        read = dequantize(masked[(rnd, node)][1:], 8.0, 2**22)
        close = sum(int(np.sum(np.abs(r - a) < 1e-3)) for r, a in zip(read, arrays,
                                                                       strict=True))
        assert close < 0.01 * sum(a.size for a in arrays)
    # unmasked, the sum is the equal-weight mean of the clipped models (σ = 0): the next global
    finals = {1: parameters_to_ndarrays(sent_global[2]), 2: parameters_to_ndarrays(
        server.parameters)}
    for rnd, glob in finals.items():
        nodes = sorted(n for r, n in plain if r == rnd)
        mean = [np.mean([plain[(rnd, n)][i] for n in nodes], axis=0) for i in range(len(glob))]
        err = max(float(np.max(np.abs(g - m))) for g, m in zip(glob, mean, strict=True))
        assert err <= QUANTUM + 1e-6


def test_secagg_record_epsilon_is_site_level_accountant(workdir):
    """(c) The record's ε under SecAgg+ is privacy.py's site-level ε (and dp_accounting's)."""
    cfg = parse_config(secagg_tiny(workdir, sigma=None, eval_every=0))
    rec = run_federated(cfg, progress=False, force=True)
    p = rec["privacy"]
    assert p["mode"] == "site" and p["unit"] == "site" and p["secure_aggregation"] is True
    assert rec["federated"]["secure_aggregation"] is True
    from privseg.federated.server import initial_model_weights

    assert p["model_size"] == sum(w.size for w in initial_model_weights(cfg, 1, 8))
    plan = site_level_plan(cfg, 3, p["model_size"])
    assert p["noise_multiplier"] == plan["noise_multiplier"] > 0 and p["rounds_done"] == 2
    # SecAgg+'s rounding: sensitivity C + √d·2R/Q, so the effective σ is below Flower's σ
    step = 2 * cfg.setting.federated.secagg_clipping_range / 2**22
    assert p["sensitivity"] == pytest.approx(1.0 + math.sqrt(p["model_size"]) * step)
    assert p["noise_multiplier_effective"] == pytest.approx(
        p["noise_multiplier"] / p["sensitivity"], rel=1e-12)
    eps = site_level_epsilon(plan["noise_multiplier_effective"], plan["sample_rate"], 2,
                             plan["delta"], "rdp")
    assert p["epsilon"] == eps
    assert eps == pytest.approx(dp_accounting_epsilon(plan["noise_multiplier_effective"], 1.0,
                                                      2, plan["delta"]), rel=1e-6)
    assert eps == pytest.approx(8.0, abs=0.05) and eps <= 8.0
    assert "secure aggregation" in p["guarantee"] and "whole site" in p["guarantee"]
    assert p["secagg"]["num_shares"] == 3 and p["secagg"]["reconstruction_threshold"] == 2
    for row in rec["federated"]["bytes_per_round"]:  # keys, shares and masked vectors
        assert row["up"] > rec["federated"]["parameter_payload_bytes"] * 3


def test_secagg_config_checks(workdir):
    """(d) Combinations that make no sense are refused, naming the key."""
    base = Path("/tmp")
    with pytest.raises(ConfigError, match="secure_aggregation.*dp_mode=site"):
        parse_config(tiny(base, secure_aggregation=True))  # dp_mode sample
    with pytest.raises(ConfigError, match="secure_aggregation.*dp_mode=site"):
        parse_config(tiny(base, dp_mode="none", secure_aggregation=True))
    with pytest.raises(ConfigError, match="secure_aggregation=true needs at least 3 sites"):
        parse_config(tiny(base, dp_mode="site", secure_aggregation=True,
                          partition="dirichlet", n_sites=2))
    with pytest.raises(ConfigError, match="secagg_reconstruction_threshold"):
        parse_config(tiny(base, dp_mode="site", secure_aggregation=True, secagg_num_shares=3,
                          secagg_reconstruction_threshold=3))
    with pytest.raises(ConfigError, match="secagg_num_shares"):
        parse_config(tiny(base, dp_mode="site", secure_aggregation=True, secagg_num_shares=2))
    # known only once the sites exist: two sites, or two chosen per round
    two = secagg_tiny(workdir)
    two["dataset"]["options"] = {"n_subjects": 10, "size": 16, "n_sites": 2}
    with pytest.raises(ConfigError, match="setting.federated.secure_aggregation.*2 site"):
        run_federated(parse_config(two), progress=False, force=True)
    with pytest.raises(ConfigError, match="fraction_fit"):
        run_federated(parse_config(secagg_tiny(workdir, fraction_fit=2 / 3)), progress=False,
                      force=True)
    with pytest.raises(ConfigError, match="secagg_num_shares=5"):
        run_federated(parse_config(secagg_tiny(workdir, secagg_num_shares=5)), progress=False,
                      force=True)
    # the gRPC deployment cannot run SecAgg+: it refuses rather than run without it
    from privseg.federated.deploy import run_server, run_site

    cfg = parse_config(secagg_tiny(workdir))
    with pytest.raises(ConfigError, match="secure_aggregation=true runs in the simulation"):
        run_server(cfg, "127.0.0.1:1", 3)
    with pytest.raises(ConfigError, match="secure_aggregation=true runs in the simulation"):
        run_site(cfg, "site-A", "127.0.0.1:1")
    # a model value outside SecAgg+'s range would be clipped silently: the site stops
    with pytest.raises(ValueError, match="secagg_clipping_range"):
        run_federated(parse_config(secagg_tiny(workdir, secagg_clipping_range=0.05)),
                      progress=False, force=True)


def test_secagg_fields_keep_earlier_run_ids():
    """New SecAgg+ fields (and privacy.noise_seed) at their defaults leave run ids as before
    (value from before them)."""
    before = tiny(Path("/tmp"))
    before["privacy"].pop("noise_seed")
    assert parse_config(before).run_id() == "e2a20488803b"
    a = parse_config(tiny(Path("/tmp"), dp_mode="site", secure_aggregation=True))
    b = parse_config(tiny(Path("/tmp"), dp_mode="site", secure_aggregation=True,
                          secagg_clipping_range=4.0))
    assert a.run_id() != b.run_id()



def test_unetr_is_built_for_the_crop_centrally_and_in_a_federation(tmp_path):
    """UNETR's position embedding is fixed to its input size: the engine, the sites and the
    server must all build it for the crop (a slice of the 16³ phantom: 16×16), not for the
    builder's default 256×256 (which crashed the engine and mismatched server and sites)."""
    import torch
    from flwr.common import ndarrays_to_parameters

    from privseg.architectures import build
    from privseg.federated.server import payload_bytes
    from privseg.run import run as run_training

    small = {"patch_size": 8, "hidden_size": 16, "layers": 1, "heads": 2, "feature_size": 4}
    central = dict(tiny(tmp_path), setting={"kind": "central"},
                   model={"name": "unetr", "options": small})
    record = run_training(parse_config(central), progress=False)
    weights = torch.load(tmp_path / "runs" / record["run_id"] / "model.pt")
    (pos,) = [v for k, v in weights.items() if "position" in k]
    assert pos.shape[1] == (16 // 8) ** 2  # one entry per 8×8 patch of a 16×16 crop

    fed = tiny(tmp_path, rounds=1, local_steps=1, eval_every=0)
    fed["model"] = {"name": "unetr", "options": small}
    record = run_federated(parse_config(fed), progress=False)

    def payload(**knobs) -> int:
        model = build("unetr", 2, 1, 8, **small, **knobs)
        return payload_bytes(ndarrays_to_parameters(
            [v.numpy() for v in model.state_dict().values()]))

    assert payload(img_size=16) != payload()  # the two sizes are told apart
    assert record["federated"]["parameter_payload_bytes"] == payload(img_size=16)


def test_sample_mode_record_carries_each_sites_weak_delta_warning(workdir):
    """A user δ at or above 1/(10·n_site) is warned at the site and stated in the record."""
    d = tiny(workdir, rounds=1, eval_every=0)
    d["privacy"]["delta"] = 0.05  # sites train on 3-4 subjects: 1/(10·n) ≈ 0.03
    rec = run_federated(parse_config(d), progress=False, force=True)
    warnings_ = rec["privacy"]["delta_warning_per_site"]
    assert set(warnings_) == set(rec["privacy"]["epsilon_per_site"])
    assert all("1/(10·n)" in w for w in warnings_.values())


def test_sites_validate_on_a_subset_before_the_last_round(tmp_path):
    """training.val_subjects: 1 validation subject per site before the last round, all of
    them in the last; the history says how many were validated."""
    d = tiny(tmp_path, rounds=2, local_steps=1)
    d["dataset"]["val_fraction"] = 0.4
    d["training"]["val_subjects"] = 1
    rec = run_federated(parse_config(d), progress=False, force=True)
    n_val = sum(s["val"] for s in rec["splits"].values())
    assert n_val > 3
    assert [h["val_n_subjects"] for h in rec["history"]] == [3, n_val]
