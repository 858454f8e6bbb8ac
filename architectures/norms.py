"""Normalisation choices that keep models DP-compatible (no BatchNorm)."""

from __future__ import annotations

from torch import nn


def group_count(channels: int, preferred: int = 8) -> int:
    """Largest group count <= ``preferred`` dividing ``channels`` with >= 2 channels per group.

    Opacus' ``ModuleValidator.fix`` uses gcd(32, C) groups, which for small C gives one channel
    per group (InstanceNorm in disguise); we pick the count explicitly instead.
    """
    for g in range(min(preferred, channels // 2), 0, -1):
        if channels % g == 0:
            return g
    return 1


def group_norm(channels: int, preferred_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm over ``channels`` with an explicit group count (see :func:`group_count`)."""
    return nn.GroupNorm(group_count(channels, preferred_groups), channels)


def convert_norms(model: nn.Module, preferred_groups: int = 8) -> nn.Module:
    """Replace every BatchNorm and InstanceNorm in ``model`` by GroupNorm, in place.

    Group counts come from :func:`group_count` (never one channel per group, unlike
    ``opacus.validators.ModuleValidator.fix``). Returns ``model`` for chaining.
    """
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, norm_types):
                new = group_norm(child.num_features, preferred_groups)
                ref = next(iter(child.parameters()), None)
                if ref is not None:
                    new = new.to(dtype=ref.dtype, device=ref.device)
                setattr(parent, child_name, new)
    return model
