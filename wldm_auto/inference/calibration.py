"""A post-hoc scale for the std maps (``wldm_calibrate_std``), stored with the model and applied at prediction.

The spread of a few diffusion samples is an uncertainty in the right places
but rarely in the right units: with N samples the std is noisy and biased
low, and it knows nothing of errors the model makes the same way every time.
One number fixes the units. Fitted on validation cases the model never saw
(predicted with ``wldm_predict --samples N --save-std``, compared with their
CT), it is stored as ``MODEL_FOLDER/std_scale.json`` and every later std map of
that model is multiplied by it (``wldm_predict --no-std-scale`` /
``std_scale=False`` ignore it, to measure before and after).

The fit: r = |sCT - CT| / std over the voxels inside the masks with std > 0,
pooled over all cases; s = quantile(r, 0.9545) / 2, so that after the scale
exactly the Gaussian share of voxels (95.45 %) has |error| <= 2 * s * std on
those cases. The quantity the project checks is that coverage at k = 2 (goal:
within 5 points of 95 %), so the fit targets it directly. The maximum-
likelihood scale of a Gaussian, sqrt(mean(r^2)), is recorded for information
but not used: sCT errors are heavy-tailed (misregistration of the reference
CT, bone/air edges, implants), and a few large r dominate the mean of r^2, so
the ML scale inflates every std map to cover the worst voxels and the 95 %
band becomes far too wide for the typical one.

The scale holds for the settings it was fitted with (number of samples and
folds, DDIM steps, test-time mirroring): record them (``--samples``/``--steps``/
``--folds``/``--mirror-axes``) so a prediction with other settings can be warned about.

Also here: the voxel mask of trusted voxels (``wldm_predict --confidence-hu``),
see :func:`confidence_mask`.
"""
from __future__ import annotations

import datetime
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from wldm_auto.io.body_mask import ct_body_mask
from wldm_auto.io.files import read_json, write_json
from wldm_auto.io.geometry import Geometry
from wldm_auto.io.hu import AIR_HU, BODY_THRESHOLD_HU
from wldm_auto.io.image_folders import check_std_values, list_images, on_ct_grid, short_list, split_predictions
from wldm_auto.io.images import read_image

log = logging.getLogger(__name__)

STD_SCALE_FILE = "std_scale.json"
GAUSSIAN_COVERAGE_2 = math.erf(2.0 / math.sqrt(2.0))  # 0.9545: share of a Gaussian within 2 standard deviations
METHOD = ("quantile: s = q_0.9545(|sCT - CT| / std) / 2 over the mask voxels with std > 0 of all cases pooled, "
          "so that the share of voxels with |error| <= 2 * s * std is the Gaussian 95.45 % on these cases")
DEFAULT_MASK = "CT > -500 HU, largest connected component, holes filled (3D, then per axial slice)"


# --- the fit -------------------------------------------------------------------------------------------------------

def _ratios(errors_over_std: np.ndarray) -> np.ndarray:
    r = np.asarray(errors_over_std, dtype=np.float64).ravel()
    if r.size == 0:
        raise ValueError("no voxel to fit a std scale on (no voxel inside the masks has std > 0)")
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError("|error| / std must be finite and non-negative (leave out voxels with std 0)")
    return r


def fit_std_scale(errors_over_std: np.ndarray, target: float = GAUSSIAN_COVERAGE_2, k: float = 2.0) -> float:
    """The scale s of the std maps such that a share ``target`` of voxels has |error| <= k * s * std.

    ``errors_over_std``: |sCT - CT| / std over the mask voxels (with std > 0)
    of the validation cases; s = quantile(r, target) / k (defaults: the
    Gaussian 95.45 % at k = 2). ValueError when there is nothing to fit or the
    quantile is 0 (errors 0 almost everywhere: no scale makes sense).
    """
    if not 0.0 < target < 1.0 or not k > 0:
        raise ValueError(f"target ({target}) must lie in (0, 1) and k ({k}) be positive")
    quantile = float(np.quantile(_ratios(errors_over_std), target))
    if not quantile > 0:
        raise ValueError(f"|error| / std is 0 at {target:.2%} of the voxels or more: no std scale can be fitted")
    return quantile / k


