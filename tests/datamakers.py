"""Tiny data sets in each publisher's exact on-disk layout, for tests and short runs.

Every maker writes synthetic volumes (concentric "tissue" shells in a nonzero head on a zero
background, so foreground cropping and nonzero normalisation have something to do) and
returns the path to pass as ``dataset.root``. Fault helpers damage a made layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 48


def affine(spacing: float | tuple[float, float, float] = 1.0) -> np.ndarray:
    """A RAS affine with the given voxel size (mm)."""
    sp = (spacing,) * 3 if np.isscalar(spacing) else tuple(spacing)
    a = np.diag([*sp, 1.0])
    a[:3, 3] = [-10.0, -12.0, -5.0]
    return a


def write_nifti(path: Path, data: np.ndarray, aff: np.ndarray | None = None) -> Path:
    """Save ``data`` as NIfTI (``.nii`` or ``.nii.gz`` by the name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine() if aff is None else aff), str(path))
    return path


def phantom_volume(
    shape: tuple[int, int, int], n_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8 in 0..n_classes-1) with label k a shell of a blob."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    centre = rng.uniform(-0.1, 0.1, 3)
    radii = rng.uniform(0.6, 0.8, 3)
    r = np.sqrt(sum(((g - c) / rr) ** 2 for g, c, rr in zip(grid, centre, radii, strict=True)))
    head = r < 1.0
    label = np.zeros(shape, np.uint8)
    if n_classes > 1:
        band = np.clip((r * (n_classes - 1)).astype(int), 0, n_classes - 2)
        label[head] = (n_classes - 1 - band[head]).astype(np.uint8)
    image = np.where(head, 100.0 + 40.0 * label + rng.normal(0, 5, shape), 0.0)
    return image.astype(np.float32), label


