"""Deformable registration of CT (moving) onto MR (fixed) with itk-elastix.

The sCT must live in the MR frame, so the CT is warped onto the MR's own
grid. Registration runs at a coarser working spacing (a plan value) for
speed; the resulting physical transform is then applied to the full CT.
Voxels of the MR grid that no real CT maps to (outside the CT's field of
view, or scanner padding) are marked invalid. With a body mask the fixed MR
is cropped to the body's box plus ``plan.body_margin_mm`` first. Speed and
accuracy against a known deformation: ``bench/registration.py``.
"""
from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from wldm_auto.io import hu
from wldm_auto.planners.schema import RegistrationPlan
from wldm_auto.preprocessing.resampling import crop, crop_box_with_margin, resample_onto, resample_to_spacing

log = logging.getLogger(__name__)

AIR_HU = float(hu.AIR_HU)


class RegistrationError(RuntimeError):
    """Registration failed or produced an implausible transform."""


@dataclass
class RegistrationResult:
    ct: sitk.Image  # float32 HU on the MR grid, -1024 where invalid
    valid: sitk.Image  # uint8 on the MR grid, 1 where real CT exists
    report: dict[str, Any]
    parameter_files: dict[str, str]  # file name -> text of elastix transform parameters


def ct_validity(ct: sitk.Image, padding_threshold: float) -> sitk.Image:
    """uint8 mask on the CT grid: 1 where the CT holds measured values (not padding)."""
    return sitk.Cast(sitk.BinaryThreshold(sitk.Cast(ct, sitk.sitkFloat32), float(padding_threshold), 1e30, 1, 0), sitk.sitkUInt8)


def clip_ct(ct: sitk.Image, window: tuple[float, float]) -> sitk.Image:
    """CT as float32 clipped to ``window`` (padding such as -2048/-3024 becomes air)."""
    return sitk.Clamp(sitk.Cast(ct, sitk.sitkFloat32), sitk.sitkFloat32, float(window[0]), float(window[1]))


