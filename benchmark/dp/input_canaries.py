"""Input-space canaries: canary subjects a black-box attacker with the released model can test.

Each canary is a subject whose image is ordinary (a fresh phantom subject, or a copy of a
training image for other data sets) and whose label map carries a distinctive, low-probability
pattern that the image does not predict: a box of stripes alternating two foreground classes
(``a, b, a, b, ...``). Its *twin* has the same image and box with the stripes swapped
(``b, a, b, a, ...``) and is never trained on. A model that memorised the canary assigns its
labels lower cross-entropy than its twin's inside the box; a model that never saw it cannot
tell them apart. Score = CE(twin) − CE(canary) over the box (Steinke et al. 2023's black-box
"mislabelled example" canaries, with a twin as the per-canary baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privseg.datasets import Subject


@dataclass
class InputCanary:
    """A canary subject (trained on when its coin says so) and its never-trained twin label."""

    subject: Subject
    twin_label: np.ndarray
    box: tuple[slice, ...]


def _stripes(shape: tuple[int, ...], a: int, b: int) -> np.ndarray:
    cols = np.arange(shape[-1]) // 2 % 2  # stripes two voxels wide along the last axis
    return np.where(np.broadcast_to(cols, shape) == 0, a, b).astype(np.uint8)


def make_input_canaries(bases: list[tuple[np.ndarray, np.ndarray, str]], num_classes: int,
                        rng: np.random.Generator) -> list[InputCanary]:
    """One canary per ``(image [C,D,H,W], label [D,H,W], site)`` base.

    The box spans every slice (so each 2D crop of the canary holds it) and a quarter of each
    in-plane edge at a random position; the two classes are distinct random foreground classes.
    """
    if num_classes < 3:
        raise ValueError("input canaries need at least two foreground classes")
    out = []
    for i, (image, label, site) in enumerate(bases):
        d, h, w = label.shape
        bh, bw = max(2, h // 4), max(4, w // 4)
        y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        box = (slice(0, d), slice(y0, y0 + bh), slice(x0, x0 + bw))
        a, b = (int(c) for c in rng.choice(np.arange(1, num_classes), size=2, replace=False))
        canary, twin = label.copy(), label.copy()
        canary[box] = _stripes((d, bh, bw), a, b)
        twin[box] = _stripes((d, bh, bw), b, a)
        subject = Subject(subject_id=f"canary-{i:05d}", site=site, image=image, label=canary,
                          meta={"canary": True})
        out.append(InputCanary(subject, twin, box))
    return out


def _box_ce(logits: torch.Tensor, label: np.ndarray, box: tuple[slice, ...],
            dims: int) -> float:
    target = torch.as_tensor(label.astype(np.int64), device=logits.device)
    if dims == 2:  # logits [D, K, H, W], label [D, H, W]
        ce = F.cross_entropy(logits, target, reduction="none")
    else:  # logits [1, K, D, H, W]
        ce = F.cross_entropy(logits, target[None], reduction="none")[0]
    return float(ce[box].mean())


@torch.no_grad()
def score_input_canaries(model: nn.Module, canaries: list[InputCanary], dims: int,
                         device: torch.device) -> np.ndarray:
    """CE(twin) − CE(canary) inside each canary's box under ``model`` (higher: more likely
    trained on). 2D models see every slice; 3D models the whole volume."""
    was_training = model.training
    model.eval()
    scores = []
    for c in canaries:
        x = torch.as_tensor(c.subject.image, device=device).float()
        x = x.permute(1, 0, 2, 3) if dims == 2 else x[None]  # [D,C,H,W] or [1,C,D,H,W]
        logits = model(x).float()
        scores.append(_box_ce(logits, c.twin_label, c.box, dims)
                      - _box_ce(logits, c.subject.label, c.box, dims))
    model.train(was_training)
    return np.asarray(scores)

