"""Networks, noise schedules and synthesizers from plan sections: the one place that turns plans into plain arguments.

Trainers build fresh networks here; the predictor builds the same networks
here before loading a checkpoint's weights into them, so the two cannot
disagree on an architecture; both wrap trained networks into synthesizers
with the same tiles. Errors about a plan name its keys.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from wldm_auto.diffusion.schedule import NoiseSchedule
from wldm_auto.models.latent import LatentSynthesizer
from wldm_auto.models.precision import autocast_dtype
from wldm_auto.models.regression import RegressionSynthesizer
from wldm_auto.models.residual import ResidualSynthesizer
from wldm_auto.networks.diffusion_unet import DiffusionUNet
from wldm_auto.networks.discriminator import PatchDiscriminator3D
from wldm_auto.networks.haar import HaarFirstStage
from wldm_auto.networks.regression_unet import RegressionUNet
from wldm_auto.networks.vae import WaveletVAE
from wldm_auto.planners.schema import FIRST_STAGES, ConfigurationPlan, DiffusionPlan, RegressionPlan, VAEPlan


def _widths(values: Sequence[int], where: str) -> list[int]:
    """``values`` as a list; ValueError naming the plan key ``where`` unless they are positive widths."""
    widths = list(values)
    if not widths or min(widths) < 1:
        raise ValueError(f"{where} must be non-empty positive widths, got {widths}")
    return widths


def build_vae(mr_channels: int, plan: VAEPlan) -> WaveletVAE:
    """The stage-1 wavelet VAE of ``plan`` for ``mr_channels`` MR sequences (untrained)."""
    channels = _widths(plan.channels, "VAEPlan.channels")
    expected = 2 ** (len(channels) - 1)
    if plan.downsampling_factor != expected:
        raise ValueError(
            f"VAEPlan.downsampling_factor={plan.downsampling_factor} does not match "
            f"channels={channels} ({len(channels)} levels give 2**{len(channels) - 1}={expected})"
        )
    return WaveletVAE(mr_channels, channels, plan.latent_channels, plan.blocks_per_level, plan.group_width,
                      plan.wrm, plan.normalization, plan.shortcut)


def build_discriminator(plan: VAEPlan) -> PatchDiscriminator3D:
    """The 3D patch discriminator judging the VAE's CT reconstructions."""
    return PatchDiscriminator3D(1, plan.discriminator_channels, plan.discriminator_layers)


def check_first_stage(plan: DiffusionPlan, where: str) -> None:
    """The plan's first stage is known, and DSCA is only asked for where a VAE gives S/M halves."""
    if plan.first_stage not in FIRST_STAGES:
        raise ValueError(f"{where}.first_stage={plan.first_stage!r}: must be one of {', '.join(FIRST_STAGES)}")
    if plan.first_stage == "haar" and plan.dsca:
        raise ValueError(f"{where}: first_stage 'haar' has no structure/modality latent halves for DSCA; "
                         "set dsca to false")


def build_first_stage(plan: DiffusionPlan, mr_channels: int, vae: VAEPlan) -> nn.Module:
    """The space ``plan`` diffuses in: the fixed Haar transform, or an (untrained) VAE of plan section ``vae``."""
    if plan.first_stage == "haar":
        return HaarFirstStage(mr_channels)
    return build_vae(mr_channels, vae)


def build_denoiser(plan: DiffusionPlan, first_stage: nn.Module) -> DiffusionUNet:
    """The denoiser for ``first_stage``'s space: CT latent channels out, MR latent (+flags) as condition."""
    channels = _widths(plan.unet_channels, "DiffusionPlan.unet_channels")
    if isinstance(first_stage, HaarFirstStage):
        return DiffusionUNet(first_stage.channels("ct"), channels, cond_channels=first_stage.channels("mr"),
                             dsca=plan.dsca)
    return DiffusionUNet(first_stage.latent_channels, channels, dsca=plan.dsca)


