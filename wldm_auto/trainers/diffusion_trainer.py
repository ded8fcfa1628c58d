"""Stage 2: conditional diffusion in the space of a first stage (the fold's frozen VAE, or fixed Haar).

The VAE (from ``<vae trainer>__<plans>__<config>/fold_F/checkpoint_final.pt``)
encodes MR and CT patches to posterior means; CT latents are scaled to unit
standard deviation (the scale, measured on the first batches, is stored in
the checkpoint); the U-Net predicts the plan's target (x0, v or epsilon) from
[Z_CT^t, Z_MR] and t, with the loss kept to latent voxels that have real CT
behind them. An exponential moving average of the U-Net weights is kept and
used for validation, which samples whole validation volumes with DDIM. The
checkpoint embeds the VAE weights, so the diffusion model folder is all that
prediction needs.

With ``first_stage: "haar"`` (the ``wavelet_diffusion`` plan section and
:class:`WaveletDiffusionTrainer`, WDM/cWDM style) the "latents" are the Haar
sub-bands of MR and CT (see ``networks/haar.py``): nothing to load, no
latent scaling (the low band is already normalised), no DSCA.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from wldm_auto.models.checkpoint import Checkpoint
from wldm_auto.models.factory import (
    build_denoiser, build_first_stage, build_latent_synthesizer, build_schedule, check_first_stage,
)
from wldm_auto.models.latent import LatentSynthesizer
from wldm_auto.models.loading import load_frozen_vae
from wldm_auto.paths import model_folder_name
from wldm_auto.planners.schema import DiffusionPlan, Plans, TrainingPlan
from wldm_auto.trainers.base import BaseTrainer
from wldm_auto.trainers.ema import ema_copy, update_ema
from wldm_auto.trainers.losses import bone_weighted_l1, masked_l1_per_sample, masked_mse_per_sample

log = logging.getLogger(__name__)

SCALE_BATCHES = 4
# diffusion.latent_loss -> per-sample masked distance (planners.schema.RECONSTRUCTION_LOSSES lists the names)
LATENT_LOSSES = {"l2": masked_mse_per_sample, "l1": masked_l1_per_sample}


def latent_valid(valid: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 1, D, H, W) valid-voxel mask -> (B, 1, D/f, H/f, W/f) float mask of the latent voxels the loss covers:
    every one holding a real image voxel. On an odd-sized axis the last latent voxel holds one real and one padded
    slice (prediction pads the same way), and was left out of the loss (a mean of 0.5 is not > 0.5), so it was never
    trained (fidelity benchmark, 11-slice test case, lossless-shortcut VAE: that slice's MAE 402 -> 226 HU)."""
    return (torch.nn.functional.avg_pool3d(valid.float(), factor) > 0).float()


