"""A site's work: local training with the spine's engine, local evaluation (a Flower client).

:class:`SiteClient` is a Flower ``NumPyClient``; simulation calls it in-process and deployment
serves it from one process per clinic, unchanged. What it returns is all that leaves the site:
model parameters (with SVT or partial sharing: only the selected coordinates, see
:mod:`privseg.federated.sparse`), its number of training subjects (the FedAvg weight), and
scalar metrics
(aggregate Dice/HD95 of its held-out subjects; its privacy spent; timings). No subject id, image,
label, prediction or per-subject value is returned.

Local training reuses :func:`privseg.training.step.prepare_training` and
:func:`~privseg.training.step.train_step`: in ``sample`` mode that is Opacus DP-SGD with Poisson
sampling of this site's subjects. The DP optimizer, its Poisson loader and the accountant
persist across rounds, so the accountant composes every local step of every round; the site
refuses to step past its planned total (its σ was calibrated for it), and in every mode to
answer more training rounds than the run has (what its ledger charges), nor does it hand out its
weights (``get_parameters``); it scores at most one model per round on its validation subjects
and one on its test subjects. The local optimizer's state (Adam moments) starts afresh each
round, as in FedAvg. Randomness (crops, Poisson sampling, noise) comes from the site's own seed
and generators; the torch/NumPy global RNG states are swapped in and out around the site's work
so that sites sharing one process (simulation) draw exactly what separate processes would.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import torch
from flwr.client import NumPyClient

from privseg.architectures import build
from privseg.config import RunConfig
from privseg.datasets import SubjectSet
from privseg.datasets.crops import crop_size
from privseg.dp.accounting import epsilon_of_history
from privseg.federated.site_plans import local_steps_per_round, plan_site_sample
from privseg.federated.sites import SiteData, site_seed
from privseg.federated.sparse import SiteSparsifier, is_sparse
from privseg.training.evaluate import evaluate, validation_subset
from privseg.training.setup import model_knobs, place_model, resolve_device, training_crops
from privseg.training.step import prepare_training, train_step, unwrap


def get_weights(model: torch.nn.Module) -> list[np.ndarray]:
    """The model's state (parameters and buffers) as NumPy arrays, in state-dict order."""
    return [v.detach().cpu().numpy().copy() for v in unwrap(model).state_dict().values()]


def weights_digest(weights: list[np.ndarray]) -> str:
    """SHA-256 of a list of arrays (shapes, dtypes and bytes): one global model's identity."""
    h = hashlib.sha256()
    for a in weights:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def set_weights(model: torch.nn.Module, weights: list[np.ndarray]) -> None:
    inner = unwrap(model)
    keys = list(inner.state_dict())
    if len(keys) != len(weights):
        raise ValueError(f"got {len(weights)} arrays for a model with {len(keys)} tensors")
    inner.load_state_dict(OrderedDict((k, torch.from_numpy(np.asarray(w).copy()))
                                      for k, w in zip(keys, weights, strict=True)), strict=True)


def site_config(cfg: RunConfig, site: str) -> RunConfig:
    """The run config as the site's engine sees it: its own seed; DP-SGD only in sample mode."""
    fed = cfg.setting.federated
    update: dict = {"seed": site_seed(cfg.seed, site)}
    if fed.dp_mode != "sample":
        update["privacy"] = cfg.privacy.model_copy(update={"enabled": False})
    return cfg.model_copy(update=update)


