"""Per-sample convolution arithmetic shared by the grad samplers and book-keeping.

The pieces every per-sample conv computation needs: the layer's input as its kernel sees it
(string or non-zero padding applied), each sample's weight gradient by one grouped weight-grad
call (Rochette et al. 2019), the input patches under the kernel (for Gram matrices), and the
multiply-add count that decides between the ghost norm and instantiation (Bu et al. 2022). See
:mod:`privseg.dp.grad_samplers` (Opacus samplers built from them) and
:mod:`privseg.dp.bookkeeping`.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d


def padded_input(layer: ConvNd, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The input and the padding to give the kernel: string or non-zero padding is applied here.

    ``padding='same'`` may be asymmetric and ``padding_mode`` other than zeros pads with
    reflection etc.; the layer's forward pads its input with ``_reversed_padding_repeated_twice``
    then, and so does this (Opacus' sampler zero-pads, which is wrong for those layers).
    """
    if layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        return x, tuple(layer.padding)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, layer._reversed_padding_repeated_twice, mode=mode), (0,) * (x.dim() - 2)


def _grouped_weight_grad(layer: ConvNd, x: torch.Tensor, g: torch.Tensor,
                         padding: tuple[int, ...]) -> torch.Tensor:
    """``[B, C_out, c, *k]`` for the ``c`` input channels of (padded) ``x``: one grouped
    weight-grad call whose groups are the samples (``groups == 1`` layers if ``c`` is a block
    of ``C_in``)."""
    b, c = x.shape[:2]
    groups = b * layer.groups
    weight_shape = (b * layer.out_channels, c // layer.groups, *layer.weight.shape[2:])
    # Only the weight's shape (and dtype/device) matters for the weight gradient.
    weight = g.new_empty(1).expand(weight_shape)
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        g.reshape(1, b * layer.out_channels, *g.shape[2:]),
        x.reshape(1, b * c, *x.shape[2:]),
        weight, None, list(layer.stride), list(padding), list(layer.dilation), False,
        [0] * (x.dim() - 2), groups, [False, True, False])
    return grad_w.view(b, layer.out_channels, *weight_shape[1:])


#: in-channel blocks tried for the per-sample weight gradient on CPU (None: all at once)
CHANNEL_BLOCKS: tuple[int | None, ...] = (None, 64, 32)
#: (per-sample shapes, dtype, layer geometry) -> the block measured fastest
_measured_blocks: dict[tuple, int | None] = {}
#: (that key, batch size) -> whether the chosen block's result is bitwise the one call's
_bitwise_equal: dict[tuple, bool] = {}


def _blocked_weight_grad(layer: ConvNd, x: torch.Tensor, g: torch.Tensor,
                         padding: tuple[int, ...], block: int | None) -> torch.Tensor:
    if block is None:
        return _grouped_weight_grad(layer, x, g, padding)
    return torch.cat([_grouped_weight_grad(layer, x[:, c:c + block], g, padding)
                      for c in range(0, x.shape[1], block)], 2)


def channel_block(layer: ConvNd, x: torch.Tensor, g: torch.Tensor,
                  padding: tuple[int, ...]) -> int | None:
    """The in-channel block for this layer and these shapes, measured once per process.

    oneDNN's grouped weight-gradient kernel (the CPU backend) falls off a cliff for some
    shapes: with 128 input channels per group at small images it measured 3-5x slower than two
    calls on 64-channel halves (2D 12², B 32: 14.5 ms against 5.9 ms), while at larger images
    the one call wins, and which block wins is not monotone in the shapes. So on the first
    call for a layer's per-sample shapes every block in :data:`CHANNEL_BLOCKS` is timed and the
    fastest kept (whatever the batch size). A block is used only where its result is bitwise
    equal to the one call's (checked at each batch size seen), so the choice, which depends on
    timing, never changes a number.
    Only on CPU, ``groups == 1`` and more input channels than the smallest block; elsewhere
    one call (the CUDA kernels were not measured to need it).
    """
    c_in = x.shape[1]
    if x.device.type != "cpu" or layer.groups != 1 or c_in <= min(
            b for b in CHANNEL_BLOCKS if b):
        return None
    key = (tuple(x.shape[1:]), tuple(g.shape[1:]), x.dtype, tuple(layer.weight.shape[2:]),
           tuple(layer.stride), padding, tuple(layer.dilation))
    if key not in _measured_blocks:
        _measured_blocks[key] = _fastest_block(layer, x, g, padding)
        # the timing only ranks blocks it found bitwise equal at this batch size
        _bitwise_equal[(key, x.shape[0])] = True
    block = _measured_blocks[key]
    if block is None:
        return None
    # Poisson batches vary in size: the choice is timed once, its exactness checked per size
    checked = (key, x.shape[0])
    if checked not in _bitwise_equal:
        _bitwise_equal[checked] = torch.equal(
            _blocked_weight_grad(layer, x, g, padding, block),
            _grouped_weight_grad(layer, x, g, padding))
    return block if _bitwise_equal[checked] else None


