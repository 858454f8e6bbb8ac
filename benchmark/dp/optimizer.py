"""Opacus' DP optimizer with clipping and noise over flat buffers instead of per parameter.

Opacus' ``DPOptimizer`` clips, sums and noises parameter by parameter: a per-sample norm, a
weighted sum (einsum), a zero tensor, a Gaussian draw, an add and a divide for each of a
U-Net's ~50 parameter tensors, ~300 small kernels per step, about as many as the model's own
forward and backward. On a GPU with small steps (the phantom's) the step is bound by launching
them. :class:`FlatDPOptimizer` overrides the same three methods (``clip_and_accumulate``,
``add_noise``, ``scale_grad``) to do the same arithmetic on the per-sample gradients
concatenated into ``[B, D]`` buckets on CUDA: one norm and one matrix-vector product per
bucket, Gaussian draws straight into one flat buffer, one add, one divide, and ``p.grad`` as
views of the result (on CPU, no concatenation: see :meth:`FlatDPOptimizer.clip_and_accumulate`).

The mechanism is Opacus' flat clipping (Abadi et al. 2016) unchanged: each sample's whole
gradient is scaled by ``min(1, C / (‖g_i‖ + 1e-6))``, the clipped sum gets i.i.d.
``N(0, σ²C²)`` noise per coordinate (the very draws Opacus makes), then is divided by the
expected batch size. Only the order of floating-point sums differs from Opacus'.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from privseg.dp.bookkeeping import DeferredConvGrad

#: most elements per concatenated bucket of per-sample gradients (256 MiB in fp32), so the
#: transient copy stays bounded for large models and batches
BUCKET_ELEMENTS = 1 << 26


def _buckets(sizes: list[int], batch: int, cap: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` ranges of parameters, each ≤ ``cap`` elements for the
    batch (a single larger parameter is a bucket of its own)."""
    out, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and total + n * batch > cap:
            out.append((start, i))
            start, total = i, 0
        total += n * batch
    if sizes:
        out.append((start, len(sizes)))
    return out


