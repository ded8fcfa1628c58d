"""Residual diffusion on a regression prior: sCT sample = prior + decoded residual sample.

A trained regression U-Net predicts the mean sCT (the prior); a diffusion
model samples, in a first stage's space, the residual between the true CT
and that prior, conditioned on the MR and on the prior (both encoded by the
same first stage). The residual latent r is turned into an image correction
through the first stage: ``prior + D(E(prior) + r / s) - D(E(prior))`` with
``s`` the residual scale; with the exact Haar first stage that is
``prior + idwt(r / s)``, and r = 0 gives the prior back voxel for voxel
(with a VAE, too: its reconstruction error of the prior cancels). The mean
of the samples is the sCT, their spread the uncertainty.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from wldm_auto.diffusion.ranks import RankShare
from wldm_auto.models.latent import LatentSynthesizer
from wldm_auto.models.phases import Phases, phase
from wldm_auto.models.regression import RegressionSynthesizer


@dataclass
class ResidualSynthesizer:
    """A frozen regression prior plus a residual diffusion model: a
    :class:`~wldm_auto.models.synthesizer.Synthesizer` whose samples differ."""

    prior: RegressionSynthesizer
    latent: LatentSynthesizer  # first stage + residual denoiser (condition: [MR, prior] encodings)
    residual_scale: float  # the residual latent is diffused multiplied by this (unit std on training patches)

    @property
    def is_stochastic(self) -> bool:
        return True

    @property
    def device(self) -> torch.device | str:
        return self.latent.device

    @property
    def phases(self) -> Phases | None:
        return self.latent.phases

    @phases.setter
    def phases(self, value: Phases | None) -> None:
        self.latent.phases = value

    @property
    def share(self) -> RankShare | None:
        return self.latent.share

    @share.setter
    def share(self, value: RankShare | None) -> None:
        self.latent.share = value
        self.prior.share = value

    def condition(self, mr: torch.Tensor, prior: torch.Tensor, available: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, Cc, d, h, w) denoiser condition [E(MR), E(prior)] and the prior's scaled latent E(prior)."""
        z_mr = self.latent.encode_mr(mr, available).to(self.latent.device)
        z_prior = self.latent.encode(prior[None], "ct").to(self.latent.device)
        return torch.cat([z_mr, z_prior])[None], z_prior

    @torch.no_grad()
    def mean_estimate(self, mr: torch.Tensor, generator: torch.Generator | None = None,
                      available: torch.Tensor | None = None) -> torch.Tensor | None:
        """(z, y, x) prior + posterior-mean residual, or None when the plan's sCT is the mean of the samples
        (see :meth:`LatentSynthesizer.mean_estimate`)."""
        if self.latent.sct_estimate != "posterior_mean":
            return None
        return self.sample(mr, 1, 0.0, 1, generator, available=available)[0]

    @torch.no_grad()
    def sample(self, mr: torch.Tensor, steps: int, eta: float = 0.0, num_samples: int = 1,
               generator: torch.Generator | None = None, progress: bool = False,
               available: torch.Tensor | None = None) -> torch.Tensor:
        """(C, z, y, x) normalised MR -> (num_samples, z, y, x) normalised CT samples (prior + residual)."""
        shape = mr.shape[-3:]
        with phase(self.phases, "prior"):
            prior = self.prior.predict(mr, available).to(mr.device)
        with phase(self.phases, "encode"):
            cond, z_prior = self.condition(mr, prior, available)
        residuals = self.latent.sample_latents(cond, steps, eta, num_samples, generator, progress)
        with phase(self.phases, "decode"):
            base = self.latent.decode_ct(z_prior, shape).to(mr.device)
            return torch.stack([prior + self.latent.decode_ct(z_prior + r / self.residual_scale, shape).to(mr.device)
                                - base for r in residuals])
