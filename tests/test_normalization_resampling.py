"""Intensity normalisation (CT window, MR percentiles) and physical-grid resampling / cropping."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PHANTOM_DIR
from wldm_auto.io.normalization import (
    denormalise_ct,
    denormalise_mr,
    mr_percentile_range,
    normalise_ct,
    normalise_mr,
)
from wldm_auto.preprocessing.resampling import (
    bounding_box,
    crop,
    crop_box_with_margin,
    grid_for_spacing,
    resample_onto,
    resample_to_spacing,
)

DEFAULT_WINDOW = (-1024.0, 3071.0)
PAPER_WINDOW = (-800.0, 800.0)


@pytest.fixture(scope="module")
def phantom_ct() -> np.ndarray:
    """The full phantom CT (int16 HU, 256x200x200, padding -2048)."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(PHANTOM_DIR / "ct.nii.gz")))


@pytest.fixture(scope="module")
def phantom_mr() -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz")))


# --------------------------------------------------------------------------- CT

@pytest.mark.parametrize("window", [DEFAULT_WINDOW, PAPER_WINDOW])
def test_ct_window_ends_map_to_minus_one_and_one(window):
    lo, hi = window
    hu = np.array([lo - 1000, lo, (lo + hi) / 2, hi, hi + 5000], dtype=np.float32)
    out = normalise_ct(hu, window)
    assert out.dtype == np.float32
    assert out.tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]
    assert denormalise_ct(np.array([-1.0, 0.0, 1.0], np.float32), window).tolist() == [lo, (lo + hi) / 2, hi]


@pytest.mark.parametrize("window", [DEFAULT_WINDOW, PAPER_WINDOW])
def test_ct_round_trip_on_phantom(phantom_ct, window):
    lo, hi = window
    assert phantom_ct.dtype == np.int16 and phantom_ct.min() == -2048  # real padding outside the scan
    normalised = normalise_ct(phantom_ct, window)
    assert normalised.dtype == np.float32 and normalised.shape == phantom_ct.shape
    assert normalised.min() == -1.0 and normalised.max() == 1.0
    back = denormalise_ct(normalised, window)
    assert back.dtype == np.float32

    inside = (phantom_ct >= lo) & (phantom_ct <= hi)
    assert inside.mean() > 0.2
    error = np.abs(back[inside].astype(np.float64) - phantom_ct[inside])
    assert error.max() < 1e-3  # float32 rounding only (measured ~6e-5 HU); required: < 0.01 HU
    # outside the window: clipped to the window ends
    assert np.all(back[phantom_ct < lo] == lo)
    assert np.all(back[phantom_ct > hi] == hi)


def test_ct_round_trip_float32_clipped(phantom_ct):
    for window in (DEFAULT_WINDOW, PAPER_WINDOW):
        clipped = np.clip(phantom_ct, *window).astype(np.float32)
        back = denormalise_ct(normalise_ct(clipped, window), window)
        assert np.abs(back - clipped).max() < 1e-3  # far inside the 1 HU requirement
        # rounding back to int16 HU is lossless
        assert np.array_equal(np.rint(back).astype(np.int16), clipped.astype(np.int16))


def test_ct_normalisation_is_monotone_and_linear():
    hu = np.arange(-1024, 3072, dtype=np.int16)
    out = normalise_ct(hu, DEFAULT_WINDOW).astype(np.float64)
    assert np.all(np.diff(out) > 0)
    assert np.allclose(np.diff(out), 2.0 / 4095.0, atol=1e-6)


# --------------------------------------------------------------------------- MR

