"""privseg.dp.grad_samplers: exact per-sample conv gradients and norms, selected per wrapped model.

Exactness (invariant 1) is checked through Opacus' own hooks (``per_sample_grad_error`` wraps
with ``GradSampleModule`` / ``GradSampleModuleFastGradientClipping``) with the grouped samplers
installed, against one-at-a-time autograd, in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from torch import nn

import privseg.dp.grad_samplers as gsamp
from privseg.architectures import build
from privseg.bench import _config, _FixedBatch
from privseg.config import parse_config
from privseg.dp.exactness import per_sample_grad_error, reference_grads
from privseg.dp.grad_samplers import (
    active_conv_samplers,
    bookkeeping_conv_grad_sample,
    conv_samplers,
    ghost_conv_weight_norm,
    grouped_conv_grad_sample,
    mixed_conv_norm_sample,
    prepare_module,
)
from privseg.training.step import prepare_training

TOL = 1e-4  # float64
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

# (stride, padding, dilation, groups, bias, padding_mode)
LAYERS = [
    (1, 1, 1, 1, True, "zeros"),
    (2, 0, 1, 1, False, "zeros"),
    (2, 2, 2, 1, True, "zeros"),
    (3, 1, 1, 2, True, "zeros"),
    (1, "same", 2, 1, False, "zeros"),  # asymmetric 'same' padding (even kernel)
    (1, 1, 1, 1, True, "reflect"),
]
CASES = [(d, c) for d in (2, 3) for c in LAYERS] + [(1, LAYERS[2])]


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer_model(dims, case, side=7):
    stride, padding, dilation, groups, bias, mode = case
    torch.manual_seed(0)
    kernel = (3, 4, 2)[:dims]
    model = nn.Sequential(CONV[dims](4, 6, kernel, stride=stride, padding=padding,
                                     dilation=dilation, groups=groups, bias=bias,
                                     padding_mode=mode)).double()
    x = torch.randn(3, 4, *(side,) * dims, dtype=torch.float64)
    out_shape = model(x).shape
    y = torch.randint(0, 6, (3, *out_shape[2:]))
    return model, x, y


def _ids(c):
    d, (s, p, dl, g, b, m) = c
    return f"{d}d-s{s}-p{p}-d{dl}-g{g}-{'b' if b else 'nob'}-{m}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_conv_per_sample_grads_and_norms_exact(case, mode):
    model, x, y = _layer_model(*case)
    with conv_samplers("grouped"):
        err = per_sample_grad_error(model, x, y, mode)
    assert err < TOL, f"{_ids(case)} {mode}: relative error {err:.2e}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_ghost_norm_branch_exact(case):
    """The ghost (Gram-matrix) branch alone, on every layer it may be chosen for."""
    dims, (_, _, _, groups, _, _) = case
    if groups != 1:
        pytest.skip("grouped layers always instantiate")
    model, x, y = _layer_model(*case)
    layer = model[0]
    g = torch.randn_like(layer(x))
    ref = torch.stack([torch.autograd.grad((layer(x[i:i + 1]) * g[i:i + 1]).sum(),
                                           layer.weight)[0].flatten() for i in range(len(x))])
    got = ghost_conv_weight_norm(layer, x, g)
    assert torch.allclose(got, ref.norm(dim=1), rtol=1e-10)
    inst = grouped_conv_grad_sample(layer, [x], g)[layer.weight].flatten(1)
    assert torch.allclose(inst, ref, rtol=1e-10, atol=1e-12)


def test_mixed_norm_picks_ghost_only_where_cheaper():
    small = nn.Conv2d(64, 64, 3, padding=1)  # T = 16: ghost; T = 4096: instantiation
    assert gsamp.use_ghost_norm(small, 16) and not gsamp.use_ghost_norm(small, 4096)
    assert not gsamp.use_ghost_norm(nn.Conv2d(64, 64, 3, groups=2), 1)
    head = nn.Conv2d(16, 3, 1)  # a 1×1 head: p·d tiny, instantiation from T = 3 on
    assert not gsamp.use_ghost_norm(head, 3)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_registry_unet_exact_with_grouped_samplers(dims, mode, monkeypatch):
    side = 32 if dims == 2 else 8
    torch.manual_seed(0)
    model = build("unet", dims, 1, 3, base_channels=4).double()
    x = torch.randn(3, 1, *(side,) * dims, dtype=torch.float64)
    y = torch.randint(0, 3, (3, *(side,) * dims))
    branches, grouped_calls = [], []
    choose, grouped = gsamp.use_ghost_norm, gsamp.per_sample_conv_weight_grad
    monkeypatch.setattr(gsamp, "use_ghost_norm",
                        lambda layer, t: branches.append(choose(layer, t)) or branches[-1])
    monkeypatch.setattr(gsamp, "per_sample_conv_weight_grad",
                        lambda *a: grouped_calls.append(1) or grouped(*a))
    with conv_samplers("grouped"):
        err = per_sample_grad_error(model, x, y, mode, reference=reference_grads(model, x, y))
    assert err < TOL, f"unet {dims}d {mode}: relative error {err:.2e}"
    n_conv = sum(isinstance(m, nn.Conv2d | nn.Conv3d) for m in model.modules())
    assert len(grouped_calls) + branches.count(True) == n_conv  # every conv went through ours
    if mode == "ghost":  # both branches of the mixed norm ran (bottleneck ghost, rest not)
        assert True in branches and False in branches, branches


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_selection_is_pinned_per_model_and_registries_restored():
    before = (dict(GradSampleHooks.GRAD_SAMPLERS),
              dict(GradSampleHooksFastGradientClipping.NORM_SAMPLERS))
    models = {k: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
              for k in ("grouped", "opacus")}
    wrapped = {k: prepare_module(m, "ghost", k, max_grad_norm=1.0, loss_reduction="sum")
               for k, m in models.items()}
    hooks = prepare_module(nn.Sequential(nn.Conv3d(1, 1, 1)), "hooks", "grouped")
    assert (dict(GradSampleHooks.GRAD_SAMPLERS),
            dict(GradSampleHooksFastGradientClipping.NORM_SAMPLERS)) == before
    assert GradSampleHooks.GRAD_SAMPLERS[nn.Conv2d] is compute_conv_grad_sample
    g, o = wrapped["grouped"], wrapped["opacus"]
    assert g.GRAD_SAMPLERS[nn.Conv2d] is grouped_conv_grad_sample
    assert g.NORM_SAMPLERS[nn.Conv2d] is mixed_conv_norm_sample
    assert o.GRAD_SAMPLERS[nn.Conv2d] is compute_conv_grad_sample
    assert nn.Conv2d not in o.NORM_SAMPLERS
    assert nn.Linear in o.NORM_SAMPLERS  # Opacus' other entries are kept
    assert hooks.GRAD_SAMPLERS[nn.Conv3d] is grouped_conv_grad_sample
    assert active_conv_samplers(o)["Conv2d"] == "compute_conv_grad_sample/None"

    # Opacus reads the pinned (instance) registry at backward time, after the context is gone.
    calls = []
    for k, m in wrapped.items():
        fn = m.NORM_SAMPLERS.get(nn.Conv2d) or m.GRAD_SAMPLERS[nn.Conv2d]
        reg = m.NORM_SAMPLERS if nn.Conv2d in m.NORM_SAMPLERS else m.GRAD_SAMPLERS
        reg[nn.Conv2d] = lambda *a, fn=fn, k=k: calls.append(k) or fn(*a)
        m(torch.randn(4, 2, 6, 6)).sum().backward()
    assert calls == ["grouped", "opacus"]


def test_unknown_sampler_is_an_error():
    with pytest.raises(ValueError, match="unknown conv grad sampler"), conv_samplers("fast"):
        pass


def test_engine_uses_configured_sampler_and_run_id_ignores_it():
    cfg = _config("hooks", 2, "cpu", False)
    assert cfg.privacy.conv_grad_sampler == "bookkeeping"
    opa, grp = (cfg.model_copy(update={"privacy": cfg.privacy.model_copy(
        update={"conv_grad_sampler": kind})}) for kind in ("opacus", "grouped"))
    assert opa.run_id() == cfg.run_id() == grp.run_id()
    assert "conv_grad_sampler" not in cfg.model_dump()["privacy"]
    with pytest.raises(ValueError, match="conv_grad_sampler"):
        parse_config({"privacy": {"conv_grad_sampler": "unfold"}})
    data = _FixedBatch(2, (8, 8), 2)
    for c, want in ((cfg, bookkeeping_conv_grad_sample), (grp, grouped_conv_grad_sample),
                    (opa, compute_conv_grad_sample)):
        state = prepare_training(c, build("unet", 2, 1, 2, base_channels=4, depth=2), data,
                                 torch.device("cpu"))
        assert state.model.GRAD_SAMPLERS[nn.Conv2d] is want


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_few_channel_conv_per_sample_grads_exact(case):
    """A layer with one input channel (a U-Net's first), whose per-sample weight gradients
    come from its input patches (:func:`privseg.dp.conv_math.use_patch_product`): each is
    that sample's own, whatever the stride, padding (string, reflect), dilation."""
    from privseg.dp.conv_math import per_sample_conv_weight_grad, use_patch_product

    dims, (stride, padding, dilation, groups, bias, mode) = case
    torch.manual_seed(0)
    layer = CONV[dims](groups, 6, (3, 4, 2)[:dims], stride=stride, padding=padding,
                       dilation=dilation, groups=groups, bias=bias, padding_mode=mode).double()
    x = torch.randn(3, groups, *(7,) * dims, dtype=torch.float64)
    g = torch.randn_like(layer(x))
    assert use_patch_product(layer, x) == (groups == 1)
    ours = per_sample_conv_weight_grad(layer, x, g)
    for i in range(len(x)):
        layer.zero_grad()
        (layer(x[i:i + 1]) * g[i:i + 1]).sum().backward()
        torch.testing.assert_close(ours[i], layer.weight.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 0), (1, 1), (1, "same")])
