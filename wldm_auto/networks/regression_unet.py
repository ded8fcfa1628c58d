"""The regression baseline: a plain 3D U-Net from normalised MR to normalised CT.

No latent space, no noise: one deterministic forward per tile
(``models/regression.py`` runs it over whole volumes). This is the fast mode
and the nnU-Net-style comparison for the diffusion model.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from wldm_auto.networks.blocks import num_groups
from wldm_auto.networks.channels import network_channels, with_flags


def _norm(channels: int, group_width: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels, group_width), channels)


class ResBlock(nn.Module):
    """GN-SiLU-conv3, GN-SiLU-conv3, plus a (1x1x1 if the width changes) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, group_width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(in_ch, group_width), nn.SiLU(), nn.Conv3d(in_ch, out_ch, 3, padding=1),
            _norm(out_ch, group_width), nn.SiLU(), nn.Conv3d(out_ch, out_ch, 3, padding=1),
        )
        self.shortcut: nn.Module = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class RegressionUNet(nn.Module):
    """3D U-Net: (B, in_channels, D, H, W) normalised MR -> (B, 1, D, H, W) normalised CT.

    Widths C_0..C_{L-1} = ``channels``:

    * stem: 3x3x3 conv in_channels (plus availability flags when there are
      several MR sequences, see ``networks/channels.py``) -> C_0;
    * encoder level i: ``blocks_per_level`` :class:`ResBlock`; its output is the
      skip E_i; levels i < L-1 end with a stride-2 3x3x3 conv to C_{i+1};
      the last encoder level is the bottleneck;
    * decoder level i < L-1 (coarse to fine): nearest x2 upsampling + 3x3x3 conv
      C_{i+1} -> C_i, ``cat([up, E_i])`` -> ResBlock(2C_i -> C_i) and
      ``blocks_per_level - 1`` more;
    * head: GN-SiLU-1x1x1 conv to one channel (linear output; callers clamp to [-1, 1]);
    * with ``error_head``, a second head (GN-SiLU-3x3x3 conv-SiLU-1x1x1 conv) on the same last
      features, DETACHED, predicts log b, the log of the Laplace scale of the voxel's error (b is its
      expected absolute error in normalised units); it sees the features but cannot change them, so
      the sCT head trains exactly as without it.

    GroupNorm uses ``group_width`` channels per group (:func:`num_groups`).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], blocks_per_level: int = 2,
                 group_width: int = 8, error_head: bool = False) -> None:
        super().__init__()
        channels = list(channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be non-empty positive widths, got {channels}")
        if in_channels < 1 or blocks_per_level < 1:
            raise ValueError(f"in_channels ({in_channels}) and blocks_per_level ({blocks_per_level}) must be >= 1")
        self.in_channels, self.channels, self.levels = in_channels, channels, len(channels)
        gw, n = group_width, blocks_per_level

        def blocks(first_in: int, ch: int) -> nn.Sequential:
            return nn.Sequential(*(ResBlock(first_in if j == 0 else ch, ch, gw) for j in range(n)))

        self.stem = nn.Conv3d(network_channels(in_channels), channels[0], 3, padding=1)
        self.encoder = nn.ModuleList(blocks(ch, ch) for ch in channels)
        self.downs = nn.ModuleList(
            nn.Conv3d(channels[i], channels[i + 1], 3, stride=2, padding=1) for i in range(self.levels - 1))
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                          nn.Conv3d(channels[i + 1], channels[i], 3, padding=1))
            for i in range(self.levels - 1))
        self.decoder = nn.ModuleList(blocks(2 * channels[i], channels[i]) for i in range(self.levels - 1))
        self.head = nn.Sequential(_norm(channels[0], gw), nn.SiLU(), nn.Conv3d(channels[0], 1, 1))
        self.error_head: nn.Module | None = None
        if error_head:  # built last: the other layers' initial weights do not depend on it
            self.error_head = nn.Sequential(_norm(channels[0], gw), nn.SiLU(),
                                            nn.Conv3d(channels[0], channels[0], 3, padding=1), nn.SiLU(),
                                            nn.Conv3d(channels[0], 1, 1))

    @property
    def required_divisor(self) -> int:
        """Every spatial size must be a multiple of this (2 ** (levels - 1))."""
        return 2 ** (self.levels - 1)

    def forward(self, x: torch.Tensor, available: torch.Tensor | None = None,
                with_error: bool = False) -> torch.Tensor:
        """(B, C, D, H, W) MR (``available``: (B, C) or (C,) flags of missing sequences) -> (B, 1, D, H, W);
        ``with_error`` (needs ``error_head``): (B, 2, D, H, W), the sCT and its error's log Laplace scale."""
        if with_error and self.error_head is None:
            raise ValueError("with_error needs a U-Net built with error_head=True (plan: regression.error_head)")
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"input must be (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        f = self.required_divisor
        if any(s % f for s in x.shape[2:]):
            raise ValueError(f"spatial shape {tuple(x.shape[2:])} is not divisible by {f} "
                             f"(the U-Net has {self.levels - 1} stride-2 downsamplings)")
        h = self.stem(with_flags(x, available))
        skips: list[torch.Tensor] = []
        for i, level in enumerate(self.encoder):
            h = level(h)
            if i < self.levels - 1:
                skips.append(h)
                h = self.downs[i](h)
        for i in range(self.levels - 2, -1, -1):
            h = self.decoder[i](torch.cat([self.ups[i](h), skips[i]], dim=1))
        if with_error:
            return torch.cat([self.head(h), self.error_head(h.detach())], dim=1)
        return self.head(h)
