"""BraTS loader: releases' layouts, label remap 4 -> 3, regions, sites."""

from __future__ import annotations

import numpy as np
import pytest
from datamakers import brats_files, make_brats

from privseg.datasets import check_dataset, load_dataset
from privseg.datasets.brats import institution


def test_2021_layout_remaps_labels(tmp_path):
    root = make_brats(tmp_path / "b", year=2021, n_subjects=3)
    ss = load_dataset("brats", {}, root, tmp_path / "cache")
    assert ss.in_channels == 4 and ss.num_classes == 4
    assert ss.eval_regions == {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
    assert [s.subject_id for s in ss.subjects] == [f"BraTS2021_0000{i}" for i in range(3)]
    assert {s.site for s in ss.subjects} == {"all"}
    for s in ss.subjects:
        assert s.image.shape[0] == 4 and s.image.shape[1:] == s.label.shape
        assert set(np.unique(s.label)) == {0, 1, 2, 3}
    # raw label 4 (enhancing) is class 3 after loading
    raw = load_dataset("brats", {"crop_foreground": False, "max_subjects": 1}, root, tmp_path)
    import nibabel as nib

    seg = np.asarray(nib.load(brats_files(root, "BraTS2021_00000")["seg"]).dataobj)
    assert np.array_equal(raw.subjects[0].label == 3, (seg == 4).transpose(2, 1, 0))


def test_2019_sites_and_grades_from_names(tmp_path):
    root = make_brats(tmp_path / "b", year=2019, n_subjects=3)
    ss = load_dataset("brats", {"modalities": ["flair", "t1ce"]}, root, tmp_path / "cache")
    assert ss.in_channels == 2
    sites = {s.subject_id: s.site for s in ss.subjects}
    assert sites == {"BraTS19_CBICA_100_1": "CBICA", "BraTS19_TCIA01_101_1": "TCIA01",
                     "BraTS19_2013_102_1": "2013"}
    grades = {s.subject_id: s.meta["grade"] for s in ss.subjects}
    assert grades["BraTS19_CBICA_100_1"] == "HGG" and grades["BraTS19_TCIA01_101_1"] == "LGG"


def test_2020_uncompressed_with_name_mapping_and_sites_csv(tmp_path):
    root = make_brats(tmp_path / "b", year=2020, n_subjects=3, ext=".nii")
    faults = check_dataset("brats", {}, root)
    assert faults == []
    ss = load_dataset("brats", {}, root, tmp_path / "cache")
    assert [s.site for s in ss.subjects] == ["CBICA", "TCIA01", "2013"]
    csv = tmp_path / "partitioning_1.csv"
    csv.write_text("Partition_ID,Subject_ID\n1,BraTS20_Training_001\n2,BraTS20_Training_002\n")
    faults = check_dataset("brats", {"sites_csv": str(csv)}, root)
    assert [f.message for f in faults] == ["no Partition_ID for subject BraTS20_Training_003"]


def test_institution_parsing():
    assert institution("Brats18_TCIA08_406_1") == "TCIA08"
    assert institution("Brats18_2013_10_1") == "2013"
    assert institution("BraTS20_Training_001") is None
    assert institution("BraTS2021_00000") is None


def test_label_3_in_raw_brats_is_out_of_range(tmp_path):
    root = make_brats(tmp_path / "b", n_subjects=2)
    import nibabel as nib
    from datamakers import write_nifti

    seg = brats_files(root, "BraTS2021_00001")["seg"]
    img = nib.load(seg)
    data = np.asarray(img.dataobj).copy()
    data[data == 4] = 3
    write_nifti(seg, data, img.affine)
    faults = check_dataset("brats", {}, root)
    assert len(faults) == 1 and faults[0].path == str(seg)
    assert "label values [3] outside the declared set [0, 1, 2, 4]" in faults[0].message
    with pytest.raises(ValueError, match="BraTS2021_00001_seg"):
        load_dataset("brats", {}, root, tmp_path / "cache")


def test_a_modality_with_two_channels_is_named_not_the_first_modality(tmp_path):
    import nibabel as nib
    from datamakers import write_nifti

    root = make_brats(tmp_path / "b", n_subjects=2)
    files = brats_files(root, "BraTS2021_00001")
    img = nib.load(files["t2"])
    volume = np.asarray(img.dataobj)
    write_nifti(files["t2"], np.stack([volume, volume], axis=-1), img.affine)
    (fault,) = check_dataset("brats", {}, root)
    assert fault.path == str(files["t2"])
    assert "5 channel(s) (" in fault.message and "BraTS2021_00001_t2.nii.gz: 2" in fault.message
    assert fault.message.endswith("the data set declares 4")
