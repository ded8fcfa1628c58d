"""Dataset fingerprint: geometry and intensity statistics of every training case.

Written to ``dataset_fingerprint.json`` with the hash of the raw files it was
computed from; recomputed only when that hash changes.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from wldm_auto.io.body_mask import mr_body_mask
from wldm_auto.io.files import hash_data, hash_file
from wldm_auto.io.geometry import Geometry
from wldm_auto.io.hu import BODY_THRESHOLD_HU
from wldm_auto.io.images import ImageReadError, read_image
from wldm_auto.io.raw_dataset import RawCase
from wldm_auto.planners.schema import BodyMaskPlan
from wldm_auto.planners.workers import WorkerPool

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1
CT_BODY_HU = BODY_THRESHOLD_HU  # CT voxels above this count as object/body for the CT statistics
PERCENTILES = (0.5, 50.0, 99.5)


def hash_case(case: RawCase) -> dict[str, Any]:
    """Content hashes of a case's files (MR channels, CT, mask)."""
    return {
        "images": [hash_file(p) for p in case.images],
        "target": hash_file(case.target) if case.target else None,
        "mask": hash_file(case.mask) if case.mask else None,
    }


def fingerprint_key(hashes: dict[str, dict[str, Any]]) -> str:
    return hash_data(FINGERPRINT_VERSION, hashes)


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"mean": float("nan"), "std": float("nan"), **{f"p{p:g}": float("nan") for p in PERCENTILES}}
    pct = np.percentile(values, PERCENTILES)
    return {"mean": float(values.mean()), "std": float(values.std()),
            **{f"p{p:g}": float(v) for p, v in zip(PERCENTILES, pct)}}


def fingerprint_case(case: RawCase) -> dict[str, Any]:
    """Geometry, body extent and intensity statistics of one case."""
    images = [read_image(p, sitk.sitkFloat32) for p in case.images]
    mr0 = images[0]
    if case.mask is not None:
        body = sitk.Resample(sitk.Cast(read_image(case.mask) > 0, sitk.sitkUInt8), mr0, sitk.Transform(),
                             sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    else:
        default = BodyMaskPlan()  # planning needs the default mask only
        body = mr_body_mask(mr0, default.threshold_fraction, default.closing_mm, default.keep_largest_component,
                            default.fill_holes)
    body_np = sitk.GetArrayViewFromImage(body) > 0
    if body_np.any():
        idx = np.argwhere(body_np)
        extent_zyx = (idx.max(0) - idx.min(0) + 1).tolist()
    else:
        extent_zyx = list(body_np.shape)
    spacing = mr0.GetSpacing()
    body_extent_mm = [float(n * s) for n, s in zip(reversed(extent_zyx), spacing)]  # ITK x, y, z
    result: dict[str, Any] = {
        "mr_geometry": Geometry.of(mr0).to_dict(),
        "mr_field_of_view_mm": list(Geometry.of(mr0).extent_mm),
        "body_extent_mm": body_extent_mm,
        "body_volume_ml": float(body_np.sum() * np.prod(spacing) / 1000.0),
        "mr": [_stats(sitk.GetArrayViewFromImage(im)[body_np]) for im in images],
    }
    if case.target is not None:
        ct = read_image(case.target, sitk.sitkFloat32)
        ct_np = sitk.GetArrayViewFromImage(ct)
        result.update({
            "ct_geometry": Geometry.of(ct).to_dict(),
            "ct_field_of_view_mm": list(Geometry.of(ct).extent_mm),
            "ct": {**_stats(ct_np[ct_np > CT_BODY_HU]), "min": float(ct_np.min()), "max": float(ct_np.max()),
                   "padding_fraction": float(np.mean(ct_np < -1500.0))},
        })
    return result


def ct_warnings(ct: dict[str, Any] | None) -> list[str]:
    """What looks wrong with a training CT's intensities (fingerprint statistics), as sentences: no air at all
    (stored without the -1024 HU offset, raw scanner values 0..4095?) or one value everywhere."""
    if not ct:
        return []
    low, high = ct["min"], ct["max"]
    if high - low < 1.0:
        return [f"the CT holds one value everywhere ({low:g} HU): nothing to learn from this target"]
    if low > CT_BODY_HU:
        return [f"the CT has no voxel below {CT_BODY_HU:g} HU (its minimum is {low:g}): no air at all; is it stored "
                "without the -1024 HU offset (raw scanner values 0..4095)? Its HU would be wrong for training"]
    return []


def _safe(case: RawCase) -> tuple[str, dict[str, Any] | None, str]:
    try:
        return case.name, fingerprint_case(case), ""
    except (ImageReadError, ValueError, RuntimeError) as exc:
        return case.name, None, str(exc)


def compute_fingerprint(cases: list[RawCase], hashes: dict[str, dict[str, Any]], num_processes: int = 1) -> dict[str, Any]:
    """Fingerprint of all cases (failed ones listed with their reason under ``failed``)."""
    if num_processes > 1 and len(cases) > 1:
        with WorkerPool(num_processes) as pool:  # workers die with this process and stop on Ctrl-C
            results = list(tqdm(pool.map(_safe, cases), total=len(cases), desc="fingerprint", unit="case"))
    else:
        results = [_safe(c) for c in tqdm(cases, desc="fingerprint", unit="case")]
    per_case = {name: data for name, data, _ in results if data is not None}
    failed = {name: reason for name, data, reason in results if data is None}
    for name, reason in failed.items():
        log.error("case %s: %s", name, reason)
    for name, data in per_case.items():
        for warning in ct_warnings(data.get("ct")):
            log.warning("case %s: %s", name, warning)
    return {"version": FINGERPRINT_VERSION, "key": fingerprint_key(hashes), "cases": per_case, "failed": failed}
