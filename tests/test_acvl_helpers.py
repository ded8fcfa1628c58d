"""acvl-utils in place of hand-written helpers: identical results on real arrays (issue 17).

Each reference below is the helper the code carried before, kept here only to prove
the replacement gives the same voxels.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from conftest import PHANTOM_DIR, TEST_DATA
from wldm_auto.evaluation.metrics import default_body_mask
from wldm_auto.io.body_mask import largest_component
from wldm_auto.preprocessing.resampling import bounding_box
from wldm_auto.trainers.data import _read_padded

CTS = [PHANTOM_DIR / "ct.nii.gz", TEST_DATA / "totalsegmentator_examples" / "example_ct_sm.nii.gz"]
MRS = [PHANTOM_DIR / "mr_t2.nii.gz", TEST_DATA / "totalsegmentator_examples" / "example_mr_sm.nii.gz"]


def _array(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))


def _masks() -> list[np.ndarray]:
    """Real binary masks with several components: CT > -500 HU, CT > 250 HU (bone), MR above 10% of p99.5."""
    out = []
    for path in CTS:
        ct = _array(path)
        out += [ct > -500, ct > 250]
    for path in MRS:
        mr = _array(path)
        out.append(mr > 0.1 * np.percentile(mr[mr > 0], 99.5))
    return out


def _sitk_largest(mask: np.ndarray) -> np.ndarray:
    """Before: SimpleITK ConnectedComponent (faces) + RelabelComponent, label 1."""
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))),
                                   sortByObjectSize=True)
    return sitk.GetArrayFromImage(labels) == 1


def _scipy_largest(mask: np.ndarray) -> np.ndarray:
    """Before (evaluation): scipy label (faces), largest by bincount."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _old_read_padded(array, start, size, fill, dtype) -> np.ndarray:
    out = np.full((array.shape[0], *size), fill, dtype=dtype)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + np.asarray(size), array.shape[1:])
    src = (slice(None), *(slice(a, b) for a, b in zip(lo, hi)))
    dst = (slice(None), *(slice(a - s, b - s) for a, b, s in zip(lo, hi, start)))
    out[dst] = array[src]
    return out


@pytest.fixture(scope="module")
def masks() -> list[np.ndarray]:
    return _masks()


def test_largest_component_equals_simpleitk_and_scipy(masks):
    for mask in masks:
        _, count = ndimage.label(mask)
        assert count > 1  # a real choice to make
        ours = largest_component(mask)
        assert ours.dtype == bool and ours.any()
        assert np.array_equal(ours, _sitk_largest(mask)) and np.array_equal(ours, _scipy_largest(mask))
    assert not largest_component(np.zeros((4, 5, 6), bool)).any()


def test_default_body_mask_is_unchanged():
    for path in CTS:
        ct = _array(path)
        before = ndimage.binary_fill_holes(_scipy_largest(ct > -500))
        for z in range(before.shape[0]):
            before[z] = ndimage.binary_fill_holes(before[z])
        assert np.array_equal(default_body_mask(ct), before)


def test_padded_patch_reads_equal_the_hand_written_ones(tmp_path):
    rng = np.random.default_rng(0)
    ct = _array(CTS[0])
    np.save(tmp_path / "images.npy", np.stack([ct / 1000.0, -ct / 1000.0]).astype(np.float32))
    np.save(tmp_path / "masks.npy", np.stack([ct > -500, ct > 250]).astype(np.uint8))
    for name, fill, dtype in (("images", -1.0, np.float32), ("masks", 0, np.uint8)):
        array = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
        shape = np.array(array.shape[1:])
        for _ in range(40):
            size = rng.integers(4, 300, 3)  # smaller and larger than the image
            lo, hi = np.minimum(0, shape - size), np.maximum(0, shape - size)  # as sample_patch draws
            start = rng.integers(lo, hi + 1)
            patch = _read_padded(array, start, size, fill, dtype)
            assert type(patch) is np.ndarray and patch.flags.owndata and patch.dtype == dtype
            assert np.array_equal(patch, _old_read_padded(array, start, size, fill, dtype))


def test_kept_bounding_box_equals_acvl(masks):
    """Ours is kept only for its import cost (see resampling.bounding_box); the boxes are acvl-utils'."""
    from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask, pad_bbox

    for mask in masks:
        box = bounding_box(mask)
        assert [list(b) for b in box] == get_bbox_from_mask(mask)
        margin = [3, 0, 7]
        grown = [[max(0, a - m), min(n, b + m)] for (a, b), m, n in zip(box, margin, mask.shape)]
        assert grown == pad_bbox(box, margin, mask.shape)
