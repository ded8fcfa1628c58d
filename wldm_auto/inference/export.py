"""Put a prediction made on the preprocessed grid back onto the input MR's grid; int16 HU; DICOM series."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from wldm_auto import __version__
from wldm_auto.io.dicom import read_source_series, write_ct_slices
from wldm_auto.io.geometry import Geometry
from wldm_auto.io.files import atomic_folder, write_error
from wldm_auto.io import hu
from wldm_auto.io.images import ImageWriteError, write_image

log = logging.getLogger(__name__)

AIR_HU = hu.AIR_HU
# plan inference.export_interpolation -> SimpleITK interpolator (planners.schema.EXPORT_INTERPOLATIONS)
EXPORT_INTERPOLATORS = {"bspline": sitk.sitkBSpline, "linear": sitk.sitkLinear}


BSPLINE_MIN_SAMPLES = 4  # a cubic B-spline's support: fewer samples along an axis and ITK's result is undefined


def to_input_grid(values: np.ndarray, properties: dict[str, Any], reference: sitk.Image, body: sitk.Image,
                  outside: float, interpolation: str = "linear") -> sitk.Image:
    """(z, y, x) float values on the preprocessed grid -> float32 image on ``reference``'s grid.

    ``interpolation``: a key of :data:`EXPORT_INTERPOLATORS` (plan ``inference.export_interpolation``).
    Voxels outside the preprocessed (cropped) region and outside ``body``
    get ``outside``.
    """
    grid = Geometry.from_dict(properties["preprocessed_geometry"])
    image = grid.apply_to(sitk.GetImageFromArray(values.astype(np.float32)))
    if interpolation == "bspline" and min(values.shape) < BSPLINE_MIN_SAMPLES:
        # a cubic B-spline needs 4 samples along every axis: on fewer ITK returns garbage (huge values, NaN)
        log.info("export: %s voxels on the plan grid, fewer than %d along an axis: linear instead of B-spline",
                 tuple(values.shape), BSPLINE_MIN_SAMPLES)
        interpolation = "linear"
    out = sitk.Resample(image, reference, sitk.Transform(), EXPORT_INTERPOLATORS[interpolation], float(outside),
                        sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(out)
    array[sitk.GetArrayViewFromImage(body) == 0] = outside
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(reference)
    return result


def hu_int16(image: sitk.Image, window: tuple[float, float]) -> sitk.Image:
    """Round and clip HU to the CT window and int16; ValueError if any voxel is NaN or infinite (casting would
    write it as 0 HU, water, without a word)."""
    values = sitk.GetArrayViewFromImage(image)
    bad = np.count_nonzero(~np.isfinite(values))
    if bad:
        raise ValueError(f"the sCT holds {bad} NaN/inf voxels (a network or setting produced non-finite values); "
                         "nothing was written")
    array = np.clip(np.rint(values), window[0], window[1]).astype(np.int16)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def write_dicom_series(image: sitk.Image, folder: Path, series_description: str = "SYNTHETIC CT (wldm_auto)",
                       derivation: str = "", source: Path | None = None, identity: Sequence[str] = ()) -> None:
    """Write an int16 HU volume as a CT DICOM series flagged as derived (``DERIVED\\SECONDARY``).

    ``source``: the DICOM series folder of the MR the sCT was made from; the
    series then carries its patient module, Study Instance UID, Frame of
    Reference UID and patient position, with UIDs of its own reproducible from
    the MR series, ``identity`` (the model) and the voxels (:mod:`wldm_auto.io.dicom`).
    None (NIfTI input): new UIDs. The slices go to a temporary folder that replaces
    ``folder`` only once every slice is written: a failed write (full disk) is an
    :class:`ImageWriteError` naming ``folder`` and leaves no partial series.
    """
    reference = read_source_series(source) if source is not None else None
    try:
        with atomic_folder(folder) as tmp:
            write_ct_slices(image, tmp, series_description, derivation, reference, identity,
                            f"wldm_auto {__version__}")
    except ImageWriteError:
        raise
    except (OSError, RuntimeError) as exc:
        raise write_error(folder, exc, ImageWriteError) from exc


def write_prediction(image: sitk.Image, path: Path) -> None:
    write_image(image, path)
