"""BraTS brain tumour MRI, releases 2018-2021 (Menze et al. 2015, IEEE TMI 34:1993;
Bakas et al. 2017; Baid et al. 2021, arXiv:2107.02314).

Reads the training folders as published, one folder per subject, anywhere under the root::

    MICCAI_BraTS_2018_Data_Training/HGG/Brats18_CBICA_AAB_1/Brats18_CBICA_AAB_1_t1.nii.gz
    MICCAI_BraTS2020_TrainingData/BraTS20_Training_001/BraTS20_Training_001_flair.nii
    BraTS2021_Training_Data/BraTS2021_00000/BraTS2021_00000_seg.nii.gz

with ``_t1``, ``_t1ce``, ``_t2``, ``_flair`` and ``_seg`` files (``.nii`` or ``.nii.gz``).
Labels 0, 1 (necrotic / non-enhancing core), 2 (edema), 4 (enhancing tumour) become
0, 1, 2, 3; the challenge regions are WT = {1, 2, 3}, TC = {1, 3}, ET = {3}.

Sites: 2018/2019 subject names carry the contributing institution (``Brats18_TCIA01_131_1``
-> ``TCIA01``, ``Brats18_2013_2_1`` -> ``2013``); 2020 maps back to them via
``name_mapping.csv``. A FeTS partitioning CSV (``Partition_ID``, ``Subject_ID``) given as
``sites_csv`` overrides both. Otherwise (2021) every subject gets site ``"all"``.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Literal

from privseg.datasets.base import SubjectSet, register_dataset
from privseg.datasets.faults import Fault
from privseg.datasets.loading import load_manifest
from privseg.datasets.manifest import Case, Manifest, register_manifest, select_cases
from privseg.datasets.options import VolumeOptions
from privseg.datasets.preprocess import volume_preprocessor

Modality = Literal["t1", "t1ce", "t2", "flair"]
CLASS_NAMES = ["background", "necrotic/non-enhancing core", "edema", "enhancing tumour"]
LABEL_MAP = {0: 0, 1: 1, 2: 2, 4: 3}
EVAL_REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
_FILE = re.compile(r"^(.+)_(t1|t1ce|t2|flair|seg)\.nii(\.gz)?$", re.IGNORECASE)
_INSTITUTION = re.compile(r"^brats\d\d_([^_]+)_", re.IGNORECASE)


class BratsOptions(VolumeOptions):
    """BraTS options: the input modalities (channel order) and an optional site table."""

    modalities: tuple[Modality, ...] = ("t1", "t1ce", "t2", "flair")
    sites_csv: Path | None = None


def institution(subject_id: str) -> str | None:
    """The contributing institution encoded in a 2018/2019 subject name, else None."""
    m = _INSTITUTION.match(subject_id)
    if m is None or m.group(1).lower() in ("training", "validation"):
        return None
    return m.group(1)


def _read_csv(path: Path, faults: list[Fault]) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        faults.append(Fault(str(path), f"cannot read CSV ({e})"))
        return []


def _subject_dirs(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if any(_FILE.match(f) and not f.startswith(".") for f in filenames):
            found.append(Path(dirpath))
    return found


def _modality_file(folder: Path, kind: str) -> Path:
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{folder.name}_{kind}{ext}"
        if p.is_file():
            return p
    others = sorted(
        p for p in folder.iterdir()
        if not p.name.startswith(".") and (m := _FILE.match(p.name)) and m.group(2).lower() == kind
    )
    return others[0] if others else folder / f"{folder.name}_{kind}.nii.gz"


def _name_mapping(root: Path, faults: list[Fault]) -> tuple[dict[str, str], dict[str, str]]:
    """(subject -> institution, subject -> grade) from BraTS 2020's ``name_mapping.csv``."""
    sites: dict[str, str] = {}
    grades: dict[str, str] = {}
    for mapping in sorted(root.rglob("name_mapping.csv")):
        for row in _read_csv(mapping, faults):
            sid = (row.get("BraTS_2020_subject_ID") or "").strip()
            old = (row.get("BraTS_2019_subject_ID") or row.get("BraTS_2018_subject_ID") or "")
            if sid and (inst := institution(old.strip())):
                sites[sid] = inst
            if sid and row.get("Grade"):
                grades[sid] = row["Grade"].strip()
    return sites, grades


def _partitions(root: Path, table: Path, faults: list[Fault]) -> tuple[dict[str, str], Path]:
    """subject -> ``partition<ID>`` from a FeTS partitioning CSV (Partition_ID, Subject_ID)."""
    path = table if table.is_absolute() else root / table
    if not path.is_file():
        faults.append(Fault(str(path), "missing sites_csv"))
        return {}, path
    parts = {}
    for row in _read_csv(path, faults):
        sid, part = (row.get("Subject_ID") or "").strip(), (row.get("Partition_ID") or "").strip()
        if sid and part:
            parts[sid] = f"partition{part}"
    return parts, path


@register_manifest("brats")
def brats_manifest(options: BratsOptions, root: Path) -> Manifest:
    """Index a BraTS 2018-2021 training folder (no image is decoded)."""
    faults: list[Fault] = []
    sites, grades = _name_mapping(root, faults) if root.is_dir() else ({}, {})
    parts, table = (
        _partitions(root, options.sites_csv, faults) if options.sites_csv else ({}, None)
    )
    cases = []
    for folder in _subject_dirs(root) if root.is_dir() else []:
        sid = folder.name
        grade = grades.get(sid) or (folder.parent.name if folder.parent.name in ("HGG", "LGG")
                                    else None)
        site = parts.get(sid) or sites.get(sid) or institution(sid) or "all"
        if parts and sid not in parts:
            faults.append(Fault(str(table), f"no Partition_ID for subject {sid}"))
        cases.append(
            Case(
                subject_id=sid,
                site=site,
                images=tuple(_modality_file(folder, m) for m in options.modalities),
                label=_modality_file(folder, "seg"),
                meta={"grade": grade, "modalities": list(options.modalities)},
            )
        )
    cases = select_cases(cases, options.max_subjects)
    return Manifest(
        name="brats",
        root=root,
        cases=cases,
        class_names=list(CLASS_NAMES),
        label_values=tuple(LABEL_MAP),
        label_map=dict(LABEL_MAP),
        in_channels=len(options.modalities),
        description="BraTS glioma MRI (Menze et al. 2015; Baid et al. 2021)",
        eval_regions=dict(EVAL_REGIONS),
        faults=faults,
    )


@register_dataset(
    "brats",
    options=BratsOptions,
    description="BraTS 2018-2021 glioma MRI (t1, t1ce, t2, flair); WT/TC/ET",
    dims=(2, 3),
    needs_root=True,
)
def load_brats(options: BratsOptions, root: Path | None, cache_dir: Path) -> SubjectSet:
    """Load BraTS (Menze et al. 2015; Baid et al. 2021); see the module docstring."""
    assert root is not None
    manifest = brats_manifest(options, root)
    return load_manifest(
        manifest, options, cache_dir, lambda: volume_preprocessor(manifest, options)
    )
