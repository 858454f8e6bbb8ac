"""The training engine: one loop for private and non-private central runs.

DP-SGD (Abadi et al. 2016) through Opacus: ``PrivacyEngine.make_private`` over a data loader
whose items are *subjects*, so its Poisson sampler samples subjects (rate q = expected batch /
training subjects). Each subject contributes k crops; their per-sample gradients are averaged
into the subject's one gradient before Opacus clips it (augmentation multiplicity, De et al.
2022), so every sampled subject contributes exactly one clipped gradient and the reported ε is
per subject. Logical (Poisson) batches are split into physical chunks through Opacus' own
skip-step mechanism, so memory is bounded whatever the logical batch size.
"""

from __future__ import annotations

import logging
import math
import random
import resource
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus.accountants import IAccountant, create_accountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from privseg.architectures import build, get_entry
from privseg.config import RunConfig
from privseg.data import SubjectCrops, crop_size
from privseg.datasets import SubjectSet, load_dataset
from privseg.datasets.split import split_subjects
from privseg.dp_optimizer import FlatDPOptimizer
from privseg.evaluate import evaluate
from privseg.gpu_timing import GpuBusySampler, StepTimer
from privseg.grad_samplers import prepare_module
from privseg.losses import PerSampleDiceCE, per_subject
from privseg.privacy import PrivacyPlan, epsilon_of_history, plan_privacy
from privseg.record import environment, read_record, run_dir, write_record
from privseg.tracking import Tracker

log = logging.getLogger("privseg")
# Opacus' hooks on the first layer fire although the input needs no gradient; harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor (~20% of a CPU DP step); results stay
    # deterministic without it, since no kernel here reads uninitialised memory.
    torch.utils.deterministic.fill_uninitialized_memory = False


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device=cuda but no CUDA device is available")
    return torch.device(name)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "privseg"


def group_crop_grad_samples(model: nn.Module, crops_per_subject: int) -> None:
    """Turn per-crop gradients into per-subject gradients: mean over each subject's k crops.

    Opacus computes one grad sample per forward sample (crop). With ``loss_reduction='mean'``
    each crop's grad sample is the gradient of that crop's loss; the subject's gradient is the
    mean over its crops, and that is what must be clipped.
    """
    if crops_per_subject == 1:
        return
    for p in model.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        p.grad_sample = gs.view(-1, crops_per_subject, *gs.shape[1:]).mean(dim=1)


def upcast_grad_samples(model: nn.Module) -> None:
    """Per-sample gradients in each parameter's own dtype (fp32) before Opacus clips them.

    Under bf16 autocast, grad samplers return bf16 per-sample gradients; Opacus would take
    their norms and clip in bf16, so a clipped gradient's true norm could exceed the clipping
    bound by bf16's rounding (~0.4 %), and the sensitivity the accountant assumes would not
    hold. Upcast first, then norms, clipping and the sum are fp32 and exact to ~1e-7.
    """
    for p in model.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is not None and gs.dtype != p.dtype:
            p.grad_sample = gs.to(p.dtype)


def grad_sample_reduction(grad_sample_mode: str) -> str:
    """How the loss that DP backward passes start from is reduced over the chunk's crops.

    ``"sum"`` (of per-crop losses) except for ghost clipping, whose loss wrapper averages:
    with ``"mean"`` Opacus would multiply every layer's output gradient by the chunk size to
    undo the mean, an activation-sized kernel per layer. Either way each crop's per-sample
    gradient is the gradient of its own loss. The DP optimizer's own ``loss_reduction``
    (dividing the noisy sum by the expected batch size) is separate and stays ``"mean"``.
    """
    return "mean" if grad_sample_mode == "ghost" else "sum"