def ml_std_scale(errors_over_std: np.ndarray) -> float:
    """Maximum-likelihood scale of Gaussian errors, sqrt(mean(r^2)) (for information; see the module note)."""
    r = _ratios(errors_over_std)
    return float(np.sqrt(np.mean(np.square(r))))


def coverage(errors_over_std: np.ndarray, k: float = 2.0, scale: float = 1.0) -> float:
    """Share of voxels with |error| <= k * scale * std, from r = |error| / std."""
    r = np.asarray(errors_over_std, dtype=np.float64).ravel()
    return float(np.mean(r <= k * scale)) if r.size else float("nan")


# --- fitting from prediction folders ---------------------------------------------------------------------------

@dataclass
class CaseStats:
    """One calibration case: voxels used, and its own figures (HU)."""

    case: str
    n_voxels: int  # mask voxels with std > 0 (used)
    n_zero_std: int  # mask voxels with std == 0 (left out: outside the sCT's body, or no spread)
    mae_hu: float  # mean |sCT - CT| over the used voxels
    mean_std_hu: float  # mean std (unscaled) over the used voxels
    coverage_2_before: float
    coverage_2_after: float = float("nan")  # with the pooled scale
    scale: float = float("nan")  # this case's own quantile scale (how much cases disagree)


@dataclass
class StdCalibration:
    """What :func:`fit_from_folders` found: the pooled scale and figures per case."""

    scale: float
    ml_scale: float
    coverage_2_before: float
    coverage_2_after: float
    n_voxels: int
    cases: list[CaseStats] = field(default_factory=list)
    mask: str = DEFAULT_MASK
    method: str = METHOD

    def record(self, samples: int | None = None, steps: int | None = None,
               folds: Sequence[int] | None = None, mirror_axes: Sequence[int] | None = None,
               edge_std_mm: float | None = None, second_opinion_factor: float | None = None) -> dict[str, Any]:
        """The fields of ``std_scale.json`` besides ``scale`` (``samples``/``steps``/``folds``/``mirror_axes``/
        ``edge_std_mm``/``second_opinion_factor`` (0: none): the prediction settings of the calibration run,
        None when unknown)."""
        return {
            "method": self.method,
            "ml_scale": self.ml_scale,
            "coverage_2_before": self.coverage_2_before,
            "coverage_2_after": self.coverage_2_after,
            "target_coverage_2": GAUSSIAN_COVERAGE_2,
            "cases": [c.case for c in self.cases],
            "n_voxels": self.n_voxels,
            "mask": self.mask,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "samples": samples,
            "steps": steps,
            "folds": list(folds) if folds is not None else None,
            "mirror_axes": sorted(mirror_axes) if mirror_axes is not None else None,
            "edge_std_mm": float(edge_std_mm) if edge_std_mm is not None else None,
            "second_opinion_factor": float(second_opinion_factor) if second_opinion_factor is not None else None,
            "per_case": [asdict(c) for c in self.cases],
        }


@dataclass(frozen=True)
class CalibrationCase:
    case: str
    ct: Path
    sct: Path
    std: Path
    mask: Path | None = None


