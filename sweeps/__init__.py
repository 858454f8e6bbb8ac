"""Sweep files (W&B sweep YAML) for every table and figure, and the local runner."""

from privseg.sweeps.spec import (
    Sweep,
    SweepError,
    build_run_config,
    builtin_sweeps,
    expand,
    load_sweep,
    to_wandb,
)

__all__ = ["Sweep", "SweepError", "build_run_config", "builtin_sweeps", "expand", "load_sweep",
           "to_wandb"]
