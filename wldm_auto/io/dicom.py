"""DICOM CT series written with pydicom; a derived series can inherit patient, study and frame from its source.

:func:`read_source_series` takes from an MR series (the one :func:`~wldm_auto.io.images.read_image`
reads from that folder) what a series derived from it must share: the patient
module, the study (Study Instance UID, so it lands in the same study), the
Frame of Reference UID (so a planning system fuses it with the MR without
registration), patient position, and per slice the MR's SOP Instance UID and
position. :func:`write_ct_slices` writes an int16 HU volume as a CT Image
Storage series (one file per slice, signed 16 bit, rescale slope 1 / intercept 0,
``HU``), image type ``DERIVED\\SECONDARY\\AXIAL``. With a source its UIDs are
reproducible (hashes of the source series UID, caller-given identities such as
the model's, and the voxels), never taken from the clock; without one (NIfTI
input) study, frame of reference and series get new random UIDs.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from wldm_auto.io.images import ImageReadError, dicom_series_files

log = logging.getLogger(__name__)

# what a derived series takes from its source (Patient, Patient Study, General Study, Frame of Reference,
# and the series' patient position): one place, so the writer and the tests agree
PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID", "OtherPatientIDsSequence",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientComments", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence", "PatientSpeciesDescription",
    "PatientBreedDescription", "ResponsiblePerson", "ResponsibleOrganization",
    "PatientAge", "PatientSize", "PatientWeight",
)
STUDY_KEYWORDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                  "AccessionNumber", "StudyDescription")
FRAME_KEYWORDS = ("FrameOfReferenceUID", "PositionReferenceIndicator")
SERIES_KEYWORDS = ("PatientPosition", "BodyPartExamined")
INHERITED_KEYWORDS = ("SpecificCharacterSet", *PATIENT_KEYWORDS, *STUDY_KEYWORDS, *FRAME_KEYWORDS,
                      *SERIES_KEYWORDS)
# type 2 elements of the CT IOD that are written empty when there is nothing to inherit
EMPTY_IF_UNKNOWN = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator",
                    "SeriesNumber", "KVP", "AcquisitionNumber")
POSITION_TOLERANCE_MM = 1e-3  # the source's own position strings are reused when they agree this well


@dataclass
class SourceSeries:
    """What a series derived from a DICOM series inherits (:data:`INHERITED_KEYWORDS`), plus per slice
    (SimpleITK's order) the source's SOP Instance UID and Image Position (Patient)."""

    folder: Path
    series_uid: str
    sop_class_uid: str
    inherited: Dataset
    orientation: list[Any] | None = None  # ImageOrientationPatient of the first slice, as stored
    pixel_spacing: list[Any] | None = None
    slices: list[tuple[str, list[Any] | None]] = field(default_factory=list)  # (SOP Instance UID, position)


def read_source_series(folder: str | os.PathLike) -> SourceSeries:
    """The headers of the DICOM series in ``folder`` that ``read_image`` reads (the one with the most files).

    ImageReadError naming the folder if a file cannot be read as DICOM."""
    folder = Path(folder)
    files = dicom_series_files(folder, quiet=True)
    headers = []
    for path in files:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (pydicom.errors.InvalidDicomError, OSError, ValueError) as exc:
            raise ImageReadError(f"{path}: cannot read its DICOM header ({str(exc)[:200]})") from None
    first = headers[0]
    inherited = Dataset()
    for keyword in INHERITED_KEYWORDS:
        if keyword in first:
            inherited[keyword] = first[keyword]
    slices = [(str(h.get("SOPInstanceUID", "") or ""), list(h.ImagePositionPatient) if "ImagePositionPatient" in h
               else None) for h in headers]
    return SourceSeries(folder, str(first.get("SeriesInstanceUID", "") or ""), str(first.get("SOPClassUID", "") or ""),
                        inherited, _stored(first, "ImageOrientationPatient"), _stored(first, "PixelSpacing"), slices)


def _stored(header: Dataset, keyword: str) -> list[Any] | None:
    value = header.get(keyword)
    return list(value) if value is not None and len(value) else None


def _ds(values: Sequence[float]) -> list[DSfloat]:
    """Decimal strings of at most 16 characters (DICOM's DS limit)."""
    return [DSfloat(float(v), auto_format=True) for v in values]


def _close(stored: list[Any] | None, wanted: Sequence[float], tolerance: float) -> bool:
    return stored is not None and len(stored) == len(wanted) and \
        all(abs(float(s) - w) <= tolerance for s, w in zip(stored, wanted))


def content_hash(image: sitk.Image) -> str:
    """SHA-256 of an image's voxels and geometry (for reproducible UIDs)."""
    digest = hashlib.sha256(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    digest.update(repr((image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())).encode())
    return digest.hexdigest()


def series_uids(source: SourceSeries | None, identity: Sequence[str], image: sitk.Image) -> dict[str, str]:
    """Study, frame-of-reference and series UIDs of a derived series.

    From ``source``: its study and frame of reference, and a series UID hashed
    from its series UID, ``identity`` (e.g. the model's hash) and the voxels,
    so the same input, model and result always give the same UIDs and a
    different result never reuses them. Without a source (or where it lacks a
    UID): new random UIDs, as for any new study."""
    if source is None:
        return {"StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid(),
                "SeriesInstanceUID": generate_uid()}
    seed = ["wldm_auto derived series", source.series_uid, *identity, content_hash(image)]
    uids = {"SeriesInstanceUID": generate_uid(entropy_srcs=seed)}
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        value = str(source.inherited.get(keyword, "") or "")
        if not value:
            log.warning("%s: the source series has no %s; the synthetic series gets a new one", source.folder,
                        keyword)
            value = generate_uid(entropy_srcs=[keyword, *seed])
        uids[keyword] = value
    return uids


def write_ct_slices(image: sitk.Image, folder: Path, description: str, derivation: str = "",
                    source: SourceSeries | None = None, identity: Sequence[str] = (),
                    software: str = "wldm_auto") -> list[Path]:
    """Write the int16 HU volume ``image`` into ``folder`` (existing), one CT Image Storage file per slice.

    ``description``: Series Description (64 characters at most are kept);
    ``derivation``: Derivation Description (how the image was made);
    ``source``/``identity``: see :func:`series_uids`. Every file is checked to
    be complete after writing (OSError otherwise). Returns the files in slice order.
    """
    if image.GetPixelID() != sitk.sitkInt16 or image.GetDimension() != 3:
        raise ValueError(f"{folder}: a CT series needs a 3D int16 HU image, got {image.GetPixelIDTypeAsString()}")
    uids = series_uids(source, identity, image)
    common = _common_header(image, description, derivation, source, uids, software)
    direction = np.reshape(image.GetDirection(), (3, 3))
    orientation = [*direction[:, 0], *direction[:, 1]]
    spacing = image.GetSpacing()
    stored = source if source is not None else SourceSeries(folder, "", "", Dataset())
    per_slice = len(stored.slices) == image.GetDepth()
    common.ImageOrientationPatient = stored.orientation if _close(stored.orientation, orientation, 1e-6) \
        else _ds(orientation)
    common.PixelSpacing = stored.pixel_spacing if _close(stored.pixel_spacing, (spacing[1], spacing[0]), 1e-6) \
        else _ds((spacing[1], spacing[0]))
    voxels = sitk.GetArrayViewFromImage(image)
    written = []
    for z in range(image.GetDepth()):
        ds = Dataset()
        ds.update(common)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[uids["SeriesInstanceUID"], str(z)])
        ds.InstanceNumber = z + 1
        position = image.TransformIndexToPhysicalPoint((0, 0, z))
        source_position = stored.slices[z][1] if per_slice else None
        ds.ImagePositionPatient = source_position if _close(source_position, position, POSITION_TOLERANCE_MM) \
            else _ds(position)
        if per_slice and stored.slices[z][0] and stored.sop_class_uid:
            reference = Dataset()
            reference.ReferencedSOPClassUID = stored.sop_class_uid
            reference.ReferencedSOPInstanceUID = stored.slices[z][0]
            ds.SourceImageSequence = DicomSequence([reference])
        ds.PixelData = np.ascontiguousarray(voxels[z], dtype="<i2").tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice_{z:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        if not path.is_file() or path.stat().st_size < 128 + voxels[z].nbytes:  # a short write unnoticed
            raise OSError(f"{path.name} was written incompletely")
        written.append(path)
    return written


def _common_header(image: sitk.Image, description: str, derivation: str, source: SourceSeries | None,
                   uids: dict[str, str], software: str) -> Dataset:
    """The elements every slice of the series shares."""
    ds = Dataset()
    if source is not None:
        ds.update(source.inherited)
    for keyword in EMPTY_IF_UNKNOWN:
        if keyword not in ds:
            setattr(ds, keyword, None)
    for keyword, value in uids.items():
        setattr(ds, keyword, value)
    now = datetime.datetime.now()
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.Modality = "CT"
    ds.SeriesDescription = description[:64]
    if derivation:
        ds.DerivationDescription = derivation[:1024]
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.Manufacturer = "wldm_auto"
    ds.SoftwareVersions = software[:64]
    ds.BurnedInAnnotation = "NO"
    ds.SliceThickness = _ds([round(image.GetSpacing()[2], 6)])[0]  # the slice spacing, to a micrometre
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.GetHeight(), image.GetWidth()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    return ds
