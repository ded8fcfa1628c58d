"""Put a prediction made on the preprocessed grid back onto the input MR's grid."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from wldm_auto.io.geometry import Geometry
from wldm_auto.io.files import write_error
from wldm_auto.io import hu
from wldm_auto.io.images import ImageWriteError, write_image

AIR_HU = hu.AIR_HU


def to_input_grid(values: np.ndarray, properties: dict[str, Any], reference: sitk.Image, body: sitk.Image,
                  outside: float, interpolator: int = sitk.sitkLinear) -> sitk.Image:
    """(z, y, x) float values on the preprocessed grid -> float32 image on ``reference``'s grid.

    Voxels outside the preprocessed (cropped) region and outside ``body``
    get ``outside``.
    """
    grid = Geometry.from_dict(properties["preprocessed_geometry"])
    image = grid.apply_to(sitk.GetImageFromArray(values.astype(np.float32)))
    out = sitk.Resample(image, reference, sitk.Transform(), interpolator, float(outside), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(out)
    array[sitk.GetArrayViewFromImage(body) == 0] = outside
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(reference)
    return result


def hu_int16(image: sitk.Image, window: tuple[float, float]) -> sitk.Image:
    """Round and clip HU to the CT window and int16."""
    array = np.clip(np.rint(sitk.GetArrayViewFromImage(image)), window[0], window[1]).astype(np.int16)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def write_dicom_series(image: sitk.Image, folder: Path, series_description: str = "SYNTHETIC CT (wldm_auto)",
                       frame_of_reference: str | None = None) -> None:
    """Write an int16 HU volume as a CT DICOM series flagged as derived/synthetic.

    The slices go to a temporary folder beside ``folder``, which replaces
    ``folder`` only once every slice is written: a failed write (full disk)
    is an :class:`ImageWriteError` naming ``folder`` and leaves no partial series.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; give the usual mode
        _write_slices(image, tmp, series_description, frame_of_reference)
        old = None
        if folder.exists():
            old = folder.parent / f"{tmp.name}.old"
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except ImageWriteError:
        raise
    except (OSError, RuntimeError) as exc:
        raise write_error(folder, exc, ImageWriteError) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_slices(image: sitk.Image, folder: Path, series_description: str, frame_of_reference: str | None) -> None:
    """One DICOM file per axial slice of ``image`` into ``folder``; each is checked to be non-empty."""
    uid_root = "1.2.826.0.1.3680043.8.498"
    stamp = f"{int(time.time() * 1000)}{np.random.randint(1000, 9999)}"
    series_uid, study_uid = f"{uid_root}.1.{stamp}", f"{uid_root}.2.{stamp}"
    frame = frame_of_reference or f"{uid_root}.3.{stamp}"
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    common = {
        "0008|0060": "CT", "0008|0008": "DERIVED\\SECONDARY\\SYNTHETIC", "0008|103e": series_description,
        "0020|000e": series_uid, "0020|000d": study_uid, "0020|0052": frame, "0008|0070": "wldm_auto",
        "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[0:7:3], *direction[1:8:3])),
        "0028|1052": "0", "0028|1053": "1", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
    }
    for z in range(image.GetDepth()):
        slice_image = image[:, :, z]
        for tag, value in common.items():
            slice_image.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, z))
        slice_image.SetMetaData("0020|0032", "\\".join(f"{v:.4f}" for v in position))
        slice_image.SetMetaData("0020|0013", str(z + 1))
        slice_image.SetMetaData("0008|0018", f"{series_uid}.{z + 1}")
        path = folder / f"slice_{z:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(slice_image)
        pixel_bytes = slice_image.GetNumberOfPixels() * slice_image.GetSizeOfPixelComponent()
        if not path.is_file() or path.stat().st_size < 128 + pixel_bytes:  # ITK may not notice a short write
            raise OSError(f"{path.name} was written incompletely")


def write_prediction(image: sitk.Image, path: Path) -> None:
    write_image(image, path)
