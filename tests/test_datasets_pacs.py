"""The ``pacs`` data set: subjects from a real Orthanc over DICOMweb, against the file loader.

Each module fixture starts its own Orthanc (DICOMweb plugin, loopback, temporary storage)
and stops it afterwards. Skipped only when Orthanc is not installed (CI installs it).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from privseg.datasets import DataValidationError, data_check_report, load_dataset
from privseg.datasets.dicom_io import labels_to_seg, volume_to_study
from privseg.datasets.orthanc import dicomweb_plugin, local_orthanc, orthanc_binary
from privseg.datasets.pacs_upload import upload_dataset
from privseg.datasets.phantom import FETA_CLASSES, make_subject

pytestmark = [
    pytest.mark.skipif(orthanc_binary() is None or dicomweb_plugin() is None,
                       reason="Orthanc with DICOMweb not installed "
                              "(apt-get install orthanc orthanc-dicomweb)"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

PHANTOM = {"n_subjects": 15, "size": 16, "n_sites": 3}
# the phantom is already preprocessed: read it back as it was stored
AS_STORED = {"crop_foreground": False, "normalize": False}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """An Orthanc holding the 15-subject phantom; yields (DICOMweb url, workdir)."""
    work = tmp_path_factory.mktemp("pacs")
    with local_orthanc(work / "orthanc") as server:
        upload_dataset("phantom", PHANTOM, None, server.dicomweb, work / "cache")
        yield server.dicomweb, work


def test_phantom_read_back_from_orthanc_equals_the_file_loader(pacs):
    url, work = pacs
    files = load_dataset("phantom", PHANTOM, None, work / "cache")
    dicom = load_dataset("pacs", {"url": url, **AS_STORED}, None, work / "cache")
    assert [s.subject_id for s in dicom.subjects] == [s.subject_id for s in files.subjects]
    assert dicom.class_names == files.class_names
    for a, b in zip(files.subjects, dicom.subjects, strict=True):
        assert b.site == a.site
        assert b.image.shape == a.image.shape and b.label.shape == a.label.shape
        assert np.array_equal(b.label, a.label)
        # int16 + rescale slope: within half a stored step of the image's range
        step = float(a.image.max() - a.image.min()) / 65532
        np.testing.assert_allclose(b.image, a.image, rtol=0, atol=step / 2 + 1e-6)
        assert b.meta["spacing"] == [1.0, 1.0, 1.0]
        assert b.meta["study_uid"]


def test_pacs_is_cached_and_data_check_reports_it(pacs):
    url, work = pacs
    opts = {"url": url, **AS_STORED, "max_subjects": 3}
    first = load_dataset("pacs", opts, None, work / "cache")
    folders = sorted(p.name for p in (work / "cache").glob("pacs-*"))
    again = load_dataset("pacs", opts, None, work / "cache")
    assert sorted(p.name for p in (work / "cache").glob("pacs-*")) == folders
    assert isinstance(again.subjects[0].image, np.memmap)  # read from the cache
    assert np.array_equal(again.subjects[0].label, first.subjects[0].label)
    text, ok = data_check_report("pacs", opts, None)
    assert ok, text
    assert "pacs: OK: 3 subjects" in text and "sites: site-A 1, site-B 1, site-C 1" in text


def test_segment_map_sends_segments_to_classes(pacs):
    url, work = pacs
    merged = {n: (1 if n == 7 else n) for n in range(1, 8)}  # brainstem -> external CSF
    plain = load_dataset("pacs", {"url": url, **AS_STORED, "max_subjects": 2}, None,
                         work / "cache")
    mapped = load_dataset("pacs", {"url": url, **AS_STORED, "max_subjects": 2,
                                   "segment_classes": merged}, None, work / "cache")
    for a, b in zip(plain.subjects, mapped.subjects, strict=True):
        assert (a.label == 7).any() and not (b.label == 7).any()
        assert np.array_equal(b.label, np.where(a.label == 7, 1, a.label))


def _study(i: int, site: str = "site-A"):
    image, label, _ = make_subject(i, 16, site, 0)
    segments = {n: FETA_CLASSES[n] for n in range(1, 8)}
    return volume_to_study(image[0].transpose(2, 1, 0), label.transpose(2, 1, 0), np.eye(4),
                           f"bad-{i}", site, segments)


@pytest.fixture(scope="module")
def faulty_pacs(tmp_path_factory):
    """An Orthanc with one good study and five broken ones; yields (url, expected faults)."""
    from dicomweb_client.api import DICOMwebClient

    work = tmp_path_factory.mktemp("faulty-pacs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good, mismatch, other, no_seg, no_mr, gap = (_study(i) for i in range(6))
        # a SEG made over another study's series, filed in this study
        wrong = labels_to_seg(other.mr, np.zeros((16, 16, 16), np.uint8) + 1,
                              {n: FETA_CLASSES[n] for n in range(1, 8)})
        wrong.StudyInstanceUID = mismatch.mr[0].StudyInstanceUID
        wrong.PatientID = mismatch.mr[0].PatientID
        # an MR series with a slice missing in the middle, its SEG over what is left
        gap.mr.pop(8)
        gap_seg = labels_to_seg(gap.mr, np.ones((15, 16, 16), np.uint8),
                                {n: FETA_CLASSES[n] for n in range(1, 8)})
        # an MR series whose every voxel is zero (a blank export)
        _, label, _ = make_subject(6, 16, "site-A", 0)
        empty = volume_to_study(np.zeros((16, 16, 16), np.float32), label.transpose(2, 1, 0),
                                np.eye(4), "bad-6", "site-A",
                                {n: FETA_CLASSES[n] for n in range(1, 8)})
    uid = {name: str(s.mr[0].StudyInstanceUID) for name, s in
           {"mismatch": mismatch, "no_seg": no_seg, "no_mr": no_mr, "gap": gap,
            "empty": empty}.items()}
    expected = {
        uid["mismatch"]: "frames reference 16 instance(s) not in MR series",
        uid["no_seg"]: "missing SEG series",
        uid["no_mr"]: "missing MR series",
        uid["gap"]: "broken MR series",
        uid["empty"]: "image is empty (all voxels zero)",
    }
    with local_orthanc(work / "orthanc") as server:
        client = DICOMwebClient(server.dicomweb)
        client.store_instances(good.mr + [good.seg] + mismatch.mr + [wrong] + no_seg.mr
                               + [no_mr.seg] + gap.mr + [gap_seg] + empty.mr + [empty.seg])
        yield server.dicomweb, expected, work


def test_broken_studies_are_each_reported_by_study_uid_and_nothing_is_cached(faulty_pacs):
    url, expected, work = faulty_pacs
    with pytest.raises(DataValidationError) as err:
        load_dataset("pacs", {"url": url}, None, work / "cache")
    by_study = {}
    for f in err.value.faults:
        by_study.setdefault(f.path.rsplit(" ", 1)[-1], []).append(f.message)
    assert set(by_study) == set(expected)
    for study_uid, message in expected.items():
        assert any(message in m for m in by_study[study_uid]), (study_uid, by_study[study_uid])
    assert not list((work / "cache").glob("pacs-*/index.json"))
    text, ok = data_check_report("pacs", {"url": url}, None)
    assert not ok
    for study_uid, message in expected.items():
        assert f"study {study_uid}: " in text and message in text


def test_unreachable_pacs_is_a_fault_naming_the_url(tmp_path):
    url = "http://127.0.0.1:9/dicom-web"
    text, ok = data_check_report("pacs", {"url": url, "retries": 0}, None)
    assert not ok and f"{url}: cannot search the PACS" in text


@pytest.mark.filterwarnings("ignore")
def test_federated_run_on_pacs_equals_the_run_on_files(pacs):
    """Same config and noise seed, data from Orthanc vs generated: same sites and subjects,
    same ε per site, same Dice up to the images' int16 rounding."""
    from privseg.config import parse_config

    url, work = pacs

    def config(dataset: dict, out: str) -> dict:
        fed = {"rounds": 2, "local_epochs": None, "local_steps": 2, "dp_mode": "sample",
               "eval_every": 1}
        return {
            "name": "pacs-vs-files", "seed": 3,
            "dataset": {**dataset, "dims": 2, "cache_dir": str(work / "cache"),
                        "val_fraction": 0.1, "test_fraction": 0.2},
            "model": {"name": "unet", "options": {"width": 0.25, "depth": 2}},
            "training": {"epochs": 1, "expected_batch_size": 2, "physical_batch_size": 2,
                         "crops_per_subject": 1, "lr": 0.003, "device": "cpu"},
            "privacy": {"enabled": True, "target_epsilon": 8.0, "accountant": "rdp",
                        "noise_seed": 0},
            "setting": {"kind": "federated", "federated": fed},
            "tracking": {"wandb": "off"},
            "output": {"dir": str(work / out)},
        }

    from flwr.common import parameters_to_ndarrays

    from privseg.federated.server import initial_model_weights
    from privseg.federated.simulation import simulate
    from privseg.training.setup import load_subjects

    runs = {}
    for name, dataset in (("files", {"name": "phantom", "options": PHANTOM}),
                          ("pacs", {"name": "pacs", "options": {"url": url, **AS_STORED}})):
        cfg = parse_config(config(dataset, f"runs-{name}"))
        subjects = load_subjects(cfg)
        server, _, _ = simulate(cfg, subjects)
        runs[name] = (server.record(), parameters_to_ndarrays(server.parameters), subjects)
    (files, w_files, ss), (dicom, w_dicom, _) = runs["files"], runs["pacs"]
    assert dicom["privacy"]["epsilon_per_site"] == files["privacy"]["epsilon_per_site"]
    assert set(dicom["privacy"]["epsilon_per_site"]) == {"site-A", "site-B", "site-C"}
    # The trained global models agree up to the images' int16 rounding: far closer to each
    # other than to where training started (the Dice of so short a run says little).
    init = initial_model_weights(parse_config(config({"name": "phantom", "options": PHANTOM},
                                                     "runs-files")), ss.in_channels,
                                 ss.num_classes, (1, 16, 16))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(w_files, init, strict=True))
    apart = max(float(np.abs(a - b).max()) for a, b in zip(w_files, w_dicom, strict=True))
    assert apart < 0.01 * moved, (apart, moved)
    for c, v in files["test"]["dice"].items():
        assert dicom["test"]["dice"][c] == pytest.approx(v, abs=2e-3)
