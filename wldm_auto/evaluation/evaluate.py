"""Evaluate a folder of sCT against reference CT: metrics.csv, summary.json and a PNG per case.

With a std map (``CASE_std``) a case also gets the quality of its uncertainty (Spearman of error and
std, AUSE, coverage, ECE, mean std; see :mod:`wldm_auto.evaluation.uncertainty`) and two more PNGs
(``CASE_sparsification.png``, ``CASE_reliability.png``); summary.json adds the Gaussian coverage
expectations and the correlation across cases of mean std and MAE.

A case that cannot be evaluated (unreadable or truncated image, empty mask)
is reported by name and the others are still evaluated; the failed ones are
listed in summary.json and :class:`EvaluationError` is raised at the end.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from wldm_auto.evaluation import metrics as M
from wldm_auto.evaluation import uncertainty as U
from wldm_auto.evaluation.figures import save_case_figure, save_reliability_figure, save_sparsification_figure
from wldm_auto.evaluation.pairing import CaseFiles, check_geometries, pair_cases
from wldm_auto.io import hu
from wldm_auto.io.files import atomic_path, check_distinct_folders, read_json, write_json
from wldm_auto.io.image_folders import check_std_values, on_ct_grid
from wldm_auto.io.images import error_reason, read_image

log = logging.getLogger(__name__)

METRICS = ("mae", "psnr", "ssim", "ms_ssim", "ncc", "dice_bone", "spearman_error_std", *U.KEYS)
COLUMNS = ("case", *METRICS, "mask_voxels")
AIR_HU = float(hu.AIR_HU)
DEFAULT_MASK = ("default body mask of the reference CT: CT > -500 HU, largest connected component, "
                "holes filled (3D, then per axial slice)")


def evaluate_case(files: CaseFiles, resample: bool = False, figure: Path | None = None,
                  label: str | None = None) -> dict[str, Any]:
    """Metrics of one case (a CSV row); writes its figure to ``figure`` when given (titled with ``label``)."""
    case = files.case
    ct_image = read_image(files.ct, sitk.sitkFloat32)
    ct = sitk.GetArrayViewFromImage(ct_image)
    if files.mask is not None:
        mask_image = sitk.Cast(read_image(files.mask) > 0, sitk.sitkUInt8)
        mask_image = on_ct_grid(mask_image, ct_image, case, "mask", resample, sitk.sitkNearestNeighbor, 0)
        mask = sitk.GetArrayFromImage(mask_image) > 0
        source = f"mask {files.mask}"
    else:
        mask = M.default_body_mask(ct)
        mask_image = None
        source = "default body mask (CT > -500 HU)"
    if not mask.any():
        raise ValueError(f"case {case}: the {source} is empty")
    check_hu_range(ct, mask, case, files.ct)
    sct_image = on_ct_grid(read_image(files.sct, sitk.sitkFloat32), ct_image, case, "sCT", resample,
                           sitk.sitkLinear, AIR_HU, within=mask)
    sct = sitk.GetArrayViewFromImage(sct_image)
    row: dict[str, Any] = {
        "case": case,
        "mae": M.mae(ct, sct, mask),
        "psnr": M.psnr(ct, sct, mask),
        "ssim": M.ssim_synthrad(ct, sct, mask),
        "ms_ssim": M.ms_ssim_masked(ct, sct, mask),
        "ncc": M.ncc(ct, sct, mask),
        "dice_bone": M.bone_dice(ct, sct, mask),
        "spearman_error_std": float("nan"),
        **dict.fromkeys(U.KEYS, float("nan")),
        "mask_voxels": int(mask.sum()),
    }
    std_image = None
    report = None
    if files.std is not None:
        std_image = on_ct_grid(read_image(files.std, sitk.sitkFloat32), ct_image, case, "std map", resample,
                               sitk.sitkLinear, 0.0, within=mask)
        std = sitk.GetArrayViewFromImage(std_image)
        check_std_values(std, mask, f"case {case}: {files.std}")
        row["spearman_error_std"] = M.spearman_uncertainty(ct, sct, std, mask)
        report = U.uncertainty_report(ct, sct, std, mask)
        row.update(report.values)
    log.info("case %s: %s", case, ", ".join(f"{k} {row[k]:.4g}" for k in METRICS if math.isfinite(row[k])))
    if figure is not None:
        if mask_image is None:
            mask_image = sitk.GetImageFromArray(mask.astype(np.uint8))
            mask_image.CopyInformation(ct_image)
        mr_image = None
        if files.mr is not None:  # display only: always brought onto the CT grid, and never a reason to fail
            try:
                mr_image = on_ct_grid(read_image(files.mr, sitk.sitkFloat32), ct_image, case, "MR", True,
                                      sitk.sitkLinear, 0.0)
            except (ValueError, RuntimeError) as exc:  # ImageReadError is a ValueError
                log.warning("case %s: figure without the MR: %s", case, error_reason(exc, 300))
        save_case_figure(figure, case, ct_image, sct_image, mask_image, mr_image, std_image, row, label)
        if report is not None:
            save_sparsification_figure(figure.parent / f"{case}_sparsification.png", case, report, label)
            save_reliability_figure(figure.parent / f"{case}_reliability.png", case, report, label)
    return row


SOFT_TISSUE_MEDIAN_AT_MOST = 500.0  # HU: a body's median is soft tissue (about 0-60 HU); HU + 1024 puts it near 1060


def check_hu_range(ct: np.ndarray, mask: np.ndarray, case: str, path: Path) -> None:
    """Warn when the reference CT looks as if it were not in HU (e.g. stored values without their rescale
    slope/intercept, HU + 1024): no voxel below 0 (no air at about -1000 HU), or a median inside the mask above
    500 HU. A warning: every metric would carry the offset as a bias, but the data may be unusual on purpose."""
    low, median = float(ct.min()), float(np.median(ct[mask]))
    if low >= 0 or median > SOFT_TISSUE_MEDIAN_AT_MOST:
        log.warning("case %s: the reference CT %s does not look like HU (minimum %.0f, median inside the mask %.0f; "
                    "air is about -1000 HU and soft tissue 0-60): stored values without their rescale "
                    "slope/intercept (HU + 1024?) would bias every metric", case, path, low, median)


class EvaluationError(ValueError):
    """Some cases could not be evaluated; the others were. ``summary`` is what was written, ``failed``
    maps each failed case to its one-line reason."""

    def __init__(self, message: str, summary: dict[str, Any], failed: dict[str, str]) -> None:
        super().__init__(message)
        self.summary = summary
        self.failed = failed


def default_output(sct_dir: str | Path) -> Path:
    """Where results go without ``-o``: ``<sct_dir>_evaluation`` beside the sCT folder, never inside it."""
    resolved = Path(sct_dir).resolve()
    return resolved.parent / f"{resolved.name or 'sct'}_evaluation"


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per metric: mean, std (population), median and n over the cases with a finite value.

    ``n_nan`` and ``n_inf`` count the others (e.g. PSNR inf for identical
    images, NCC NaN for a constant sCT, the uncertainty metrics NaN without a std map), so a
    mean over fewer cases than evaluated is never silent.
    """
    out = {}
    for key in METRICS:
        values = np.array([row[key] for row in rows], np.float64)
        finite = values[np.isfinite(values)]
        stats: dict[str, Any] = {"mean": None, "std": None, "median": None, "n": int(finite.size),
                                 "n_nan": int(np.isnan(values).sum()), "n_inf": int(np.isinf(values).sum())}
        if finite.size:
            stats.update(mean=float(finite.mean()), std=float(finite.std()), median=float(np.median(finite)))
        out[key] = stats
    return out


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """One row per case; floats with 6 significant digits, NaN as an empty cell."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.6g}"
        return str(value)

    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([cell(row[c]) for c in COLUMNS])


RESULT_FILES = ("metrics.csv", "summary.json")  # what marks a folder as holding an evaluation
FIGURE_SUFFIXES = ("", "_sparsification", "_reliability")  # CASE<suffix>.png


def check_output_folder(out_dir: Path, ct_dir: Path, sct_dir: Path, mask_dir: Path | None = None,
                        mr_dir: Path | None = None, overwrite: bool = True) -> None:
    """ValueError if ``out_dir`` is a file or one of the input folders (the evaluation would write among its
    inputs), or if two of the CT, sCT and mask roles are given one folder (the sCT would be scored against
    itself); FileExistsError if it holds an earlier evaluation and not ``overwrite``."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"{out_dir}: is a file, not a folder; choose an output folder (-o)")
    for what, folder in (("CT", ct_dir), ("sCT", sct_dir), ("mask", mask_dir), ("MR", mr_dir)):
        if folder is not None and Path(folder).resolve() == Path(out_dir).resolve():
            raise ValueError(f"{out_dir}: the output folder is the {what} folder; choose another (-o)")
    check_distinct_folders({what: Path(folder) for what, folder in (("CT", ct_dir), ("sCT", sct_dir),
                                                                    ("mask", mask_dir)) if folder is not None},
                           "the {second} images would be scored as {first} images (an sCT against itself "
                           "scores perfectly)")
    if not overwrite:
        earlier = [name for name in RESULT_FILES if (Path(out_dir) / name).exists()]
        if earlier:
            raise FileExistsError(f"{out_dir}: holds an earlier evaluation ({', '.join(earlier)}); choose another "
                                  "output folder (-o) or replace it with --overwrite")


