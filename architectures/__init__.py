"""Model registry (``privseg.architectures``): ``build(name, spatial_dims, in_ch, n_cls, **knobs)``.

Importing this package imports every builder module, which registers itself.
"""

from privseg.architectures import (  # noqa: F401  (importing registers the builders)
    resunet,
    smoothnet,
    smp_unet,
    unet,
    unetr,
)
from privseg.architectures.registry import (
    ModelEntry,
    build,
    get_entry,
    list_models,
    register_model,
    validate_knobs,
)

__all__ = ["ModelEntry", "build", "get_entry", "list_models", "register_model", "validate_knobs"]
