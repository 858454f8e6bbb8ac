"""Medical Segmentation Decathlon tasks (Antonelli et al. 2022, Nat. Commun. 13:4128).

Reads any task folder as published (``Task01_BrainTumour`` ... ``Task10_Colon``)::

    <task>/dataset.json        name, modality {"0": ...}, labels {"0": "background", ...},
                               training [{"image": "./imagesTr/x.nii.gz",
                                          "label": "./labelsTr/x.nii.gz"}, ...]
    <task>/imagesTr/x.nii.gz   3D, or 4D with the modalities last (Task01: [H, W, D, 4])
    <task>/labelsTr/x.nii.gz

Only the files that ``dataset.json`` lists are read, so the macOS ``._x.nii.gz`` files the
tarballs carry are never touched. MSD has no site information: every subject gets site
``"all"`` (use a Dirichlet or size partition for federated runs).
"""

from __future__ import annotations

import json
from pathlib import Path

from privseg.datasets.base import SubjectSet, register_dataset
from privseg.datasets.faults import Fault
from privseg.datasets.loading import load_manifest
from privseg.datasets.manifest import (
    Case,
    Manifest,
    is_hidden,
    register_manifest,
    select_cases,
)
from privseg.datasets.options import VolumeOptions
from privseg.datasets.preprocess import volume_preprocessor

# Task01 (BrainTumour) labels: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour.
BRAIN_TUMOUR_REGIONS = {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}


class MsdOptions(VolumeOptions):
    """MSD options: which task (a subfolder of the root, or the root itself)."""

    task: str | None = None


def _strip_nii(name: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _int_keyed(d: dict, what: str) -> list[tuple[int, str]]:
    try:
        pairs = sorted((int(k), str(v)) for k, v in d.items())
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"{what} keys must be integers") from None
    if pairs and pairs[0][0] < 0:  # a negative label would index the lookup table from its end
        raise ValueError(f"{what} keys must be integers ≥ 0, got {pairs[0][0]}")
    return pairs


@register_manifest("msd")
def msd_manifest(options: MsdOptions, root: Path) -> Manifest:
    """Index an MSD task folder through its ``dataset.json`` (no image is decoded)."""
    task_dir = root / options.task if options.task else root
    index = task_dir / "dataset.json"
    faults: list[Fault] = []
    empty = Manifest("msd", task_dir, [], ["background"], (0,), {0: 0}, 1, faults=faults)
    if not index.is_file():
        faults.append(Fault(str(index), "missing dataset.json (the MSD task index)"))
        return empty
    try:
        spec = json.loads(index.read_text())
        modalities = _int_keyed(spec["modality"], "modality")
        labels = _int_keyed(spec["labels"], "labels")
        training = list(spec["training"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        faults.append(Fault(str(index), f"cannot read dataset.json ({type(e).__name__}: {e})"))
        return empty
    cases = []
    for n, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            faults.append(Fault(str(index), f"training entry {n} lacks image/label: {entry!r}"))
            continue
        if not (isinstance(entry["image"], str) and isinstance(entry["label"], str)):
            faults.append(Fault(str(index), f"training entry {n}: image and label must be "
                                            f"paths (strings), got {entry!r}"))
            continue
        image, label = task_dir / entry["image"], task_dir / entry["label"]
        if is_hidden(image) or is_hidden(label):
            continue
        cases.append(
            Case(
                subject_id=_strip_nii(image.name),
                site="all",
                images=(image,),
                label=label,
                meta={"task": task_dir.name},
            )
        )
    cases = select_cases(cases, options.max_subjects)
    values = tuple(v for v, _ in labels)
    names = [name for _, name in labels]
    task_name = str(spec.get("name", task_dir.name))
    regions = BRAIN_TUMOUR_REGIONS if "braintumour" in task_name.lower() and len(names) == 4 else {}
    return Manifest(
        name="msd",
        root=task_dir,
        cases=cases,
        class_names=names,
        label_values=values,
        label_map={v: i for i, v in enumerate(values)},
        in_channels=len(modalities),
        description=f"Medical Segmentation Decathlon {task_dir.name} "
        f"({', '.join(m for _, m in modalities)}) (Antonelli et al. 2022)",
        eval_regions=dict(regions),
        faults=faults,
    )


@register_dataset(
    "msd",
    options=MsdOptions,
    description="a Medical Segmentation Decathlon task folder, read via its dataset.json",
    dims=(2, 3),
    needs_root=True,
)
def load_msd(options: MsdOptions, root: Path | None, cache_dir: Path) -> SubjectSet:
    """Load an MSD task (Antonelli et al. 2022); see the module docstring."""
    assert root is not None
    manifest = msd_manifest(options, root)
    return load_manifest(
        manifest, options, cache_dir, lambda: volume_preprocessor(manifest, options)
    )
