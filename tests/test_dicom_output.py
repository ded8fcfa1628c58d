"""--dicom-out that belongs to the patient (inherited patient/study/frame, reproducible UIDs) and --mumap."""
from __future__ import annotations

import locale
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import PHANTOM_DIR, crop_center, oblique, tiny_copy
from wldm_auto.cli.predict import main as predict_main
from wldm_auto.inference.attenuation import hu_to_mu
from wldm_auto.trainers.base import TrainerOptions
from wldm_auto.trainers.run import run_training

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "WLDM-0042", "PatientBirthDate": "19700101", "PatientSex": "F"}
MR_UIDS = {"StudyInstanceUID": "1.2.826.0.1.3680043.2.1125.1", "SeriesInstanceUID": "1.2.826.0.1.3680043.2.1125.2",
           "FrameOfReferenceUID": "1.2.826.0.1.3680043.2.1125.3"}
IDENTIFYING = (*PATIENT, "StudyInstanceUID", "FrameOfReferenceUID", "PatientPosition", "StudyDate", "StudyTime")


def write_mr_series(folder: Path, image: sitk.Image) -> None:
    """``image`` as an int16 MR DICOM series (SimpleITK/GDCM writer) with patient, study and frame tags."""
    folder.mkdir(parents=True)
    volume = sitk.Cast(image, sitk.sitkInt16)
    d = np.reshape(volume.GetDirection(), (3, 3))
    tags = {"0010|0010": PATIENT["PatientName"], "0010|0020": PATIENT["PatientID"],
            "0010|0030": PATIENT["PatientBirthDate"], "0010|0040": PATIENT["PatientSex"],
            "0020|000d": MR_UIDS["StudyInstanceUID"], "0020|000e": MR_UIDS["SeriesInstanceUID"],
            "0020|0052": MR_UIDS["FrameOfReferenceUID"], "0018|5100": "HFS", "0008|0060": "MR",
            "0008|0016": MR_IMAGE_STORAGE, "0008|0020": "20240102", "0008|0030": "101500",
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*d[:, 0], *d[:, 1]))}
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    # GDCM's writer leaves the process in the "C" locale; later tests that decode a subprocess's output
    # (text=True uses the locale's encoding) would then read UTF-8 as ASCII and fail: restore it.
    ctype = locale.setlocale(locale.LC_CTYPE)
    try:
        _write_slices(writer, volume, tags, folder)
    finally:
        locale.setlocale(locale.LC_CTYPE, ctype)


def _write_slices(writer: sitk.ImageFileWriter, volume: sitk.Image, tags: dict[str, str], folder: Path) -> None:
    for k in range(volume.GetDepth()):
        slice_image = volume[:, :, k]
        for key, value in {**tags, "0008|0018": f"{MR_UIDS['SeriesInstanceUID']}.{k + 1}", "0020|0013": str(k + 1),
                           "0020|0032": "\\".join(f"{v:.6f}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k)))
                           }.items():
            slice_image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"mr_{k:03d}.dcm"))
        writer.Execute(slice_image)


