"""Faster per-sample gradients (and gradient norms) for convolutions, plugged into Opacus.

Opacus' own conv grad sampler (``opacus.grad_sample.conv``) unfolds the layer input into
``[B, C_in·k^d, T]`` (k^d times the input: Opacus issue #145) and contracts it with the output
gradient; in ghost (fast-clipping) mode it has no norm sampler for convolutions, so every conv
layer instantiates that per-sample gradient to take its norm.

Here, replacements registered through Opacus' extension points
(``register_grad_sampler`` / ``register_norm_sampler``):

* :func:`grouped_conv_grad_sample` -- per-sample weight gradients as the *weight gradient of a
  grouped convolution* whose groups are the samples (the "groups = B" trick; Rochette et al.
  2019, "Efficient per-example gradient computations in convolutional neural networks"): the
  batch is folded into channels, ``[1, B·C_in, *S]``, and the backend's own conv weight-grad
  kernel (``aten.convolution_backward``, the one non-private training runs) with
  ``groups = B·groups`` returns ``[B·C_out, C_in/groups, *k]``, i.e. every sample's gradient,
  with stride, padding (any ``padding_mode``, ``'same'``), dilation and groups handled by the
  kernel. No unfold; the cost is that of the non-private weight gradient. Bias: the output
  gradient summed over positions.
* :func:`mixed_conv_norm_sample` -- per-sample gradient *norms* for ghost clipping, choosing per
  layer (Bu et al. 2022, "Scalable and efficient training of large convolutional neural networks
  with differential privacy": mixed ghost clipping) between the ghost norm
  ``‖∇W_i‖² = Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` (Gram matrices over the T output positions: cost
  ~ B·T²·(C_in·k^d + C_out), good where T is small, e.g. at a U-Net bottleneck) and
  instantiation (the grouped per-sample gradient, normed and freed at once: cost ~
  B·T·C_in·k^d·C_out), whichever costs fewer multiply-adds (:func:`use_ghost_norm`).
* :func:`bookkeeping_conv_grad_sample` -- the grouped sampler, except that the weights of layers
  where the ghost norm is cheaper stay un-instantiated (:mod:`privseg.dp.bookkeeping`, Bu et
  al. 2023): their norms come from Gram matrices and their clipped sum from one weight gradient
  at the optimizer's clipping pass. The default.

The shared arithmetic (padding, the grouped weight-grad call, unfolding, the cost model) is in
:mod:`privseg.dp.conv_math`.

Where Opacus looks them up: ``GradSampleHooks.capture_backprops_hook`` reads
``self.GRAD_SAMPLERS[type(module)]`` (and the fast-clipping hooks ``self.NORM_SAMPLERS``) at
*backward* time, while ``add_hooks`` reads the same dict at wrap time only to decide which
layers functorch handles. The registries are class attributes shared by every wrapped model in
the process, so a context manager around wrapping alone would not select anything: the backward
pass would use whatever the registry holds by then. Hence :func:`prepare_module` installs the
chosen samplers in Opacus' registries (:func:`conv_samplers`, which restores them on exit),
wraps the model, and *pins* a copy of the registries on the wrapped instance (an instance
attribute shadows the class one in ``self.GRAD_SAMPLERS``), so that each wrapped model keeps its
own choice (``"opacus"``: Opacus' original samplers, no conv norm sampler) whatever else the
process installs. Modes that bypass the registries (``functorch``, ``ew``) are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from opacus.grad_sample import (
    GradSampleHooks,
    GradSampleHooksFastGradientClipping,
    register_grad_sampler,
    register_norm_sampler,
)
from opacus.grad_sample import prepare_module as opacus_prepare_module
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from torch import nn

from privseg.dp.bookkeeping import DeferredConvGrad, defer_weight
from privseg.dp.conv_math import (
    ConvNd,
    per_sample_conv_weight_grad,
    positions_of,
    unfold_input,
    use_ghost_norm,
)
from privseg.dp.grad_sample_module import LeanGradSampleModule

ConvSampler = Literal["opacus", "grouped", "bookkeeping"]
CONV_SAMPLERS: tuple[str, ...] = ("opacus", "grouped", "bookkeeping")
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)



# --- per-sample gradients ------------------------------------------------------------------


def _supported(layer: nn.Module) -> bool:
    return type(layer) in CONV_TYPES


def grouped_conv_grad_sample(layer: ConvNd, activations: Sequence[torch.Tensor],
                             backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus grad sampler: per-sample conv gradients without unfolding the input."""
    x = activations[0]
    if x.shape[0] == 0 or not _supported(layer):  # empty batch, subclasses: Opacus' own
        return compute_conv_grad_sample(layer, activations, backprops)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = per_sample_conv_weight_grad(layer, x, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.flatten(2).sum(2)
    return out


def bookkeeping_conv_grad_sample(layer: ConvNd, activations, backprops: torch.Tensor
                                 ) -> dict[nn.Parameter, torch.Tensor | DeferredConvGrad]:
    """Opacus grad sampler: the grouped sampler's per-sample gradients, except that the weight
    of a layer :func:`privseg.dp.bookkeeping.defer_weight` picks is a
    :class:`~privseg.dp.bookkeeping.DeferredConvGrad` (bias: instantiated, ``[B, C_out]``).
    Book-keeping, Bu et al. 2023 (arXiv 2210.00038): see :mod:`privseg.dp.bookkeeping`."""
    x = activations[0]
    if (x.shape[0] == 0 or not _supported(layer)
            or not layer.weight.requires_grad
            or not defer_weight(layer, positions_of(backprops))):
        return grouped_conv_grad_sample(layer, activations, backprops)
    out: dict[nn.Parameter, torch.Tensor | DeferredConvGrad] = {
        layer.weight: DeferredConvGrad(layer, x, backprops)}
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.flatten(2).sum(2)
    return out


def group_moments(x: torch.Tensor, num_groups: int, eps: float,
                  use_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and group: the mean and ``1/sqrt(var + eps)`` of ``x`` (``[N, G]`` each).

    ``use_kernel``: from ATen's group-norm kernel (on CPU ~20x faster than ``var_mean``, whose
    CPU reduction is slow; it also writes a normalised copy of ``x``); else ``var_mean``
    (measured as fast as that kernel on an H100, without the extra write).
    """
    n, c = x.shape[:2]
    if use_kernel:
        _, mean, rstd = torch.ops.aten.native_group_norm(
            x, None, None, n, c, x[0, 0].numel(), num_groups, eps)
        return mean, rstd
    var, mean = torch.var_mean(x.reshape(n, num_groups, -1), dim=2, correction=0)
    return mean, (var + eps).rsqrt()


def group_norm_grad_sample(layer: nn.GroupNorm, activations: Sequence[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus grad sampler for GroupNorm (Wu & He 2018) by ATen's own GroupNorm backward.

    Opacus' sampler recomputes ``group_norm(x)`` and multiplies it by the output gradient,
    writing two activation-sized tensors per layer. Here the batch is folded into channels:
    ``[N, C, *S]`` viewed as one sample of ``N·C`` channels in ``N·G`` groups (a group never
    spans two samples, as the groups are contiguous channel blocks), ATen's
    ``native_group_norm_backward`` gives that one sample's ``∂L/∂γ`` and ``∂L/∂β`` over its
    ``N·C`` channels, which are each sample's per-channel gradients
    ``∂L/∂γ_nc = Σ_s g·x̂`` and ``∂L/∂β_nc = Σ_s g``: one fused reduction over ``g`` and ``x``
    (measured 1.8-3.5x faster on CPU than moments, a product and two sums). The moments are
    the forward's own where ``activations`` carries them after the input (``[x, mean,
    rstd]``, from :func:`privseg.dp.grad_sample_module.saved_group_moments`: no pass over
    ``x``), else those of the folded view (:func:`group_moments`).
    """
    x = activations[0]
    n, c = backprops.shape[:2]
    params = [p for p in (layer.weight, layer.bias) if p is not None and p.requires_grad]
    if n == 0:
        return {p: backprops.new_zeros(0, *p.shape) for p in params}
    want_w = layer.weight is not None and layer.weight.requires_grad
    want_b = layer.bias is not None and layer.bias.requires_grad
    if not want_w:
        return {layer.bias: backprops.reshape(n, c, -1).sum(2)} if want_b else {}
    g = backprops.reshape(1, n * c, -1)
    xs = x.to(g.dtype).reshape(1, n * c, -1)
    groups = n * layer.num_groups
    saved = activations[1:3]  # the forward's own moments, where the module passed them
    if len(saved) == 2 and all(t.shape == (n, layer.num_groups) and t.dtype == g.dtype
                               for t in saved):
        mean, rstd = (t.reshape(1, groups) for t in saved)
    else:
        mean, rstd = group_moments(xs, groups, layer.eps, use_kernel=not x.is_cuda)
    _, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
        g, xs, mean, rstd, None, 1, n * c, g.shape[2], groups, [False, True, want_b])
    out = {layer.weight: grad_w.view(n, c)}
    if want_b:
        out[layer.bias] = grad_b.view(n, c)
    return out


