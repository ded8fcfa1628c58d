"""The fidelity benchmark's data: the seeded MR simulator and the phantom's spatial hold-out."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, TEST_DATA

sys.path.insert(0, str(REPO / "bench"))

from mr_simulator import T1_ANCHORS, SimulationSettings, mr_signal, simulate_pair  # noqa: E402

from wldm_auto.dataset_conversion.holdout import cut, long_axis, plan_slabs  # noqa: E402

SMALL = SimulationSettings(spacing=(6.0, 6.0, 6.0))


@pytest.fixture(scope="module")
def source_ct() -> sitk.Image:
    return sitk.ReadImage(str(TEST_DATA / "totalsegmentator_examples" / "example_ct.nii.gz"))


def test_signal_is_non_monotonic_air_and_bone_dark() -> None:
    hu = np.array([-1000.0, -100.0, 40.0, 300.0, 1200.0])
    air, fat, muscle, marrow, cortical = mr_signal(hu)
    assert air < 0.05 and cortical < 0.05  # both dark: MR alone cannot tell them apart
    assert fat > muscle and marrow > muscle  # fat and fatty marrow both bright
    assert [a[0] for a in T1_ANCHORS] == sorted(a[0] for a in T1_ANCHORS)


def test_simulator_is_seeded_and_deterministic(source_ct: sitk.Image) -> None:
    mr_a, ct_a = simulate_pair(source_ct, 7, SMALL)
    mr_b, ct_b = simulate_pair(source_ct, 7, SMALL)
    mr_c, ct_c = simulate_pair(source_ct, 8, SMALL)
    assert np.array_equal(sitk.GetArrayViewFromImage(mr_a), sitk.GetArrayViewFromImage(mr_b))
    assert np.array_equal(sitk.GetArrayViewFromImage(ct_a), sitk.GetArrayViewFromImage(ct_b))
    assert mr_a.GetOrigin() == mr_b.GetOrigin() and mr_a.GetSize() == mr_b.GetSize()
    # another seed: another shape (deformation, crop) and another appearance
    if mr_a.GetSize() == mr_c.GetSize():
        assert not np.array_equal(sitk.GetArrayViewFromImage(ct_a), sitk.GetArrayViewFromImage(ct_c))
    else:
        assert mr_a.GetSize() != mr_c.GetSize()


def test_simulated_pair_shares_grid_and_ranges(source_ct: sitk.Image) -> None:
    mr, ct = simulate_pair(source_ct, 3, SMALL)
    assert mr.GetSize() == ct.GetSize() and mr.GetOrigin() == ct.GetOrigin()
    assert mr.GetSpacing() == ct.GetSpacing() == SMALL.spacing
    assert mr.GetDirection() == source_ct.GetDirection()
    hu = sitk.GetArrayViewFromImage(ct)
    signal = sitk.GetArrayViewFromImage(mr)
    assert hu.min() >= -1024 and hu.max() <= 3071 and (hu > 250).any()  # bone survives
    assert signal.min() >= 0 and signal.dtype == np.int16
    # air is dark and fat is bright in the simulated MR
    assert np.median(signal[hu < -900]) < 0.2 * np.median(signal[(hu > -150) & (hu < -60)])


def _box(size: tuple[int, int, int], lo: int, hi: int, spacing: float = 2.0) -> sitk.Image:
    array = np.zeros(size[::-1], np.uint8)
    array[lo:hi, 2:-2, 2:-2] = 1  # a body from z = lo to hi
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, spacing))
    return image


def test_slab_split_shares_no_voxel_and_keeps_the_gap() -> None:
    mask = _box((10, 12, 60), 5, 55)
    assert long_axis(mask) == 2
    split = plan_slabs(mask, 2, 0.25, 20.0)
    train, gap, test = split.train, split.gap, split.test
    assert train[0] == 0 and train[1] == gap[0] and gap[1] == test[0] and test[1] == 60
    assert (gap[1] - gap[0]) * 2.0 >= 20.0 and split.gap_mm >= 20.0
    assert test[1] - test[0] >= round(50 * 0.25)
    train_img, test_img = cut(mask, 2, train), cut(mask, 2, test)
    # physical positions: every training voxel lies at least the gap before every test voxel
    last_train = train_img.TransformIndexToPhysicalPoint((0, 0, train_img.GetSize()[2] - 1))[2]
    first_test = test_img.TransformIndexToPhysicalPoint((0, 0, 0))[2]
    assert first_test - last_train > 20.0
    assert train_img.GetSize()[2] + test_img.GetSize()[2] + (gap[1] - gap[0]) == mask.GetSize()[2]


def test_slab_split_refuses_a_body_too_short() -> None:
    with pytest.raises(ValueError, match="too short"):
        plan_slabs(_box((10, 12, 20), 2, 18), 2, 0.25, 40.0)
    with pytest.raises(ValueError, match="test_fraction"):
        plan_slabs(_box((10, 12, 20), 2, 18), 2, 1.5, 4.0)


def test_new_registration_defaults_rebuild_the_phantom_cases(tmp_path, monkeypatch) -> None:
    """The cases cut from the phantom's registration are rebuilt when the registration's key changes (new
    planner defaults), not reused from a work folder built with the old registration."""
    import fidelity_data
    from wldm_auto.preprocessing.registration import reorient, resample_ct_to_mr

    registered = []

    def identity_registration(mr, ct, plan, window, body):  # elastix itself is tested elsewhere (~20 s a run)
        registered.append(plan.working_spacing_mm)
        ct_mr, valid = resample_ct_to_mr(mr, reorient(ct, "rot180_y"), window, -900.0)
        return SimpleNamespace(ct=ct_mr, valid=valid, report={"orientation": "rot180_y"})

    monkeypatch.setattr(fidelity_data, "register_ct_to_mr", identity_registration)
    coarse = SimulationSettings(spacing=(8.0, 8.0, 8.0))
    monkeypatch.setattr(fidelity_data, "registration_key", lambda quick: "defaults-a")
    first = fidelity_data.build(tmp_path, True, 48.0, coarse)
    manifest = tmp_path / "data" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert fidelity_data.build(tmp_path, True, 48.0, coarse).manifest["key"] == first.manifest["key"]
    assert manifest.stat().st_mtime_ns == stamp  # same registration: reused
    monkeypatch.setattr(fidelity_data, "registration_key", lambda quick: "defaults-b")
    second = fidelity_data.build(tmp_path, True, 48.0, coarse)
    assert second.manifest["key"] != first.manifest["key"] and manifest.stat().st_mtime_ns != stamp
    report = tmp_path / "data" / "phantom_registration" / "report.json"
    assert json.loads(report.read_text())["key"] == "defaults-b"  # registered again, then cut again
    assert registered == [8.0, 8.0]  # quick mode's 8 mm, once per key
