"""Automatic clipping (Bu et al. 2022, arXiv 2206.07136): normalise, do not clip.

Each per-sample (per-subject) gradient is scaled to ``C · g / (‖g‖ + γ)`` instead of
``g · min(1, C / ‖g‖)``. Every contribution then has norm ``C · ‖g‖ / (‖g‖ + γ) < C``, so the
sensitivity, the noise ``N(0, σ²C²)`` and the accountant are those of flat clipping at ``C``;
only the per-sample scaling differs. With ``C = 1`` (Bu et al.'s "AUTO-S"; ``γ`` their
stability constant, 0.01) the clipping norm leaves the hyperparameter search: a different
``C`` only rescales the update, which the learning rate absorbs (exactly for Adam).

The scaling is applied to per-sample gradients that Opacus' grad samplers computed, after
:func:`privseg.dp.private.group_crop_grad_samples` has averaged each subject's k views, in
:class:`~privseg.dp.optimizer.FlatDPOptimizer`'s clipping pass: everything else (noise draws,
skipped physical steps, accountant hook) is that optimizer's.
"""

from __future__ import annotations

import torch

from privseg.dp.optimizer import FlatDPOptimizer

#: Bu et al.'s stability constant γ (their default)
AUTO_CLIP_GAMMA = 0.01


class AutoClipDPOptimizer(FlatDPOptimizer):
    """:class:`FlatDPOptimizer` with automatic clipping: factor ``C / (‖g_i‖ + γ)``."""

    def __init__(self, *args, gamma: float = AUTO_CLIP_GAMMA, **kwargs):
        if gamma <= 0:
            raise ValueError(f"automatic clipping needs gamma > 0 (got {gamma})")
        super().__init__(*args, **kwargs)
        self.gamma = gamma

    def clip_factor(self, norm: torch.Tensor) -> torch.Tensor:
        """``C / (‖g‖ + γ)``: every sample's scaled gradient has norm below ``C``."""
        return self.max_grad_norm / (norm + self.gamma)


#: DP optimizer per ``privacy.clipping`` (hooks and functorch modes)
CLIPPING_OPTIMIZERS: dict[str, type[FlatDPOptimizer]] = {
    "flat": FlatDPOptimizer,
    "automatic": AutoClipDPOptimizer,
}
