"""The audit run: train once with canaries, report an empirical lower bound next to the claim.

``privseg audit`` (:mod:`privseg.audit_cli`) calls :func:`run_audit`. A central DP run is
trained through the same pieces as ``privseg train`` (:func:`privseg.training.step.
prepare_training` and :func:`~privseg.training.step.train_step`: Opacus' Poisson subject
sampler, k-crop averaging, privseg's DP optimizer and accountant), with canaries whose coins
only the auditor knows:

- ``gradient``: Dirac gradient canaries inside the DP optimizer (:mod:`privseg.dp.canaries`,
  white-box, Nasr et al. 2023), observed at every step;
- ``input``: canary subjects in the training set (:mod:`privseg.dp.input_canaries`, black-box),
  scored on the final model only.

The one-run bound (Steinke et al. 2023) comes from :mod:`privseg.dp.audit`. The audit writes
its own record, ``OUTPUT_DIR/RUN_ID-audit-KIND[-fault]/record.json``: the run's privacy (the
accountant's ε: the claim) and ``audit`` (the lower bound, m, r, v, confidence).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from privseg.architectures import build
from privseg.config import RunConfig
from privseg.datasets import SubjectSet
from privseg.datasets.crops import SubjectCrops, crop_size
from privseg.datasets.split import split_subjects
from privseg.dp.accounting import epsilon_of_history
from privseg.dp.audit import AuditResult, audit_scores, secret_coins
from privseg.dp.canaries import GradientCanaries
from privseg.dp.input_canaries import InputCanary, make_input_canaries, score_input_canaries
from privseg.record import environment, read_record, run_dir, write_record
from privseg.training.setup import (
    load_subjects,
    model_knobs,
    place_model,
    resolve_device,
    seed_everything,
)
from privseg.training.step import prepare_training, train_step, unwrap

KINDS = ("gradient", "input")
DEFAULT_CANARIES = {"gradient": 1000, "input": 100}


@dataclass
class Fault:
    """A deliberately broken mechanism, to show that the audit catches one (tests, demos).

    ``noise_fraction``: the noise actually added, as a fraction of the calibrated σ (the
    accountant still counts the calibrated σ); ``clipping``: False sums gradients unclipped.
    """

    noise_fraction: float = 1.0
    clipping: bool = True

    @property
    def broken(self) -> bool:
        return self.noise_fraction != 1.0 or not self.clipping

    def tag(self) -> str:
        parts = [f"noise{self.noise_fraction:g}"] if self.noise_fraction != 1.0 else []
        return "-".join(parts + ([] if self.clipping else ["noclip"]))


def check_auditable(cfg: RunConfig, kind: str) -> None:
    """Refuse what the audit cannot measure, naming the config key."""
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not cfg.privacy.enabled:
        raise ValueError("privacy.enabled is false: a non-private run has no ε to audit")
    if cfg.setting.kind != "central":
        raise ValueError("setting.kind=federated: audits of federated runs are not built yet "
                         "(central runs only)")
    if kind == "gradient" and cfg.privacy.grad_sample_mode == "ghost":
        raise ValueError("privacy.grad_sample_mode=ghost: gradient canaries need hooks or "
                         "functorch (per-sample gradients in the DP optimizer)")


def _input_bases(cfg: RunConfig, subject_set: SubjectSet, train: list, m: int,
                 rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Canary images: fresh phantom subjects (never in the data set) for the phantom, else
    copies of random training images."""
    if subject_set.name == "phantom":
        from privseg.datasets.phantom import PhantomOptions, make_subject

        opts = PhantomOptions(**cfg.dataset.options)
        sites = sorted({s.site for s in subject_set.subjects})
        made = [make_subject(10**6 + i, opts.size, sites[i % len(sites)], opts.seed)
                for i in range(m)]
        return [(img, lab, sites[i % len(sites)]) for i, (img, lab, _) in enumerate(made)]
    picks = rng.integers(0, len(train), size=m)
    return [(train[j].image.copy(), train[j].label.copy(), train[j].site) for j in picks]


