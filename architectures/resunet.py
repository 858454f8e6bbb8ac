"""Residual U-Net with ScaleNorm (Klause et al. 2022, "Differentially private training of
residual networks with scale normalisation"), DP-compatible.

Each level is a residual unit ``conv → GN → Mish → conv → GN``, added to a (1×1-projected)
skip, followed by the extra normalisation Klause et al. call ScaleNorm (a GroupNorm right after
the residual addition, which keeps the residual stream's scale bounded under DP noise) and Mish.
The U-Net skeleton (pooling, upsample + conv, skip concatenation) is :class:`UNet`'s.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from privseg.architectures.blocks import ConvNormAct, conv
from privseg.architectures.norms import group_norm
from privseg.architectures.registry import register_model
from privseg.architectures.unet import UNet, unet_channels


class ScaleNormResUnit(nn.Module):
    """Residual unit with ScaleNorm: ``Mish(GN(body(x) + skip(x)))``."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, ws: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(spatial_dims, cin, cout, nn.Mish, ws),
            conv(spatial_dims, cout, cout, bias=False, ws=ws),
            group_norm(cout),
        )
        self.skip = conv(spatial_dims, cin, cout, kernel=1) if cin != cout else nn.Identity()
        self.scale_norm = group_norm(cout)
        self.act = nn.Mish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.scale_norm(self.body(x) + self.skip(x)))


def _unit(spatial_dims: int, cin: int, cout: int, *, ws: bool) -> nn.Module:
    return ScaleNormResUnit(spatial_dims, cin, cout, ws)


@register_model(
    "resunet-scalenorm",
    description="Residual U-Net, GroupNorm + ScaleNorm after each residual addition, Mish",
    paper="Klause et al. 2022, 'Differentially private training of residual networks with scale "
          "normalisation'",
)
def resunet_scalenorm(spatial_dims: int, in_channels: int, num_classes: int, *,
                      width: float = 1.0, depth: int = 4, base_channels: int = 16,
                      weight_standardization: bool = False) -> nn.Module:
    """Build the residual ScaleNorm U-Net (Klause et al. 2022), DP-compatible.

    Knobs as for ``unet`` (``width``, ``depth``, ``base_channels``, ``weight_standardization``).
    DP changes: GroupNorm everywhere (the paper's choice too), ScaleNorm after each residual
    addition, Mish activations, upsample + conv instead of transposed conv, no in-place ops.
    """
    return UNet(spatial_dims, in_channels, num_classes,
                unet_channels(base_channels, width, depth),
                ws=weight_standardization, block=partial(_unit, ws=weight_standardization))