def resample_ct_to_mr(
    mr: sitk.Image, ct: sitk.Image, window: tuple[float, float], padding_threshold: float
) -> tuple[sitk.Image, sitk.Image]:
    """Identity (physical-space) resampling of CT onto the MR grid: (ct, valid)."""
    valid = resample_onto(ct_validity(ct, padding_threshold), mr, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    ct_mr = resample_onto(clip_ct(ct, window), mr, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    return _mask_invalid(ct_mr, valid), valid


def normalized_mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 64) -> float:
    """Studholme's NMI (H(A) + H(B)) / H(A, B) of two equally long samples (1 = independent, 2 = identical)."""
    if a.size < 2:
        return float("nan")
    joint, _, _ = np.histogram2d(a.ravel(), b.ravel(), bins=bins)
    joint = joint / joint.sum()

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    return (entropy(joint.sum(0)) + entropy(joint.sum(1))) / max(entropy(joint), 1e-12)


def nmi_in_mask(mr: sitk.Image, ct: sitk.Image, mask: np.ndarray) -> float:
    """NMI between MR and CT (same grid) over the voxels of a boolean numpy mask."""
    a = sitk.GetArrayViewFromImage(mr)[mask]
    b = sitk.GetArrayViewFromImage(ct)[mask]
    return normalized_mutual_information(a, b)


def _to_itk(image: sitk.Image):  # noqa: ANN202 - itk types are dynamic
    import itk

    array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    out = itk.image_from_array(array)
    out.SetOrigin(image.GetOrigin())
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(itk.matrix_from_array(np.array(image.GetDirection()).reshape(3, 3)))
    return out


def _to_sitk(image, reference: sitk.Image | None = None) -> sitk.Image:  # noqa: ANN001
    import itk

    out = sitk.GetImageFromArray(itk.array_from_image(image))
    if reference is not None:
        out.CopyInformation(reference)
    else:
        out.SetOrigin(tuple(image.GetOrigin()))
        out.SetSpacing(tuple(image.GetSpacing()))
        out.SetDirection(tuple(itk.array_from_matrix(image.GetDirection()).ravel()))
    return out


# plan value -> elastix pyramid (Fixed*/Moving*): "smoothing" keeps every level at the working
# spacing (elastix's default), "recursive" and "shrinking" downsample the coarse levels
PYRAMIDS = {"smoothing": "SmoothingImagePyramid", "recursive": "RecursiveImagePyramid",
            "shrinking": "ShrinkingImagePyramid"}


def _parameter_object(plan: RegistrationPlan):  # noqa: ANN202
    import itk

    params = itk.ParameterObject.New()
    if len(plan.iterations) != len(plan.stages) or len(plan.resolutions) != len(plan.stages):
        raise RegistrationError("registration plan: stages, iterations and resolutions must have equal lengths")
    for stage, iterations, resolutions in zip(plan.stages, plan.iterations, plan.resolutions):
        if stage not in ("rigid", "affine", "bspline"):
            raise RegistrationError(f"registration plan: unknown stage {stage!r} (use rigid, affine, bspline)")
        pmap = params.GetDefaultParameterMap(stage, int(resolutions))
        pmap["Metric"] = [plan.metric] + list(pmap["Metric"][1:])
        pmap["MaximumNumberOfIterations"] = [str(int(iterations))]
        pmap["NumberOfHistogramBins"] = [str(int(plan.histogram_bins))]
        pmap["NumberOfSpatialSamples"] = [str(int(plan.spatial_samples))]
        pmap["RandomSeed"] = ["121212"]
        pmap["DefaultPixelValue"] = [str(AIR_HU)]
        pmap["WriteResultImage"] = ["false"]
        if plan.pyramid not in PYRAMIDS:
            raise RegistrationError(f"registration plan: unknown pyramid {plan.pyramid!r} (use {', '.join(PYRAMIDS)})")
        pmap["FixedImagePyramid"] = [f"Fixed{PYRAMIDS[plan.pyramid]}"]
        pmap["MovingImagePyramid"] = [f"Moving{PYRAMIDS[plan.pyramid]}"]
        if stage != "bspline":
            pmap["AutomaticTransformInitialization"] = ["true"]
            pmap["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
        else:
            pmap["FinalGridSpacingInPhysicalUnits"] = [str(float(plan.bspline_grid_spacing_mm))]
            pmap["Metric1Weight"] = [str(float(plan.bending_energy_weight))]
        params.AddParameterMap(pmap)
    return params


def _on_grid(transform_params, grid: sitk.Image, default: float, linear: bool = True):  # noqa: ANN001, ANN202
    """Copy of elastix's result parameters that resample onto ``grid``."""
    import itk

    out = itk.ParameterObject.New()
    count = transform_params.GetNumberOfParameterMaps()
    for i in range(count):
        pmap = transform_params.GetParameterMap(i)
        pmap["Size"] = [str(v) for v in grid.GetSize()]
        pmap["Spacing"] = [repr(float(v)) for v in grid.GetSpacing()]
        pmap["Origin"] = [repr(float(v)) for v in grid.GetOrigin()]
        pmap["Direction"] = [repr(float(v)) for v in grid.GetDirection()]
        pmap["DefaultPixelValue"] = [repr(float(default))]
        pmap["ResampleInterpolator"] = ["FinalLinearInterpolator" if linear else "FinalNearestNeighborInterpolator"]
        pmap["FinalBSplineInterpolationOrder"] = ["1"]
        out.AddParameterMap(pmap)
    return out


def _warp(image: sitk.Image, transform_params, grid: sitk.Image, default: float) -> sitk.Image:  # noqa: ANN001
    import itk

    warped = itk.transformix_filter(_to_itk(image), _on_grid(transform_params, grid, default))
    return _to_sitk(warped, grid)


def _jacobian_stats(transform_params, grid: sitk.Image, mask: sitk.Image | None = None) -> tuple[float, float, float]:  # noqa: ANN001
    """min, max Jacobian determinant and folding fraction of the transform on ``grid``.

    With ``mask`` (uint8 on ``grid``) the figures cover the masked voxels only
    (folding outside the body does not touch any training voxel).
    """
    import itk

    with tempfile.TemporaryDirectory(prefix="wldm_transformix_") as tmp:  # transformix writes deformationField.nii
        field = itk.transformix_deformation_field(_to_itk(grid), _on_grid(transform_params, grid, 0.0),
                                                  output_directory=tmp)
    field_sitk = sitk.GetImageFromArray(itk.array_from_image(field).astype(np.float64), isVector=True)
    field_sitk.CopyInformation(grid)
    jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field_sitk))
    if mask is not None and sitk.GetArrayViewFromImage(mask).any():
        jac = jac[sitk.GetArrayViewFromImage(mask) > 0]
    return float(jac.min()), float(jac.max()), float(np.mean(jac <= 0))


ORIENTATIONS = {
    "identity": np.eye(3),
    "rot180_x": np.diag([1.0, -1.0, -1.0]),
    "rot180_y": np.diag([-1.0, 1.0, -1.0]),
    "rot180_z": np.diag([-1.0, -1.0, 1.0]),
}


