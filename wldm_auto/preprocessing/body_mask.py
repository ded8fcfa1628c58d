"""Body mask from an MR volume with the plan's settings (``preprocessing.body_mask``)."""
from __future__ import annotations

import SimpleITK as sitk

from wldm_auto.io.body_mask import mr_body_mask
from wldm_auto.planners.schema import BodyMaskPlan


def body_mask_from_mr(mr: sitk.Image, plan: BodyMaskPlan) -> sitk.Image:
    """Binary (uint8) body mask on ``mr``'s grid: :func:`~wldm_auto.io.body_mask.mr_body_mask` with ``plan``."""
    return mr_body_mask(mr, plan.threshold_fraction, plan.closing_mm, plan.keep_largest_component, plan.fill_holes)
