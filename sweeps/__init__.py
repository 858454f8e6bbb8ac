"""Sweep files (W&B sweep YAML) for every table and figure, and the local runner."""

import importlib

_PUBLIC = ("Sweep", "SweepError", "build_run_config", "builtin_sweeps", "expand", "load_sweep",
           "to_wandb")


def __getattr__(name: str):
    # imported on first use: privseg.sweeps.spec loads the config models (pydantic), which the
    # CLI's other commands (`privseg privacy`, `--help`) never need
    if name in _PUBLIC:
        return getattr(importlib.import_module("privseg.sweeps.spec"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_PUBLIC)
