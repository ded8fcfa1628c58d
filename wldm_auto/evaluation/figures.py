"""Per-case evaluation figure: axial/coronal/sagittal slices through the mask's centre.

Columns: MR (if given), CT and sCT in a wide window (-1000..1500 HU: bone), CT and sCT in a
soft-tissue window (-160..240 HU: errors of tens of HU show), |sCT - CT| (0..500 HU), std (if given).
With a std map, two small plots more: the sparsification curves (AUSE) and the reliability diagram (ECE).
Images are shown in LPS orientation (radiological: patient right on the
left; anterior and superior up) with the aspect ratio of the voxel spacing.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage

from wldm_auto.evaluation.uncertainty import UncertaintyReport
from wldm_auto.io.files import atomic_path

log = logging.getLogger(__name__)

CT_WINDOW = (-1000.0, 1500.0)
SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # W 400 / L 40
ERROR_RANGE = (0.0, 500.0)
PANEL_INCHES = 3.0


@dataclass
class Column:
    title: str
    volume: np.ndarray  # (z, y, x), LPS
    cmap: str
    limits: tuple[float, float]
    unit: str


def _lps_array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def _limits(values: np.ndarray, low: float, high: float, floor: float | None = None) -> tuple[float, float]:
    """Percentile display range of ``values`` (``floor`` fixes the lower end); never empty."""
    if values.size == 0:
        return (0.0, 1.0)
    lo = float(np.percentile(values, low)) if floor is None else floor
    hi = float(np.percentile(values, high))
    return (lo, hi if hi > lo else lo + 1.0)


def _slices(volume: np.ndarray, centre: tuple[int, int, int], spacing: tuple[float, float, float]):
    """(name, 2D slice, aspect, origin) for axial, coronal and sagittal; spacing in (x, y, z)."""
    z, y, x = centre
    sx, sy, sz = spacing
    return [
        ("axial", volume[z], sy / sx, "upper"),
        ("coronal", volume[:, y, :], sz / sx, "lower"),
        ("sagittal", volume[:, :, x], sz / sy, "lower"),
    ]


def mask_centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel index (z, y, x) of the mask's centre of mass (the volume centre for an empty mask)."""
    if not mask.any():
        return tuple(n // 2 for n in mask.shape)  # type: ignore[return-value]
    centre = ndimage.center_of_mass(mask)
    return tuple(int(np.clip(round(c), 0, n - 1)) for c, n in zip(centre, mask.shape))  # type: ignore[return-value]


def _title(case: str, metrics: Mapping[str, float] | None, label: str | None = None) -> str:
    parts = [f"{label}: {case}" if label else case]
    for key, name, fmt in (("mae", "MAE", "{:.1f} HU (lower better)"), ("psnr", "PSNR", "{:.2f} dB"),
                           ("ssim", "SSIM", "{:.3f}"), ("ms_ssim", "MS-SSIM", "{:.3f}"),
                           ("dice_bone", "bone Dice", "{:.3f} (higher better)")):
        value = (metrics or {}).get(key)
        if value is not None and np.isfinite(value):
            parts.append(f"{name} {fmt.format(value)}")
    return "   ".join(parts)


def save_case_figure(path: str | Path, case: str, ct: sitk.Image, sct: sitk.Image, mask: sitk.Image,
                     mr: sitk.Image | None = None, std: sitk.Image | None = None,
                     metrics: Mapping[str, float] | None = None, label: str | None = None) -> None:
    """Write the PNG for one case; every image must be on ``ct``'s grid. ``label`` names the model in the title."""
    oriented = sitk.DICOMOrient(ct, "LPS")
    spacing = oriented.GetSpacing()
    ct_a, sct_a = sitk.GetArrayFromImage(oriented), _lps_array(sct)
    mask_a = _lps_array(mask) > 0
    columns = []
    if mr is not None:
        mr_a = _lps_array(mr)
        columns.append(Column("MR", mr_a, "gray", _limits(mr_a[mask_a] if mask_a.any() else mr_a, 0.5, 99.5), ""))
    wide, soft = "{} -1000..1500 HU", "{} soft tissue -160..240 HU"
    columns.append(Column(wide.format("CT"), ct_a, "gray", CT_WINDOW, "HU"))
    columns.append(Column(wide.format("sCT"), sct_a, "gray", CT_WINDOW, "HU"))
    columns.append(Column(soft.format("CT"), ct_a, "gray", SOFT_TISSUE_WINDOW, "HU"))
    columns.append(Column(soft.format("sCT"), sct_a, "gray", SOFT_TISSUE_WINDOW, "HU"))
    columns.append(Column("|sCT - CT| 0..500 HU", np.abs(sct_a.astype(np.float32) - ct_a), "inferno", ERROR_RANGE,
                          "HU"))
    if std is not None:
        std_a = _lps_array(std)
        columns.append(Column("std", std_a, "viridis", _limits(std_a[mask_a], 0, 99, floor=0.0), "HU"))
    centre = mask_centre(mask_a)
    mask_slices = _slices(mask_a.astype(np.float32), centre, spacing)

    figure = Figure(figsize=(PANEL_INCHES * len(columns) + 0.5, PANEL_INCHES * 3 + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(3, len(columns), squeeze=False)
    for col, column in enumerate(columns):
        for row, (view, image, aspect, origin) in enumerate(_slices(column.volume, centre, spacing)):
            ax = axes[row][col]
            shown = ax.imshow(image, cmap=column.cmap, vmin=column.limits[0], vmax=column.limits[1],
                              aspect=aspect, origin=origin, interpolation="nearest")
            if column.title.startswith("|"):
                ax.contour(mask_slices[row][1], levels=[0.5], colors="cyan", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(column.title, fontsize=9)
            if col == 0:
                ax.set_ylabel(view)
            bar = figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
            bar.ax.tick_params(labelsize=7)
            if column.unit:
                bar.set_label(column.unit, fontsize=7)
    figure.suptitle(_title(case, metrics, label), fontsize=10)
    _save(figure, path)


def _curve_figure() -> tuple[Figure, Axes]:
    """A small single-axes figure for a curve plot."""
    figure = Figure(figsize=(5.0, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def _save(figure: Figure, path: str | Path) -> None:
    """Write ``figure`` as a PNG (100 dpi), atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    log.debug("%s: figure written", path)


def save_sparsification_figure(path: str | Path, case: str, report: UncertaintyReport,
                               label: str | None = None) -> None:
    """MAE of the voxels left vs removed fraction, removing by std and by true |error| (oracle); AUSE in the title."""
    figure, ax = _curve_figure()
    ax.plot(report.fractions, report.mae_by_std, "o-", ms=3, color="tab:blue", label="removed by std")
    ax.plot(report.fractions, report.mae_oracle, "o-", ms=3, color="tab:orange", label="removed by |error| (oracle)")
    ax.fill_between(report.fractions, report.mae_oracle, report.mae_by_std, color="tab:blue", alpha=0.15)
    ax.axhline(report.mae_by_std[0], color="gray", ls="--", lw=0.8, label="random removal (MAE)")
    ax.set_xlabel("removed fraction of mask voxels")
    ax.set_ylabel("MAE of the rest (HU)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    name = f"{label}: {case}" if label else case
    ax.set_title(f"{name}   AUSE {report.values['ause']:.2f} HU (lower better)", fontsize=9)
    _save(figure, path)


def save_reliability_figure(path: str | Path, case: str, report: UncertaintyReport,
                            label: str | None = None) -> None:
    """Observed share of voxels within the Gaussian p interval of the std vs p; the diagonal is perfect; ECE in
    the title."""
    figure, ax = _curve_figure()
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=0.8, label="perfect calibration")
    ax.plot(report.levels, report.observed, "o-", ms=3, color="tab:blue", label="observed")
    ax.set_xlabel("expected share p (|error| <= norm.ppf((1+p)/2) std)")
    ax.set_ylabel("observed share")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="upper left")
    ax.text(0.98, 0.02, "above: std too large\nbelow: std too small", fontsize=7, ha="right", va="bottom",
            transform=ax.transAxes, color="gray")
    name = f"{label}: {case}" if label else case
    ax.set_title(f"{name}   ECE {report.values['ece']:.3f} (lower better)", fontsize=9)
    _save(figure, path)
