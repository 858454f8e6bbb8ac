"""Exactness of per-sample gradients: Opacus (with privseg's samplers) vs one-at-a-time autograd.

``per_sample_grad_error`` runs Opacus in one grad-sample mode and compares with gradients
computed one sample at a time by plain autograd (invariant 1 of the design). The registry
tests run it for every entry, dimension and claimed mode.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from opacus.grad_sample import (
    GradSampleModuleExpandedWeights,
    GradSampleModuleFastGradientClipping,
)
from torch import nn

from privseg.dp.bookkeeping import DeferredConvGrad
from privseg.dp.functional_step import per_subject_grads
from privseg.dp.grad_sample_module import LeanGradSampleModule
from privseg.dp.grad_samplers import prepare_module
from privseg.dp.optimizer import FlatDPOptimizer

MODES = ("hooks", "functorch", "ew", "ghost")
#: per-sample paths outside Opacus' grad-sample modes, checked the same way
#: (``torchfunc``: :mod:`privseg.dp.functional_step`, the bench's plain ``torch.func`` peer)
OTHER_PATHS = ("torchfunc",)

PerSampleGrads = dict[str, torch.Tensor]  # parameter name → [B, *param.shape]


def per_sample_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Segmentation cross entropy averaged over voxels, one value per sample: shape [B]."""
    return F.cross_entropy(logits, target, reduction="none").flatten(1).mean(1)


def reference_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> PerSampleGrads:
    """Per-sample gradients by plain autograd, one sample at a time.

    Raises ValueError naming any trainable parameter that gets no gradient (Opacus would have
    no per-sample gradient for it and fail at the optimizer step).
    """
    model = copy.deepcopy(model).train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    per_sample: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        per_sample_loss(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        for n, p in params.items():
            if p.grad is None:
                raise ValueError(f"parameter {n} receives no gradient")
            per_sample[n].append(p.grad.detach().clone())
    return {n: torch.stack(g) for n, g in per_sample.items()}


def _wrap(model: nn.Module, mode: str) -> nn.Module:
    if mode in ("hooks", "functorch"):  # the grad-sample module training uses
        return LeanGradSampleModule(model, batch_first=True, loss_reduction="sum",
                                    force_functorch=mode == "functorch")
    if mode == "ew":
        return GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="sum")
    if mode == "ghost":
        return GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum",
                                                    max_grad_norm=1.0, use_ghost_clipping=True)
    raise ValueError(f"unknown grad-sample mode {mode!r}; known: {', '.join(MODES)}")


def opacus_per_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      mode: str) -> dict[str, torch.Tensor]:
    """Opacus' per-sample gradients ([B, *shape]) or, in ``ghost`` mode, norms ([B]) by name;
    ``torchfunc``: :func:`privseg.dp.functional_step.per_subject_grads` (one crop a subject)."""
    if mode == "torchfunc":
        m = copy.deepcopy(model).train()
        return per_subject_grads(m, x[:, None], y[:, None], per_sample_loss)
    wrapped = _wrap(copy.deepcopy(model).train(), mode)
    with warnings.catch_warnings():
        # the first layer's input needs no gradient; torch warns about that in every hook
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        per_sample_loss(wrapped(x), y).sum().backward()
    out = {}
    for n, p in wrapped._module.named_parameters():
        if not p.requires_grad:
            continue
        value = getattr(p, "_norm_sample" if mode == "ghost" else "grad_sample", None)
        if value is None:
            raise ValueError(f"opacus ({mode}) computed no per-sample gradient for {n}")
        out[n] = value.materialize() if isinstance(value, DeferredConvGrad) else value.detach()
    return out


