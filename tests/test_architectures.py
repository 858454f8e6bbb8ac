"""Registry invariant 1: every model's per-sample gradients match one-at-a-time gradients.

Parametrised over every registry entry (width and depth variants included) × supported spatial
dims × the Opacus grad-sample modes the entry claims, in float64 on tiny inputs. Builders get
small knobs here (``SMALL``) so the suite stays fast on CPU; each variant keeps its own
default (width, depth), which is what distinguishes it.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from privseg.architectures import build, get_entry, list_models
from privseg.architectures.dp_check import assert_dp_compatible, dp_problems
from privseg.dp.exactness import MODES, clipped_sum_error, per_sample_grad_error, reference_grads

#: small knobs per builder (by function name), applied to every entry using that builder
SMALL = {
    "unet": {"base_channels": 4},
    "resunet_scalenorm": {"base_channels": 4},
    "smoothnet": {"growth": 2, "stem_channels": 4, "layers_per_block": 2, "depth": 3},
    # patch 8: three decoder stages, two ViT taps, one with a residual up-block
    "unetr": {"patch_size": 8, "hidden_size": 16, "layers": 2, "heads": 2, "feature_size": 4},
    "smp_unet": {"decoder_channels": (16, 8, 8, 8, 8)},
}
BATCH, CLASSES = 3, 3
TOL = 1e-4  # float64


def _side(name: str, dims: int) -> int:
    if dims == 2:
        return 32
    depth = get_entry(name).knobs().get("depth", 4)
    return max(8, 2 ** (depth - 1)) if name != "unetr" else 16


def _cases() -> list[tuple[str, int, bool]]:
    cases = []
    for name in list_models():
        entry = get_entry(name)
        for dims in entry.spatial_dims:
            cases.append((name, dims, False))
            if "weight_standardization" in entry.knobs() and not entry.defaults:
                cases.append((name, dims, True))  # base entries only: WS on
    return cases


CASES = _cases()


def _case_id(case: tuple[str, int, bool]) -> str:
    name, dims, ws = case
    return f"{name}-{dims}d" + ("-ws" if ws else "")


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _setup(name: str, dims: int, ws: bool):
    """Model (float64), batch and one-at-a-time reference gradients, built once per case."""
    entry = get_entry(name)
    knobs = dict(SMALL[entry.builder.__name__])
    if ws:
        knobs["weight_standardization"] = True
    side = _side(name, dims)
    if "img_size" in entry.knobs():
        knobs["img_size"] = side
    torch.manual_seed(0)
    model = build(name, dims, 1, CLASSES, **knobs).double()
    x = torch.randn(BATCH, 1, *(side,) * dims, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (BATCH, *(side,) * dims))
    return model, x, y, reference_grads(model, x, y)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_dp_compatible(case):
    model, *_ = _setup(*case)
    assert_dp_compatible(model)


MODE_CASES = [(c, m) for c in CASES for m in get_entry(c[0]).dp_modes]


@pytest.mark.parametrize(("case", "mode"), MODE_CASES,
                         ids=[f"{_case_id(c)}-{m}" for c, m in MODE_CASES])
def test_per_sample_grads_exact(case, mode):
    model, x, y, ref = _setup(*case)
    err = per_sample_grad_error(model, x, y, mode, reference=ref)
    assert err < TOL, f"{_case_id(case)} {mode}: relative error {err:.2e}"


TORCHFUNC_CASES = [c for c in CASES if "functorch" in get_entry(c[0]).dp_modes]


@pytest.mark.parametrize("case", TORCHFUNC_CASES, ids=_case_id)
def test_torchfunc_peer_per_sample_grads_exact(case):
    """The bench's plain ``torch.func`` peer (privseg.dp.functional_step) is exact too, for
    every entry that claims functorch mode (the same vmap-able forward)."""
    model, x, y, ref = _setup(*case)
    err = per_sample_grad_error(model, x, y, "torchfunc", reference=ref)
    assert err < TOL, f"{_case_id(case)} torchfunc: relative error {err:.2e}"


HOOKS_CASES = [c for c in CASES if "hooks" in get_entry(c[0]).dp_modes]


@pytest.mark.parametrize("case", HOOKS_CASES, ids=_case_id)
def test_default_path_clipped_sum_exact(case):
    """The default per-sample path (hooks, book-keeping conv sampler, the flat DP optimizer's
    clipping pass) gives the clipped sum of the exact per-sample gradients, for every entry
    that claims hooks mode; book-kept weights are never instantiated, so this is their check."""
    model, x, y, ref = _setup(*case)
    err, _ = clipped_sum_error(model, x, y, reference=ref)
    assert err < TOL, f"{_case_id(case)} clipped sum: relative error {err:.2e}"


def test_default_path_keeps_some_unet_weights_unmaterialised():
    """The check above covers the book-keeping branch: the U-Net's bottleneck is book-kept."""
    _, kept = clipped_sum_error(*_setup("unet", 2, False)[:3])
    assert kept > 0


