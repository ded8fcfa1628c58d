"""Stage 2 of 3D-WLDM: the latent noise-prediction U-Net, with DSCA on its skip connections."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wldm_auto.networks.attention import DSCA
from wldm_auto.networks.blocks import num_groups


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of timesteps ``t`` (B,), integer or fractional: [cos, sin] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _norm(channels: int, group_width: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels, group_width), channels)


class TimeResBlock(nn.Module):
    """GN-SiLU-conv3, time scale-shift on the second GN, SiLU-conv3, plus a (1x1x1 if needed) shortcut.

    The time embedding gives (scale, shift) per channel: ``GN(h) * (1 + scale) + shift``.
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, group_width: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, group_width)
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * out_ch))
        self.norm2 = _norm(out_ch, group_width)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.shortcut: nn.Module = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time(temb)[:, :, None, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return h + self.shortcut(x)


class DiffusionUNet(nn.Module):
    """3D U-Net predicting the noise (or another diffusion target) from ``cat([x_t, z_mr])`` and ``t``.

    Layout, with widths C_0..C_{L-1} = ``channels``:

    * stem: 3x3x3 conv of ``latent_channels + cond_channels`` -> C_0;
    * encoder level i: ``blocks_per_level`` :class:`TimeResBlock`; its output is
      the skip E_i; levels i < L-1 end with a stride-2 3x3x3 conv to C_{i+1};
    * middle: one TimeResBlock at the coarsest level;
    * decoder level i (coarse to fine): ``cat([D_i, E_i'])`` -> TimeResBlock(2C_i -> C_i)
      and ``blocks_per_level - 1`` more; levels i > 0 end with nearest x2
      upsampling + 3x3x3 conv to C_{i-1};
    * head: GN-SiLU-3x3x3 conv to ``latent_channels``, zero-initialised so the
      untrained model predicts 0 (a common diffusion practice: the initial
      loss is E[eps^2] = 1 and early updates are not swamped by a random head).
      Consequently only the head gets gradient on the very first step.

    Skips: E_i' = DSCA(E_i, S_MR, M_MR) at the ``dsca_scales`` finest levels (all
    levels if there are fewer) when ``dsca``; S_MR = z_mr[:, :Cc/2],
    M_MR = z_mr[:, Cc/2:] with Cc = ``cond_channels`` (which must then be even),
    resized by DSCA to each scale. ``dsca=False`` (ablation) gives plain
    skips and no attention parameters.

    Time: sinusoidal embedding of width C_0 -> Linear-SiLU-Linear to ``time_dim``
    (default 4*C_0), fed to every residual block as a scale-shift.
    GroupNorm everywhere uses ``group_width`` channels per group (house style,
    :func:`num_groups`), so every width must be divisible by it (or below it).
    """

    def __init__(
        self,
        latent_channels: int,
        channels: Sequence[int],
        cond_channels: int | None = None,
        dsca: bool = True,
        blocks_per_level: int = 2,
        group_width: int = 8,
        time_dim: int | None = None,
        heads: int = 4,
        max_kv_tokens: int = 512,
        max_query_tokens: int = 32768,
        dsca_scales: int = 3,
    ) -> None:
        super().__init__()
        channels = list(channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be non-empty positive widths, got {channels}")
        cond_channels = latent_channels if cond_channels is None else cond_channels
        if latent_channels < 1 or cond_channels < 1 or blocks_per_level < 1:
            raise ValueError(
                f"latent_channels ({latent_channels}), cond_channels ({cond_channels}) and "
                f"blocks_per_level ({blocks_per_level}) must be >= 1"
            )
        if dsca and cond_channels % 2:
            raise ValueError(
                f"DSCA splits z_mr into structure/modality halves: cond_channels={cond_channels} must be even"
            )
        self.latent_channels, self.cond_channels, self.channels = latent_channels, cond_channels, channels
        self.levels = len(channels)
        time_dim = time_dim or 4 * channels[0]
        self.time_base_dim = channels[0]
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.stem = nn.Conv3d(latent_channels + cond_channels, channels[0], 3, padding=1)

        def blocks(first_in: int, ch: int) -> nn.ModuleList:
            return nn.ModuleList(
                TimeResBlock(first_in if j == 0 else ch, ch, time_dim, group_width) for j in range(blocks_per_level)
            )

        self.encoder = nn.ModuleList(blocks(ch, ch) for ch in channels)
        self.downs = nn.ModuleList(
            nn.Conv3d(channels[i], channels[i + 1], 3, stride=2, padding=1) for i in range(self.levels - 1)
        )
        self.middle = TimeResBlock(channels[-1], channels[-1], time_dim, group_width)
        self.decoder = nn.ModuleList(blocks(2 * ch, ch) for ch in channels)
        self.ups = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(channels[i + 1], channels[i], 3, padding=1)
            )
            for i in range(self.levels - 1)
        )
        half = cond_channels // 2
        dsca_levels = range(min(max(dsca_scales, 0), self.levels)) if dsca else range(0)
        self.dsca = nn.ModuleDict(
            {
                str(i): DSCA(
                    channels[i], half, cond_channels - half, heads, max_kv_tokens, max_query_tokens, group_width
                )
                for i in dsca_levels
            }
        )
        self.out_norm = _norm(channels[0], group_width)
        self.out = nn.Conv3d(channels[0], latent_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def required_divisor(self) -> int:
        """Every spatial size of x_t / z_mr must be a multiple of this (2 ** (levels - 1))."""
        return 2 ** (self.levels - 1)

    def _check_inputs(self, x_t: torch.Tensor, z_mr: torch.Tensor) -> None:
        if x_t.dim() != 5 or x_t.shape[1] != self.latent_channels:
            raise ValueError(f"x_t must be (B, {self.latent_channels}, D, H, W), got {tuple(x_t.shape)}")
        expected = (x_t.shape[0], self.cond_channels, *x_t.shape[2:])
        if tuple(z_mr.shape) != expected:
            raise ValueError(f"z_mr must have shape {expected} to match x_t, got {tuple(z_mr.shape)}")
        f = self.required_divisor
        if any(s % f for s in x_t.shape[2:]):
            raise ValueError(
                f"latent spatial shape {tuple(x_t.shape[2:])} is not divisible by {f} "
                f"(the U-Net has {self.levels} levels: {self.levels - 1} stride-2 downsamplings)"
            )

    @staticmethod
    def _timesteps(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        return t.float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, z_mr: torch.Tensor) -> torch.Tensor:
        """Prediction (B, latent_channels, D, H, W) for noisy latents ``x_t``, timesteps ``t``, MR latent ``z_mr``."""
        self._check_inputs(x_t, z_mr)
        temb = self.time_mlp(timestep_embedding(self._timesteps(t, x_t.shape[0], x_t.device), self.time_base_dim))
        half = self.cond_channels // 2
        structure, modality = z_mr[:, :half], z_mr[:, half:]

        h = self.stem(torch.cat([x_t, z_mr], dim=1))
        skips: list[torch.Tensor] = []
        for i, level in enumerate(self.encoder):
            for block in level:
                h = block(h, temb)
            skips.append(h)
            if i < self.levels - 1:
                h = self.downs[i](h)
        h = self.middle(h, temb)
        for i in range(self.levels - 1, -1, -1):
            e = skips[i]
            if str(i) in self.dsca:
                e = self.dsca[str(i)](e, structure, modality)
            h = torch.cat([h, e], dim=1)
            for block in self.decoder[i]:
                h = block(h, temb)
            if i > 0:
                h = self.ups[i - 1](h)
        return self.out(F.silu(self.out_norm(h)))