def calibration_cases(ct_dir: str | os.PathLike, sct_dir: str | os.PathLike, std_dir: str | os.PathLike | None = None,
                      mask_dir: str | os.PathLike | None = None, allow_missing: bool = False) -> list[CalibrationCase]:
    """The cases to fit on: every sCT of ``sct_dir`` (``wldm_predict`` output) with a std map and a CT.

    ``std_dir``: where ``CASE_std<ending>`` lie (default: ``sct_dir``). Names as
    ``wldm_evaluate``: CT ``CASE``, sCT ``CASE``, std ``CASE_std``, mask ``CASE``;
    ``CASE_confidence`` / ``CASE_mumap`` beside an sCT are not cases. CTs without an
    sCT are ignored (the CT folder may hold every case, the sCT folder the held-out
    ones). An sCT without a CT, or without a mask when ``mask_dir`` is given, is a
    ValueError unless ``allow_missing``; an sCT without std map is left out with a
    warning; no case with a std map at all is a ValueError.
    """
    cts = list_images(ct_dir, "CT")
    scts, stds, orphans = split_predictions(list_images(sct_dir, "sCT"))
    if std_dir is not None:
        stds = split_predictions(list_images(std_dir, "std"))[1]
    if not scts:
        raise ValueError(f"sCT folder {sct_dir}: holds no sCT image")
    problems = []
    if orphans:
        problems.append(f"{len(orphans)} std map(s) in {sct_dir} without their sCT: {short_list(orphans)}")
    no_ct = sorted(set(scts) - set(cts))
    if no_ct:
        problems.append(f"no CT in {ct_dir} for {len(no_ct)} sCT(s): {short_list(no_ct)}")
    masks = list_images(mask_dir, "mask") if mask_dir is not None else {}
    no_mask = sorted(n for n in set(scts) & set(cts) if n not in masks) if mask_dir is not None else []
    if no_mask:
        problems.append(f"no mask in {mask_dir} for {len(no_mask)} case(s): {short_list(no_mask)}")
    if problems:
        if not allow_missing:
            raise ValueError("; ".join(problems) + " (--allow-missing fits on the cases that have everything)")
        log.warning("%s; left out", "; ".join(problems))
    usable = sorted(n for n in scts if n in cts and (mask_dir is None or n in masks))
    ignored = len(set(cts) - set(scts))
    if ignored:
        log.info("%d CT(s) in %s have no sCT in %s and are not used", ignored, ct_dir, sct_dir)
    no_std = [n for n in usable if n not in stds]
    if no_std:
        log.warning("no std map (CASE_std) for %d case(s), left out: %s", len(no_std), short_list(no_std))
    chosen = [n for n in usable if n in stds]
    if not chosen:
        raise ValueError(f"no case in {std_dir or sct_dir} has a std map (CASE_std<ending>) and a CT"
                         f"{' and a mask' if mask_dir is not None else ''}: predict the validation cases with "
                         "wldm_predict --samples N (N > 1) --save-std, or with several folds")
    return [CalibrationCase(n, cts[n], scts[n], stds[n], masks.get(n)) for n in chosen]


def case_ratios(files: CalibrationCase, resample: bool = False) -> tuple[np.ndarray, CaseStats]:
    """(|sCT - CT| / std over the mask voxels with std > 0 as float32, the case's stats) of one case."""
    ct_image = read_image(files.ct, sitk.sitkFloat32)
    ct = sitk.GetArrayViewFromImage(ct_image)
    if files.mask is not None:
        mask_image = on_ct_grid(sitk.Cast(read_image(files.mask) > 0, sitk.sitkUInt8), ct_image, files.case, "mask",
                                 resample, sitk.sitkNearestNeighbor, 0)
        mask = sitk.GetArrayViewFromImage(mask_image) > 0
    else:
        mask = ct_body_mask(ct, BODY_THRESHOLD_HU)
    if not mask.any():
        raise ValueError(f"case {files.case}: the mask ({files.mask or DEFAULT_MASK}) is empty")
    sct_image = on_ct_grid(read_image(files.sct, sitk.sitkFloat32), ct_image, files.case, "sCT", resample,
                            sitk.sitkLinear, float(AIR_HU), within=mask)
    std_image = on_ct_grid(read_image(files.std, sitk.sitkFloat32), ct_image, files.case, "std map", resample,
                            sitk.sitkLinear, 0.0, within=mask)
    std = sitk.GetArrayViewFromImage(std_image)
    check_std_values(std, mask, f"case {files.case}: {files.std}")
    used = mask & (std > 0)
    error = np.abs(sitk.GetArrayViewFromImage(sct_image)[used].astype(np.float64) - ct[used])
    spread = std[used].astype(np.float64)
    ratios = (error / spread).astype(np.float32)
    n, zero = int(used.sum()), int(mask.sum() - used.sum())
    stats = CaseStats(files.case, n, zero, float(error.mean()) if n else float("nan"),
                      float(spread.mean()) if n else float("nan"), coverage(ratios))
    if n and np.quantile(ratios, GAUSSIAN_COVERAGE_2) > 0:
        stats.scale = fit_std_scale(ratios)
    if zero > 0.05 * mask.sum():
        log.warning("case %s: std is 0 at %d of %d mask voxels (%.0f %%; outside the sCT's body?): left out of the fit",
                    files.case, zero, int(mask.sum()), 100.0 * zero / mask.sum())
    return ratios, stats


