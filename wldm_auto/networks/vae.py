"""Stage 1 of 3D-WLDM: one wavelet VAE shared by MR and CT."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wldm_auto.networks.blocks import WaveletBlock, norm_layer
from wldm_auto.networks.channels import network_channels, with_flags

MODALITIES = ("mr", "ct")
LOGVAR_RANGE = (-30.0, 20.0)
INITIAL_LOGVAR = -10.0


def check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be 'mr' or 'ct', got {modality!r}")
    return modality


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over latents of shape (B, C, d, h, w); logvar clamped to [-30, 20]."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(*LOGVAR_RANGE)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw ``mean + std * eps`` (differentiable in mean and logvar)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl_per_sample(self) -> torch.Tensor:
        """KL(q || N(0, I)) of each sample, summed over all latent channels and voxels: shape (B,)."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return kl.flatten(1).sum(dim=1)

    def kl(self) -> torch.Tensor:
        """Scalar KL: summed over latent dimensions, averaged over the batch."""
        return self.kl_per_sample().mean()


def space_to_channels(x: torch.Tensor, f: int) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C * f^3, D/f, H/f, W/f): each f^3 block of voxels becomes channels (C, dz, dy, dx)."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // f, f, h // f, f, w // f, f).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * f ** 3, d // f, h // f, w // f)


def channels_to_space(x: torch.Tensor, f: int) -> torch.Tensor:
    """Inverse of :func:`space_to_channels`."""
    b, n, d, h, w = x.shape
    c = n // f ** 3
    x = x.reshape(b, c, f, f, f, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, d * f, h * f, w * f)


