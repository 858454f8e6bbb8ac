"""``privseg bench``: the price of DP-SGD in step time and memory, per grad-sample mode.

In one process, the modes take turns step by step (non-private, opacus, hooks, torchfunc,
functorch, ew, ghost, then again), so that machine noise (clock boost, other processes) hits
all of them alike; the median step time of each mode and its ratio to the non-private step are
reported. ``opacus`` is Opacus as shipped (hooks mode with its own samplers, grad-sample module
and DP optimizer): the baseline that privseg's own pieces are measured against. ``torchfunc``
is the peer: the DP step a user would write with plain ``torch.func`` (vmap of grad of the
per-sample Dice+CE, clip, sum, noise; :mod:`privseg.dp.functional_step`), so every table shows
privseg's default next to what a user would write. Steps are the engine's own ``train_step``
(the peer: its own step) on a fixed synthetic batch of subjects (k = 1), so what is
measured is what training runs. A mode may name the conv grad sampler (``privacy.
conv_grad_sampler``, see :mod:`privseg.dp.grad_samplers`): ``hooks+opacus`` is hooks with Opacus'
own conv sampler, ``ghost+grouped`` ghost clipping with the grouped sampler and mixed ghost
norm; a bare ``hooks``/``ghost`` uses the config default. Peak memory is measured per mode in a
separate pass, as the growth during one step over what was allocated before it:
``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process' peak resident set (Linux
``VmHWM``, reset through ``/proc/self/clear_refs`` after returning freed heap to the system with
``malloc_trim``), else the resident set sampled every 2 ms (approximate).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from privseg.architectures import build, get_entry
from privseg.config import RunConfig, parse_config
from privseg.dp.functional_step import FunctionalDPStep
from privseg.dp.grad_samplers import CONV_SAMPLERS
from privseg.record import atomic_write_text, environment
from privseg.training.cpu_memory import keep_freed_cpu_memory
from privseg.training.losses import PerSampleDiceCE
from privseg.training.setup import builder_knobs, place_model, resolve_device, seed_everything
from privseg.training.step import make_optimizer, prepare_training, train_step

BASE_MODES = ("nonprivate", "opacus", "hooks", "torchfunc", "functorch", "ew", "ghost")
#: the plain torch.func peer (not a grad-sample mode of the engine)
PEER = "torchfunc"
#: modes whose conv layers go through Opacus' registries, so the conv sampler matters
SAMPLER_MODES = ("hooks", "ghost")
ALL_MODES = BASE_MODES + tuple(f"{m}+{s}" for m in SAMPLER_MODES for s in CONV_SAMPLERS)


def split_mode(mode: str) -> tuple[str, str | None]:
    """``"hooks+opacus"`` -> ``("hooks", "opacus")``; ``"ghost"`` -> ``("ghost", None)``."""
    base, _, sampler = mode.partition("+")
    return base, sampler or None


def grad_sample_mode(mode: str) -> str:
    """The Opacus grad-sample mode a bench mode runs (``opacus`` is stock hooks mode; the
    ``torchfunc`` peer needs what functorch mode needs: a vmap-able forward)."""
    base = split_mode(mode)[0]
    return {"opacus": "hooks", PEER: "functorch"}.get(base, base)


@dataclass
class _Runner:
    mode: str
    cfg: RunConfig
    step: Callable[[torch.Tensor, torch.Tensor], object]


def _peer_step(cfg: RunConfig, model: torch.nn.Module, device: torch.device
               ) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The ``torchfunc`` peer's step: :class:`privseg.dp.functional_step.FunctionalDPStep`
    with the engine's optimizer, loss, clipping norm and σ."""
    p = cfg.privacy
    peer = FunctionalDPStep(model, make_optimizer(cfg, model.parameters()),
                            PerSampleDiceCE(reduction="none"), p.max_grad_norm,
                            p.noise_multiplier, cfg.training.expected_batch_size,
                            torch.Generator(device=device).manual_seed(0))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.training.amp):
            peer.step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    return step


