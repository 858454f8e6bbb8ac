"""Oxford-IIIT Pet loader: torchvision layout, 2D RGB, trimap mapping, splits."""

from __future__ import annotations

import numpy as np
import pytest
from datamakers import make_pets

from privseg.datasets import check_dataset, get_dataset_entry, load_dataset


@pytest.fixture(scope="module")
def pets_root(tmp_path_factory):
    return make_pets(tmp_path_factory.mktemp("pets"), n_images=6, n_test=2)


def test_loads_2d_rgb_resized(pets_root, tmp_path):
    assert get_dataset_entry("pets").dims == (2,)
    ss = load_dataset("pets", {"size": (12, 10)}, pets_root, tmp_path)
    assert ss.in_channels == 3 and ss.class_names == ["background", "pet"]
    assert len(ss.subjects) == 4  # trainval only
    for s in ss.subjects:
        assert s.image.shape == (3, 1, 12, 10) and s.label.shape == (1, 12, 10)
        assert s.image.dtype == np.float32 and set(np.unique(s.label)) == {0, 1}
    assert [s.subject_id for s in ss.subjects] == ["Abyssinian_1", "Bengal_3", "beagle_2", "pug_4"]
    assert [s.site for s in ss.subjects] == ["cat", "cat", "dog", "dog"]
    assert ss.subjects[0].meta["breed"] == "Abyssinian"
    assert ss.subjects[0].meta["native_size"] == [20, 24]


def test_border_split_and_root_variants(pets_root, tmp_path):
    ss = load_dataset("pets", {"border": "class", "split": "all", "site_by": "none"},
                      pets_root / "oxford-iiit-pet", tmp_path)
    assert ss.class_names == ["background", "pet", "border"] and len(ss.subjects) == 6
    assert {s.site for s in ss.subjects} == {"all"}
    assert any(2 in np.unique(s.label) for s in ss.subjects)
    test = load_dataset("pets", {"split": "test"}, pets_root, tmp_path)
    assert [s.meta["split"] for s in test.subjects] == ["test", "test"]


def test_photo_faults(tmp_path):
    root = make_pets(tmp_path / "p", n_images=4, n_test=0)
    base = root / "oxford-iiit-pet"
    from PIL import Image

    (base / "images" / "Abyssinian_1.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.full((5, 5), 2, np.uint8)).save(base / "annotations/trimaps/beagle_2.png")
    Image.fromarray(np.full((20, 24), 7, np.uint8)).save(base / "annotations/trimaps/Bengal_3.png")
    (base / "annotations" / "trimaps" / "pug_4.png").unlink()
    faults = check_dataset("pets", {}, root)
    got = {f.path.rsplit("/", 1)[-1]: f.message for f in faults}
    assert got.keys() == {"Abyssinian_1.jpg", "beagle_2.jpg", "Bengal_3.png", "pug_4.png"}
    assert "cannot decode image" in got["Abyssinian_1.jpg"]
    assert "does not match label beagle_2.png" in got["beagle_2.jpg"]
    assert "label values [7]" in got["Bengal_3.png"]
    assert got["pug_4.png"] == "missing file"


def test_a_split_list_that_is_not_text_is_a_fault_of_that_file(tmp_path):
    root = make_pets(tmp_path / "p", n_images=4, n_test=0)
    listing = root / "oxford-iiit-pet" / "annotations" / "trainval.txt"
    listing.write_bytes(b"\xff\xfe not utf-8")
    (fault,) = check_dataset("pets", {}, root)
    assert fault.path == str(listing)
    assert fault.message.startswith("cannot read split list (UnicodeDecodeError")
