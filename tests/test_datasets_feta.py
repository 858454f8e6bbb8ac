"""FeTA loader: BIDS layout, sites, meta, preprocessing options."""

from __future__ import annotations

import numpy as np
import pytest
from datamakers import make_feta

from privseg.datasets import load_dataset


@pytest.fixture(scope="module")
def feta_root(tmp_path_factory):
    return make_feta(tmp_path_factory.mktemp("feta"), n_subjects=4)


def test_loads_subjects_sites_and_meta(feta_root, tmp_path):
    ss = load_dataset("feta", {}, feta_root, tmp_path)
    assert ss.num_classes == 8 and ss.in_channels == 1
    assert ss.class_names[1] == "external CSF" and ss.class_names[7] == "brainstem"
    assert [s.subject_id for s in ss.subjects] == ["sub-001", "sub-002", "sub-003", "sub-004"]
    # recs cycle mial, irtk, nmic, mial: Zurich, Zurich, Vienna, Zurich
    assert [s.site for s in ss.subjects] == ["Zurich", "Zurich", "Vienna", "Zurich"]
    s = ss.subjects[1]
    assert s.meta["gestational_age"] == pytest.approx(21.5)
    assert s.meta["pathology"] == "Pathological" and s.meta["reconstruction"] == "irtk"
    for s in ss.subjects:
        assert s.image.dtype == np.float32 and s.label.dtype == np.uint8
        assert s.image.ndim == 4 and s.image.shape[1:] == s.label.shape
        assert set(np.unique(s.label)) <= set(range(8))
        fg = s.image[0][s.image[0] != 0]
        assert abs(fg.mean()) < 1e-3 and abs(fg.std() - 1) < 1e-2  # z-score over nonzero
        assert s.label.shape != (12, 16, 16)  # cropped to the foreground


def test_axes_spacing_and_inplane_resize(feta_root, tmp_path):
    raw = load_dataset("feta", {"crop_foreground": False, "max_subjects": 1}, feta_root, tmp_path)
    assert raw.subjects[0].image.shape == (1, 12, 16, 16)  # [C, z, y, x] of a 16x16x12 file
    assert raw.subjects[0].meta["spacing"] == [0.5, 0.5, 0.5]
    coarse = load_dataset(
        "feta", {"crop_foreground": False, "spacing": (1, 1, 1), "max_subjects": 1},
        feta_root, tmp_path,
    )
    assert coarse.subjects[0].label.shape == (6, 8, 8)
    assert coarse.subjects[0].meta["spacing"] == [1.0, 1.0, 1.0]
    sized = load_dataset("feta", {"inplane_size": (10, 14), "max_subjects": 2}, feta_root, tmp_path)
    assert [s.label.shape[1:] for s in sized.subjects] == [(10, 14), (10, 14)]


def test_site_by_reconstruction(feta_root, tmp_path):
    ss = load_dataset("feta", {"site_by": "reconstruction"}, feta_root, tmp_path)
    assert [s.site for s in ss.subjects] == ["mial", "irtk", "nmic", "mial"]


def test_unknown_option_is_an_error(feta_root, tmp_path):
    with pytest.raises(ValueError, match="spacin"):
        load_dataset("feta", {"spacin": (1, 1, 1)}, feta_root, tmp_path)