def run_audit(cfg: RunConfig, *, kind: str = "gradient", canaries: int | None = None,
              fault: Fault | None = None, confidence: float = 0.95,
              guess_fraction: float = 0.1, progress: bool = True, force: bool = False,
              subject_set: SubjectSet | None = None) -> dict:
    """Train ``cfg`` once with ``canaries`` canaries of ``kind``; write and return the record.

    The record's ``privacy.epsilon`` is the accountant's ε (the claim) and ``audit`` the
    one-run lower bound (Steinke et al. 2023) at ``confidence``, with ``guess_fraction`` of the
    canaries guessed in and as many out. A complete record is reused unless ``force``.
    """
    check_auditable(cfg, kind)
    fault = fault or Fault()
    m = canaries or DEFAULT_CANARIES[kind]
    if m < 2:
        raise ValueError("--canaries must be at least 2")
    run_id = f"{cfg.run_id()}-audit-{kind}-m{m}" + (f"-{fault.tag()}" if fault.broken else "")
    out = run_dir(cfg.output.dir, run_id)
    if not force and (existing := read_record(out)) is not None:
        return existing
    start = time.perf_counter()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.training.device)
    d = cfg.dataset
    subject_set = subject_set or load_subjects(cfg)
    by_id = subject_set.by_id()
    train_ids, _, _ = split_subjects(by_id, d.val_fraction, d.test_fraction, cfg.seed,
                                     stratify_by={s.subject_id: s.site
                                                  for s in subject_set.subjects})
    train = [by_id[i] for i in train_ids]
    included = secret_coins(m)
    input_canaries: list[InputCanary] = []
    if kind == "input":
        rng = np.random.default_rng()
        input_canaries = make_input_canaries(_input_bases(cfg, subject_set, train, m, rng),
                                             subject_set.num_classes, rng)
        train = train + [c.subject for c, inc in zip(input_canaries, included, strict=True)
                         if inc]
    train_set = SubjectCrops(train, d.dims, d.patch_size, cfg.training.crops_per_subject,
                             cfg.training.foreground_fraction, subject_set.num_classes)
    roi = crop_size(d.dims, d.patch_size, subject_set.subjects[0].label.shape)
    model = place_model(build(cfg.model.name, d.dims, subject_set.in_channels,
                              subject_set.num_classes, **model_knobs(cfg, roi)), cfg, device)
    state = prepare_training(cfg, model, train_set, device)
    grad = None
    if kind == "gradient" or fault.broken:
        grad = GradientCanaries(state.optimizer, included if kind == "gradient"
                                else np.zeros(1, bool), state.plan.sample_rate,
                                noise_fraction=fault.noise_fraction, clipping=fault.clipping)
    _train(cfg, state, device, progress)
    claimed = epsilon_of_history(state.accountant.history, state.plan.delta,
                                 state.plan.accountant)
    if kind == "gradient":
        scores = grad.scores
    else:
        scores = score_input_canaries(unwrap(state.model), input_canaries, d.dims, device)
    result = audit_scores(scores, included, kind=kind, delta=state.plan.delta,
                          epsilon_claimed=claimed, guess_fraction=guess_fraction,
                          confidence=confidence)
    record = _record(cfg, run_id, subject_set, state, claimed, result, fault, device)
    record["timing"] = {"total_s": time.perf_counter() - start}
    write_record(out, record)
    return record


def _train(cfg: RunConfig, state, device: torch.device, progress: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    epochs = cfg.training.epochs
    bar = Progress(TextColumn("[bold]audit training"), BarColumn(), MofNCompleteColumn(),
                   disable=not progress, transient=True)
    with bar:
        task = bar.add_task("steps", total=len(state.loader) * epochs)
        for _ in range(epochs):
            for x, y in state.loader:
                train_step(state, x, y, cfg, device)
                bar.advance(task)
    steps = sum(n for _, _, n in state.accountant.history)
    if steps != state.plan.steps:
        raise RuntimeError(f"accountant saw {steps} steps, plan had {state.plan.steps}")


def _record(cfg: RunConfig, run_id: str, subject_set: SubjectSet, state, claimed: float,
            result: AuditResult, fault: Fault, device: torch.device) -> dict:
    plan = state.plan
    audit = result.as_dict()
    audit["fault"] = {"noise_fraction": fault.noise_fraction, "clipping": fault.clipping}
    audit["flagged"] = bool(result.epsilon_lower > claimed)
    return {
        "run_id": run_id, "name": cfg.name, "setting": cfg.setting.kind,
        "dataset": {"name": subject_set.name, "class_names": subject_set.class_names,
                    "n_subjects": len(subject_set.subjects)},
        "privacy": {"enabled": True, **plan.as_dict(), "epsilon": claimed,
                    "crops_per_subject": cfg.training.crops_per_subject,
                    "guarantee": f"({claimed:.4g}, {plan.delta:.3g})-DP per subject claimed "
                                 "(central DP-SGD, Poisson subject sampling)"},
        "audit": audit,
        "test": {},
        "config": cfg.model_dump(mode="json"),
        "environment": environment(str(device)),
    }


def summary_line(record: dict) -> str:
    """One line for a person: claimed ε, audited lower bound, m, r, v."""
    a = record["audit"]
    flag = "  ** ABOVE THE CLAIM: the mechanism leaks more than it reports **" if (
        a["epsilon_lower"] > a["epsilon_claimed"]) else ""
    low = a["epsilon_lower"]
    low_s = "inf" if isinstance(low, str) or math.isinf(low) else f"{low:.3f}"
    return (f"claimed ε = {a['epsilon_claimed']:.3f} (δ = {a['delta']:.3g})   audited ε ≥ "
            f"{low_s} at {a['confidence']:.0%} confidence   ({a['kind']} canaries: m = "
            f"{a['canaries_m']}, {a['canaries_in']} in; r = {a['guesses_r']} guesses, "
            f"v = {a['correct_v']} correct){flag}")