def test_pointwise_conv_per_sample_grads_exact(dims, stride, padding):
    """1×1 convolutions (a U-Net head): each sample's weight gradient, whether by the
    batched matrix product (stride 1, no padding) or the grouped call (any other), is that
    sample's own autograd gradient."""
    from privseg.dp.conv_math import is_pointwise, padded_input, per_sample_conv_weight_grad

    torch.manual_seed(0)
    layer = CONV[dims](5, 3, 1, stride=stride, padding=padding).double()
    x = torch.randn(4, 5, *(6,) * dims, dtype=torch.float64)
    out = layer(x)
    g = torch.randn_like(out)
    assert is_pointwise(layer, padded_input(layer, x)[1]) == (stride == 1 and padding != 1)
    ours = per_sample_conv_weight_grad(layer, x, g)
    for i in range(len(x)):
        layer.zero_grad()
        (layer(x[i:i + 1]) * g[i:i + 1]).sum().backward()
        torch.testing.assert_close(ours[i], layer.weight.grad, rtol=1e-10, atol=1e-12)


def test_empty_batch():
    layer = nn.Conv2d(2, 3, 3, bias=True)
    x, g = torch.zeros(0, 2, 5, 5), torch.zeros(0, 3, 3, 3)
    assert all(v.shape == (0,) for v in mixed_conv_norm_sample(layer, [x], g).values())
    assert set(grouped_conv_grad_sample(layer, [x], g)) == {layer.weight, layer.bias}