def truncate_file(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to a fraction of its bytes (a corrupt download)."""
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


# ----------------------------------------------------------------------------- FeTA


def make_feta(
    root: Path,
    n_subjects: int = 4,
    shape: tuple[int, int, int] = (16, 16, 12),
    recs: tuple[str, ...] = ("mial", "irtk", "nmic"),
    spacing: float = 0.5,
    seed: int = 0,
) -> Path:
    """FeTA 2.x BIDS: ``sub-XXX/anat/sub-XXX_rec-R_{T2w,dseg}.nii.gz`` + participants.tsv.

    Reconstructions cycle through ``recs`` (mial, irtk: Zurich; nmic: Vienna).
    """
    root.mkdir(parents=True, exist_ok=True)
    rows = ["participant_id\tPathology\tGestational age"]
    for i in range(n_subjects):
        sub = f"sub-{i + 1:03d}"
        rec = recs[i % len(recs)]
        image, label = phantom_volume(shape, 8, seed + i)
        anat = root / sub / "anat"
        write_nifti(anat / f"{sub}_rec-{rec}_T2w.nii.gz", image, affine(spacing))
        write_nifti(anat / f"{sub}_rec-{rec}_dseg.nii.gz", label, affine(spacing))
        pathology = "Pathological" if i % 2 else "Neurotypical"
        rows.append(f"{sub}\t{pathology}\t{20.0 + 1.5 * i:.1f}")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def feta_files(root: Path, i: int) -> tuple[Path, Path]:
    """(T2w, dseg) of subject number ``i`` (0-based) in a made FeTA folder."""
    anat = root / f"sub-{i + 1:03d}" / "anat"
    return next(anat.glob("*_T2w.nii.gz")), next(anat.glob("*_dseg.nii.gz"))


# ----------------------------------------------------------------------------- MSD

_TASKS = {
    "BrainTumour": (
        {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
    ),
    "Hippocampus": ({"0": "MRI"}, {"0": "background", "1": "Anterior", "2": "Posterior"}),
}


def make_msd(
    root: Path,
    task: str = "Task04_Hippocampus",
    n_subjects: int = 4,
    shape: tuple[int, int, int] = (16, 16, 12),
    n_test: int = 1,
    apple_double: bool = True,
    seed: int = 0,
) -> Path:
    """A Decathlon task folder (dataset.json, imagesTr, labelsTr, imagesTs); returns it.

    ``Task01_BrainTumour`` gets 4D images (4 modalities last) and 4 labels; any other task
    name gets Task04_Hippocampus's single modality and 3 labels. With ``apple_double`` the
    macOS ``._*`` files the real tarballs carry are written beside every image.
    """
    key = "BrainTumour" if "BrainTumour" in task else "Hippocampus"
    modality, labels = _TASKS[key]
    prefix = task.split("_", 1)[-1].lower()
    task_dir = root / task
    training, test = [], []
    for i in range(n_subjects + n_test):
        name = f"{prefix}_{i + 1:03d}.nii.gz"
        image, label = phantom_volume(shape, len(labels), seed + i)
        if len(modality) > 1:
            image = np.stack([image * (1 + 0.1 * c) for c in range(len(modality))], axis=-1)
        if i < n_subjects:
            write_nifti(task_dir / "imagesTr" / name, image)
            write_nifti(task_dir / "labelsTr" / name, label)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            folders = ("imagesTr", "labelsTr")
        else:
            write_nifti(task_dir / "imagesTs" / name, image)
            test.append(f"./imagesTs/{name}")
            folders = ("imagesTs",)
        if apple_double:
            for folder in folders:
                (task_dir / folder / f"._{name}").write_bytes(APPLE_DOUBLE)
    spec = {
        "name": key,
        "description": "tiny synthetic stand-in",
        "reference": "synthetic",
        "licence": "CC-BY-SA 4.0",
        "relase": "1.0 04/05/2018",
        "tensorImageSize": "4D" if len(modality) > 1 else "3D",
        "modality": modality,
        "labels": labels,
        "numTraining": n_subjects,
        "numTest": n_test,
        "training": training,
        "test": test,
    }
    (task_dir / "dataset.json").write_text(json.dumps(spec, indent=4))
    if apple_double:
        (root / f"._{task}").write_bytes(APPLE_DOUBLE)
    return task_dir


# ----------------------------------------------------------------------------- BraTS

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
_BRATS_INSTITUTIONS = ("CBICA", "TCIA01", "2013")


def brats_subject_ids(year: int, n_subjects: int) -> list[str]:
    """Subject names in the style of each release."""
    if year in (2018, 2019):
        stem = "Brats18" if year == 2018 else "BraTS19"
        return [
            f"{stem}_{_BRATS_INSTITUTIONS[i % 3]}_{100 + i}_1" for i in range(n_subjects)
        ]
    if year == 2020:
        return [f"BraTS20_Training_{i + 1:03d}" for i in range(n_subjects)]
    return [f"BraTS2021_{i:05d}" for i in range(n_subjects)]


def make_brats(
    root: Path,
    year: int = 2021,
    n_subjects: int = 4,
    shape: tuple[int, int, int] = (16, 16, 12),
    ext: str = ".nii.gz",
    seed: int = 0,
) -> Path:
    """A BraTS training folder as released in ``year`` (2018-2021); returns ``root``.

    2018/2019: ``MICCAI_BraTS_<year>_Data_Training/{HGG,LGG}/<id>/<id>_<mod>.nii.gz``;
    2020: ``MICCAI_BraTS2020_TrainingData/<id>/...`` plus ``name_mapping.csv``;
    2021: ``BraTS2021_Training_Data/<id>/...``. Labels are 0, 1, 2, 4.
    """
    ids = brats_subject_ids(year, n_subjects)
    if year in (2018, 2019):
        top = root / f"MICCAI_BraTS_{year}_Data_Training"
    elif year == 2020:
        top = root / "MICCAI_BraTS2020_TrainingData"
    else:
        top = root / "BraTS2021_Training_Data"
    for i, sid in enumerate(ids):
        folder = top / ("HGG" if i % 2 == 0 else "LGG") / sid if year < 2020 else top / sid
        image, label = phantom_volume(shape, 4, seed + i)
        label = np.where(label == 3, 4, label).astype(np.uint8)
        for c, mod in enumerate(BRATS_MODALITIES):
            write_nifti(folder / f"{sid}_{mod}{ext}", image * (1 + 0.2 * c))
        write_nifti(folder / f"{sid}_seg{ext}", label)
    if year == 2020:
        old = brats_subject_ids(2019, n_subjects)
        rows = ["Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,"
                "BraTS_2019_subject_ID,BraTS_2020_subject_ID"]
        rows += [f"HGG,NA,NA,NA,{o},{n}" for o, n in zip(old, ids, strict=True)]
        (top / "name_mapping.csv").write_text("\n".join(rows) + "\n")
    return root


def brats_files(root: Path, subject_id: str) -> dict[str, Path]:
    """Modality (and ``seg``) -> file of one subject in a made BraTS folder."""
    folder = next(p for p in root.rglob(subject_id) if p.is_dir())
    return {p.name[len(subject_id) + 1 :].split(".")[0]: p for p in folder.iterdir()}


# ----------------------------------------------------------------------------- Oxford-IIIT Pet

PET_NAMES = ("Abyssinian", "beagle", "Bengal", "pug")


def make_pets(
    root: Path,
    n_images: int = 6,
    size: tuple[int, int] = (20, 24),
    n_test: int = 2,
    apple_double: bool = True,
    seed: int = 0,
) -> Path:
    """Oxford-IIIT Pet as torchvision lays it out under ``root/oxford-iiit-pet``; returns root.

    Breeds alternate cat (capitalised) / dog; trimaps 1 pet, 2 background, 3 border. The
    third image is greyscale (as a few real ones are). The first ``n_images - n_test`` go to
    trainval.txt, the rest to test.txt.
    """
    from PIL import Image

    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    lines = []
    for i in range(n_images):
        breed = PET_NAMES[i % len(PET_NAMES)]
        name = f"{breed}_{i + 1}"
        species = 1 if breed[0].isupper() else 2
        yy, xx = np.mgrid[:h, :w]
        r = np.hypot((yy - h / 2) / (h / 3), (xx - w / 2) / (w / 3))
        trimap = np.where(r < 0.9, 1, np.where(r < 1.1, 3, 2)).astype(np.uint8)
        rgb = rng.integers(0, 80, (h, w, 3)) + (trimap == 1)[..., None] * np.array([150, 90, 40])
        img = Image.fromarray(rgb.astype(np.uint8), "RGB")
        if i == 2:
            img = img.convert("L")
        img.save(base / "images" / f"{name}.jpg", quality=95)
        Image.fromarray(trimap, "L").save(base / "annotations" / "trimaps" / f"{name}.png")
        if apple_double:
            (base / "annotations" / "trimaps" / f"._{name}.png").write_bytes(APPLE_DOUBLE)
        lines.append(f"{name} {i % len(PET_NAMES) + 1} {species} {i // len(PET_NAMES) + 1}")
    n_train = n_images - n_test
    (base / "annotations" / "trainval.txt").write_text("\n".join(lines[:n_train]) + "\n")
    (base / "annotations" / "test.txt").write_text("\n".join(lines[n_train:]) + "\n")
    return root
