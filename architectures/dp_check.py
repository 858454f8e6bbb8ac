"""Checks that a model's module tree is DP-compatible (no batch statistics, no in-place ops).

``assert_dp_compatible`` inspects the module tree. Whether per-sample gradients of a model are
exact is checked by :mod:`privseg.dp.exactness`, next to the DP machinery it exercises; the
registry tests run both for every entry, dimension and claimed mode.
"""

from __future__ import annotations

from opacus.validators import ModuleValidator
from torch import nn


def dp_problems(model: nn.Module) -> list[str]:
    """Everything that makes ``model`` unfit for DP-SGD, one line each (empty: none found)."""
    problems = []
    for name, m in model.named_modules():
        where = name or "<root>"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            problems.append(f"{where}: {type(m).__name__} mixes samples (use GroupNorm)")
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            problems.append(f"{where}: {type(m).__name__} tracks running statistics")
        if getattr(m, "inplace", False) is True:
            problems.append(f"{where}: {type(m).__name__} has inplace=True")
        if isinstance(m, nn.GroupNorm) and m.num_channels // m.num_groups < 2:
            problems.append(f"{where}: GroupNorm has {m.num_channels // m.num_groups} "
                            f"channel per group ({m.num_groups} groups, {m.num_channels} ch)")
    problems += [f"opacus: {e}" for e in ModuleValidator.validate(model, strict=False)]
    return problems


def assert_dp_compatible(model: nn.Module) -> None:
    """Raise AssertionError listing every DP problem of ``model`` (see :func:`dp_problems`)."""
    problems = dp_problems(model)
    if problems:
        raise AssertionError("model is not DP-compatible:\n  " + "\n  ".join(problems))
