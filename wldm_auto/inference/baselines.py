"""Reference sCTs that need no training: what a learned model has to beat."""
from __future__ import annotations

import SimpleITK as sitk

from wldm_auto.inference.export import AIR_HU
from wldm_auto.planners.schema import Plans
from wldm_auto.preprocessing.case import body_mask

BULK_DENSITY_HU = 0


def bulk_density_sct(mr: sitk.Image, plans: Plans) -> sitk.Image:
    """Bulk-density sCT (int16, the MR's grid): water (0 HU) inside the plan's MR body mask, air (-1024) outside.

    The simplest MR-only planning CT; a model that cannot beat it on MAE and bone Dice adds nothing yet."""
    body = body_mask(mr, plans)
    return sitk.Cast(body, sitk.sitkInt16) * (BULK_DENSITY_HU - AIR_HU) + AIR_HU
