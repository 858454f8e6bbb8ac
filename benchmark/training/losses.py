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
    ``'mean'``/``'sum'`` reduce further.
    """

    def __init__(self, reduction: str = "mean", dice_weight: float = 1.0, ce_weight: float = 1.0):
        super().__init__()
        self.reduction = reduction
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.dice = DiceLoss(softmax=True, to_onehot_y=True, reduction="none", batch=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(1, target.ndim))
        ce = F.cross_entropy(logits, target, reduction="none").mean(dim=spatial)
        dice = self.dice(logits, target.unsqueeze(1)).flatten(1).mean(dim=1)
        loss = self.ce_weight * ce + self.dice_weight * dice
        if self.reduction == "none":
            return loss
        return loss.mean() if self.reduction == "mean" else loss.sum()


def per_subject(loss_per_crop: torch.Tensor, crops_per_subject: int) -> torch.Tensor:
    """Average the k crop losses of each subject: ``[B*k] -> [B]``."""
    return loss_per_crop.view(-1, crops_per_subject).mean(dim=1)