def valid_latents(z: torch.Tensor, valid: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, L, d, h, w) latents -> (L, n) those of the n latent voxels :func:`latent_valid` keeps."""
    keep = latent_valid(valid, factor)[:, 0].flatten() > 0  # (B * d * h * w,)
    return z.transpose(0, 1).flatten(1)[:, keep]


def joined_valid_latents(values: list[torch.Tensor]) -> torch.Tensor:
    """(L, n) :func:`valid_latents` of the scale batches joined; an error when they hold too few to measure a std."""
    z = torch.cat(values, dim=1)
    if z.shape[1] < 2:
        raise ValueError(f"the first {SCALE_BATCHES} training batches hold no valid CT voxel: check the "
                         "training cases' CT (all padding or invalid?)")
    return z


class DiffusionTrainer(BaseTrainer):
    """Latent DDPM training of the DSCA U-Net; validation by whole-volume DDIM sampling."""

    stage = "diffusion"
    plan_section = "diffusion"  # the ConfigurationPlan attribute holding this trainer's DiffusionPlan
    best_metric = "val_mae_ct_hu"
    best_mode = "min"
    vae_trainer = "VAETrainer"

    @property
    def diffusion_plan(self) -> DiffusionPlan:
        return getattr(self.config, self.plan_section)

    @property
    def training_plan(self) -> TrainingPlan:
        return self.diffusion_plan.training

    @property
    def haar(self) -> bool:
        return self.diffusion_plan.first_stage == "haar"

    def vae_checkpoint(self) -> Path:
        return self.finished_checkpoint(self.options.vae_trainer or self.vae_trainer, "vae", "train stage 1 first")

    def finished_checkpoint(self, trainer: str, stage: str, advice: str, fold: int | None = None) -> Path:
        """The final checkpoint of fold ``fold`` (default ``self.fold``) of ``trainer`` (same dataset, plans and
        configuration); FileNotFoundError with ``advice`` and the command that trains it otherwise."""
        fold = self.fold if fold is None else int(fold)
        folder = self.output.parent.parent / model_folder_name(trainer, self.plans.plans_name, self.configuration_name)
        path = folder / f"fold_{fold}" / "checkpoint_final.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {advice} "
                                    f"(wldm_train {self.plans.dataset_name} {stage} -f {fold} -tr {trainer})")
        return path

    def build(self) -> None:
        check_first_stage(self.diffusion_plan, self.plan_section)
        if self.haar:
            mr_channels = self.train_data.num_mr_channels
            self.vae = build_first_stage(self.diffusion_plan, mr_channels, self.config.vae).to(self.device)
            self.vae_source = "haar"
        else:
            path = self.vae_checkpoint()
            self.vae, vae_state = load_frozen_vae(path, self.device)
            self.vae_source = str(path)
            self.config.vae = Plans.from_dict(vae_state.plans).configuration(vae_state.configuration).vae
        self.unet = self.build_unet()
        divisor = int(self.vae.required_divisor) * self.unet.required_divisor
        if any(p % divisor for p in self.config.patch_size):
            raise ValueError(f"patch size {self.config.patch_size} is not divisible by {divisor} (first stage "
                             f"x{self.vae.required_divisor}, U-Net with {len(self.diffusion_plan.unet_channels)} "
                             f"levels): edit patch_size or {self.plan_section}.unet_channels in plans.json")
        self.ema = ema_copy(self.unet)
        self.model = self.wrap(self.unet)
        self.ema.to(self.device)
        self.schedule = build_schedule(self.diffusion_plan)
        self.opt = self.make_optimizer(self.unet.parameters(), self.training_plan.learning_rate)
        # 0 = not measured yet; Haar coefficients are used as they are (low band already in [-1, 1])
        self.latent_scale = torch.tensor(1.0 if self.haar else 0.0, dtype=torch.float32)
        # per-channel mean of the CT latents (plan center_latents), subtracted before scaling; 0: not centred
        self.latent_shift = torch.zeros(int(getattr(self.vae, "latent_channels", 1)))

    def build_unet(self) -> nn.Module:
        """The denoiser to train, for the first stage ``self.vae``."""
        return build_denoiser(self.diffusion_plan, self.vae)

    def networks(self) -> dict[str, nn.Module]:
        networks = {"unet": self.unet, "ema": self.ema}
        if not self.haar:
            networks["vae"] = self.vae
        return networks

    def state(self) -> Checkpoint:
        state = super().state()
        state.extra.update(latent_scale=float(self.latent_scale), latent_shift=self.latent_shift.tolist(),
                           vae_source=self.vae_source,
                           plan_section=self.plan_section, first_stage=self.diffusion_plan.first_stage)
        return state

    def restore_extra(self, state: Checkpoint) -> None:
        self.latent_scale = torch.tensor(float(state.extra["latent_scale"]))
        if state.extra.get("latent_shift"):
            self.latent_shift = torch.tensor(state.extra["latent_shift"], dtype=torch.float32)

    @torch.no_grad()
    def _measure_latent_scale(self) -> None:
        """1 / std of CT latents over the first few training batches (seeded: the same on resume); with the
        plan's ``center_latents`` first their per-channel mean (the shift), and the std of the centred latents.
        Only latent voxels with real CT behind them count (those the loss covers): padding (a patch reaching
        past a case, or rotated in by augmentation) and a CT's invalid region encode to atypical latents, and
        whether the first batches held any decided the scale (fidelity benchmark: 6.71 on its first 4 batches,
        which hold none; 5.15 on its first 16, whose std over valid voxels alone gives 6.40)."""
        values = []
        for batch in self.batches(0, SCALE_BATCHES):
            z = self.vae.encode(batch["ct"].to(self.device), "ct").mode().float()
            values.append(valid_latents(z, batch["valid"].to(self.device), self.vae.required_divisor))
        z = joined_valid_latents(values)
        if self.diffusion_plan.center_latents:
            self.latent_shift = z.mean(dim=1).cpu()
            z = z - self.latent_shift.to(z.device)[:, None]
            log.info("latent shift (per-channel mean of z_ct) = %s", [round(v, 4) for v in self.latent_shift.tolist()])
        std = float(z.std())
        self.latent_scale = torch.tensor(1.0 / max(std, 1e-6))
        log.info("latent scale 1/std(z_ct) = %.4f", float(self.latent_scale))

    def ct_latent(self, ct: torch.Tensor) -> torch.Tensor:
        """(B, 1, ...) normalised CT -> its latent in the denoiser's space (centred, scaled)."""
        z = self.vae.encode(ct, "ct").mode()
        return (z - self.latent_shift.to(z)[:, None, None, None]) * float(self.latent_scale)

    def decode_ct_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`ct_latent`: a latent in the denoiser's space -> normalised CT."""
        z = z / float(self.latent_scale) + self.latent_shift.to(z)[:, None, None, None]
        return self.vae.decode(z, "ct")

    def needs_scales(self) -> bool:
        """Whether the scales the latents are diffused at are still to be measured (first step)."""
        return float(self.latent_scale) == 0.0

    def measure_scales(self) -> None:
        if float(self.latent_scale) == 0.0:
            self._measure_latent_scale()

    def scale_values(self) -> dict[str, Any]:
        """The measured scales as plain data (what :meth:`agree_on_scales` sends)."""
        return {"latent_scale": float(self.latent_scale), "latent_shift": self.latent_shift.tolist()}

    def set_scale_values(self, values: dict[str, Any]) -> None:
        self.latent_scale = torch.tensor(float(values["latent_scale"]))
        self.latent_shift = torch.tensor(values["latent_shift"], dtype=torch.float32)

    def agree_on_scales(self) -> None:
        """Every rank diffuses at rank 0's scales: each measured them on batches of its own, and only rank 0's
        are saved with the model."""
        if self.world_size < 2:
            return
        message = [self.scale_values()]
        dist.broadcast_object_list(message, src=0)
        if self.rank > 0:
            log.info("rank %d: using rank 0's scales %s (measured here: %s)", self.rank, message[0],
                     self.scale_values())
            self.set_scale_values(message[0])

    def training_latents(self, mr: torch.Tensor, ct: torch.Tensor, available: torch.Tensor,
                         cases: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(clean latent to diffuse, denoiser condition, context for :meth:`decode_clean`) of a batch
        (``cases``: the training case of each patch)."""
        scale = float(self.latent_scale)
        z_mr = self.vae.encode(mr, "mr", available).mode() * scale
        return self.ct_latent(ct), z_mr, None

    def decode_clean(self, x0: torch.Tensor, context: Any) -> torch.Tensor:
        """A predicted clean latent as a normalised CT patch (for the image loss)."""
        return self.decode_ct_latent(x0)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        if self.needs_scales():
            self.measure_scales()
            self.agree_on_scales()
        mr = batch["mr"].to(self.device, non_blocking=True)
        ct = batch["ct"].to(self.device, non_blocking=True)
        valid = batch["valid"].to(self.device, non_blocking=True)
        available = batch["available"].to(self.device, non_blocking=True)
        with torch.no_grad():
            clean, cond, context = self.training_latents(mr, ct, available, batch.get("cases"))
            factor = self.vae.required_divisor
            valid_latent = latent_valid(valid, factor)
        t = self.schedule.sample_timesteps(len(ct), self.device, self.diffusion_plan.timestep_power)
        noise = torch.randn_like(clean)
        x_t = self.schedule.add_noise(clean, noise, t)
        weight = self.schedule.min_snr_weight(t, self.diffusion_plan.min_snr_gamma)
        out = {}
        with self.autocast():
            prediction = self.model(x_t, t, cond)
            per_sample = LATENT_LOSSES[self.diffusion_plan.latent_loss](
                prediction.float(), self.schedule.training_target(clean, noise, t), valid_latent)
            loss = (weight * per_sample).mean()
            if self.diffusion_plan.image_loss_weight > 0:
                x0, _ = self.schedule.split(x_t, t, prediction.float())
                image = bone_weighted_l1(self.decode_clean(x0, context).float(), ct, valid, self.bone_level,
                                         self.diffusion_plan.bone_weight)
                out["latent"] = loss.item()
                out["image_l1"] = image.item()
                loss = loss + self.diffusion_plan.image_loss_weight * image
        self.optimise(loss, self.opt, self.unet.parameters())
        update_ema(self.ema, self.unet, self.diffusion_plan.ema_decay)
        return {"loss": loss.item(), **out}

    def synthesizer(self) -> LatentSynthesizer:
        return build_latent_synthesizer(self.vae, self.ema, self.schedule, float(self.latent_scale), self.config,
                                        self.config.inference.tile_overlap, self.device,
                                        self.diffusion_plan.sct_estimate, self.latent_shift.tolist())

    def validate(self) -> dict[str, float]:
        """Whole validation volumes sampled with DDIM (EMA weights, fixed seed), or their posterior-mean
        estimate when that is the plan's sCT: CT MAE and PSNR in HU."""
        synthesizer = self.synthesizer()

        def predict(mr: torch.Tensor) -> torch.Tensor:
            generator = torch.Generator(device="cpu").manual_seed(self.options.seed)
            estimate = synthesizer.mean_estimate(mr, generator)  # None: the sCT is a sample (mean of samples)
            if estimate is not None:
                return estimate
            return synthesizer.sample(mr, self.diffusion_plan.validation_ddim_steps, generator=generator)[0]

        return self.validate_synthesis(predict)


class DiffusionTrainer_noDSCA(DiffusionTrainer):  # noqa: N801 - ablation names follow the paper's tables
    """Ablation: plain skip connections (no dual skip connection attention)."""

    def apply_plan_overrides(self) -> None:
        self.config.diffusion.dsca = False


class DiffusionTrainer_noDSCA_noSMD(DiffusionTrainer_noDSCA):  # noqa: N801
    """Ablation "+WRM": plain skips on the latent space of a VAE trained without SMD (VAETrainer_noSMD)."""

    vae_trainer = "VAETrainer_noSMD"


class DiffusionTrainer_noDSCA_noSMD_noWRM(DiffusionTrainer_noDSCA):  # noqa: N801
    """Ablation "vanilla LDM": plain skips on a VAE without WRM or SMD (VAETrainer_noWRM_noSMD)."""

    vae_trainer = "VAETrainer_noWRM_noSMD"


class WaveletDiffusionTrainer(DiffusionTrainer):
    """WDM/cWDM-style diffusion on Haar sub-bands (plan section ``wavelet_diffusion``); no VAE, no DSCA."""

    stage = "wavelet_diffusion"
    plan_section = "wavelet_diffusion"

    def apply_plan_overrides(self) -> None:
        plan = self.config.wavelet_diffusion
        if plan.first_stage != "haar":
            raise ValueError(f"{self.plan_section}.first_stage is {plan.first_stage!r}: WaveletDiffusionTrainer "
                             "works on Haar sub-bands; set it to \"haar\" (or train stage 'diffusion' for a VAE)")
