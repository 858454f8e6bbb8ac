"""From a loaded subject set to training items: one item per subject, k crops each.

Indexing items by subject makes Opacus' Poisson sampler (which samples dataset indices) sample
subjects, the privacy unit. 2D slices are 3D crops of depth 1, so one MONAI crop transform
(``RandCropByPosNegLabel``) serves both modes.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import RandCropByPosNegLabel, SpatialPad
from monai.transforms.utils import map_binary_to_indices
from torch.utils.data import Dataset

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
    probability ``foreground_fraction``. Randomness comes from torch's RNG, so a seeded run is
    reproducible (also in DataLoader workers, which torch seeds from the loader's generator).
    """

    def __init__(self, subjects: list[Subject], dims: int, patch_size: list[int] | None,
                 crops_per_subject: int, foreground_fraction: float = 0.9):
        if not subjects:
            raise ValueError("no subjects to train on")
        self.subjects = subjects
        self.dims = dims
        self.k = crops_per_subject
        self.size = crop_size(dims, patch_size, subjects[0].label.shape)
        self.pad = SpatialPad(self.size)
        self.pos = foreground_fraction
        self._indices = [self._fg_bg(s) for s in subjects]

    def _fg_bg(self, s: Subject) -> tuple[np.ndarray, np.ndarray]:
        label = np.asarray(self.pad(s.label[None]))  # [1, D, H, W]: MONAI reduces over dim 0
        fg, bg = map_binary_to_indices(label > 0)
        return np.asarray(fg), np.asarray(bg)

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.subjects[i]
        image = self.pad(torch.as_tensor(s.image))
        label = self.pad(torch.as_tensor(s.label[None].astype(np.int64)))
        fg, bg = self._indices[i]
        pos = self.pos if len(fg) else 0.0
        cropper = RandCropByPosNegLabel(
            spatial_size=self.size, pos=pos, neg=1.0 - pos if len(bg) else 0.0,
            num_samples=self.k, fg_indices=fg, bg_indices=bg, allow_smaller=False,
        )
        cropper.set_random_state(int(torch.randint(0, 2**31 - 1, (1,))))
        both = torch.cat([image, label.to(image.dtype)], dim=0)
        crops = cropper(both, label=label)
        stack = torch.stack([torch.as_tensor(c) for c in crops])  # [k, C+1, D, H, W]
        x, y = stack[:, :-1].float(), stack[:, -1].long()
        if self.dims == 2:
            x, y = x[:, :, 0], y[:, 0]
        return x.contiguous(), y.contiguous()