@pytest.mark.parametrize("shape,groups", [((3, 8, 5, 7), 4), ((2, 6, 3, 4, 5), 3),
                                          ((4, 4, 9), 1)])
def test_group_norm_sampler_equals_opacus(shape, groups):
    """privseg's GroupNorm sampler (no re-normalisation) equals Opacus' own, per sample."""
    torch.manual_seed(0)
    layer = nn.GroupNorm(groups, shape[1]).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    x = 3.0 + 2.0 * torch.randn(shape, dtype=torch.float64)  # a non-zero mean, as after a conv
    g = torch.randn(shape, dtype=torch.float64)
    ours = gsamp.group_norm_grad_sample(layer, [x], g)
    ref = compute_group_norm_grad_sample(layer, [x], g)
    for p in (layer.weight, layer.bias):
        assert ours[p].shape == (shape[0], shape[1])
        torch.testing.assert_close(ours[p], ref[p], rtol=1e-10, atol=1e-12)
    # and each row is the gradient of that sample alone
    for i in range(shape[0]):
        layer.zero_grad()
        (layer(x[i:i + 1]) * g[i:i + 1]).sum().backward()
        torch.testing.assert_close(ours[layer.weight][i], layer.weight.grad, rtol=1e-10,
                                   atol=1e-12)


