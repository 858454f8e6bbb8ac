"""SmoothNet-style segmentation network after Remerscheid et al. 2022, "SmoothNets: Optimizing
CNN architecture design for differentially private deep learning".

The paper's findings for DP-SGD, kept here: wide and shallow; DenseNet-style blocks *without*
bottleneck layers whose layer outputs are concatenated; every layer is a 3×3 conv without bias
→ 3×3 max-pool with stride 1 (a smoothing, non-downsampling pool) → GroupNorm (8 groups) →
SELU; transitions are a 1×1 conv halving the channels + 2×2 average pooling.
Changes for segmentation: the SmoothNet is the encoder of a U-Net (each dense block's output is
a skip connection; a decoder of upsample + conv, concatenation and conv → GroupNorm → SELU
layers restores full resolution); the growth rate doubles per level as in a U-Net; group counts
are explicit (≤ 8 groups, ≥ 2 channels per group); channel counts are multiples of 4.
"""

from __future__ import annotations

import torch
from torch import nn

from privseg.architectures.blocks import ConvNormAct, avg_pool, conv, upsample
from privseg.architectures.norms import group_norm
from privseg.architectures.registry import register_model


def _round4(c: float) -> int:
    return max(4, int(round(c / 4)) * 4)


class SmoothLayer(nn.Sequential):
    """conv 3×3 (no bias) → max-pool 3×3 stride 1 → GroupNorm(8) → SELU."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, ws: bool = False):
        pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        super().__init__(
            conv(spatial_dims, cin, cout, bias=False, ws=ws),
            pool(3, stride=1, padding=1),
            group_norm(cout, 8),
            nn.SELU(),
        )


class DenseBlock(nn.Module):
    """DenseNet block without bottleneck: each layer sees the concatenation of all before it."""

    def __init__(self, spatial_dims: int, cin: int, growth: int, layers: int, ws: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            SmoothLayer(spatial_dims, cin + i * growth, growth, ws) for i in range(layers)
        )
        self.out_channels = cin + layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class Transition(nn.Sequential):
    """1×1 conv to ``cout`` (about half the channels) → 2×2 average pooling."""

    def __init__(self, spatial_dims: int, cin: int, cout: int):
        super().__init__(conv(spatial_dims, cin, cout, kernel=1, bias=False),
                         avg_pool(spatial_dims))


class SmoothNetUNet(nn.Module):
    """SmoothNet encoder (dense blocks + transitions) with a U-Net decoder."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, *, stem: int,
                 growths: list[int], layers_per_block: int, ws: bool = False):
        super().__init__()
        self.stem = SmoothLayer(spatial_dims, in_channels, stem, ws)
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        skips, cin = [], stem
        for level, growth in enumerate(growths):
            if level > 0:
                cout = _round4(cin / 2)
                self.transitions.append(Transition(spatial_dims, cin, cout))
                cin = cout
            block = DenseBlock(spatial_dims, cin, growth, layers_per_block, ws)
            self.blocks.append(block)
            cin = block.out_channels
            skips.append(cin)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for c_skip in reversed(skips[:-1]):
            self.ups.append(nn.Sequential(upsample(), conv(spatial_dims, cin, c_skip, ws=ws)))
            self.decoders.append(nn.Sequential(
                ConvNormAct(spatial_dims, 2 * c_skip, c_skip, nn.SELU, ws),
                ConvNormAct(spatial_dims, c_skip, c_skip, nn.SELU, ws),
            ))
            cin = c_skip
        self.head = conv(spatial_dims, cin, num_classes, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = self.transitions[i - 1](x)
            x = block(x)
            skips.append(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips[:-1]), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


_PAPER = ("Remerscheid et al. 2022, 'SmoothNets: Optimizing CNN architecture design for "
          "differentially private deep learning'")


@register_model("smoothnet", description="SmoothNet encoder (dense, max-pool smoothing, "
                "GroupNorm, SELU) + U-Net decoder", paper=_PAPER)
@register_model("smoothnet-narrow", description="SmoothNet U-Net, 0.5× width", paper=_PAPER,
                width=0.5)
@register_model("smoothnet-wide", description="SmoothNet U-Net, 2× width", paper=_PAPER,
                width=2.0)
@register_model("smoothnet-xwide", description="SmoothNet U-Net, 4× width", paper=_PAPER,
                width=4.0)
def smoothnet(spatial_dims: int, in_channels: int, num_classes: int, *, width: float = 1.0,
              depth: int = 4, layers_per_block: int = 3, growth: int = 8,
              stem_channels: int = 16, weight_standardization: bool = False) -> nn.Module:
    """Build the SmoothNet U-Net (Remerscheid et al. 2022), DP-compatible.

    ``width`` multiplies the stem channels and the growth rate (``growth·width·2^level`` new
    channels per layer at each level); ``depth`` levels (input sides must divide by
    ``2^(depth-1)``); ``layers_per_block`` dense layers per level (the paper's networks are
    shallow); ``weight_standardization`` standardises the 3×3 conv weights (De et al. 2022).
    DP design (from the paper): GroupNorm, SELU, max-pool smoothing, no bottleneck; no in-place
    ops; upsample + conv instead of transposed conv in the decoder.
    """
    growths = [_round4(growth * width * 2**i) for i in range(depth)]
    return SmoothNetUNet(spatial_dims, in_channels, num_classes,
                         stem=_round4(stem_channels * width), growths=growths,
                         layers_per_block=layers_per_block, ws=weight_standardization)
