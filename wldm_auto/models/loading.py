"""Trained models from checkpoints: a stage's synthesizer for prediction, a frozen VAE for stage 2.

Networks come from :mod:`wldm_auto.models.factory` with the plan stored in the
checkpoint, then take its weights; nothing here reads more than one file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from wldm_auto.models.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from wldm_auto.models.factory import (
    build_denoiser, build_first_stage, build_latent_synthesizer, build_regression_synthesizer, build_regression_unet,
    build_residual_denoiser, build_residual_synthesizer, build_schedule, build_vae,
)
from wldm_auto.models.synthesizer import Synthesizer
from wldm_auto.networks.vae import WaveletVAE
from wldm_auto.planners.schema import ConfigurationPlan, Plans


def _diffusion(checkpoint: Checkpoint, config: ConfigurationPlan, overlap: float,
               device: torch.device) -> Synthesizer:
    """The first stage (embedded VAE or fixed Haar) and the EMA U-Net of a diffusion checkpoint."""
    plan = getattr(config, checkpoint.extra.get("plan_section", "diffusion"))
    first_stage = build_first_stage(plan, int(checkpoint.mr_channels), config.vae)
    if plan.first_stage != "haar":
        first_stage.load_state_dict(checkpoint.networks["vae"])
    unet = build_denoiser(plan, first_stage)
    unet.load_state_dict(checkpoint.networks["ema"])
    return build_latent_synthesizer(first_stage.to(device).eval(), unet.to(device).eval(), build_schedule(plan),
                                    float(checkpoint.extra["latent_scale"]), config, overlap, device,
                                    plan.sct_estimate, checkpoint.extra.get("latent_shift"))


def _regression(checkpoint: Checkpoint, config: ConfigurationPlan, overlap: float,
                device: torch.device) -> Synthesizer:
    """The U-Net of a regression-baseline checkpoint."""
    net = build_regression_unet(int(checkpoint.mr_channels), config.regression)
    net.load_state_dict(checkpoint.networks["net"])
    return build_regression_synthesizer(net.to(device).eval(), config, overlap, device)


def _residual(checkpoint: Checkpoint, config: ConfigurationPlan, overlap: float,
              device: torch.device) -> Synthesizer:
    """The embedded regression prior, first stage and EMA residual U-Net of a residual-diffusion checkpoint."""
    plan = config.residual_diffusion
    mr_channels = int(checkpoint.mr_channels)
    first_stage = build_first_stage(plan, mr_channels, config.vae)
    if plan.first_stage != "haar":
        first_stage.load_state_dict(checkpoint.networks["vae"])
    unet = build_residual_denoiser(plan, first_stage)
    unet.load_state_dict(checkpoint.networks["ema"])
    prior = build_regression_unet(mr_channels, config.regression)
    prior.load_state_dict(checkpoint.networks["prior"])
    return build_residual_synthesizer(first_stage.to(device).eval(), unet.to(device).eval(), build_schedule(plan),
                                      float(checkpoint.extra["latent_scale"]), float(checkpoint.extra["residual_scale"]),
                                      prior.to(device).eval(), config, overlap, device,
                                      checkpoint.extra.get("latent_shift"))


_BUILDERS = {"diffusion": _diffusion, "wavelet_diffusion": _diffusion, "regression": _regression,
             "residual_diffusion": _residual}
SYNTHESIS_STAGES = tuple(_BUILDERS)


def load_synthesis_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint prediction can use (a stage of :data:`SYNTHESIS_STAGES`), loaded with ``weights_only=True``;
    CheckpointError (a ValueError) naming the file otherwise."""
    stored = load_checkpoint(path, map_location="cpu")
    if stored.stage not in SYNTHESIS_STAGES:
        raise CheckpointError(f"{path}: a {stored.stage!r} checkpoint; prediction needs a "
                              f"{' or '.join(repr(k) for k in SYNTHESIS_STAGES)} model")
    return stored


def build_synthesizer(checkpoint: Checkpoint, config: ConfigurationPlan, overlap: float,
                      device: torch.device) -> Synthesizer:
    """The synthesizer of a checkpoint of one of :data:`SYNTHESIS_STAGES`, with ``config``'s tiles (``overlap``).

    Weights that do not fit the plan raise RuntimeError (or KeyError for a missing network)."""
    if checkpoint.stage not in _BUILDERS:
        raise ValueError(f"a {checkpoint.stage!r} checkpoint is no {' or '.join(SYNTHESIS_STAGES)} model")
    return _BUILDERS[checkpoint.stage](checkpoint, config, overlap, device)


def load_frozen_vae(path: Path, device: torch.device) -> tuple[WaveletVAE, Checkpoint]:
    """The VAE of a finished stage-1 checkpoint, frozen, with the checkpoint (and so the plan) it came from."""
    checkpoint = load_checkpoint(path, map_location="cpu")
    if checkpoint.stage != "vae":
        raise ValueError(f"{path}: not a stage-1 (VAE) checkpoint (stage {checkpoint.stage!r})")
    plans = Plans.from_dict(checkpoint.plans, str(path))
    vae = build_vae(int(checkpoint.mr_channels), plans.configuration(checkpoint.configuration).vae)
    vae.load_state_dict(checkpoint.networks["vae"])
    vae.requires_grad_(False)
    return vae.to(device).eval(), checkpoint
