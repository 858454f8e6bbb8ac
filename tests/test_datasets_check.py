"""Input validation: every fault named by file, all in one pass, nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from datamakers import affine, feta_files, make_feta, truncate_file, write_nifti

from privseg.datasets import (
    DataValidationError,
    check_dataset,
    data_check_report,
    load_dataset,
    summarise,
)


@pytest.fixture
def faulty_feta(tmp_path):
    """Six FeTA subjects, five of them broken in a different way; returns (root, expected)."""
    root = make_feta(tmp_path / "feta", n_subjects=6)
    expected = {}
    _, dseg = feta_files(root, 0)
    dseg.unlink()
    expected[dseg] = "missing file"
    t2w, _ = feta_files(root, 1)
    truncate_file(t2w, 0.5)
    expected[t2w] = "cannot decode NIfTI"
    t2w, _ = feta_files(root, 2)
    write_nifti(t2w, np.ones((16, 16, 11), np.float32), affine(0.5))
    expected[t2w] = "image shape (16, 16, 11) does not match label sub-003_rec-nmic_dseg.nii.gz"
    _, dseg = feta_files(root, 3)
    write_nifti(dseg, np.full((16, 16, 12), 9, np.uint8), affine(0.5))
    expected[dseg] = "label values [9] outside the declared set [0, 1, 2, 3, 4, 5, 6, 7]"
    t2w, _ = feta_files(root, 4)
    image = np.ones((16, 16, 12), np.float32)
    image[1, 2, 3] = np.nan
    image[2, 2, 2] = np.inf
    write_nifti(t2w, image, affine(0.5))
    expected[t2w] = "image has 2 NaN/Inf voxel(s)"
    return root, expected


def test_all_faults_in_one_pass_each_naming_file_and_fault(faulty_feta):
    root, expected = faulty_feta
    faults = check_dataset("feta", {}, root)
    assert len(faults) == len(expected)
    by_path = {f.path: f.message for f in faults}
    for path, message in expected.items():
        assert message in by_path[str(path)]
        assert str(path) in str(next(f for f in faults if f.path == str(path)))


def test_loader_refuses_bad_data_and_writes_no_cache(faulty_feta, tmp_path):
    root, expected = faulty_feta
    cache = tmp_path / "cache"
    with pytest.raises(DataValidationError) as err:
        load_dataset("feta", {}, root, cache)
    assert len(err.value.faults) == len(expected)
    text = str(err.value)
    assert "5 fault(s)" in text
    for path in expected:
        assert str(path) in text
    assert not cache.exists() or not any(cache.iterdir())


def test_data_check_report(faulty_feta):
    root, expected = faulty_feta
    text, ok = data_check_report("feta", {}, root)
    assert not ok and text.count("\n  - ") == len(expected)
    good = make_feta(root.parent / "good", n_subjects=3)
    text, ok = data_check_report("feta", {}, good)
    assert ok and "3 subjects" in text and "Zurich 2" in text and "Vienna 1" in text


def test_affine_mismatch_and_layout_faults(tmp_path):
    root = make_feta(tmp_path / "feta", n_subjects=3)
    t2w, dseg = feta_files(root, 0)
    import nibabel as nib

    write_nifti(t2w, np.asarray(nib.load(t2w).dataobj), affine(0.6))
    (root / "sub-002" / "anat" / "sub-002_rec-irtk_T2w.nii.gz").unlink()
    empty, _ = feta_files(root, 2)
    write_nifti(empty, np.zeros((16, 16, 12), np.int16), affine(0.5))
    with open(root / "participants.tsv", "a") as f:
        f.write("sub-009\tNeurotypical\t30.0\n")
    faults = check_dataset("feta", {}, root)
    messages = {f.path: f.message for f in faults}
    assert "affine differs from label" in messages[str(t2w)]
    assert "missing sub-002_rec-*_T2w" in messages[str(root / "sub-002" / "anat")]
    assert "lists sub-009" in messages[str(root / "participants.tsv")]
    assert messages[str(empty)] == "image is empty (all voxels zero)"
    assert len(faults) == 4


def test_bad_options_root_and_name_are_faults(tmp_path):
    assert "spacing" in check_dataset("feta", {"spacing": (0, 1, 1)}, tmp_path)[0].message
    assert check_dataset("feta", {}, tmp_path / "nope")[0].message.startswith("data set folder")
    assert "no feta subjects" in check_dataset("feta", {}, tmp_path)[0].message
    assert "unknown dataset" in check_dataset("nosuch", {}, tmp_path)[0].message


def test_summarise(tmp_path):
    root = make_feta(tmp_path / "feta", n_subjects=3)
    text = summarise(load_dataset("feta", {}, root, tmp_path / "cache"))
    assert "feta: 3 subjects" in text and "Vienna 1, Zurich 2" in text
    assert "spacing (D x H x W, mm): 0.5 x 0.5 x 0.5" in text and "brainstem" in text


def test_unreal_voxels_and_looping_links_are_faults_named_by_file(tmp_path):
    """A complex image (whose NaN the floating-point check never saw), an RGB24 image (a
    structured dtype, on which the empty-image check raised) and an image path that is a
    symbolic link to itself (reported as a missing file) are each a fault of that file."""
    root = make_feta(tmp_path / "feta", n_subjects=4)
    complex_t2w, _ = feta_files(root, 0)
    image = np.ones((16, 16, 12), np.complex64)
    image[5, 5, 5] = np.nan
    write_nifti(complex_t2w, image, affine(0.5))
    rgb_t2w, _ = feta_files(root, 1)
    rgb = np.zeros((16, 16, 12), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = 7
    write_nifti(rgb_t2w, rgb, affine(0.5))
    loop, _ = feta_files(root, 2)
    loop.unlink()
    loop.symlink_to(loop.name)
    by_path = {f.path: f.message for f in check_dataset("feta", {}, root)}
    assert set(by_path) == {str(complex_t2w), str(rgb_t2w), str(loop)}
    assert by_path[str(complex_t2w)].startswith("voxel type complex64 is not real numbers")
    assert "is not real numbers" in by_path[str(rgb_t2w)] and "'R'" in by_path[str(rgb_t2w)]
    assert by_path[str(loop)] == "symbolic link to no file (broken, or a loop)"


def test_an_image_preprocessing_overflows_stops_the_load_and_leaves_no_cache(tmp_path):
    """Finite voxels near float32's limit pass validation but overflow to Inf/NaN when
    preprocessed (normalised, resampled): the load stops naming the subject, before a NaN image
    is cached or trained on."""
    root = make_feta(tmp_path / "feta", n_subjects=4)
    t2w, _ = feta_files(root, 0)
    write_nifti(t2w, np.full((16, 16, 12), 3e38, np.float32) * np.linspace(
        0.5, 1, 12, dtype=np.float32), affine(0.5))
    assert check_dataset("feta", {}, root) == []
    cache = tmp_path / "cache"
    with pytest.raises(DataValidationError, match="sub-001: preprocessing produced"):
        load_dataset("feta", {}, root, cache)
    assert not cache.exists() or not any(cache.iterdir())


def test_a_pacs_failing_a_series_search_is_a_fault_of_that_study():
    """A PACS that answered the study search but fails the series search (gone, or an HTTP
    error) is a fault naming the study, as a failed retrieval is, not a traceback."""
    from privseg.datasets.dicom import _retrieve_study

    class Failing:
        def search_for_series(self, study_uid, fields):
            raise ConnectionError("the PACS went away")

    mr, seg, faults = _retrieve_study(Failing(), "1.2.3", "http://pacs/dicom-web study 1.2.3")
    assert (mr, seg) == (None, None)
    assert [str(f) for f in faults] == ["http://pacs/dicom-web study 1.2.3: cannot search the "
                                        "study's series (ConnectionError: the PACS went away)"]
