"""Building blocks shared by the registry's convolutional models.

Every block here is DP-compatible by construction: GroupNorm instead of BatchNorm, no in-place
operations (Opacus' backward hooks fail on tensors modified in place), and only layers with an
exact Opacus per-sample-gradient path (Conv, GroupNorm, Linear; the weight-standardised convs
below go through Opacus' functorch fallback, see :class:`WSConv2d`).
"""

from __future__ import annotations

import torch
from torch import nn

from privseg.architectures.norms import group_norm


def standardize_weight(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Weight standardisation (Qiao et al. 2019): zero mean, unit variance per output filter."""
    dims = tuple(range(1, weight.dim()))
    mean = weight.mean(dim=dims, keepdim=True)
    var = weight.var(dim=dims, keepdim=True, unbiased=False)
    return (weight - mean) * torch.rsqrt(var + eps)


class WSConv2d(nn.Conv2d):
    """Conv2d whose forward uses the standardised weight (De et al. 2022 use WS for DP-SGD).

    Opacus looks grad samplers up by *exact* type, so this subclass gets no Conv hook sampler
    (which would differentiate w.r.t. the standardised, not the raw, weight) and falls back to
    functorch in every mode: per-sample gradients are exact w.r.t. the raw parameter.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardize_weight(self.weight), self.bias)


class WSConv3d(nn.Conv3d):
    """3D version of :class:`WSConv2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardize_weight(self.weight), self.bias)


def conv(spatial_dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1,
         bias: bool = True, ws: bool = False) -> nn.Module:
    """A 2D or 3D convolution with 'same' padding for odd kernels; ``ws``: weight-standardised.

    Weight standardisation is only applied when the filter has more than one input element
    (a 1×1 conv from one channel would be standardised to a constant).
    """
    if ws and cin * kernel**spatial_dims > 1:
        cls = WSConv2d if spatial_dims == 2 else WSConv3d
    else:
        cls = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return cls(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias)


class ConvNormAct(nn.Sequential):
    """conv → GroupNorm → activation (ReLU by default, never in place)."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, act: type[nn.Module] = nn.ReLU,
                 ws: bool = False):
        super().__init__(conv(spatial_dims, cin, cout, bias=False, ws=ws), group_norm(cout), act())


class DoubleConv(nn.Module):
    """Two ConvNormAct layers; with ``residual`` a 1×1 projection is added (``x = x + y``)."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, residual: bool = False,
                 act: type[nn.Module] = nn.ReLU, ws: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(spatial_dims, cin, cout, act, ws),
            ConvNormAct(spatial_dims, cout, cout, act, ws),
        )
        self.skip = (
            (conv(spatial_dims, cin, cout, kernel=1) if cin != cout else nn.Identity())
            if residual
            else None
        )

    def forward(self, x):
        y = self.body(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return y


def max_pool(spatial_dims: int) -> nn.Module:
    """2× max-pool downsampling."""
    return nn.MaxPool2d(2) if spatial_dims == 2 else nn.MaxPool3d(2)


def avg_pool(spatial_dims: int) -> nn.Module:
    """2× average-pool downsampling."""
    return nn.AvgPool2d(2) if spatial_dims == 2 else nn.AvgPool3d(2)


def upsample() -> nn.Module:
    """Parameter-free upsampling by 2 (nearest); a conv after it learns the interpolation.

    Chosen over transposed convolution, which has no Opacus hook grad sampler.
    """
    return nn.Upsample(scale_factor=2, mode="nearest")