def _chunks(x: torch.Tensor, y: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    if len(x) == 0:
        yield x, y
        return
    for i in range(0, len(x), size):
        yield x[i:i + size], y[i:i + size]


@dataclass
class TrainState:
    """What a training loop needs, private or not."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    criterion: nn.Module
    accountant: IAccountant | None = None
    plan: PrivacyPlan | None = None
    per_sample_loss: nn.Module = PerSampleDiceCE(reduction="none")
    #: how DP backward passes reduce the chunk's loss (:func:`grad_sample_reduction`)
    grad_reduction: str = "sum"


def builder_knobs(name: str, options: dict, spatial: tuple[int, ...]) -> dict:
    """Model ``name``'s builder knobs: ``options``, plus ``img_size`` = ``spatial`` (the input's
    spatial size) for models whose input size is fixed at build time (UNETR's position
    embedding) when not given."""
    knobs = dict(options)
    if "img_size" in get_entry(name).knobs() and knobs.get("img_size") is None:
        knobs["img_size"] = tuple(spatial)
    return knobs


def model_knobs(cfg: RunConfig, roi: tuple[int, ...]) -> dict:
    """The config's model knobs for crops of size ``roi`` (:func:`builder_knobs`)."""
    return builder_knobs(cfg.model.name, cfg.model.options,
                         roi[1:] if cfg.dataset.dims == 2 else roi)


