"""2D volume prediction as batched slices equals the former one-slice-deep sliding window."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference

from privseg.architectures import build
from privseg.datasets.base import Subject
from privseg.datasets.phantom import make_subject
from privseg.training.evaluate import (
    inference_forward,
    predict_volume,
    validation_subset,
    volume_logits,
    volume_metrics,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE, CLASSES = 24, 8


def _former_logits(model, image: torch.Tensor, roi) -> torch.Tensor:
    """The previous implementation: a 3D sliding window one slice deep, constant weights."""
    def predictor(x):
        return model(x[:, :, 0])[:, :, None]
    return torch.as_tensor(sliding_window_inference(image[None], roi, 32, predictor,
                                                    overlap=0.0, mode="constant"))[0]


@pytest.mark.parametrize("roi", [(1, SIZE, SIZE), (1, 16, 16)], ids=["whole", "tiled"])
def test_batched_slices_equal_one_slice_deep_window(roi):
    """Whole slices (one forward per 32 slices) and tiles of slices (non-dividing 16² on
    24², so tiles overlap) give the former path's logits (to the float rounding of the
    channels-last layout), hence the same labels and metrics."""
    image, label, _ = make_subject(0, SIZE, "site-A", 0)
    subject = Subject("s0", "site-A", image, label)
    torch.manual_seed(0)
    model = build("unet", 2, 1, CLASSES, base_channels=4, depth=2).eval()
    with torch.no_grad():
        former = _former_logits(model, torch.as_tensor(image), roi)
        got = volume_logits(model, subject, 2, roi, torch.device("cpu"))
    assert got.shape == (CLASSES, SIZE, SIZE, SIZE)
    torch.testing.assert_close(got, former, rtol=0, atol=1e-5)
    pred = predict_volume(model, subject, 2, roi, torch.device("cpu"))
    assert len(pred.unique()) > 1  # the comparison of labels is not trivial
    assert torch.equal(pred, former.argmax(0))
    names = [f"c{i}" for i in range(CLASSES)]
    assert volume_metrics(pred, label, names) == volume_metrics(former.argmax(0), label, names)


def test_inference_forward_channels_last_leaves_the_model_alone():
    """On a CPU in 2D the forward runs channels-last (its output is in that layout) and gives
    the model's logits to float rounding, without touching the model's parameters (same
    storage, default layout: the optimizer and the per-sample hooks still hold them)."""
    torch.manual_seed(0)
    model = build("unet", 2, 1, CLASSES, base_channels=4, depth=2).eval()
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    x = torch.randn(5, 1, SIZE, SIZE)
    forward = inference_forward(model, 2, torch.device("cpu"))
    with torch.no_grad():
        got, want = forward(x), model(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert not want.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for n, p in model.named_parameters():
        assert p.data_ptr() == before[n][0] and p.is_contiguous()
        assert torch.equal(p, before[n][1])


@pytest.mark.parametrize("dims", [2, 3])
def test_evaluate_on_several_threads_equals_one(dims):
    """Volumes predicted on three threads (each its own frozen copy) give the summary of one
    thread's, subject by subject (4 volumes, so threads finish out of turn)."""
    from privseg.training.evaluate import evaluate

    torch.manual_seed(0)
    model = build("unet", dims, 1, CLASSES, base_channels=4, depth=2)
    subjects = []
    for i in range(4):
        image, label, _ = make_subject(i, 16, f"site-{'AB'[i % 2]}", 0)
        subjects.append(Subject(f"s{i}", f"site-{'AB'[i % 2]}", image, label))
    names = [f"c{i}" for i in range(CLASSES)]
    roi = (1, 16, 16) if dims == 2 else (8, 8, 8)
    one = evaluate(model, subjects, dims, roi, names, torch.device("cpu"), threads=1)
    three = evaluate(model, subjects, dims, roi, names, torch.device("cpu"), threads=3)
    assert list(three["per_subject"]) == [s.subject_id for s in subjects]
    assert three == one
    per = [one["per_subject"][s.subject_id]["dice"] for s in subjects]
    assert len({str(d) for d in per}) == len(per)  # the volumes differ: a swap would show


def test_validation_subset_is_fixed_by_the_seed_and_in_order():
    """n subjects drawn once from the seed, in their order; all of them without n."""
    subjects = [Subject(f"s{i}", "site-A", None, None) for i in range(10)]
    a = validation_subset(subjects, 4, seed=3)
    assert len(a) == 4 and a == validation_subset(subjects, 4, seed=3)
    assert [s.subject_id for s in a] == sorted((s.subject_id for s in a),
                                               key=lambda i: int(i[1:]))
    assert {s.subject_id for s in validation_subset(subjects, 4, seed=4)} != {
        s.subject_id for s in a}
    assert validation_subset(subjects, None, 3) == subjects
    assert validation_subset(subjects, 20, 3) == subjects


