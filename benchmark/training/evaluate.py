"""Held-out evaluation per subject volume: Dice and HD95 per class (MONAI metrics).

Convention for empty masks (as segmentation challenges state theirs):

- reference empty (the class is absent from the volume): Dice and HD95 are undefined for that
  volume and skipped in the means, whatever the prediction (Dice's ``ignore_empty``);
- reference present, prediction empty (the model never predicts the class there): Dice 0 and
  HD95 = the volume's diagonal in voxels, the worst distance the volume allows, so a model
  that never predicts a class gets that class's worst-case HD95 rather than a skipped one;
  each such volume is counted in ``empty_pred`` (per class; ``n_empty_pred`` in all).

2D models are evaluated per volume too: every slice is predicted and the slices reassembled,
so the Dice is that of the volume, not an average over slices. 3D inference runs as a MONAI
sliding window (Gaussian-weighted, overlap 0.25). In 2D the volume's slices are a batch of
images: where the crop is the whole slice (no ``patch_size``), ``sw_batch_size`` whole slices
per forward pass; else a 2D sliding window over the stack of slices. Both give the logits of
the former one-slice-deep 3D sliding window (constant weights, no overlap) without its
per-window bookkeeping. On a CPU, 2D inference runs in channels-last memory layout
(:func:`inference_forward`): oneDNN's convolutions then need no layout conversions, ~1.4× faster
on one thread; the logits differ from the default layout's by float rounding only (≤ 1e-5 seen
on a trained phantom U-Net, no voxel's label changed in 3.5 M).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice, compute_hausdorff_distance
from torch import nn

from privseg.datasets.base import Subject


@torch.no_grad()
def predict_volume(model: nn.Module, subject: Subject, dims: int, roi: tuple[int, ...],
                   device: torch.device, sw_batch_size: int = 32, amp: bool = False
                   ) -> torch.Tensor:
    """Label map ``[D, H, W]`` predicted for one subject (the argmax of :func:`volume_logits`)."""
    return volume_logits(model, subject, dims, roi, device, sw_batch_size, amp).argmax(0).cpu()


@torch.no_grad()
def volume_logits(model: nn.Module, subject: Subject, dims: int, roi: tuple[int, ...],
                  device: torch.device, sw_batch_size: int = 32, amp: bool = False
                  ) -> torch.Tensor:
    """Logits ``[classes, D, H, W]`` for one subject's volume (2D: slices as a batch)."""
    image = torch.as_tensor(subject.image, dtype=torch.float32).to(device)
    forward = inference_forward(model, dims, device)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return forward(x).float()

    if dims == 2:
        slices = image.movedim(1, 0)  # [C, D, H, W] -> D images [C, H, W]
        if tuple(roi[1:]) == tuple(slices.shape[2:]):
            logits = torch.cat([predictor(slices[i:i + sw_batch_size])
                                for i in range(0, len(slices), sw_batch_size)])
        else:
            logits = torch.as_tensor(sliding_window_inference(
                slices, roi[1:], sw_batch_size, predictor, overlap=0.0, mode="constant"))
        return logits.movedim(0, 1)
    logits = sliding_window_inference(image[None], roi, sw_batch_size, predictor, overlap=0.25,
                                      mode="gaussian")
    return torch.as_tensor(logits)[0]


