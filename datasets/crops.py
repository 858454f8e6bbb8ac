"""From a loaded subject set to training items: one item per subject, k crops each.

Indexing items by subject makes Opacus' Poisson sampler (which samples dataset indices) sample
subjects, the privacy unit. 2D slices are 3D crops of depth 1, so one MONAI crop transform
(``RandCropByLabelClasses``) serves both modes.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import RandCropByLabelClasses, SpatialCrop, SpatialPad
from monai.transforms.utils import map_classes_to_indices
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from privseg.datasets.augment import ViewAugmentation
from privseg.datasets.base import Subject


def crop_size(dims: int, patch_size: list[int] | None, volume_shape: tuple[int, ...]) -> tuple:
    """Spatial crop size ``(D, H, W)``: 2D crops are one slice deep."""
    if dims == 2:
        hw = tuple(patch_size) if patch_size else tuple(volume_shape[-2:])
        return (1, *hw)
    return tuple(patch_size) if patch_size else tuple(volume_shape[-3:])


class SubjectCrops(Dataset):
    """Item ``i`` = ``k`` random crops of subject ``i``: (images [k,C,*S], labels [k,*S]).

    ``S`` is ``(H, W)`` in 2D and ``(D, H, W)`` in 3D. Crops are centred on foreground with
    probability ``foreground_fraction``, split evenly over the foreground classes the subject
    has (class-balanced sampling, as nnU-Net oversamples foreground), so small structures are
    seen as often as large ones. Randomness comes from torch's RNG, so a seeded run is
    reproducible (also in DataLoader workers, which torch seeds from the loader's generator).
    ``augment`` (:func:`privseg.datasets.augment.view_augmentation`) then augments each crop
    with its own random draw (the k views of augmentation multiplicity).
    """

    def __init__(self, subjects: list[Subject], dims: int, patch_size: list[int] | None,
                 crops_per_subject: int, foreground_fraction: float = 0.9,
                 num_classes: int | None = None, augment: ViewAugmentation | None = None):
        if not subjects:
            raise ValueError("no subjects to train on")
        self.subjects = subjects
        self.dims = dims
        self.k = crops_per_subject
        self.size = crop_size(dims, patch_size, subjects[0].label.shape)
        self.pad = SpatialPad(self.size)
        self.fg_fraction = foreground_fraction
        self.augment = augment
        self.num_classes = num_classes or int(max(s.label.max() for s in subjects)) + 1
        self._indices = [self._class_indices(s) for s in subjects]

    def _padded(self, s: Subject) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``[C, D, H, W]`` and label ``[1, D, H, W]``, padded up to the crop size.

        Volumes at least as large as the crop are used in place (no copy).
        """
        image, label = torch.as_tensor(s.image), torch.as_tensor(s.label[None])
        if any(n < c for n, c in zip(label.shape[1:], self.size, strict=True)):
            image = convert_to_tensor(self.pad(image), track_meta=False)
            label = convert_to_tensor(self.pad(label), track_meta=False)
        return image, label

    def _class_indices(self, s: Subject) -> tuple[list[np.ndarray], list[float]]:
        label = np.asarray(self._padded(s)[1])  # [1, D, H, W]
        indices = [np.asarray(i) for i in map_classes_to_indices(label, self.num_classes)]
        present = [c for c in range(1, self.num_classes) if len(indices[c])]
        ratios = [0.0] * self.num_classes
        ratios[0] = 1.0 - self.fg_fraction if present else 1.0
        for c in present:
            ratios[c] = self.fg_fraction / len(present)
        return indices, ratios

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self._padded(self.subjects[i])
        indices, ratios = self._indices[i]
        cropper = RandCropByLabelClasses(
            spatial_size=self.size, ratios=ratios, num_classes=self.num_classes,
            num_samples=self.k, indices=indices, warn=False,
        )
        cropper.set_random_state(int(torch.randint(0, 2**31 - 1, (1,))))
        # MONAI draws the class-balanced centres; the crops themselves are plain slices (no
        # MetaTensor, no copy of the volume), which keeps the loader off the GPU's critical path.
        cropper.randomize(label=label, indices=indices)
        xs, ys = [], []
        for center in cropper.centers:
            window = (slice(None), *SpatialCrop(roi_center=tuple(center),
                                                roi_size=self.size).slices)
            xs.append(image[window])
            ys.append(label[window])
        x, y = torch.stack(xs).float(), torch.stack(ys)[:, 0].long()
        if self.dims == 2:
            x, y = x[:, :, 0], y[:, 0]
        if self.augment is not None:
            x, y = self.augment(x, y)
        return x.contiguous(), y.contiguous()
