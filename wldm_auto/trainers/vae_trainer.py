"""Stage 1: the shared MR/CT wavelet VAE with SMD and an adversarial CT loss.

Loss (paper, DESIGN.md section 7): L = L_rec + a L_KL + b L_D + g L_adv with
L_rec the L2 reconstruction of MR (all voxels of the sequences present) and CT (valid voxels only),
L_KL on both posteriors, L_D the structure-modality disentanglement on the
posterior means of each CT/MR pair of patients, and L_adv a hinge loss from a
3D patch discriminator on CT reconstructions, switched on after
``adv_start_step``. The discriminator judges CT only: the MR decoder is never
used at inference, the CT decoder makes every sCT.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from wldm_auto.models.factory import build_discriminator, build_vae
from wldm_auto.models.tiling import reconstruct
from wldm_auto.networks.vae import DiagonalGaussian, WaveletVAE
from wldm_auto.planners.schema import TrainingPlan, VAEPlan
from wldm_auto.io.normalization import denormalise_ct
from wldm_auto.trainers.base import BaseTrainer
from wldm_auto.trainers.ema import ema_copy, update_ema
from wldm_auto.trainers.losses import d_hinge_loss, g_adv_loss, kl_loss, masked_l1, masked_mse, smd_loss
from wldm_auto.io.hu import SYNTHRAD_RANGE_HU
from wldm_auto.io.metrics import mae, psnr


RECONSTRUCTION_LOSSES = {"l1": masked_l1, "l2": masked_mse}


class VAEPair(nn.Module):
    """One forward for both modalities (one DDP call per step)."""

    def __init__(self, vae: WaveletVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, mr: torch.Tensor, ct: torch.Tensor, available: torch.Tensor | None = None) -> tuple[Any, ...]:
        rec_mr, post_mr = self.vae(mr, "mr", available=available)
        rec_ct, post_ct = self.vae(ct, "ct")
        return rec_mr, post_mr.mean, post_mr.logvar, rec_ct, post_ct.mean, post_ct.logvar


class VAETrainer(BaseTrainer):
    """The full stage-1 model: WaveletBlocks with WRM, SMD loss, adversarial CT loss."""

    stage = "vae"
    best_metric = "val_psnr_ct"
    best_mode = "max"

    @property
    def vae_plan(self) -> VAEPlan:
        return self.config.vae

    @property
    def training_plan(self) -> TrainingPlan:
        return self.config.vae.training

    def build(self) -> None:
        p = self.vae_plan
        if p.reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"vae.reconstruction_loss={p.reconstruction_loss!r}: must be one of "
                             f"{', '.join(RECONSTRUCTION_LOSSES)}")
        self.vae = build_vae(self.train_data.num_mr_channels, p)
        # the weights validation and later stages use: an average of the trained ones, or those
        self.vae_ema = ema_copy(self.vae).to(self.device) if p.ema_decay > 0 else self.vae
        self.disc = build_discriminator(p)
        self.model = self.wrap(VAEPair(self.vae))
        self.disc_model = self.wrap(self.disc)
        self.opt = self.make_optimizer(self.vae.parameters(), p.training.learning_rate)
        self.opt_d = self.make_optimizer(self.disc.parameters(), p.discriminator_learning_rate)

    def networks(self) -> dict[str, nn.Module]:
        """"vae" holds the weights every later stage loads (the average when ``ema_decay`` > 0);
        "vae_train" the trained ones, kept for resuming."""
        networks = {"vae": self.vae_ema, "discriminator": self.disc}
        if self.vae_ema is not self.vae:
            networks["vae_train"] = self.vae
        return networks

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        p = self.vae_plan
        mr = batch["mr"].to(self.device, non_blocking=True)
        ct = batch["ct"].to(self.device, non_blocking=True)
        valid = batch["valid"].to(self.device, non_blocking=True)
        available = batch["available"].to(self.device, non_blocking=True)
        adversarial = p.adv_weight > 0 and self.step >= p.adv_start_step
        reconstruction = RECONSTRUCTION_LOSSES[p.reconstruction_loss]
        with self.autocast():
            rec_mr, mean_mr, logvar_mr, rec_ct, mean_ct, logvar_ct = self.model(mr, ct, available)
            # MR: only the sequences the encoder was given (a dropped one is not reconstructed)
            rec_ct_loss = reconstruction(rec_ct.float(), ct, valid)
            rec_mr_loss = reconstruction(rec_mr.float(), mr, available[:, :, None, None, None])
            rec = p.ct_weight * rec_ct_loss + rec_mr_loss
            kl = _kl(mean_mr, logvar_mr) + _kl(mean_ct, logvar_ct)
            loss = rec + p.kl_weight * kl
            out = {"loss": 0.0, "rec": rec.item(), "rec_ct": rec_ct_loss.item(), "rec_mr": rec_mr_loss.item(),
                   "kl": kl.item()}
            if p.smd_weight > 0:
                smd = smd_loss(mean_ct, mean_mr, p.smd_pooled_modality)
                loss = loss + p.smd_weight * smd["total"]
                out.update(smd_stru=smd["stru"].item(), smd_modal=smd["modal"].item())
            if adversarial:
                self.disc.requires_grad_(False)  # the generator step must not touch discriminator gradients
                g_adv = g_adv_loss(self.disc(rec_ct))
                self.disc.requires_grad_(True)
                loss = loss + p.adv_weight * g_adv
                out["g_adv"] = g_adv.item()
        out["loss"] = loss.item()
        self.optimise(loss, self.opt, self.vae.parameters())
        if adversarial:
            with self.autocast():
                logits = self.disc_model(torch.cat([ct, rec_ct.detach()]))
                d_loss = d_hinge_loss(logits[: len(ct)], logits[len(ct):])
            self.optimise(d_loss, self.opt_d, self.disc.parameters())
            out["d"] = d_loss.item()
        if self.vae_ema is not self.vae:
            update_ema(self.vae_ema, self.vae, p.ema_decay)
        return out

    def validate(self) -> dict[str, float]:
        """Whole-volume reconstructions of the validation cases: CT MAE/PSNR in HU, MR PSNR."""
        figures: dict[str, list[float]] = {"psnr_ct": [], "mae_ct_hu": [], "psnr_mr": []}
        overlap = self.config.inference.tile_overlap
        for case in self.val_data.cases:
            mr, ct, masks = self.validation_arrays(case)
            window = self.val_data.properties(case)["ct_window"]
            tile = self.config.patch_size
            if self.vae.local:  # its output does not depend on the tile: use the larger inference tiles
                tile = [p * max(1, self.config.inference.image_tile_scale) for p in tile]
            with self.autocast():
                rec_ct = reconstruct(self.vae_ema, torch.from_numpy(ct), "ct", tile, overlap, self.device)
                rec_mr = reconstruct(self.vae_ema, torch.from_numpy(mr), "mr", tile, overlap, self.device)
            region = (masks[0] > 0) & (masks[1] > 0)
            ct_hu, rec_hu = denormalise_ct(ct[0], window), denormalise_ct(rec_ct[0].clamp(-1, 1).numpy(), window)
            figures["mae_ct_hu"].append(mae(ct_hu, rec_hu, region))
            figures["psnr_ct"].append(psnr(ct_hu, rec_hu, region, SYNTHRAD_RANGE_HU))
            figures["psnr_mr"].append(psnr(mr, rec_mr.numpy(), np.broadcast_to(masks[1] > 0, mr.shape), (-1.0, 1.0)))
        return {k: float(np.mean(v)) for k, v in figures.items() if v}


def _kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return kl_loss(DiagonalGaussian(mean, logvar))


class VAETrainer_noWRM(VAETrainer):  # noqa: N801 - ablation names follow the paper's tables
    """Ablation: plain residual blocks instead of WaveletBlocks with WRM."""

    def apply_plan_overrides(self) -> None:
        self.config.vae.wrm = False


class VAETrainer_noSMD(VAETrainer):  # noqa: N801
    """Ablation: no structure-modality disentanglement loss."""

    def apply_plan_overrides(self) -> None:
        self.config.vae.smd_weight = 0.0


class VAETrainer_noWRM_noSMD(VAETrainer):  # noqa: N801
    """Ablation: the vanilla LDM's first stage (plain residual blocks, no SMD loss)."""

    def apply_plan_overrides(self) -> None:
        self.config.vae.wrm = False
        self.config.vae.smd_weight = 0.0
