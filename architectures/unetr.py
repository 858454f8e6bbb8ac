"""UNETR (Hatamizadeh et al. 2022, "UNETR: Transformers for 3D Medical Image Segmentation",
WACV), assembled from MONAI's blocks and made DP-compatible.

Follows ``monai.networks.nets.UNETR``: a ViT encoder on non-overlapping patches; hidden states
of intermediate transformer layers are reshaped to feature maps and upsampled (transposed
convs + residual conv blocks) into skip connections of a CNN decoder. Generalised (MONAI fixes
12 layers, taps 3/6/9 and patch 16): ``layers`` transformer layers, a power-of-two
``patch_size`` = 2^k giving k decoder stages and k-1 evenly spaced taps (layer ⌊i·L/k⌋,
i = 1..k-1; for L = 12, k = 4 these are z3, z6, z9 as in the paper).

Changes for DP: InstanceNorm in the CNN blocks → GroupNorm with an explicit group count
(LayerNorm in the ViT is per-sample already); LeakyReLU ``inplace`` flags cleared; MONAI's
``UnetResBlock`` does ``out += residual`` and is re-classed to an out-of-place forward. The
ViT layers are written here (same computation as MONAI's ``TransformerBlock``/``SABlock``,
which need einops and carry an unused cross-attention LayerNorm whose parameters never get a
gradient, which breaks Opacus' per-sample clipping); MONAI's patch embedding and MLP blocks are
used as they are. Transposed convs have no Opacus
hook grad sampler; Opacus computes their per-sample gradients with its functorch fallback
(exact, checked by the registry tests), and likewise for the patch-embedding block (it owns the
learnable position embedding).
"""

from __future__ import annotations

import math

import torch
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock
from monai.networks.blocks.mlp import MLPBlock
from monai.networks.blocks.patchembedding import PatchEmbeddingBlock
from monai.networks.blocks.unetr_block import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from privseg.architectures.conversion import make_dp_compatible
from privseg.architectures.registry import register_model