def inference_forward(model: nn.Module, dims: int, device: torch.device
                      ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's forward for evaluation; on a CPU in 2D, in channels-last layout.

    PyTorch's CPU convolutions (oneDNN) convert a default-layout (NCHW) tensor to their blocked
    layout and back at every layer; in channels-last (NHWC) they run on the tensor as it is,
    and max-pooling and nearest upsampling get faster too (measured on the phantom U-Net,
    one thread: 2.4 → 1.7 ms per 48² slice). The weights are read into channels-last copies
    per call (``torch.func.functional_call``), so the model being trained, its parameters and
    whatever holds them (optimizer, per-sample-gradient hooks) are left as they are. Elsewhere
    (3D, CUDA) this is the model itself.
    """
    if dims != 2 or device.type != "cpu":
        return model
    inner = getattr(model, "_module", model)  # Opacus' GradSampleModule wraps the model
    params = {name: p.detach().contiguous(memory_format=torch.channels_last) if p.dim() == 4
              else p.detach() for name, p in inner.named_parameters()}

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return torch.func.functional_call(inner, params, (x,))

    return forward


def _onehot(label: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(label.long(), n).movedim(-1, 0)[None].float()


def volume_metrics(pred: torch.Tensor, target: np.ndarray, class_names: list[str],
                   regions: dict[str, tuple[int, ...]] | None = None, hd95: bool = True
                   ) -> dict[str, dict[str, float]]:
    """Dice (and HD95, in voxels) per foreground class or evaluation region of one volume."""
    target_t = torch.as_tensor(np.asarray(target)).long()
    if regions:
        names = list(regions)
        p = torch.stack([torch.isin(pred, torch.tensor(v)) for v in regions.values()])[None]
        t = torch.stack([torch.isin(target_t, torch.tensor(v)) for v in regions.values()])[None]
        p, t = p.float(), t.float()
        include_bg = True
    else:
        names = class_names[1:]
        p, t = _onehot(pred, len(class_names)), _onehot(target_t, len(class_names))
        include_bg = False
    dice = compute_dice(p, t, include_background=include_bg, ignore_empty=True)[0]
    out = {"dice": {n: float(d) for n, d in zip(names, dice, strict=True)}}
    if hd95:
        first = 0 if include_bg else 1
        spatial = tuple(range(2, p.ndim))
        ref_present = (t.sum(dim=spatial)[0, first:] > 0).tolist()
        pred_empty = (p.sum(dim=spatial)[0, first:] == 0).tolist()
        # MONAI's HD95 only for the classes present in both masks: the others' values are set
        # by the convention above (NaN without a reference, the worst case when missed), so
        # asking MONAI for them (its crop, erosion and empty-mask handling) changed nothing
        both = [i for i, (r, e) in enumerate(zip(ref_present, pred_empty, strict=True))
                if r and not e]
        hd = {}
        if both:
            channels = [first + i for i in both]
            with warnings.catch_warnings():  # MONAI warns on empty masks
                warnings.simplefilter("ignore")
                values = compute_hausdorff_distance(p[:, channels], t[:, channels],
                                                    include_background=True, percentile=95)[0]
            hd = dict(zip(both, values.tolist(), strict=True))
        worst = worst_case_distance(tuple(t.shape[2:]))
        out["hd95"], out["empty_pred"] = {}, {}
        for i, (n, present, empty) in enumerate(zip(names, ref_present, pred_empty,
                                                    strict=True)):
            missed = present and empty
            out["hd95"][n] = worst if missed else (float(hd[i]) if present else float("nan"))
            out["empty_pred"][n] = int(missed)
    return out


def worst_case_distance(shape: tuple[int, ...]) -> float:
    """The HD95 given to a class present in the reference but absent from the prediction:
    the volume's diagonal in voxels, the largest distance two voxels of it can have."""
    return float(math.sqrt(sum(max(n - 1, 0) ** 2 for n in shape)))


def nanmean(values) -> float:
    """Mean over finite values (NaN when none): classes absent from a volume are skipped."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def evaluate(model: nn.Module, subjects: list[Subject], dims: int, roi: tuple[int, ...],
             class_names: list[str], device: torch.device, regions=None, hd95: bool = True,
             amp: bool = False, timing: dict[str, float] | None = None) -> dict:
    """Per-class and mean Dice/HD95 over ``subjects``, overall and per site.

    A volume's metrics (Dice, HD95: MONAI on the CPU) are computed in one background thread
    while the next volume is predicted, so on a machine with a core to spare they cost no
    wall time (``privseg train phantom2d``: 1.1 s of a 4.5 s evaluation). The prediction runs
    on this thread as before, and the metrics are pure functions of prediction and reference,
    so no number changes. ``timing``, when given, accumulates the seconds spent predicting the
    volumes (``predict_s``) and computing their metrics (``metrics_s``, in the worker thread),
    so that a run's record says where its evaluation time went.
    """
    was_training = model.training
    model.eval()
    predict_s = 0.0
    metric_s: list[float] = []

    def metrics(pred: torch.Tensor, s: Subject) -> tuple[str, dict]:
        t0 = time.perf_counter()
        out = volume_metrics(pred, s.label, class_names, regions, hd95)
        metric_s.append(time.perf_counter() - t0)
        return s.site, out

    futures = {}
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="privseg-metrics") as pool:
            for s in subjects:
                t0 = time.perf_counter()
                pred = predict_volume(model, s, dims, roi, device, amp=amp)
                predict_s += time.perf_counter() - t0
                futures[s.subject_id] = pool.submit(metrics, pred, s)
        per_subject = {sid: f.result() for sid, f in futures.items()}
    finally:
        model.train(was_training)
    if timing is not None:
        timing["predict_s"] = timing.get("predict_s", 0.0) + predict_s
        timing["metrics_s"] = timing.get("metrics_s", 0.0) + sum(metric_s)
    return summarise(per_subject)


def validation_subset(subjects: list[Subject], n: int | None, seed: int) -> list[Subject]:
    """``n`` of ``subjects`` drawn once from ``seed`` (in their order), or all of them.

    Validations between checkpoints (``training.val_subjects``) run on this fixed subset, so
    that a curve compares one model with the next on the same subjects at a fraction of the
    cost; a run's last validation and its test use every subject.
    """
    if n is None or n >= len(subjects):
        return list(subjects)
    chosen = np.random.default_rng(seed).permutation(len(subjects))[:n]
    return [subjects[i] for i in sorted(chosen)]


def summarise(per_subject: dict[str, tuple[str, dict]]) -> dict:
    """Average per-subject metrics into per-class, mean and per-site figures."""
    def agg(items: list[dict]) -> dict:
        out = {}
        for metric in items[0]:
            if metric == "empty_pred":  # a count of volumes, not a mean
                out[metric] = {c: sum(m[metric][c] for m in items) for c in items[0][metric]}
                out["n_empty_pred"] = sum(out[metric].values())
                continue
            per_class = {c: nanmean(m[metric][c] for m in items) for c in items[0][metric]}
            out[metric] = per_class
            out[f"mean_{metric}"] = nanmean(per_class.values())
        out["n_subjects"] = len(items)
        return out

    if not per_subject:
        return {}
    result = agg([m for _, m in per_subject.values()])
    sites = sorted({site for site, _ in per_subject.values()})
    result["per_site"] = {
        site: agg([m for st, m in per_subject.values() if st == site]) for site in sites
    }
    result["per_subject"] = {sid: m for sid, (_, m) in per_subject.items()}
    return result
