"""Preprocessing options shared by the volumetric loaders (FeTA, MSD, BraTS)."""

from __future__ import annotations

from pydantic import Field, field_validator

from privseg.datasets.base import DatasetOptions


class VolumeOptions(DatasetOptions):
    """How volumes are brought to a common form before training.

    Volumes are reoriented to RAS, optionally resampled to ``spacing`` (mm, along x, y, z),
    cropped to the image's nonzero bounding box (plus ``crop_margin`` voxels), z-scored per
    channel over nonzero voxels, and optionally resized in-plane to ``inplane_size``
    (height, width). The result is stored ``[C, D, H, W]`` with ``D`` the axial (z) axis,
    ``H`` the anterior-posterior (y) and ``W`` the left-right (x) axis.
    """

    spacing: tuple[float, float, float] | None = Field(
        default=None, description="target voxel spacing in mm (x, y, z); None keeps the native"
    )
    inplane_size: tuple[int, int] | None = Field(
        default=None, description="resize each axial slice to (height, width); None keeps"
    )
    crop_foreground: bool = True
    crop_margin: int = Field(default=0, ge=0)
    normalize: bool = Field(default=True, description="z-score each channel over nonzero voxels")
    max_subjects: int | None = Field(
        default=None, ge=1, description="keep the first N subjects by id (quick runs)"
    )

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, v: tuple[float, float, float] | None):
        if v is not None and min(v) <= 0:
            raise ValueError("spacing must be positive")
        return v

    @field_validator("inplane_size")
    @classmethod
    def _positive_size(cls, v: tuple[int, int] | None):
        if v is not None and min(v) < 1:
            raise ValueError("inplane_size must be positive")
        return v