def test_mr_percentiles_inside_body(phantom_mr):
    body = phantom_mr > 0.1 * phantom_mr.max()
    assert 0.1 < body.mean() < 0.5
    lo, hi = mr_percentile_range(phantom_mr, body.astype(np.uint8), (0.5, 99.5))
    expected = np.percentile(phantom_mr[body], [0.5, 99.5])
    assert (lo, hi) == pytest.approx(tuple(expected), abs=1e-9)
    # the background (0) does not pull the lower end down
    whole_lo, whole_hi = mr_percentile_range(phantom_mr, np.zeros_like(body), (0.5, 99.5))
    assert (whole_lo, whole_hi) == pytest.approx(tuple(np.percentile(phantom_mr, [0.5, 99.5])))
    assert whole_lo == 0.0 and lo >= 0.1 * phantom_mr.max()

    normalised = normalise_mr(phantom_mr, lo, hi)
    assert normalised.dtype == np.float32
    assert normalised.min() == -1.0 and normalised.max() == 1.0
    in_body = normalised[body]
    # about 0.5 % of the body on each clipped end, the rest strictly inside
    assert 0.002 < np.mean(in_body == -1.0) < 0.01
    assert 0.002 < np.mean(in_body == 1.0) < 0.01
    assert np.median(in_body) == pytest.approx(2 * (np.median(phantom_mr[body]) - lo) / (hi - lo) - 1, abs=1e-5)


def test_mr_normalise_denormalise_inverse(phantom_mr):
    body = phantom_mr > 0.1 * phantom_mr.max()
    lo, hi = mr_percentile_range(phantom_mr, body, (0.5, 99.5))
    mr = phantom_mr.astype(np.float32)
    unclipped = normalise_mr(mr, lo, hi, clip=False)
    assert unclipped.min() < -1.0 and unclipped.max() > 1.0
    back = denormalise_mr(unclipped, lo, hi)
    assert np.abs(back - mr).max() < 1e-3  # float32 rounding only (measured ~1.2e-4 at values up to ~3900)
    clipped_back = denormalise_mr(normalise_mr(mr, lo, hi, clip=True), lo, hi)
    assert np.abs(clipped_back - np.clip(mr, lo, hi)).max() < 1e-3


@pytest.mark.parametrize("value", [0.0, 417.0])
def test_constant_mr_does_not_divide_by_zero(value):
    mr = np.full((4, 5, 6), value, np.float32)
    body = np.ones(mr.shape, bool)
    lo, hi = mr_percentile_range(mr, body, (0.5, 99.5))
    assert (lo, hi) == (value, value + 1.0)
    with np.errstate(all="raise"):
        normalised = normalise_mr(mr, lo, hi)
    assert np.all(normalised == -1.0)
    assert np.all(denormalise_mr(normalised, lo, hi) == value)


def test_constant_inside_body_only():
    mr = np.zeros((4, 5, 6), np.float32)
    mr[1:3, 1:4, 1:5] = 250.0
    mr[0, 0, 0] = 9999.0  # outside the body: ignored
    body = mr == 250.0
    assert mr_percentile_range(mr, body, (1, 99)) == (250.0, 251.0)


# --------------------------------------------------------------------------- resampling

def rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


OBLIQUE = rotation(0, 20.0) @ rotation(1, 20.0)
RAMP = np.array([0.5, -0.25, 0.75])  # HU per mm along physical x, y, z


def oblique_grid(size=(30, 24, 20), spacing=(1.0, 1.5, 2.0), pixel_type=sitk.sitkFloat32) -> sitk.Image:
    image = sitk.Image(list(size), pixel_type)
    image.SetSpacing(spacing)
    image.SetOrigin((-10.25, 5.5, 20.0))
    image.SetDirection(OBLIQUE.ravel().tolist())
    return image


def voxel_centres(image: sitk.Image) -> np.ndarray:
    """Physical centres of all voxels, numpy (z, y, x, 3) order."""
    size = np.array(image.GetSize())
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), axis=-1)
    index_xyz = zyx[..., ::-1].astype(np.float64)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + (index_xyz * np.array(image.GetSpacing())) @ direction.T


