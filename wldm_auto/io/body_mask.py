"""Body mask from an MR volume: threshold, closing, largest component, hole filling (plain settings, no plan).

Ground floor: planning (the fingerprint's default mask) and preprocessing
(the plan's ``preprocessing.body_mask``) both compute masks with it.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


MAX_CLOSING_RADIUS = 16  # voxels per axis (6 mm at 0.375 mm); finer spacings close less than closing_mm


def mr_body_mask(mr: sitk.Image, threshold_fraction: float, closing_mm: float, keep_largest_component: bool,
                 fill_holes: bool) -> sitk.Image:
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
    threshold = threshold_fraction * float(np.percentile(positive, 99.5))
    mask = _mask_like((array >= threshold).astype(np.uint8), mr)  # any intensity scale (ITK's filter had a cap)
    if closing_mm > 0:
        # at most MAX_CLOSING_RADIUS voxels: a tiny spacing (a wrong header) would otherwise ask for a ball of
        # hundreds of voxels, which takes hours or exhausts the memory
        radius = [max(1, min(int(round(closing_mm / s)), MAX_CLOSING_RADIUS)) for s in mr.GetSpacing()]
        padded = sitk.ConstantPad(mask, radius, radius, 0)  # closing must not glue to the border
        closed = sitk.BinaryMorphologicalClosing(padded, radius, sitk.sitkBall)
        mask = sitk.Crop(closed, radius, radius)
    out = sitk.GetArrayFromImage(mask).astype(bool)
    if keep_largest_component:
        out = largest_component(out)
    if fill_holes:
        out = fill_holes_3d_then_slices(out)
    return _mask_like(out.astype(np.uint8), mr)


def ct_body_mask(ct: np.ndarray, threshold: float) -> np.ndarray:
    """Body of a CT array: ct > ``threshold`` HU, largest connected component (faces), holes filled in 3D
    then per axial slice (the default mask of ``wldm_evaluate`` and ``wldm_calibrate_std``)."""
    return fill_holes_3d_then_slices(largest_component(np.asarray(ct > threshold)))


def fill_holes_3d_then_slices(mask: np.ndarray) -> np.ndarray:
    """``mask`` with enclosed holes filled in 3D, then in each axial (first-axis) slice."""
    out = ndimage.binary_fill_holes(mask)
    for z in range(out.shape[0]):
        out[z] = ndimage.binary_fill_holes(out[z])
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected (6-neighbour) component of a boolean 3D mask (components tied for
    largest are all kept); an empty mask stays empty. acvl-utils' cc3d labelling: the same voxels as
    SimpleITK's ConnectedComponent + RelabelComponent and scipy's label on the phantom and the
    TotalSegmentator example, and faster (66 vs 75 vs 94 ms on the 256x200x200 phantom CT)."""
    from acvl_utils.morphology.morphology_helper import remove_all_but_largest_component_cc3d

    return remove_all_but_largest_component_cc3d(np.asarray(mask, dtype=bool), connectivity=6)


def _mask_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image
