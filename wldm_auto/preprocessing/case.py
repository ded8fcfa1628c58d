"""Per-case preprocessing: body mask, crop, resample, normalise.

``preprocess_mr`` is shared by training preprocessing and inference, so a
prediction sees exactly the transformation its model was trained on. The
returned properties hold every number needed to put a prediction back onto
the input MR's grid (crop box, grids, normalisation parameters).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from wldm_auto.io.geometry import Geometry
from wldm_auto.planners.schema import Plans
from wldm_auto.preprocessing.body_mask import body_mask_from_mr
from wldm_auto.io.normalization import mr_percentile_range, normalise_ct, normalise_mr
from wldm_auto.preprocessing.resampling import crop, crop_box_with_margin, resample_onto, resample_to_spacing

log = logging.getLogger(__name__)


class CaseError(ValueError):
    """A case cannot be preprocessed; the message says why."""


@dataclass
class PreprocessedMR:
    mr: np.ndarray  # (C, z, y, x) float32 in [-1, 1]
    body: np.ndarray  # (z, y, x) uint8
    properties: dict[str, Any]
    crop_index: list[int]  # ITK (x, y, z) index of the crop in the input grid
    crop_size: list[int]
    grid: sitk.Image  # an empty image on the preprocessed grid (a resampling reference)


def check_channels(images: Sequence[sitk.Image], names: Sequence[str]) -> None:
    """All MR channels of a case must share the first one's grid."""
    reference = Geometry.of(images[0])
    for image, name in zip(images[1:], names[1:]):
        if not Geometry.of(image).is_close(reference):
            raise CaseError(f"{name}: geometry differs from the first MR channel ({names[0]})")


def body_mask(mr0: sitk.Image, plans: Plans, provided: sitk.Image | None = None) -> sitk.Image:
    """The provided mask on the MR grid (nearest neighbour), or one derived from the MR."""
    if provided is not None and plans.preprocessing.use_provided_masks:
        mask = resample_onto(sitk.Cast(provided > 0, sitk.sitkUInt8), mr0, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        if not sitk.GetArrayViewFromImage(mask).any():
            raise CaseError("the provided body mask (masksTr) is empty on the MR grid (no voxel > 0 where the MR "
                            "is): check that mask file, or set preprocessing.use_provided_masks false")
    else:
        mask = body_mask_from_mr(mr0, plans.preprocessing.body_mask)
    if not sitk.GetArrayViewFromImage(mask).any():
        raise CaseError("body mask is empty (MR has no foreground above the body-mask threshold)")
    return mask


MAX_GRID_VOXELS = 10 ** 9  # a whole body at 1 mm is about 2.5e8 voxels; beyond this the spacing is wrong


def check_grid_size(size: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> None:
    """CaseError when ``size`` voxels of ``spacing`` mm resampled to ``target`` mm would exceed MAX_GRID_VOXELS
    (before anything that large is allocated)."""
    extent = [n * s for n, s in zip(size, spacing)]
    voxels = float(np.prod([math.ceil(e / t) for e, t in zip(extent, target)]))
    if voxels > MAX_GRID_VOXELS:
        raise CaseError(f"the MR spans {' x '.join(f'{e:.0f}' for e in extent)} mm (spacing "
                        f"{tuple(round(float(s), 3) for s in spacing)} mm): on the plan's {tuple(target)} mm grid that "
                        f"is {voxels:.2g} voxels, more than any body needs ({MAX_GRID_VOXELS:.0e}); is the spacing "
                        "in its header right?")


def preprocess_mr(
    images: Sequence[sitk.Image], body: sitk.Image, plans: Plans, spacing: Sequence[float]
) -> PreprocessedMR:
    """Crop MR channels to the body (+margin), resample to ``spacing`` and normalise. CaseError when the grid
    would be implausibly large (a wrong spacing in the header)."""
    index, size = crop_box_with_margin(body, plans.preprocessing.crop_margin_mm)
    check_grid_size(size, body.GetSpacing(), spacing)
    body_crop = crop(body, index, size)
    grid_image = resample_to_spacing(body_crop, spacing, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    body_np = sitk.GetArrayFromImage(grid_image).astype(np.uint8)
    channels, norm = [], []
    for image in images:
        resampled = resample_to_spacing(crop(sitk.Cast(image, sitk.sitkFloat32), index, size), spacing, sitk.sitkLinear, 0.0)
        array = sitk.GetArrayFromImage(resampled)
        lo, hi = mr_percentile_range(array, body_np, plans.preprocessing.mr_percentiles)
        if np.ptp(array[body_np > 0] if body_np.any() else array) == 0:
            log.warning("an MR channel has one value everywhere in the body (%g): no contrast, so the sCT cannot "
                        "depend on it (an empty or constant image?)", lo)
        channels.append(normalise_mr(array, lo, hi, plans.preprocessing.mr_clip))
        norm.append([lo, hi])
    properties = {
        "input_geometry": Geometry.of(images[0]).to_dict(),
        "crop_index_xyz": index,
        "crop_size_xyz": size,
        "preprocessed_geometry": Geometry.of(grid_image).to_dict(),
        "shape_zyx": list(body_np.shape),
        "mr_normalisation": {"percentiles": list(plans.preprocessing.mr_percentiles), "ranges": norm,
                             "clip": plans.preprocessing.mr_clip},
    }
    return PreprocessedMR(np.stack(channels).astype(np.float32), body_np, properties, index, size, grid_image)


def preprocess_ct(
    ct_on_mr: sitk.Image, valid_on_mr: sitk.Image, pre: PreprocessedMR, plans: Plans
) -> tuple[np.ndarray, np.ndarray]:
    """Crop and resample the registered CT and its valid mask like the MR: (ct (1,z,y,x), valid (z,y,x))."""
    window = plans.preprocessing.ct_window
    ct = resample_onto(crop(ct_on_mr, pre.crop_index, pre.crop_size), pre.grid, sitk.sitkLinear, window[0], sitk.sitkFloat32)
    valid = resample_onto(crop(valid_on_mr, pre.crop_index, pre.crop_size), pre.grid, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return normalise_ct(sitk.GetArrayFromImage(ct), window)[None], sitk.GetArrayFromImage(valid).astype(np.uint8)
