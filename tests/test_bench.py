"""privseg bench: what it runs and reports (speed itself is measured, never asserted)."""

from __future__ import annotations

import json
import statistics

import pytest

from privseg.bench import format_bench, run_bench, write_bench


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model", ["unet", "unetr"])
def test_bench_runs_every_mode_and_reports_ratios(model, tmp_path):
    """Each requested mode runs (UNETR too, built for the bench's input size rather than its
    default 256²) and its ratios are its own median over the non-private median."""
    opts = {"base_channels": 4, "depth": 2} if model == "unet" else {
        "feature_size": 4, "hidden_size": 16, "heads": 2, "layers": 2, "patch_size": 8}
    modes = ("nonprivate", "opacus", "hooks", "torchfunc")
    report = run_bench(model, 2, "cpu", batch=2, size=16, modes=modes,
                       steps=2, warmup=0, num_classes=3, model_options=opts)
    assert report["skipped"] == {}
    res = report["results"]
    assert set(res) == set(modes)
    assert "torchfunc" in format_bench(report)
    ref = res["nonprivate"]["median_step_s"]
    for r in res.values():
        assert len(r["step_times_s"]) == 2
        assert r["median_step_s"] == statistics.median(r["step_times_s"])
        assert r["time_ratio"] == pytest.approx(r["median_step_s"] / ref)
    path = write_bench(report, tmp_path)
    assert json.loads(path.read_text())["input_shape"] == [2, 1, 16, 16]


def test_bench_opacus_mode_is_stock_opacus():
    """The ``opacus`` baseline runs Opacus' own module, samplers and optimizer; ``hooks`` runs
    privseg's."""
    import copy

    import torch
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from privseg.architectures import build
    from privseg.bench import _config, _FixedBatch
    from privseg.dp.grad_sample_module import LeanGradSampleModule
    from privseg.dp.optimizer import FlatDPOptimizer
    from privseg.training.step import prepare_training

    model = build("unet", 2, 1, 3, base_channels=4, depth=2)
    data = _FixedBatch(2, (16, 16), 3)
    kinds = {}
    for mode, stock in (("opacus", True), ("hooks", False)):
        state = prepare_training(_config(mode, 2, "cpu", False), copy.deepcopy(model), data,
                                 torch.device("cpu"), stock_opacus=stock)
        kinds[mode] = (type(state.model), type(state.optimizer), state.grad_reduction)
    assert kinds["opacus"] == (GradSampleModule, DPOptimizer, "mean")
    assert kinds["hooks"] == (LeanGradSampleModule, FlatDPOptimizer, "sum")


@pytest.mark.usefixtures("one_thread")
def test_bench_peer_takes_the_engines_dp_step():
    """Without noise, the torch.func peer's step and the engine's default (hooks) DP step
    move the same model to the same weights: the peer measures the same arithmetic."""
    import copy

    import torch

    from privseg.architectures import build
    from privseg.bench import _config, _FixedBatch, _peer_step
    from privseg.training.step import prepare_training, train_step, unwrap

    torch.manual_seed(0)
    model = build("unet", 2, 1, 3, base_channels=4, depth=2)
    data = _FixedBatch(3, (16, 16), 3)
    cpu = torch.device("cpu")
    out = {}
    for mode in ("hooks", "torchfunc"):
        cfg = _config(mode, 3, "cpu", False)
        cfg.privacy.noise_multiplier = 0.0
        cfg.privacy.max_grad_norm = 0.05  # small enough that every subject is clipped
        cfg.training.optimizer, cfg.training.lr, cfg.training.momentum = "sgd", 1.0, 0.0
        m = copy.deepcopy(model)
        if mode == "torchfunc":
            _peer_step(cfg, m, cpu)(data.x, data.y)
        else:
            state = prepare_training(cfg, m, data, cpu)
            train_step(state, data.x, data.y, cfg, cpu)
            m = unwrap(state.model)
        out[mode] = torch.cat([p.detach().flatten() for p in m.parameters()])
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (out["hooks"] - start).norm() > 1e-3  # the step moved the weights
    torch.testing.assert_close(out["torchfunc"], out["hooks"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("modes,message", [("", "--modes is empty"),
                                           ("hooks,nope", "unknown mode(s) nope")])
def test_bench_refuses_bad_mode_lists_and_writes_nothing(tmp_path, modes, message):
    from typer.testing import CliRunner

    from privseg.cli import app

    result = CliRunner().invoke(app, ["bench", "--modes", modes, "--out", str(tmp_path)])
    assert result.exit_code != 0 and message in result.output
    assert not list(tmp_path.iterdir())