class FlatDPOptimizer(DPOptimizer):
    """``DPOptimizer`` (flat clipping, hooks/functorch/ew modes) with fused clipping and noise.

    Per-sample gradients still come from ``p.grad_sample`` and the accountant hook, skipped
    steps (physical chunks of a Poisson batch) and ``zero_grad`` behave as in Opacus; the
    clipped sum lives in one flat buffer instead of ``p.summed_grad``.
    """

    #: elements per concatenated bucket; None: :data:`BUCKET_ELEMENTS` on CUDA, none on CPU
    bucket_elements: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.secure_mode:
            raise ValueError("FlatDPOptimizer draws plain Gaussian noise; use Opacus' "
                             "DPOptimizer for secure_mode")
        self._summed: torch.Tensor | None = None  # clipped sum, across skipped steps
        self._flat_grad: torch.Tensor | None = None  # add_noise's result, for scale_grad

    def clip_factor(self, norm: torch.Tensor) -> torch.Tensor:
        """Each sample's scale from its gradient norm: flat clipping, ``min(1, C/(‖g‖+1e-6))``."""
        return (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)

    def _get_flat_grad_sample(self, p: torch.Tensor):
        """Opacus' flat per-sample gradient, or a book-kept one as it is."""
        gs = getattr(p, "grad_sample", None)
        if isinstance(gs, DeferredConvGrad):
            return gs
        return super()._get_flat_grad_sample(p)

    @property
    def accumulated_iterations(self) -> int:
        """Opacus' count of accumulated backward passes; a book-kept gradient counts one."""
        if any(isinstance(getattr(p, "grad_sample", None), DeferredConvGrad)
               for p in self.params):
            lists = {len(p.grad_sample) for p in self.params if isinstance(p.grad_sample, list)}
            if lists:
                raise ValueError("book-kept per-sample gradients cannot be accumulated over "
                                 "backward passes")
            return 1
        return super().accumulated_iterations

    def _pieces(self, samples: list) -> list[tuple[int, int, object]]:
        """Consecutive ``[start, stop)`` parameter ranges with their ``[B, D]`` per-sample
        gradients (concatenated within a bucket), or a book-kept gradient on its own."""
        batch, sizes = len(samples[0]), [p.numel() for p in self.params]
        cap = self.bucket_elements
        if cap is None:
            # On CPU, concatenating costs more than the per-parameter ops it saves (page
            # faults of a fresh buffer: ~10 ms for 34 MB); there each parameter is a bucket.
            cap = BUCKET_ELEMENTS if self.params[0].is_cuda else 0
        pieces, i = [], 0
        while i < len(samples):
            if isinstance(samples[i], DeferredConvGrad):
                pieces.append((i, i + 1, samples[i]))
                i += 1
                continue
            j = i
            while j < len(samples) and not isinstance(samples[j], DeferredConvGrad):
                j += 1
            ranges = (_buckets(sizes[i:j], batch, cap) if cap
                      else [(t, t + 1) for t in range(j - i)])
            for a, b in ranges:
                a, b = a + i, b + i
                flat = (samples[a].reshape(batch, sizes[a]) if b - a == 1 else
                        torch.cat([samples[t].reshape(batch, sizes[t]) for t in range(a, b)], 1))
                pieces.append((a, b, flat))
            i = j
        return pieces

    def clip_and_accumulate(self) -> None:
        """Clip each sample's whole gradient to ``max_grad_norm`` and add the clipped sum to
        the flat accumulator.

        Book-kept weights (:class:`privseg.dp.bookkeeping.DeferredConvGrad`) give their
        per-sample norms from Gram matrices and their part of the clipped sum as one weight
        gradient of the factor-scaled output gradient; the same factor (from the same total
        norm) scales every parameter of a sample.
        """
        params = self.params
        samples = []
        for p in params:
            _check_processed_flag(p.grad_sample)
            gs = self._get_flat_grad_sample(p)
            samples.append(gs if isinstance(gs, DeferredConvGrad) else gs.to(p.dtype))
        pieces = self._pieces(samples)
        norms = [f.sq_norms().sqrt() if isinstance(f, DeferredConvGrad)
                 else torch.linalg.vector_norm(f, dim=1) for _, _, f in pieces]
        norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), dim=0)
        factor = self.clip_factor(norm)
        # Each piece's clipped sum is written into its slice of one flat buffer (no
        # concatenation: a copy of the whole gradient, ~1 ms a step on a 1.6M-parameter
        # U-Net on CPU). mv is a GEMV, never a TF32 GEMM (which `factor @ f` may become on
        # CUDA where TF32 matmuls are allowed): the clipped sum stays fp32, so each sample
        # adds at most C.
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        first = self._summed is None
        if first:
            self._summed = params[0].new_empty(offsets[-1])
        for a, b, f in pieces:
            where = self._summed[offsets[a]:offsets[b]]
            if isinstance(f, DeferredConvGrad):
                part = f.weighted_sum(factor).reshape(-1)
                where.copy_(part) if first else where.add_(part)
            elif first:
                torch.mv(f.t(), factor, out=where)
            else:
                where.add_(f.t().mv(factor))
        for p in params:
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """Clipped sum + ``N(0, (σC)²)`` per coordinate; the result is written to ``p.grad``
        (views of one flat tensor).

        The noise is drawn parameter by parameter, in Opacus' order, shapes and dtype, into
        slices of one buffer: the same values Opacus' ``DPOptimizer`` would add for the same
        generator state, so runs reproduce across the two optimizers. (A single draw of D
        values is as valid a Gaussian, but a different realisation: in the 60-epoch phantom
        DP test its Dice spread differed visibly from Opacus' draws, which we could not tell
        from chance, so we keep Opacus' draws.)
        """
        summed = self._summed
        if summed is None:
            raise ValueError("add_noise without clip_and_accumulate (no backward pass?)")
        std = self.noise_multiplier * self.max_grad_norm
        slices, offset = [], 0
        for p in self.params:
            slices.append((p, slice(offset, offset + p.numel())))
            offset += p.numel()
        if std != 0:
            noise = torch.empty_like(summed)
            for p, where in slices:
                torch.normal(0.0, std, size=p.shape, generator=self.generator,
                             out=noise[where].view(p.shape))
            summed.add_(noise)
        self._summed = None
        self._flat_grad = summed
        for p, where in slices:
            p.grad = summed[where].view_as(p)

    def scale_grad(self) -> None:
        """Divide by the expected batch size (``loss_reduction='mean'``), in one kernel."""
        if self.loss_reduction == "mean":
            self._flat_grad.div_(self.expected_batch_size * self.accumulated_iterations)
        self._flat_grad = None

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        if not self._is_last_step_skipped:
            self._summed = None
