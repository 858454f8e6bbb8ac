"""Medical Segmentation Decathlon loader: dataset.json, 4D multi-modal, macOS ._ files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datamakers import make_msd

from privseg.datasets import check_dataset, load_dataset


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("msd")
    make_msd(root, "Task04_Hippocampus", n_subjects=3)
    make_msd(root, "Task01_BrainTumour", n_subjects=3)
    return root


def test_hippocampus_with_apple_double_files(msd_root, tmp_path):
    task = msd_root / "Task04_Hippocampus"
    assert list((task / "imagesTr").glob("._*"))  # the tarball's macOS files are there
    ss = load_dataset("msd", {"task": "Task04_Hippocampus"}, msd_root, tmp_path)
    assert ss.class_names == ["background", "Anterior", "Posterior"]
    assert ss.in_channels == 1 and ss.eval_regions == {}
    assert [s.subject_id for s in ss.subjects] == [f"hippocampus_00{i}" for i in (1, 2, 3)]
    assert {s.site for s in ss.subjects} == {"all"}
    # the task folder itself also works as root
    same = load_dataset("msd", {}, task, tmp_path)
    assert np.array_equal(same.subjects[0].label, ss.subjects[0].label)


def test_brain_tumour_4d_modalities_become_channels(msd_root, tmp_path):
    ss = load_dataset("msd", {"crop_foreground": False}, msd_root / "Task01_BrainTumour", tmp_path)
    assert ss.in_channels == 4
    assert ss.eval_regions == {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}
    s = ss.subjects[0]
    assert s.image.shape == (4, 12, 16, 16) and s.label.shape == (12, 16, 16)
    assert set(np.unique(s.label)) == {0, 1, 2, 3}


def test_apple_double_listed_or_not_never_crashes(tmp_path):
    task = make_msd(tmp_path / "d", n_subjects=2)
    spec = json.loads((task / "dataset.json").read_text())
    spec["training"].append({"image": "./imagesTr/._x.nii.gz", "label": "./labelsTr/._x.nii.gz"})
    (task / "dataset.json").write_text(json.dumps(spec))
    assert check_dataset("msd", {}, task) == []


def test_missing_dataset_json_is_a_fault(tmp_path):
    task = make_msd(tmp_path / "d", n_subjects=2)
    (task / "dataset.json").unlink()
    faults = check_dataset("msd", {}, task)
    assert len(faults) == 1 and faults[0].path.endswith("dataset.json")
    assert "missing dataset.json" in faults[0].message


def test_wrong_channel_count_is_a_fault(tmp_path):
    task = make_msd(tmp_path / "d", "Task01_BrainTumour", n_subjects=2)
    spec = json.loads((task / "dataset.json").read_text())
    spec["modality"]["4"] = "extra"
    (task / "dataset.json").write_text(json.dumps(spec))
    faults = check_dataset("msd", {}, task)
    assert len(faults) == 2
    assert all("4 channel(s), the data set declares 5" in f.message for f in faults)


@pytest.mark.parametrize("path", [5, None, ["./imagesTr/a.nii.gz"]])
def test_a_training_entry_whose_path_is_not_a_string_is_a_fault(tmp_path, path):
    task = make_msd(tmp_path / "d", n_subjects=2)
    spec = json.loads((task / "dataset.json").read_text())
    spec["training"][1]["image"] = path
    (task / "dataset.json").write_text(json.dumps(spec))
    (fault,) = check_dataset("msd", {}, task)
    assert fault.path == str(task / "dataset.json")
    assert fault.message.startswith("training entry 1: image and label must be paths")


def test_a_negative_label_value_in_dataset_json_is_a_fault(tmp_path):
    task = make_msd(tmp_path / "d", n_subjects=2)
    spec = json.loads((task / "dataset.json").read_text())
    spec["labels"]["-1"] = "ignore"
    (task / "dataset.json").write_text(json.dumps(spec))
    (fault,) = check_dataset("msd", {}, task)
    assert fault.path == str(task / "dataset.json")
    assert "labels keys must be integers ≥ 0, got -1" in fault.message
