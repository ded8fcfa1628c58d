"""Body mask from an MR volume: threshold, closing, largest component, hole filling."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from wldm_auto.planners.schema import BodyMaskPlan


def body_mask_from_mr(mr: sitk.Image, plan: BodyMaskPlan) -> sitk.Image:
    """Binary (uint8) body mask on ``mr``'s grid.

    Voxels above ``threshold_fraction`` of the 99.5th intensity percentile
    are foreground; a closing of ``closing_mm`` bridges thin gaps; the largest
    connected component is kept; holes are filled in 3D and then slice by
    slice (dark bone and air inside the body stay inside).
    """
    array = sitk.GetArrayViewFromImage(mr).astype(np.float32)
    positive = array[array > 0]
    if positive.size == 0:
        return _mask_like(np.zeros(array.shape, np.uint8), mr)
    threshold = plan.threshold_fraction * float(np.percentile(positive, 99.5))
    mask = sitk.Cast(sitk.BinaryThreshold(sitk.Cast(mr, sitk.sitkFloat32), threshold, 1e30, 1, 0), sitk.sitkUInt8)
    if plan.closing_mm > 0:
        radius = [max(1, int(round(plan.closing_mm / s))) for s in mr.GetSpacing()]
        padded = sitk.ConstantPad(mask, radius, radius, 0)  # closing must not glue to the border
        closed = sitk.BinaryMorphologicalClosing(padded, radius, sitk.sitkBall)
        mask = sitk.Crop(closed, radius, radius)
    if plan.keep_largest_component:
        labels = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
        mask = sitk.Cast(labels == 1, sitk.sitkUInt8)
    out = sitk.GetArrayFromImage(mask).astype(bool)
    if plan.fill_holes:
        out = ndimage.binary_fill_holes(out)
        for z in range(out.shape[0]):
            out[z] = ndimage.binary_fill_holes(out[z])
    return _mask_like(out.astype(np.uint8), mr)


def _mask_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image