def reorient(image: sitk.Image, orientation: str) -> sitk.Image:
    """``image`` rotated rigidly about its physical centre by a header change only.

    A proper rotation of direction and origin, no resampling: the voxels are
    untouched, so the rotated copy can be warped at full quality later.
    """
    rotation = ORIENTATIONS[orientation]
    if orientation == "identity":
        return image
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    origin = np.array(image.GetOrigin())
    centre = origin + direction @ ((np.array(image.GetSize()) - 1) * spacing / 2.0)
    out = sitk.Image(image)
    out.SetDirection(tuple((rotation @ direction).ravel()))
    out.SetOrigin(tuple(centre + rotation @ (origin - centre)))
    return out


def _rigid_metric(fixed: sitk.Image, moving: sitk.Image, plan: RegistrationPlan) -> float:
    """Final metric of a short rigid-only registration (lower is better)."""
    import itk

    quick = RegistrationPlan(
        stages=["rigid"], metric=plan.metric, iterations=[int(plan.orientation_iterations)],
        resolutions=[int(plan.orientation_resolutions)], histogram_bins=plan.histogram_bins,
        spatial_samples=plan.spatial_samples, pyramid=plan.pyramid,
    )
    with tempfile.TemporaryDirectory(prefix="wldm_elastix_") as tmp:
        itk.elastix_registration_method(
            _to_itk(fixed), _to_itk(moving), parameter_object=_parameter_object(quick),
            log_to_console=False, log_to_file=True, output_directory=tmp,
        )
        return _final_metric((Path(tmp) / "elastix.log").read_text(errors="replace"))


def choose_orientation(fixed: sitk.Image, moving: sitk.Image, plan: RegistrationPlan) -> tuple[str, dict[str, float]]:
    """Pick the starting orientation of the CT whose short rigid registration scores best.

    ``fixed`` and ``moving`` come at ``plan.orientation_spacing_mm``; each candidate gets
    ``plan.orientation_iterations`` rigid iterations over ``plan.orientation_resolutions``
    levels (8 mm, 64, 1 by default: under a second for all four on a whole-body-sized case).

    The identity is kept unless another candidate's metric is better by more
    than ``plan.orientation_margin`` (relative), so near-symmetric anatomy is
    not flipped on noise.
    """
    scores: dict[str, float] = {}
    for name in plan.initial_orientations:
        if name not in ORIENTATIONS:
            raise RegistrationError(f"registration plan: unknown orientation {name!r} (use {', '.join(ORIENTATIONS)})")
        try:
            scores[name] = _rigid_metric(fixed, reorient(moving, name), plan)
        except RuntimeError:
            scores[name] = float("inf")
    finite = {k: v for k, v in scores.items() if np.isfinite(v)}
    if not finite:
        raise RegistrationError("elastix failed for every starting orientation")
    best = min(finite, key=finite.get)
    if "identity" in finite and best != "identity":
        if finite[best] > finite["identity"] - plan.orientation_margin * abs(finite["identity"]):
            best = "identity"
    return best, scores


def _final_metric(log_text: str) -> float:
    values = re.findall(r"Final metric value\s*=\s*([-+0-9.eE]+)", log_text)
    return float(values[-1]) if values else float("nan")


def _resolution_seconds(log_text: str) -> list[float]:
    """Seconds elastix spent per resolution level (all stages in order), from its log."""
    return [round(float(v), 2) for v in re.findall(r"Time spent in resolution \d+ \(ITK initiali[sz]ation and iterating\):\s*([-+0-9.eE]+)", log_text)]


def _crop_to_body(mr: sitk.Image, body: sitk.Image | None, margin_mm: float) -> sitk.Image:
    """``mr`` cropped to the body's bounding box grown by ``margin_mm`` (uncropped without a body or margin < 0).

    The fixed image then holds no wide band of air: fewer voxels to smooth and to cover with
    B-spline control points, and no samples spent on air matching air.
    """
    if body is None or margin_mm < 0 or not sitk.GetArrayViewFromImage(body).any():
        return mr
    index, size = crop_box_with_margin(body, float(margin_mm))
    return crop(mr, index, size)