def _fastest_block(layer: ConvNd, x: torch.Tensor, g: torch.Tensor,
                   padding: tuple[int, ...]) -> int | None:
    """Time every block whose result is bitwise the one call's (a warm-up call, then the best
    of two); the fastest."""
    reference = _grouped_weight_grad(layer, x, g, padding)
    best, best_s = None, math.inf
    for block in CHANNEL_BLOCKS:
        if block is not None and (block >= x.shape[1] or not torch.equal(
                _blocked_weight_grad(layer, x, g, padding, block), reference)):
            continue
        _blocked_weight_grad(layer, x, g, padding, block)
        seconds = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            _blocked_weight_grad(layer, x, g, padding, block)
            seconds = min(seconds, time.perf_counter() - t0)
        if seconds < best_s:
            best, best_s = block, seconds
    return best


def per_sample_conv_weight_grad(layer: ConvNd, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B, *weight.shape]``: each sample's weight gradient, by grouped weight-grad calls
    (one, or one per in-channel block where that measured faster: :func:`channel_block`), or
    one batched matrix product for a pointwise layer (:func:`is_pointwise`) or a layer with
    few input channels (:func:`use_patch_product`).

    ``x`` is the layer input ``[B, C_in, *S]``, ``g`` the output gradient ``[B, C_out, *T]``.
    """
    x, padding = padded_input(layer, x.to(g.dtype))
    with torch.no_grad():
        if is_pointwise(layer, padding):
            # A per-position linear map: each sample's gradient is g_i·x_iᵀ over positions,
            # one batched matrix product (measured on CPU: 0.9 ms against 1.7 ms for the
            # grouped call at a 3D 32³ B 4 U-Net head, 25 against 62 ms at 96³ B 2; never
            # slower in 2D).
            return torch.bmm(g.flatten(2), x.flatten(2).transpose(1, 2)).view(
                len(x), *layer.weight.shape)
        if use_patch_product(layer, x):
            a = patches_by_channel(layer, x, padding)  # [B, P, T]
            return torch.bmm(g.flatten(2), a.transpose(1, 2)).view(
                len(x), *layer.weight.shape)
        block = channel_block(layer, x, g, padding)
        return _blocked_weight_grad(layer, x, g, padding, block)


def is_pointwise(layer: ConvNd, padding: tuple[int, ...]) -> bool:
    """Whether the layer is a 1×1(×1) convolution with stride 1, no padding and one group:
    output position t sees input position t alone."""
    return (all(k == 1 for k in layer.kernel_size) and all(s == 1 for s in layer.stride)
            and not any(padding) and layer.groups == 1)


#: most values per patch, and most patch values in all, for the patch product on CPU
PATCH_PRODUCT_MAX_PATCH = 32
PATCH_PRODUCT_MAX_ELEMENTS = 1 << 23


def use_patch_product(layer: ConvNd, x: torch.Tensor) -> bool:
    """Whether a layer with few input channels (a U-Net's first) takes its per-sample weight
    gradients from the input patches: on CPU, ``groups == 1``, at most
    :data:`PATCH_PRODUCT_MAX_PATCH` values under the kernel and the patches at most
    :data:`PATCH_PRODUCT_MAX_ELEMENTS` values.

    oneDNN's grouped weight-gradient kernel is slow with one or two input channels per group
    (3D 32³, B 4, one channel: 5.5 ms against 1.5 ms for the whole batch's summed gradient),
    while gathering patches then costs little; where the patches are large (3D 96³, 2D 256²)
    the gather costs more than the kernel (measured: 3D 32³ B 4 3.2 against 5.5 ms, 2D 48²
    B 32 0.7 against 1.2 ms, 2D 96² B 16 1.2 against 1.9 ms; 3D 96³ B 2 105 against 62 ms).
    A rule on shapes, not a timing, so that the same run takes the same path every time.
    """
    if x.is_cuda or layer.groups != 1:
        return False
    patch = layer.weight[0].numel()
    return (patch <= PATCH_PRODUCT_MAX_PATCH
            and len(x) * patch * math.prod(x.shape[2:]) <= PATCH_PRODUCT_MAX_ELEMENTS)


def patches_by_channel(layer: ConvNd, x: torch.Tensor, padding: tuple[int, ...]
                       ) -> torch.Tensor:
    """``[B, C_in·k^d, T]``: the patch under the kernel at each output position of (padded)
    ``x``, its values in the weight's order (channel, kernel offset), so that each sample's
    weight gradient is ``g_i · a_iᵀ``."""
    x = F.pad(x, [p for p in reversed(padding) for _ in (0, 1)])
    nd = len(layer.kernel_size)
    for i, (k, s, d) in enumerate(zip(layer.kernel_size, layer.stride, layer.dilation,
                                      strict=True)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    b, c = x.shape[:2]
    # [B, C, *T, *k] -> [B, C, *k, *T]
    perm = [0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd)]
    return x.permute(perm).reshape(b, c * layer.weight[0, 0].numel(), -1)


def positions_of(g: torch.Tensor) -> int:
    """T, the number of output positions of output gradient ``g``."""
    return math.prod(g.shape[2:])


def use_ghost_norm(layer: ConvNd, positions: int) -> bool:
    """Whether the ghost norm costs fewer multiply-adds per sample than instantiation.

    Ghost: two T×T Gram matrices, ``T²·(C_in/groups·k^d + C_out)``; instantiation: the
    per-sample weight gradient, ``T·C_in/groups·k^d·C_out`` (+ its norm). Only for
    ``groups == 1`` (grouped layers instantiate).
    """
    if layer.groups != 1:
        return False
    p = layer.weight[0].numel()  # C_in · k^d
    return positions * (p + layer.out_channels) < p * layer.out_channels


def unfold_input(layer: ConvNd, x: torch.Tensor) -> torch.Tensor:
    """``[B, T, C_in·k^d]``: the input patch under the kernel at each output position.

    Each patch's ``C_in·k^d`` values are in the order (kernel offset, channel), not the
    weight's (channel, offset): its only users are Gram matrices ``a·aᵀ`` over positions
    (ghost norms, :mod:`privseg.dp.bookkeeping`), which do not depend on that order. The
    input is made channels-last first, so the one copy that gathers the patches moves runs
    of ``C_in`` contiguous values (measured 2-4x faster than ATen's im2col, ``F.unfold``, in
    2D and ~9x faster than the channels-first copy in 3D, at U-Net bottleneck shapes).
    """
    x, padding = padded_input(layer, x)
    x = F.pad(x, [p for p in reversed(padding) for _ in (0, 1)])
    x = x.movedim(1, -1).contiguous()  # [B, *S, C]
    nd = len(layer.kernel_size)
    for i, (k, s, d) in enumerate(zip(layer.kernel_size, layer.stride, layer.dilation,
                                      strict=True)):
        # dim 1+i becomes the positions along that axis; the kernel window is appended last
        x = x.unfold(1 + i, d * (k - 1) + 1, s)[..., ::d]
    b, positions = x.shape[0], x.shape[1:1 + nd]
    # [B, *T, C, *k] -> [B, *T, *k, C] -> [B, T, k^d·C]
    perm = [0, *range(1, 1 + nd), *range(2 + nd, 2 + 2 * nd), 1 + nd]
    return x.permute(perm).reshape(b, math.prod(positions), -1)
