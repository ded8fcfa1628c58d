"""Residual diffusion on a regression prior (plan section ``residual_diffusion``; beyond the paper).

The fold's trained regression U-Net (``RegressionTrainer``, or ``--prior-trainer``) is frozen and predicts
each training patch; the diffusion U-Net learns, in the first stage's space (Haar sub-bands by default, or
the fold's frozen VAE with ``first_stage: "vae"``), the residual ``E(CT) - E(prior)`` scaled to unit
std on the first batches, conditioned on ``[E(MR), E(prior)]``. Prediction (``models/residual.py``)
adds the decoded residual samples to the prior. The checkpoint embeds the prior (and VAE) weights, so the
model folder is all that prediction needs.

The prior has seen the training cases, so its residuals there are smaller than on new cases: the samples'
spread is expected to under-state the error until calibrated (``wldm_calibrate_std``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wldm_auto.models.checkpoint import Checkpoint, load_checkpoint
from wldm_auto.models.factory import build_regression_unet, build_residual_denoiser, build_residual_synthesizer
from wldm_auto.models.residual import ResidualSynthesizer
from wldm_auto.planners.schema import Plans
from wldm_auto.trainers.diffusion_trainer import SCALE_BATCHES, DiffusionTrainer

log = logging.getLogger(__name__)


class ResidualDiffusionTrainer(DiffusionTrainer):
    """Diffusion of CT minus a frozen regression prior, conditioned on MR and prior."""

    stage = "residual_diffusion"
    plan_section = "residual_diffusion"
    prior_trainer = "RegressionTrainer"

    def prior_checkpoint(self) -> Path:
        return self.finished_checkpoint(self.options.prior_trainer or self.prior_trainer, "regression",
                                        "train the regression prior first")

    def build(self) -> None:
        path = self.prior_checkpoint()
        stored = load_checkpoint(path, map_location="cpu")
        if stored.stage != "regression":
            raise ValueError(f"{path}: the prior must be a regression checkpoint (stage {stored.stage!r})")
        if int(stored.mr_channels) != self.train_data.num_mr_channels:
            raise ValueError(f"{path}: the prior takes {stored.mr_channels} MR channel(s), the dataset has "
                             f"{self.train_data.num_mr_channels}")
        self.config.regression = Plans.from_dict(stored.plans, str(path)).configuration(stored.configuration).regression
        self.prior_net = build_regression_unet(int(stored.mr_channels), self.config.regression)
        self.prior_net.load_state_dict(stored.networks["net"])
        self.prior_net.requires_grad_(False)
        self.prior_net.to(self.device).eval()
        self.prior_source = str(path)
        super().build()
        self.residual_scale = torch.tensor(0.0)  # measured on the first batches

    def build_unet(self) -> nn.Module:
        return build_residual_denoiser(self.diffusion_plan, self.vae)

    def networks(self) -> dict[str, nn.Module]:
        return {**super().networks(), "prior": self.prior_net}

    def state(self) -> Checkpoint:
        state = super().state()
        state.extra.update(residual_scale=float(self.residual_scale), prior_source=self.prior_source)
        return state

    def restore_extra(self, state: Checkpoint) -> None:
        super().restore_extra(state)
        self.residual_scale = torch.tensor(float(state.extra["residual_scale"]))

    def needs_scales(self) -> bool:
        return super().needs_scales() or float(self.residual_scale) == 0.0

    @torch.no_grad()
    def measure_scales(self) -> None:
        """The latent scale (VAE only), then 1 / std of the scaled residual latents over the first batches."""
        super().measure_scales()
        values = []
        for batch in self.batches(0, SCALE_BATCHES):
            mr, ct = batch["mr"].to(self.device), batch["ct"].to(self.device)
            prior = self.prior_net(mr, batch["available"].to(self.device)).float()
            scale = float(self.latent_scale)
            values.append(((self.vae.encode(ct, "ct").mode() - self.vae.encode(prior, "ct").mode()) * scale).flatten())
        std = float(torch.cat(values).float().std())
        self.residual_scale = torch.tensor(1.0 / max(std, 1e-6))
        log.info("residual scale 1/std(E(ct) - E(prior)) = %.4f", float(self.residual_scale))

    def training_latents(self, mr: torch.Tensor, ct: torch.Tensor, available: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        scale, residual_scale = float(self.latent_scale), float(self.residual_scale)
        prior = self.prior_net(mr, available).float()
        z_prior = self.vae.encode(prior, "ct").mode() * scale
        z_ct = self.vae.encode(ct, "ct").mode() * scale
        z_mr = self.vae.encode(mr, "mr", available).mode() * scale
        return (z_ct - z_prior) * residual_scale, torch.cat([z_mr, z_prior], dim=1), (prior, z_prior)

    def decode_clean(self, x0: torch.Tensor, context: Any) -> torch.Tensor:
        prior, z_prior = context
        scale = float(self.latent_scale)
        corrected = self.vae.decode((z_prior + x0 / float(self.residual_scale)) / scale, "ct")
        return prior + corrected - self.vae.decode(z_prior / scale, "ct")

    def synthesizer(self) -> ResidualSynthesizer:
        return build_residual_synthesizer(self.vae, self.ema, self.schedule, float(self.latent_scale),
                                          float(self.residual_scale), self.prior_net, self.config,
                                          self.config.inference.tile_overlap, self.device)
