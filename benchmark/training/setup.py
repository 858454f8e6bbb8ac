"""What a run sets up before its first step, central or federated: seeds, device, model, data.

Shared by the central run (:mod:`privseg.central`), the federated sites and server
(:mod:`privseg.federated`) and ``privseg bench``.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from privseg.architectures import get_entry
from privseg.config import RunConfig
from privseg.datasets import Subject, SubjectSet, load_dataset
from privseg.datasets.augment import view_augmentation
from privseg.datasets.crops import SubjectCrops, crop_size
from privseg.record import read_record

log = logging.getLogger("privseg")


def pin_cpu_threads() -> int:
    """Give every run the same number of torch CPU threads, however it was started.

    CPU kernels split their reductions by thread count, so a run's metrics depended on it: the
    same config gave Dice 0.764998 with ``privseg sweep -j 1`` (2 threads) and 0.766223 with
    ``-j 2`` (1 thread per worker). One thread always (sweep workers, ``privseg train``,
    ``reproduce``) makes a run's numbers independent of ``-j`` and of the machine's cores.
    ``PRIVSEG_THREADS=N`` trades that for speed on a many-core CPU: results then match only
    runs made with the same N (the record's ``environment.cpu_threads`` says which).
    """
    n = max(1, int(os.environ.get("PRIVSEG_THREADS", "1")))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor (~20% of a CPU DP step); results stay
    # deterministic without it, since no kernel here reads uninitialised memory.
    torch.utils.deterministic.fill_uninitialized_memory = False


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device=cuda but no CUDA device is available")
    return torch.device(name)


def default_cache_dir() -> Path:
    """Where data caches and site state live unless a config names a folder."""
    return Path.home() / ".cache" / "privseg"


def builder_knobs(name: str, options: dict, spatial: tuple[int, ...]) -> dict:
    """Model ``name``'s builder knobs: ``options``, plus ``img_size`` = ``spatial`` (the input's
    spatial size) for models whose input size is fixed at build time (UNETR's position
    embedding) when not given."""
    knobs = dict(options)
    if "img_size" in get_entry(name).knobs() and knobs.get("img_size") is None:
        knobs["img_size"] = tuple(spatial)
    return knobs


def model_knobs(cfg: RunConfig, roi: tuple[int, ...]) -> dict:
    """The config's model knobs for crops of size ``roi`` (:func:`builder_knobs`)."""
    return builder_knobs(cfg.model.name, cfg.model.options,
                         roi[1:] if cfg.dataset.dims == 2 else roi)


def place_model(model: nn.Module, cfg: RunConfig, device: torch.device) -> nn.Module:
    """Move the model to ``device``; channels-last for 2D on CUDA when the config asks.

    Channels-last (NHWC) lets cuDNN pick its tensor-core conv kernels without layout
    transposes; it does not change the arithmetic of per-sample gradients.
    """
    model = model.to(device)
    if cfg.training.channels_last and device.type == "cuda" and cfg.dataset.dims == 2:
        model = model.to(memory_format=torch.channels_last)
    return model


def training_crops(cfg: RunConfig, subjects: list[Subject],
                   num_classes: int | None = None) -> SubjectCrops:
    """The training items of ``subjects`` as the config asks: k crops per subject, each an
    augmented view when ``training.augment`` turns augmentations on."""
    d, t = cfg.dataset, cfg.training
    size = crop_size(d.dims, d.patch_size, subjects[0].label.shape) if subjects else None
    view = size[1:] if size and d.dims == 2 else size  # a 2D view is one slice of the crop
    return SubjectCrops(subjects, d.dims, d.patch_size, t.crops_per_subject,
                        t.foreground_fraction, num_classes,
                        augment=view_augmentation(**t.augment.model_dump(), dims=d.dims,
                                                  spatial_size=view))


def load_subjects(cfg: RunConfig) -> SubjectSet:
    """Load (and validate) the config's data set, through the persistent cache."""
    d = cfg.dataset
    return load_dataset(d.name, d.options, d.root,
                        Path(d.cache_dir) if d.cache_dir else default_cache_dir())


def completed_record(out: Path) -> dict | None:
    """The complete record in run directory ``out`` (logged), or None."""
    existing = read_record(out)
    if existing is not None:
        log.info("run %s already complete, not rerun (--force reruns it): %s", out.name, out)
    return existing
