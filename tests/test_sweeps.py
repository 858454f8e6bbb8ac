"""Sweep files, grid expansion, W&B conversion, the local runner (idempotence, kill -9 and
resume, failures reported), and ``privseg sync``'s discovery of offline runs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from privseg.record import read_record, run_dir
from privseg.sweeps.spec import (
    SweepError,
    build_run_config,
    builtin_sweeps,
    expand,
    expand_params,
    load_sweep,
    parse_agent_args,
    parse_sweep,
    to_wandb,
)

TINY = {  # a run of a few seconds on CPU
    "base": {"value": "phantom2d"},
    "dataset.options": {"value": {"n_subjects": 12, "size": 16, "n_sites": 3}},
    "model.options": {"value": {"base_channels": 4, "depth": 2}},
    "training.epochs": {"value": 1},
    "training.expected_batch_size": {"value": 4},
    "training.physical_batch_size": {"value": 4},
    "training.crops_per_subject": {"value": 1},
    "training.eval_every": {"value": 0},
    "training.device": {"value": "cpu"},
    "tracking.wandb": {"value": "off"},
    "output.save_checkpoint": {"value": False},
}


# DP at a fixed σ: no calibration search (which dominates a tiny run's time with PRV).
FIXED_SIGMA = {"enabled": True, "target_epsilon": None, "noise_multiplier": 1.0,
               "accountant": "rdp"}


def write_sweep(path: Path, params: dict, name: str = "tiny", **top) -> Path:
    raw = {"name": name, "method": "grid", "command": ["privseg", "sweep-run",
                                                       "${args_no_hyphens}"],
           "parameters": {**TINY, **params}, **top}
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return path


def test_grid_expansion_order_constants_and_infinite_epsilon(tmp_path):
    sw = load_sweep(write_sweep(tmp_path / "s.yaml", {
        "model.name": {"values": ["unet", "resunet-scalenorm"]},
        "privacy.target_epsilon": {"values": ["inf", 8, 1]},
        "seed": {"values": [0, 1]},
    }), {"output.dir": str(tmp_path / "out")})
    points = expand_params(sw)
    assert len(points) == 2 * 3 * 2
    assert [(p["model.name"], p["privacy.target_epsilon"], p["seed"]) for p in points[:3]] == [
        ("unet", "inf", 0), ("unet", "inf", 1), ("unet", 8, 0)]
    runs = expand(sw)
    assert all(r.error is None for r in runs)
    assert len({r.run_id for r in runs}) == 12
    c = runs[0].config
    assert c.privacy.enabled is False and c.model.name == "unet"
    assert c.training.epochs == 1 and c.dataset.options["n_subjects"] == 12
    assert c.output.dir == str(tmp_path / "out")
    assert c.tracking.group == "tiny"
    assert {"arch:unet", "eps:inf", "setting:central", "sweep:tiny"} <= set(c.tracking.tags)
    private = runs[2].config
    assert private.privacy.enabled and private.privacy.target_epsilon == 8
    assert "eps:8" in private.tracking.tags


def test_yaml_dot_inf_and_null_mean_non_private(tmp_path):
    for v in [math.inf, None, "∞"]:
        cfg = build_run_config({**{k: s["value"] for k, s in TINY.items()},
                                "privacy.target_epsilon": v})
        assert cfg.privacy.enabled is False


def test_bad_sweep_files_are_named_errors(tmp_path):
    with pytest.raises(SweepError, match="unknown top-level key"):
        load_sweep(write_sweep(tmp_path / "a.yaml", {}, base_config="x"))
    with pytest.raises(SweepError, match="run_cap"):
        parse_sweep({"method": "random", "parameters": TINY})
    with pytest.raises(SweepError, match="base"):
        parse_sweep({"method": "grid", "parameters": {"seed": {"values": [0, 1]}}})
    # An invalid point is reported as that run's error, not raised for the sweep.
    sw = load_sweep(write_sweep(tmp_path / "b.yaml", {"model.name": {"values": ["unet",
                                                                              "nope"]}}))
    runs = expand(sw)
    assert runs[0].error is None and "unknown model 'nope'" in runs[1].error


def test_a_swept_setting_value_is_not_edited_by_an_earlier_point(tmp_path):
    """ε = ∞ turns a federated point's dp_mode to none; the next point (finite ε) must still
    get the sweep's own dp_mode (the value dict was once shared and edited in place)."""
    fed = {"kind": "federated", "federated": {"dp_mode": "site", "rounds": 1}}
    sw = load_sweep(write_sweep(tmp_path / "alias.yaml", {
        "setting": {"values": [fed]}, "privacy.target_epsilon": {"values": ["inf", 8]}}))
    modes = [r.config.setting.federated.dp_mode for r in expand(sw)]
    assert modes == ["none", "site"]


