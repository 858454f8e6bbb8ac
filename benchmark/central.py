"""The central run: one loop for private and non-private training on pooled data.

Loads and splits the subjects, builds the model, trains through the shared step
(:mod:`privseg.training.step`; DP-SGD with Poisson subject sampling when privacy is enabled),
evaluates whole volumes and writes the run record and checkpoint. Federated runs are
:mod:`privseg.federated`'s; :func:`privseg.run.run` dispatches a config to either.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from privseg.architectures import build
from privseg.config import RunConfig
from privseg.datasets import SubjectSet
from privseg.datasets.crops import crop_size
from privseg.datasets.split import split_subjects
from privseg.dp.accounting import epsilon_of_history
from privseg.dp.randomness import noise_note
from privseg.recipes import recipe_statement
from privseg.record import environment, last_validation_dice, run_dir, write_record
from privseg.tracking import Tracker
from privseg.training.ema import evaluate_averages
from privseg.training.evaluate import evaluate, validation_subset
from privseg.training.setup import (
    completed_record,
    load_subjects,
    model_knobs,
    place_model,
    resolve_device,
    seed_everything,
    training_crops,
)
from privseg.training.step import TrainState, prepare_training, train_step, unwrap
from privseg.training.timing import GpuBusySampler, StepTimer, process_age_s

#: what a central DP run's record discloses outside its guarantee
CENTRAL_NOT_COVERED = [
    "the training subjects' ids (splits.train): membership of the training set is disclosed "
    "outright by the record",
    "per-epoch training loss (history[].train_loss; un-noised, computed on training subjects)",
    "per-epoch wall and data-loading times (history[].epoch_time_s, data_time_s; W&B train/*), "
    "which track how many subjects each epoch's Poisson draws held",
    "validation and test metrics (un-noised; computed on held-out subjects, not on training "
    "subjects)",
]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_central(cfg: RunConfig, *, progress: bool = True, force: bool = False,
                subject_set: SubjectSet | None = None) -> dict:
    """Train and evaluate one central run; write its checkpoint and record; return the record.

    A finished run (same run id, complete record) is not rerun unless ``force``.
    """
    run_id = cfg.run_id()
    out = run_dir(cfg.output.dir, run_id)
    if not force and (existing := completed_record(out)) is not None:
        return existing
    startup_s = process_age_s()  # the interpreter, imports and command line before the run
    startup_cpu_s = time.process_time()
    t_setup = time.perf_counter()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.training.device)
    d = cfg.dataset
    t_data = time.perf_counter()
    subject_set = subject_set or load_subjects(cfg)
    load_s = time.perf_counter() - t_data
    by_id = subject_set.by_id()
    train_ids, val_ids, test_ids = split_subjects(
        by_id, d.val_fraction, d.test_fraction, cfg.seed,
        stratify_by={s.subject_id: s.site for s in subject_set.subjects})
    if not train_ids:
        raise ValueError(f"the split leaves no training subjects out of {len(by_id)}")
    train_set = training_crops(cfg, [by_id[i] for i in train_ids], subject_set.num_classes)
    roi = crop_size(d.dims, d.patch_size, subject_set.subjects[0].label.shape)
    model = place_model(build(cfg.model.name, d.dims, subject_set.in_channels,
                              subject_set.num_classes, **model_knobs(cfg, roi)), cfg, device)
    state = prepare_training(cfg, model, train_set, device)

    tracker = Tracker(cfg.tracking, run_id, out, cfg.model_dump(mode="json"), cfg.name)
    setup_s = time.perf_counter() - t_setup
    try:
        record = _loop(cfg, state, subject_set, by_id, (train_ids, val_ids, test_ids), roi,
                       device, tracker, progress)
        timing = record["timing"]
        # before the loop: loading the subjects, σ calibration, the rest (model, tracker)
        timing.update(load_s=load_s, calibration_s=state.calibration_s,
                      setup_s=setup_s - load_s - state.calibration_s, startup_s=startup_s)
        record.update(run_id=run_id, name=cfg.name, config=cfg.model_dump(mode="json"),
                      environment=environment(str(device)))
        if cfg.output.save_checkpoint:
            _save_checkpoint(unwrap(state.model), out / "model.pt")
            record["checkpoint"] = "model.pt"
            for name, averaged in (state.averages.averaged() if state.averages else {}).items():
                _save_checkpoint(averaged, out / f"model-{name}.pt")
                record[name]["checkpoint"] = f"model-{name}.pt"
        # wall_s: this run from its setup to its record (startup_s came before it)
        timing["wall_s"] = time.perf_counter() - t_setup
        # the same in this process's CPU seconds: on a shared machine the wall-clock figures
        # grow with other processes' load, these far less
        timing["cpu_s"].update(startup_s=startup_cpu_s,
                               wall_s=time.process_time() - startup_cpu_s)
        tracker.summary(summary_scalars(record))
        tracker.finish(0)
    except BaseException:
        tracker.finish(1)
        raise
    write_record(out, record)
    return record


def summary_scalars(record: dict) -> dict[str, float | str | bool]:
    """The record's final values, flattened for W&B's run summary (``test/dice/<class>``...),
    so that the results store reads the same numbers back from W&B as from the record
    (strings and flags too: ``privacy/accountant``, ``privacy/guarantee``, ``privacy/enabled``).
    """
    out: dict[str, float | str | bool] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(node, int | float | str):
            out[prefix] = node

    test = {k: v for k, v in record["test"].items() if k != "per_subject"}
    walk("test", test)
    for name in ("ema", "polyak"):  # parameter averages (privseg.training.ema)
        if name in record:
            walk(f"{name}/test", {k: v for k, v in record[name]["test"].items()
                                  if k != "per_subject"})
            if (record[name].get("val") or {}).get("mean_dice") is not None:
                out[f"{name}/val/mean_dice"] = record[name]["val"]["mean_dice"]
    if (last := last_validation_dice(record)) is not None:  # results' released.val_mean_dice
        out["val/mean_dice"] = last
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
    val_between = validation_subset(val, t.val_subjects, cfg.seed)  # before the last epoch
    test = [by_id[i] for i in test_ids]
    amp = t.amp
    history, step_times, subjects_seen = [], [], 0
    steps_per_epoch = len(state.loader)
    train_time = eval_time = accounting_time = 0.0
    cpu = {"train_s": 0.0, "eval_s": 0.0}
    eval_split: dict[str, dict[str, float]] = {"val": {}, "test": {}}
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
            epoch_start, epoch_cpu = time.perf_counter(), time.process_time()
            fetch_start = epoch_start
            pending = None  # the previous step's loss, read once this step is queued
            for x, y in state.loader:
                s0 = time.perf_counter()
                data_time += s0 - fetch_start
                with step_timer.step():
                    loss = train_step(state, x, y, cfg, device)
                subjects_seen += len(x)
                if pending is not None:
                    _note_loss(losses, pending, bar, steps_task, epoch, t.epochs)
                pending = loss
                fetch_start = time.perf_counter()
            if pending is not None:
                _note_loss(losses, pending, bar, steps_task, epoch, t.epochs)
            step_times.extend(step_timer.collect())
            train_time += time.perf_counter() - epoch_start
            cpu["train_s"] += time.process_time() - epoch_cpu
            row = {"epoch": epoch, "train_loss": statistics.fmean(losses) if losses else None,
                   "epoch_time_s": time.perf_counter() - epoch_start,
                   "data_time_s": data_time}
            checkpoint_epoch = epoch == t.epochs or (t.eval_every and epoch % t.eval_every == 0)
            if state.accountant is not None and checkpoint_epoch:
                ta = time.perf_counter()
                row["epsilon"] = _spent(state)  # PRV queries cost ~0.3 s: not every epoch
                accounting_time += time.perf_counter() - ta
            if val and checkpoint_epoch:
                te, te_cpu = time.perf_counter(), time.process_time()
                subjects = val if epoch == t.epochs else val_between
                m = evaluate(state.model, subjects, cfg.dataset.dims, roi, subject_set.class_names,
                             device, subject_set.eval_regions, hd95=False, amp=amp,
                             timing=eval_split["val"])
                eval_time += time.perf_counter() - te
                cpu["eval_s"] += time.process_time() - te_cpu
                row["val_mean_dice"] = m["mean_dice"]
                row["val_dice"] = m["dice"]
                row["val_n_subjects"] = len(subjects)
                bar.update(steps_task, info=f"epoch {epoch} val dice {m['mean_dice']:.3f}")
            history.append(row)
            tracker.log({f"train/{k}" if k != "epoch" else k: v for k, v in row.items()},
                        step=epoch)
    te, te_cpu = time.perf_counter(), time.process_time()
    test_metrics = evaluate(state.model, test, cfg.dataset.dims, roi, subject_set.class_names,
                            device, subject_set.eval_regions, hd95=True, amp=amp,
                            timing=eval_split["test"])
    averaged = evaluate_averages(state.averages, lambda m: evaluate(
        m, test, cfg.dataset.dims, roi, subject_set.class_names, device,
        subject_set.eval_regions, hd95=True, amp=amp, timing=eval_split["test"]),
        (lambda m: evaluate(
            m, val, cfg.dataset.dims, roi, subject_set.class_names, device,
            subject_set.eval_regions, hd95=False, amp=amp, timing=eval_split["val"]))
        if val else None)
    eval_time += time.perf_counter() - te
    cpu["eval_s"] += time.process_time() - te_cpu
    ta = time.perf_counter()
    eps_final = _spent(state) if state.accountant is not None else None
    accounting_time += time.perf_counter() - ta
    total = time.perf_counter() - start
    privacy = {"enabled": False, "epsilon": math.inf, "unit": "subject",
               "guarantee": "none (non-private)"}
    if state.accountant is not None:
        plan = state.plan
        steps_done = sum(n for _, _, n in state.accountant.history)
        if steps_done != plan.steps:
            raise RuntimeError(f"accountant saw {steps_done} steps, plan had {plan.steps}")
        eps = eps_final
        noise_seed = cfg.privacy.noise_seed
        replay = ("" if noise_seed is None else
                  " Not against whoever holds the config: its noise_seed replays the noise.")
        privacy = {"enabled": True, **plan.as_dict(), "epsilon": eps,
                   "crops_per_subject": t.crops_per_subject,
                   "grad_sample_mode": cfg.privacy.grad_sample_mode,
                   "accountant_history": state.accountant.history,
                   "sampling": "Poisson sampling of subjects (secret coins)",
                   "neighbouring": "add or remove one subject",
                   "noise": noise_note(noise_seed),
                   "guarantee": f"({eps:.4g}, {plan.delta:.3g})-DP per subject (central DP-SGD, "
                                f"Poisson subject sampling) for the released model; "
                                f"{noise_note(noise_seed)}.{replay}",
                   "not_covered": CENTRAL_NOT_COVERED + _recipe_not_covered(cfg)}
    return {
        "setting": cfg.setting.kind,
        "dataset": {"name": subject_set.name, "class_names": subject_set.class_names,
                    "n_subjects": len(subject_set.subjects),
                    "sites": sorted({s.site for s in subject_set.subjects})},
        "splits": {"train": train_ids, "val": val_ids, "test": test_ids},
        "history": history,
        # validations before the last epoch on a fixed subset (training.val_subjects)?
        "validation": {"subjects": len(val), "between_checkpoints": len(val_between),
                       "eval_every": t.eval_every},
        "test": test_metrics,
        **averaged,  # "ema" / "polyak": the averaged weights' test metrics
        "privacy": privacy,
        **({"recipe": recipe_statement(cfg.model.recipe)} if cfg.model.recipe else {}),
        "timing": {
            # total_s: the loop (training, evaluation, accounting); train_s: the epochs'
            # steps and batch loading (data_s of it); eval_s: validation and test
            "total_s": total, "train_s": train_time, "eval_s": eval_time,
            # eval_s by split and part: predicting volumes, computing Dice (and HD95: test);
            # the metrics run in a worker thread beside the prediction, so the parts overlap
            "eval_split_s": {f"{split}_{part}": v for split, parts in eval_split.items()
                             for part, v in parts.items()},
            "accounting_s": accounting_time,
            "median_step_s": statistics.median(step_times) if step_times else None,
            "steps": len(step_times),
            # DP: expected subjects (steps × B); the exact count of Poisson draws is private
            "subjects_per_s": (subjects_seen if state.accountant is None else
                               len(step_times) * t.expected_batch_size) / train_time
            if train_time else None,
            "peak_memory_mb": _peak_memory_mb(device),
            "data_s": sum(row["data_time_s"] for row in history),
            "gpu_busy_percent": gpu_busy.mean_percent(),
            "cpu_s": cpu,  # train_s, eval_s in this process's CPU seconds
        },
    }


def _recipe_not_covered(cfg: RunConfig) -> list[str]:
    """The record's line on the choice of hyperparameters by a recipe (privseg.recipes)."""
    note = recipe_statement(cfg.model.recipe)
    if note is None:
        return []
    return [f"the choice of hyperparameters (recipe {note['name']!r}, tuned by "
            f"{note['tuning_method']}): tuning privacy cost {note['tuning_privacy_cost']}"]


def _note_loss(losses: list[float], loss: torch.Tensor, bar, task, epoch: int,
               epochs: int) -> None:
    value = float(loss)
    if not math.isnan(value):
        losses.append(value)
    bar.update(task, advance=1, info=f"epoch {epoch}/{epochs} loss {value:.3f}")


def _spent(state: TrainState) -> float:
    return epsilon_of_history(state.accountant.history, state.plan.delta,
                              state.plan.accountant)
