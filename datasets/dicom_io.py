"""Volumes to and from DICOM: an MR series (one instance per slice) and its DICOM SEG.

Geometry goes through highdicom's :class:`highdicom.Volume` (Bridge et al. 2022, J. Digit.
Imaging 35:1719): a NIfTI-style RAS affine becomes the series' Image Position / Orientation
(Patient) and Pixel Spacing on the way in, and comes back from them on the way out. Images are
stored as 16-bit integers with Rescale Slope/Intercept (the modality transform every MR reader
applies), so a float image comes back within half a rescale step (``rescale_step``). Labels go
into a labelmap-style binary SEG, one segment per class, segment number = label value: exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
INT16_MAX = 32767


@dataclass
class Study:
    """One subject as DICOM: its MR instances and the SEG that labels them."""

    mr: list
    seg: object


def rescale_step(image: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) mapping int16 stored values onto ``image``'s range."""
    lo, hi = float(np.min(image)), float(np.max(image))
    intercept = (lo + hi) / 2.0
    slope = max(hi - lo, 1e-12) / (2.0 * INT16_MAX - 2.0)
    # DS holds at most 16 characters: round the slope up to what a DS can carry exactly
    slope = float(f"{slope:.8e}")
    return slope, float(f"{intercept:.8e}")


def _mr_instance(vol, k: int, pixels: np.ndarray, slope: float, intercept: float, ids: dict):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.preamble = b"\0" * 128  # a Part 10 file: STOW-RS stores the bytes as written
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MR_STORAGE
    uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID, ds.SOPInstanceUID = MR_STORAGE, uid
    ds.Modality = "MR"
    ds.PatientID, ds.PatientName = ids["patient_id"], f"{ids['patient_id']}^"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ids["study"], ids["series"]
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
    ds.SeriesDescription = ids.get("description", "T2w")
    ds.InstitutionName = ids["site"]
    ds.Manufacturer = "privseg"
    ds.FrameOfReferenceUID = ids["frame_of_reference"]
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
    ds.MRAcquisitionType = "3D"
    ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = 100, 1000, 1
    ds.ImagePositionPatient = list(vol.get_plane_position(k)[0].ImagePositionPatient)
    ds.ImageOrientationPatient = list(vol.get_plane_orientation()[0].ImageOrientationPatient)
    measures = vol.get_pixel_measures()[0]
    ds.PixelSpacing = list(measures.PixelSpacing)
    ds.SliceThickness = measures.SliceThickness
    ds.SpacingBetweenSlices = measures.SliceThickness
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    stored = np.clip(np.rint((pixels - intercept) / slope), -INT16_MAX, INT16_MAX)
    ds.PixelData = stored.astype("<i2").tobytes()
    return ds


def volume_to_study(
    image_xyz: np.ndarray,
    label_xyz: np.ndarray,
    affine_ras: np.ndarray,
    patient_id: str,
    site: str,
    segment_labels: dict[int, str],
):
    """An MR series + DICOM SEG for one subject given as NIfTI-style arrays (x, y, z) in RAS.

    ``segment_labels`` names each segment number (= label value, background 0 excluded).
    Returns :class:`Study`.
    """
    import highdicom as hd
    import nibabel as nib
    from pydicom.uid import generate_uid

    for_uid = generate_uid()
    vol = hd.Volume.from_nibabel(
        nib.Nifti1Image(np.asarray(image_xyz, np.float32), affine_ras),
        frame_of_reference_uid=for_uid,
    )
    lab = hd.Volume.from_nibabel(
        nib.Nifti1Image(np.asarray(label_xyz, np.uint8), affine_ras), frame_of_reference_uid=for_uid
    )
    ids = {"patient_id": patient_id, "site": site, "study": generate_uid(),
           "series": generate_uid(), "frame_of_reference": for_uid}
    slope, intercept = rescale_step(vol.array)
    mr = [_mr_instance(vol, k, vol.array[k], slope, intercept, ids)
          for k in range(vol.spatial_shape[0])]
    seg = labels_to_seg(mr, lab.array, segment_labels)
    return Study(mr, seg)


def labels_to_seg(mr: list, labels_krc: np.ndarray, segment_labels: dict[int, str]):
    """A binary DICOM SEG (highdicom) of ``labels_krc`` (slice, row, column) over series ``mr``.

    Pixel value ``n`` becomes segment number ``n``; every segment in ``segment_labels`` is
    described, present or not.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    tissue = hd.sr.CodedConcept("85756007", "SCT", "Tissue")
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=name, segmented_property_category=tissue,
            segmented_property_type=tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n, name in sorted(segment_labels.items())
    ]
    seg = hd.seg.Segmentation(
        source_images=mr,
        pixel_array=np.asarray(labels_krc, np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="privseg",
        manufacturer_model_name="privseg upload-pacs",
        software_versions="1",
        device_serial_number="0",
    )
    seg.preamble = b"\0" * 128
    return seg


def study_faults(mr: list, seg) -> list[str]:
    """What is wrong with an MR series and its SEG, as messages (empty: they agree).

    The SEG must reference the MR series, and only instances in it, at its rows and columns.
    """
    if seg is None:
        return []
    faults = []
    series = {str(ds.SeriesInstanceUID) for ds in mr}
    sops = {str(ds.SOPInstanceUID) for ds in mr}
    refs = seg.get_source_image_uids()
    ref_series = {str(r[1]) for r in refs}
    if not ref_series <= series:
        faults.append(f"SEG {seg.SOPInstanceUID} references series "
                      f"{', '.join(sorted(ref_series - series))}, not the MR series "
                      f"{', '.join(sorted(series))}")
    missing = {str(r[2]) for r in refs} - sops
    if missing:
        faults.append(f"SEG {seg.SOPInstanceUID} frames reference {len(missing)} instance(s) "
                      f"not in MR series {', '.join(sorted(series))}")
    size = (int(mr[0].Rows), int(mr[0].Columns))
    if (int(seg.Rows), int(seg.Columns)) != size:
        faults.append(f"SEG {seg.SOPInstanceUID} frames are {seg.Rows}x{seg.Columns}, "
                      f"the MR series {size[0]}x{size[1]}")
    return faults


def study_to_volume(mr: list, seg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (x, y, z) float32, label (x, y, z) uint8 segment numbers, RAS affine).

    The geometry is the MR series' (highdicom ``get_volume_from_series``, which also checks
    that the slices are parallel and evenly spaced); the SEG is resampled onto it without
    interpolation (``match_geometry``), so missing empty frames become background.
    """
    import highdicom as hd

    vol = hd.get_volume_from_series(mr, dtype=np.float32)
    lab = seg.get_volume(combine_segments=True, dtype=np.uint8).match_geometry(vol)
    image_nii, label_nii = vol.to_nibabel(), lab.to_nibabel()
    return (np.asarray(image_nii.dataobj, np.float32), np.asarray(label_nii.dataobj, np.uint8),
            np.asarray(image_nii.affine))