# --- per-sample gradient norms (ghost clipping) ----------------------------------------------


def ghost_conv_weight_norm(layer: ConvNd, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B]``: per-sample weight-gradient norms from Gram matrices over output positions."""
    a = unfold_input(layer, x.to(g.dtype))  # [B, T, P]
    gt = g.flatten(2).transpose(1, 2)  # [B, T, C_out]
    aat = torch.bmm(a, a.transpose(1, 2))
    ggt = torch.bmm(gt, gt.transpose(1, 2))
    return (aat * ggt).sum((1, 2)).clamp(min=0).sqrt()


def mixed_conv_norm_sample(layer: ConvNd, activations: Sequence[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus norm sampler: per-sample gradient norms, ghost or instantiated per layer."""
    x = activations[0]
    params = [p for p in (layer.weight, layer.bias) if p is not None and p.requires_grad]
    if x.shape[0] == 0:  # as Opacus' create_norm_sample: an empty norm per parameter
        return {p: backprops.new_zeros(0) for p in params}
    if not _supported(layer):
        grads = compute_conv_grad_sample(layer, activations, backprops)
        return {p: gs.reshape(len(gs), -1).norm(2, dim=-1) for p, gs in grads.items()}
    out = {}
    if layer.weight.requires_grad:
        if use_ghost_norm(layer, positions_of(backprops)):
            out[layer.weight] = ghost_conv_weight_norm(layer, x, backprops)
        else:
            gs = per_sample_conv_weight_grad(layer, x, backprops)
            out[layer.weight] = gs.flatten(1).norm(2, dim=1)
            del gs
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.flatten(2).sum(2).norm(2, dim=1)
    return out


