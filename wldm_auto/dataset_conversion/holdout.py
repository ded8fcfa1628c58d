"""Spatial hold-out of one aligned MR/CT pair: disjoint train and test slabs with a gap between them.

With a single paired scan (the bundled phantom) a model can still be graded on voxels it never
saw: cut the pair along one axis into a training slab and a test slab, with a gap of at least one
training patch between them, so no training patch, however it is placed or augmented, contains or
borders a test voxel. The CT must already be on the MR's grid (registered); the slabs are plain
sub-images (geometry kept), so the training slab goes into a raw dataset like any other case and
the test slab is predicted and evaluated like a new patient.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

AXES = {"x": 0, "y": 1, "z": 2}


@dataclass(frozen=True)
class SlabSplit:
    """Index ranges (half-open, along ``axis`` of the MR grid) of the training slab, the gap and the test slab."""

    axis: int  # ITK axis (0 x, 1 y, 2 z)
    train: tuple[int, int]
    gap: tuple[int, int]
    test: tuple[int, int]
    gap_mm: float

    def to_dict(self) -> dict:
        return {"axis": "xyz"[self.axis], "train": list(self.train), "gap": list(self.gap), "test": list(self.test),
                "gap_mm": self.gap_mm}


def long_axis(mask: sitk.Image) -> int:
    """The ITK axis along which the mask's bounding box is longest in mm."""
    array = sitk.GetArrayViewFromImage(mask) > 0
    if not array.any():
        raise ValueError("cannot find the long axis of an empty mask")
    extents = []
    for axis in range(3):
        numpy_axis = 2 - axis
        present = np.flatnonzero(array.any(axis=tuple(a for a in range(3) if a != numpy_axis)))
        extents.append((present[-1] - present[0] + 1) * mask.GetSpacing()[axis])
    return int(np.argmax(extents))


def plan_slabs(mask: sitk.Image, axis: int, test_fraction: float, gap_mm: float) -> SlabSplit:
    """Split the extent of ``mask`` along ``axis``: test = the last ``test_fraction`` of the body,
    then a gap of at least ``gap_mm``, training = everything before the gap (to the image's start)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if gap_mm < 0 or not np.isfinite(gap_mm):
        raise ValueError(f"gap_mm must be a finite number >= 0, got {gap_mm}")
    array = sitk.GetArrayViewFromImage(mask) > 0
    numpy_axis = 2 - axis
    present = np.flatnonzero(array.any(axis=tuple(a for a in range(3) if a != numpy_axis)))
    if present.size == 0:
        raise ValueError("the body mask is empty: nothing to split")
    first, last = int(present[0]), int(present[-1]) + 1
    size = mask.GetSize()[axis]
    spacing = mask.GetSpacing()[axis]
    test_start = last - max(1, int(round((last - first) * test_fraction)))
    gap_voxels = int(np.ceil(gap_mm / spacing - 1e-9))
    train_end = test_start - gap_voxels
    if train_end - first < 2 or test_start >= size:
        raise ValueError(f"the body ({(last - first) * spacing:.0f} mm along axis {'xyz'[axis]}) is too short for a "
                         f"{test_fraction:.0%} test slab and a {gap_mm:.0f} mm gap")
    return SlabSplit(axis, (0, train_end), (train_end, test_start), (test_start, size), gap_voxels * spacing)


def cut(image: sitk.Image, axis: int, bounds: tuple[int, int]) -> sitk.Image:
    """The sub-image ``bounds`` (half-open) along ``axis``; physical geometry kept."""
    size, index = list(image.GetSize()), [0, 0, 0]
    index[axis], size[axis] = int(bounds[0]), int(bounds[1] - bounds[0])
    return sitk.RegionOfInterest(image, size, index)


@dataclass
class HoldoutPair:
    """The two slabs of an aligned pair: the training case (CT padded where invalid) and the test case."""

    split: SlabSplit
    train_mr: sitk.Image
    train_ct: sitk.Image  # int16 HU, ``padding`` where no real CT exists (preprocessing marks it invalid)
    test_mr: sitk.Image
    test_ct: sitk.Image  # int16 HU, air where no real CT exists
    test_valid: sitk.Image  # uint8: 1 where real CT exists


def _int16(image: sitk.Image, valid: sitk.Image, fill: float) -> sitk.Image:
    array = np.rint(sitk.GetArrayFromImage(image)).astype(np.float32)
    array[sitk.GetArrayViewFromImage(valid) == 0] = fill
    out = sitk.GetImageFromArray(np.clip(array, -32768, 32767).astype(np.int16))
    out.CopyInformation(image)
    return out


def split_aligned_pair(mr: sitk.Image, ct_on_mr: sitk.Image, valid: sitk.Image, body: sitk.Image,
                       test_fraction: float, gap_mm: float, padding: float = -2048.0,
                       axis: int | None = None) -> HoldoutPair:
    """Cut a registered pair (CT on the MR grid, ``valid`` where real CT exists) along ``axis`` (default: the
    body's long axis) into a training slab and a test slab at the body's far end, ``gap_mm`` apart."""
    for name, image in (("CT", ct_on_mr), ("valid mask", valid), ("body mask", body)):
        if image.GetSize() != mr.GetSize():
            raise ValueError(f"the {name} must lie on the MR grid (size {image.GetSize()} vs {mr.GetSize()})")
    axis = long_axis(body) if axis is None else axis
    split = plan_slabs(body, axis, test_fraction, gap_mm)
    train_valid, test_valid = cut(valid, axis, split.train), cut(valid, axis, split.test)
    return HoldoutPair(split, cut(mr, axis, split.train), _int16(cut(ct_on_mr, axis, split.train), train_valid, padding),
                       cut(mr, axis, split.test), _int16(cut(ct_on_mr, axis, split.test), test_valid, -1024.0),
                       sitk.Cast(test_valid > 0, sitk.sitkUInt8))