class SiteClient(NumPyClient):
    """One site of the federation (Flower ``NumPyClient``)."""

    def __init__(self, cfg: RunConfig, data: SiteData, subject_set: SubjectSet):
        t0 = time.perf_counter()
        self.cfg = cfg
        self.fed = cfg.setting.federated
        self.site = data.name
        self.data = data
        self.scfg = site_config(cfg, data.name)
        self.device = resolve_device(cfg.training.device)
        d = cfg.dataset
        self.class_names = subject_set.class_names
        self.regions = subject_set.eval_regions
        self.in_channels = subject_set.in_channels
        self.num_classes = subject_set.num_classes
        self.roi = crop_size(d.dims, d.patch_size, subject_set.subjects[0].label.shape)
        seed = self.scfg.seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = place_model(build(cfg.model.name, d.dims, self.in_channels,
                                      self.num_classes, **model_knobs(cfg, self.roi)), cfg,
                                self.device)
            train_set = training_crops(cfg, data.train)
            tc = time.perf_counter()
            plan = (plan_site_sample(self.scfg, len(data.train))
                    if self.scfg.privacy.enabled else None)
            calibration_s = time.perf_counter() - tc
            self.state = prepare_training(self.scfg, model, train_set, self.device, plan=plan)
        self.plan = self.state.plan
        q = self.plan.sample_rate if self.plan else None
        self.steps_per_round = local_steps_per_round(self.scfg, q or 1.0, len(data.train))
        self.steps_done = 0
        #: training rounds answered (a resent instruction answered from the cache is not one)
        self.rounds_done = 0
        #: ((round, digest of the global model), reply) of the last fit answered
        self.last_fit: tuple[tuple[int, str], tuple] | None = None
        #: (split, round, digest of the model) -> reply, of every evaluation answered
        self.evaluations: dict[tuple[str, int, str], tuple] = {}
        self._batches = None
        #: SVT / partial sharing: what turns the new weights into the sparse message
        self.sparsifier = (SiteSparsifier(cfg, data.name, seed) if is_sparse(self.fed)
                           else None)
        # The site's own RNG streams (global torch/NumPy state while it works).
        g = torch.Generator().manual_seed(seed)
        self._torch_rng = g.get_state()
        self._np_rng = np.random.RandomState(seed % 2**32).get_state()
        self.compute_s = time.perf_counter() - t0  # the site's own work: setup, fit, evaluate
        #: ``compute_s`` split by what it was spent on (seconds): σ calibration, the rest of
        #: setup, training steps, ε accounting, evaluation, weights in and out of a round
        self.compute_split_s = {"calibration_s": calibration_s,
                                "setup_s": self.compute_s - calibration_s, "train_s": 0.0,
                                "accounting_s": 0.0, "eval_s": 0.0, "exchange_s": 0.0}
        #: of ``compute_split_s["train_s"]``, the seconds spent loading batches
        self.data_s = 0.0

    # -- helpers --------------------------------------------------------------------------
    @contextmanager
    def _own_rng(self):
        outer_t, outer_np = torch.get_rng_state(), np.random.get_state()
        torch.set_rng_state(self._torch_rng)
        np.random.set_state(self._np_rng)
        try:
            yield
        finally:
            self._torch_rng, self._np_rng = torch.get_rng_state(), np.random.get_state()
            torch.set_rng_state(outer_t)
            np.random.set_state(outer_np)

    def _next_batch(self):
        while True:
            if self._batches is None:
                self._batches = iter(self.state.loader)
            try:
                return next(self._batches)
            except StopIteration:
                self._batches = None

    def epsilon(self) -> float:
        if self.state.accountant is None:
            return math.inf
        return epsilon_of_history(self.state.accountant.history, self.plan.delta,
                                  self.plan.accountant)

    def properties(self) -> dict:
        """Static facts the server needs to build the model (no data)."""
        return {"site": self.site, "in_channels": self.in_channels,
                "num_classes": self.num_classes, "class_names": ",".join(self.class_names),
                "dims": self.cfg.dataset.dims, "crop": "x".join(map(str, self.roi)),
                "regions": ",".join(self.regions or {})}

    # -- Flower NumPyClient ---------------------------------------------------------------
    def get_properties(self, config):
        return self.properties()

    def get_parameters(self, config):
        # The server builds the initial model itself and never needs a site's weights; after a
        # round they would be the locally trained model, which in svt and site mode no DP
        # covers (the site shares only its sparsified or securely aggregated update).
        raise RuntimeError(f"site {self.site}: refusing to send its model weights (the server "
                           "builds the initial model itself; a site sends only its updates)")

    def fit(self, parameters, config):
        key = (int(config.get("round", 0)), weights_digest(parameters))
        if self.last_fit is not None and self.last_fit[0] == key:
            # the same round's instruction with the same global model, sent again because our
            # reply was lost (a SuperLink restart): the same reply, no DP step taken twice
            return self.last_fit[1]
        reply = self._fit(parameters, config)
        self.last_fit = (key, reply)
        return reply

    def _fit(self, parameters, config):
        t0 = time.perf_counter()
        if self.rounds_done >= self.fed.rounds:
            # what the site's privacy is charged for (its plan, its ledger entry) is one answer
            # per round of the run: in svt and site mode each further one would be spent unseen
            raise RuntimeError(f"site {self.site}: has answered all {self.fed.rounds} rounds "
                               "of this run; refusing to train again")
        planned = self.plan.steps if self.plan else None
        if planned is not None and self.steps_done + self.steps_per_round > planned:
            raise RuntimeError(f"site {self.site}: another round would exceed the "
                               f"{planned} DP steps its σ was calibrated for")
        mu = float(config.get("proximal_mu", 0.0))
        with self._own_rng():
            set_weights(self.state.model, parameters)
            inner = getattr(self.state.optimizer, "original_optimizer", self.state.optimizer)
            inner.state.clear()  # fresh local optimizer each round (FedAvg)
            handle = None
            if mu > 0:
                anchor = [p.detach().clone() for p in self.state.model.parameters()]

                def proximal(opt, args, kwargs):
                    # FedProx: + mu (w - w_global), added after clipping and noise (it does not
                    # depend on data, so it does not change the DP guarantee).
                    for p, a in zip(self.state.model.parameters(), anchor, strict=True):
                        if p.grad is not None:
                            p.grad.add_(p.detach() - a, alpha=mu)

                handle = inner.register_step_pre_hook(proximal)
            losses = []
            tt = time.perf_counter()
            try:
                for _ in range(self.steps_per_round):
                    tb = time.perf_counter()
                    x, y = self._next_batch()
                    self.data_s += time.perf_counter() - tb
                    losses.append(train_step(self.state, x, y, self.scfg, self.device))
                    self.steps_done += 1
            finally:
                if handle is not None:
                    handle.remove()
            self.rounds_done += 1
            weights = get_weights(self.state.model)
        train_s = time.perf_counter() - tt
        self.compute_split_s["train_s"] += train_s
        accounting_s = 0.0
        metrics = {"site": self.site, "steps": self.steps_done}
        if self.sparsifier is not None:  # only the selected coordinates leave the site
            weights, counts = self.sparsifier.message(parameters, weights)
            metrics.update(counts)
        if self.fed.dp_mode == "none":
            # Training loss is data-dependent and not privatised: sent only without DP.
            values = [v for v in (float(loss) for loss in losses) if not math.isnan(v)]
            metrics["train_loss"] = float(np.mean(values)) if values else float("nan")
        if self.plan is not None:
            # The site's own accounting (a PRV query, ~10-100 ms) is site work, timed as such.
            ta = time.perf_counter()
            metrics.update(epsilon=self.epsilon(), delta=self.plan.delta,
                           noise_multiplier=self.plan.noise_multiplier,
                           sample_rate=self.plan.sample_rate, planned_steps=self.plan.steps,
                           accountant=self.plan.accountant)
            accounting_s = time.perf_counter() - ta
            self.compute_split_s["accounting_s"] += accounting_s
        dt = time.perf_counter() - t0
        self.compute_s += dt
        # the rest of the round: the global weights in, the update out (and sparsified)
        self.compute_split_s["exchange_s"] += dt - train_s - accounting_s
        metrics["fit_s"] = dt
        return weights, len(self.data.train), metrics

    def evaluate(self, parameters, config):
        """Aggregate metrics of the held-out subjects under the model the server sends: at most
        one validation per round of the run and one final test, each answered once (a resent
        instruction gets the same reply). Held-out subjects are outside every DP guarantee, so
        the number of models a server may have scored on them is bounded."""
        split = str(config.get("split", "val"))
        if split not in ("val", "test"):
            raise ValueError(f"site {self.site}: no evaluation split {split!r}")
        key = (split, int(config.get("round", self.fed.rounds)), weights_digest(parameters))
        if key in self.evaluations:
            return self.evaluations[key]
        allowed = self.fed.rounds if split == "val" else 1
        if sum(k[0] == split for k in self.evaluations) >= allowed:
            raise RuntimeError(f"site {self.site}: has answered {allowed} {split} evaluation(s) "
                               "of this run, all it gives; refusing another")
        reply = self._evaluate(parameters, config, split)
        self.evaluations[key] = reply
        return reply

    def _evaluate(self, parameters, config, split: str):
        t0 = time.perf_counter()
        subjects = {"val": self.data.val, "test": self.data.test}[split]
        if split == "val" and int(config.get("round", self.fed.rounds)) < self.fed.rounds:
            # before the last round: the fixed validation subset (training.val_subjects)
            subjects = validation_subset(subjects, self.cfg.training.val_subjects,
                                         self.scfg.seed)
        if not subjects:
            return 0.0, 0, {"site": self.site, "split": split, "n_subjects": 0}
        with self._own_rng():
            set_weights(self.state.model, parameters)
            metrics = site_metrics(self.state.model, subjects, self.cfg.dataset.dims, self.roi,
                                   self.class_names, self.device, self.regions,
                                   hd95=split == "test")
        dt = time.perf_counter() - t0
        self.compute_s += dt
        self.compute_split_s["eval_s"] += dt
        metrics.update(site=self.site, split=split, eval_s=dt)
        return 1.0 - metrics["mean_dice"], len(subjects), metrics


def site_metrics(model, subjects, dims, roi, class_names, device, regions, hd95: bool) -> dict:
    """Scalar, aggregate metrics of a site's held-out subjects (nothing per subject).

    Per class: the mean, and the sum and count of finite values, so that the server can pool
    sites into exactly the mean over all subjects (as the central engine computes it).
    """
    m = evaluate(model, subjects, dims, roi, class_names, device, regions, hd95=hd95)
    out: dict = {"n_subjects": len(subjects), "mean_dice": m["mean_dice"]}
    metric_names = ["dice", "hd95"] if hd95 else ["dice"]
    for metric in metric_names:
        if hd95 and metric == "hd95":
            out["mean_hd95"] = m["mean_hd95"]
        for c, v in m[metric].items():
            vals = [s[metric][c] for s in m["per_subject"].values()
                    if math.isfinite(s[metric][c])]
            out[f"{metric}/{c}"] = v
            out[f"{metric}_sum/{c}"] = float(sum(vals))
            out[f"{metric}_n/{c}"] = len(vals)
    return out


def make_client(cfg: RunConfig, data: SiteData, subject_set: SubjectSet) -> SiteClient:
    return SiteClient(cfg, data, subject_set)
