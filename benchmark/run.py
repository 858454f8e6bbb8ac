"""One entry point for a run config: central or federated, as ``setting.kind`` says."""

from __future__ import annotations

from privseg.config import RunConfig
from privseg.datasets import SubjectSet


def run(cfg: RunConfig, *, progress: bool = True, force: bool = False,
        subject_set: SubjectSet | None = None) -> dict:
    """Train and evaluate the run ``cfg`` describes; write and return its record.

    Central configs go to :func:`privseg.central.run_central`, federated ones to the Flower
    simulation (:func:`privseg.federated.simulation.run_federated`). A finished run (same run
    id, complete record) is not rerun unless ``force``. Every run gets the same torch CPU
    thread count (:func:`privseg.training.setup.pin_cpu_threads`), so its metrics do not
    depend on how it was started.
    """
    from privseg.training.setup import pin_cpu_threads

    pin_cpu_threads()
    if cfg.setting.kind == "federated":
        from privseg.federated.simulation import run_federated

        return run_federated(cfg, progress=progress, force=force, subject_set=subject_set)
    from privseg.central import run_central

    return run_central(cfg, progress=progress, force=force, subject_set=subject_set)
