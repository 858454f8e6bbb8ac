"""From a manifest to a loaded :class:`SubjectSet`: validate, preprocess, cache."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from privseg.datasets.base import DatasetOptions, Subject, SubjectSet
from privseg.datasets.cache import cache_path, file_stem, read_cache, save_array, save_index
from privseg.datasets.faults import DataValidationError, Fault
from privseg.datasets.manifest import Case, Manifest
from privseg.datasets.validate import check_manifest

log = logging.getLogger(__name__)

Preprocess = Callable[[Case], tuple[np.ndarray, np.ndarray, dict]]


def load_manifest(
    manifest: Manifest,
    options: DatasetOptions,
    cache_dir: Path,
    make_preprocess: Callable[[], Preprocess],
) -> SubjectSet:
    """Load a data set from its cache, or validate, preprocess and cache it.

    ``make_preprocess()`` builds the per-subject preprocessing function; it is only called on
    a cache miss. On a cache hit nothing is decoded (the cached subjects passed validation when
    written).
    Otherwise every subject is validated first and :class:`DataValidationError` lists all
    faults before anything is preprocessed.
    """
    folder = cache_path(cache_dir, manifest, options)
    subjects = read_cache(folder)
    if subjects is None:
        subjects = _build(manifest, options, folder, make_preprocess)
    return SubjectSet(
        name=manifest.name,
        subjects=subjects,
        class_names=list(manifest.class_names),
        in_channels=manifest.in_channels,
        description=manifest.description,
        eval_regions=dict(manifest.eval_regions),
    )


def _build(
    manifest: Manifest,
    options: DatasetOptions,
    folder: Path,
    make_preprocess: Callable[[], Preprocess],
) -> list[Subject]:
    t0 = time.monotonic()
    faults, _ = check_manifest(manifest)
    if faults:
        raise DataValidationError(faults, manifest.name)
    log.info("%s: %d subjects valid (%.1fs)", manifest.name, len(manifest.cases),
             time.monotonic() - t0)
    preprocess = make_preprocess()

    def subjects():
        for i, case in enumerate(manifest.cases):
            image, label, meta = preprocess(case)
            yield case.subject_id, case.site, {**case.meta, **meta}, image, label
            if (i + 1) % 50 == 0:
                log.info("%s: preprocessed %d/%d", manifest.name, i + 1, len(manifest.cases))

    return write_cache(folder, subjects(), manifest.name, str(manifest.root), manifest.class_names,
                       options, t0)


def write_cache(
    folder: Path,
    subjects: Iterable[tuple[str, str, dict, np.ndarray, np.ndarray]],
    name: str,
    source: str,
    class_names: list[str],
    options: DatasetOptions,
    t0: float,
) -> list[Subject]:
    """Cache preprocessed ``(subject_id, site, meta, image, label)`` tuples and read them back.

    Shared by every loader (files or a PACS), so a cache looks the same whatever its source.
    """
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        entries = _write_arrays(folder, subjects, name, source)
    except BaseException:
        if created:  # nothing half-written stays behind
            shutil.rmtree(folder, ignore_errors=True)
        raise
    info = {
        "dataset": name,
        "root": source,
        "options": options.model_dump(mode="json"),
        "class_names": class_names,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    save_index(folder, entries, info)
    log.info("%s: cached %d subjects in %s (%.1fs)", name, len(entries), folder,
             time.monotonic() - t0)
    subjects_read = read_cache(folder)
    assert subjects_read is not None
    return subjects_read


def _write_arrays(folder: Path, subjects: Iterable, name: str, source: str) -> list[dict]:
    """Save each preprocessed subject's arrays; a non-finite image stops it, named.

    Validation checked the files' voxels; preprocessing can still overflow float32 (a finite
    intensity of 3e38 scaled or resampled) into NaN/Inf, which would train to a NaN model."""
    entries = []
    for i, (subject_id, site, meta, image, label) in enumerate(subjects):
        image = image.astype(np.float32, copy=False)
        n_bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        if n_bad:
            raise DataValidationError([Fault(
                f"{source}: subject {subject_id}", f"preprocessing produced {n_bad} NaN/Inf "
                "voxel(s) from finite input (intensities beyond float32's range?)")], name)
        stem = file_stem(i, subject_id)
        save_array(folder / f"{stem}.image.npy", image)
        save_array(folder / f"{stem}.label.npy", label.astype(np.uint8, copy=False))
        entries.append({"subject_id": subject_id, "site": site, "stem": stem,
                        "meta": {**meta, "shape": list(image.shape)}})
    return entries
