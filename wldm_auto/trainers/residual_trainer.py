"""Residual diffusion on a regression prior (plan section ``residual_diffusion``; beyond the paper).

The fold's trained regression U-Net (``RegressionTrainer``, or ``--prior-trainer``) is frozen and predicts
each training patch; the diffusion U-Net learns, in the first stage's space (Haar sub-bands by default, or
the fold's frozen VAE with ``first_stage: "vae"``), the residual ``E(CT) - E(prior)`` scaled to unit
std on the first batches, conditioned on ``[E(MR), E(prior)]``. Prediction (``models/residual.py``)
adds the decoded residual samples to the prior. The checkpoint embeds the prior (and VAE) weights, so the
model folder is all that prediction needs.

With ``prior_folds: "own"`` the prior has seen the training cases, so its residuals there are smaller than
on new cases and the samples' spread under-states the error until calibrated (``wldm_calibrate_std``).
With ``"out_of_fold"`` each training case's prior is the regression fold that held that case out (in
``splits_final.json``), as nnU-Net's cascade trains on cross-validation predictions: the residuals trained
on are those of a prior on a case it never saw, as at prediction. Prediction uses the fold's own prior.
``prior_blur_mm`` > 0 smooths each training batch's prior by a Gaussian of random width
(:meth:`ResidualDiffusionTrainer.blurred`) before the residual is taken.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wldm_auto.io.files import read_json
from wldm_auto.models.checkpoint import Checkpoint, load_checkpoint
from wldm_auto.models.factory import build_regression_unet, build_residual_denoiser, build_residual_synthesizer
from wldm_auto.models.residual import ResidualSynthesizer
from wldm_auto.planners.schema import Plans
from wldm_auto.trainers.diffusion_trainer import SCALE_BATCHES, DiffusionTrainer, joined_valid_latents, valid_latents

log = logging.getLogger(__name__)

PRIOR_FOLDS = ("own", "out_of_fold")  # plan residual_diffusion.prior_folds


def out_of_fold_owners(splits: list[dict[str, list[str]]], fold: int) -> dict[str, int]:
    """Training case of ``fold`` -> the first other fold that holds it out (it is in that fold's ``val``, not
    its ``train``); ValueError naming the cases no other fold holds out."""
    owners, orphans = {}, []
    for case in splits[fold]["train"]:
        holders = [g for g, s in enumerate(splits) if g != fold and case in s["val"] and case not in s["train"]]
        if holders:
            owners[case] = holders[0]
        else:
            orphans.append(case)
    if orphans:
        raise ValueError(f"prior_folds 'out_of_fold': no other fold of splits_final.json holds out "
                         f"{', '.join(orphans[:5])}{' ...' if len(orphans) > 5 else ''} (fold {fold} trains on "
                         "them): use a cross-validation split (the default 5 folds) or prior_folds 'own'")
    return owners


class ResidualDiffusionTrainer(DiffusionTrainer):
    """Diffusion of CT minus a frozen regression prior, conditioned on MR and prior."""

    stage = "residual_diffusion"
    plan_section = "residual_diffusion"
    prior_trainer = "RegressionTrainer"

    def prior_checkpoint(self) -> Path:
        return self.finished_checkpoint(self.options.prior_trainer or self.prior_trainer, "regression",
                                        "train the regression prior first")

    def _load_prior(self, path: Path) -> tuple[nn.Module, Any]:
        """A finished regression checkpoint as a frozen network on the device, and its regression plan."""
        stored = load_checkpoint(path, map_location="cpu")
        if stored.stage != "regression":
            raise ValueError(f"{path}: the prior must be a regression checkpoint (stage {stored.stage!r})")
        if int(stored.mr_channels) != self.train_data.num_mr_channels:
            raise ValueError(f"{path}: the prior takes {stored.mr_channels} MR channel(s), the dataset has "
                             f"{self.train_data.num_mr_channels}")
        plan = Plans.from_dict(stored.plans, str(path)).configuration(stored.configuration).regression
        net = build_regression_unet(int(stored.mr_channels), plan)
        net.load_state_dict(stored.networks["net"])
        net.requires_grad_(False)
        return net.to(self.device).eval(), plan

    def _load_case_priors(self) -> None:
        """``prior_folds: "out_of_fold"``: the regression of the fold holding out each training case."""
        self.case_priors: dict[str, nn.Module] = {}
        self.case_prior_sources: dict[str, str] = {}
        if self.diffusion_plan.prior_folds != "out_of_fold":  # "own" (the plan allows PRIOR_FOLDS only)
            return
        owners = out_of_fold_owners(read_json(self.preprocessed / "splits_final.json"), self.fold)
        trainer = self.options.prior_trainer or self.prior_trainer
        paths, missing = {}, []
        for fold in sorted(set(owners.values())):
            try:
                paths[fold] = self.finished_checkpoint(trainer, "regression", "", fold)
            except FileNotFoundError:
                missing.append(fold)
        if missing:
            commands = "; ".join(f"wldm_train {self.plans.dataset_name} regression -f {f} -tr {trainer}"
                                 for f in missing)
            raise FileNotFoundError(f"prior_folds 'out_of_fold' needs the regression of every fold that holds out "
                                    f"a training case of fold {self.fold}; missing fold(s) "
                                    f"{', '.join(map(str, missing))}: {commands}")
        nets = {fold: self._load_prior(path)[0] for fold, path in paths.items()}
        self.case_priors = {case: nets[fold] for case, fold in owners.items()}
        self.case_prior_sources = {case: str(paths[fold]) for case, fold in owners.items()}
        log.info("out-of-fold priors: folds %s for the %d training cases of fold %d",
                 ", ".join(map(str, sorted(nets))), len(owners), self.fold)

    def build(self) -> None:
        path = self.prior_checkpoint()
        self.prior_net, self.config.regression = self._load_prior(path)
        self.prior_source = str(path)
        self._load_case_priors()
        super().build()
        self.residual_scale = torch.tensor(0.0)  # measured on the first batches

    def prior(self, mr: torch.Tensor, available: torch.Tensor, cases: Sequence[str] | None = None) -> torch.Tensor:
        """The prior of each patch: the fold's own regression, or the one that held the patch's case out."""
        nets = [self.case_priors.get(c, self.prior_net) for c in cases] if cases and self.case_priors else []
        if not nets or all(n is self.prior_net for n in nets):
            return self.prior_net(mr, available).float()
        out: torch.Tensor | None = None
        for net in {id(n): n for n in nets}.values():
            rows = [i for i, n in enumerate(nets) if n is net]
            prediction = net(mr[rows], available[rows]).float()
            if out is None:
                out = prediction.new_empty((len(nets), *prediction.shape[1:]))
            out[rows] = prediction
        return out

    def build_unet(self) -> nn.Module:
        return build_residual_denoiser(self.diffusion_plan, self.vae)

    def networks(self) -> dict[str, nn.Module]:
        return {**super().networks(), "prior": self.prior_net}

    def state(self) -> Checkpoint:
        state = super().state()
        state.extra.update(residual_scale=float(self.residual_scale), prior_source=self.prior_source,
                           prior_folds=self.diffusion_plan.prior_folds,
                           case_prior_sources=dict(self.case_prior_sources))
        return state

    def restore_extra(self, state: Checkpoint) -> None:
        super().restore_extra(state)
        self.residual_scale = torch.tensor(float(state.extra["residual_scale"]))

    def scale_values(self) -> dict[str, Any]:
        return {**super().scale_values(), "residual_scale": float(self.residual_scale)}

    def set_scale_values(self, values: dict[str, Any]) -> None:
        super().set_scale_values(values)
        self.residual_scale = torch.tensor(float(values["residual_scale"]))

    def needs_scales(self) -> bool:
        return super().needs_scales() or float(self.residual_scale) == 0.0

    @torch.no_grad()
    def measure_scales(self) -> None:
        """The latent scale (VAE only), then 1 / std of the scaled residual latents over the first batches (latent
        voxels with real CT behind them only: elsewhere the residual is the prior against padding)."""
        super().measure_scales()
        values = []
        for batch in self.batches(0, SCALE_BATCHES):
            mr, ct = batch["mr"].to(self.device), batch["ct"].to(self.device)
            prior = self.prior(mr, batch["available"].to(self.device), batch["cases"])
            residual = self.ct_latent(ct) - self.ct_latent(prior)
            values.append(valid_latents(residual, batch["valid"].to(self.device), self.vae.required_divisor))
        std = float(joined_valid_latents(values).float().std())
        self.residual_scale = torch.tensor(1.0 / max(std, 1e-6))
        log.info("residual scale 1/std(E(ct) - E(prior)) = %.4f", float(self.residual_scale))

    def blurred(self, prior: torch.Tensor) -> torch.Tensor:
        """``prior`` smoothed by a Gaussian of a random sigma in [0, prior_blur_mm] mm (one per batch)."""
        sigma_mm = float(torch.rand(())) * self.diffusion_plan.prior_blur_mm
        out = prior
        for axis, spacing in zip((2, 3, 4), reversed(self.config.spacing)):
            sigma = sigma_mm / float(spacing)
            if sigma < 0.1:
                continue
            radius = max(1, int(3 * sigma + 0.5))
            offsets = torch.arange(-radius, radius + 1, dtype=prior.dtype, device=prior.device)
            kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
            kernel = (kernel / kernel.sum()).view(1, 1, -1, 1, 1).transpose(2, axis)
            padding = [0, 0, 0, 0, 0, 0]
            padding[2 * (4 - axis)] = padding[2 * (4 - axis) + 1] = radius
            out = torch.nn.functional.conv3d(torch.nn.functional.pad(out, padding, mode="replicate"), kernel)
        return out

    def training_latents(self, mr: torch.Tensor, ct: torch.Tensor, available: torch.Tensor,
                         cases: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        scale, residual_scale = float(self.latent_scale), float(self.residual_scale)
        prior = self.prior(mr, available, cases)
        if self.diffusion_plan.prior_blur_mm > 0:
            prior = self.blurred(prior)
        z_prior = self.ct_latent(prior)
        z_ct = self.ct_latent(ct)
        z_mr = self.vae.encode(mr, "mr", available).mode() * scale
        return (z_ct - z_prior) * residual_scale, torch.cat([z_mr, z_prior], dim=1), (prior, z_prior)

    def decode_clean(self, x0: torch.Tensor, context: Any) -> torch.Tensor:
        prior, z_prior = context
        corrected = self.decode_ct_latent(z_prior + x0 / float(self.residual_scale))
        return prior + corrected - self.decode_ct_latent(z_prior)

    def synthesizer(self) -> ResidualSynthesizer:
        return build_residual_synthesizer(self.vae, self.ema, self.schedule, float(self.latent_scale),
                                          float(self.residual_scale), self.prior_net, self.config,
                                          self.config.inference.tile_overlap, self.device, self.latent_shift.tolist())
