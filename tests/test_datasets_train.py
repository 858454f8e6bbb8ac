"""A short DP run on each real data set's exact on-disk layout (tiny synthetic copies)."""

import math

import pytest
from datamakers import make_brats, make_feta, make_msd, make_pets

from privseg.config import parse_config
from privseg.run import run as run_training

LAYOUTS = {
    "feta": (lambda root: make_feta(root, n_subjects=6), {}),
    "msd": (lambda root: make_msd(root, n_subjects=6), {}),
    "brats": (lambda root: make_brats(root, n_subjects=6), {}),
    "pets": (lambda root: make_pets(root, n_images=8, n_test=0), {"size": [16, 16]}),
}


def _config(tmp_path, name, root, options, dims=2, patch=(16, 16)):
    return parse_config({
        "dataset": {"name": name, "root": str(root), "dims": dims, "options": options,
                    "patch_size": list(patch), "cache_dir": str(tmp_path / "cache"),
                    "val_fraction": 0.0, "test_fraction": 0.2},
        "model": {"name": "unet", "options": {"base_channels": 4, "depth": 2}},
        "training": {"epochs": 2, "expected_batch_size": 2, "physical_batch_size": 2},
        # noise_seed: the second, cached run must reproduce the first
        "privacy": {"enabled": True, "target_epsilon": None, "noise_multiplier": 1.0,
                    "noise_seed": 0},
        "tracking": {"wandb": "off"},
        "output": {"dir": str(tmp_path / "runs")},
    })


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_short_dp_run_on_each_layout(tmp_path, name):
    make, options = LAYOUTS[name]
    root = make(tmp_path / "data")
    rec = run_training(_config(tmp_path, name, root, options), progress=False)
    assert rec["dataset"]["name"] == name
    assert rec["privacy"]["unit"] == "subject" and math.isfinite(rec["privacy"]["epsilon"])
    assert rec["test"]["n_subjects"] == len(rec["splits"]["test"]) >= 1
    expected = {"WT", "TC", "ET"} if name == "brats" else set(rec["dataset"]["class_names"][1:])
    assert set(rec["test"]["dice"]) == expected
    assert all(h["train_loss"] is None or math.isfinite(h["train_loss"])
               for h in rec["history"])


def test_3d_run_reads_no_nifti_after_the_first_load(tmp_path, monkeypatch):
    import nibabel

    root = make_feta(tmp_path / "data", n_subjects=6)
    cfg = _config(tmp_path, "feta", root, {}, dims=3, patch=(8, 8, 8))
    first = run_training(cfg, progress=False)

    def no_decoding(*a, **k):
        raise AssertionError("a NIfTI was decoded although the cache is warm")

    monkeypatch.setattr(nibabel, "load", no_decoding)
    second = run_training(cfg, progress=False, force=True)
    assert second["splits"] == first["splits"]
    assert second["test"]["dice"] == first["test"]["dice"]
    assert all(h["data_time_s"] >= 0 for h in second["history"])
