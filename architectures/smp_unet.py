"""segmentation-models-pytorch U-Net with a ResNet encoder (Ronneberger et al. 2015 decoder on
He et al. 2016 ResNet encoder; ``smp.Unet``), converted for DP. 2D only (smp is 2D).

Changes for DP: every BatchNorm (encoder and decoder) → GroupNorm with an explicit group count
(≥ 2 channels per group; not Opacus' gcd(32, C)); every ``inplace`` flag cleared; torchvision's
``BasicBlock``/``Bottleneck`` (``out += identity``) re-classed to out-of-place forwards. The
encoder is never downloaded (``encoder_weights=None``); pretrained weights can come from a local
state dict. Unlike the registry's other models (whose skip concatenations hit a PyTorch
ExpandedWeights bug on non-contiguous gradients), this one also passes Opacus' ``ew`` mode.
BatchNorm affine weights in such a file initialise the GroupNorm affine weights;
running statistics and the classifier (``fc.*``) are ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from privseg.architectures.conversion import make_dp_compatible
from privseg.architectures.registry import register_model

ENCODERS = ("resnet18", "resnet34")
_IGNORED_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


class DPBasicBlock(BasicBlock):
    """torchvision ``BasicBlock`` with an out-of-place residual addition."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + identity)


class DPBottleneck(Bottleneck):
    """torchvision ``Bottleneck`` with an out-of-place residual addition."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + identity)


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a local ResNet state dict (torchvision / smp key names) into a converted encoder.

    Keys may carry an ``encoder.`` prefix. BatchNorm running statistics and ``fc.*`` are
    skipped; a 3-channel first conv is summed over RGB when the encoder has one input channel
    (as smp does for pretrained weights), and otherwise shapes must match. Every encoder
    parameter must be present in the file.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = encoder.state_dict()
    new = {}
    for key, value in state.items():
        key = key.removeprefix("encoder.")
        if key.startswith("fc.") or key.endswith(_IGNORED_SUFFIXES):
            continue
        if key not in own:
            raise ValueError(f"{path}: key {key!r} is not a parameter of the encoder")
        target = own[key]
        if key == "conv1.weight" and value.shape[1] != target.shape[1] and target.shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)
        if value.shape != target.shape:
            raise ValueError(f"{path}: {key!r} has shape {tuple(value.shape)}, "
                             f"encoder expects {tuple(target.shape)}")
        new[key] = value.to(target.dtype)
    missing = sorted(set(own) - set(new))
    if missing:
        raise ValueError(f"{path}: missing encoder weights {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    encoder.load_state_dict(new)


@register_model(
    "smp-unet",
    spatial_dims=(2,),
    dp_modes=("hooks", "functorch", "ghost", "ew"),
    description="segmentation-models-pytorch U-Net, ResNet encoder, BN→GroupNorm (2D only)",
    paper="Ronneberger et al. 2015 (U-Net) with He et al. 2016 (ResNet) encoder; smp.Unet",
)
def smp_unet(spatial_dims: int, in_channels: int, num_classes: int, *,
             encoder_name: str = "resnet18", encoder_weights_path: str | None = None,
             decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)) -> nn.Module:
    """Build ``smp.Unet`` with a ResNet encoder, converted for DP (2D only).

    ``encoder_name``: resnet18 or resnet34. ``encoder_weights_path``: optional local state dict
    for the encoder (nothing is ever downloaded; see :func:`load_encoder_weights`).
    ``decoder_channels``: five decoder widths (input sides must divide by 32).
    DP changes: BatchNorm → GroupNorm (explicit group counts), no in-place ops.
    """
    if spatial_dims != 2:
        raise ValueError("smp-unet is 2D only")
    if encoder_name not in ENCODERS:
        raise ValueError(f"smp-unet encoder_name must be one of {ENCODERS}, not {encoder_name!r}")
    # smp pulls in timm, and timm pulls in wandb: import on use, not with the registry.
    import segmentation_models_pytorch as smp

    model = smp.Unet(encoder_name=encoder_name, encoder_weights=None, in_channels=in_channels,
                     classes=num_classes, decoder_channels=tuple(decoder_channels))
    make_dp_compatible(model, forward_fixes={BasicBlock: DPBasicBlock, Bottleneck: DPBottleneck})
    if encoder_weights_path is not None:
        load_encoder_weights(model.encoder, encoder_weights_path)
    return model
