"""3D PatchGAN discriminator for the VAE's adversarial loss."""
from __future__ import annotations

import math

import torch
from torch import nn


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class PatchDiscriminator3D(nn.Module):
    """Patch discriminator: ``layers`` stride-2 4x4x4 convs, then two stride-1 3x3x3 convs.

    Widths double per strided layer (``channels``, 2x, 4x, capped at 8x);
    GroupNorm (no BatchNorm: batches are tiny) and LeakyReLU(0.2) after every
    conv but the first and last. Output: a (B, 1, D/2^layers, H/2^layers,
    W/2^layers) map of logits (stride-1 layers keep the size), so inputs need
    spatial sizes >= 2^layers. ``spectral_norm`` wraps every conv.
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, layers: int = 3, spectral_norm: bool = False) -> None:
        super().__init__()
        if layers < 1 or channels < 1:
            raise ValueError(f"layers ({layers}) and channels ({channels}) must be >= 1")
        wrap = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        self.downsampling = 2**layers
        mods: list[nn.Module] = [wrap(nn.Conv3d(in_channels, channels, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers):
            nxt = channels * min(2**i, 8)
            mods += [wrap(nn.Conv3d(width, nxt, 4, stride=2, padding=1)), _gn(nxt), nn.LeakyReLU(0.2)]
            width = nxt
        nxt = channels * min(2**layers, 8)
        mods += [wrap(nn.Conv3d(width, nxt, 3, padding=1)), _gn(nxt), nn.LeakyReLU(0.2)]
        mods.append(wrap(nn.Conv3d(nxt, 1, 3, padding=1)))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s < self.downsampling for s in x.shape[2:]):
            raise ValueError(f"discriminator input {tuple(x.shape)} needs spatial sizes >= {self.downsampling}")
        return self.net(x)