def test_claimed_modes_are_known():
    for name in list_models():
        assert set(get_entry(name).dp_modes) <= set(MODES), name
        assert get_entry(name).dp_modes, name


def test_every_entry_is_tested():
    assert {c[0] for c in CASES} == set(list_models())
    assert {get_entry(n).builder.__name__ for n in list_models()} <= set(SMALL)


# --- the checker itself is not vacuous -------------------------------------------------------


class _BatchMixer(nn.Module):
    """Subtracts the batch mean: per-sample gradients depend on the other samples."""

    def forward(self, x):
        return x - 0.5 * x.mean(0, keepdim=True)


def test_checker_flags_sample_mixing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _BatchMixer(), nn.Conv2d(4, 3, 1))
    model = model.double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 8, 8))
    assert per_sample_grad_error(model, x, y, "hooks") > 1e-2


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.conv(x)


def test_checker_flags_unused_parameter():
    model = _WithUnused().double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="unused.weight receives no gradient"):
        reference_grads(model, x, torch.zeros(2, 4, 4, dtype=torch.long))


def test_inplace_residual_is_exact_in_hooks_and_caught_under_full_backward_hooks():
    """smp's torchvision blocks do ``out += identity`` on a norm layer's output. privseg's
    hooks take a layer's output gradient from a hook on the output tensor, which receives the
    gradient of the value before the in-place add (the right one): its per-sample gradients
    match one-at-a-time autograd. Opacus' module full backward hooks (ghost mode) refuse the
    in-place add, and the checker reports that rather than training wrongly."""
    import segmentation_models_pytorch as smp

    from privseg.architectures.conversion import make_dp_compatible

    torch.manual_seed(0)
    model = make_dp_compatible(smp.Unet("resnet18", encoder_weights=None, in_channels=1,
                                        classes=2, decoder_channels=(16, 8, 8, 8, 8)))
    x, y = torch.randn(2, 1, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long)
    assert per_sample_grad_error(model, x, y, "hooks") < 1e-4
    with pytest.raises(RuntimeError, match="inplace"):
        per_sample_grad_error(model, x, y, "ghost")


def test_dp_problems_lists_each_fault():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                          nn.GroupNorm(4, 4))
    text = "\n".join(dp_problems(model))
    assert "BatchNorm2d" in text and "inplace=True" in text and "channel per group" in text
    with pytest.raises(AssertionError):
        assert_dp_compatible(model)


# --- registry behaviour ----------------------------------------------------------------------


def test_build_rejects_unknown_knob_naming_allowed():
    with pytest.raises(ValueError, match="widht") as exc:
        build("unet", 2, 1, 2, widht=2.0)
    assert "width" in str(exc.value) and "base_channels" in str(exc.value)


def test_build_rejects_unsupported_dims():
    with pytest.raises(ValueError, match="spatial_dims"):
        build("smp-unet", 3, 1, 2)
    with pytest.raises(ValueError, match="spatial_dims"):
        build("unet", 1, 1, 2)


def test_unknown_model_lists_registered():
    with pytest.raises(KeyError, match="unetr"):
        build("no-such-net", 2, 1, 2)


def _params(name: str, **knobs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build(name, 2, 1, 2, **knobs).parameters())


