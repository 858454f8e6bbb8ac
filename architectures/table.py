"""The ``privseg models`` table: every registry entry with its size, cost and DP modes.

Parameters are ``sum(p.numel())`` of the model built with default knobs. MACs
(multiply–accumulates, one input of the reference size) are counted with forward hooks:
conv (incl. weight-standardised) = output elements × (in_channels / groups) × kernel volume;
transposed conv = input elements × (out_channels / groups) × kernel volume; linear = output
elements × in_features; self-attention = the two token–token matmuls, 2 × N² × hidden per
sample. Norms, activations, pooling, upsampling and additions (all linear in the number of
elements) are not counted. The model is built and run on PyTorch's ``meta`` device, which
propagates shapes without computing anything, so the full 3D reference size costs nothing and
the counts are exact for that size (not extrapolated). Models with an ``img_size`` knob (UNETR:
its position embedding has one entry per patch) are built for the reference size.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import torch
from torch import nn

from privseg.architectures.registry import build, get_entry, list_models

COLUMNS = ["name", "spatial_dims", "params", "gmacs", "input", "dp_modes", "description",
           "paper"]


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply–accumulates of ``model(x)`` in conv, transposed conv, linear and attention."""
    from privseg.architectures.unetr import SelfAttention

    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvNd):
            k = 1
            for s in module.kernel_size:
                k *= s
            if module.transposed:
                total += inputs[0].numel() * module.out_channels // module.groups * k
            else:
                total += output.numel() * module.in_channels // module.groups * k
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, SelfAttention):
            b, n, h = inputs[0].shape
            total += 2 * b * n * n * h

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def _model_for(name: str, dims: int, size: Sequence[int], num_classes: int) -> nn.Module:
    knobs = {}
    if "img_size" in get_entry(name).knobs():
        if len(set(size[2:])) != 1:
            raise ValueError(f"{name} needs a square/cubic reference size, got {tuple(size)}")
        knobs["img_size"] = size[2]
    with torch.device("meta"):
        return build(name, dims, size[1], num_classes, **knobs)


def model_rows(ref_size_2d: Sequence[int] = (1, 1, 256, 256),
               ref_size_3d: Sequence[int] = (1, 1, 96, 96, 96),
               num_classes: int = 2) -> list[dict[str, object]]:
    """One row per registered model and supported spatial dimension (see module docstring)."""
    rows = []
    for name in list_models():
        entry = get_entry(name)
        for dims in entry.spatial_dims:
            size = tuple(ref_size_2d if dims == 2 else ref_size_3d)
            model = _model_for(name, dims, size, num_classes)
            macs = count_macs(model, torch.empty(size, device="meta"))
            rows.append({
                "name": name,
                "spatial_dims": dims,
                "params": sum(p.numel() for p in model.parameters()),
                "gmacs": round(macs / 1e9, 3),
                "input": "x".join(str(s) for s in size[2:]),
                "dp_modes": " ".join(entry.dp_modes),
                "description": entry.description,
                "paper": entry.paper,
            })
    return rows


def models_table(fmt: str = "markdown", ref_size_2d: Sequence[int] = (1, 1, 256, 256),
                 ref_size_3d: Sequence[int] = (1, 1, 96, 96, 96)) -> str:
    """The registry as a table: name, spatial dims, parameters, GMACs at the reference input
    size (per input of that size), the Opacus grad-sample modes the entry claims (each checked
    by ``tests/test_architectures.py``), description and paper. ``fmt``: markdown or csv."""
    if fmt not in ("markdown", "csv"):
        raise ValueError(f"format must be 'markdown' or 'csv', not {fmt!r}")
    rows = model_rows(ref_size_2d, ref_size_3d)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    header = ["model", "dims", "params (M)", "GMACs", "input", "DP modes", "description"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"`{r['name']}`", f"{r['spatial_dims']}D", f"{r['params'] / 1e6:.2f}",
                 f"{r['gmacs']:.2f}", str(r["input"]), str(r["dp_modes"]),
                 f"{r['description']} ({r['paper']})"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
