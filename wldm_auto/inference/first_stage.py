"""A latent model's ceiling: the TRUE CT through its first stage (encode, decode), on the MR's grid.

A latent diffusion model can only output what its decoder can draw, so no sCT of it beats the
reconstruction of the true CT. Scoring that reconstruction like an sCT (same grid, same mask)
tells at a glance whether the first or the second stage limits quality. Without a model, the same
path (crop, resample to the model grid, normalise, and back) gives the resampling floor.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from wldm_auto.inference.export import AIR_HU, to_input_grid
from wldm_auto.planners.schema import Plans
from wldm_auto.preprocessing.case import body_mask, preprocess_ct, preprocess_mr
from wldm_auto.io.normalization import denormalise_ct


def first_stage_of(synthesizer: object | None) -> object | None:
    """The synthesizer whose ``reconstruct_ct`` gives ``synthesizer``'s first stage, or None (no first stage, e.g. a
    regression U-Net). Test-time mirroring wraps a model (``models/mirroring.py``) and has none of its own: the
    ceiling is the wrapped model's."""
    base = getattr(synthesizer, "base", synthesizer)
    return base if hasattr(base, "reconstruct_ct") else None


@torch.no_grad()
def first_stage_reconstruction(mr: sitk.Image, ct: sitk.Image, plans: Plans, configuration: str,
                               synthesizer: object | None = None) -> sitk.Image:
    """``ct`` (HU, on ``mr``'s grid) preprocessed like training data, encoded and decoded by ``synthesizer``'s first
    stage (a latent synthesizer with ``reconstruct_ct``; None: no network), and put back on ``mr``'s grid
    (float32 HU, air outside the body) exactly as a prediction is."""
    if ct.GetSize() != mr.GetSize():
        raise ValueError(f"the CT must lie on the MR grid (size {ct.GetSize()} vs {mr.GetSize()}): register it first")
    config = plans.configuration(configuration)
    body = body_mask(mr, plans)
    pre = preprocess_mr([sitk.Cast(mr, sitk.sitkFloat32)], body, plans, config.spacing)
    everywhere = sitk.Cast(sitk.Cast(ct, sitk.sitkFloat32) * 0 + 1, sitk.sitkUInt8)
    ct_np, _ = preprocess_ct(sitk.Cast(ct, sitk.sitkFloat32), everywhere, pre, plans)
    values = torch.from_numpy(ct_np)
    if synthesizer is not None:
        stage = first_stage_of(synthesizer)
        if stage is None:
            raise ValueError("this model has no first stage to reconstruct through (e.g. a regression U-Net)")
        values = stage.reconstruct_ct(values)[None].cpu()
    hu = denormalise_ct(values[0].clamp(-1, 1).numpy().astype(np.float32), plans.preprocessing.ct_window)
    return to_input_grid(hu, pre.properties, mr, body, AIR_HU, config.inference.export_interpolation)