class DPUnetResBlock(UnetResBlock):
    """MONAI's ``UnetResBlock`` with the residual addition done out of place."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        residual = inp
        out = self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(inp)))))
        if hasattr(self, "conv3"):
            residual = self.conv3(residual)
        if hasattr(self, "norm3"):
            residual = self.norm3(residual)
        return self.lrelu(out + residual)


class SelfAttention(nn.Module):
    """Multi-head self-attention from two Linear layers (as MONAI's ``SABlock``, whose
    einops dependency this avoids; ``nn.MultiheadAttention`` has no Opacus grad sampler)."""

    def __init__(self, hidden_size: int, heads: int, qkv_bias: bool = False):
        super().__init__()
        if hidden_size % heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) * (h // self.heads) ** -0.5).softmax(dim=-1)
        return self.out_proj((att @ v).transpose(1, 2).reshape(b, n, h))


class TransformerBlock(nn.Module):
    """Pre-norm ViT layer: ``x + MSA(LN(x))``, then ``x + MLP(LN(x))`` (MONAI's MLPBlock)."""

    def __init__(self, hidden_size: int, mlp_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = SelfAttention(hidden_size, heads)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout_rate=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """ViT as in MONAI's ``ViT`` (conv patch embedding, learnable positions, pre-norm layers);
    returns the final (LayerNorm-ed) tokens and every layer's output."""

    def __init__(self, spatial_dims: int, in_channels: int, img_size: tuple[int, ...],
                 patch_size: int, hidden_size: int, layers: int, heads: int, mlp_dim: int):
        super().__init__()
        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=in_channels, img_size=img_size, patch_size=patch_size,
            hidden_size=hidden_size, num_heads=heads, proj_type="conv",
            pos_embed_type="learnable", dropout_rate=0.0, spatial_dims=spatial_dims)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embedding(x)
        hidden = []
        for blk in self.blocks:
            x = blk(x)
            hidden.append(x)
        return self.norm(x), hidden


class UNETR(nn.Module):
    """UNETR with a configurable number of transformer layers and patch size."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, *,
                 img_size: tuple[int, ...], patch_size: int, hidden_size: int, layers: int,
                 heads: int, mlp_dim: int, feature_size: int, norm: str = "instance"):
        super().__init__()
        k = int(round(math.log2(patch_size)))
        if patch_size < 2 or 2**k != patch_size:
            raise ValueError(f"UNETR patch_size must be a power of two >= 2, got {patch_size}")
        if any(s % patch_size for s in img_size):
            raise ValueError(f"UNETR img_size {img_size} must be divisible by patch {patch_size}")
        self.grid = tuple(s // patch_size for s in img_size)
        self.taps = [max(1, layers * i // k) - 1 for i in range(1, k)]
        self.vit = ViTEncoder(spatial_dims, in_channels, img_size, patch_size, hidden_size,
                              layers, heads, mlp_dim)
        common = {"spatial_dims": spatial_dims, "kernel_size": 3, "norm_name": norm,
                  "res_block": True}
        self.encoder1 = UnetrBasicBlock(in_channels=in_channels, out_channels=feature_size,
                                        stride=1, **common)
        # skip i (from tap i) is upsampled k - i times to 1/2^i of the input resolution
        self.skip_encoders = nn.ModuleList(
            UnetrPrUpBlock(in_channels=hidden_size, out_channels=feature_size * 2**i,
                           num_layer=k - i - 1, stride=1, upsample_kernel_size=2,
                           conv_block=True, **common)
            for i in range(1, k)
        )
        self.decoders = nn.ModuleList(
            UnetrUpBlock(in_channels=hidden_size if j == k else feature_size * 2**j,
                         out_channels=feature_size * 2 ** (j - 1), upsample_kernel_size=2,
                         **common)
            for j in range(k, 0, -1)
        )
        self.out = UnetOutBlock(spatial_dims=spatial_dims, in_channels=feature_size,
                                out_channels=num_classes)

    def _to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, hidden] tokens → [B, hidden, *grid] feature map."""
        b, _, h = tokens.shape
        x = tokens.reshape(b, *self.grid, h)
        return x.movedim(-1, 1).contiguous()

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x, hidden = self.vit(x_in)
        skips = [self.encoder1(x_in)]
        skips += [enc(self._to_map(hidden[t])) for enc, t in zip(self.skip_encoders, self.taps,
                                                                  strict=True)]
        x = self._to_map(x)
        for dec, skip in zip(self.decoders, reversed(skips), strict=True):
            x = dec(x, skip)
        return self.out(x)


@register_model(
    "unetr",
    description="UNETR: ViT encoder, hidden states as CNN-decoder skips (MONAI blocks)",
    paper="Hatamizadeh et al. 2022, 'UNETR: Transformers for 3D Medical Image Segmentation'",
)
def unetr(spatial_dims: int, in_channels: int, num_classes: int, *,
          img_size: int | tuple[int, ...] | list[int] | None = None, patch_size: int = 16,
          hidden_size: int = 256,
          layers: int = 8, heads: int = 8, mlp_ratio: float = 4.0,
          feature_size: int = 16) -> nn.Module:
    """Build UNETR (Hatamizadeh et al. 2022) from MONAI blocks, DP-compatible.

    ``img_size``: the training input's spatial size (one side, or one per axis), fixed because
    the learnable position embedding has one entry per patch; None = 256 in 2D, 96 in 3D;
    the engine passes the crop size. ``patch_size``:
    a power of two (16 as in the paper). ``hidden_size``, ``layers``, ``heads``,
    ``mlp_ratio``: the ViT (the paper's ViT-B is 768 / 12 / 12 / 4.0; the default here is a
    smaller ViT for DP training). ``feature_size``: channels of the first decoder level.
    DP changes: see the module docstring (GroupNorm, no in-place ops, no unused parameters).
    """
    if img_size is None:
        img_size = 256 if spatial_dims == 2 else 96
    size = (img_size,) * spatial_dims if isinstance(img_size, int) else tuple(img_size)
    if len(size) != spatial_dims:
        raise ValueError(f"UNETR img_size {img_size} needs {spatial_dims} sides")
    model = UNETR(spatial_dims, in_channels, num_classes, img_size=size,
                  patch_size=patch_size, hidden_size=hidden_size, layers=layers, heads=heads,
                  mlp_dim=int(round(hidden_size * mlp_ratio)), feature_size=feature_size)
    return make_dp_compatible(model, forward_fixes={UnetResBlock: DPUnetResBlock})