@pytest.mark.parametrize("family", ["unet", "smoothnet"])
def test_width_variants_scale_parameters(family):
    counts = [_params(f"{family}-narrow"), _params(family), _params(f"{family}-wide"),
              _params(f"{family}-xwide")]
    for smaller, larger in zip(counts, counts[1:], strict=False):
        assert 3.0 < larger / smaller < 4.5, counts  # conv params grow ~ width²


def test_depth_variants_scale_parameters():
    assert _params("unet-shallow") < _params("unet") < _params("unet-deep")


def test_variant_defaults_reach_builder():
    assert get_entry("unet-xwide").knobs()["width"] == 4.0
    assert get_entry("smoothnet-narrow").knobs()["width"] == 0.5
    assert get_entry("unet-deep").knobs()["depth"] == 5


# --- smp conversion --------------------------------------------------------------------------


def test_smp_unet_converted_has_no_batchnorm_no_inplace():
    from torchvision.models.resnet import BasicBlock

    from privseg.architectures.smp_unet import DPBasicBlock

    model = build("smp-unet", 2, 1, 2)
    mods = list(model.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods)
    assert not any(getattr(m, "inplace", False) for m in mods)
    blocks = [m for m in mods if isinstance(m, BasicBlock)]
    assert blocks and all(type(m) is DPBasicBlock for m in blocks)
    assert all(m.num_channels // m.num_groups >= 2 for m in mods if isinstance(m, nn.GroupNorm))


def test_smp_unet_loads_encoder_weights_from_local_file(tmp_path):
    torch.manual_seed(1)
    source = resnet18(weights=None)  # torchvision layout: BatchNorm, fc, 3 input channels
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    plain = build("smp-unet", 2, 1, 2)
    loaded = build("smp-unet", 2, 1, 2, encoder_weights_path=str(path))
    w = source.layer1[0].conv1.weight
    assert torch.equal(loaded.encoder.layer1[0].conv1.weight, w)
    assert not torch.equal(plain.encoder.layer1[0].conv1.weight, w)
    # BatchNorm affine → GroupNorm affine; RGB first conv summed to one channel
    assert torch.equal(loaded.encoder.layer1[0].bn1.weight, source.layer1[0].bn1.weight)
    assert torch.allclose(loaded.encoder.conv1.weight, source.conv1.weight.sum(1, keepdim=True))


def test_smp_unet_rejects_mismatched_weights(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(3, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="conv1.weight"):
        build("smp-unet", 2, 1, 2, encoder_weights_path=str(path))


def test_smp_unet_resnet34_builds_and_unknown_encoder_rejected():
    with torch.device("meta"):
        assert _params("smp-unet", encoder_name="resnet34") > _params("smp-unet")
    with pytest.raises(ValueError, match="resnet18"):
        build("smp-unet", 2, 1, 2, encoder_name="vgg11")


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus' hooks, non-leaf
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_frozen_copy_for_evaluation_is_hookless_and_exact(case):
    """Evaluation predicts with a frozen copy of the trained model, one per thread
    (privseg.training.evaluate): for every entry, a copy of the model wrapped for per-sample
    gradients, after a backward pass, has no hooks, no gradients, its own storage and the
    model's logits bitwise (2D on a CPU: channels-last, to float rounding), and does not
    follow the model's later steps."""
    import copy

    from privseg.dp.grad_sample_module import LeanGradSampleModule
    from privseg.training.evaluate import frozen_copy, inference_forward

    model, x, y, _ = _setup(*case)
    wrapped = LeanGradSampleModule(copy.deepcopy(model))  # the cached model stays unhooked
    nn.functional.cross_entropy(wrapped(x), y).backward()
    frozen = frozen_copy(wrapped)
    assert not frozen.training
    for m in frozen.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), m
    stored = {p.data_ptr() for p in wrapped.parameters()}
    assert all(not p.requires_grad and p.grad is None and p.data_ptr() not in stored
               for p in frozen.parameters())
    wrapped.eval()
    with torch.no_grad():
        want = wrapped._module(x)
        assert torch.equal(frozen(x), want)
        got = inference_forward(wrapped, case[1], torch.device("cpu"))(x)
        for p in wrapped.parameters():
            p.add_(1.0)
        assert torch.equal(frozen(x), want)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
