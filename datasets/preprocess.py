"""Preprocessing of one subject's files into the arrays the engine trains on.

Volumes go through a MONAI pipeline (Cardoso et al. 2022): load with nibabel, channel first,
reorient to RAS, optional resampling to a target spacing, crop to the foreground, z-score per
channel over nonzero voxels, optional in-plane resize. Photographs (2D, RGB) are read with PIL
and resized to a fixed size. Labels are remapped to contiguous class indices.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from privseg.datasets.manifest import Case, Manifest

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def label_lut(manifest: Manifest) -> np.ndarray:
    """Lookup table raw label value -> contiguous class index (uint8)."""
    lut = np.zeros(max(manifest.label_values) + 1, dtype=np.uint8)
    for raw, idx in manifest.label_map.items():
        lut[raw] = idx
    return lut


def volume_pipeline(options, from_files: bool = True) -> Callable[[dict], dict]:
    """The MONAI transform chain for ``VolumeOptions`` (keys ``image`` and ``label``).

    ``from_files=False`` leaves out loading: the inputs are channel-first MetaTensors that
    already carry their affine (volumes decoded from DICOM).
    """
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        Resized,
        Spacingd,
    )

    keys = ["image", "label"]
    steps = [
        LoadImaged(keys, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys),
    ] if from_files else []
    steps.append(Orientationd(keys, axcodes="RAS", labels=RAS_LABELS))
    if options.spacing is not None:
        steps.append(Spacingd(keys, pixdim=options.spacing, mode=("bilinear", "nearest")))
    if options.crop_foreground:
        steps.append(
            CropForegroundd(
                keys, source_key="image", margin=options.crop_margin, allow_smaller=True
            )
        )
    if options.normalize:
        steps.append(NormalizeIntensityd("image", nonzero=True, channel_wise=True))
    if options.inplane_size is not None:
        h, w = options.inplane_size
        # arrays are [C, x, y, z] here; in-plane is (x, y) = (W, H) after the final transpose
        steps.append(Resized(keys, spatial_size=(w, h, -1), mode=("area", "nearest")))
    return Compose(steps)


def preprocess_volume(
    case: Case, manifest: Manifest, pipeline: Callable[[dict], dict], lut: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Run ``pipeline`` on one subject: image float32 ``[C, D, H, W]``, label uint8 ``[D, H, W]``.

    ``D`` is the axial (z, inferior-superior) axis, ``H`` anterior-posterior, ``W`` left-right.
    """
    images = [str(p) for p in case.images]
    out = pipeline({"image": images if len(images) > 1 else images[0], "label": str(case.label)})
    image, label, meta = engine_layout(out, lut)
    return image, label, {**meta, "files": [str(p) for p in case.files]}


def preprocess_arrays(
    image_xyz: np.ndarray, label_xyz: np.ndarray, affine: np.ndarray,
    pipeline: Callable[[dict], dict], lut: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``preprocess_volume`` for a decoded volume: arrays (x, y, z) and their RAS affine."""
    import torch
    from monai.data import MetaTensor

    aff = torch.as_tensor(affine, dtype=torch.float64)
    out = pipeline({
        "image": MetaTensor(torch.as_tensor(np.asarray(image_xyz, np.float32))[None], affine=aff),
        "label": MetaTensor(torch.as_tensor(np.asarray(label_xyz, np.float32))[None], affine=aff),
    })
    return engine_layout(out, lut)


def engine_layout(out: dict, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """A pipeline's RAS ``[C, x, y, z]`` output as the engine's ``[C, D, H, W]`` arrays."""
    image = np.asarray(out["image"].detach().cpu().numpy(), dtype=np.float32)
    label = np.rint(np.asarray(out["label"].detach().cpu().numpy())).astype(np.int64)[0]
    image = np.ascontiguousarray(image.transpose(0, 3, 2, 1))
    label = np.ascontiguousarray(lut[label].transpose(2, 1, 0))
    xyz = [float(v) for v in out["image"].pixdim[:3]]
    meta = {
        "spacing": [xyz[2], xyz[1], xyz[0]],
        "spacing_axes": "DHW (z, y, x), mm",
    }
    return image, label, meta


def preprocess_photo(
    case: Case, size: tuple[int, int], lut: np.ndarray, normalize: bool = True
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read an RGB photograph and its label map with PIL, resized to ``size`` (height, width).

    Returns image float32 ``[3, 1, H, W]`` (z-scored per channel) and label uint8 ``[1, H, W]``.
    """
    from PIL import Image

    h, w = size
    with Image.open(case.images[0]) as im:
        native = (im.size[1], im.size[0])
        rgb = im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    with Image.open(case.label) as lm:
        lab = np.asarray(lm.resize((w, h), Image.Resampling.NEAREST))
    image = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)[:, None]
    if normalize:
        from monai.transforms import NormalizeIntensity

        image = np.asarray(NormalizeIntensity(channel_wise=True)(image), dtype=np.float32)
    label = lut[lab.astype(np.int64)][None]
    meta = {"native_size": list(native), "files": [str(p) for p in case.files]}
    return np.ascontiguousarray(image), np.ascontiguousarray(label), meta


def volume_preprocessor(manifest: Manifest, options) -> Callable[[Case], tuple]:
    """``case -> (image, label, meta)`` for a volumetric manifest with ``VolumeOptions``."""
    pipeline, lut = volume_pipeline(options), label_lut(manifest)
    return lambda case: preprocess_volume(case, manifest, pipeline, lut)
