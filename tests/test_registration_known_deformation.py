"""The known-deformation registration case of bench/registration.py: deterministic, truth consistent, and
our registration removes part of the known error (issue 19)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import registration as bench  # noqa: E402  (bench/registration.py)

# a small case: CT 64x64x24 over the example CT's field of view, MR 48x48xN at 8 mm
TINY = bench.CaseSettings(ct_size=(64, 64, 24), mr_size_xy=(48, 48), mr_spacing=(8.0, 8.0, 8.0))


@pytest.fixture(scope="module")
def source():
    return bench.source_ct()


@pytest.fixture(scope="module")
def case(source):
    return bench.make_case(3, TINY, source)


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def test_case_is_seeded_and_deterministic(source, case):
    again = bench.make_case(3, TINY, source)
    for key in ("ct", "mr", "truth"):
        np.testing.assert_array_equal(_array(case[key]), _array(again[key]))
        assert case[key].GetOrigin() == again[key].GetOrigin() and case[key].GetSpacing() == again[key].GetSpacing()
    other = bench.make_case(4, TINY, source)
    assert not np.array_equal(_array(case["truth"]), _array(other["truth"]))
    assert not np.array_equal(_array(case["mr"]), _array(other["mr"]))


def test_case_geometry(case):
    assert case["ct"].GetSize() == TINY.ct_size
    assert case["mr"].GetSize()[:2] == TINY.mr_size_xy and case["mr"].GetSpacing() == TINY.mr_spacing
    assert case["truth"].GetSize() == case["mr"].GetSize() and case["truth"].GetOrigin() == case["mr"].GetOrigin()
    # the MR's slices stay inside the CT's long axis (outer voxel edges), both centred alike
    assert case["mr"].GetSize()[2] * TINY.mr_spacing[2] <= case["ct"].GetSize()[2] * case["ct"].GetSpacing()[2] + 1e-6
    centre = [np.array(im.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in im.GetSize()]))
              for im in (case["ct"], case["mr"])]
    np.testing.assert_allclose(centre[0], centre[1], atol=1e-6)


def test_truth_is_the_ct_at_the_known_map(case):
    """truth(x) = CT(T(x)): checked voxel by voxel at random MR voxels (T maps MR points to CT points)."""
    truth, ct, transform = case["truth"], case["ct"], case["transform"]
    rng = np.random.default_rng(0)
    interpolate = sitk.Image(ct)
    checked = 0
    for index in rng.integers(0, truth.GetSize(), size=(200, 3)):
        index = [int(i) for i in index]
        point = transform.TransformPoint(truth.TransformIndexToPhysicalPoint(index))
        continuous = np.array(ct.TransformPhysicalPointToContinuousIndex(point))
        upper = np.array(ct.GetSize()) - 1
        if np.any(continuous < -0.501) or np.any(continuous > upper + 0.501):  # outside the CT: air
            assert truth[index] == pytest.approx(bench.AIR_HU)
            continue
        if np.any(continuous < 0) or np.any(continuous > upper):  # ITK's half-voxel border band: skipped
            continue
        expected = interpolate.EvaluateAtContinuousIndex(continuous.tolist(), sitk.sitkLinear)
        assert truth[index] == pytest.approx(expected, abs=1e-2)
        checked += 1
    assert checked > 50


def test_known_map_is_a_small_smooth_deformation(case):
    """Not the identity, bounded (rotation, translation and B-spline limits), and the truth differs from
    the CT resampled without it."""
    grid, transform = case["truth"], case["transform"]
    size = np.array(grid.GetSize())
    shifts = []
    for index in np.stack(np.meshgrid(*[np.linspace(0, n - 1, 5).astype(int) for n in size], indexing="ij"), -1).reshape(-1, 3):
        point = np.array(grid.TransformIndexToPhysicalPoint([int(i) for i in index]))
        shifts.append(np.linalg.norm(np.array(transform.TransformPoint(point.tolist())) - point))
    radius = np.linalg.norm(size * np.array(grid.GetSpacing())) / 2
    bound = np.deg2rad(TINY.rotation_deg) * np.sqrt(3) * radius + np.sqrt(3) * (TINY.translation_mm + TINY.max_coefficient_mm)
    assert 0.5 < max(shifts) < bound
    identity = bench.warp(case["ct"], sitk.Transform(), grid)
    assert bench.body_mae(case["truth"], case["truth"]) == 0.0
    assert bench.body_mae(identity, case["truth"]) > 10.0


def test_our_registration_reduces_the_known_error(case):
    """Small, fast run (8 mm MR, 6 mm working spacing, few iterations): MAE against the truth drops."""
    plan = bench.plan_with(dict(working_spacing_mm=6.0, initial_orientations=["identity"], iterations=[64, 64],
                                resolutions=[2, 1], spatial_samples=2048, bspline_grid_spacing_mm=48.0))
    registered, _, report = bench.run_ours(case["mr"], case["ct"], plan)
    none = bench.body_mae(bench.warp(case["ct"], sitk.Transform(), case["truth"]), case["truth"])
    ours = bench.body_mae(registered, case["truth"])
    assert report["initial_orientation"] == "identity"
    assert ours < 0.85 * none, (ours, none)


def test_plan_overrides_are_checked():
    with pytest.raises(SystemExit, match="unknown RegistrationPlan field"):
        bench.plan_with({"no_such_field": 1})
    assert dataclasses.asdict(bench.plan_with({}))["stages"] == ["rigid", "bspline"]


def test_pyramid_choice_and_body_crop():
    from wldm_auto.preprocessing import registration

    with pytest.raises(registration.RegistrationError, match="unknown pyramid"):
        registration._parameter_object(bench.plan_with({"pyramid": "gaussian"}))
    params = registration._parameter_object(bench.plan_with({}))
    assert params.GetParameterMap(1)["FixedImagePyramid"] == ("FixedRecursiveImagePyramid",)
    assert params.GetParameterMap(1)["NumberOfResolutions"] == (str(bench.plan_with({}).resolutions[1]),)
    mr = sitk.Image([40, 30, 20], sitk.sitkFloat32)
    mr.SetSpacing([2.0, 2.0, 4.0])
    array = np.zeros((20, 30, 40), np.uint8)  # z, y, x
    array[8:12, 5:15, 10:20] = 1
    body = sitk.GetImageFromArray(array)
    body.CopyInformation(mr)
    cropped = registration._crop_to_body(mr, body, 4.0)  # 2 voxels in x and y, 1 in z
    assert cropped.GetSize() == (14, 14, 6)
    assert cropped.GetOrigin() == mr.TransformIndexToPhysicalPoint((8, 3, 7))
    assert registration._crop_to_body(mr, body, -1.0).GetSize() == mr.GetSize()
    assert registration._crop_to_body(mr, None, 30.0).GetSize() == mr.GetSize()
