"""``pacs``: a site's subjects from a PACS over DICOMweb (QIDO-RS search, WADO-RS retrieve).

Each study is one subject: its MR series is the image, its DICOM SEG the label map (segment
number ``n`` -> class ``segment_classes[n]``, identity by default). The subject id is the
Patient ID, the site the Institution Name. Geometry (orientation, spacing) comes from the
series' DICOM attributes; then the same MONAI preprocessing as the file loaders runs
(:mod:`.preprocess`). Every study is retrieved and checked before anything is trained: a
missing MR or SEG series, a broken series (undecodable, uneven or non-parallel slices) or a
SEG whose frames do not match its series is a fault naming the study UID, and all faults are
raised together (:class:`DataValidationError`). Results are cached (:mod:`.cache`) under a
key of the options and every study's UID and instance count (QIDO-RS only, no pixel data).
DICOMweb: the standard's Part 18; client: ``dicomweb-client`` (Herrmann et al. 2018,
J. Pathol. Inform. 9:37).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from privseg.datasets.base import SubjectSet, register_dataset
from privseg.datasets.cache import read_cache, source_key
from privseg.datasets.faults import DataValidationError, Fault
from privseg.datasets.loading import write_cache
from privseg.datasets.options import VolumeOptions
from privseg.datasets.phantom import FETA_CLASSES

log = logging.getLogger(__name__)

STUDY_UID, SERIES_UID, MODALITY, PATIENT_ID = "0020000D", "0020000E", "00080060", "00100020"
N_INSTANCES = "00201208"


class PacsOptions(VolumeOptions):
    """Where the PACS is and how its segments map to classes; preprocessing as for files."""

    url: str = Field(description="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    class_names: list[str] = Field(default_factory=lambda: list(FETA_CLASSES),
                                   description="class names, background first (default FeTA)")
    segment_classes: dict[int, int] | None = Field(
        None, description="SEG segment number -> class index; default: the identity"
    )
    timeout: float = Field(60.0, gt=0, description="seconds per DICOMweb request")
    retries: int = Field(3, ge=0, le=20, description="retries of a failed request "
                                                     "(exponential back-off)")

    @model_validator(mode="after")
    def _check_map(self) -> PacsOptions:
        bad = {k: v for k, v in self.segment_map().items() if not 0 <= v < len(self.class_names)}
        if bad:
            raise ValueError(f"segment_classes {bad} name classes outside 0..."
                             f"{len(self.class_names) - 1}")
        return self

    def segment_map(self) -> dict[int, int]:
        if self.segment_classes is not None:
            return dict(self.segment_classes)
        return {n: n for n in range(1, len(self.class_names))}


def _value(item: dict, tag: str, default=None):
    values = item.get(tag, {}).get("Value") or [default]
    return values[0]


def _client(opts: PacsOptions):
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(opts.url, timeout=opts.timeout)
    client.set_http_retry_params(retry=opts.retries > 0, max_attempts=opts.retries + 1,
                                 wait_exponential_multiplier=500)
    return client


def _search_studies(client, url: str) -> list[dict]:
    try:
        studies = client.search_for_studies(fields=[PATIENT_ID, N_INSTANCES])
    except Exception as e:  # connection refused, HTTP error: the PACS is the fault
        raise DataValidationError([Fault(url, f"cannot search the PACS ({type(e).__name__}: "
                                              f"{e})")], "pacs") from e
    return sorted(studies, key=lambda s: (str(_value(s, PATIENT_ID, "")), _value(s, STUDY_UID)))


def _retrieve_study(client, study_uid: str, where: str):
    """(MR datasets, SEG or None, faults) of one study."""
    import highdicom as hd

    try:
        series = client.search_for_series(study_uid, fields=[MODALITY])
    except Exception as e:  # the PACS went away or refused between the searches
        return None, None, [Fault(where, f"cannot search the study's series "
                                         f"({type(e).__name__}: {e})")]
    by_modality: dict[str, list[str]] = {}
    for s in series:
        by_modality.setdefault(str(_value(s, MODALITY, "")), []).append(_value(s, SERIES_UID))
    faults = []
    for modality in ("MR", "SEG"):
        found = by_modality.get(modality, [])
        if not found:
            faults.append(Fault(where, f"missing {modality} series"))
        elif len(found) > 1:
            faults.append(Fault(where, f"{len(found)} {modality} series, expected one"))
    if faults:
        return None, None, faults
    try:
        mr = client.retrieve_series(study_uid, by_modality["MR"][0])
        seg_ds = client.retrieve_series(study_uid, by_modality["SEG"][0])
    except Exception as e:
        return None, None, [Fault(where, f"cannot retrieve series ({type(e).__name__}: {e})")]
    if len(seg_ds) != 1:
        return None, None, [Fault(where, f"SEG series has {len(seg_ds)} instances, expected 1")]
    try:
        seg = hd.seg.Segmentation.from_dataset(seg_ds[0])
    except Exception as e:
        return None, None, [Fault(where, f"broken SEG ({type(e).__name__}: {e})")]
    return mr, seg, []


def _read_study(client, study: dict, opts: PacsOptions):
    """(subject_id, site, image, label, affine, faults) of one study, decoded and checked."""
    from privseg.datasets.dicom_io import study_faults, study_to_volume

    uid = _value(study, STUDY_UID)
    where = f"{opts.url} study {uid}"
    mr, seg, faults = _retrieve_study(client, uid, where)
    if faults:
        return None, faults
    faults = [Fault(where, m) for m in study_faults(mr, seg)]
    seg_map = opts.segment_map()
    unknown = sorted({int(s.SegmentNumber) for s in seg.SegmentSequence} - set(seg_map))
    if unknown:
        faults.append(Fault(where, f"SEG segment number(s) {unknown} not in segment_classes "
                                   f"{sorted(seg_map)}"))
    if faults:
        return None, faults
    try:
        image, label, affine = study_to_volume(mr, seg)
    except Exception as e:  # highdicom: uneven/non-parallel slices, undecodable pixels
        return None, [Fault(where, f"broken MR series ({type(e).__name__}: {e})")]
    if not np.isfinite(image).all():
        return None, [Fault(where, "image has NaN or Inf")]
    if not np.any(image):  # as the file loaders check (privseg.datasets.validate)
        return None, [Fault(where, "image is empty (all voxels zero)")]
    lut = np.zeros(max(max(seg_map), 0) + 1, np.uint8)
    for n, c in seg_map.items():
        lut[n] = c
    subject_id = str(mr[0].get("PatientID", uid))
    site = str(mr[0].get("InstitutionName", "") or "unknown")
    return (subject_id, site, uid, image, lut[label], affine), []


@register_dataset(
    "pacs",
    options=PacsOptions,
    description="studies (MR + DICOM SEG) from a PACS over DICOMweb, e.g. Orthanc",
    dims=(2, 3),
    needs_root=False,
)
def load_pacs(opts: PacsOptions, root: Path | None, cache_dir: Path) -> SubjectSet:
    """Load every study of the PACS at ``opts.url``; see the module docstring."""
    from privseg.datasets.preprocess import preprocess_arrays, volume_pipeline

    t0 = time.monotonic()
    client = _client(opts)
    studies = _search_studies(client, opts.url)
    if opts.max_subjects is not None:
        studies = studies[: opts.max_subjects]
    sources = [[_value(s, STUDY_UID), _value(s, N_INSTANCES)] for s in studies]
    folder = Path(cache_dir) / f"pacs-{source_key('pacs', opts, sources)}"
    subjects = read_cache(folder)
    if subjects is None:
        if not studies:
            raise DataValidationError([Fault(opts.url, "no studies in this PACS")], "pacs")
        read, faults = [], []
        for study in studies:
            got, study_faults = _read_study(client, study, opts)
            faults.extend(study_faults)
            if got is not None:
                read.append(got)
        seen: dict[str, str] = {}
        for subject_id, _, uid, *_ in read:
            if subject_id in seen:
                faults.append(Fault(f"{opts.url} study {uid}", f"Patient ID {subject_id!r} "
                                    f"also in study {seen[subject_id]}"))
            seen.setdefault(subject_id, uid)
        if faults:
            raise DataValidationError(faults, "pacs")
        log.info("pacs: %d studies valid (%.1fs)", len(read), time.monotonic() - t0)
        pipeline = volume_pipeline(opts, from_files=False)
        identity = np.arange(len(opts.class_names), dtype=np.uint8)

        def preprocessed():
            for subject_id, site, uid, image, label, affine in read:
                img, lab, meta = preprocess_arrays(image, label, affine, pipeline, identity)
                yield subject_id, site, {**meta, "study_uid": uid}, img, lab

        subjects = write_cache(folder, preprocessed(), "pacs", opts.url, opts.class_names,
                               opts, t0)
    return SubjectSet("pacs", subjects, list(opts.class_names), in_channels=1,
                      description=f"MR + SEG studies from the PACS at {opts.url}")
