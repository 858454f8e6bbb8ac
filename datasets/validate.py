"""Input validation: decode every file of every subject and report all faults in one pass.

Checks per subject: the files exist and decode; image and label shapes and affines agree;
the image has the declared number of channels; label values are integers within the declared
set; the image has no NaN or Inf and is not all zero. Every fault names its file. Nothing
is written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privseg.datasets.faults import Fault
from privseg.datasets.manifest import Case, Manifest

AFFINE_RTOL = 1e-4
AFFINE_ATOL = 1e-3  # mm; publishers' qform/sform round-off is far below this


@dataclass
class CaseStats:
    """What a subject looks like on disk (or after loading), for summaries."""

    subject_id: str
    site: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    channels: int
    class_voxels: dict[str, int] = field(default_factory=dict)


def check_manifest(manifest: Manifest) -> tuple[list[Fault], list[CaseStats]]:
    """All faults of a data set (layout faults first, then per subject) and per-subject stats.

    Stats are returned for the subjects without faults.
    """
    faults = list(manifest.faults)
    if not manifest.cases and not faults:
        faults.append(Fault(str(manifest.root), f"no {manifest.name} subjects found here"))
    for sid, n in Counter(c.subject_id for c in manifest.cases).items():
        if n > 1:
            faults.append(Fault(str(manifest.root), f"subject id {sid!r} occurs {n} times"))
    stats: list[CaseStats] = []
    check = _check_photo_case if manifest.reader == "photo" else _check_nifti_case
    for case in manifest.cases:
        case_faults, case_stats = check(case, manifest)
        faults.extend(case_faults)
        if case_stats is not None:
            stats.append(case_stats)
    return faults, stats


def _missing(case: Case) -> list[Fault]:
    faults = [Fault(str(p), "symbolic link to no file (broken, or a loop)" if p.is_symlink()
                    else "missing file") for p in case.files if not p.is_file()]
    if case.label is None:
        faults.append(Fault(str(case.images[0]), "no label file for this image"))
    return faults


def _load_nifti(path: Path, faults: list[Fault]):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # any decoding failure is a fault of this file
        faults.append(Fault(str(path), f"cannot decode NIfTI ({type(e).__name__}: {e})"))
        return None, None
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)
            or data.dtype == np.bool_):  # complex, RGB24 (a structured dtype), ...
        faults.append(Fault(str(path), f"voxel type {data.dtype} is not real numbers "
                                       "(complex or RGB data cannot be segmented here)"))
        return None, None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return img, data


def _label_faults(path: Path, label: np.ndarray, manifest: Manifest) -> tuple[list[Fault], dict]:
    faults: list[Fault] = []
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all():
            return [Fault(str(path), "label map contains NaN or Inf")], {}
        if not np.array_equal(label, np.round(label)):
            return [Fault(str(path), "label map has non-integer values")], {}
    values, counts = np.unique(label.astype(np.int64, copy=False), return_counts=True)
    bad = sorted(set(values.tolist()) - set(manifest.label_values))
    if bad:
        faults.append(
            Fault(
                str(path),
                f"label values {bad} outside the declared set {list(manifest.label_values)}",
            )
        )
        return faults, {}
    by_class: dict[str, int] = {}
    for v, n in zip(values.tolist(), counts.tolist(), strict=True):
        name = manifest.class_names[manifest.label_map[v]]
        by_class[name] = by_class.get(name, 0) + int(n)
    return faults, by_class


def _check_nifti_case(case: Case, manifest: Manifest) -> tuple[list[Fault], CaseStats | None]:
    faults = _missing(case)
    if faults:
        return faults, None
    assert case.label is not None
    lab_img, label = _load_nifti(case.label, faults)
    images = [(p, *_load_nifti(p, faults)) for p in case.images]
    if faults:
        return faults, None
    if label.ndim != 3:
        faults.append(Fault(str(case.label), f"label map is {label.ndim}D {label.shape}, not 3D"))
        return faults, None
    per_file: dict[Path, int] = {}
    for path, img, data in images:
        if data.ndim not in (3, 4):
            faults.append(Fault(str(path), f"image is {data.ndim}D {data.shape}, not 3D or 4D"))
            continue
        per_file[path] = 1 if data.ndim == 3 else data.shape[-1]
        if data.shape[:3] != label.shape:
            faults.append(
                Fault(
                    str(path),
                    f"image shape {tuple(data.shape[:3])} does not match label "
                    f"{case.label.name} shape {tuple(label.shape)}",
                )
            )
        elif not np.allclose(img.affine, lab_img.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
            diff = float(np.abs(img.affine - lab_img.affine).max())
            faults.append(
                Fault(
                    str(path),
                    f"image affine differs from label {case.label.name} affine "
                    f"(max abs difference {diff:.4g})",
                )
            )
        if np.issubdtype(data.dtype, np.floating):
            n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            if n_bad:
                faults.append(Fault(str(path), f"image has {n_bad} NaN/Inf voxel(s)"))
        if not np.any(data):
            faults.append(Fault(str(path), "image is empty (all voxels zero)"))
    channels = sum(per_file.values())
    if not faults and channels != manifest.in_channels:
        # name the file with more than one channel where there is one (a 4D file among 3D)
        culprit = next((p for p, n in per_file.items() if n > 1), case.images[0])
        split = (f" ({', '.join(f'{p.name}: {n}' for p, n in per_file.items())})"
                 if len(per_file) > 1 else "")
        faults.append(
            Fault(
                str(culprit),
                f"image has {channels} channel(s){split}, the data set declares "
                f"{manifest.in_channels}",
            )
        )
    label_faults, by_class = _label_faults(case.label, label, manifest)
    faults.extend(label_faults)
    if faults:
        return faults, None
    spacing = tuple(float(z) for z in lab_img.header.get_zooms()[:3])
    return faults, CaseStats(case.subject_id, case.site, label.shape, spacing, channels, by_class)


def _check_photo_case(case: Case, manifest: Manifest) -> tuple[list[Fault], CaseStats | None]:
    from PIL import Image

    faults = _missing(case)
    if faults:
        return faults, None
    assert case.label is not None
    sizes = {}
    arrays = {}
    for path in (case.images[0], case.label):
        try:
            with Image.open(path) as im:
                im.load()
                sizes[path] = im.size
                arrays[path] = np.asarray(im) if path == case.label else None
        except Exception as e:
            faults.append(Fault(str(path), f"cannot decode image ({type(e).__name__}: {e})"))
    if faults:
        return faults, None
    img_size, lab_size = sizes[case.images[0]], sizes[case.label]
    if img_size != lab_size:
        faults.append(
            Fault(
                str(case.images[0]),
                f"image size {img_size} does not match label {case.label.name} size {lab_size}",
            )
        )
    label = arrays[case.label]
    if label.ndim != 2:
        faults.append(Fault(str(case.label), f"label map has shape {label.shape}, not 2D"))
        return faults, None
    label_faults, by_class = _label_faults(case.label, label, manifest)
    faults.extend(label_faults)
    if faults:
        return faults, None
    shape = (1, lab_size[1], lab_size[0])
    return faults, CaseStats(case.subject_id, case.site, shape, (), 3, by_class)
