"""The DP-SGD step a user would write with plain ``torch.func``: privseg's bench peer.

``privseg bench`` measures privseg's default per-sample path against this step, the one a
user who knows ``torch.func`` writes in ~40 lines without Opacus: ``vmap`` of ``grad`` of one
subject's loss (the mean of its k crops' per-sample Dice+CE) over the subjects of a batch gives
each subject's gradient; each is clipped to C (flat clipping, Abadi et al. 2016, the factor
``min(1, C / (‖g_i‖ + 1e-6))`` Opacus uses), the clipped gradients are summed, Gaussian noise
``N(0, σ²C²)`` from a generator is added per coordinate, and the sum is divided by the expected
batch size. Per-sample gradients are exact (the registry's exactness check,
:func:`privseg.dp.exactness.per_sample_grad_error` with mode ``"torchfunc"``, compares them with
one-sample-at-a-time autograd).

This is a peer to measure against, not a training path: it keeps no accountant (the bench
runs a fixed batch); the privacy of a run comes from :mod:`privseg.dp.private`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, target) -> [N]


def per_subject_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """Each subject's gradient ``[B, *p.shape]`` by name: ``vmap(grad(subject loss))``.

    ``x`` is ``[B, k, C, *S]`` and ``y`` ``[B, k, *S]`` (k crops per subject); a subject's loss
    is the mean of ``loss_fn`` (one value per crop) over its k crops. Only parameters that
    require grad are differentiated; buffers are passed through unchanged.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def subject_loss(ps: dict[str, torch.Tensor], xs: torch.Tensor,
                     ys: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (ps, frozen, buffers), (xs,))
        # the loss in fp32 at least (bf16 logits under autocast), fp64 models stay fp64
        return loss_fn(logits.to(torch.promote_types(logits.dtype, torch.float32)), ys).mean()

    return vmap(grad(subject_loss), in_dims=(None, 0, 0))(params, x, y)


def clip_sum_noise(grads: dict[str, torch.Tensor], max_grad_norm: float,
                   noise_multiplier: float, expected_batch_size: int,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The DP-SGD gradient from per-subject gradients (Abadi et al. 2016, flat clipping).

    ``sum_i g_i · min(1, C / (‖g_i‖ + 1e-6)) + N(0, σ²C²)``, divided by the expected batch
    size, per parameter name. The noise is drawn parameter by parameter from ``generator``.
    """
    flat = [g.flatten(1) for g in grads.values()]
    norms = torch.linalg.vector_norm(torch.stack([f.norm(dim=1) for f in flat]), dim=0)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    std = noise_multiplier * max_grad_norm
    out = {}
    for name, g in grads.items():
        summed = torch.einsum("i,i...->...", factor, g)
        if std:
            summed = summed + torch.normal(0.0, std, size=summed.shape, generator=generator,
                                           device=summed.device, dtype=summed.dtype)
        out[name] = summed / expected_batch_size
    return out


class FunctionalDPStep:
    """One DP-SGD step per call, written as a ``torch.func`` user would: the bench's peer.

    Holds the model, a plain torch optimizer and the noise generator; :meth:`step` computes
    per-subject gradients (:func:`per_subject_grads`), clips, sums and noises them
    (:func:`clip_sum_noise`), writes ``p.grad`` and steps the optimizer.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 max_grad_norm: float, noise_multiplier: float, expected_batch_size: int,
                 generator: torch.Generator | None = None):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.max_grad_norm, self.noise_multiplier = max_grad_norm, noise_multiplier
        self.expected_batch_size, self.generator = expected_batch_size, generator

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One step on subjects ``x`` ``[B, k, C, *S]``, labels ``y`` ``[B, k, *S]``."""
        grads = per_subject_grads(self.model, x, y, self.loss_fn)
        noisy = clip_sum_noise(grads, self.max_grad_norm, self.noise_multiplier,
                               self.expected_batch_size, self.generator)
        for name, p in self.model.named_parameters():
            if name in noisy:
                p.grad = noisy[name]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