def per_sample_grad_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str,
                          reference: PerSampleGrads | None = None, floor: float = 1e-6) -> float:
    """Max relative error of Opacus' per-sample gradients (``mode``) vs one-at-a-time autograd.

    For every sample i and parameter p: ``‖g_ip − r_ip‖ / max(‖r_ip‖, floor·‖r_i‖)`` where r is
    the reference, ``‖r_i‖`` sample i's full gradient norm (the floor keeps parameters whose
    true gradient is ~0 from dividing rounding noise by zero). ``ghost`` mode materialises no
    gradients, so there the per-parameter per-sample *norms* are compared
    (``|n_ip − ‖r_ip‖|`` over the same denominator) and so are the total norms that ghost
    clipping uses (``GradSampleModuleFastGradientClipping.get_norm_sample``).
    ``reference`` (from :func:`reference_grads`) can be passed to reuse it across modes.
    """
    ref = reference if reference is not None else reference_grads(model, x, y)
    got = opacus_per_sample(model, x, y, mode)
    if set(got) != set(ref):
        raise ValueError(f"parameter sets differ: {sorted(set(got) ^ set(ref))}")
    b = x.shape[0]
    ref_flat = {n: r.reshape(b, -1) for n, r in ref.items()}
    ref_total = torch.sqrt(sum(r.pow(2).sum(1) for r in ref_flat.values()))
    worst = 0.0
    got_total_sq = torch.zeros_like(ref_total)
    for n, r in ref_flat.items():
        r_norm = r.norm(dim=1)
        denom = torch.maximum(r_norm, floor * ref_total)
        if mode == "ghost":
            g_norm = got[n].reshape(b).to(r.dtype)
            err = (g_norm - r_norm).abs()
            got_total_sq += g_norm.pow(2)
        else:
            err = (got[n].reshape(b, -1).to(r.dtype) - r).norm(dim=1)
        worst = max(worst, float((err / denom).max()))
    if mode == "ghost":
        total_err = (got_total_sq.sqrt() - ref_total).abs() / ref_total
        worst = max(worst, float(total_err.max()))
    return worst


def clipped_sum_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      reference: PerSampleGrads | None = None, conv_sampler: str = "bookkeeping",
                      floor: float = 1e-6) -> tuple[float, int]:
    """Max relative error of the engine's clipped sum vs the clipped sum of exact gradients.

    The engine's path: hooks mode with ``conv_sampler`` (default: book-keeping, whose
    per-sample weight gradients are never instantiated, so only their clipped sum can be
    compared) and :class:`~privseg.dp.optimizer.FlatDPOptimizer`'s clipping pass, σ = 0. The
    reference: one-at-a-time autograd gradients r_i, clipped flat (Abadi et al. 2016) with
    ``min(1, C/(‖r_i‖ + 1e-6))``, C the median of the ‖r_i‖ (some samples clipped, some not),
    summed. Per parameter: ``‖s_p − e_p‖ / max(‖e_p‖, floor·‖e‖)``. Also returns how many
    weights were book-kept (so that a caller can tell the book-keeping branch ran).
    """
    ref = reference if reference is not None else reference_grads(model, x, y)
    b = x.shape[0]
    norms = torch.sqrt(sum(r.reshape(b, -1).pow(2).sum(1) for r in ref.values()))
    clip = float(norms.median())
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = {n: torch.einsum("i,i...->...", factor, r) for n, r in ref.items()}
    wrapped = prepare_module(copy.deepcopy(model).train(), "hooks", conv_sampler,
                             batch_first=True, loss_reduction="sum")
    opt = FlatDPOptimizer(torch.optim.SGD(wrapped.parameters(), lr=0.0), noise_multiplier=0.0,
                          max_grad_norm=clip, expected_batch_size=b, loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        per_sample_loss(wrapped(x), y).sum().backward()
    named = [(n, p) for n, p in wrapped._module.named_parameters() if p.requires_grad]
    kept = sum(isinstance(p.grad_sample, DeferredConvGrad) for _, p in named)
    opt.clip_and_accumulate()
    opt.add_noise()  # σ = 0: p.grad is the clipped sum
    total = torch.sqrt(sum(e.pow(2).sum() for e in expected.values()))
    worst = 0.0
    for n, p in named:
        e = expected[n]
        denom = max(float(e.norm()), floor * float(total))
        worst = max(worst, float((p.grad.to(e.dtype) - e).norm()) / denom)
    return worst, kept