# --- selection: scoped registration, pinned per wrapped model -------------------------------


def _registries() -> list[dict]:
    regs = [GradSampleHooks.GRAD_SAMPLERS, GradSampleHooksFastGradientClipping.GRAD_SAMPLERS,
            GradSampleHooksFastGradientClipping.NORM_SAMPLERS]
    unique = []
    for r in regs:
        if not any(r is u for u in unique):
            unique.append(r)
    return unique


_MISSING = object()


@contextmanager
def conv_samplers(kind: ConvSampler) -> Iterator[None]:
    """Within the block, Opacus' registries hold the ``kind`` conv samplers; restored on exit.

    ``"grouped"``: :func:`grouped_conv_grad_sample`, :func:`mixed_conv_norm_sample` and
    :func:`group_norm_grad_sample`; ``"bookkeeping"``: the same, except that the conv grad
    sampler is :func:`bookkeeping_conv_grad_sample` (weights of layers where the ghost norm is
    cheaper are book-kept, not instantiated; needs :class:`privseg.dp.optimizer.FlatDPOptimizer`);
    ``"opacus"``: Opacus' original conv and GroupNorm samplers and no conv norm sampler.
    Covers wrapping *and* backward passes run inside the block; to keep the choice beyond it,
    wrap with :func:`prepare_module`.
    """
    if kind not in CONV_SAMPLERS:
        raise ValueError(f"unknown conv grad sampler {kind!r}; known: {', '.join(CONV_SAMPLERS)}")
    saved = [(r, {t: r.get(t, _MISSING) for t in (*CONV_TYPES, nn.GroupNorm)})
             for r in _registries()]
    try:
        norm = GradSampleHooksFastGradientClipping.NORM_SAMPLERS
        if kind in ("grouped", "bookkeeping"):
            if kind == "grouped":
                register_grad_sampler(list(CONV_TYPES))(grouped_conv_grad_sample)
            else:
                register_grad_sampler(list(CONV_TYPES))(bookkeeping_conv_grad_sample)
            register_norm_sampler(list(CONV_TYPES))(mixed_conv_norm_sample)
            register_grad_sampler(nn.GroupNorm)(group_norm_grad_sample)
        else:
            register_grad_sampler(list(CONV_TYPES))(compute_conv_grad_sample)
            register_grad_sampler(nn.GroupNorm)(compute_group_norm_grad_sample)
            for t in CONV_TYPES:
                norm.pop(t, None)
        yield
    finally:
        for r, entries in saved:
            for t, f in entries.items():
                if f is _MISSING:
                    r.pop(t, None)
                else:
                    r[t] = f


