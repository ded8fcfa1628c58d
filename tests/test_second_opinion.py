"""The std map's second-opinion term (``inference/second_opinion.py``): a second model's disagreement."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from wldm_auto.inference.second_opinion import (add_second_opinion, check_factor, disagreement_std,
                                                read_second_opinion, second_opinion_files)


def image(array: np.ndarray, spacing=(2.0, 1.0, 3.0)) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.SetSpacing(spacing)
    out.SetOrigin((5.0, -3.0, 1.0))
    return out


def test_a_constant_offset_gives_factor_times_it_inside_the_body_only():
    sct = np.full((6, 8, 10), 40.0, np.float32)
    body = np.zeros(sct.shape, bool)
    body[1:5, 2:6, 3:8] = True
    term = disagreement_std(sct, sct + 150.0, body, (2.0, 1.0, 3.0), 2.0, 4.0)
    assert term.dtype == np.float32 and term.shape == sct.shape
    np.testing.assert_allclose(term[body], 300.0, rtol=1e-5)  # smoothing a constant changes nothing
    assert term[~body].max() == 0.0
    np.testing.assert_array_equal(disagreement_std(sct, sct, body, (1, 1, 1), 2.0, 4.0), 0.0)
    np.testing.assert_array_equal(disagreement_std(sct, sct + 150.0, body, (1, 1, 1), 0.0, 4.0), 0.0)


def test_smoothing_spreads_a_point_by_millimetres_not_voxels():
    sct = np.zeros((21, 25, 41), np.float32)  # wide enough that the Gaussian stays inside
    other = sct.copy()
    other[10, 12, 20] = 1000.0
    body = np.ones(sct.shape, bool)
    # 1 mm in x, 2 mm in y, 4 mm in z: a 4 mm Gaussian is 4, 2 and 1 voxel(s) wide along them
    term = disagreement_std(sct, other, body, (1.0, 2.0, 4.0), 1.0, 4.0)
    assert term.sum() == pytest.approx(1000.0, rel=1e-3)  # mass kept
    assert term.argmax() == np.ravel_multi_index((10, 12, 20), sct.shape)
    # one voxel off the centre the profile falls by exp(-d^2 / (2 sigma^2)), d and sigma in voxels
    centre = term[10, 12, 20]
    assert term[10, 12, 21] / centre == pytest.approx(np.exp(-1 / 32), rel=0.02)
    assert term[10, 13, 20] / centre == pytest.approx(np.exp(-1 / 8), rel=0.02)
    assert term[11, 12, 20] / centre == pytest.approx(np.exp(-1 / 2), rel=0.03)
    unsmoothed = disagreement_std(sct, other, body, (1.0, 2.0, 4.0), 1.0, 0.0)
    assert unsmoothed.max() == 1000.0 and np.count_nonzero(unsmoothed) == 1


def test_added_in_variance_on_the_std_maps_grid():
    std = image(np.full((4, 5, 6), 30.0, np.float32))
    sct = image(np.zeros((4, 5, 6), np.int16))
    other = image(np.full((4, 5, 6), 20.0, np.float32))
    body = image(np.ones((4, 5, 6), np.uint8))
    out = add_second_opinion(std, sct, other, body, 2.0, 4.0)  # term 40 HU: sqrt(30^2 + 40^2) = 50
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), 50.0, rtol=1e-5)
    assert out.GetPixelID() == sitk.sitkFloat32
    assert (out.GetSpacing(), out.GetOrigin(), out.GetDirection()) == (std.GetSpacing(), std.GetOrigin(),
                                                                       std.GetDirection())


def test_inputs_are_checked(tmp_path):
    assert check_factor(None) is None and check_factor(3) == 3.0
    for bad in (-1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="--k must be a finite number >= 0"):
            check_factor(bad, "--k")
    reference = image(np.zeros((4, 5, 6), np.float32))
    shifted = image(np.zeros((4, 5, 6), np.float32), spacing=(2.0, 1.0, 2.5))
    with pytest.raises(ValueError, match="case a: the second opinion lies on another grid than the MR"):
        read_second_opinion(shifted, reference, "a")
    assert read_second_opinion(sitk.Cast(reference, sitk.sitkInt16), reference, "a").GetPixelID() == sitk.sitkFloat32
    sitk.WriteImage(reference, str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(reference, str(tmp_path / "a_std.nii.gz"))
    assert second_opinion_files(tmp_path, ["a"]) == {"a": tmp_path / "a.nii.gz"}
    with pytest.raises(ValueError, match="no sCT for b, c"):
        second_opinion_files(tmp_path, ["a", "b", "c"])
    with pytest.raises(ValueError, match="not found"):
        second_opinion_files(tmp_path / "missing", ["a"])