def _former_hd95(pred, target, n_classes):
    """The previous HD95: MONAI on every class, then the empty-mask convention."""
    import math
    import warnings

    from monai.metrics import compute_hausdorff_distance

    from privseg.training.evaluate import _onehot, worst_case_distance

    p, t = _onehot(pred, n_classes), _onehot(torch.as_tensor(target).long(), n_classes)
    with warnings.catch_warnings():  # MONAI warns on the empty masks this test makes
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, t, include_background=False, percentile=95)[0]
    worst = worst_case_distance(tuple(t.shape[2:]))
    out = []
    for c, h in enumerate(hd, start=1):
        present, empty = bool(t[0, c].any()), not bool(p[0, c].any())
        out.append(worst if present and empty else (float(h) if present else math.nan))
    return out


def test_hd95_of_classes_in_both_masks_only_changes_nothing():
    """HD95 asked of MONAI only where reference and prediction both hold the class gives
    the former values exactly, with classes missed by the prediction (worst case), absent
    from the reference (NaN, though predicted) and absent from both among them."""
    import math

    _, label, _ = make_subject(0, SIZE, "site-A", 0)
    target = torch.as_tensor(label).long()
    pred = target.clone()
    pred[2:10] = torch.roll(target[2:10], shifts=2, dims=1)  # imperfect prediction
    pred[pred == 3] = 0  # class 3 missed by the prediction
    target_t = target.clone()
    target_t[target_t == 5] = 0  # class 5 absent from the reference, still predicted
    assert bool((pred == 5).any()) and bool((target_t == 3).any())
    names = [f"c{i}" for i in range(CLASSES)]
    got = volume_metrics(pred, target_t.numpy(), names)
    want = _former_hd95(pred, target_t.numpy(), CLASSES)
    for name, w in zip(names[1:], want, strict=True):
        g = got["hd95"][name]
        assert (math.isnan(g) and math.isnan(w)) or g == w, name
    assert got["empty_pred"]["c3"] == 1 and math.isnan(got["hd95"]["c5"])
    assert sum(math.isfinite(v) for v in want) >= 4  # MONAI's values are compared too


def test_metrics_in_a_worker_thread_equal_sequential_ones():
    """evaluate() computes each volume's metrics in a background thread while the next volume
    is predicted: the summary must equal the one from predicting and scoring in turn, and
    the metrics must be computed once per volume, on that volume's own prediction."""
    from privseg.training.evaluate import evaluate, summarise

    torch.manual_seed(0)
    model = build("unet", 2, 1, CLASSES, base_channels=4, depth=2)
    subjects = []
    for i in range(4):
        image, label, _ = make_subject(i, SIZE, f"site-{'AB'[i % 2]}", 0)
        subjects.append(Subject(f"s{i}", f"site-{'AB'[i % 2]}", image, label))
    names = [f"c{i}" for i in range(CLASSES)]
    roi = (1, SIZE, SIZE)
    timing: dict[str, float] = {}
    got = evaluate(model, subjects, 2, roi, names, torch.device("cpu"), timing=timing)
    want = summarise({s.subject_id: (s.site, volume_metrics(
        predict_volume(model, s, 2, roi, torch.device("cpu")), s.label, names))
        for s in subjects})
    assert got == want
    assert timing["predict_s"] > 0 and timing["metrics_s"] > 0
    assert model.training  # restored


def test_a_failing_volume_stops_the_evaluation_without_predicting_the_rest(monkeypatch):
    """An error (or Ctrl-C) while volumes are predicted propagates at once: the volumes not yet
    started are dropped rather than predicted first, and the model's mode is restored."""
    import time

    import privseg.training.evaluate as ev

    torch.manual_seed(0)
    model = build("unet", 2, 1, CLASSES, base_channels=4, depth=2)
    image, label, _ = make_subject(0, 16, "site-A", 0)
    subjects = [Subject(f"s{i}", "site-A", image, label) for i in range(10)]
    started = []
    real = ev.predict_volume

    def predict_volume(model, subject, *args, **kwargs):
        started.append(subject.subject_id)
        if subject.subject_id == "s1":
            raise RuntimeError("corrupt volume s1")
        if subject.subject_id != "s0":
            time.sleep(0.3)
        return real(model, subject, *args, **kwargs)

    monkeypatch.setattr(ev, "predict_volume", predict_volume)
    names = [f"c{i}" for i in range(CLASSES)]
    with pytest.raises(RuntimeError, match="corrupt volume s1"):
        ev.evaluate(model, subjects, 2, (1, 16, 16), names, torch.device("cpu"), threads=1)
    assert len(started) <= 4, started  # s0, s1, and at most the one or two begun meanwhile
    assert model.training
