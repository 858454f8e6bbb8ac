"""Built-in synthetic fetal-brain phantom: offline data with the FeTA label set.

Each subject is a T2w-like volume generated deterministically from (seed, subject index):
a brain whose size grows with a gestational-age-like parameter, a folded cortex, white matter,
lateral ventricles, deep grey matter, cerebellum and brainstem inside external CSF, in a
plausible arrangement (labels as in FeTA, Payette et al. 2021, Sci. Data 8:167). Sites differ
in contrast, noise, bias field and resolution, so a federated split has visible site effects.
Generated once per option set and cached as ``.npz``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator
from scipy import ndimage

from privseg.datasets.base import DatasetOptions, Subject, SubjectSet, register_dataset

FETA_CLASSES = [
    "background",
    "external_csf",
    "grey_matter",
    "white_matter",
    "ventricles",
    "cerebellum",
    "deep_grey_matter",
    "brainstem",
]

# Mean T2w intensity per label (fetal T2: CSF bright, unmyelinated WM brighter than GM).
_T2_INTENSITY = np.array([0.05, 1.0, 0.42, 0.64, 0.92, 0.50, 0.28, 0.56], dtype=np.float32)

# Site acquisition effects: contrast gamma, noise std, bias-field strength, blur sigma (voxels).
_SITES = {
    "site-A": dict(gamma=1.0, noise=0.05, bias=0.10, blur=0.5),
    "site-B": dict(gamma=1.4, noise=0.10, bias=0.20, blur=0.8),
    "site-C": dict(gamma=0.75, noise=0.08, bias=0.35, blur=1.1),
}
PHANTOM_VERSION = 1

#: named option sets (``dataset.options.preset``); explicit options override a preset's.
#: ``study``: large enough that DP noise is averaged over enough subjects to tell
#: architectures apart (issue 17); the default options stay the quick phantom of CI.
PRESETS: dict[str, dict[str, int]] = {
    "study": {"n_subjects": 1000, "size": 48, "n_sites": 3},
}


class PhantomOptions(DatasetOptions):
    """Options of the built-in phantom."""

    n_subjects: int = Field(160, ge=4, le=5000, description="number of subjects (scans)")
    size: int = Field(48, ge=16, le=256, description="volume edge length in voxels")
    n_sites: int = Field(3, ge=1, le=len(_SITES), description="acquisition sites (1-3)")
    seed: int = Field(0, description="generator seed (independent of the run seed)")
    preset: Literal["study"] | None = Field(
        None, description="a named option set (PRESETS): study = 1000 subjects, 3 sites")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            data = {**PRESETS[data["preset"]], **data}
        return data


def _ellipsoid(grid: np.ndarray, centre, radii) -> np.ndarray:
    """Normalised ellipsoid radius: < 1 inside."""
    c = np.asarray(centre, dtype=np.float32).reshape(3, 1, 1, 1)
    r = np.asarray(radii, dtype=np.float32).reshape(3, 1, 1, 1)
    return np.sqrt((((grid - c) / r) ** 2).sum(0))


def make_subject(index: int, size: int, site: str, seed: int) -> tuple[np.ndarray, np.ndarray,
                                                                          dict]:
    """Generate one phantom subject: (image [1,D,H,W] float32, label [D,H,W] uint8, meta)."""
    rng = np.random.default_rng([seed, index])
    ga = float(rng.uniform(21.0, 35.0))  # gestational-age-like parameter, weeks
    growth = 0.62 + 0.28 * (ga - 21.0) / 14.0  # brain extent relative to the field of view
    ax = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    grid = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"))  # (z, y, x) in [-1, 1]
    jitter = rng.normal(0.0, 0.03, size=3)
    shape = np.array([0.78, 0.88, 0.72]) * growth * rng.uniform(0.92, 1.08, size=3)

    # Head: external CSF shell around the brain.
    head = _ellipsoid(grid, jitter, shape * 1.12)
    brain_r = _ellipsoid(grid, jitter, shape)
    # Cortical folding grows with gestational age: angular modulation of the brain surface.
    theta = np.arctan2(grid[1] - jitter[1], grid[2] - jitter[2])
    phi = np.arctan2(grid[0] - jitter[0], grid[2] - jitter[2])
    n_folds = int(4 + (ga - 21.0) / 2.0)
    fold_amp = 0.015 + 0.05 * (ga - 21.0) / 14.0
    phase = rng.uniform(0, 2 * np.pi, size=2)
    folds = fold_amp * np.sin(n_folds * theta + phase[0]) * np.cos(n_folds * phi + phase[1])
    brain = brain_r < 1.0 + folds
    cortex_thickness = 0.16 + 0.04 * rng.uniform()

    label = np.zeros((size,) * 3, dtype=np.uint8)
    label[head < 1.0] = 1
    label[brain] = 2
    label[brain & (brain_r < 1.0 - cortex_thickness + folds)] = 3

    lat = 0.22 * shape[2] * rng.uniform(0.85, 1.15)
    vent_r = shape * np.array([0.26, 0.5, 0.17]) * (1.3 - 0.35 * (ga - 21.0) / 14.0)
    for side in (-1, 1):
        dgm = _ellipsoid(grid, jitter + [0.02, 0.1, side * lat * 1.9], shape * [0.3, 0.3, 0.2])
        label[(dgm < 1.0) & brain] = 6
        vent = _ellipsoid(grid, jitter + [0.1, -0.05, side * lat], vent_r)
        label[(vent < 1.0) & brain] = 4

    cereb = _ellipsoid(grid, jitter + [-0.45 * shape[0], -0.55 * shape[1], 0.0],
                       shape * [0.32, 0.28, 0.55])
    label[(cereb < 1.0) & (head < 1.0)] = 5
    stem_r = np.sqrt(((grid[1] - jitter[1] + 0.25 * shape[1]) / (0.2 * shape[1])) ** 2
                     + ((grid[2] - jitter[2]) / (0.2 * shape[2])) ** 2)
    stem = (stem_r < 1.0) & (grid[0] < jitter[0] - 0.05) & (head < 1.0)
    label[stem & (label != 5)] = 7

    fx = _SITES[site]
    image = _T2_INTENSITY[label] * rng.uniform(0.9, 1.1, size=8).astype(np.float32)[label]
    image = ndimage.gaussian_filter(image, fx["blur"])  # partial volume / resolution
    coeffs = rng.normal(0.0, fx["bias"], size=3)
    bias = 1.0 + (coeffs[:, None, None, None] * grid).sum(0)  # linear bias field
    image = np.clip(image * bias, 0.0, None) ** fx["gamma"]
    image = image + rng.normal(0.0, fx["noise"], size=image.shape)
    image = (image - image.mean()) / (image.std() + 1e-6)
    meta = {"gestational_age": round(ga, 2), "site": site, "index": index}
    return image[None].astype(np.float32), label, meta


def _cache_key(opts: PhantomOptions) -> str:
    # the preset's name is not part of the data: its values are (same data, same cache)
    payload = json.dumps({"v": PHANTOM_VERSION, **opts.model_dump(exclude={"preset"})},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@register_dataset(
    "phantom",
    options=PhantomOptions,
    description="built-in synthetic fetal-brain phantom with FeTA labels and 3 sites",
    needs_root=False,
)
def load_phantom(opts: PhantomOptions, root: Path | None, cache_dir: Path) -> SubjectSet:
    """Load the phantom from ``cache_dir``, generating (and caching atomically) on first use."""
    path = Path(cache_dir) / f"phantom-{_cache_key(opts)}.npz"
    sites = list(_SITES)[: opts.n_sites]
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            images, labels, ga = z["images"], z["labels"], z["ga"]
    else:
        made = [make_subject(i, opts.size, sites[i % len(sites)], opts.seed)
                for i in range(opts.n_subjects)]
        images = np.stack([m[0] for m in made]).astype(np.float16)
        labels = np.stack([m[1] for m in made])
        ga = np.array([m[2]["gestational_age"] for m in made])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, images=images, labels=labels, ga=ga)
        os.replace(tmp, path)
    subjects = [
        Subject(
            subject_id=f"phantom-{i:04d}",
            site=sites[i % len(sites)],
            image=images[i].astype(np.float32),
            label=labels[i],
            meta={"gestational_age": float(ga[i])},
        )
        for i in range(opts.n_subjects)
    ]
    return SubjectSet("phantom", subjects, FETA_CLASSES, in_channels=1,
                      description="synthetic fetal-brain phantom (FeTA label set)")
