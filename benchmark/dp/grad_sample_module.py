"""Opacus' hooks-mode ``GradSampleModule`` without its copy of every per-sample gradient.

Opacus' backward hook stores each layer's per-sample gradients through
``create_or_accumulate_grad_sample``, which allocates a zero-filled ``[B, *param.shape]``
buffer and copies the sampler's result into it, so that a parameter used twice in one forward
(tied weights, an RNN cell) can be accumulated in place. For a parameter used once in the
forward and a result covering the whole batch that buffer is pure overhead: a fill and a copy
of every per-sample gradient per step (on CPU ~15 % of a DP U-Net step, through page faults of
the fresh buffers; on GPU two kernels per parameter and twice the per-sample-gradient traffic).
:class:`LeanGradSampleModule` keeps the sampler's own tensor in that case and defers to Opacus
otherwise. Everything else (hooks, samplers, functorch fallback, accumulation checks) is
Opacus' own; the one method overridden is ``capture_backprops_hook``, Opacus' own hook, with
the storing step replaced.
"""

from __future__ import annotations

from functools import partial

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.grad_sample.grad_sample_module import (
    create_or_accumulate_grad_sample,
    promote_current_grad_sample,
)
from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN
from opacus.utils.module_utils import trainable_parameters
from torch import nn

#: layer types (exact, not subclasses) whose forward returns one tensor: their output
#: gradient is taken by a hook on that tensor (see the module doc)
SINGLE_OUTPUT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.Embedding)


def _shares_storage(t: torch.Tensor, others) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(o.untyped_storage().data_ptr() == ptr for o in others)


def store_grad_sample(param: nn.Parameter, grad_sample: torch.Tensor, max_batch_len: int,
                      inputs: list[torch.Tensor]) -> None:
    """Store a layer's per-sample gradient on ``param._current_grad_sample``, without a copy
    where that is safe.

    Safe: the parameter is used once in this forward (``_forward_counter == 1``, so nothing
    will be added to it in place), the result covers the whole batch, and it owns its memory
    (no storage shared with the hook's inputs, which autograd may still use). Otherwise
    Opacus' ``create_or_accumulate_grad_sample`` (zero buffer, copy or in-place sum). A
    book-kept gradient (:class:`privseg.dp.bookkeeping.DeferredConvGrad`) is kept under the same
    conditions, else instantiated first.
    """
    if not param.requires_grad:
        return
    if not isinstance(grad_sample, torch.Tensor):
        # a book-kept gradient (privseg.dp.bookkeeping.DeferredConvGrad): kept as it is where
        # the tensor would be, otherwise instantiated and stored as any other
        if (not hasattr(param, "_current_grad_sample") and param._forward_counter == 1
                and len(grad_sample) == max_batch_len):
            param._current_grad_sample = grad_sample
            return
        grad_sample = grad_sample.materialize()
    if (not hasattr(param, "_current_grad_sample") and param._forward_counter == 1
            and grad_sample.shape[0] == max_batch_len
            and not _shares_storage(grad_sample, inputs)):
        param._current_grad_sample = grad_sample
        return
    create_or_accumulate_grad_sample(param=param, grad_sample=grad_sample,
                                     max_batch_len=max_batch_len)


def dense_layout(t: torch.Tensor) -> torch.memory_format:
    """The memory format ``t`` is dense in: channels-last (2D or 3D) where it is so, else
    the default one."""
    for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if t.dim() == dims and not t.is_contiguous() and t.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def saved_group_moments(output: torch.Tensor) -> list[torch.Tensor]:
    """``[mean, rstd]`` (``[N, G]`` each) that autograd saved for a GroupNorm output's
    backward (ATen's ``native_group_norm``), or ``[]`` where the output did not come from
    that kernel. Handed to the GroupNorm sampler with the layer's input
    (:func:`privseg.dp.grad_samplers.group_norm_grad_sample`), they spare it a pass over
    the input to recompute them."""
    node = output.grad_fn
    if type(node).__name__ != "NativeGroupNormBackward0":
        return []
    return [node._saved_result1, node._saved_result2]


