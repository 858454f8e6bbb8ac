"""Segmentation loss with one value per sample, as Opacus' ghost clipping requires."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn


class PerSampleDiceCE(nn.Module):
    """Soft Dice (Milletari et al. 2016) + cross-entropy, reduced over everything but the batch.

    ``reduction='none'`` returns shape ``[N]`` (one loss per forward sample), which is what
    Opacus' ``DPLossFastGradientClipping`` sets while it computes per-sample gradient norms;
    ``'mean'``/``'sum'`` reduce further. The labels are one-hot encoded out of place, by a
    comparison with the class indices (``F.one_hot`` reads the maximum label and MONAI's
    ``to_onehot_y`` scatters in place; neither runs under ``torch.func.vmap``), to the same
    0/1 values MONAI gives, so the loss is bitwise unchanged and also serves the bench's
    ``torch.func`` peer (:mod:`privseg.dp.functional_step`).
    """

    def __init__(self, reduction: str = "mean", dice_weight: float = 1.0, ce_weight: float = 1.0):
        super().__init__()
        self.reduction = reduction
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.dice = DiceLoss(softmax=True, to_onehot_y=False, reduction="none", batch=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(1, target.ndim))
        ce = F.cross_entropy(logits, target, reduction="none").mean(dim=spatial)
        classes = torch.arange(logits.shape[1], device=target.device)
        onehot = (target.unsqueeze(1) == classes.view(-1, *[1] * (target.ndim - 1)))
        onehot = onehot.to(logits.dtype)
        dice = self.dice(logits, onehot).flatten(1).mean(dim=1)
        loss = self.ce_weight * ce + self.dice_weight * dice
        if self.reduction == "none":
            return loss
        return loss.mean() if self.reduction == "mean" else loss.sum()


def per_subject(loss_per_crop: torch.Tensor, crops_per_subject: int) -> torch.Tensor:
    """Average the k crop losses of each subject: ``[B*k] -> [B]``."""
    return loss_per_crop.view(-1, crops_per_subject).mean(dim=1)
