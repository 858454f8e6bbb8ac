"""Weights & Biases tracking: online when logged in, offline otherwise, or off.

Only scalars and the config go to W&B; training images are never logged unless the config's
``tracking.log_images`` asks for it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from privseg.config import TrackingConfig


def wandb_mode(cfg: TrackingConfig) -> str:
    """Resolve ``auto`` to ``online`` when an API key is configured, else ``offline``."""
    if cfg.wandb != "auto":
        return cfg.wandb
    if os.environ.get("WANDB_MODE") in {"offline", "disabled", "online"}:
        return {"disabled": "off"}.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def drop_stale_offline_runs(run_dir: Path, run_id: str) -> list[Path]:
    """Remove the offline W&B folders an earlier, unfinished attempt of this run left.

    A run is only (re)trained when it has no complete record, so such a folder holds a killed
    or forced-over attempt under the same W&B run id; left beside the new one, ``privseg sync``
    would upload both into one W&B run. The new attempt replaces it.
    """
    stale = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


class Tracker:
    """Thin wrapper: a no-op when tracking is off, else one W&B run."""

    def __init__(self, cfg: TrackingConfig, run_id: str, run_dir: Path, config: dict,
                 name: str | None = None):
        self.mode = wandb_mode(cfg)
        self.log_images = cfg.log_images
        self.run = None
        if self.mode == "off":
            return
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        drop_stale_offline_runs(run_dir, run_id)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group, tags=cfg.tags,
            name=name or run_id, id=run_id, resume="allow", dir=str(run_dir),
            mode=self.mode, config=config, reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log scalars only (images only if ``log_images``)."""
        if self.run is None:
            return
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        self.run.log(scalars, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