def place_model(model: nn.Module, cfg: RunConfig, device: torch.device) -> nn.Module:
    """Move the model to ``device``; channels-last for 2D on CUDA when the config asks.

    Channels-last (NHWC) lets cuDNN pick its tensor-core conv kernels without layout
    transposes; it does not change the arithmetic of per-sample gradients.
    """
    model = model.to(device)
    if cfg.training.channels_last and device.type == "cuda" and cfg.dataset.dims == 2:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    t = cfg.training
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def prepare_training(cfg: RunConfig, model: nn.Module, train_set: SubjectCrops,
                     device: torch.device, plan: PrivacyPlan | None = None,
                     stock_opacus: bool = False) -> TrainState:
    """Model, optimizer, loader and loss; wrapped by Opacus when privacy is enabled.

    The DP pieces are Opacus' own (grad-sample module, DP optimizer, Poisson ``DPDataLoader``,
    accountant hook), assembled here rather than by ``PrivacyEngine.make_private``, which
    derives q as 1/ceil(n/B) from a plain loader's length; we sample at exactly q = B/n and
    hand the accountant that same q. A given ``plan`` (a federated site's, over all its rounds)
    replaces the central one. ``stock_opacus`` (for ``privseg bench``'s baseline) uses Opacus
    as shipped: its grad-sample module, conv and GroupNorm samplers and DP optimizer, with a
    mean-reduced loss.
    """
    t, p = cfg.training, cfg.privacy
    optimizer = make_optimizer(cfg, model.parameters())
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    loader_kw = dict(num_workers=t.num_workers, persistent_workers=t.num_workers > 0,
                     pin_memory=device.type == "cuda")
    if not p.enabled:
        loader = DataLoader(train_set, batch_size=t.expected_batch_size, shuffle=True,
                            generator=loader_gen, **loader_kw)
        return TrainState(model, optimizer, loader, PerSampleDiceCE(reduction="mean"))
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model {cfg.model.name} is not DP-compatible: {errors}")
    plan = plan or plan_privacy(
        len(train_set), t.expected_batch_size, t.epochs, target_epsilon=p.target_epsilon
        if p.noise_multiplier is None else None, noise_multiplier=p.noise_multiplier,
        delta=p.delta, accountant=p.accountant, max_grad_norm=p.max_grad_norm,
    )
    loader = DPDataLoader(train_set, sample_rate=plan.sample_rate, generator=loader_gen,
                          **loader_kw)
    gsm_kw = {"max_grad_norm": p.max_grad_norm} if p.grad_sample_mode == "ghost" else {}
    reduction = "mean" if stock_opacus else grad_sample_reduction(p.grad_sample_mode)
    model = prepare_module(model, grad_sample_mode=p.grad_sample_mode, batch_first=True,
                           loss_reduction=reduction, lean=not stock_opacus,
                           conv_sampler="opacus" if stock_opacus else p.conv_grad_sampler,
                           **gsm_kw)
    if p.grad_sample_mode in ("hooks", "functorch"):
        model.forbid_grad_accumulation()
    optim_cls = get_optimizer_class(clipping="flat", distributed=False,
                                    grad_sample_mode=p.grad_sample_mode)
    if optim_cls is DPOptimizer and not stock_opacus:  # not ghost clipping's optimizer
        optim_cls = FlatDPOptimizer
    optimizer = optim_cls(
        optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=p.max_grad_norm,
        expected_batch_size=t.expected_batch_size, loss_reduction="mean",
        generator=torch.Generator(device=device).manual_seed(cfg.seed + 1),
    )
    accountant = create_accountant(p.accountant)
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    criterion: nn.Module = PerSampleDiceCE(reduction="mean")
    if p.grad_sample_mode == "ghost":
        criterion = DPLossFastGradientClipping(model, optimizer, criterion, loss_reduction="mean")
    if len(loader) != plan.steps_per_epoch:
        raise RuntimeError(f"Opacus loader has {len(loader)} steps/epoch, the privacy plan "
                           f"{plan.steps_per_epoch}")
    return TrainState(model, optimizer, loader, criterion, accountant, plan,
                      grad_reduction=reduction)


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor, cfg: RunConfig,
               device: torch.device) -> torch.Tensor:
    """One logical step over a (Poisson) batch of subjects, in physical chunks.

    ``x`` is ``[B, k, C, *S]``; returns the mean per-subject loss as a detached 0-d tensor on
    ``device`` (NaN for an empty batch). Nothing here waits for the GPU: the loss stays a
    device tensor so that the host can queue the next step while this one runs.
    """
    t = cfg.training
    k = t.crops_per_subject
    dp = state.accountant is not None
    amp = t.amp
    batch = len(x)
    total = torch.zeros((), device=device)
    chunks = list(_chunks(x, y, t.physical_batch_size))
    for i, (xc, yc) in enumerate(chunks):
        last = i == len(chunks) - 1
        xc = xc.to(device, non_blocking=True).flatten(0, 1)
        yc = yc.to(device, non_blocking=True).flatten(0, 1)
        if len(xc) == 0:
            # An empty Poisson batch is still a DP step: zero gradient plus noise.
            for p in state.model.parameters():
                if p.requires_grad:
                    p.grad_sample = torch.zeros(0, *p.shape, device=device, dtype=p.dtype)
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext():
                logits = state.model(xc)
            if dp and cfg.privacy.grad_sample_mode == "ghost":
                loss = state.criterion(logits.float(), yc)
                total = total + loss.detach().float() * len(xc)
                loss.backward()
            else:
                crop_loss = state.per_sample_loss(logits.float(), yc)
                subject_loss = per_subject(crop_loss, k)
                total = total + subject_loss.detach().float().sum()
                # DP: the sum of crop losses (see grad_sample_reduction). Non-DP: sum over
                # the logical batch / its size, accumulated over chunks.
                if not dp:
                    (subject_loss.sum() / batch).backward()
                elif state.grad_reduction == "sum":
                    crop_loss.sum().backward()
                else:  # Opacus rescales the per-sample gradients by the chunk size
                    subject_loss.mean().backward()
                if dp:
                    if amp:
                        upcast_grad_samples(state.model)
                    group_crop_grad_samples(state.model, k)
        if dp:
            state.optimizer.signal_skip_step(do_skip=not last)
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
        elif last:
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
    return total / batch if batch else torch.full((), float("nan"), device=device)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside Opacus' GradSampleModule (if wrapped)."""
    return getattr(model, "_module", model)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def completed_record(out: Path) -> dict | None:
    """The complete record in run directory ``out`` (logged), or None."""
    existing = read_record(out)
    if existing is not None:
        log.info("run %s already complete, not rerun (--force reruns it): %s", out.name, out)
    return existing


def load_subjects(cfg: RunConfig) -> SubjectSet:
    """Load (and validate) the config's data set, through the persistent cache."""
    d = cfg.dataset
    return load_dataset(d.name, d.options, d.root,
                        Path(d.cache_dir) if d.cache_dir else default_cache_dir())


