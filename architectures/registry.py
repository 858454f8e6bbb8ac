"""Model registry in the spirit of timm's ``register_model`` / ``create_model``.

Every architecture the study compares registers a builder under a name. A builder has the
signature ``builder(spatial_dims, in_channels, num_classes, **knobs) -> nn.Module``; its
keyword-only knobs (with defaults) are the model's configurable options, so a run config can be
validated against them before anything is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """One registry entry: the builder plus what the study needs to know about it."""

    name: str
    builder: Builder
    spatial_dims: tuple[int, ...]
    description: str
    paper: str
    dp_modes: tuple[str, ...]
    defaults: dict = field(default_factory=dict)

    def knobs(self) -> dict[str, object]:
        """Keyword options the builder accepts, with their effective defaults."""
        sig = inspect.signature(self.builder)
        out = {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        out.update(self.defaults)
        return out


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    *,
    spatial_dims: tuple[int, ...] = (2, 3),
    description: str,
    paper: str,
    dp_modes: tuple[str, ...] = ("hooks", "functorch", "ghost"),
    **defaults: object,
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` under ``name``.

    ``defaults`` override the builder's knob defaults, which is how named variants
    (``unet-wide`` = ``unet`` with ``width=2``) are registered without a new function.
    ``dp_modes`` are the Opacus grad-sample modes this entry claims; the registry test checks
    each claimed mode against per-sample gradients computed one sample at a time.
    """

    def wrap(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(
            name, builder, tuple(spatial_dims), description, paper, tuple(dp_modes),
            dict(defaults),
        )
        return builder

    return wrap


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; a KeyError lists the registered names."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}"
        ) from None


def validate_knobs(name: str, knobs: dict) -> None:
    """Raise ValueError naming any knob ``name``'s builder does not accept."""
    allowed = get_entry(name).knobs()
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ValueError(
            f"model {name!r} has no option(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(allowed)) or '(none)'}"
        )


def build(name: str, spatial_dims: int, in_channels: int, num_classes: int, **knobs) -> nn.Module:
    """Build registered model ``name`` for ``spatial_dims``-D inputs (timm's ``create_model``)."""
    entry = get_entry(name)
    if spatial_dims not in entry.spatial_dims:
        raise ValueError(
            f"model {name!r} supports spatial_dims {entry.spatial_dims}, not {spatial_dims}"
        )
    validate_knobs(name, knobs)
    kwargs = {**entry.defaults, **knobs}
    return entry.builder(spatial_dims, in_channels, num_classes, **kwargs)


def _ensure_loaded() -> None:
    # Importing the package registers every builder module.
    import privseg.architectures  # noqa: F401
