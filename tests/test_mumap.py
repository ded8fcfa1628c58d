"""PET/MR attenuation maps: the bilinear HU -> mu (511 keV) conversion of Carney et al. 2006, from the plan."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from wldm_auto.inference.attenuation import hu_to_mu, mu_map
from wldm_auto.planners.schema import MuMapPlan, PlanError, Plans


def test_hand_computed_values_at_120_kvp():
    # water/air segment: 9.6e-5 cm^-1 per (HU + 1000); bone at 120 kVp: 5.10e-5 * (HU + 1000) + 4.71e-2 above 47 HU
    hu = np.array([-1024.0, -1000.0, 0.0, 47.0, 1000.0, 3071.0])
    expected = np.array([0.0, 0.0, 0.096, 9.6e-5 * 1047, 5.10e-5 * 2000 + 4.71e-2, 5.10e-5 * 4071 + 4.71e-2])
    assert expected[2] == pytest.approx(0.096) and expected[4] == pytest.approx(0.1491)
    mu = hu_to_mu(hu)
    assert mu.dtype == np.float32
    np.testing.assert_allclose(mu, expected, rtol=1e-6, atol=1e-9)


def test_bone_slope_follows_the_plans_kvp():
    plan = MuMapPlan(kvp=80)
    np.testing.assert_allclose(hu_to_mu(np.array([0.0, 1000.0]), plan), [0.096, 3.64e-5 * 2000 + 6.26e-2], rtol=1e-6)
    # every tabulated kVp: the two segments meet at the breakpoint (the table's rounding: < 1e-4 cm^-1)
    for kvp, (a, b, breakpoint) in MuMapPlan().bone.items():
        plan = MuMapPlan(kvp=int(kvp))
        below, above = hu_to_mu(np.array([breakpoint, breakpoint + 1e-6]), plan)
        assert abs(float(above) - float(below)) < 1e-4, kvp
        assert float(hu_to_mu(np.array([1000.0]), plan)[0]) == pytest.approx(a * 2000 + b, rel=1e-6)


def test_mu_map_image_keeps_the_sct_grid():
    sct = sitk.GetImageFromArray(np.array([[[-1024, 0], [1000, -1000]]] * 2, dtype=np.int16))
    sct.SetSpacing((0.8, 0.9, 2.5))
    sct.SetOrigin((-10.0, 4.0, 7.5))
    mu = mu_map(sct)
    assert mu.GetPixelID() == sitk.sitkFloat32
    assert (mu.GetSpacing(), mu.GetOrigin(), mu.GetDirection()) == (sct.GetSpacing(), sct.GetOrigin(), sct.GetDirection())
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(mu)[0], [[0.0, 0.096], [0.1491, 0.0]], rtol=1e-6)


def test_plans_without_mu_map_load_with_the_defaults(preprocessed_small):
    path = preprocessed_small.preprocessed / preprocessed_small.dataset / "plans.json"
    data = json.loads(path.read_text())
    assert data["mu_map"]["kvp"] == 120 and "Carney" in data["mu_map"]["notes"]["source"]  # written by the planner
    old = {k: v for k, v in data.items() if k != "mu_map"}
    assert Plans.from_dict(old).mu_map == MuMapPlan()
    edited = dict(data, mu_map=dict(data["mu_map"], kvp=100))
    assert Plans.from_dict(edited).mu_map.bone["100"] == [4.43e-5, 5.44e-2, 52.0]
    with pytest.raises(PlanError, match=r"mu_map\.kvp: 90 has no bone segment"):
        Plans.from_dict(dict(data, mu_map=dict(data["mu_map"], kvp=90)), "plans.json")
    with pytest.raises(PlanError, match=r"mu_map: unknown key 'kv'"):
        Plans.from_dict(dict(data, mu_map={"kv": 120}), "plans.json")