def run_training(cfg: RunConfig, *, progress: bool = True, force: bool = False,
                 subject_set: SubjectSet | None = None) -> dict:
    """Train and evaluate one run; write its checkpoint and record; return the record.

    A finished run (same run id, complete record) is not rerun unless ``force``.
    """
    if cfg.setting.kind == "federated":
        from privseg.federated.simulation import run_federated

        return run_federated(cfg, progress=progress, force=force, subject_set=subject_set)
    run_id = cfg.run_id()
    out = run_dir(cfg.output.dir, run_id)
    if not force and (existing := completed_record(out)) is not None:
        return existing
    seed_everything(cfg.seed)
    device = resolve_device(cfg.training.device)
    d = cfg.dataset
    subject_set = subject_set or load_subjects(cfg)
    by_id = subject_set.by_id()
    train_ids, val_ids, test_ids = split_subjects(
        by_id, d.val_fraction, d.test_fraction, cfg.seed,
        stratify_by={s.subject_id: s.site for s in subject_set.subjects})
    if not train_ids:
        raise ValueError(f"the split leaves no training subjects out of {len(by_id)}")
    train_set = SubjectCrops([by_id[i] for i in train_ids], d.dims, d.patch_size,
                             cfg.training.crops_per_subject, cfg.training.foreground_fraction,
                             subject_set.num_classes)
    roi = crop_size(d.dims, d.patch_size, subject_set.subjects[0].label.shape)
    model = place_model(build(cfg.model.name, d.dims, subject_set.in_channels,
                              subject_set.num_classes, **model_knobs(cfg, roi)), cfg, device)
    state = prepare_training(cfg, model, train_set, device)

    tracker = Tracker(cfg.tracking, run_id, out, cfg.model_dump(mode="json"), cfg.name)
    try:
        record = _loop(cfg, state, subject_set, by_id, (train_ids, val_ids, test_ids), roi,
                       device, tracker, progress)
        record.update(run_id=run_id, name=cfg.name, config=cfg.model_dump(mode="json"),
                      environment=environment(str(device)))
        if cfg.output.save_checkpoint:
            _save_checkpoint(unwrap(state.model), out / "model.pt")
            record["checkpoint"] = "model.pt"
        tracker.summary(summary_scalars(record))
        tracker.finish(0)
    except BaseException:
        tracker.finish(1)
        raise
    write_record(out, record)
    return record


def summary_scalars(record: dict) -> dict[str, float]:
    """The record's final scalars, flattened for W&B's run summary (``test/dice/<class>``...)."""
    out: dict[str, float] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(node, int | float) and not isinstance(node, bool):
            out[prefix] = node

    test = {k: v for k, v in record["test"].items() if k != "per_subject"}
    walk("test", test)
    walk("privacy", {k: v for k, v in record["privacy"].items() if k != "accountant_history"})
    walk("timing", record["timing"])
    return out


def _save_checkpoint(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)


