"""Images of a folder by case name, and one image brought onto a reference CT's grid (or refused).

Shared by evaluation (``wldm_evaluate``) and the std calibration (``wldm_calibrate_std``): names
without endings, DICOM series sub-folders as ``CASE`` (``CASE_dicom`` too, unless a file for CASE
exists), geometry mismatches as one readable line.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from wldm_auto.io.geometry import Geometry
from wldm_auto.io.images import file_ending, is_dicom_folder, itk_path, strip_ending

log = logging.getLogger(__name__)

DICOM_SUFFIX = "_dicom"
# what wldm_predict writes beside CASE<ending>: the std map, and companions that are never cases of their own
STD_SUFFIX = "_std"
MUMAP_SUFFIX = "_mumap"
CONFIDENCE_SUFFIX = "_confidence"
COMPANION_SUFFIXES = (MUMAP_SUFFIX, CONFIDENCE_SUFFIX)


def short_list(names: Iterable[str], limit: int = 10) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def list_images(folder: str | Path, what: str, exclude: Iterable[Path] = ()) -> dict[str, Path]:
    """Images in ``folder`` by name without ending (files, DICOM sub-folders); ``what`` names the folder in errors.

    Sub-folders in ``exclude`` (e.g. the evaluation's own output folder) are not looked into.
    """
    folder = Path(folder)
    skip = {Path(p).resolve() for p in exclude}
    if not folder.is_dir():
        raise ValueError(f"{what} folder {folder} not found")
    files: dict[str, Path] = {}
    dicoms: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and file_ending(path):
            itk_path(path)  # a name that is not UTF-8 stops the run here, in words (SimpleITK would abort later)
            name = strip_ending(path)
            if name in files:
                raise ValueError(f"{what} folder {folder}: two files for {name} ({files[name].name}, {path.name})")
            files[name] = path
        elif path.is_dir() and path.resolve() not in skip and is_dicom_folder(path):
            itk_path(path)
            name = path.name.removesuffix(DICOM_SUFFIX)
            dicoms.setdefault(name, path)
    for name, path in dicoms.items():
        if name in files:
            log.debug("%s: DICOM folder ignored, %s is used", path, files[name].name)
        else:
            files[name] = path
    return files


def split_predictions(predictions: dict[str, Path]) -> tuple[dict[str, Path], dict[str, Path], list[str]]:
    """(sCTs, std maps by case, orphan std names) of a prediction folder's images (:func:`list_images`).

    ``CASE_std`` is the std map of ``CASE`` (an orphan when there is no ``CASE``); ``CASE_mumap`` and
    ``CASE_confidence`` beside ``CASE`` are not cases."""
    stds = {n[: -len(STD_SUFFIX)]: p for n, p in predictions.items() if n.endswith(STD_SUFFIX)}
    scts = {n: p for n, p in predictions.items() if not n.endswith(STD_SUFFIX)}
    companions = [n for n in scts if any(n.endswith(x) and n[: -len(x)] in scts for x in COMPANION_SUFFIXES)]
    if companions:
        log.info("not cases (mu-maps and confidence masks beside their sCT): %s", short_list(companions))
    scts = {n: p for n, p in scts.items() if n not in companions}
    return scts, stds, sorted(f"{n}{STD_SUFFIX}" for n in set(stds) - set(scts))


def describe(geometry: Geometry) -> str:
    """Readable one-line geometry: size, spacing, origin, direction."""
    def fmt(values: Iterable[float]) -> str:
        return "(" + ", ".join(f"{v + 0.0:.4g}" for v in values) + ")"  # + 0.0: no "-0"
    return (f"size {fmt(geometry.size)} spacing {fmt(geometry.spacing)} origin {fmt(geometry.origin)} "
            f"direction {fmt(geometry.direction)}")


def mismatch_message(case: str, what: str, geometry: Geometry, ct: Geometry) -> str:
    return f"case {case}: {what} {describe(geometry)} vs CT {describe(ct)}"


UNCOVERED_WARNING = 0.001  # share of the scored voxels outside a resampled image's extent that is worth a warning


def on_ct_grid(image: sitk.Image, ct: sitk.Image, case: str, what: str, resample: bool,
               interpolator: int = sitk.sitkLinear, default: float = -1024.0,
               within: np.ndarray | None = None) -> sitk.Image:
    """``image`` on ``ct``'s grid: as is when the geometries match, else resampled (``resample``) or a ValueError.
    Resampled, the voxels outside its extent get ``default``: a warning says how many of the voxels that count
    (``within``, a boolean array on the CT grid, e.g. the evaluation mask; else the whole grid) that is."""
    geometry, reference = Geometry.of(image), Geometry.of(ct)
    if geometry.is_close(reference):
        return image
    if not resample:
        raise ValueError(f"{mismatch_message(case, what, geometry, reference)} (--resample resamples it onto the CT grid)")
    pixel = sitk.sitkUInt8 if interpolator == sitk.sitkNearestNeighbor else sitk.sitkFloat32
    # how much of the CT grid the image covers at all: none means a wrong origin or direction, not a bad sCT
    footprint = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    footprint.CopyInformation(image)
    inside = sitk.GetArrayFromImage(sitk.Resample(footprint, ct, sitk.Transform(), sitk.sitkNearestNeighbor,
                                                  0, sitk.sitkUInt8)) > 0  # a copy: a view dies with its image
    if not inside.any():
        raise ValueError(f"case {case}: the {what} does not overlap the CT at all (its origin {tuple(round(v, 1) for v in geometry.origin)} "
                         f"and extent lie outside the CT's; wrong origin or direction?)")
    if within is None:
        if inside.mean() < 0.5:
            log.warning("case %s: the %s covers only %.0f %% of the CT grid; the rest is scored as %g",
                        case, what, 100 * inside.mean(), default)
    else:
        total, outside = int(np.count_nonzero(within)), int(np.count_nonzero(within & ~inside))
        if total and outside > UNCOVERED_WARNING * total:
            log.warning("case %s: %d of the %d voxels inside the mask (%.1f %%) lie outside the %s's extent and are "
                        "scored as %g", case, outside, total, 100 * outside / total, what, default)
    return sitk.Resample(image, ct, sitk.Transform(), interpolator, default, pixel)


def check_std_values(std: np.ndarray, mask: np.ndarray, where: str) -> None:
    """Refuse a std map with negative or non-finite voxels inside ``mask`` (``where`` names case and file)."""
    values = std[mask]
    negative = int(np.count_nonzero(values < 0))
    non_finite = int(np.count_nonzero(~np.isfinite(values)))
    if negative or non_finite:
        raise ValueError(f"{where}: the std map holds {negative} negative voxels inside the mask and {non_finite} "
                         "non-finite ones (a standard deviation is a finite number >= 0)")