def build_residual_denoiser(plan: DiffusionPlan, first_stage: nn.Module) -> DiffusionUNet:
    """The residual model's denoiser: CT-space channels out, [MR, prior sCT] in ``first_stage``'s space as
    condition; no DSCA (its condition is not an S/M-split MR latent)."""
    channels = _widths(plan.unet_channels, "residual_diffusion.unet_channels")
    if plan.dsca:
        raise ValueError("residual_diffusion.dsca must be false: the condition [MR, prior] has no structure/"
                         "modality halves")
    if isinstance(first_stage, HaarFirstStage):
        ct, mr = first_stage.channels("ct"), first_stage.channels("mr")
    else:
        ct = mr = int(first_stage.latent_channels)
    return DiffusionUNet(ct, channels, cond_channels=mr + ct, dsca=False)


def build_schedule(plan: DiffusionPlan) -> NoiseSchedule:
    """The noise schedule recorded in a plan's diffusion section."""
    return NoiseSchedule(timesteps=plan.timesteps, schedule=plan.beta_schedule, beta_start=plan.beta_start,
                         beta_end=plan.beta_end, prediction=plan.prediction)


def build_regression_unet(mr_channels: int, plan: RegressionPlan) -> RegressionUNet:
    """The regression-baseline U-Net of ``plan`` for ``mr_channels`` MR sequences (untrained)."""
    return RegressionUNet(mr_channels, _widths(plan.unet_channels, "RegressionPlan.unet_channels"),
                          plan.blocks_per_level, plan.group_width, plan.error_head)


def build_latent_synthesizer(first_stage: nn.Module, denoiser: nn.Module, schedule: NoiseSchedule, latent_scale: float,
                             config: ConfigurationPlan, overlap: float,
                             device: torch.device | str, sct_estimate: str = "sample_mean",
                             latent_shift: Sequence[float] | None = None) -> LatentSynthesizer:
    """Latent (or wavelet-domain) sampling with ``config``'s patch and inference tiles.

    ``overlap``: of the first stage's encode/decode tiles; the networks run in ``inference.precision``
    (autocast, ``models/precision.py``); ``sct_estimate``: the plan section's (what the sCT is);
    ``latent_shift``: the CT latents' per-channel mean the denoiser's space is centred by (None: not centred)."""
    inference = config.inference
    return LatentSynthesizer(first_stage, denoiser, schedule, latent_scale, config.patch_size, overlap, device,
                             latent_tile_scale=inference.latent_tile_scale, latent_overlap=inference.latent_overlap,
                             latent_margin=inference.latent_margin, image_tile_scale=inference.image_tile_scale,
                             first_stage_margin=inference.first_stage_margin,
                             autocast=autocast_dtype(inference.precision, device), sct_estimate=sct_estimate,
                             latent_shift=list(latent_shift) if latent_shift else None)


def build_residual_synthesizer(first_stage: nn.Module, denoiser: nn.Module, schedule: NoiseSchedule,
                               latent_scale: float, residual_scale: float, prior: nn.Module,
                               config: ConfigurationPlan, overlap: float,
                               device: torch.device | str, latent_shift: Sequence[float] | None = None
                               ) -> ResidualSynthesizer:
    """Regression prior plus sampled residual, with ``config``'s tiles for the prior and the latent parts."""
    return ResidualSynthesizer(
        build_regression_synthesizer(prior, config, overlap, device),
        build_latent_synthesizer(first_stage, denoiser, schedule, latent_scale, config, overlap, device,
                                 config.residual_diffusion.sct_estimate, latent_shift),
        residual_scale)


def build_regression_synthesizer(net: nn.Module, config: ConfigurationPlan, overlap: float,
                                 device: torch.device | str) -> RegressionSynthesizer:
    """Whole-volume regression with tiles of ``config``'s patch size overlapping by ``overlap``, the U-Net in
    ``inference.precision``."""
    return RegressionSynthesizer(net, config.patch_size, overlap, device,
                                 autocast=autocast_dtype(config.inference.precision, device))
