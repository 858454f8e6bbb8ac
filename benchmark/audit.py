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

Federated runs go through the real Flower simulation (:func:`privseg.federated.simulation.
simulate`): with ``dp_mode: sample`` the canaries sit inside one site (its DP optimizer, or
canary subjects in its data) and the claim is that site's ε; with ``dp_mode: site`` canary site
updates join DP-FedAvg's clipped sum before the server's noise
(:mod:`privseg.federated.site_canaries`) and the claim is the site-level ε.

What to audit is the config's ``audit`` section (:class:`privseg.config.AuditConfig`), so a
sweep can hold audits: :func:`privseg.run.run` sends such configs here. The one-run bound
(Steinke et al. 2023) comes from :mod:`privseg.dp.audit`. The audit writes its own record,
``OUTPUT_DIR/RUN_ID-audit-KIND-mM[-fault]/record.json`` (the run id of the audited config with
the audit's tag): the run's privacy (the accountant's ε: the claim) and ``audit`` (the lower
bound, m, r, v, confidence).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from privseg.architectures import build
from privseg.config import AuditConfig, RunConfig
from privseg.datasets import SubjectSet
from privseg.datasets.crops import crop_size
from privseg.datasets.split import split_subjects
from privseg.dp.accounting import epsilon_of_history
from privseg.dp.audit import audit_scores, secret_coins
from privseg.dp.canaries import GradientCanaries
from privseg.dp.input_canaries import InputCanary, make_input_canaries, score_input_canaries
from privseg.record import environment, read_record, run_dir, write_record
from privseg.training.setup import (
    load_subjects,
    model_knobs,
    place_model,
    resolve_device,
    seed_everything,
    training_crops,
)
from privseg.training.step import prepare_training, train_step, unwrap

KINDS = ("gradient", "input")


@dataclass
class Scored:
    """What one audited training run hands back: canary scores, the claim, the privacy block."""

    scores: np.ndarray
    claimed: float
    privacy: dict
    n_subjects: int
    device: torch.device
    extra: dict


def with_audit(cfg: RunConfig, **audit) -> RunConfig:
    """``cfg`` with its ``audit`` section (keys of :class:`privseg.config.AuditConfig`) set or
    updated; ``None`` values leave a key as it was."""
    base = cfg.audit.model_dump() if cfg.audit is not None else {}
    base.update({k: v for k, v in audit.items() if v is not None})
    return cfg.model_copy(update={"audit": AuditConfig(**base)})


def _site_level(cfg: RunConfig) -> bool:
    return cfg.setting.federated is not None and cfg.setting.federated.dp_mode == "site"


def check_auditable(cfg: RunConfig) -> None:
    """Refuse what the audit cannot measure, naming the config key."""
    a = cfg.audit
    if a is None:
        raise ValueError("audit: the config has no audit section (privseg audit sets one)")
    if not cfg.privacy.enabled:
        raise ValueError("privacy.enabled is false: a non-private run has no ε to audit")
    if a.kind == "gradient" and cfg.privacy.grad_sample_mode == "ghost" and not _site_level(cfg):
        raise ValueError("privacy.grad_sample_mode=ghost: gradient canaries need hooks or "
                         "functorch (per-sample gradients in the DP optimizer)")
    fed = cfg.setting.federated
    if fed is None:
        return
    if fed.secure_aggregation:
        raise ValueError("setting.federated.secure_aggregation=true: audits of the SecAgg+ "
                         "path (the sites clip, Flower's wrapper adds the noise) are not built")
    if fed.local_baseline:
        raise ValueError("setting.federated.local_baseline=true: not audited (set it false)")
    if fed.dp_mode == "site" and a.kind == "input":
        raise ValueError("audit.kind=input with setting.federated.dp_mode=site: canary sites "
                         "made of input canaries are not built (gradient: canary site updates)")
    if fed.dp_mode == "site" and not a.clipping:
        raise ValueError("audit.clipping=false with setting.federated.dp_mode=site: canary site "
                         "updates have norm C, so a clipping fault would not show (use "
                         "audit.noise_fraction)")


def _input_bases(cfg: RunConfig, subject_set: SubjectSet, train: list, m: int,
                 rng: np.random.Generator, site: str | None = None
                 ) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Canary images: fresh phantom subjects (never in the data set) for the phantom, else
    copies of random training images; all at ``site`` when given (one federated site's)."""
    if subject_set.name == "phantom":
        from privseg.datasets.phantom import PhantomOptions, make_subject

        opts = PhantomOptions(**cfg.dataset.options)
        sites = [site] if site else sorted({s.site for s in subject_set.subjects})
        made = [make_subject(10**6 + i, opts.size, sites[i % len(sites)], opts.seed)
                for i in range(m)]
        return [(img, lab, sites[i % len(sites)]) for i, (img, lab, _) in enumerate(made)]
    picks = rng.integers(0, len(train), size=m)
    return [(train[j].image.copy(), train[j].label.copy(), site or train[j].site)
            for j in picks]


def run_audit(cfg: RunConfig, *, guess_fraction: float = 0.1, progress: bool = True,
              force: bool = False, subject_set: SubjectSet | None = None) -> dict:
    """Train ``cfg`` once with the canaries its ``audit`` section asks for; write and return
    the record.

    Central: canaries in the DP-SGD step. Federated ``sample``: canaries inside the first site
    (by name) in the real simulation; the claim is that site's ε. Federated ``site``: canary
    site updates in DP-FedAvg; the claim is the site-level ε. The record's ``privacy.epsilon``
    is the claim and ``audit`` the one-run lower bound (Steinke et al. 2023) at
    ``audit.confidence``, with ``guess_fraction`` of the canaries guessed in and as many out.
    A complete record is reused unless ``force``.
    """
    check_auditable(cfg)
    a = cfg.audit
    run_id = cfg.run_id()
    out = run_dir(cfg.output.dir, run_id)
    if not force and (existing := read_record(out)) is not None:
        return existing
    start = time.perf_counter()
    plain = cfg.model_copy(update={"audit": None})  # the audited run, as `privseg train` has it
    seed_everything(cfg.seed)
    subject_set = subject_set or load_subjects(cfg)
    included = secret_coins(a.canaries_m())
    if cfg.setting.kind == "central":
        run = _central(plain, a, subject_set, included, progress)
    elif _site_level(cfg):
        run = _federated_site(plain, a, subject_set, included)
    else:
        run = _federated_sample(plain, a, subject_set, included)
    result = audit_scores(run.scores, included, kind=a.kind, delta=run.privacy["delta"],
                          epsilon_claimed=run.claimed, guess_fraction=guess_fraction,
                          confidence=a.confidence)
    audit = {**result.as_dict(), **run.extra,
             "fault": {"noise_fraction": a.noise_fraction, "clipping": a.clipping},
             "flagged": bool(result.epsilon_lower > run.claimed)}
    record = {
        "run_id": run_id, "name": cfg.name, "setting": cfg.setting.kind,
        "dataset": {"name": subject_set.name, "class_names": subject_set.class_names,
                    "n_subjects": run.n_subjects},
        "privacy": run.privacy, "audit": audit, "test": {},
        "config": cfg.model_dump(mode="json"), "environment": environment(str(run.device)),
        "timing": {"total_s": time.perf_counter() - start},
    }
    write_record(out, record)
    return record


def _gradient_canaries(optimizer, sample_rate: float, a: AuditConfig,
                       included: np.ndarray) -> GradientCanaries | None:
    """Gradient canaries for a gradient audit; for an input audit of a broken mechanism an
    empty set, which only applies the fault; else none."""
    if a.kind != "gradient" and not a.broken():
        return None
    return GradientCanaries(optimizer, included if a.kind == "gradient" else np.zeros(1, bool),
                            sample_rate, noise_fraction=a.noise_fraction, clipping=a.clipping)


def _with_input_canaries(cfg: RunConfig, subject_set: SubjectSet, train: list,
                         included: np.ndarray, site: str | None = None
                         ) -> tuple[list, list[InputCanary]]:
    """``train`` plus the included canary subjects, and all the canaries (to score)."""
    rng = np.random.default_rng()
    canaries = make_input_canaries(_input_bases(cfg, subject_set, train, len(included), rng,
                                                site), subject_set.num_classes, rng)
    return train + [c.subject for c, inc in zip(canaries, included, strict=True) if inc], canaries


def _central(cfg: RunConfig, a: AuditConfig, subject_set: SubjectSet, included: np.ndarray,
             progress: bool) -> Scored:
    """A central DP-SGD run (the pieces of ``privseg train``) with gradient or input canaries."""
    device = resolve_device(cfg.training.device)
    d = cfg.dataset
    by_id = subject_set.by_id()
    train_ids, _, _ = split_subjects(by_id, d.val_fraction, d.test_fraction, cfg.seed,
                                     stratify_by={s.subject_id: s.site
                                                  for s in subject_set.subjects})
    train = [by_id[i] for i in train_ids]
    input_canaries: list[InputCanary] = []
    if a.kind == "input":
        train, input_canaries = _with_input_canaries(cfg, subject_set, train, included)
    train_set = training_crops(cfg, train, subject_set.num_classes)  # privseg train's items
    roi = crop_size(d.dims, d.patch_size, subject_set.subjects[0].label.shape)
    model = place_model(build(cfg.model.name, d.dims, subject_set.in_channels,
                              subject_set.num_classes, **model_knobs(cfg, roi)), cfg, device)
    state = prepare_training(cfg, model, train_set, device)
    grad = _gradient_canaries(state.optimizer, state.plan.sample_rate, a, included)
    _train(cfg, state, device, progress)
    claimed = epsilon_of_history(state.accountant.history, state.plan.delta,
                                 state.plan.accountant)
    if a.kind == "gradient":
        scores = grad.scores
    else:
        scores = score_input_canaries(unwrap(state.model), input_canaries, d.dims, device)
    plan = state.plan
    privacy = {"enabled": True, **plan.as_dict(), "epsilon": claimed,
               "crops_per_subject": cfg.training.crops_per_subject,
               "guarantee": f"({claimed:.4g}, {plan.delta:.3g})-DP per subject claimed "
                            "(central DP-SGD, Poisson subject sampling)"}
    return Scored(scores, claimed, privacy, len(train), device, {})


def _federated_sample(cfg: RunConfig, a: AuditConfig, subject_set: SubjectSet,
                      included: np.ndarray) -> Scored:
    """Sample-level federated DP: canaries inside the first site (by name), trained through
    the real simulation; scored on that site's DP optimizer (gradient) or on the final global
    model (input). The claim is that site's ε (its accountant, all rounds composed)."""
    from flwr.common import parameters_to_ndarrays

    from privseg.federated.client import set_weights
    from privseg.federated.simulation import simulate
    from privseg.federated.sites import build_sites

    sites, _ = build_sites(cfg, subject_set)
    target = sorted(sites)[0]
    input_canaries: list[InputCanary] = []
    if a.kind == "input":
        sites[target].train, input_canaries = _with_input_canaries(
            cfg, subject_set, sites[target].train, included, target)
    held: dict = {}

    def prepare(server, clients) -> None:
        c = clients[target]
        held["grad"] = _gradient_canaries(c.state.optimizer, c.plan.sample_rate, a, included)

    server, proxies, _ = simulate(cfg, subject_set, sites, prepare=prepare)
    client = proxies[target].site
    claimed = client.epsilon()
    if a.kind == "gradient":
        scores = held["grad"].scores
    else:
        set_weights(client.state.model, parameters_to_ndarrays(server.parameters))
        scores = score_input_canaries(unwrap(client.state.model), input_canaries,
                                      cfg.dataset.dims, client.device)
    plan = client.plan
    privacy = {"enabled": True, "mode": "sample", "unit": "subject", **plan.as_dict(),
               "epsilon": claimed, "audited_site": target,
               "epsilon_max_over_sites": server.record()["privacy"]["epsilon"],
               "crops_per_subject": cfg.training.crops_per_subject,
               "guarantee": f"({claimed:.4g}, {plan.delta:.3g})-DP per subject of site "
                            f"{target} claimed (DP-SGD inside the site, its accountant "
                            "composing all its local steps over all rounds)"}
    return Scored(scores, claimed, privacy, len(sites[target].train), client.device,
                  {"site": target})


def _federated_site(cfg: RunConfig, a: AuditConfig, subject_set: SubjectSet,
                    included: np.ndarray) -> Scored:
    """Site-level DP-FedAvg: canary site updates inside the server's
    :class:`~privseg.federated.site_dp.PoissonSiteDP`, attached once the strategy is built,
    observed through every released global model."""
    from privseg.federated.simulation import simulate
    from privseg.federated.site_canaries import SiteUpdateCanaries

    held: dict = {}

    def prepare(server, clients) -> None:
        rec = server.recorder
        initialize = rec.initialize_parameters

        def initialize_with_canaries(client_manager):
            initial = initialize(client_manager)
            held["site"] = SiteUpdateCanaries(rec.strategy, included,
                                              rec.dp_site["sample_rate"],
                                              noise_fraction=a.noise_fraction)
            return initial

        rec.initialize_parameters = initialize_with_canaries

    server, proxies, _ = simulate(cfg, subject_set, prepare=prepare)
    privacy = server.record()["privacy"]
    canaries = held["site"]
    return Scored(canaries.scores, float(privacy["epsilon"]), privacy,
                  int(privacy["n_sites"]), next(iter(proxies.values())).site.device,
                  {"rounds_observed": canaries.rounds})


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
            f"v = {a['correct_v']} correct)" + (f" inside site {a['site']}" if a.get("site")
                                                else "") + flag)
