"""Book-keeping per-sample conv gradients: norms from Gram matrices, the clipped sum in one pass.

DP-SGD needs, per sample i, the norm of its whole gradient and then ``Σ_i f_i·∇W_i`` with clip
factor ``f_i = min(1, C/(‖g_i‖ + 1e-6))``. Instantiating every ``∇W_i`` (``[B, *W.shape]``)
costs B times the layer's weights in memory; at a U-Net's bottleneck, where weights are large
and the output has few positions T, that is most of the per-sample memory, and the grouped
weight-gradient kernel (:func:`privseg.dp.grad_samplers.per_sample_conv_weight_grad`) is slow
there (few positions per group). Book-keeping (Bu et al. 2023, "Differentially private
optimization on large model at small cost", arXiv 2210.00038) instead keeps the layer's input
``x`` and output gradient ``g`` from the backward pass and

* takes each sample's weight-gradient norm by the ghost norm (Goodfellow 2015; Li et al. 2022):
  ``‖∇W_i‖² = Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` over the unfolded input patches ``a`` and output
  gradients at the T output positions
  (:func:`privseg.dp.grad_samplers.ghost_conv_weight_norm`'s Gram matrices);
* once all layers' norms are known (the optimizer's clipping pass), forms the clipped sum as
  ONE ordinary weight-gradient computation with each sample's output gradient scaled by its
  clip factor: ``Σ_i f_i·∇W_i = ∇W(x, f ⊙ g)`` (the conv's weight gradient is linear in g and
  sums over the batch), by the backend's dense weight-gradient kernel.

No ``[B, *W.shape]`` tensor exists at any time. :func:`defer_weight` chooses the layers (Bu et
al.'s hybrid: book-keeping where the ghost norm is cheaper than instantiation, which also means
the kept ``x`` and ``g`` are smaller than the per-sample gradients); the others keep instantiated
per-sample gradients. A :class:`DeferredConvGrad` stands in ``p.grad_sample`` for the weight of
a deferred layer; :class:`privseg.dp.optimizer.FlatDPOptimizer` reads its norms and weighted
sum, :func:`privseg.dp.private.group_crop_grad_samples` groups its crops (a subject's gradient,
the mean over its k crops, is one contribution: its Gram matrices run over the k·T positions
of all its crops). Norms and sums are computed in the parameter's dtype (fp32 under bf16
autocast), so the clipping bound holds as with instantiated per-sample gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from privseg.dp.conv_math import (
    ConvNd,
    padded_input,
    per_sample_conv_weight_grad,
    unfold_input,
    use_ghost_norm,
)


def defer_weight(layer: ConvNd, positions: int) -> bool:
    """Whether a conv layer's per-sample weight gradients are book-kept rather than
    instantiated: where the ghost norm costs fewer multiply-adds than instantiation
    (:func:`privseg.dp.conv_math.use_ghost_norm`; then also ``T < C_in·k^d``, so the kept
    input and output gradient are smaller than the per-sample gradients)."""
    return use_ghost_norm(layer, positions)


@contextmanager
def _full_fp32(cuda: bool) -> Iterator[None]:
    """On CUDA, no TF32 inside the block (cuDNN convolutions and matmuls): the norms and the
    clipped sum come from different kernels here, so both must be fp32-exact for each sample's
    contribution to stay within C; elsewhere a no-op."""
    if not cuda:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class DeferredConvGrad:
    """A conv layer's per-sample weight gradients kept as (input, output gradient).

    ``x`` ``[N, C_in, *S]`` and ``g`` ``[N, C_out, *T]`` are the layer's input and output
    gradient for N = B·``crops`` forward samples; sample i's gradient is the mean of its
    ``crops`` consecutive forward samples' gradients. Not a tensor: it answers
    :meth:`sq_norms`, :meth:`weighted_sum` and :meth:`materialize`.
    """

    def __init__(self, layer: ConvNd, x: torch.Tensor, g: torch.Tensor, crops: int = 1):
        if x.shape[0] != g.shape[0] or x.shape[0] % crops:
            raise ValueError(f"DeferredConvGrad: input batch {x.shape[0]} and output-gradient "
                             f"batch {g.shape[0]} must agree and divide by crops={crops}")
        self.layer, self.x, self.g, self.crops = layer, x, g, crops
        self.dtype = layer.weight.dtype

    def __len__(self) -> int:
        return self.x.shape[0] // self.crops

    @property
    def shape(self) -> torch.Size:
        """The shape the instantiated per-sample gradients would have: ``[B, *W.shape]``."""
        return torch.Size((len(self), *self.layer.weight.shape))

    def group(self, crops_per_subject: int) -> DeferredConvGrad:
        """The same gradients grouped ``crops_per_subject`` forward samples to a subject."""
        return DeferredConvGrad(self.layer, self.x, self.g, self.crops * crops_per_subject)

    def _xg(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x.to(self.dtype), self.g.to(self.dtype)

    def sq_norms(self) -> torch.Tensor:
        """``[B]``: each sample's squared weight-gradient norm (ghost norm over its crops)."""
        x, g = self._xg()
        layer, b, k = self.layer, len(self), self.crops
        if b == 0:
            return g.new_zeros(0)
        if layer.groups != 1:  # the ghost norm needs one group
            return self.materialize().flatten(1).pow(2).sum(1)
        with _full_fp32(g.is_cuda):
            a = unfold_input(layer, x)  # [N, T, P]
            a = a.reshape(b, k * a.shape[1], a.shape[2])  # a subject's crops' positions
            gt = g.flatten(2).transpose(1, 2).reshape(b, -1, g.shape[1])  # [B, k·T, C_out]
            aat = torch.bmm(a, a.transpose(1, 2))
            ggt = torch.bmm(gt, gt.transpose(1, 2))
            return (aat * ggt).sum((1, 2)).clamp(min=0) / k**2

    def weighted_sum(self, factor: torch.Tensor) -> torch.Tensor:
        """``Σ_i factor_i·∇W_i`` (weight-shaped): one dense weight gradient of ``factor ⊙ g``."""
        x, g = self._xg()
        layer = self.layer
        scale = (factor.to(g.dtype) / self.crops).repeat_interleave(self.crops)
        g = g * scale.view(-1, *(1,) * (g.dim() - 1))
        x, padding = padded_input(layer, x)
        nd = x.dim() - 2
        with _full_fp32(g.is_cuda):
            _, grad_w, _ = torch.ops.aten.convolution_backward(
                g, x, layer.weight.detach().to(g.dtype), None, list(layer.stride),
                list(padding), list(layer.dilation), False, [0] * nd, layer.groups,
                [False, True, False])
        return grad_w

    def materialize(self) -> torch.Tensor:
        """``[B, *W.shape]``: the instantiated per-sample (per-subject) gradients."""
        x, g = self._xg()
        gs = per_sample_conv_weight_grad(self.layer, x, g)
        if self.crops > 1:
            gs = gs.view(len(self), self.crops, *gs.shape[1:]).mean(1)
        return gs
