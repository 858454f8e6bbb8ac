"""``privseg data check``: validate a data set's files and summarise it, writing nothing."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from privseg.datasets.base import DatasetOptions, SubjectSet, get_dataset_entry, load_dataset
from privseg.datasets.faults import DataValidationError, Fault
from privseg.datasets.manifest import get_manifest_builder
from privseg.datasets.validate import CaseStats, check_manifest


def _run_check(
    name: str, options: dict | DatasetOptions | None, root: str | Path | None
) -> tuple[list[Fault], list[CaseStats], list[str]]:
    try:
        entry = get_dataset_entry(name)
    except KeyError as e:
        return [Fault("dataset.name", str(e.args[0]))], [], []
    try:
        opts = options if isinstance(options, DatasetOptions) else entry.options(**(options or {}))
    except ValidationError as e:
        return [Fault("dataset.options", str(e))], [], []
    builder = get_manifest_builder(name)
    if builder is None:  # a data set without files (the phantom): check the arrays it makes
        return _check_generated(name, opts, root)
    if root is None:
        return [Fault("dataset.root", f"dataset {name!r} needs a root folder")], [], []
    root = Path(root)
    if not root.is_dir():
        return [Fault(str(root), "data set folder does not exist")], [], []
    manifest = builder(opts, root)
    faults, stats = check_manifest(manifest)
    return faults, stats, manifest.class_names


def check_dataset(
    name: str, options: dict | DatasetOptions | None, root: str | Path | None
) -> list[Fault]:
    """Every fault of data set ``name`` at ``root``, found in one pass; empty when all is well.

    Each subject's files must exist and decode, image and label must agree in shape and
    affine, the label values must be in the declared set and the images free of NaN/Inf.
    Nothing is written (no cache).
    """
    return _run_check(name, options, root)[0]


def _check_generated(name, opts, root) -> tuple[list[Fault], list[CaseStats], list[str]]:
    with tempfile.TemporaryDirectory(prefix="privseg-check-") as tmp:
        try:
            ss = load_dataset(name, opts, root, Path(tmp))
        except DataValidationError as e:
            return e.faults, [], []
        faults = check_arrays(ss)
        return faults, [] if faults else subject_stats(ss), ss.class_names


def check_arrays(ss: SubjectSet) -> list[Fault]:
    """Faults in loaded arrays: shapes, dtypes, label range, NaN/Inf."""
    faults = []
    for s in ss.subjects:
        where = f"{ss.name}:{s.subject_id}"
        if s.image.ndim != 4 or s.image.shape[0] != ss.in_channels:
            faults.append(Fault(where, f"image shape {s.image.shape} is not [C={ss.in_channels}"
                                       ", D, H, W]"))
        elif s.label.shape != s.image.shape[1:]:
            faults.append(Fault(where, f"label shape {s.label.shape} != image {s.image.shape}"))
        if not np.isfinite(s.image).all():
            faults.append(Fault(where, "image has NaN or Inf"))
        if s.label.size and (s.label.min() < 0 or s.label.max() >= ss.num_classes):
            faults.append(Fault(where, f"label values outside 0..{ss.num_classes - 1}"))
    return faults


def subject_stats(ss: SubjectSet) -> list[CaseStats]:
    """Per-subject stats of a loaded set (shape, spacing, voxels per class)."""
    out = []
    for s in ss.subjects:
        counts = np.bincount(np.asarray(s.label).ravel(), minlength=ss.num_classes)
        spacing = tuple(s.meta.get("spacing") or ())
        out.append(
            CaseStats(
                s.subject_id,
                s.site,
                tuple(s.label.shape),
                spacing,
                int(s.image.shape[0]),
                {n: int(c) for n, c in zip(ss.class_names, counts, strict=False)},
            )
        )
    return out


def _range(values: list[tuple], fmt: str) -> str:
    if not values or not values[0]:
        return "n/a"
    arr = np.array(values, dtype=float)
    lo, hi = arr.min(axis=0), arr.max(axis=0)
    return f"{' x '.join(format(v, fmt) for v in lo)} .. {' x '.join(format(v, fmt) for v in hi)}"


def format_summary(
    title: str, stats: list[CaseStats], class_names: list[str], axes: str = "D x H x W"
) -> str:
    """Subjects per site, shape and spacing ranges (along ``axes``), mean voxels per class."""
    lines = [f"{title}: {len(stats)} subjects"]
    sites = Counter(s.site for s in stats)
    lines.append("  sites: " + ", ".join(f"{k} {v}" for k, v in sorted(sites.items())))
    shapes = [s.shape for s in stats if s.shape]
    if len({len(s) for s in shapes}) == 1:
        lines.append(f"  shape ({axes}): {_range(shapes, '.0f')}")
    spacings = [s.spacing for s in stats if s.spacing]
    if spacings and len({len(s) for s in spacings}) == 1:
        lines.append(f"  spacing ({axes}, mm): {_range(spacings, '.3g')}")
    channels = sorted({s.channels for s in stats})
    lines.append(f"  channels: {', '.join(map(str, channels))}")
    if stats:
        lines.append("  voxels per class (mean over subjects; subjects with the class):")
        for name in class_names:
            counts = [s.class_voxels.get(name, 0) for s in stats]
            present = sum(c > 0 for c in counts)
            lines.append(f"    {name:<30s} {np.mean(counts):12.1f}  {present}/{len(stats)}")
    return "\n".join(lines)


def summarise(subject_set: SubjectSet) -> str:
    """Text summary of a loaded data set: sites, shapes, spacings, label volumes."""
    return format_summary(subject_set.name, subject_stats(subject_set), subject_set.class_names)


def data_check_report(
    name: str, options: dict | DatasetOptions | None, root: str | Path | None
) -> tuple[str, bool]:
    """Printable report of ``check_dataset`` and whether the data set is free of faults.

    With faults: every fault, one per line, naming its file. Without: a summary of the
    files as they are on disk (before preprocessing).
    """
    faults, stats, class_names = _run_check(name, options, root)
    where = f"{name} at {root}" if root is not None else name
    if faults:
        lines = [f"{where}: {len(faults)} fault(s)"] + [f"  - {f}" for f in faults]
        return "\n".join(lines), False
    axes = "file axes" if get_manifest_builder(name) is not None else "D x H x W"
    return format_summary(f"{where}: OK", stats, class_names, axes), True
