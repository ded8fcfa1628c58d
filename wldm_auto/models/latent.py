"""MR volume -> synthetic CT samples, whole volume at once in latent space.

Composes the pieces DESIGN.md section 5 describes: the VAE encodes the whole
(normalised) MR in overlapping tiles; DDIM then samples the CT latent for the
WHOLE volume, predicting noise on overlapping latent tiles that are blended
with Gaussian weights, and stepping the whole latent with one shared noise
field; the VAE decodes the result in tiles. A first stage that declares
``whole_volume`` (the fixed Haar transform: exact and local) encodes and
decodes the whole volume in one call instead. Nothing here knows about files:
the predictor and the trainers' validation both call it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wldm_auto.diffusion.ranks import RankShare
from wldm_auto.diffusion.samplers import DDIMSampler
from wldm_auto.diffusion.schedule import NoiseSchedule
from wldm_auto.diffusion.tiled import sample_whole_latent
from wldm_auto.diffusion.tiling import balanced_tiles, fit_tile
from wldm_auto.models.phases import Phases, phase
from wldm_auto.models.precision import network_autocast
from wldm_auto.models.tiling import pad_to_multiple, sliding_window


TILE_ELEMENTS = 2 ** 27  # values of one first-level VAE or U-Net activation per batch of tiles (512 MB in float32)


@dataclass
class LatentSynthesizer:
    """A first stage (``vae``: trained wavelet VAE or fixed Haar) and denoiser (``unet``) ready to sample sCT.

    The latent and the wavelet-domain models are both this
    :class:`~wldm_auto.models.synthesizer.Synthesizer`; their samples differ (``is_stochastic``).
    """

    vae: torch.nn.Module
    unet: torch.nn.Module
    schedule: NoiseSchedule
    latent_scale: float
    image_tile: Sequence[int]  # (z, y, x) voxels, e.g. the plan's patch size
    overlap: float = 0.5  # VAE encode/decode tiles
    device: torch.device | str = "cpu"
    batch_size: int = 4
    latent_tile_scale: int = 1  # sampling tiles are at most this many patch-latents wide per axis
    latent_overlap: float = 0.25  # of the sampling tiles, when latent_margin is 0
    latent_margin: int = 0  # > 0: the fewest sampling tiles whose neighbours overlap by this many latent voxels
    image_tile_scale: int = 1  # VAE tiles are this many patches wide per axis (local VAEs only)
    first_stage_margin: int = 64  # local VAEs: neighbouring encode/decode tiles overlap by this many image voxels
    phases: Phases | None = None  # set by a caller that wants encode/sample/decode seconds
    share: RankShare | None = None  # spread every tiled pass of a case over these ranks (--split-case)
    # network forwards (tiled VAE encode/decode, denoiser) under autocast in this dtype, outputs cast to float32
    # before blending; None: float32 throughout. The fixed Haar transform always runs in float32.
    autocast: torch.dtype | None = None
    # the sCT: "sample_mean" (the mean of the samples) or "posterior_mean" (``mean_estimate``; plan sct_estimate)
    sct_estimate: str = "sample_mean"
    # per-channel mean of the CT latents (unscaled), subtracted before scaling (plan center_latents); None: 0
    latent_shift: Sequence[float] | None = None

    @property
    def is_stochastic(self) -> bool:
        return True

    @property
    def factor(self) -> int:
        return int(self.vae.required_divisor)

    def latent_tile(self, latent_shape: Sequence[int]) -> list[int]:
        """Sampling tile: ``latent_tile_scale`` x the patch's latent size, no larger than the latent (with
        ``latent_margin`` the largest tile: the denoiser then uses as few and as small tiles as it allows),
        halved along its longest axis until one first-level U-Net activation holds at most
        :data:`TILE_ELEMENTS` values."""
        divisor = self._unet_divisor
        tile = [max(1, self.latent_tile_scale * t // self.factor) for t in self.image_tile]
        tile = fit_tile(latent_shape, tile, divisor)
        while math.prod(tile) * self._unet_width > TILE_ELEMENTS and max(tile) > 2 * divisor:
            axis = tile.index(max(tile))
            tile[axis] = max(divisor, tile[axis] // 2 // divisor * divisor)
        return tile

    @property
    def _unet_divisor(self) -> int:
        return int(getattr(self.unet, "required_divisor", 1))

    @property
    def _unet_width(self) -> int:
        channels = getattr(self.unet, "channels", None)
        return int(channels[0]) if channels else 1

    def latent_batch(self, tile: Sequence[int]) -> int:
        """Latent tiles per denoiser call: ``batch_size``, fewer when their first-level activations would
        hold more than :data:`TILE_ELEMENTS` values."""
        return max(1, min(self.batch_size, TILE_ELEMENTS // max(1, math.prod(tile) * self._unet_width)))

    def first_stage_tile(self) -> list[int]:
        """Encode/decode tile (image voxels): ``image_tile_scale`` patches for a local VAE, else the patch."""
        scale = self.image_tile_scale if getattr(self.vae, "local", False) else 1
        return [int(t) * max(1, int(scale)) for t in self.image_tile]

    def first_stage_layout(self, shape: Sequence[int]) -> tuple[list[int], float | list[float], int]:
        """Encode/decode tiles for an image of ``shape``: (tile in image voxels, overlap, tiles per batch).

        A GroupNorm VAE keeps patch-sized tiles overlapping by ``overlap``. A local VAE gets the fewest
        tiles of at most ``image_tile_scale`` patches per axis that overlap by ``first_stage_margin``
        voxels (its receptive field, not a fraction of a large tile), shrunk until one tile's first-level
        activation holds at most :data:`TILE_ELEMENTS` values; a batch holds at most that many too."""
        tile = fit_tile(shape, self.first_stage_tile(), self.factor)
        stems = getattr(self.vae, "stems", None)
        width = int(stems["ct"].out_channels) if stems is not None else 1
        overlap: float | list[float] = self.overlap
        if getattr(self.vae, "local", False):
            while math.prod(tile) * width > TILE_ELEMENTS and max(tile) > 2 * self.factor:
                axis = tile.index(max(tile))
                tile[axis] = max(self.factor, tile[axis] // 2 // self.factor * self.factor)
            tile, overlap = balanced_tiles(shape, tile, self.first_stage_margin, self.factor)
        batch = max(1, min(self.batch_size, TILE_ELEMENTS // (math.prod(tile) * width)))
        return tile, overlap, batch

    @property
    def whole_volume(self) -> bool:
        return bool(getattr(self.vae, "whole_volume", False))

    @torch.no_grad()
    def encode(self, volume: torch.Tensor, modality: str, available: torch.Tensor | None = None) -> torch.Tensor:
        """(C, z, y, x) normalised volume -> (L, z/f, y/f, x/f) scaled latent (posterior mode), tiled.

        ``available``: (C,) flags of the MR sequences present (None: all). Axes are first edge-padded to multiples
        of f (:func:`~wldm_auto.models.tiling.pad_to_multiple`), so the last latent voxel holds no air.
        """
        volume = pad_to_multiple(volume, self.factor)
        if self.whole_volume:
            z = self.vae.encode(volume[None].to(self.device), modality, available).mode()[0]
        else:
            tile, overlap, batch_size = self.first_stage_layout(volume.shape[-3:])

            def encode(batch: torch.Tensor) -> torch.Tensor:
                with network_autocast(self.device, self.autocast):
                    return self.vae.encode(batch, modality, available).mode().float()

            z = sliding_window(volume, tile, encode, overlap=overlap, batch_size=batch_size,
                               scale=1.0 / self.factor, pad_value=-1.0, device=self.device, align=self.factor,
                               share=self.share)
        if modality == "ct":
            z = z - self._shift(z)
        return z * self.latent_scale

    def _shift(self, z: torch.Tensor) -> torch.Tensor | float:
        """The CT latents' shift shaped to broadcast over ``z`` (L, d, h, w), or 0."""
        if not self.latent_shift:
            return 0.0
        return torch.as_tensor(list(self.latent_shift), dtype=z.dtype, device=z.device).view(-1, 1, 1, 1)

    def encode_mr(self, mr: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
        """(C, z, y, x) normalised MR -> scaled latent; ``available``: (C,) flags of the sequences present."""
        return self.encode(mr, "mr", available)

    def reconstruct_ct(self, ct: torch.Tensor) -> torch.Tensor:
        """(1, z, y, x) normalised CT -> (z, y, x) through the first stage (encode, decode): its ceiling."""
        return self.decode_ct(self.encode(ct, "ct").to(self.device), ct.shape[-3:]).to(ct.device)

    @torch.no_grad()
    def decode_ct(self, z: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """(L, d, h, w) scaled CT latent -> (z, y, x) normalised CT cropped to ``shape``, tiled."""
        z = z / self.latent_scale
        z = z + self._shift(z)
        if self.whole_volume:
            ct = self.vae.decode(z[None].to(self.device), "ct")[0]
            return ct[0, : shape[0], : shape[1], : shape[2]]
        image_tile, overlap, batch_size = self.first_stage_layout([n * self.factor for n in z.shape[-3:]])
        tile = [min(max(1, t // self.factor), n) for t, n in zip(image_tile, z.shape[-3:])]

        def decode(batch: torch.Tensor) -> torch.Tensor:
            with network_autocast(self.device, self.autocast):
                return self.vae.decode(batch, "ct").float()

        ct = sliding_window(z, tile, decode, overlap=overlap, batch_size=batch_size,
                            scale=self.factor, pad_value=0.0, device=self.device, share=self.share)
        return ct[0, : shape[0], : shape[1], : shape[2]]

    @torch.no_grad()
    def sample(self, mr: torch.Tensor, steps: int, eta: float = 0.0, num_samples: int = 1,
               generator: torch.Generator | None = None, progress: bool = False,
               available: torch.Tensor | None = None) -> torch.Tensor:
        """(C, z, y, x) normalised MR -> (num_samples, z, y, x) normalised CT samples.

        ``available``: (C,) flags of the MR sequences present (missing ones must be zeros in ``mr``).
        """
        with phase(self.phases, "encode"):
            cond = self.encode_mr(mr, available).to(self.device)[None]
        latent = self.sample_latents(cond, steps, eta, num_samples, generator, progress)
        with phase(self.phases, "decode"):
            return torch.stack([self.decode_ct(z.to(mr.device), mr.shape[-3:]) for z in latent])

    @torch.no_grad()
    def mean_estimate(self, mr: torch.Tensor, generator: torch.Generator | None = None,
                      available: torch.Tensor | None = None) -> torch.Tensor | None:
        """(z, y, x) posterior-mean sCT, or None when the plan's sct is the mean of the samples.

        One DDIM step from pure noise: with the x0 target the denoiser's clean estimate at t = T, its
        estimate of the mean CT given the MR (the noise carries almost nothing at t = T)."""
        if self.sct_estimate != "posterior_mean":
            return None
        return self.sample(mr, 1, 0.0, 1, generator, available=available)[0]

    @torch.no_grad()
    def sample_latents(self, cond: torch.Tensor, steps: int, eta: float = 0.0, num_samples: int = 1,
                       generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """(1, Cc, d, h, w) condition -> (num_samples, L, d, h, w) scaled latents, DDIM over the whole latent."""
        sampler = DDIMSampler(self.schedule, steps, eta)

        def model_fn(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            if self.autocast is None:
                return self.unet(x, t, c)
            with network_autocast(self.device, self.autocast):
                return self.unet(x, t, c).float()

        tile = self.latent_tile(cond.shape[-3:])
        with phase(self.phases, "sample"):
            return sample_whole_latent(
                model_fn, cond, int(getattr(self.unet, "latent_channels", cond.shape[1])), sampler,
                tile, overlap=self.latent_overlap, batch_size=self.latent_batch(tile), generator=generator,
                num_samples=num_samples, progress=progress, divisor=self._unet_divisor, share=self.share,
                margin=self.latent_margin or None,
            )
