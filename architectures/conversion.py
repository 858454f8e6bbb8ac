"""Conversions that make third-party networks DP-compatible (MONAI, segmentation-models-pytorch).

Opacus computes per-sample gradients from activations saved by forward hooks and gradients
captured by backward hooks. Both break on tensors modified in place (``ReLU(inplace=True)``,
``out += identity``): the backward hook then sees a view that was modified in place. Batch
statistics (BatchNorm) mix samples and make per-sample gradients meaningless. The functions
here fix these three things on an already-built model.
"""

from __future__ import annotations

from torch import nn

from privseg.architectures.norms import convert_norms


def remove_inplace(model: nn.Module) -> nn.Module:
    """Set ``inplace=False`` on every submodule that has an ``inplace`` flag (activations,
    dropout). Returns ``model``. In-place *operators* inside ``forward`` (``x += y``) are not
    visible here; see :func:`swap_class` for replacing such forwards."""
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    return model


def swap_class(model: nn.Module, mapping: dict[type, type]) -> nn.Module:
    """Re-class every submodule whose exact type is a key of ``mapping`` to the mapped type.

    The mapped type must be a subclass that only overrides ``forward`` (same attributes and
    parameters), e.g. a residual block whose ``out += identity`` becomes ``out = out + identity``.
    """
    for m in model.modules():
        new_cls = mapping.get(type(m))
        if new_cls is not None:
            if not issubclass(new_cls, type(m)):
                raise TypeError(f"{new_cls.__name__} must subclass {type(m).__name__}")
            m.__class__ = new_cls
    return model


def make_dp_compatible(model: nn.Module, preferred_groups: int = 8,
                       forward_fixes: dict[type, type] | None = None) -> nn.Module:
    """BatchNorm/InstanceNorm → GroupNorm, no in-place flags, in-place forwards replaced."""
    convert_norms(model, preferred_groups)
    remove_inplace(model)
    if forward_fixes:
        swap_class(model, forward_fixes)
    return model