class _TwiceConv(nn.Module):
    """One conv applied twice in a forward (tied weights): Opacus must sum its two hooks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Conv2d(2, 3, 1)

    def forward(self, x):
        return self.head(self.conv(torch.tanh(self.conv(x))))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("kind", ["unet", "twice"])
def test_lean_module_stores_what_opacus_stores(kind):
    """LeanGradSampleModule's per-sample gradients equal Opacus' GradSampleModule's exactly
    (same samplers), including a parameter used twice in one forward, and each sample's own
    gradient."""
    from opacus.grad_sample import GradSampleModule

    from privseg.dp.exactness import per_sample_loss
    from privseg.dp.grad_sample_module import LeanGradSampleModule

    torch.manual_seed(0)
    model = (build("unet", 2, 2, 3, base_channels=4, depth=2) if kind == "unet"
             else _TwiceConv()).double()
    x = torch.randn(3, 2, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 16, 16))
    got = {}
    with conv_samplers("grouped"):
        for cls in (GradSampleModule, LeanGradSampleModule):
            wrapped = cls(copy.deepcopy(model), batch_first=True, loss_reduction="sum")
            per_sample_loss(wrapped(x), y).sum().backward()
            got[cls] = {n: p.grad_sample for n, p in wrapped._module.named_parameters()}
    ref = reference_grads(model, x, y)
    for n, r in ref.items():
        assert torch.equal(got[LeanGradSampleModule][n], got[GradSampleModule][n]), n
        torch.testing.assert_close(got[LeanGradSampleModule][n], r, rtol=1e-9, atol=1e-12)


def test_store_grad_sample_copies_only_when_needed():
    """No copy of a fresh full-batch result of a once-used parameter; Opacus' buffer for a
    result aliasing the hook's inputs, a partial batch, or a parameter used twice."""
    from privseg.dp.grad_sample_module import store_grad_sample

    def param(uses):
        p = nn.Parameter(torch.zeros(3))
        p._forward_counter = uses
        return p

    backprops = torch.randn(4, 3)
    p, fresh = param(1), torch.randn(4, 3)
    store_grad_sample(p, fresh, 4, [backprops])
    assert p._current_grad_sample is fresh
    p = param(1)
    store_grad_sample(p, backprops, 4, [backprops])  # e.g. a bias sampler returning g itself
    assert p._current_grad_sample is not backprops
    assert p._current_grad_sample.untyped_storage().data_ptr() != \
        backprops.untyped_storage().data_ptr()
    assert torch.equal(p._current_grad_sample, backprops)
    p = param(1)
    store_grad_sample(p, fresh[:2], 4, [backprops])
    assert p._current_grad_sample.shape == (4, 3)
    assert torch.equal(p._current_grad_sample[:2], fresh[:2])
    assert not p._current_grad_sample[2:].any()
    p, other = param(2), torch.randn(4, 3)
    store_grad_sample(p, fresh, 4, [backprops])
    store_grad_sample(p, other, 4, [backprops])
    torch.testing.assert_close(p._current_grad_sample, fresh + other)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_group_moments_both_ways(use_kernel):
    """The GroupNorm sampler's moments (ATen's kernel on CPU, var_mean on CUDA) are each
    sample's and group's mean and 1/sqrt(var + eps)."""
    torch.manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(3, 6, 4, 5, dtype=torch.float64)
    mean, rstd = gsamp.group_moments(x, 3, 1e-5, use_kernel=use_kernel)
    groups = x.reshape(3, 3, -1)
    torch.testing.assert_close(mean, groups.mean(2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rstd, 1 / torch.sqrt(groups.var(2, unbiased=False) + 1e-5),
                               rtol=1e-10, atol=1e-12)


def test_lean_module_hooks_output_tensors_not_modules():
    """The U-Net's conv and GroupNorm layers are hooked on their output tensors: the graph of
    a wrapped forward has no ``BackwardHookFunction`` node (module full backward hooks), yet
    every parameter gets its per-sample gradient."""
    from privseg.dp.grad_sample_module import LeanGradSampleModule

    model = build("unet", 2, 1, 3, base_channels=4, depth=2)
    wrapped = LeanGradSampleModule(model, batch_first=True, loss_reduction="sum")
    out = wrapped(torch.randn(2, 1, 16, 16))
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(f for f, _ in node.next_functions)
    assert not [n for n in seen if "BackwardHook" in type(n).__name__]
    out.sum().backward()
    assert all(p.grad_sample.shape == (2, *p.shape) for p in model.parameters())


class _ConvBackwardMasks:
    """Records ``aten.convolution_backward``'s output mask (input, weight, bias) per call."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        masks = self.masks = []
        dense = self.dense_grads = []  # whether each call's output gradient was contiguous

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten.convolution_backward.default:
                    masks.append((tuple(args[1].shape), tuple(args[-1])))
                    dense.append(args[0].is_contiguous())
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


@pytest.mark.parametrize("sampler", ["grouped", "bookkeeping"])
@pytest.mark.parametrize("dims", [2, 3])
def test_hooks_mode_skips_dense_conv_grads_and_stays_exact(dims, sampler):
    """In hooks mode the conv backward computes neither the summed weight nor the summed bias
    gradient (on CPU a bias gradient costs a whole weight-gradient pass), and the first layer,
    whose input needs no gradient, no conv backward at all; and the per-sample gradients are
    still each sample's own (invariant 1), bias included."""
    from privseg.dp.exactness import per_sample_loss

    side = 32 if dims == 2 else 8
    torch.manual_seed(0)
    model = build("unet", dims, 1, 3, base_channels=4).double()
    for m in model.modules():  # a bias on every conv, so that the bias path is exercised
        if isinstance(m, nn.Conv2d | nn.Conv3d) and m.bias is None:
            m.bias = nn.Parameter(torch.randn(m.out_channels, dtype=torch.float64) * 0.1)
    x = torch.randn(3, 1, *(side,) * dims, dtype=torch.float64)
    y = torch.randint(0, 3, (3, *(side,) * dims))
    ref = reference_grads(model, x, y)
    wrapped = prepare_module(copy.deepcopy(model).train(), grad_sample_mode="hooks",
                             conv_sampler=sampler, batch_first=True, loss_reduction="sum")
    rec = _ConvBackwardMasks()
    loss = per_sample_loss(wrapped(x), y).sum()
    with rec.mode:
        loss.backward()
    dense = [(shape, mask) for shape, mask in rec.masks if shape[0] == x.shape[0]]
    n_conv = sum(isinstance(m, nn.Conv2d | nn.Conv3d) for m in model.modules())
    assert not [shape for shape, mask in dense if shape[1] == 1]  # the first layer's
    rest = [mask for shape, mask in dense if shape[1] != 1]
    assert len(rest) == n_conv - 1
    assert all(mask == (True, False, False) for mask in rest), rest
    # the up-convolutions' output gradients are slices of a concatenation's: made dense
    # once, by the hook, for the sampler and the layer's backward alike
    assert all(rec.dense_grads)
    for name, p in wrapped._module.named_parameters():
        gs = p.grad_sample
        gs = gs.materialize() if hasattr(gs, "materialize") else gs
        torch.testing.assert_close(gs, ref[name], rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("bias", [True, False])
def test_first_layer_without_backward_allows_inplace_ops(bias):
    """A first conv (input needing no gradient) followed by an in-place ReLU: hooks mode
    still wraps and trains it (its output is a tensor of its own, not a view), runs no conv
    backward for it, and its per-sample gradients are each sample's own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=bias), nn.ReLU(inplace=True),
                          nn.Conv2d(4, 2, 3, padding=1)).double()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    wrapped = prepare_module(copy.deepcopy(model).train(), grad_sample_mode="hooks",
                             conv_sampler="grouped", batch_first=True, loss_reduction="sum")
    rec = _ConvBackwardMasks()
    out = wrapped(x)
    with rec.mode:
        (out * out).sum().backward()
    assert [shape for shape, _ in rec.masks if shape == tuple(x.shape)] == []
    first = wrapped._module[0]
    for i in range(len(x)):
        model.zero_grad()
        y = model(x[i:i + 1])
        (y * y).sum().backward()
        torch.testing.assert_close(first.weight.grad_sample[i], model[0].weight.grad)
        if bias:
            torch.testing.assert_close(first.bias.grad_sample[i], model[0].bias.grad)


def test_wrapped_group_norm_gets_the_forwards_moments(monkeypatch):
    """A wrapped GroupNorm hands its sampler the mean and rstd autograd saved in the forward
    (``activations == [x, mean, rstd]``), equal to the moments of its input; the sampler then
    computes none itself, and its gradients are those it computes without them."""
    from privseg.dp.grad_sample_module import LeanGradSampleModule

    torch.manual_seed(0)
    layer = nn.GroupNorm(3, 6).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    x = 2.0 + torch.randn(4, 6, 5, 5, dtype=torch.float64)
    g = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    seen, calls = [], []
    sampler = gsamp.group_norm_grad_sample
    moments = gsamp.group_moments
    monkeypatch.setattr(gsamp, "group_moments", lambda *a, **k: calls.append(1) or moments(*a, **k))

    def spy(layer, activations, backprops):
        seen.append([t.clone() for t in activations])
        return sampler(layer, activations, backprops)

    with conv_samplers("grouped"):
        wrapped = LeanGradSampleModule(nn.Sequential(layer), batch_first=True,
                                       loss_reduction="sum")
    wrapped.GRAD_SAMPLERS = {**wrapped.GRAD_SAMPLERS, nn.GroupNorm: spy}
    (wrapped(x) * g).sum().backward()
    (acts,) = seen
    assert len(acts) == 3 and not calls
    mean, rstd = moments(x, 3, layer.eps, use_kernel=True)
    torch.testing.assert_close(acts[1], mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acts[2], rstd, rtol=1e-10, atol=1e-12)
    own = sampler(layer, [x], g)
    assert calls  # without them, the sampler computes its own
    for p in (layer.weight, layer.bias):
        torch.testing.assert_close(p.grad_sample, own[p], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_group_norm_sampler_with_a_frozen_parameter(frozen):
    """Only the parameters that need a gradient get a per-sample one, equal to Opacus'."""
    torch.manual_seed(0)
    layer = nn.GroupNorm(2, 4).double()
    getattr(layer, frozen).requires_grad_(False)
    x = 1.0 + torch.randn(3, 4, 6, dtype=torch.float64)
    g = torch.randn(3, 4, 6, dtype=torch.float64)
    ours = gsamp.group_norm_grad_sample(layer, [x], g)
    live = layer.bias if frozen == "weight" else layer.weight
    assert set(ours) == {live}
    ref = compute_group_norm_grad_sample(layer, [x], g)
    torch.testing.assert_close(ours[live], ref[live], rtol=1e-10, atol=1e-12)
