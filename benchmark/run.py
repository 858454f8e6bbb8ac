"""One entry point for a run config: central or federated, as ``setting.kind`` says; an
empirical privacy audit when the config has an ``audit`` section."""

from __future__ import annotations

from privseg.config import RunConfig
from privseg.datasets import SubjectSet


def run(cfg: RunConfig, *, progress: bool = True, force: bool = False,
        subject_set: SubjectSet | None = None) -> dict:
    """Train and evaluate the run ``cfg`` describes; write and return its record.

    Central configs go to :func:`privseg.central.run_central`, federated ones to the Flower
    simulation (:func:`privseg.federated.simulation.run_federated`); a config with an
    ``audit`` section to :func:`privseg.audit.run_audit` (so that sweeps can hold audits: the
    sweep runner calls this function). A finished run (same run
    id, complete record) is not rerun unless ``force``. Every run gets the same torch CPU
    thread count (:func:`privseg.training.setup.pin_cpu_threads`), so its metrics do not
    depend on how it was started.
    """
    from privseg.training.setup import pin_cpu_threads

    pin_cpu_threads()
    if cfg.audit is not None:
        from privseg.audit import run_audit

        return run_audit(cfg, progress=progress, force=force, subject_set=subject_set)
    if cfg.setting.kind == "federated":
        from privseg.federated.simulation import run_federated

        return run_federated(cfg, progress=progress, force=force, subject_set=subject_set)
    from privseg.central import run_central

    return run_central(cfg, progress=progress, force=force, subject_set=subject_set)
