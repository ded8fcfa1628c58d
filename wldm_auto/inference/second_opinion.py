"""The second-opinion term of a std map: where two different models disagree, trust neither.

A model's own std (its samples' spread, its error head, the edge term) cannot see the errors it makes
the same way every time: bone the regression U-Net misses is flat in its sCT, so neither the head nor
the edge term marks it. A second model trained differently (3D-WLDM beside a regression U-Net) makes
other mistakes; where the two sCTs differ, at least one is wrong. This term is ``factor`` times
|sCT - second sCT|, smoothed by a Gaussian of ``smoothing_mm`` (so that a disagreement marks its
neighbourhood too), 0 outside the body; the predictor adds its square to the std map's variance
before the model's std scale (``wldm_predict --second-opinion DIR``, plan ``inference.second_opinion_factor``
and ``inference.second_opinion_smoothing_mm``). Fit the std scale (``wldm_calibrate_std``) on validation
predictions made the same way.

On the fidelity benchmark's test cases (the regression U-Net's 4-fold ensemble with its error heads and edge
term, 3D-WLDM's one-sample sCT as the second opinion, factor 2 and 4 mm as the validation case chose them) it
raised the voxel Spearman between |error| and std from 0.495 to 0.510 and from 0.497 to 0.511 on two seeds
(``bench/fidelity.py --folds 4 --second-opinion 3d_wldm``; README, "A second model's opinion").
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from wldm_auto.io.geometry import Geometry
from wldm_auto.io.image_folders import describe, list_images, short_list
from wldm_auto.io.images import read_image


def check_factor(value: float | None, option: str = "second_opinion_factor") -> float | None:
    """``value`` as a float when None or a finite number >= 0, else a one-line ValueError naming ``option``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{option} must be a finite number >= 0 (the weight of the disagreement in the std map; "
                         f"0: none), got {value!r}")
    return float(value)


def second_opinion_files(folder: str | Path, cases: Iterable[str]) -> dict[str, Path]:
    """The second model's sCT per case (``CASE<ending>`` or a DICOM series, as ``wldm_predict`` writes it in
    ``folder``); ValueError naming the folder and the cases it lacks."""
    images = list_images(folder, "second-opinion")
    cases = list(cases)
    missing = [c for c in cases if c not in images]
    if missing:
        raise ValueError(f"second-opinion folder {folder}: no sCT for {short_list(missing)} (it needs one image per "
                         "input case, named like the case, e.g. another model's wldm_predict output folder)")
    return {c: images[c] for c in cases}


def read_second_opinion(source: str | Path | sitk.Image, reference: sitk.Image, case: str) -> sitk.Image:
    """The second model's sCT (float32 HU) for ``case``, from a file, DICOM folder or image; ValueError unless it
    lies on ``reference``'s grid (the input MR's, where every sCT of ``wldm_predict`` lies)."""
    if isinstance(source, sitk.Image):
        if source.GetDimension() != 3 or source.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"case {case}: the second opinion must be a 3D scalar image")
        image, where = sitk.Cast(source, sitk.sitkFloat32), "the second opinion"
    else:
        image, where = read_image(source, sitk.sitkFloat32), f"the second opinion {source}"
    if not Geometry.of(image).is_close(Geometry.of(reference)):
        raise ValueError(f"case {case}: {where} lies on another grid than the MR "
                         f"({describe(Geometry.of(image))} vs {describe(Geometry.of(reference))}); "
                         "predict it from the same MR")
    return image


def disagreement_std(sct: np.ndarray, other: np.ndarray, body: np.ndarray, spacing_xyz: Sequence[float],
                     factor: float, smoothing_mm: float) -> np.ndarray:
    """``factor`` x |``sct`` - ``other``| (HU, (z, y, x) arrays), smoothed by a Gaussian of ``smoothing_mm``
    on a grid of ``spacing_xyz`` (mm, ITK order), 0 where ``body`` is False: a std in HU, float32."""
    if sct.shape != other.shape or sct.shape != body.shape:
        raise ValueError(f"shapes differ: sCT {sct.shape}, second opinion {other.shape}, body {body.shape}")
    difference = np.abs(np.asarray(sct, dtype=np.float32) - np.asarray(other, dtype=np.float32))
    if smoothing_mm > 0:
        sigma = [smoothing_mm / float(s) for s in reversed(spacing_xyz)]
        difference = ndimage.gaussian_filter(difference, sigma, mode="nearest")
    difference *= np.float32(factor)
    difference[~body.astype(bool)] = 0.0
    return difference


def add_second_opinion(std: sitk.Image, sct: sitk.Image, other: sitk.Image, body: sitk.Image, factor: float,
                       smoothing_mm: float) -> sitk.Image:
    """``std`` (float32 HU) with the disagreement term of ``sct`` and ``other`` added in variance, same grid."""
    term = disagreement_std(sitk.GetArrayViewFromImage(sct), sitk.GetArrayViewFromImage(other),
                            sitk.GetArrayViewFromImage(body) > 0, std.GetSpacing(), factor, smoothing_mm)
    own = sitk.GetArrayFromImage(std).astype(np.float32)
    out = sitk.GetImageFromArray(np.sqrt(own * own + term * term))
    out.CopyInformation(std)
    return out