@pytest.fixture(scope="module")
def model(preprocessed_small, tmp_path_factory):
    """A regression model (4 steps): deterministic, so two runs give the same voxels."""
    monkeypatch = pytest.MonkeyPatch()
    dataset = tiny_copy(preprocessed_small, tmp_path_factory.mktemp("dicom_model"), monkeypatch)
    folder = run_training(dataset, "regression", 0, options=TrainerOptions(
        device="cpu", num_workers=0, num_steps=4, steps_per_epoch=2)).parent.parent
    yield folder
    monkeypatch.undo()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """``dicom/mrcase/``: an oblique phantom MR as a DICOM series; ``nifti/mrcase.nii.gz``: the same image."""
    root = tmp_path_factory.mktemp("dicom_in")
    mr = oblique(crop_center(sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz")), (64, 60, 14)))
    write_mr_series(root / "dicom" / "mrcase", mr)
    (root / "nifti").mkdir()
    sitk.WriteImage(mr, str(root / "nifti" / "mrcase.nii.gz"))
    return root


def predict(inputs: Path, out: Path, model: Path, *extra: str) -> None:
    assert predict_main(["-i", str(inputs), "-o", str(out), "-m", str(model), "--device", "cpu", "--dicom-out",
                         "--file-ending", ".mha", *extra]) == 0


def read_series(folder: Path) -> tuple[sitk.Image, list[pydicom.Dataset]]:
    """(volume as SimpleITK reads the series, pydicom headers in the same slice order)."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    return sitk.ReadImage(files), [pydicom.dcmread(f) for f in files]


def geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def test_dicom_mr_gives_a_ct_series_of_the_same_patient_study_and_frame(model, inputs, tmp_path):
    out = tmp_path / "sct"
    predict(inputs / "dicom", out, model, "--mumap")
    assert sorted(p.name for p in out.iterdir()) == ["mrcase.mha", "mrcase_dicom", "mrcase_mumap.mha"]
    mr, mr_headers = read_series(inputs / "dicom" / "mrcase")
    sct = sitk.ReadImage(str(out / "mrcase.mha"))
    volume, headers = read_series(out / "mrcase_dicom")
    # geometry: the MR's, exactly (the MR's own position/orientation strings are reused), HU exact
    assert geometry(volume) == geometry(mr) == geometry(sct)
    assert volume.GetPixelID() == sitk.sitkInt16
    assert np.array_equal(sitk.GetArrayViewFromImage(volume), sitk.GetArrayViewFromImage(sct))
    assert (sitk.GetArrayViewFromImage(sct) == -1024).any() and (sitk.GetArrayViewFromImage(sct) > -500).any()
    series_uids = {h.SeriesInstanceUID for h in headers}
    assert len(series_uids) == 1 and MR_UIDS["SeriesInstanceUID"] not in series_uids
    assert len({h.SOPInstanceUID for h in headers}) == len(headers) == sct.GetDepth()
    for z, (header, source) in enumerate(zip(headers, mr_headers)):
        for keyword in IDENTIFYING:  # patient module, study, frame of reference, patient position
            assert header[keyword].value == source[keyword].value, keyword
        assert header.Modality == "CT" and header.SOPClassUID == CT_IMAGE_STORAGE
        assert list(header.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert header.SeriesDescription.startswith("SYNTHETIC CT RegressionTrainer f0 ")
        assert "RegressionTrainer__wldmPlans__3d_wldm" in header.DerivationDescription
        assert (header.RescaleSlope, header.RescaleIntercept, header.RescaleType) == (1, 0, "HU")
        assert header.ImagePositionPatient == source.ImagePositionPatient  # the same slice plane, same strings
        assert header.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert header.SourceImageSequence[0].ReferencedSOPClassUID == MR_IMAGE_STORAGE
        hu = header.pixel_array.astype(np.int32) * int(header.RescaleSlope) + int(header.RescaleIntercept)
        assert np.array_equal(hu, sitk.GetArrayViewFromImage(sct)[z])
    # the same input and model give the same UIDs (not the clock's)
    again = tmp_path / "again"
    predict(inputs / "dicom", again, model)
    _, repeated = read_series(again / "mrcase_dicom")
    assert [h.SOPInstanceUID for h in repeated] == [h.SOPInstanceUID for h in headers]
    assert repeated[0].SeriesInstanceUID == headers[0].SeriesInstanceUID
    # --mumap: float32 cm^-1 at 511 keV on the sCT's grid, 0 in air
    mumap = sitk.ReadImage(str(out / "mrcase_mumap.mha"))
    assert mumap.GetPixelID() == sitk.sitkFloat32 and geometry(mumap) == geometry(sct)
    values = sitk.GetArrayViewFromImage(mumap)
    assert np.array_equal(values, hu_to_mu(sitk.GetArrayViewFromImage(sct)))
    assert values[sitk.GetArrayViewFromImage(sct) == -1024].max() == 0.0 and 0.05 < values.max() < 0.2


def test_nifti_mr_gives_new_uids_and_no_patient(model, inputs, tmp_path):
    headers = []
    for name in ("a", "b"):
        predict(inputs / "nifti", tmp_path / name, model, "--file-ending", ".nii.gz")
        volume, series = read_series(tmp_path / name / "mrcase_dicom")
        sct = sitk.ReadImage(str(tmp_path / name / "mrcase.nii.gz"))
        assert np.array_equal(sitk.GetArrayViewFromImage(volume), sitk.GetArrayViewFromImage(sct))
        assert volume.GetSize() == sct.GetSize()
        np.testing.assert_allclose(volume.GetOrigin(), sct.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(volume.GetDirection(), sct.GetDirection(), atol=1e-6)
        headers.append(series[0])
    first, second = headers
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert first[keyword].value != second[keyword].value, keyword
        assert first[keyword].value not in MR_UIDS.values()
    assert first.PatientName == "" and first.PatientID == "" and "SourceImageSequence" not in first


def test_full_hu_range_round_trips_exactly(inputs, tmp_path):
    """Every int16 HU of the CT window survives the DICOM series (signed 16 bit, slope 1, intercept 0)."""
    from wldm_auto.inference.export import write_dicom_series

    mr = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(inputs / "dicom" / "mrcase")))
    values = np.random.default_rng(0).integers(-1024, 3072, size=sitk.GetArrayViewFromImage(mr).shape, dtype=np.int16)
    values.flat[:2] = (-1024, 3071)
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(mr)
    write_dicom_series(image, tmp_path / "ct", source=inputs / "dicom" / "mrcase", identity=["test"])
    volume, headers = read_series(tmp_path / "ct")
    assert np.array_equal(sitk.GetArrayViewFromImage(volume), values) and geometry(volume) == geometry(mr)
    assert headers[0].PatientID == PATIENT["PatientID"] and headers[0].PixelRepresentation == 1
    # different voxels: a different series (its UIDs never name two different images)
    values[0, 0, 0] += 1
    other = sitk.GetImageFromArray(values)
    other.CopyInformation(mr)
    write_dicom_series(other, tmp_path / "ct2", source=inputs / "dicom" / "mrcase", identity=["test"])
    assert read_series(tmp_path / "ct2")[1][0].SeriesInstanceUID != headers[0].SeriesInstanceUID
    # a failed write leaves no partial series and keeps what was there
    before = sorted(p.name for p in (tmp_path / "ct").iterdir())
    with pytest.raises(ValueError, match="int16"):
        write_dicom_series(sitk.Cast(image, sitk.sitkFloat32), tmp_path / "ct")
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "ct2"]


def test_anonymised_dicom_series_without_uids(model, tmp_path, caplog):
    """The real (anonymised) CT series has a frame of reference but empty study and series UIDs: the sCT
    keeps the frame and the (empty) patient tags and gets a study UID of its own, with a warning."""
    from conftest import TEST_DATA

    source = TEST_DATA / "totalsegmentator_examples" / "example_ct_dicom"
    shutil.copytree(source, tmp_path / "in" / "anon")
    predict(tmp_path / "in", tmp_path / "out", model)
    volume, headers = read_series(tmp_path / "out" / "anon_dicom")
    original = pydicom.dcmread(sorted(source.iterdir())[0], stop_before_pixels=True)
    assert original.StudyInstanceUID == "" and original.FrameOfReferenceUID
    assert headers[0].FrameOfReferenceUID == original.FrameOfReferenceUID
    assert headers[0].StudyInstanceUID and headers[0].PatientPosition == "HFS"
    assert headers[0].IssuerOfPatientID == original.IssuerOfPatientID and headers[0].SpecificCharacterSet == "ISO_IR 100"
    assert "SourceImageSequence" not in headers[0]  # the source slices have no SOP Instance UIDs to point to
    assert geometry(volume) == geometry(sitk.ReadImage(str(tmp_path / "out" / "anon.mha")))
    assert "has no StudyInstanceUID" in caplog.text
