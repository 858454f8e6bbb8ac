"""Oxford-IIIT Pet, a non-medical 2D benchmark (Parkhi et al. 2012, CVPR).

Reads the layout torchvision's ``OxfordIIITPet`` downloads to (the publisher's
``images.tar.gz`` and ``annotations.tar.gz`` unpacked)::

    <root>/oxford-iiit-pet/images/Abyssinian_1.jpg
    <root>/oxford-iiit-pet/annotations/trimaps/Abyssinian_1.png   1 pet, 2 background, 3 border
    <root>/oxford-iiit-pet/annotations/trainval.txt, test.txt      "name class species breed"

``root`` may also be the ``oxford-iiit-pet`` folder itself. Each photograph is a subject (its
own privacy unit), natively 2D (``D == 1``), RGB (3 channels), resized to ``size``. The
trimap border becomes pet (default), background, or a class of its own. Sites: the species
(cat / dog), a natural two-way split, or one site ``"all"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from privseg.datasets.base import DatasetOptions, SubjectSet, register_dataset
from privseg.datasets.faults import Fault
from privseg.datasets.loading import load_manifest
from privseg.datasets.manifest import Case, Manifest, register_manifest, select_cases
from privseg.datasets.preprocess import label_lut, preprocess_photo

SPECIES = {"1": "cat", "2": "dog"}


class PetsOptions(DatasetOptions):
    """Oxford-IIIT Pet options."""

    size: tuple[int, int] = Field(default=(128, 128), description="(height, width) after resize")
    split: Literal["trainval", "test", "all"] = "trainval"
    border: Literal["pet", "background", "class"] = "pet"
    site_by: Literal["species", "none"] = "species"
    normalize: bool = True
    max_subjects: int | None = Field(default=None, ge=1)


def _labels(border: str) -> tuple[list[str], dict[int, int]]:
    if border == "class":
        return ["background", "pet", "border"], {1: 1, 2: 0, 3: 2}
    return ["background", "pet"], {1: 1, 2: 0, 3: 1 if border == "pet" else 0}


@register_manifest("pets")
def pets_manifest(options: PetsOptions, root: Path) -> Manifest:
    """Index Oxford-IIIT Pet through its split lists (no image is decoded)."""
    base = root / "oxford-iiit-pet" if (root / "oxford-iiit-pet").is_dir() else root
    faults: list[Fault] = []
    cases = []
    splits = ("trainval", "test") if options.split == "all" else (options.split,)
    for split in splits:
        listing = base / "annotations" / f"{split}.txt"
        if not listing.is_file():
            faults.append(Fault(str(listing), "missing split list"))
            continue
        try:
            text = listing.read_text()
        except (OSError, UnicodeDecodeError) as e:
            faults.append(Fault(str(listing), f"cannot read split list ({type(e).__name__}: "
                                              f"{e})"))
            continue
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 4:
                faults.append(Fault(str(listing), f"line {n} is not 'name class species breed'"))
                continue
            name, class_id, species, _ = parts
            kind = SPECIES.get(species, f"species{species}")
            cases.append(
                Case(
                    subject_id=name,
                    site=kind if options.site_by == "species" else "all",
                    images=(base / "images" / f"{name}.jpg",),
                    label=base / "annotations" / "trimaps" / f"{name}.png",
                    meta={
                        "species": kind,
                        "breed": name.rsplit("_", 1)[0],
                        "class_id": int(class_id) if class_id.isdigit() else class_id,
                        "split": split,
                    },
                )
            )
    cases = select_cases(cases, options.max_subjects)
    class_names, label_map = _labels(options.border)
    return Manifest(
        name="pets",
        root=base,
        cases=cases,
        class_names=class_names,
        label_values=(1, 2, 3),
        label_map=label_map,
        in_channels=3,
        reader="photo",
        description="Oxford-IIIT Pet foreground segmentation (Parkhi et al. 2012)",
        faults=faults,
    )


@register_dataset(
    "pets",
    options=PetsOptions,
    description="Oxford-IIIT Pet (torchvision layout), 2D RGB, pet vs background",
    dims=(2,),
    needs_root=True,
)
def load_pets(options: PetsOptions, root: Path | None, cache_dir: Path) -> SubjectSet:
    """Load Oxford-IIIT Pet (Parkhi et al. 2012); see the module docstring."""
    assert root is not None
    manifest = pets_manifest(options, root)

    def make():
        lut = label_lut(manifest)
        return lambda case: preprocess_photo(case, options.size, lut, options.normalize)

    return load_manifest(manifest, options, cache_dir, make)