def _loop(cfg: RunConfig, state: TrainState, subject_set: SubjectSet, by_id: dict,
          splits: tuple[list[str], list[str], list[str]], roi: tuple, device: torch.device,
          tracker: Tracker, progress: bool) -> dict:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    t = cfg.training
    train_ids, val_ids, test_ids = splits
    val = [by_id[i] for i in val_ids]
    test = [by_id[i] for i in test_ids]
    amp = t.amp
    history, step_times, subjects_seen, batch_sizes = [], [], 0, []
    steps_per_epoch = len(state.loader)
    train_time = 0.0
    step_timer = StepTimer(device)
    gpu_busy = GpuBusySampler(device)
    start = time.perf_counter()
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   disable=not progress, transient=False)
    with bar, gpu_busy:  # sampling stops with training, also on an error
        steps_task = bar.add_task("steps", total=steps_per_epoch * t.epochs, info="")
        for epoch in range(1, t.epochs + 1):
            losses, data_time = [], 0.0
            epoch_start = time.perf_counter()
            fetch_start = epoch_start
            pending = None  # the previous step's loss, read once this step is queued
            for x, y in state.loader:
                s0 = time.perf_counter()
                data_time += s0 - fetch_start
                with step_timer.step():
                    loss = train_step(state, x, y, cfg, device)
                batch_sizes.append(len(x))
                subjects_seen += len(x)
                if pending is not None:
                    _note_loss(losses, pending, bar, steps_task, epoch, t.epochs)
                pending = loss
                fetch_start = time.perf_counter()
            if pending is not None:
                _note_loss(losses, pending, bar, steps_task, epoch, t.epochs)
            step_times.extend(step_timer.collect())
            train_time += time.perf_counter() - epoch_start
            row = {"epoch": epoch, "train_loss": statistics.fmean(losses) if losses else None,
                   "epoch_time_s": time.perf_counter() - epoch_start,
                   "data_time_s": data_time}
            checkpoint_epoch = epoch == t.epochs or (t.eval_every and epoch % t.eval_every == 0)
            if state.accountant is not None and checkpoint_epoch:
                row["epsilon"] = _spent(state)  # PRV queries cost ~0.3 s: not every epoch
            if val and checkpoint_epoch:
                m = evaluate(state.model, val, cfg.dataset.dims, roi, subject_set.class_names,
                             device, subject_set.eval_regions, hd95=False, amp=amp)
                row["val_mean_dice"] = m["mean_dice"]
                row["val_dice"] = m["dice"]
                bar.update(steps_task, info=f"epoch {epoch} val dice {m['mean_dice']:.3f}")
            history.append(row)
            tracker.log({f"train/{k}" if k != "epoch" else k: v for k, v in row.items()},
                        step=epoch)
    test_metrics = evaluate(state.model, test, cfg.dataset.dims, roi, subject_set.class_names,
                            device, subject_set.eval_regions, hd95=True, amp=amp)
    total = time.perf_counter() - start
    privacy = {"enabled": False, "epsilon": math.inf, "unit": "subject",
               "guarantee": "none (non-private)"}
    if state.accountant is not None:
        plan = state.plan
        steps_done = sum(n for _, _, n in state.accountant.history)
        if steps_done != plan.steps:
            raise RuntimeError(f"accountant saw {steps_done} steps, plan had {plan.steps}")
        privacy = {"enabled": True, **plan.as_dict(), "epsilon": _spent(state),
                   "crops_per_subject": t.crops_per_subject,
                   "grad_sample_mode": cfg.privacy.grad_sample_mode,
                   "accountant_history": state.accountant.history,
                   "guarantee": f"({_spent(state):.4g}, {plan.delta:.3g})-DP per subject "
                                "(central DP-SGD, Poisson subject sampling)"}
    return {
        "setting": cfg.setting.kind,
        "dataset": {"name": subject_set.name, "class_names": subject_set.class_names,
                    "n_subjects": len(subject_set.subjects),
                    "sites": sorted({s.site for s in subject_set.subjects})},
        "splits": {"train": train_ids, "val": val_ids, "test": test_ids},
        "history": history,
        "test": test_metrics,
        "privacy": privacy,
        "timing": {
            "total_s": total, "train_s": train_time,
            "median_step_s": statistics.median(step_times) if step_times else None,
            "steps": len(step_times),
            "subjects_per_s": subjects_seen / train_time if train_time else None,
            "mean_batch_subjects": statistics.fmean(batch_sizes) if batch_sizes else 0.0,
            "peak_memory_mb": _peak_memory_mb(device),
            "data_s": sum(row["data_time_s"] for row in history),
            "gpu_busy_percent": gpu_busy.mean_percent(),
        },
    }


def _note_loss(losses: list[float], loss: torch.Tensor, bar, task, epoch: int,
               epochs: int) -> None:
    value = float(loss)
    if not math.isnan(value):
        losses.append(value)
    bar.update(task, advance=1, info=f"epoch {epoch}/{epochs} loss {value:.3f}")


def _spent(state: TrainState) -> float:
    return epsilon_of_history(state.accountant.history, state.plan.delta,
                              state.plan.accountant)