def _mask_invalid(ct: sitk.Image, valid: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayFromImage(ct)
    array[sitk.GetArrayViewFromImage(valid) == 0] = AIR_HU
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(ct)
    return out


def register_ct_to_mr(
    mr: sitk.Image,
    ct: sitk.Image,
    plan: RegistrationPlan,
    window: tuple[float, float],
    body: sitk.Image | None = None,
) -> RegistrationResult:
    """Register ``ct`` (HU, any grid) onto ``mr`` (channel 0) and warp it onto the MR grid.

    ``body`` (uint8 on the MR grid) restricts the quality figures (NMI) to
    the body; the report holds seconds, final elastix metric, Jacobian range,
    folding fraction and NMI before (identity resampling) and after.
    Raises RegistrationError when elastix fails, the result folds more than
    ``plan.max_folding_fraction`` or the warped CT barely overlaps the body.
    """
    import itk

    original_ct = ct
    start = time.time()
    spacing = [float(plan.working_spacing_mm)] * 3
    mr_box = sitk.Cast(_crop_to_body(mr, body, plan.body_margin_mm), sitk.sitkFloat32)
    fixed = resample_to_spacing(mr_box, spacing, sitk.sitkLinear, 0.0)
    orientation, orientation_scores = "identity", {}
    orientation_start = time.time()
    if len(plan.initial_orientations) > 1:
        coarse = [max(float(plan.orientation_spacing_mm), float(plan.working_spacing_mm))] * 3
        orientation, orientation_scores = choose_orientation(
            resample_to_spacing(mr_box, coarse, sitk.sitkLinear, 0.0),
            resample_to_spacing(clip_ct(ct, window), coarse, sitk.sitkLinear, AIR_HU), plan)
        log.info("starting orientation of the CT: %s (metrics %s)", orientation, orientation_scores)
    orientation_seconds = time.time() - orientation_start
    ct = reorient(ct, orientation)
    ct_clipped = clip_ct(ct, window)
    ct_valid = ct_validity(ct, plan.ct_padding_threshold_hu)
    moving = resample_to_spacing(ct_clipped, spacing, sitk.sitkLinear, AIR_HU)
    with tempfile.TemporaryDirectory(prefix="wldm_elastix_") as tmp:
        try:
            _, transform_params = itk.elastix_registration_method(
                _to_itk(fixed), _to_itk(moving), parameter_object=_parameter_object(plan),
                log_to_console=False, log_to_file=True, output_directory=tmp,
            )
        except RuntimeError as exc:
            detail = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise RegistrationError(f"elastix failed: {detail[-1] if detail else exc}") from None
        log_text = (Path(tmp) / "elastix.log").read_text(errors="replace") if (Path(tmp) / "elastix.log").exists() else ""
        parameter_files = {p.name: p.read_text() for p in sorted(Path(tmp).glob("TransformParameters.*.txt"))}
    ct_reg = _warp(ct_clipped, transform_params, mr, AIR_HU)
    valid_soft = _warp(sitk.Cast(ct_valid, sitk.sitkFloat32), transform_params, mr, 0.0)
    valid = sitk.Cast(valid_soft >= 0.5, sitk.sitkUInt8)
    ct_reg = _mask_invalid(ct_reg, valid)
    body_fixed = None if body is None else resample_onto(body, fixed, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    jac_min, jac_max, folding = _jacobian_stats(transform_params, fixed, body_fixed)

    body_np = np.ones(sitk.GetArrayViewFromImage(mr).shape, bool) if body is None else sitk.GetArrayViewFromImage(body) > 0
    valid_np = sitk.GetArrayViewFromImage(valid) > 0
    ct_identity, valid_identity = resample_ct_to_mr(mr, original_ct, window, plan.ct_padding_threshold_hu)
    identity_np = sitk.GetArrayViewFromImage(valid_identity) > 0
    overlap = float((body_np & valid_np).sum() / max(body_np.sum(), 1))
    report = {
        "seconds": round(time.time() - start, 2),
        "final_metric": _final_metric(log_text),
        "metric": plan.metric,
        "jacobian_min": jac_min,
        "jacobian_max": jac_max,
        "folding_fraction": folding,
        "nmi_identity": nmi_in_mask(mr, ct_identity, body_np & identity_np),
        "nmi_registered": nmi_in_mask(mr, ct_reg, body_np & valid_np),
        "body_fraction_with_ct": overlap,
        "working_spacing_mm": plan.working_spacing_mm,
        "initial_orientation": orientation,
        "orientation_metrics": orientation_scores,
        "orientation_seconds": round(orientation_seconds, 2),
        "elastix_resolution_seconds": _resolution_seconds(log_text),
        "fixed_size": list(fixed.GetSize()),
        "stages": list(plan.stages),
    }
    if not np.isfinite(report["final_metric"]) and log_text:
        log.warning("no final metric found in the elastix log")
    if folding > plan.max_folding_fraction:
        raise RegistrationError(
            f"registration diverged: {folding:.1%} of voxels fold (Jacobian <= 0), "
            f"limit {plan.max_folding_fraction:.1%} (registration.max_folding_fraction)"
        )
    if overlap < plan.min_overlap_fraction:
        raise RegistrationError(
            f"MR and CT barely overlap after registration: {overlap:.1%} of the body has CT behind it, "
            f"limit {plan.min_overlap_fraction:.1%} (registration.min_overlap_fraction)"
        )
    return RegistrationResult(ct_reg, valid, report, parameter_files)