def corners(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Physical positions of the outer edge corners at index -0.5 and size-0.5."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing, origin = np.array(image.GetSpacing()), np.array(image.GetOrigin())
    first = origin + direction @ (-0.5 * spacing)
    last = origin + direction @ ((np.array(image.GetSize()) - 0.5) * spacing)
    return first, last


def ramp_image(**kwargs) -> sitk.Image:
    reference = oblique_grid(**kwargs)
    values = (voxel_centres(reference) @ RAMP + 3.0).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(reference)
    return image


def test_voxel_centre_helper_matches_itk():
    image = oblique_grid()
    centres = voxel_centres(image)
    for index in [(0, 0, 0), (29, 23, 19), (3, 17, 8)]:
        assert np.allclose(centres[index[::-1]], image.TransformIndexToPhysicalPoint(index), atol=1e-9)


@pytest.mark.parametrize("new_spacing, new_size", [
    ((2.0, 3.0, 2.5), (15, 12, 16)),
    ((0.5, 0.75, 1.0), (60, 48, 40)),
    ((1.0, 1.5, 2.0), (30, 24, 20)),
])
def test_resample_keeps_direction_and_extent(new_spacing, new_size):
    image = oblique_grid()
    out = resample_to_spacing(image, new_spacing)
    assert out.GetSize() == new_size
    assert out.GetSpacing() == pytest.approx(new_spacing, abs=0)
    assert out.GetDirection() == image.GetDirection()
    assert out.GetPixelID() == image.GetPixelID()
    old_first, old_last = corners(image)
    new_first, new_last = corners(out)
    assert np.abs(new_first - old_first).max() < 1e-9  # measured ~4e-15 mm; required 1e-6
    assert np.abs(new_last - old_last).max() < 1e-9
    assert np.abs(np.subtract(new_last, new_first) - np.subtract(old_last, old_first)).max() < 1e-6


def test_resample_non_divisible_extent_keeps_first_corner():
    image = oblique_grid(size=(31, 25, 21), spacing=(1.0, 1.0, 1.0))
    new_spacing = np.array([2.0, 2.0, 2.0])
    size, origin = grid_for_spacing(image, new_spacing)
    assert size == [16, 12, 10]  # round(15.5), round(12.5), round(10.5): nearest even
    out = resample_to_spacing(image, new_spacing)
    assert list(out.GetSize()) == size and out.GetOrigin() == pytest.approx(origin)
    old_first, old_last = corners(image)
    new_first, new_last = corners(out)
    assert np.abs(new_first - old_first).max() < 1e-6
    # the far edge moves by less than half a new voxel along each image axis
    shift = OBLIQUE.T @ (new_last - old_last)
    assert np.all(np.abs(shift) <= new_spacing / 2 + 1e-9)


@pytest.mark.parametrize("new_spacing", [(2.0, 3.0, 2.5), (0.5, 0.75, 1.0), (1.7, 1.1, 3.3)])
def test_resampled_ramp_stays_a_ramp(new_spacing):
    image = ramp_image()
    out = resample_to_spacing(image, new_spacing, default_value=-999.0)
    values = sitk.GetArrayFromImage(out).astype(np.float64)
    centres = voxel_centres(out)
    expected = centres @ RAMP + 3.0

    # new centres inside the hull of old centres: linear interpolation of a linear function is exact
    direction = np.array(image.GetDirection()).reshape(3, 3)
    index = ((centres - np.array(image.GetOrigin())) @ direction) / np.array(image.GetSpacing())
    inside = np.all((index >= -1e-9) & (index <= np.array(image.GetSize()) - 1 + 1e-9), axis=-1)
    assert inside.mean() > 0.5
    assert np.abs(values[inside] - expected[inside]).max() < 1e-4  # float32 ramp up to ~56: measured ~3e-6
    # nothing from outside the old grid (-999) leaks into the interior
    assert values[inside].min() > -100


def test_resample_nearest_keeps_labels_and_pixel_type():
    labels = np.zeros((20, 24, 30), np.uint8)
    labels[5:15, 6:18, 10:20] = 1
    labels[8:12, 9:12, 12:15] = 2
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(oblique_grid())
    out = resample_to_spacing(image, (2.0, 3.0, 2.5), sitk.sitkNearestNeighbor)
    assert out.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(out))) == {0, 1, 2}
    as_float = resample_to_spacing(image, (2.0, 3.0, 2.5), sitk.sitkLinear, pixel_type=sitk.sitkFloat32)
    assert as_float.GetPixelID() == sitk.sitkFloat32
    # volume of label 1+2 preserved to within a few percent
    old = np.count_nonzero(labels) * np.prod(image.GetSpacing())
    new = np.count_nonzero(sitk.GetArrayViewFromImage(out)) * np.prod(out.GetSpacing())
    assert new == pytest.approx(old, rel=0.15)


