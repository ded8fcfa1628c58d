"""wldm_auto.io: image round trips (geometry exact), DICOM series, rejections, atomic writes, files helpers."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PHANTOM_DIR, TEST_DATA
from wldm_auto.io import (
    Geometry,
    ImageReadError,
    file_ending,
    hash_data,
    hash_file,
    image_from_array,
    is_dicom_folder,
    read_image,
    read_json,
    save_npy,
    strip_ending,
    write_image,
    write_json,
)
from wldm_auto.io import images as images_module

DICOM_DIR = TEST_DATA / "totalsegmentator_examples" / "example_ct_dicom"
ENDINGS = (".nii.gz", ".mha", ".nrrd", ".mhd")


def rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


OBLIQUE = rotation(0, 20.0) @ rotation(2, 20.0)  # 20 degrees about x and about z


def oblique_image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 1.3, 2.9))
    image.SetOrigin((-12.345678, 3.21, 100.5))
    image.SetDirection(OBLIQUE.ravel().tolist())
    return image


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64])
def test_round_trip_oblique_odd_size(tmp_path, ending, dtype):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(7, 6, 5)) * 1000).astype(dtype)  # odd, unequal sizes (z, y, x)
    image = oblique_image(array)
    assert abs(np.linalg.det(OBLIQUE) - 1) < 1e-12 and not np.allclose(OBLIQUE, np.eye(3))
    path = tmp_path / f"img{ending}"
    write_image(image, path)
    back = read_image(path)

    assert back.GetSize() == (5, 6, 7)
    assert back.GetPixelID() == image.GetPixelID()
    assert np.array_equal(sitk.GetArrayFromImage(back), array)
    want, got = Geometry.of(image), Geometry.of(back)
    if ending in (".mha", ".mhd"):
        assert got == want  # bit exact
    elif ending == ".nrrd":
        # NRRD stores direction*spacing as text: exact size/spacing/origin, direction to 1 ulp
        assert got.spacing == want.spacing and got.origin == want.origin
        assert np.max(np.abs(np.subtract(got.direction, want.direction))) < 1e-15
    else:
        # NIfTI keeps pixdim / sform in float32
        assert got.size == want.size
        assert np.max(np.abs(np.subtract(got.spacing, want.spacing))) < 1e-6
        assert np.max(np.abs(np.subtract(got.origin, want.origin))) < 1e-5
        assert np.max(np.abs(np.subtract(got.direction, want.direction))) < 1e-6
    assert got.is_close(want, tol=1e-5)
    assert not got.is_close(Geometry.of(sitk.GetImageFromArray(array)))


def test_round_trip_real_phantom_nifti_and_mha(tmp_path, small_phantom):
    mr, ct = small_phantom
    for image, name in ((mr, "mr"), (ct, "ct")):
        for ending in (".nii.gz", ".mha"):
            path = tmp_path / f"{name}{ending}"
            write_image(image, path)
            back = read_image(path)
            assert Geometry.of(back).is_close(Geometry.of(image), tol=1e-6)
            assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    assert files_in(tmp_path) == ["ct.mha", "ct.nii.gz", "mr.mha", "mr.nii.gz"]


def test_mhd_writes_header_and_data(tmp_path):
    image = oblique_image(np.arange(7 * 6 * 5, dtype=np.int16).reshape(7, 6, 5))
    write_image(image, tmp_path / "a.mhd")
    assert files_in(tmp_path) == ["a.mhd", "a.zraw"]
    write_image(image, tmp_path / "b.mhd", compress=False)
    assert (tmp_path / "b.raw").stat().st_size == 7 * 6 * 5 * 2


def test_read_image_casts_pixel_type(tmp_path):
    array = np.arange(-30, 30, dtype=np.int16).reshape(3, 4, 5)
    write_image(image_from_array(array), tmp_path / "a.nrrd")
    image = read_image(tmp_path / "a.nrrd", pixel_type=sitk.sitkFloat32)
    assert image.GetPixelID() == sitk.sitkFloat32
    assert np.array_equal(sitk.GetArrayFromImage(image), array.astype(np.float32))


def test_image_from_array_copies_reference_geometry():
    ref = oblique_image(np.zeros((7, 6, 5), np.int16))
    image = image_from_array(np.ones((7, 6, 5), np.float32), ref)
    assert Geometry.of(image) == Geometry.of(ref)
    assert Geometry.of(image).shape_zyx == (7, 6, 5)
    assert Geometry.of(image).extent_mm == pytest.approx((3.5, 7.8, 20.3))


def test_geometry_dict_round_trip_and_apply(tmp_path):
    geometry = Geometry.of(oblique_image(np.zeros((7, 6, 5), np.int16)))
    write_json(geometry.to_dict(), tmp_path / "g.json")
    again = Geometry.from_dict(read_json(tmp_path / "g.json"))
    assert again == geometry
    reference = again.reference_image(sitk.sitkFloat32)
    assert Geometry.of(reference) == geometry and reference.GetPixelID() == sitk.sitkFloat32
    with pytest.raises(ValueError, match="does not match"):
        geometry.apply_to(sitk.Image([5, 6, 6], sitk.sitkUInt8))


def test_file_endings():
    assert file_ending("a/B.NII.GZ") == ".nii.gz" and file_ending("x.nii") == ".nii"
    assert file_ending("x.png") is None
    assert strip_ending("/x/case_0000.nii.gz") == "case_0000" and strip_ending("a.mha") == "a"
    assert strip_ending("a.txt") == "a.txt"


def test_write_image_rejects_unknown_ending(tmp_path):
    with pytest.raises(ValueError, match="unsupported file ending"):
        write_image(sitk.Image([2, 2, 2], sitk.sitkUInt8), tmp_path / "a.png")
    assert files_in(tmp_path) == []


# --------------------------------------------------------------------------- DICOM

def test_read_dicom_series_folder():
    assert is_dicom_folder(DICOM_DIR)
    assert not is_dicom_folder(PHANTOM_DIR)
    image = read_image(DICOM_DIR)
    assert image.GetSize() == (512, 512, 20)
    assert image.GetSpacing() == pytest.approx((0.9765625, 0.9765625, 2.0), abs=1e-6)
    assert image.GetDirection() == pytest.approx(np.eye(3).ravel().tolist())
    array = sitk.GetArrayViewFromImage(image)
    assert -2048 <= array.min() <= -1024
    assert array.max() > 500
    # the body (soft tissue around 0 HU) is a real part of the volume
    assert 0.05 < np.mean((array > -200) & (array < 200)) < 0.9


def write_dicom_series(folder: Path, slices: int, uid: str) -> None:
    """A small int16 CT series (9x8 pixels, 1x1x3 mm) with its own SeriesInstanceUID."""
    volume = sitk.GetImageFromArray(np.arange(slices * 8 * 9, dtype=np.int16).reshape(slices, 8, 9))
    volume.SetSpacing((1.0, 1.0, 3.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(slices):
        image = volume[:, :, k]
        tags = {
            "0020|000e": uid, "0020|000d": uid + ".0", "0008|0018": f"{uid}.{k + 1}",
            "0020|0013": str(k + 1), "0008|0060": "CT", "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0032": "\\".join(str(v) for v in volume.TransformIndexToPhysicalPoint((0, 0, k))),
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"second_{k:03d}.dcm"))
        writer.Execute(image)


@pytest.mark.parametrize("second_slices", [3, 25])
def test_dicom_folder_with_two_series_reads_the_larger(tmp_path, caplog, second_slices):
    folder = tmp_path / "dicom"
    shutil.copytree(DICOM_DIR, folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    uid = "1.2.826.0.1.3680043.2.1125.99.4242"
    write_dicom_series(folder, second_slices, uid)
    assert len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))) == 2

    with caplog.at_level(logging.INFO, logger="wldm_auto.io.images"):
        image = read_image(folder)
    messages = [r.getMessage() for r in caplog.records if r.name == "wldm_auto.io.images"]
    assert len(messages) == 1 and "2 DICOM series" in messages[0]
    if second_slices == 3:
        assert image.GetSize() == (512, 512, 20)
        assert "20 files" in messages[0]
    else:
        assert image.GetSize() == (9, 8, 25)
        assert image.GetSpacing() == pytest.approx((1.0, 1.0, 3.0))
        assert uid in messages[0] and "25 files" in messages[0]
        assert np.array_equal(sitk.GetArrayViewFromImage(image),
                              np.arange(25 * 8 * 9, dtype=np.int16).reshape(25, 8, 9))


def test_folder_without_dicom_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ImageReadError, match="no DICOM series") as info:
        read_image(tmp_path)
    assert str(tmp_path) in str(info.value)


# --------------------------------------------------------------------------- rejections

def _volume(*shape, dtype=np.int16):
    return sitk.GetImageFromArray(np.zeros(shape, dtype))


def _with_value(value, dtype=np.float32):
    array = np.ones((3, 4, 5), dtype)
    array[1, 2, 3] = value
    return sitk.GetImageFromArray(array)


BAD_IMAGES = {
    "2d": (lambda: _volume(5, 6), "expected a 3D image, got 2D"),
    "4d": (lambda: sitk.JoinSeries([_volume(4, 5, 6)] * 3), "expected a 3D image, got 4D"),
    "vector": (lambda: sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32), isVector=True),
               "expected one value per voxel, got 3"),
    "flat": (lambda: _volume(1, 5, 6), "empty or flat"),
    "nan": (lambda: _with_value(np.nan), "1 NaN/inf"),
    "inf": (lambda: _with_value(np.inf), "1 NaN/inf"),
    "neg_inf64": (lambda: _with_value(-np.inf, np.float64), "1 NaN/inf"),
}


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_bad_images_rejected_naming_the_file(tmp_path, kind, ending):
    make, reason = BAD_IMAGES[kind]
    path = tmp_path / f"{kind}{ending}"
    sitk.WriteImage(make(), str(path))
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert reason in str(info.value)


def test_nan_check_can_be_skipped(tmp_path):
    path = tmp_path / "nan.mha"
    sitk.WriteImage(_with_value(np.nan), str(path))
    image = read_image(path, check_values=False)
    assert np.isnan(sitk.GetArrayViewFromImage(image)).sum() == 1


def test_finite_float_nifti_accepted(tmp_path):
    array = np.linspace(-1e30, 1e30, 60, dtype=np.float32).reshape(3, 4, 5)
    path = tmp_path / "ok.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    assert np.array_equal(sitk.GetArrayFromImage(read_image(path)), array)


def test_nifti_4d_with_one_volume_reads_as_3d(tmp_path):
    path = tmp_path / "t1.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([_volume(4, 5, 6)]), str(path))
    assert read_image(path).GetSize() == (6, 5, 4)


def test_missing_file_rejected(tmp_path):
    path = tmp_path / "missing.nii.gz"
    with pytest.raises(ImageReadError, match="not found") as info:
        read_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["x.nii.gz", "x.mha", "x.nrrd"])
def test_non_image_file_rejected(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match="cannot be read as an image") as info:
        read_image(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- atomic writes

@pytest.mark.parametrize("ending", [".nii.gz", ".mha", ".nrrd"])
def test_write_image_leaves_no_temporary_file(tmp_path, ending, small_phantom):
    path = tmp_path / "sub" / f"out{ending}"
    write_image(small_phantom[1], path)
    assert files_in(path.parent) == [path.name]
    write_image(small_phantom[0], path)  # overwrite
    assert files_in(path.parent) == [path.name]
    assert np.array_equal(sitk.GetArrayFromImage(read_image(path)), sitk.GetArrayViewFromImage(small_phantom[0]))


def _fail_after_partial_write(image, filename, *args, **kwargs):
    Path(filename).write_bytes(b"half an image")
    raise RuntimeError("disk full")


@pytest.mark.parametrize("ending", [".nii.gz", ".mha", ".nrrd"])
def test_failed_write_leaves_no_file(tmp_path, monkeypatch, ending, small_phantom):
    monkeypatch.setattr(images_module.sitk, "WriteImage", _fail_after_partial_write)
    path = tmp_path / f"out{ending}"
    with pytest.raises(RuntimeError, match="disk full"):
        write_image(small_phantom[1], path)
    assert files_in(tmp_path) == []


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch, small_phantom):
    path = tmp_path / "out.nii.gz"
    write_image(small_phantom[1], path)
    before = path.read_bytes()
    monkeypatch.setattr(images_module.sitk, "WriteImage", _fail_after_partial_write)
    with pytest.raises(RuntimeError):
        write_image(small_phantom[0], path)
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["out.nii.gz"]


# --------------------------------------------------------------------------- files.py

def test_json_round_trip_with_numpy(tmp_path):
    data = {
        "i": np.int64(7), "f": np.float32(0.5), "d": np.float64(1 / 3), "b": np.bool_(True),
        "arr": np.arange(6, dtype=np.int16).reshape(2, 3), "spacing": (np.float64(0.75), 2.0),
        "path": tmp_path / "x", 3: "int key", "nested": [{"v": np.uint8(255)}],
    }
    path = tmp_path / "a" / "data.json"
    write_json(data, path)
    back = read_json(path)
    assert back == {
        "i": 7, "f": 0.5, "d": 1 / 3, "b": True, "arr": [[0, 1, 2], [3, 4, 5]], "spacing": [0.75, 2.0],
        "path": str(tmp_path / "x"), "3": "int key", "nested": [{"v": 255}],
    }
    assert type(back["i"]) is int and type(back["f"]) is float
    assert files_in(path.parent) == ["data.json"]
    assert json.loads(path.read_text()) == back


def test_read_json_broken_names_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"a": 1,')
    with pytest.raises(ValueError, match="invalid JSON") as info:
        read_json(path)
    assert str(path) in str(info.value)


def test_hash_file(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    content = bytes(range(256)) * 5000  # > 1 chunk when chunk is small
    a.write_bytes(content)
    b.write_bytes(content)
    assert hash_file(a) == hash_file(b) == hash_file(a, chunk=1000)
    assert len(hash_file(a)) == 32
    changed = bytearray(content)
    changed[123456] ^= 1
    b.write_bytes(bytes(changed))
    assert hash_file(a) != hash_file(b)


def test_hash_file_on_folders(tmp_path):
    for name in ("x", "y"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "1.dcm").write_bytes(b"one")
        (tmp_path / name / "sub" / "2.dcm").write_bytes(b"two")
    x, y = tmp_path / "x", tmp_path / "y"
    assert hash_file(x) == hash_file(y)
    (y / "sub" / "2.dcm").write_bytes(b"twO")
    assert hash_file(x) != hash_file(y)
    (y / "sub" / "2.dcm").write_bytes(b"two")
    assert hash_file(x) == hash_file(y)
    (y / "sub" / "2.dcm").rename(y / "sub" / "3.dcm")  # same bytes, other name
    assert hash_file(x) != hash_file(y)
    assert hash_file(DICOM_DIR) == hash_file(DICOM_DIR)


def test_hash_data_stable():
    assert hash_data({"a": 1, "b": [1, 2]}, "x") == hash_data({"b": [1, 2], "a": 1}, "x")
    assert hash_data({"s": (np.float64(2.0), np.int32(3))}) == hash_data({"s": [2.0, 3]})
    assert hash_data({"a": 1}) != hash_data({"a": 2})
    assert hash_data(1, 2) != hash_data(2, 1)
    assert len(hash_data()) == 32


def test_save_npy_memory_mappable(tmp_path, small_phantom):
    array = sitk.GetArrayFromImage(small_phantom[1]).transpose(2, 0, 1)  # not C-contiguous
    path = tmp_path / "d" / "ct.npy"
    save_npy(array, path)
    loaded = np.load(path, mmap_mode="r")
    assert isinstance(loaded, np.memmap)
    assert loaded.dtype == np.int16 and loaded.shape == (40, 20, 40)
    assert np.array_equal(loaded, array)
    assert files_in(path.parent) == ["ct.npy"]
    with pytest.raises(ValueError):
        save_npy(np.array([{"a": 1}], dtype=object), tmp_path / "d" / "obj.npy")
    assert files_in(path.parent) == ["ct.npy"]


def test_every_stage_reads_hu_constants_from_one_module():
    from wldm_auto.evaluation import evaluate, metrics
    from wldm_auto.inference import export
    from wldm_auto.io import hu
    from wldm_auto.planners import fingerprint
    from wldm_auto.preprocessing import registration

    assert metrics.HU_RANGE is hu.SYNTHRAD_RANGE_HU
    assert metrics.DATA_RANGE == 4024.0 and metrics.BONE_HU == hu.BONE_THRESHOLD_HU == 250.0
    assert metrics.BODY_HU == fingerprint.CT_BODY_HU == hu.BODY_THRESHOLD_HU == -500.0
    assert export.AIR_HU == evaluate.AIR_HU == registration.AIR_HU == hu.AIR_HU == -1024
