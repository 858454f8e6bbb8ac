"""Random augmentations of each training view (crop), for augmentation multiplicity.

De et al. 2022 (arXiv 2204.13650, §3.1) average the gradients of k augmented views of one
example before clipping it: the example still contributes one clipped gradient (so the
privacy analysis is unchanged), but with less variance than a single view's. Here each of a
subject's k crops (:class:`privseg.datasets.crops.SubjectCrops`) gets its own draw of:

- ``flip``: a left-right flip (the last spatial axis; RAS storage), probability 1/2: the
  FeTA labels have no left/right classes, so a flipped brain is a plausible brain;
- ``affine`` = a: rotation by up to ±a·π in-plane (2D) or about each axis (3D) and scaling by
  up to ±a (nearest-neighbour resampling of the label, bilinear of the image);
- ``intensity`` = s: intensity scaling by up to ±s, shift by up to ±s (the images are
  z-scored) and contrast (gamma) in [1 - s, 1 + s].

All are MONAI dictionary transforms; their random state is drawn from torch's RNG, so a
seeded run is reproducible like the crops themselves. They run without MONAI's metadata
tracking (``set_track_meta(False)``: the affine and spacing a MetaTensor carries are dropped
from the views anyway) and, given the views' size, with the affine's identity grid cached
(``cache_grid``): each halves the time of a view (2D 48², the tuned recipe's augmentations:
8.8 → 4.2 ms per subject of two views; the study phantom's runs spent 45 % of their training
time loading batches) and neither changes a value (bitwise, tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.utils import convert_to_tensor

#: augments views ``x [k, C, *S]``, ``y [k, *S]`` of one subject, each with its own draw
ViewAugmentation = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def view_augmentation(flip: bool = False, affine: float = 0.0, intensity: float = 0.0,
                      dims: int = 2, spatial_size: tuple[int, ...] | None = None
                      ) -> ViewAugmentation | None:
    """The per-view augmentation of these strengths (None when all are off).

    ``spatial_size``: the views' spatial shape, when every view has it (then the affine's
    sampling grid is built once, not per view); None: any shape."""
    if not (flip or affine or intensity):
        return None
    keys = ["image", "label"]
    steps = []
    if flip:
        steps.append(RandFlipd(keys, prob=0.5, spatial_axis=dims - 1))
    if affine:
        rotate = (affine * math.pi,) if dims == 2 else (affine * math.pi,) * 3
        steps.append(RandAffined(keys, prob=1.0, rotate_range=rotate,
                                 scale_range=(affine,) * dims, mode=("bilinear", "nearest"),
                                 padding_mode="zeros", spatial_size=spatial_size,
                                 cache_grid=spatial_size is not None))
    if intensity:
        steps += [RandScaleIntensityd("image", factors=intensity, prob=1.0),
                  RandShiftIntensityd("image", offsets=intensity, prob=1.0),
                  RandAdjustContrastd("image", gamma=(1.0 - intensity, 1.0 + intensity),
                                      prob=1.0)]
    transform = Compose(steps)

    def augment(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        transform.set_random_state(int(torch.randint(0, 2**31 - 1, (1,))))
        xs, ys = [], []
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            for image, label in zip(x, y, strict=True):
                out = transform({"image": image, "label": label[None]})
                xs.append(convert_to_tensor(out["image"], track_meta=False).float())
                ys.append(convert_to_tensor(out["label"], track_meta=False)[0].round().long())
        finally:
            set_track_meta(tracking)
        return torch.stack(xs).contiguous(), torch.stack(ys).contiguous()

    return augment
