"""Read and write 3D images with SimpleITK, geometry preserved.

``read_image`` accepts NIfTI, MHA/MHD, NRRD files and folders holding a DICOM
series, and rejects with an :class:`ImageReadError` naming the file anything
that would poison later stages: unreadable, not 3D, empty, NaN or inf.
"""
from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from wldm_auto.io.files import atomic_path

log = logging.getLogger(__name__)

FILE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


class ImageReadError(ValueError):
    """An input image cannot be used; the message names the file and the reason."""


def file_ending(path: str | os.PathLike) -> str | None:
    """The supported ending of ``path`` (``.nii.gz`` counts as one), or None."""
    name = Path(path).name.lower()
    return next((e for e in FILE_ENDINGS if name.endswith(e)), None)


def strip_ending(path: str | os.PathLike) -> str:
    """File name without its supported ending (``a.nii.gz`` -> ``a``)."""
    name = Path(path).name
    ending = file_ending(name)
    return name[: -len(ending)] if ending else name


def is_dicom_folder(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder holding at least one DICOM series."""
    path = Path(path)
    return path.is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def read_dicom_series(folder: str | os.PathLike) -> sitk.Image:
    """Read the DICOM series with the most files in ``folder`` (logging which)."""
    folder = str(folder)
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series_ids:
        raise ImageReadError(f"{folder}: no DICOM series found")
    files_per_series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid) for sid in series_ids}
    chosen = max(series_ids, key=lambda sid: len(files_per_series[sid]))
    if len(series_ids) > 1:
        log.info("%s: %d DICOM series, reading the largest (%s, %d files)",
                 folder, len(series_ids), chosen, len(files_per_series[chosen]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files_per_series[chosen])
    return reader.Execute()


def read_image(path: str | os.PathLike, pixel_type: int | None = None, check_values: bool = True) -> sitk.Image:
    """Read a 3D image file or DICOM series folder; validate it.

    ``pixel_type`` casts on read (e.g. ``sitk.sitkFloat32``). With
    ``check_values`` the voxels are checked for NaN/inf.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    try:
        if path.is_dir():
            image = read_dicom_series(path)
        else:
            image = sitk.ReadImage(str(path))
    except ImageReadError:
        raise
    except RuntimeError as exc:
        lines = [line.split("ERROR:", 1)[-1].strip() for line in str(exc).splitlines() if "ERROR:" in line]
        reason = lines[-1] if lines else str(exc).strip().splitlines()[-1]
        raise ImageReadError(f"{path}: cannot be read as an image ({reason[:200]})") from None
    check_image(image, path, check_values)
    if check_values and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64) and file_ending(path) in (".nii", ".nii.gz"):
        bad = _nifti_nonfinite_count(path)  # ITK's NIfTI reader silently turns NaN/inf into 0
        if bad:
            raise ImageReadError(f"{path}: holds {bad} NaN/inf voxels")
    if pixel_type is not None and image.GetPixelID() != pixel_type:
        image = sitk.Cast(image, pixel_type)
    return image


def _nifti_nonfinite_count(path: Path, chunk: int = 1 << 24) -> int:
    """Non-finite voxels stored in a float32/float64 NIfTI-1/2 file (0 for other data types)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        header = handle.read(540)
        order = next((o for o in "<>" if np.frombuffer(header, o + "i4", 1)[0] in (348, 540)), None)
        if order is None:
            return 0
        if np.frombuffer(header, order + "i4", 1)[0] == 348:  # NIfTI-1
            dims = np.frombuffer(header, order + "i2", 8, 40)
            code = int(np.frombuffer(header, order + "i2", 1, 70)[0])
            offset = int(np.frombuffer(header, order + "f4", 1, 108)[0])
        else:  # NIfTI-2
            dims = np.frombuffer(header, order + "i8", 8, 16)
            code = int(np.frombuffer(header, order + "i2", 1, 12)[0])
            offset = int(np.frombuffer(header, order + "i8", 1, 168)[0])
        dtype = {16: np.dtype(order + "f4"), 64: np.dtype(order + "f8")}.get(code)
        if dtype is None:
            return 0
        remaining = int(np.prod(dims[1:int(dims[0]) + 1], dtype=np.int64)) * dtype.itemsize
        handle.seek(offset)
        bad = 0
        while remaining > 0:
            block = handle.read(min(chunk, remaining))
            if not block:
                break
            block = block[: len(block) - len(block) % dtype.itemsize]
            bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(block, dtype))))
            remaining -= len(block)
        return bad


def check_image(image: sitk.Image, name: str | os.PathLike, check_values: bool = True) -> None:
    """Raise ImageReadError unless ``image`` is a non-empty, finite, scalar 3D image."""
    size = image.GetSize()
    if image.GetDimension() != 3:
        # a 4D image whose last axis is 1 is a 3D volume in disguise (common in NIfTI)
        raise ImageReadError(f"{name}: expected a 3D image, got {image.GetDimension()}D of size {size}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{name}: expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()} (vector/RGB image)")
    if min(size) < 2:
        raise ImageReadError(f"{name}: image is empty or flat (size {size}); a 3D volume needs at least 2 voxels per axis")
    if check_values:
        array = sitk.GetArrayViewFromImage(image)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise ImageReadError(f"{name}: holds {bad} NaN/inf voxels")


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write ``image`` atomically; the format follows the file ending."""
    path = Path(path)
    ending = file_ending(path)
    if ending is None:
        raise ValueError(f"{path}: unsupported file ending (use one of {', '.join(FILE_ENDINGS)})")
    if ending in (".mhd", ".nhdr"):
        # header + separate data file: atomic rename of one file is not enough
        sitk.WriteImage(image, str(path), compress)
        return
    with atomic_path(path, suffix=ending) as tmp:
        sitk.WriteImage(image, str(tmp), compress)


def image_from_array(array: np.ndarray, reference: sitk.Image | None = None) -> sitk.Image:
    """Numpy (z, y, x) array -> SimpleITK image with ``reference``'s geometry."""
    image = sitk.GetImageFromArray(array)
    if reference is not None:
        image.CopyInformation(reference)
    return image
