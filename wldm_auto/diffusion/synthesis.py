"""MR volume -> synthetic CT samples, whole volume at once in latent space.

Composes the pieces DESIGN.md section 5 describes: the VAE encodes the whole
(normalised) MR in overlapping tiles; DDIM then samples the CT latent for the
WHOLE volume, predicting noise on overlapping latent tiles that are blended
with Gaussian weights, and stepping the whole latent with one shared noise
field; the VAE decodes the result in tiles. Nothing here knows about files:
the predictor and the trainers' validation both call it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from wldm_auto.diffusion.samplers import DDIMSampler
from wldm_auto.diffusion.schedule import NoiseSchedule
from wldm_auto.diffusion.tiled import sample_whole_latent
from wldm_auto.networks.tiling import fit_tile, sliding_window


@dataclass
class LatentSynthesizer:
    """A trained first stage (``vae``) and denoiser (``unet``) ready to sample sCT."""

    vae: torch.nn.Module
    unet: torch.nn.Module
    schedule: NoiseSchedule
    latent_scale: float
    image_tile: Sequence[int]  # (z, y, x) voxels, e.g. the plan's patch size
    overlap: float = 0.5  # VAE encode/decode tiles
    device: torch.device | str = "cpu"
    batch_size: int = 4
    latent_tile_scale: int = 2  # sampling tiles are this many patch-latents wide per axis
    latent_overlap: float = 0.25

    @property
    def factor(self) -> int:
        return int(self.vae.required_divisor)

    def latent_tile(self, latent_shape: Sequence[int]) -> list[int]:
        """Sampling tile: ``latent_tile_scale`` x the patch's latent size, no larger than the latent."""
        tile = [max(1, self.latent_tile_scale * t // self.factor) for t in self.image_tile]
        return fit_tile(latent_shape, tile, int(getattr(self.unet, "required_divisor", 1)))

    @torch.no_grad()
    def encode_mr(self, mr: torch.Tensor) -> torch.Tensor:
        """(C, z, y, x) normalised MR -> (L, z/f, y/f, x/f) scaled latent (posterior mode), tiled."""
        tile = fit_tile(mr.shape[-3:], self.image_tile, self.factor)

        def encode(batch: torch.Tensor) -> torch.Tensor:
            return self.vae.encode(batch, "mr").mode()

        z = sliding_window(mr, tile, encode, overlap=self.overlap, batch_size=self.batch_size,
                           scale=1.0 / self.factor, pad_value=-1.0, device=self.device, align=self.factor)
        return z * self.latent_scale

    @torch.no_grad()
    def decode_ct(self, z: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """(L, d, h, w) scaled CT latent -> (z, y, x) normalised CT cropped to ``shape``, tiled."""
        tile = [max(1, t // self.factor) for t in self.image_tile]
        tile = [min(t, s) for t, s in zip(tile, z.shape[-3:])]

        def decode(batch: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(batch, "ct")

        ct = sliding_window(z / self.latent_scale, tile, decode, overlap=self.overlap, batch_size=self.batch_size,
                            scale=self.factor, pad_value=0.0, device=self.device)
        return ct[0, : shape[0], : shape[1], : shape[2]]

    @torch.no_grad()
    def sample(self, mr: torch.Tensor, steps: int, eta: float = 0.0, num_samples: int = 1,
               generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """(C, z, y, x) normalised MR -> (num_samples, z, y, x) normalised CT samples."""
        cond = self.encode_mr(mr).to(self.device)[None]
        sampler = DDIMSampler(self.schedule, steps, eta)

        def model_fn(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return self.unet(x, t, c)

        latent = sample_whole_latent(
            model_fn, cond, cond.shape[1], sampler, self.latent_tile(cond.shape[-3:]), overlap=self.latent_overlap,
            batch_size=self.batch_size, generator=generator, num_samples=num_samples, progress=progress,
            divisor=int(getattr(self.unet, "required_divisor", 1)),
        )
        return torch.stack([self.decode_ct(z.to(mr.device), mr.shape[-3:]) for z in latent])
