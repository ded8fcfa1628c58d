"""PET/MR attenuation maps: sCT (HU) -> linear attenuation coefficients at 511 keV (cm^-1).

The usual bilinear conversion of Carney et al. 2006 (Med Phys 33:976): one line
through air and water, a flatter kVp-dependent one for bone above a breakpoint.
Its coefficients live in the plan (:class:`~wldm_auto.planners.schema.MuMapPlan`,
``plans.json`` ``mu_map``), so a model trained on CTs of another tube voltage
says so once, when it is planned.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from wldm_auto.planners.schema import MuMapPlan


def hu_to_mu(hu: np.ndarray, plan: MuMapPlan | None = None) -> np.ndarray:
    """float32 mu (cm^-1 at 511 keV) of HU values; below -1000 HU (air, padding) 0."""
    plan = plan or MuMapPlan()
    slope, intercept, breakpoint = plan.bone[str(plan.kvp)]
    shifted = np.asarray(hu, dtype=np.float64) + 1000.0
    mu = np.where(shifted <= breakpoint + 1000.0, plan.water_slope * shifted, slope * shifted + intercept)
    return np.maximum(mu, 0.0).astype(np.float32)


def mu_map(sct: sitk.Image, plan: MuMapPlan | None = None) -> sitk.Image:
    """The attenuation map of an sCT (float32, cm^-1 at 511 keV), on the sCT's grid."""
    image = sitk.GetImageFromArray(hu_to_mu(sitk.GetArrayViewFromImage(sct), plan))
    image.CopyInformation(sct)
    return image