def fit_from_folders(ct_dir: str | os.PathLike, sct_dir: str | os.PathLike, std_dir: str | os.PathLike | None = None,
                     mask_dir: str | os.PathLike | None = None, resample: bool = False,
                     allow_missing: bool = False) -> StdCalibration:
    """Fit the std scale on every case of ``sct_dir`` (see :func:`calibration_cases`), voxels pooled.

    Voxels: inside ``MASK_DIR/CASE`` (> 0), or without ``mask_dir`` the CT's body
    (CT > -500 HU, largest component, holes filled), where std > 0. sCT, std and
    mask must lie on the CT's grid unless ``resample`` (linear; the mask nearest).
    ValueError naming the case or folder for anything unusable, and when the std
    is zero everywhere inside the masks.
    """
    cases = calibration_cases(ct_dir, sct_dir, std_dir, mask_dir, allow_missing)
    pooled, stats = [], []
    for files in cases:
        ratios, case_stats = case_ratios(files, resample)
        log.info("case %s: %d voxels, MAE %.1f HU, mean std %.1f HU, coverage at 2 std %.1f %%", files.case,
                 case_stats.n_voxels, case_stats.mae_hu, case_stats.mean_std_hu, 100 * case_stats.coverage_2_before)
        pooled.append(ratios)
        stats.append(case_stats)
    ratios = np.concatenate(pooled)
    if ratios.size == 0:
        raise ValueError(f"the std maps of {short_list([c.case for c in cases])} are 0 everywhere inside the masks: "
                         "nothing to calibrate (one draw, or a deterministic model with identical folds?)")
    scale = fit_std_scale(ratios)
    for case_stats, case_ratios_ in zip(stats, pooled):
        case_stats.coverage_2_after = coverage(case_ratios_, 2.0, scale)
    return StdCalibration(scale, ml_std_scale(ratios), coverage(ratios), coverage(ratios, 2.0, scale),
                          int(ratios.size), stats, f"masks in {mask_dir}" if mask_dir is not None else DEFAULT_MASK)


# --- std_scale.json ---------------------------------------------------------------------------------------------

def std_scale_path(model_folder: str | os.PathLike) -> Path:
    return Path(model_folder) / STD_SCALE_FILE