def test_resample_onto_reference_grid():
    image = ramp_image()
    reference = resample_to_spacing(oblique_grid(), (2.0, 3.0, 2.5))
    out = resample_onto(image, reference)
    assert out.GetSize() == reference.GetSize() and out.GetOrigin() == reference.GetOrigin()
    direct = resample_to_spacing(image, (2.0, 3.0, 2.5))
    assert np.array_equal(sitk.GetArrayViewFromImage(out), sitk.GetArrayViewFromImage(direct))


# --------------------------------------------------------------------------- bounding boxes and crops

def test_bounding_box_numpy():
    mask = np.zeros((10, 20, 30), bool)
    mask[4:6, 5:10, 12:20] = True
    mask[5, 9, 25] = True
    assert bounding_box(mask) == ((4, 6), (5, 10), (12, 26))
    assert bounding_box(np.zeros((3, 4, 5))) is None
    single = np.zeros((3, 4, 5), np.uint8)
    single[2, 0, 4] = 7
    assert bounding_box(single) == ((2, 3), (0, 1), (4, 5))
    assert bounding_box(np.eye(4)[1:3]) == ((0, 2), (1, 3))


def mask_image(array: np.ndarray, spacing=(1.0, 2.0, 3.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin((-5.0, 7.0, 11.0))
    image.SetDirection(OBLIQUE.ravel().tolist())
    return image


def test_crop_box_with_margin_itk_order():
    array = np.zeros((10, 20, 30), np.uint8)  # z, y, x
    array[4:6, 5:10, 12:20] = 1
    mask = mask_image(array)  # spacing x=1, y=2, z=3 mm
    # margin 4 mm -> 4 voxels in x, 2 in y, ceil(4/3) = 2 in z
    index, size = crop_box_with_margin(mask, 4.0)
    assert index == [8, 3, 2]
    assert size == [16, 9, 6]
    assert crop_box_with_margin(mask, 0.0) == ([12, 5, 4], [8, 5, 2])
    assert crop_box_with_margin(mask, 2.5) == ([9, 3, 3], [14, 9, 4])  # ceil: 3, 2, 1 voxels

    cropped = crop(mask, index, size)
    assert cropped.GetSize() == (16, 9, 6)
    assert int(sitk.GetArrayViewFromImage(cropped).sum()) == int(array.sum())
    assert np.allclose(cropped.GetOrigin(), mask.TransformIndexToPhysicalPoint(index), atol=1e-9)
    assert cropped.GetDirection() == mask.GetDirection()
    assert np.array_equal(sitk.GetArrayViewFromImage(cropped), array[2:8, 3:12, 8:24])


def test_crop_box_clips_at_borders():
    array = np.zeros((10, 20, 30), np.uint8)
    array[8:10, 0:3, :] = 1  # touches x = 0, x = end, y = 0, z = end
    index, size = crop_box_with_margin(mask_image(array), 10.0)
    # x: whole width; y: 0 .. 3 + 5; z: 8 - ceil(10/3) = 4 .. 10
    assert index == [0, 0, 4]
    assert size == [30, 8, 6]
    everything = crop_box_with_margin(mask_image(array), 1000.0)
    assert everything == ([0, 0, 0], [30, 20, 10])


def test_crop_box_empty_mask_raises():
    with pytest.raises(ValueError, match="empty"):
        crop_box_with_margin(mask_image(np.zeros((4, 5, 6))), 10.0)
