"""The ``privseg models`` table (``privseg.architectures.table``)."""

from __future__ import annotations

import io

import pandas as pd
import pytest
import torch
from torch import nn

from privseg.architectures import build, get_entry, list_models
from privseg.architectures.table import COLUMNS, count_macs, models_table

SMALL_2D, SMALL_3D = (1, 1, 64, 64), (1, 1, 32, 32, 32)


@pytest.fixture(scope="module")
def csv_table() -> pd.DataFrame:
    return pd.read_csv(io.StringIO(models_table("csv", SMALL_2D, SMALL_3D)))


def test_csv_has_columns_and_every_model_and_dim(csv_table):
    assert list(csv_table.columns) == COLUMNS
    expected = {(n, d) for n in list_models() for d in get_entry(n).spatial_dims}
    assert set(zip(csv_table["name"], csv_table["spatial_dims"], strict=True)) == expected
    assert (csv_table["gmacs"] > 0).all()


def test_csv_modes_are_the_registry_claims(csv_table):
    for _, row in csv_table.iterrows():
        assert tuple(row["dp_modes"].split()) == get_entry(row["name"]).dp_modes


@pytest.mark.parametrize("name", ["unet", "smoothnet-narrow", "resunet-scalenorm", "smp-unet"])
def test_param_counts_equal_numel(csv_table, name):
    row = csv_table[(csv_table["name"] == name) & (csv_table["spatial_dims"] == 2)].iloc[0]
    model = build(name, 2, 1, 2)
    assert row["params"] == sum(p.numel() for p in model.parameters())


def test_unetr_built_for_reference_size(csv_table):
    row = csv_table[(csv_table["name"] == "unetr") & (csv_table["spatial_dims"] == 3)].iloc[0]
    model = build("unetr", 3, 1, 2, img_size=32)
    assert row["params"] == sum(p.numel() for p in model.parameters())


def test_markdown_lists_every_model():
    text = models_table("markdown", SMALL_2D, SMALL_3D)
    for name in list_models():
        assert f"`{name}`" in text
    assert text.splitlines()[0].startswith("| model |")


def test_unknown_format_rejected():
    with pytest.raises(ValueError, match="markdown"):
        models_table("html")


def test_count_macs_by_hand():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    # conv: 4·8·8 outputs × 2·3·3; linear: 5 outputs × 256 inputs
    assert count_macs(model, torch.zeros(1, 2, 8, 8)) == 4 * 64 * 18 + 5 * 256
    up = nn.ConvTranspose3d(3, 2, 2, stride=2)
    assert count_macs(up, torch.zeros(1, 3, 4, 4, 4)) == 3 * 64 * 2 * 8