def pin_samplers(gsm: object) -> None:
    """Give a wrapped model its own copy of the registries as they are now (see module doc)."""
    gsm.GRAD_SAMPLERS = dict(gsm.GRAD_SAMPLERS)
    if hasattr(type(gsm), "NORM_SAMPLERS"):
        gsm.NORM_SAMPLERS = dict(gsm.NORM_SAMPLERS)


def prepare_module(model: nn.Module, grad_sample_mode: str, conv_sampler: ConvSampler,
                   lean: bool = True, **kwargs):
    """Opacus' ``prepare_module`` with the ``conv_sampler`` conv samplers pinned to the result.

    Hooks and functorch modes wrap in :class:`~privseg.dp.grad_sample_module.LeanGradSampleModule`
    (Opacus' ``GradSampleModule`` minus a copy of every per-sample gradient) unless not
    ``lean``.

    In ``hooks`` mode with the grouped or book-keeping sampler, conv layers also stop computing
    the dense weight gradient (:func:`skip_dense_conv_weight_grads`).
    """
    with conv_samplers(conv_sampler):
        if lean and grad_sample_mode in ("hooks", "functorch"):
            gsm = LeanGradSampleModule(model, force_functorch=grad_sample_mode == "functorch",
                                       **kwargs)
        else:
            gsm = opacus_prepare_module(model, grad_sample_mode=grad_sample_mode, **kwargs)
        pin_samplers(gsm)
    if grad_sample_mode == "hooks" and conv_sampler in ("grouped", "bookkeeping"):
        skip_dense_conv_weight_grads(gsm)
    return gsm


class _ConvWithoutParameterGradients(torch.autograd.Function):
    """A conv layer's forward whose backward returns no gradient at all: for a first layer,
    whose input needs none and whose parameters' gradients come from the per-sample hook.
    Linked to the graph through the weight, so that the output's gradient hook fires; the
    output is the conv's own new tensor (not a view), so in-place ops may follow it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                layer: ConvNd) -> torch.Tensor:
        return layer._conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, None, None]:
        return None, None, None, None


def _conv_forward_without_weight_grad(self: ConvNd, x: torch.Tensor) -> torch.Tensor:
    if not (self.training and torch.is_grad_enabled()):
        return self._conv_forward(x, self.weight, self.bias)
    if not x.requires_grad:
        # A first layer: its conv backward would compute nothing anyone uses.
        return _ConvWithoutParameterGradients.apply(x, self.weight, self.bias, self)
    # The bias is detached with the weight: CPU's oneDNN computes a bias gradient only inside
    # its weight-gradient primitive, so asking for the bias alone still pays for the whole
    # weight gradient (measured: a 3D 32³ layer's backward 62 ms with the bias, 29 ms without).
    bias = None if self.bias is None else self.bias.detach()
    return self._conv_forward(x, self.weight.detach(), bias)


def skip_dense_conv_weight_grads(model: nn.Module) -> int:
    """Let conv layers' backward skip the summed weight gradient; return how many layers.

    In Opacus' hooks mode autograd computes each conv's summed weight gradient, which DP-SGD
    never uses: the optimizer builds the update from ``p.grad_sample`` alone (clip, sum, noise,
    then ``p.grad`` is overwritten). With the grouped sampler that dense weight-grad kernel costs
    as much as the per-sample one, so it is a third of the conv backward spent for nothing.
    The layer's forward uses a detached weight and bias (the conv backward then computes only
    the input gradient, and nothing at all in a first layer, whose input needs none:
    :class:`_ConvWithoutParameterGradients`); the hook on the layer's output still receives
    the output gradient and the grad sampler fills ``weight.grad_sample`` and
    ``bias.grad_sample``.
    Not for ghost clipping, whose second backward needs the dense gradients; not for
    non-private training.
    """
    n = 0
    for m in model.modules():
        if type(m) in CONV_TYPES and m.weight.requires_grad:
            m.forward = _conv_forward_without_weight_grad.__get__(m)
            n += 1
    return n


def active_conv_samplers(gsm: object) -> dict[str, str]:
    """Names of the grad/norm samplers a wrapped model will use for each conv type."""
    out = {}
    for t in CONV_TYPES:
        gs = getattr(gsm, "GRAD_SAMPLERS", {}).get(t)
        ns = getattr(gsm, "NORM_SAMPLERS", {}).get(t)
        out[t.__name__] = f"{getattr(gs, '__name__', None)}/{getattr(ns, '__name__', None)}"
    return out