class _FixedBatch(torch.utils.data.Dataset):
    """``n`` synthetic subjects with one crop each: x ``[n, 1, 1, *S]``, y ``[n, 1, *S]``."""

    def __init__(self, n: int, shape: tuple[int, ...], num_classes: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 1, *shape, generator=g)
        self.y = torch.randint(0, num_classes, (n, 1, *shape), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _config(mode: str, batch: int, device: str, amp: bool, channels_last: bool = False,
            dims: int = 2) -> RunConfig:
    base, sampler = split_mode(mode)
    dp = base != "nonprivate"
    privacy = {"enabled": dp, "target_epsilon": None, "noise_multiplier": 1.0,
               "grad_sample_mode": grad_sample_mode(mode) if dp else "hooks", "delta": 1e-5}
    if sampler:
        privacy["conv_grad_sampler"] = sampler
    return parse_config({
        "training": {"expected_batch_size": batch, "physical_batch_size": batch,
                     "device": device, "amp": amp, "crops_per_subject": 1,
                     "channels_last": channels_last},
        "dataset": {"dims": dims},
        "privacy": privacy,
        "tracking": {"wandb": "off"},
    })


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def _reset_cpu_peak() -> bool:
    """Return freed heap to the OS and reset the peak-RSS mark; False where unsupported."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_mb("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _peak_memory(run, device: torch.device) -> float:
    """Peak memory (MiB) of one step beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if _reset_cpu_peak():
        base = _rss_mb()
        run()
        return max(0.0, _status_mb("VmHWM") - base)
    base, peak, stop = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    run()
    stop.set()
    t.join()
    return max(0.0, max(peak[0], _rss_mb()) - base)


def run_bench(model: str = "unet", dims: int = 2, device: str = "cpu", batch: int = 8,
              size: int | None = None, modes: tuple[str, ...] = ALL_MODES, steps: int = 10,
              warmup: int = 2, amp: bool = False, num_classes: int = 8,
              model_options: dict | None = None, channels_last: bool = False) -> dict:
    """Measure every mode's median step time, throughput and peak memory, and ratios."""
    dev = resolve_device(device)
    if dev.type == "cpu":  # as training does (prepare_training); the peer gets it too
        keep_freed_cpu_memory()
    size = size or (256 if dims == 2 else 96)
    shape = (size,) * dims
    entry = get_entry(model)
    seed_everything(0)
    base_model = build(model, dims, 1, num_classes,
                       **builder_knobs(model, model_options or {}, shape))
    data = _FixedBatch(batch, shape, num_classes)
    x, y = data.x, data.y
    if dev.type == "cuda":  # as the training loader does (pin_memory on CUDA)
        x, y = x.pin_memory(), y.pin_memory()
    runners, skipped = [], {}
    for mode in modes:
        if mode != "nonprivate" and grad_sample_mode(mode) not in entry.dp_modes:
            skipped[mode] = f"{model} does not claim this mode"
            continue
        if split_mode(mode)[1] and split_mode(mode)[0] not in SAMPLER_MODES:
            skipped[mode] = "the conv sampler only applies to hooks and ghost"
            continue
        try:
            cfg = _config(mode, batch, dev.type, amp, channels_last, dims)
            m = place_model(copy.deepcopy(base_model), cfg, dev)
            if mode == PEER:
                run_step = _peer_step(cfg, m, dev)
            else:
                state = prepare_training(cfg, m, data, dev,
                                         stock_opacus=split_mode(mode)[0] == "opacus")

                def run_step(xb, yb, state=state, cfg=cfg):
                    return train_step(state, xb, yb, cfg, dev)
            run_step(x, y)
        except Exception as e:  # a mode that cannot run this model is reported, not fatal
            skipped[mode] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        runners.append(_Runner(mode, cfg, run_step))

    def step(r: _Runner) -> None:
        r.step(x, y)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    memory = {r.mode: _peak_memory(lambda r=r: step(r), dev) for r in runners}
    times: dict[str, list[float]] = {r.mode: [] for r in runners}
    for i in range(warmup + steps):
        for r in runners:
            t0 = time.perf_counter()
            step(r)
            if i >= warmup:
                times[r.mode].append(time.perf_counter() - t0)
    results = {}
    for r in runners:
        med = statistics.median(times[r.mode])
        results[r.mode] = {"median_step_s": med, "subjects_per_s": batch / med,
                           "peak_memory_mb": memory[r.mode], "step_times_s": times[r.mode]}
    ref = results.get("nonprivate")
    if ref:
        for res in results.values():
            res["time_ratio"] = res["median_step_s"] / ref["median_step_s"]
            res["memory_ratio"] = (res["peak_memory_mb"] / ref["peak_memory_mb"]
                                   if ref["peak_memory_mb"] > 0 else None)
    env = environment(str(dev))
    env["cpu"] = cpu_name()
    env["torch_threads"] = torch.get_num_threads()
    samplers = {r.mode: r.cfg.privacy.conv_grad_sampler for r in runners
                if split_mode(r.mode)[0] in SAMPLER_MODES}
    return {"model": model, "dims": dims, "input_shape": [batch, 1, *shape], "batch": batch,
            "amp": amp, "channels_last": channels_last and dev.type == "cuda" and dims == 2,
            "steps": steps, "warmup": warmup, "results": results,
            "conv_grad_sampler": samplers, "skipped": skipped, "environment": env}


def format_bench(report: dict) -> str:
    """A plain-text table of a bench report."""
    env = report["environment"]
    lines = [f"{report['model']} {report['dims']}D input {report['input_shape']} on "
             f"{env.get('gpu') or env['device']}"
             + (f" ({env['cpu']})" if not env.get("gpu") and env.get("cpu") else ""),
             f"{'mode':14s} {'step ms':>9s} {'subj/s':>8s} {'mem MiB':>9s} {'t ratio':>8s} "
             f"{'mem ratio':>9s}"]
    for mode, r in report["results"].items():
        mem_ratio = r.get("memory_ratio")
        lines.append(f"{mode:14s} {r['median_step_s'] * 1e3:9.1f} {r['subjects_per_s']:8.1f} "
                     f"{r['peak_memory_mb']:9.1f} {r.get('time_ratio', float('nan')):8.2f} "
                     f"{mem_ratio if mem_ratio is not None else float('nan'):9.2f}")
    for mode, why in report["skipped"].items():
        lines.append(f"{mode:14s} skipped: {why}")
    return "\n".join(lines)


def write_bench(report: dict, out_dir: str | Path) -> Path:
    """Write the report as JSON under ``out_dir`` (atomically); return the path."""
    env = report["environment"]
    device = env.get("gpu") or env["device"]
    if not env.get("gpu") and env.get("cpu"):
        device = f"{device}-{env['cpu']}"
    device = re.sub(r"[^A-Za-z0-9.]+", "-", device.replace("(R)", "").replace("(TM)", ""))
    device = device.strip("-")
    name = f"bench-{report['model']}-{report['dims']}d-{device}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(out_dir) / f"{name}.json"
    atomic_write_text(path, json.dumps(report, indent=2))
    return path
