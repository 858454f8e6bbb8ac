"""Small configs and data shared by the spine tests (tiny phantom, tiny U-Net)."""

from __future__ import annotations

from pathlib import Path

from privseg.config import RunConfig, parse_config

TINY_PHANTOM = {"n_subjects": 24, "size": 16, "n_sites": 3}
TINY_UNET = {"base_channels": 4, "depth": 2}


def tiny_config(tmp_path: Path, **sections) -> RunConfig:
    """A fast config on a tiny phantom; ``sections`` override whole config sections' keys."""
    data = {
        "seed": 0,
        "dataset": {"name": "phantom", "dims": 2, "options": dict(TINY_PHANTOM),
                    "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.1,
                    "test_fraction": 0.2},
        "model": {"name": "unet", "options": dict(TINY_UNET)},
        "training": {"epochs": 1, "expected_batch_size": 4, "physical_batch_size": 4,
                     "eval_every": 0},
        "privacy": {"enabled": True, "target_epsilon": 8.0},
        "tracking": {"wandb": "off"},
        "output": {"dir": str(tmp_path / "runs")},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return parse_config(data)
