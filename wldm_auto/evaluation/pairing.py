"""Find and pair the files of an evaluation: CT, sCT (+ std map), mask and MR by case name; geometry checks.

Names: CT ``CASE<ending>``; sCT ``CASE<ending>`` with an optional std map
``CASE_std<ending>`` beside it (never a case itself); mask ``CASE<ending>``;
MR ``CASE_0000<ending>`` or ``CASE<ending>``. DICOM series sub-folders count
as ``CASE`` (a folder ``CASE_dicom``, as ``wldm_predict --dicom-out`` writes,
too, unless a file for CASE exists).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from wldm_auto.io.geometry import Geometry
from wldm_auto.io.images import ImageReadError, itk_path
from wldm_auto.io.image_folders import list_images, mismatch_message, split_predictions
from wldm_auto.io.image_folders import short_list as _names

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class CaseFiles:
    """The files of one case to evaluate (std, mask, MR optional)."""

    case: str
    ct: Path
    sct: Path
    std: Path | None = None
    mask: Path | None = None
    mr: Path | None = None


def _missing_message(no_sct: list[str], no_ct: list[str], ct_dir: Path, sct_dir: Path) -> str:
    parts = []
    if no_sct:
        parts.append(f"no sCT in {sct_dir} for {len(no_sct)} case(s): {_names(no_sct)}")
    if no_ct:
        parts.append(f"no CT in {ct_dir} for {len(no_ct)} case(s): {_names(no_ct)}")
    return f"CT and sCT folders do not pair up: {'; '.join(parts)}"


def pair_cases(ct_dir: str | Path, sct_dir: str | Path, mask_dir: str | Path | None = None,
               mr_dir: str | Path | None = None, allow_missing: bool = False,
               exclude: Iterable[Path] = ()) -> list[CaseFiles]:
    """Pair CT and sCT (+ std, mask, MR) by case name, sorted by case.

    A case with a CT but no sCT (or the reverse), or without a mask when a
    mask folder is given, is an error listing the cases, unless
    ``allow_missing`` (then those cases are left out with a warning). A
    missing MR only drops the MR column of the figure. ``exclude``: folders not to scan for DICOM series.
    """
    ct_dir, sct_dir = Path(ct_dir), Path(sct_dir)
    exclude = tuple(exclude)
    cts = list_images(ct_dir, "CT", exclude)
    predictions = list_images(sct_dir, "sCT", exclude)
    scts, stds, orphans = split_predictions(predictions)
    common = sorted(set(cts) & set(scts))
    no_sct, no_ct = sorted(set(cts) - set(scts)), sorted(set(scts) - set(cts))
    if no_sct or no_ct:
        message = _missing_message(no_sct, no_ct, ct_dir, sct_dir)
        if not allow_missing:
            raise ValueError(f"{message} (--allow-missing evaluates the {len(common)} case(s) in both)")
        log.warning("%s; evaluating the %d case(s) in both", message, len(common))
    if not common:
        raise ValueError(f"no case has both a CT in {ct_dir} and an sCT in {sct_dir}")
    if orphans:
        log.warning("std map(s) without an sCT ignored: %s", _names(orphans))
    masks: dict[str, Path] = {}
    if mask_dir is not None:
        masks = list_images(mask_dir, "mask", exclude)
        no_mask = [c for c in common if c not in masks]
        if no_mask:
            message = f"no mask in {mask_dir} for {len(no_mask)} case(s): {_names(no_mask)}"
            if not allow_missing:
                raise ValueError(message)
            log.warning("%s; left out", message)
            common = [c for c in common if c in masks]
            if not common:
                raise ValueError(f"no case has a CT, an sCT and a mask in {mask_dir}")
    mrs: dict[str, Path] = list_images(mr_dir, "MR", exclude) if mr_dir is not None else {}
    cases = []
    for case in common:
        mr = mrs.get(f"{case}_0000", mrs.get(case))
        if mr_dir is not None and mr is None:
            log.warning("case %s: no MR (%s_0000 or %s) in %s; figure without MR", case, case, case, mr_dir)
        cases.append(CaseFiles(case, cts[case], scts[case], stds.get(case), masks.get(case), mr))
    return cases


def header_geometry(path: Path) -> Geometry | None:
    """Geometry from a file's header alone (None for DICOM folders and images that are not 3D)."""
    if not path.is_file():
        return None
    reader = sitk.ImageFileReader()
    try:
        reader.SetFileName(itk_path(path))
        reader.ReadImageInformation()
    except (RuntimeError, ImageReadError):
        return None  # read_image reports the problem when the case is evaluated
    if reader.GetDimension() != 3:
        return None
    return Geometry(tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                    tuple(reader.GetDirection()))


def check_geometries(cases: list[CaseFiles], resample: bool) -> list[str]:
    """Compare sCT/std/mask headers with the CT's; returns the cases that need resampling.

    Without ``resample`` any mismatch is a ValueError naming each case and both geometries.
    """
    problems: dict[str, list[str]] = {}
    for files in cases:
        ct = header_geometry(files.ct)
        if ct is None:
            continue
        for what, path in (("sCT", files.sct), ("std map", files.std), ("mask", files.mask)):
            geometry = header_geometry(path) if path is not None else None
            if geometry is not None and not geometry.is_close(ct):
                problems.setdefault(files.case, []).append(mismatch_message(files.case, what, geometry, ct))
    if problems and not resample:
        details = "; ".join(m for messages in problems.values() for m in messages)
        raise ValueError(f"{len(problems)} case(s) not on their CT's grid (--resample resamples them onto it): "
                         f"{details}")
    for messages in problems.values():
        for message in messages:
            log.info("resampling onto the CT grid: %s", message)
    return sorted(problems)