def _check_scale(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: scale must be a finite positive number, got {value!r}")
    return float(value)


def check_model_folder(model_folder: str | os.PathLike) -> Path:
    """``model_folder`` as a Path; ValueError when it is missing or holds no ``fold_*`` folder (not a model)."""
    folder = Path(model_folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: model folder not found (a model zip must be installed first: "
                         "wldm_install_model)")
    if not any(p.is_dir() for p in folder.glob("fold_*")):
        raise ValueError(f"{folder}: not a model folder (it holds no fold_* folder; -m takes the folder that "
                         "wldm_train wrote, TRAINER__PLANS__CONFIGURATION)")
    return folder


def write_std_scale(model_folder: str | os.PathLike, scale: float, record: Mapping[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``MODEL_FOLDER/std_scale.json`` atomically: ``{"scale": scale, **record}``; returns its path.

    ``record``: e.g. :meth:`StdCalibration.record`. ValueError for a folder that
    is not a model folder (no ``fold_*``) or a scale that is not finite and
    positive; FileExistsError when the file exists and not ``overwrite``.
    """
    folder = check_model_folder(model_folder)
    path = std_scale_path(folder)
    scale = _check_scale(scale, str(path))
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists (scale {_existing_scale(path)}); --overwrite replaces it")
    write_json({"scale": scale, **{k: v for k, v in (record or {}).items() if k != "scale"}}, path)
    return path


def _existing_scale(path: Path) -> str:
    try:
        return str(read_json(path).get("scale"))
    except (ValueError, OSError, AttributeError):
        return "unreadable"


def read_std_scale_record(model_folder: str | os.PathLike) -> dict[str, Any] | None:
    """The content of ``MODEL_FOLDER/std_scale.json`` (None when there is none); ValueError naming the
    file when it is not JSON, not an object, or its ``scale`` is missing, not finite or not positive."""
    path = std_scale_path(model_folder)
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with a 'scale', got {type(data).__name__}")
    if "scale" not in data:
        raise ValueError(f"{path}: no 'scale' in it")
    data["scale"] = _check_scale(data["scale"], str(path))
    return data


def read_std_scale(model_folder: str | os.PathLike) -> float | None:
    """The scale in ``MODEL_FOLDER/std_scale.json``, None when there is none (as 1.0); ValueError naming
    the file when it is malformed."""
    record = read_std_scale_record(model_folder)
    return None if record is None else float(record["scale"])


def describe_record(record: Mapping[str, Any]) -> str:
    """One line on where a stored scale comes from (cases, settings, coverage before -> after)."""
    parts = []
    cases = record.get("cases")
    if isinstance(cases, list):
        parts.append(f"fitted on {len(cases)} case(s)")
    for key in ("samples", "steps", "folds", "mirror_axes", "edge_std_mm", "second_opinion_factor"):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]}")
    before, after = record.get("coverage_2_before"), record.get("coverage_2_after")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        parts.append(f"coverage at 2 std {100 * before:.1f} % -> {100 * after:.1f} %")
    return ", ".join(parts)


# --- applying it ------------------------------------------------------------------------------------------------

def scale_std(std: sitk.Image, scale: float) -> sitk.Image:
    """``std`` (float32) multiplied by ``scale``, same geometry; the image itself when ``scale`` is 1."""
    if scale == 1.0:
        return std
    array = sitk.GetArrayFromImage(std).astype(np.float32) * np.float32(scale)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(std)
    return out


def check_confidence_hu(value: float | None, option: str = "confidence_hu") -> float | None:
    """``value`` as a float when finite and > 0 (None passes); one-line ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"{option} {value!r}: must be a finite number of HU > 0")
    return float(value)


def confidence_mask(std: sitk.Image, body: sitk.Image, threshold_hu: float) -> sitk.Image:
    """uint8 mask on ``std``'s grid: 1 inside ``body`` where 2 * std < ``threshold_hu`` (HU), else 0.

    The trusted voxels inside the patient: the sCT is within about
    ``threshold_hu`` of the truth at ~95 % confidence when the std is calibrated.
    Outside the body the sCT is air by construction (std 0 there): 0, never
    "trusted", so the mask can be used as is to select patient voxels.
    ``std``: the std map after the std scale; ``body``: the body mask the
    prediction used (same grid).
    """
    threshold_hu = check_confidence_hu(threshold_hu)
    if not Geometry.of(std).is_close(Geometry.of(body)):
        raise ValueError("the std map and the body mask lie on different grids")
    spread = sitk.GetArrayViewFromImage(std)
    inside = sitk.GetArrayViewFromImage(body) > 0
    out = sitk.GetImageFromArray((inside & (2.0 * spread.astype(np.float64) < threshold_hu)).astype(np.uint8))
    out.CopyInformation(std)
    return out