def _groups(n: int, k: int) -> torch.Tensor:
    """(k, n) 0/1 matrix: value i of n belongs to group i * k // n (k <= n consecutive, near-equal groups)."""
    g = torch.zeros(k, n)
    g[torch.arange(n) * k // n, torch.arange(n)] = 1.0
    return g


def shortcut_maps(n: int, latent: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed linear maps (latent x n, n x latent) between ``n`` space-to-channel values and the latent channels,
    through ``width`` shared values: the n values are averaged in ``width`` groups, each group's mean copied to
    its share of the latent channels; decoding averages each share and copies it back to its group.

    With ``width`` == n == latent the shortcut is lossless (encode -> decode starts as the identity); with
    ``width`` 1 it carries the block's mean only. DC-AE's residual autoencoding (Chen et al. 2024): the networks
    learn what the shortcut misses."""
    width = max(1, min(width, n, latent))
    to_groups, to_latent = _groups(n, width), _groups(latent, width)
    down = to_latent.t() @ (to_groups / to_groups.sum(dim=1, keepdim=True))
    up = to_groups.t() @ (to_latent / to_latent.sum(dim=1, keepdim=True))
    return down, up


class WaveletVAE(nn.Module):
    """Shared MR/CT VAE built from WaveletBlocks, one width per level in ``channels``.

    Modality-specific parts: a 3x3x3 input stem per modality (MR: ``mr_channels``
    sequences, plus their availability flags when there are several (see
    ``networks/channels.py``) -> ``channels[0]``; CT: 1 -> ``channels[0]``) and a 3x3x3 output head per
    modality. Everything else (encoder, latent projection, decoder) is shared,
    as in the paper. Encoder: per level ``blocks_per_level`` WaveletBlocks (with
    WRM when ``wrm``, ``group_width`` channels per group, ``normalization``
    "voxel" or "group"), then a stride-2 3x3x3 conv to the next level's width, so
    the latent sits at 2 ** (len(channels) - 1); a 1x1x1 conv gives mean and
    logvar (``2 * latent_channels``). Decoder mirrors it with nearest-neighbour
    upsampling + 3x3x3 conv. The output is linear (no tanh): data lie in
    [-1, 1] and the L2 loss pulls it there; clip at export if needed.
    Latent channels ``[:C/2]`` are structure S, ``[C/2:]`` modality M (SMD).
    """

    def __init__(self, mr_channels: int, channels: Sequence[int], latent_channels: int, blocks_per_level: int = 1,
                 group_width: int = 8, wrm: bool = True, normalization: str = "voxel", shortcut: int = 0) -> None:
        super().__init__()
        channels = list(channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive widths, got {channels}")
        if latent_channels < 2 or latent_channels % 2:
            raise ValueError(
                f"latent_channels={latent_channels} must be even (>= 2): "
                "the first half is structure S, the second half modality M"
            )
        if mr_channels < 1:
            raise ValueError(f"mr_channels must be >= 1, got {mr_channels}")
        self.mr_channels = mr_channels
        self.latent_channels = latent_channels
        self.downsampling_factor = 2 ** (len(channels) - 1)
        gw, nb, norm = group_width, max(1, blocks_per_level), normalization
        in_channels = {"mr": mr_channels, "ct": 1}

        stem_in = {"mr": network_channels(mr_channels), "ct": 1}
        self.stems = nn.ModuleDict({m: nn.Conv3d(stem_in[m], channels[0], 3, padding=1) for m in MODALITIES})
        self.encoder = nn.ModuleList()
        for i, ch in enumerate(channels):
            level: list[nn.Module] = [WaveletBlock(ch, ch, gw, wrm, norm) for _ in range(nb)]
            if i + 1 < len(channels):
                level.append(nn.Conv3d(ch, channels[i + 1], 3, stride=2, padding=1))
            self.encoder.append(nn.Sequential(*level))
        self.to_moments = nn.Sequential(
            norm_layer(norm, channels[-1], gw), nn.SiLU(), nn.Conv3d(channels[-1], 2 * latent_channels, 1)
        )
        with torch.no_grad():  # start with a narrow posterior (std e^-5): a fresh decoder is not fed pure noise
            self.to_moments[-1].bias[latent_channels:].fill_(INITIAL_LOGVAR)

        self.from_latent = nn.Conv3d(latent_channels, channels[-1], 3, padding=1)
        self.decoder = nn.ModuleList()
        for i in range(len(channels) - 1, -1, -1):
            level = [WaveletBlock(channels[i], channels[i], gw, wrm, norm) for _ in range(nb)]
            if i > 0:
                level += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(channels[i], channels[i - 1], 3, padding=1)]
            self.decoder.append(nn.Sequential(*level))
        self.out_norm = norm_layer(norm, channels[0], gw)
        self.heads = nn.ModuleDict({m: nn.Conv3d(channels[0], in_channels[m], 3, padding=1) for m in MODALITIES})
        self.shortcut = max(0, int(shortcut))
        if self.shortcut:  # fixed (not learnt) maps between an input's f^3 sub-voxels and the latent channels
            f3 = self.downsampling_factor ** 3
            for m in MODALITIES:
                down, up = shortcut_maps(in_channels[m] * f3, latent_channels, shortcut)
                self.register_buffer(f"_down_{m}", down, persistent=False)
                self.register_buffer(f"_up_{m}", up, persistent=False)
            with torch.no_grad():  # the learnt paths start at 0: encode -> decode starts as the shortcut alone
                self.to_moments[-1].weight[:latent_channels].zero_()
                self.to_moments[-1].bias[:latent_channels].zero_()
                for head in self.heads.values():
                    head.weight.zero_()
                    head.bias.zero_()

    @property
    def local(self) -> bool:
        """True when no layer uses statistics over space (voxel normalisation): any tile size gives the same output."""
        return not any(isinstance(m, nn.GroupNorm) for m in self.modules())

    @property
    def required_divisor(self) -> int:
        """Every input spatial size must be a multiple of this (the downsampling factor)."""
        return self.downsampling_factor

    def latent_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """(latent_channels, D/f, H/f, W/f) for an input of spatial shape (D, H, W); no batch dimension."""
        f = self.downsampling_factor
        if len(spatial_shape) != 3 or any(s % f or s < 1 for s in spatial_shape):
            raise ValueError(f"spatial shape {tuple(spatial_shape)} must be 3 sizes divisible by {f}")
        return (self.latent_channels, *(s // f for s in spatial_shape))

    def _check_input(self, x: torch.Tensor, modality: str) -> None:
        expected = self.mr_channels if modality == "mr" else 1
        if x.dim() != 5 or x.shape[1] != expected:
            raise ValueError(f"{modality} input must be (B, {expected}, D, H, W), got shape {tuple(x.shape)}")
        bad = [s for s in x.shape[2:] if s % self.downsampling_factor]
        if bad:
            raise ValueError(
                f"input spatial shape {tuple(x.shape[2:])} is not divisible by the VAE "
                f"downsampling factor {self.downsampling_factor}"
            )

    def encode(self, x: torch.Tensor, modality: str, available: torch.Tensor | None = None) -> DiagonalGaussian:
        """Posterior of ``x``; for MR, ``available`` (B, C) or (C,) flags missing sequences (None: all there)."""
        check_modality(modality)
        self._check_input(x, modality)
        h = self.stems[modality](with_flags(x, available) if modality == "mr" else x)
        for level in self.encoder:
            h = level(h)
        mean, logvar = self.to_moments(h).chunk(2, dim=1)
        if self.shortcut:
            blocks = space_to_channels(x, self.downsampling_factor)
            mean = mean + torch.einsum("ln,bn...->bl...", getattr(self, f"_down_{modality}").to(x.dtype), blocks)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor, modality: str) -> torch.Tensor:
        check_modality(modality)
        if z.dim() != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latent must be (B, {self.latent_channels}, d, h, w), got shape {tuple(z.shape)}")
        h = self.from_latent(z)
        for level in self.decoder:
            h = level(h)
        out = self.heads[modality](F.silu(self.out_norm(h)))
        if self.shortcut:
            blocks = torch.einsum("nl,bl...->bn...", getattr(self, f"_up_{modality}").to(z.dtype), z)
            out = out + channels_to_space(blocks, self.downsampling_factor)
        return out

    def forward(self, x: torch.Tensor, modality: str, sample: bool = True,
                available: torch.Tensor | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Encode, draw (``sample``) or take the mean, decode with the same modality."""
        posterior = self.encode(x, modality, available)
        z = posterior.sample() if sample else posterior.mode()
        return self.decode(z, modality), posterior

    def structure(self, z: torch.Tensor) -> torch.Tensor:
        """Structure part S: the first half of latent channels."""
        return z[:, : self.latent_channels // 2]

    def modality_part(self, z: torch.Tensor) -> torch.Tensor:
        """Modality part M: the second half of latent channels."""
        return z[:, self.latent_channels // 2 :]