def clear_earlier_figures(out_dir: Path) -> None:
    """Delete the figures of the evaluation whose summary.json is in ``out_dir`` (its cases, failed ones too),
    so the folder never mixes two runs' figures; nothing else is touched."""
    summary = out_dir / "summary.json"
    if not summary.is_file():
        return
    try:
        earlier = read_json(summary)
        cases = [*earlier.get("cases", []), *earlier.get("failed", {})]
    except (ValueError, OSError, AttributeError, TypeError):  # not one of ours: leave the folder as it is
        return
    for case in cases:
        if not isinstance(case, str) or Path(case).name != case:
            continue
        for suffix in FIGURE_SUFFIXES:
            (out_dir / f"{case}{suffix}.png").unlink(missing_ok=True)


def evaluate_folder(ct_dir: str | Path, sct_dir: str | Path, out_dir: str | Path | None = None,
                    mask_dir: str | Path | None = None, mr_dir: str | Path | None = None, resample: bool = False,
                    allow_missing: bool = False, figures: bool = True, label: str | None = None,
                    overwrite: bool = True) -> dict[str, Any]:
    """Evaluate every sCT in ``sct_dir`` against its CT in ``ct_dir``; returns the summary.

    Writes to ``out_dir`` (default ``<sct_dir>_evaluation`` beside the sCT
    folder): ``metrics.csv``, ``summary.json`` and, with ``figures``,
    ``CASE.png`` per case (and, with a std map, ``CASE_sparsification.png`` and
    ``CASE_reliability.png``). Errors of the whole run (missing pairs, grids that
    differ without ``resample``, an output folder that is an input folder)
    are ValueErrors before anything is written. A case that fails (unreadable
    or truncated image, empty mask) is logged by name and the others are
    evaluated; then :class:`EvaluationError` lists the failed cases. An earlier evaluation in ``out_dir`` is
    replaced, its figures deleted first (``overwrite``; False: a FileExistsError instead).
    """
    ct_dir, sct_dir = Path(ct_dir), Path(sct_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_output(sct_dir)
    check_output_folder(out_dir, ct_dir, sct_dir, mask_dir, mr_dir, overwrite)
    cases = pair_cases(ct_dir, sct_dir, mask_dir, mr_dir, allow_missing, exclude=(out_dir,))
    resampled = check_geometries(cases, resample)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_earlier_figures(out_dir)
    log.info("evaluating %d case(s); mask: %s", len(cases), mask_dir or DEFAULT_MASK)
    rows = []
    failed: dict[str, str] = {}
    with logging_redirect_tqdm():
        for files in tqdm(cases, desc="evaluate", unit="case", disable=None):
            figure = out_dir / f"{files.case}.png" if figures else None
            try:
                rows.append(evaluate_case(files, resample, figure, label))
            except (ValueError, OSError, RuntimeError) as exc:  # ImageReadError is a ValueError
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                failed[files.case] = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"[:400]
                log.error("case %s failed: %s", files.case, failed[files.case])
    write_csv(rows, out_dir / "metrics.csv")
    summary = {
        "model": label,
        "n_cases": len(rows),
        "cases": [row["case"] for row in rows],
        "n_failed": len(failed),
        "failed": failed,
        "mask": f"masks from {mask_dir}" if mask_dir is not None else DEFAULT_MASK,
        "metrics": summarise(rows),
        "coverage_expected": dict(U.COVERAGE_EXPECTED),
        "case_std_vs_mae": U.case_correlation([row["mean_std"] for row in rows], [row["mae"] for row in rows]),
        "definitions": dict(M.DEFINITIONS),
        "resampled_onto_ct_grid": resampled,
        "inputs": {"ct_dir": ct_dir, "sct_dir": sct_dir, "mask_dir": mask_dir, "mr_dir": mr_dir},
    }
    write_json(summary, out_dir / "summary.json")
    log.info("wrote %s and %s", out_dir / "metrics.csv", out_dir / "summary.json")
    if failed:
        raise EvaluationError(f"{len(failed)} of {len(cases)} case(s) could not be evaluated: "
                              f"{', '.join(failed)} (the others are in {out_dir})", summary, failed)
    return summary
