"""Stage 2: latent diffusion with DSCA on the frozen VAE of the same fold.

The VAE (from ``<vae trainer>__<plans>__<config>/fold_F/checkpoint_final.pt``)
encodes MR and CT patches to posterior means; CT latents are scaled to unit
standard deviation (the scale, measured on the first batches, is stored in
the checkpoint); the U-Net predicts the plan's target (epsilon or v) from
[Z_CT^t, Z_MR] and t, with the loss kept to latent voxels that have real CT
behind them. An exponential moving average of the U-Net weights is kept and
used for validation, which samples whole validation volumes with DDIM. The
checkpoint embeds the VAE weights, so the diffusion model folder is all that
prediction needs.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wldm_auto.diffusion.schedule import NoiseSchedule
from wldm_auto.diffusion.synthesis import LatentSynthesizer
from wldm_auto.networks.diffusion_unet import DiffusionUNet
from wldm_auto.networks.vae import WaveletVAE
from wldm_auto.planners.schema import DiffusionPlan, Plans, TrainingPlan
from wldm_auto.trainers.base import BaseTrainer
from wldm_auto.trainers.checkpoint import load_checkpoint
from wldm_auto.trainers.losses import masked_mse

log = logging.getLogger(__name__)

SCALE_BATCHES = 4


def load_frozen_vae(path: Path, device: torch.device) -> tuple[WaveletVAE, dict[str, Any]]:
    """The VAE of a finished stage-1 checkpoint, frozen, with the plan it was trained under."""
    state = load_checkpoint(path, map_location="cpu")
    if state.get("stage") != "vae":
        raise ValueError(f"{path}: not a stage-1 (VAE) checkpoint (stage {state.get('stage')!r})")
    plans = Plans.from_dict(state["plans"], str(path))
    vae = WaveletVAE(int(state["mr_channels"]), plans.configuration(state["configuration"]).vae)
    vae.load_state_dict(state["networks"]["vae"])
    vae.requires_grad_(False)
    return vae.to(device).eval(), state


class DiffusionTrainer(BaseTrainer):
    """Latent DDPM training of the DSCA U-Net; validation by whole-volume DDIM sampling."""

    stage = "diffusion"
    best_metric = "val_mae_ct_hu"
    best_mode = "min"
    vae_trainer = "VAETrainer"

    @property
    def diffusion_plan(self) -> DiffusionPlan:
        return self.config.diffusion

    @property
    def training_plan(self) -> TrainingPlan:
        return self.config.diffusion.training

    def vae_checkpoint(self) -> Path:
        name = self.options.vae_trainer or self.vae_trainer
        folder = self.output.parent.parent / f"{name}__{self.plans.plans_name}__{self.configuration_name}"
        path = folder / f"fold_{self.fold}" / "checkpoint_final.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: train stage 1 first "
                                    f"(wldm_train {self.plans.dataset_name} vae -f {self.fold} -tr {name})")
        return path

    def build(self) -> None:
        path = self.vae_checkpoint()
        self.vae, vae_state = load_frozen_vae(path, self.device)
        self.vae_source = str(path)
        self.vae_plans = vae_state["plans"]
        self.config.vae = Plans.from_dict(vae_state["plans"]).configuration(vae_state["configuration"]).vae
        latent = self.config.vae.latent_channels
        self.unet = DiffusionUNet(latent, self.diffusion_plan)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)
        self.model = self.wrap(self.unet)
        self.ema.to(self.device)
        self.schedule = NoiseSchedule.from_plan(self.diffusion_plan)
        self.opt = self.make_optimizer(self.unet.parameters(), self.training_plan.learning_rate)
        self.latent_scale = torch.zeros((), dtype=torch.float32)  # 0 = not measured yet

    def networks(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "ema": self.ema, "vae": self.vae}

    def state(self) -> dict[str, Any]:
        state = super().state()
        state.update(latent_scale=float(self.latent_scale), vae_source=self.vae_source)
        return state

    def restore_extra(self, state: dict[str, Any]) -> None:
        self.latent_scale = torch.tensor(float(state["latent_scale"]))

    @torch.no_grad()
    def _measure_latent_scale(self) -> None:
        """1 / std of CT latents over the first few training batches (seeded: the same on resume)."""
        values = []
        for batch in self.batches(0, SCALE_BATCHES):
            values.append(self.vae.encode(batch["ct"].to(self.device), "ct").mode().flatten().float())
        std = float(torch.cat(values).std())
        self.latent_scale = torch.tensor(1.0 / max(std, 1e-6))
        log.info("latent scale 1/std(z_ct) = %.4f", float(self.latent_scale))

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        if float(self.latent_scale) == 0.0:
            self._measure_latent_scale()
        scale = float(self.latent_scale)
        mr = batch["mr"].to(self.device, non_blocking=True)
        ct = batch["ct"].to(self.device, non_blocking=True)
        valid = batch["valid"].to(self.device, non_blocking=True)
        with torch.no_grad():
            z_mr = self.vae.encode(mr, "mr").mode() * scale
            z_ct = self.vae.encode(ct, "ct").mode() * scale
            factor = self.vae.required_divisor
            valid_latent = (torch.nn.functional.avg_pool3d(valid, factor) > 0.5).float()
        t = torch.randint(0, self.schedule.timesteps, (len(ct),), device=self.device)
        noise = torch.randn_like(z_ct)
        x_t = self.schedule.add_noise(z_ct, noise, t)
        with self.autocast():
            prediction = self.model(x_t, t, z_mr)
            loss = masked_mse(prediction.float(), self.schedule.training_target(z_ct, noise, t), valid_latent)
        self.optimise(loss, self.opt, self.unet.parameters())
        self._update_ema()
        return {"loss": loss.item()}

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.diffusion_plan.ema_decay
        for ema, live in zip(self.ema.parameters(), self.unet.parameters()):
            ema.lerp_(live.detach(), 1.0 - decay)
        for ema, live in zip(self.ema.buffers(), self.unet.buffers()):
            ema.copy_(live)

    def synthesizer(self) -> LatentSynthesizer:
        inference = self.config.inference
        return LatentSynthesizer(self.vae, self.ema, self.schedule, float(self.latent_scale), self.config.patch_size,
                                 inference.tile_overlap, self.device, latent_tile_scale=inference.latent_tile_scale,
                                 latent_overlap=inference.latent_overlap)

    def validate(self) -> dict[str, float]:
        """Whole validation volumes sampled with DDIM (EMA weights, fixed seed): CT MAE and PSNR in HU."""
        synthesizer = self.synthesizer()

        def predict(mr: torch.Tensor) -> torch.Tensor:
            generator = torch.Generator(device="cpu").manual_seed(self.options.seed)
            return synthesizer.sample(mr, self.diffusion_plan.validation_ddim_steps, generator=generator)[0]

        return self.validate_synthesis(predict)


class DiffusionTrainer_noDSCA(DiffusionTrainer):  # noqa: N801 - ablation names follow the paper's tables
    """Ablation: plain skip connections (no dual skip connection attention)."""

    def apply_plan_overrides(self) -> None:
        self.config.diffusion.dsca = False
