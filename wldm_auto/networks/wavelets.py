"""One-level 3D Haar wavelet transform (orthonormal) in pure PyTorch.

Layout: ``dwt3d`` maps (B, C, D, H, W) to (B, 8, C, D/2, H/2, W/2). The band
index ``k`` carries three bits ``(bD, bH, bW)`` with ``k = 4*bD + 2*bH + bW``
and bit 1 meaning detail (high-pass) along that axis, which is the key order
of ``pywt.dwtn``: 0 'aaa', 1 'aad', 2 'ada', 3 'add', 4 'daa', 5 'dad',
6 'dda', 7 'ddd' (first letter = axis D). Per axis and per pair of samples
``(x0, x1)``: approx ``(x0 + x1)/sqrt2``, detail ``(x0 - x1)/sqrt2``, exactly
``pywt.dwtn(x, 'haar', axes=(2, 3, 4))``.

Only slicing, stacking and arithmetic are used, so the transforms are
differentiable, dtype-preserving (float32/float64/bf16) and device-agnostic.
"""
from __future__ import annotations

import math

import torch
from torch import nn

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_AXIS_NAMES = ("D", "H", "W")


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 5:
        raise ValueError(f"dwt3d expects a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
    for name, size in zip(_AXIS_NAMES, x.shape[2:]):
        if size % 2:
            raise ValueError(f"dwt3d needs even spatial sizes; axis {name} has odd size {size} (shape {tuple(x.shape)})")


def dwt3d(x: torch.Tensor) -> torch.Tensor:
    """Haar DWT of (B, C, D, H, W) -> (B, 8, C, D/2, H/2, W/2), pywt ``dwtn`` band order."""
    _check_input(x)
    bands = x.unsqueeze(1)  # (B, 1, C, D, H, W); band dim grows 1 -> 2 -> 4 -> 8
    for axis in (-3, -2, -1):
        pairs = bands.unflatten(axis, (bands.shape[axis] // 2, 2))
        even, odd = pairs.select(axis, 0), pairs.select(axis, 1)
        low, high = (even + odd) * _INV_SQRT2, (even - odd) * _INV_SQRT2
        # new bit is the least significant one: index = 2 * old + bit
        bands = torch.stack((low, high), dim=2).flatten(1, 2)
    return bands


def idwt3d(bands: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`dwt3d`: (B, 8, C, d, h, w) -> (B, C, 2d, 2h, 2w)."""
    if bands.dim() != 6 or bands.shape[1] != 8:
        raise ValueError(f"idwt3d expects (B, 8, C, d, h, w) sub-bands, got shape {tuple(bands.shape)}")
    for axis in (-1, -2, -3):  # undo W first (least significant bit), then H, then D
        pairs = bands.unflatten(1, (bands.shape[1] // 2, 2))
        low, high = pairs[:, :, 0], pairs[:, :, 1]
        even, odd = (low + high) * _INV_SQRT2, (low - high) * _INV_SQRT2
        bands = torch.stack((even, odd), dim=axis).flatten(axis - 1, axis)
    return bands.squeeze(1)


def split_low_high(bands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 8, C, ...) -> low band (B, C, ...) and details packed band-major (B, 7*C, ...).

    Channel ``(k - 1) * C + c`` of the packed details is channel ``c`` of band ``k``.
    """
    if bands.dim() < 3 or bands.shape[1] != 8:
        raise ValueError(f"expected (B, 8, C, ...) sub-bands, got shape {tuple(bands.shape)}")
    return bands[:, 0], bands[:, 1:].flatten(1, 2)


def merge_low_high(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_low_high`: (B, C, ...) and (B, 7*C, ...) -> (B, 8, C, ...)."""
    channels = low.shape[1]
    if high.shape[1] != 7 * channels or high.shape[2:] != low.shape[2:] or high.shape[0] != low.shape[0]:
        raise ValueError(f"high {tuple(high.shape)} does not match low {tuple(low.shape)} (need 7*C channels)")
    return torch.cat((low.unsqueeze(1), high.unflatten(1, (7, channels))), dim=1)


class DWT3d(nn.Module):
    """Module form of :func:`dwt3d` (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dwt3d(x)


class IDWT3d(nn.Module):
    """Module form of :func:`idwt3d` (no parameters)."""

    def forward(self, bands: torch.Tensor) -> torch.Tensor:
        return idwt3d(bands)
