"""Upload a data set into a PACS as DICOM (MR series + SEG per subject) over STOW-RS.

So that the same data can be run from files and from a PACS (``pacs`` data set) and the two
compared. A file data set (FeTA, MSD, ...) is uploaded as its publisher's files are, in their
own geometry, with label values mapped to class indices (segment number = class index); a
generated one (the phantom) as its subjects, 1 mm isotropic, axes (D, H, W) = (z, y, x).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from privseg.datasets.base import DatasetOptions, get_dataset_entry, load_dataset
from privseg.datasets.manifest import get_manifest_builder


def _volumes(
    name: str, options: dict | DatasetOptions, root: str | Path | None, cache_dir: Path
) -> Iterator[tuple[str, str, np.ndarray, np.ndarray, np.ndarray, list[str]]]:
    """(subject_id, site, image xyz, class-index label xyz, RAS affine, class names) each."""
    entry = get_dataset_entry(name)
    opts = options if isinstance(options, DatasetOptions) else entry.options(**(options or {}))
    builder = get_manifest_builder(name)
    if builder is None:
        ss = load_dataset(name, opts, root, cache_dir)
        if ss.in_channels != 1:
            raise ValueError(f"dataset {name!r} has {ss.in_channels} channels; only single-"
                             "channel MR is uploaded")
        for s in ss.subjects:
            spacing = s.meta.get("spacing") or [1.0, 1.0, 1.0]  # D, H, W
            affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
            yield (s.subject_id, s.site, np.asarray(s.image[0]).transpose(2, 1, 0),
                   np.asarray(s.label).transpose(2, 1, 0), affine, ss.class_names)
        return
    import nibabel as nib

    from privseg.datasets.preprocess import label_lut
    from privseg.datasets.validate import check_manifest

    if root is None:
        raise ValueError(f"dataset {name!r} needs dataset.root (the downloaded folder)")
    manifest = builder(opts, Path(root))
    faults, _ = check_manifest(manifest)
    if faults:
        from privseg.datasets.faults import DataValidationError

        raise DataValidationError(faults, name)
    lut = label_lut(manifest)
    for case in manifest.cases:
        if len(case.images) != 1:
            raise ValueError(f"{case.subject_id}: {len(case.images)} image files; only single-"
                             "channel MR is uploaded")
        img = nib.as_closest_canonical(nib.load(str(case.images[0])))
        lab = nib.as_closest_canonical(nib.load(str(case.label)))
        label = lut[np.rint(np.asarray(lab.dataobj)).astype(np.int64)]
        yield (case.subject_id, case.site, np.asarray(img.dataobj, np.float32), label,
               img.affine, manifest.class_names)


def upload_dataset(
    name: str,
    options: dict | DatasetOptions,
    root: str | Path | None,
    url: str,
    cache_dir: Path,
) -> list[tuple[str, str]]:
    """Store every subject of data set ``name`` in the DICOMweb server at ``url``.

    Each subject becomes one study (Patient ID = subject id, Institution Name = site) with an
    MR series and a DICOM SEG. Returns (subject id, study UID) per subject.
    """
    from dicomweb_client.api import DICOMwebClient

    from privseg.datasets.dicom_io import volume_to_study

    client = DICOMwebClient(url)
    out = []
    for subject_id, site, image, label, affine, classes in _volumes(name, options, root,
                                                                    cache_dir):
        segments = {n: classes[n] for n in range(1, len(classes))}
        study = volume_to_study(image, label, affine, subject_id, site, segments)
        client.store_instances(study.mr + [study.seg])
        out.append((subject_id, str(study.mr[0].StudyInstanceUID)))
    return out