def test_random_method_draws_run_cap_points(tmp_path):
    sw = load_sweep(write_sweep(tmp_path / "r.yaml", {
        "training.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "seed": {"values": [0, 1, 2]}}, method="random", run_cap=5))
    points = expand_params(sw)
    assert len(points) == 5
    assert all(1e-4 <= p["training.lr"] <= 1e-2 for p in points)
    assert points == expand_params(sw)  # deterministic


def test_builtin_sweeps_expand():
    names = builtin_sweeps()
    assert {"quickstart", "arch-eps-phantom2d", "arch-eps-feta3d", "width-phantom2d",
            "central-vs-federated-phantom2d"} <= set(names)
    sizes = {}
    for name in names:
        sw = load_sweep(name)
        runs = expand(sw)
        sizes[name] = len(runs)
        assert all(r.error is None for r in runs), (name, [r.error for r in runs if r.error])
        json.dumps(to_wandb(sw), allow_nan=False)
    assert sizes["quickstart"] == 2 * 3
    assert sizes["arch-eps-phantom2d"] == sizes["arch-eps-phantom2d"] // 12 * 12  # × 4 ε × 3
    qs = expand(load_sweep("quickstart"))
    assert {r.config.model.name for r in qs} == {"unet", "resunet-scalenorm"}
    assert sorted(r.config.privacy.target_epsilon if r.config.privacy.enabled else math.inf
                  for r in qs) == [1, 1, 8, 8, math.inf, math.inf]


def test_li2019_full_sweep_is_the_nvflare_brats_setup():
    """BraTS 2018 in 3D, 4 sites, 600 rounds, the SegResNet-sized residual U-Net; SVT at three
    fractions and DP-FedAvg at full sharing, each at every finite ε."""
    cfgs = {r.run_id: r.config for r in expand(load_sweep("li2019-brats18"))}
    assert len(cfgs) == 15  # the ε = ∞ point of DP-FedAvg is FedAvg at fraction 1
    for c in cfgs.values():
        fed = c.setting.federated
        assert (c.dataset.name, c.dataset.dims, c.model.name) == ("brats", 3, "resunet-scalenorm")
        assert (fed.rounds, fed.n_sites, fed.partition) == (600, 4, "size")
    private = sorted((c.setting.federated.dp_mode, c.setting.federated.share_fraction,
                      c.privacy.target_epsilon) for c in cfgs.values() if c.privacy.enabled)
    assert private == sorted((m, f, e) for m, f in (("site", 1.0), ("svt", 0.1), ("svt", 0.4),
                                                    ("svt", 1.0)) for e in (10, 1e8, 1e10))


def test_wandb_conversion_and_agent_round_trip(tmp_path):
    """What wandb.sweep gets is schema-clean JSON; the agent's args rebuild the same runs."""
    sw = load_sweep(write_sweep(tmp_path / "w.yaml", {
        "model.name": {"values": ["unet"]},
        "privacy.target_epsilon": {"values": [float("inf"), 8]},
        "seed": {"values": [0, 1]},
    }), {"output.dir": "elsewhere"})
    cfg = to_wandb(sw)
    assert set(cfg) <= {"name", "method", "command", "parameters", "metric", "project"}
    assert cfg["command"] == ["privseg", "sweep-run", "${args_no_hyphens}"]
    assert cfg["parameters"]["privacy.target_epsilon"]["values"] == ["inf", 8]
    assert cfg["parameters"]["tracking.group"] == {"value": "tiny"}
    assert cfg["parameters"]["output.dir"] == {"value": "elsewhere"}
    json.dumps(cfg, allow_nan=False)
    local = {r.run_id for r in expand(sw)}
    # Emulate the agent: every parameter (constants too) as f"{key}={value}".
    agent = set()
    for eps in cfg["parameters"]["privacy.target_epsilon"]["values"]:
        for seed in cfg["parameters"]["seed"]["values"]:
            args = [f"{k}={s['value']}" for k, s in cfg["parameters"].items() if "value" in s]
            args += ["model.name=unet", f"privacy.target_epsilon={eps}", f"seed={seed}"]
            p = parse_agent_args(args)
            c = build_run_config(p, sweep_name=p["tracking.group"])
            assert c.tracking.group == "tiny" and c.output.dir == "elsewhere"
            agent.add(c.run_id())
    assert agent == local


def test_runner_trains_reports_failures_then_skips(tmp_path):
    """Two workers train the valid runs; a run that raises is reported with its error and
    does not stop the others; a second invocation trains nothing."""
    from privseg.sweeps.runner import run_sweep

    sw = load_sweep(write_sweep(tmp_path / "two.yaml", {
        "model.name": {"value": "unet"},
        "privacy": {"values": [{"enabled": False}, FIXED_SIGMA]},
        # 12 subjects leave 9 for training: a DP batch of 16 cannot be planned -> ValueError
        "training.expected_batch_size": {"values": [4, 16]},
        "output.dir": {"value": str(tmp_path / "out")},
    }))
    first = run_sweep(sw, parallel=2, progress=False)
    # non-private with batch 4 / 16, DP with batch 4 / 16
    assert [o.status for o in first.outcomes] == ["complete", "complete", "complete",
                                                  "failed"], [o.error for o in first.outcomes]
    assert "expected_batch_size" in first.outcomes[3].error
    assert not first.ok
    done = [o for o in first.outcomes if o.status == "complete"]
    for o in done:
        assert read_record(run_dir(tmp_path / "out", o.run_id)) is not None
        assert o.summary["mean_dice"] is not None
    logs = sorted((tmp_path / "out" / ".sweeps" / "tiny").glob("worker-*.log"))
    assert len(logs) == 2  # two workers trained at once
    stamp = {o.run_id: (tmp_path / "out" / o.run_id / "record.json").stat().st_mtime_ns
             for o in done}
    second = run_sweep(sw, parallel=2, progress=False)
    assert [o.status for o in second.outcomes] == ["skipped", "skipped", "skipped", "failed"]
    assert {o.run_id: (tmp_path / "out" / o.run_id / "record.json").stat().st_mtime_ns
            for o in second.outcomes[:3]} == stamp


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


@pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and kill -9")
def test_kill_dash_nine_mid_run_then_resume(tmp_path):
    """A worker killed mid-run leaves no complete record; the runner reports the run failed
    (exit code 1) and the next invocation trains it to completion."""
    from privseg.sweeps.runner import run_sweep

    path = write_sweep(tmp_path / "k.yaml", {
        "model.name": {"value": "unet"},
        "privacy": {"values": [{"enabled": False}]},
        "training.epochs": {"value": 300},  # several seconds: long enough to be killed mid-run
        "output.dir": {"value": str(tmp_path / "out")},
    }, name="killme")
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-c", "from privseg.cli import main; main()",
                             "sweep", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = tmp_path / "out" / ".sweeps" / "killme" / "worker-0.log"
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and "=== run" in log.read_text():
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("worker never started training")
    time.sleep(0.5)  # inside run_training now
    workers = _children(proc.pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "SIGKILL" in out
    sw = load_sweep(path)
    run_id = expand(sw)[0].run_id
    assert read_record(run_dir(tmp_path / "out", run_id)) is None, out
    resumed = run_sweep(sw, progress=False)
    assert [o.status for o in resumed.outcomes] == ["complete"]
    assert read_record(run_dir(tmp_path / "out", run_id)) is not None


def test_sync_finds_offline_runs(tmp_path):
    from typer.testing import CliRunner

    from privseg.cli import app
    from privseg.sweeps.cli import find_offline_runs, sync_command

    for rid, synced in [("aaa", False), ("bbb", True)]:
        d = tmp_path / rid / "wandb" / f"offline-run-20250101_000000-{rid}"
        d.mkdir(parents=True)
        (d / f"run-{rid}.wandb").write_bytes(b"x")
        if synced:
            (d / f"run-{rid}.wandb.synced").write_text("")
    (tmp_path / "ccc" / "wandb" / "offline-run-empty").mkdir(parents=True)
    found = find_offline_runs(tmp_path)
    assert [p.name for p in found] == ["offline-run-20250101_000000-aaa"]
    assert len(find_offline_runs(tmp_path, include_synced=True)) == 2
    cmd = sync_command(found, project="p")
    assert cmd[-1] == str(found[0]) and "sync" in cmd and "--project" in cmd
    res = CliRunner().invoke(app, ["sync", str(tmp_path), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "offline-run-20250101_000000-aaa" in res.output and "bbb" not in res.output


def test_wandb_flag_creates_the_sweep_with_the_converted_config(tmp_path, monkeypatch):
    import wandb
    from typer.testing import CliRunner

    from privseg.cli import app

    got = {}

    def fake_sweep(config, entity=None, project=None):
        got.update(config=config, entity=entity, project=project)
        return "swp123"

    monkeypatch.setattr(wandb, "sweep", fake_sweep)
    path = write_sweep(tmp_path / "w.yaml", {"privacy.target_epsilon": {"values": ["inf", 1]}})
    res = CliRunner().invoke(app, ["sweep", str(path), "--wandb", "--entity", "me",
                                   "--project", "p", "--set", "training.epochs=3"])
    assert res.exit_code == 0, res.output
    assert "wandb agent me/p/swp123" in res.output
    params = got["config"]["parameters"]
    assert params["training.epochs"] == {"value": 3}
    assert params["privacy.target_epsilon"] == {"values": ["inf", 1]}
    assert got["config"]["command"][:2] == ["privseg", "sweep-run"]



def _agent_args(cfg: dict) -> list[str]:
    """What a W&B agent passes for ${args_no_hyphens}: every parameter as key=value (JSON)."""
    return [f"{k}={json.dumps(s['value']) if isinstance(s['value'], dict) else s['value']}"
            for k, s in cfg["parameters"].items()]


@pytest.mark.parametrize("through_privseg", [False, True])
def test_sweep_run_names_the_point_by_what_distinguishes_it(tmp_path, through_privseg):
    """A bare `wandb agent` on the YAML (no tracking.group) and one behind `privseg sweep
    --wandb` both name a point for its architecture, ε and seed, not after the base config."""
    from typer.testing import CliRunner

    from privseg.cli import app

    sw = load_sweep(write_sweep(tmp_path / "n.yaml", {
        "model.name": {"values": ["unet", "resunet-scalenorm"]},
        "privacy.target_epsilon": {"values": ["inf", 8]},
        "seed": {"values": [0, 1]},
        "output.dir": {"value": str(tmp_path / "out")},
    }))
    cfg = to_wandb(sw) if through_privseg else {"parameters": dict(sw.parameters)}
    point = {**cfg["parameters"], "model.name": {"value": "resunet-scalenorm"},
             "privacy.target_epsilon": {"value": "inf"}, "seed": {"value": 0}}
    result = CliRunner().invoke(app, ["sweep-run", "--no-progress",
                                      *_agent_args({"parameters": point})])
    assert result.exit_code == 0, result.output
    (record_path,) = (tmp_path / "out").glob("*/record.json")
    record = json.loads(record_path.read_text())
    assert record["name"] == "resunet-scalenorm non-private s0"
    local = {r.run_id: r.config.name for r in expand(sw)}
    assert local[record["run_id"]] == record["name"]  # the local runner names it alike


def test_dry_run_exits_non_zero_when_a_point_is_invalid(tmp_path):
    from typer.testing import CliRunner

    from privseg.cli import app

    bad = write_sweep(tmp_path / "bad.yaml", {"model.name": {"values": ["no-such-model"]}})
    good = write_sweep(tmp_path / "good.yaml", {"model.name": {"values": ["unet"]}})
    assert CliRunner().invoke(app, ["sweep", str(bad), "--dry-run"]).exit_code == 1
    assert CliRunner().invoke(app, ["sweep", str(good), "--dry-run"]).exit_code == 0


def test_same_run_with_one_or_two_workers_gives_identical_metrics(tmp_path, monkeypatch):
    """-j must not change a run's numbers (before: 0.764998 with -j 1, 0.766223 with -j 2)."""
    from privseg.sweeps.runner import run_sweep

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # as a user's shell has it
    monkeypatch.delenv("PRIVSEG_THREADS", raising=False)
    records = {}
    for j in (1, 2):
        sw = load_sweep(write_sweep(tmp_path / f"j{j}.yaml", {
            "model.name": {"value": "unet"},
            "model.options": {"value": {"base_channels": 8, "depth": 3}},
            "dataset.options": {"value": {"n_subjects": 12, "size": 32, "n_sites": 3}},
            "training.epochs": {"value": 2},
            "privacy.target_epsilon": {"values": ["inf"]},
            "seed": {"values": [0, 1]},
            "output.dir": {"value": str(tmp_path / f"out{j}")},
        }))
        result = run_sweep(sw, parallel=j, progress=False)
        assert result.ok, [o.error for o in result.outcomes]
        records[j] = {o.run_id: read_record(run_dir(tmp_path / f"out{j}", o.run_id))
                      for o in result.outcomes}
    assert records[1].keys() == records[2].keys()
    for run_id, one in records[1].items():
        two = records[2][run_id]
        assert one["test"] == two["test"]  # every class, site and subject, bit for bit
        assert [h["train_loss"] for h in one["history"]] == [
            h["train_loss"] for h in two["history"]]
        assert one["environment"]["cpu_threads"] == two["environment"]["cpu_threads"] == 1
