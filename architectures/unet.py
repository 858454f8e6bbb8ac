"""GroupNorm U-Net (Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical
Image Segmentation"; 3D as in Çiçek et al. 2016), made DP-compatible.

Changes for DP: BatchNorm → GroupNorm with an explicit group count (≥ 2 channels per group);
transposed convolutions → nearest upsampling + 3×3 conv (no Opacus hook grad sampler exists for
ConvTranspose); no in-place ops. Optional residual units (as in MONAI's UNet) and weight
standardisation (De et al. 2022).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from privseg.architectures.blocks import DoubleConv, conv, max_pool, upsample
from privseg.architectures.registry import register_model

#: ``block(spatial_dims, cin, cout) -> nn.Module``: one resolution level's conv unit.
BlockFactory = Callable[[int, int, int], nn.Module]


class UNet(nn.Module):
    """Encoder–decoder with skip connections; one level per entry of ``channels``.

    ``block`` builds each level's conv unit (default: :class:`DoubleConv`), so U-Net variants
    (residual, ScaleNorm) share this skeleton.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, channels: list[int],
                 residual: bool = False, *, ws: bool = False, block: BlockFactory | None = None):
        super().__init__()
        if block is None:
            block = partial(_double_conv, residual=residual, ws=ws)
        self.encoders = nn.ModuleList()
        cin = in_channels
        for c in channels:
            self.encoders.append(block(spatial_dims, cin, c))
            cin = c
        self.pool = max_pool(spatial_dims)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for c_skip in reversed(channels[:-1]):
            self.ups.append(nn.Sequential(upsample(), conv(spatial_dims, cin, c_skip, ws=ws)))
            self.decoders.append(block(spatial_dims, 2 * c_skip, c_skip))
            cin = c_skip
        self.head = conv(spatial_dims, cin, num_classes, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.encoders):
            if i > 0:
                x = self.pool(x)
            x = enc(x)
            skips.append(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips[:-1]), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def _double_conv(spatial_dims: int, cin: int, cout: int, *, residual: bool,
                 ws: bool) -> nn.Module:
    return DoubleConv(spatial_dims, cin, cout, residual, ws=ws)


def unet_channels(base: int, width: float, depth: int) -> list[int]:
    """Channels per level: ``base·width·2^level``, rounded to a multiple of 4 (for GroupNorm)."""
    return [max(4, int(round(base * width * 2**i / 4)) * 4) for i in range(depth)]


_UNET_PAPER = "Ronneberger et al. 2015 (MICCAI); Çiçek et al. 2016 (3D)"


@register_model(
    "unet",
    description="GroupNorm U-Net, encoder–decoder with skip connections",
    paper=_UNET_PAPER,
)
@register_model("unet-narrow", description="GroupNorm U-Net, 0.5× width", paper=_UNET_PAPER,
                width=0.5)
@register_model("unet-wide", description="GroupNorm U-Net, 2× width", paper=_UNET_PAPER,
                width=2.0)
@register_model("unet-xwide", description="GroupNorm U-Net, 4× width", paper=_UNET_PAPER,
                width=4.0)
@register_model("unet-shallow", description="GroupNorm U-Net, 3 levels", paper=_UNET_PAPER,
                depth=3)
@register_model("unet-deep", description="GroupNorm U-Net, 5 levels", paper=_UNET_PAPER,
                depth=5)
def unet(spatial_dims: int, in_channels: int, num_classes: int, *, width: float = 1.0,
         depth: int = 4, base_channels: int = 16, residual: bool = False,
         weight_standardization: bool = False) -> nn.Module:
    """Build the GroupNorm U-Net (Ronneberger et al. 2015), DP-compatible.

    ``width`` multiplies every level's channel count (``base_channels·width·2^level``);
    ``depth`` is the number of resolution levels (input sides must divide by ``2^(depth-1)``);
    ``residual`` adds a 1×1-projected skip to each level's two convs;
    ``weight_standardization`` standardises the 3×3 conv weights (De et al. 2022).
    DP changes: GroupNorm, upsample+conv instead of transposed conv, no in-place ops.
    """
    return UNet(spatial_dims, in_channels, num_classes,
                unet_channels(base_channels, width, depth), residual,
                ws=weight_standardization)