class LeanGradSampleModule(GradSampleModule):
    """Opacus' ``GradSampleModule`` (hooks or functorch mode) storing per-sample gradients
    through :func:`store_grad_sample`."""

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        """Opacus' ``GradSampleModule.add_hooks`` (opacus 1.6), except that each layer in
        :data:`SINGLE_OUTPUT_LAYERS` gets one forward hook that captures its input and hooks
        its output tensor's gradient (:meth:`_capture_and_hook_output`) instead of Opacus'
        forward hook plus module full backward hook. The per-sample gradients are the same
        tensors, computed from the same output gradient."""
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        self._module.autograd_grad_sample_hooks = []
        self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
        backprops = partial(self.capture_backprops_hook, loss_reduction=loss_reduction,
                            batch_first=batch_first)
        for module in self.iterate_submodules(self._module):
            if type(module) in (DPRNN, DPLSTM, DPGRU):  # as Opacus: hooked at their RNNLinear
                continue
            if force_functorch or self._get_module_type(module) not in self.GRAD_SAMPLERS:
                prepare_layer(module, batch_first=batch_first)
            handles = self.autograd_grad_sample_hooks
            if type(module) in SINGLE_OUTPUT_LAYERS:
                handles.append(module.register_forward_hook(
                    partial(self._capture_and_hook_output, backprops=backprops)))
            else:
                handles.append(module.register_forward_hook(self.capture_activations_hook))
                handles.append(module.register_full_backward_hook(backprops))
        self.enable_hooks()

    def _capture_and_hook_output(self, module: nn.Module, forward_input, output: torch.Tensor,
                                 backprops) -> None:
        """Forward hook: Opacus' activation capture, and, where it captured, a hook on
        ``output``'s gradient that runs Opacus' backprop capture with it."""
        if not output.requires_grad:  # no gradient will reach this layer's output
            return
        captured = len(getattr(module, "activations", ()))
        self.capture_activations_hook(module, forward_input, output)
        if len(getattr(module, "activations", ())) > captured:
            if type(module) is nn.GroupNorm:
                module.activations[-1] += saved_group_moments(output)
            layout = dense_layout(output)

            def hook(grad: torch.Tensor) -> torch.Tensor:
                # A gradient that is a slice (the output went into a concatenation, as a
                # U-Net's up-convolutions do) is made dense once, here, and handed on to
                # autograd as well: the sampler's reshape and the layer's own backward
                # kernel would each copy it otherwise.
                grad = grad.contiguous(memory_format=layout)
                backprops(module, None, (grad,))
                return grad
            output.register_hook(hook)

    def capture_backprops_hook(self, module: nn.Module, _forward_input, forward_output,
                               loss_reduction: str, batch_first: bool) -> None:
        """Opacus' ``GradSampleHooks.capture_backprops_hook`` with the storing step replaced
        (opacus 1.6; kept line for line otherwise)."""
        if not self.hooks_enabled:
            return
        backprops = forward_output[0].detach()
        activations, backprops = self.rearrange_grad_samples(
            module=module, backprops=backprops, loss_reduction=loss_reduction,
            batch_first=batch_first)
        if not self.force_functorch and self._get_module_type(module) in self.GRAD_SAMPLERS:
            grad_sampler_fn = self.GRAD_SAMPLERS[self._get_module_type(module)]
        else:
            grad_sampler_fn = ft_compute_per_sample_gradient
        grad_samples = grad_sampler_fn(module, activations, backprops)
        inputs = [backprops, forward_output[0], *activations]
        for param, gs in grad_samples.items():
            store_grad_sample(param, gs, module.max_batch_len, inputs)
        for _, p in trainable_parameters(module):
            p._forward_counter -= 1
            if p._forward_counter == 0:
                promote_current_grad_sample(p)
            if not self.grad_accumulation_allowed:
                if isinstance(p.grad_sample, list) and len(p.grad_sample) > 1:
                    raise ValueError(
                        "Poisson sampling is not compatible with grad accumulation. "
                        "You need to call optimizer.step() after every forward/backward pass "
                        "or consider using BatchMemoryManager")
        if len(module.activations) == 0 and hasattr(module, "max_batch_len"):
            del module.max_batch_len
