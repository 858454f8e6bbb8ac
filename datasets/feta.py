"""FeTA: fetal brain tissue annotation challenge data (Payette et al. 2021, Sci. Data 8:167).

Reads the FeTA 2.x BIDS release as published::

    <root>/participants.tsv                 participant_id, Pathology, Gestational age
    <root>/sub-001/anat/sub-001_rec-mial_T2w.nii.gz
    <root>/sub-001/anat/sub-001_rec-mial_dseg.nii.gz

Super-resolution reconstructions (0.5 mm isotropic, 256^3) with labels 1-7. The
reconstruction method identifies the institution: ``mial`` and ``irtk`` come from Zurich
(University Children's Hospital), ``nmic`` from Vienna (Medical University), the natural
federated split. Gestational age (weeks) and pathology go into each subject's meta.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Literal

from privseg.datasets.base import SubjectSet, register_dataset
from privseg.datasets.faults import Fault
from privseg.datasets.loading import load_manifest
from privseg.datasets.manifest import (
    Case,
    Manifest,
    identity_map,
    is_hidden,
    register_manifest,
    select_cases,
)
from privseg.datasets.options import VolumeOptions
from privseg.datasets.preprocess import volume_preprocessor

CLASS_NAMES = [
    "background",
    "external CSF",
    "grey matter",
    "white matter",
    "ventricles",
    "cerebellum",
    "deep grey matter",
    "brainstem",
]
INSTITUTION = {"mial": "Zurich", "irtk": "Zurich", "nmic": "Vienna"}
_T2W = re.compile(r"^(sub-[^_]+)_rec-([^_]+)_T2w\.nii(\.gz)?$")


class FetaOptions(VolumeOptions):
    """FeTA options: preprocessing, plus how subjects map to sites."""

    site_by: Literal["institution", "reconstruction"] = "institution"


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "", "n/a") else None
    except ValueError:
        return None


def read_participants(path: Path, faults: list[Fault]) -> dict[str, dict]:
    """``participants.tsv`` as participant_id -> {gestational_age, pathology}."""
    if not path.is_file():
        return {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        faults.append(Fault(str(path), f"cannot read participants table ({e})"))
        return {}
    if rows and "participant_id" not in rows[0]:
        faults.append(Fault(str(path), "participants table has no participant_id column"))
        return {}
    out = {}
    for row in rows:
        row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
        out[row["participant_id"]] = {
            "gestational_age": _float(row.get("gestational age")),
            "pathology": row.get("pathology") or None,
        }
    return out


@register_manifest("feta")
def feta_manifest(options: FetaOptions, root: Path) -> Manifest:
    """Index a FeTA BIDS folder (no image is decoded)."""
    faults: list[Fault] = []
    participants = read_participants(root / "participants.tsv", faults)
    cases = []
    subject_dirs = sorted(
        p for p in root.glob("sub-*") if p.is_dir() and not is_hidden(p)
    ) if root.is_dir() else []
    for sub in subject_dirs:
        anat = sub / "anat"
        t2ws = sorted(
            p for p in anat.glob(f"{sub.name}_rec-*_T2w.nii*") if _T2W.match(p.name)
        ) if anat.is_dir() else []
        if not t2ws:
            faults.append(Fault(str(anat), f"missing {sub.name}_rec-*_T2w.nii.gz"))
            continue
        if len(t2ws) > 1:
            names = ", ".join(p.name for p in t2ws)
            faults.append(Fault(str(anat), f"more than one reconstruction ({names})"))
            continue
        t2w = t2ws[0]
        rec = _T2W.match(t2w.name).group(2)
        dseg = t2w.with_name(t2w.name.replace("_T2w.nii", "_dseg.nii"))
        institution = INSTITUTION.get(rec, f"unknown ({rec})")
        info = participants.get(sub.name, {"gestational_age": None, "pathology": None})
        cases.append(
            Case(
                subject_id=sub.name,
                site=institution if options.site_by == "institution" else rec,
                images=(t2w,),
                label=dseg,
                meta={**info, "reconstruction": rec, "institution": institution},
            )
        )
    found = {s.name for s in subject_dirs}
    for pid in sorted(set(participants) - found):
        faults.append(
            Fault(str(root / "participants.tsv"), f"lists {pid} but folder {root / pid} is missing")
        )
    cases = select_cases(cases, options.max_subjects)
    return Manifest(
        name="feta",
        root=root,
        cases=cases,
        class_names=list(CLASS_NAMES),
        label_values=tuple(range(len(CLASS_NAMES))),
        label_map=identity_map(len(CLASS_NAMES)),
        in_channels=1,
        description="FeTA fetal brain MRI, 7 tissues (Payette et al. 2021)",
        faults=faults,
    )


@register_dataset(
    "feta",
    options=FetaOptions,
    description="FeTA 2.x fetal brain MRI (BIDS), 7 tissues; sites Zurich/Vienna",
    dims=(2, 3),
    needs_root=True,
)
def load_feta(options: FetaOptions, root: Path | None, cache_dir: Path) -> SubjectSet:
    """Load FeTA (Payette et al. 2021) from its BIDS release; see the module docstring."""
    assert root is not None
    manifest = feta_manifest(options, root)
    return load_manifest(
        manifest, options, cache_dir, lambda: volume_preprocessor(manifest, options)
    )
