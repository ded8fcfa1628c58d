"""Overlapping tiles over a volume, blended with Gaussian weights in float32.

Used wherever a network sees less than a whole volume (VAE validation,
encoding and decoding at inference, latent noise prediction). Tiles are
placed so that the first and last touch the volume's borders and the step
between tiles is at most ``tile * (1 - overlap)``; outputs are accumulated
with a separable Gaussian weight (peak at the tile centre, floored per axis,
flat along axes holding a single tile) in float32 and normalised by the
summed weight, so there are no seams and no drift.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np
import torch


def tile_starts(size: int, tile: int, overlap: float, align: int = 1) -> list[int]:
    """Start indices of tiles of length ``tile`` covering ``size`` (one tile if it fits).

    With ``align`` > 1 every start is a multiple of ``align`` (``size`` and
    ``tile`` must then be multiples too), so an encoder that downsamples by
    ``align`` maps tile starts to whole latent voxels.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if tile >= size:
        return [0]
    step = max(1, int(tile * (1.0 - overlap)))
    count = math.ceil((size - tile) / step) + 1
    if count == 1:
        return [0]
    spacing = (size - tile) / (count - 1)
    return sorted({int(round(i * spacing / align)) * align for i in range(count)})


def gaussian_weight(tile: Sequence[int], sigma_scale: float = 0.125, floor: float = 1e-3) -> torch.Tensor:
    """Separable Gaussian importance map of shape ``tile`` (max 1, min ``floor``)."""
    axes = []
    for n in tile:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2.0
        sigma = max(n * sigma_scale, 1e-3)
        axes.append(torch.exp(-0.5 * (x / sigma) ** 2))
    weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weight = weight / weight.max()
    return weight.clamp_min(floor)


def separable_weight(tile: Sequence[int], blended: Sequence[bool]) -> torch.Tensor:
    """Product of 1-D Gaussian weights (each floored), flat along axes with a single tile position.

    The floor is applied per axis, not to the 3-D product: where tiles share
    a factor (e.g. all tiles touching a face of the volume) it cancels in
    the normalisation, so blending stays smooth up to the volume's faces.
    With one tile in every axis the weight is exactly 1 everywhere.
    """
    weight = torch.ones(tuple(int(t) for t in tile), dtype=torch.float32)
    for axis, (n, blend) in enumerate(zip(tile, blended)):
        if blend:
            shape = [1, 1, 1]
            shape[axis] = int(n)
            weight = weight * gaussian_weight(shape)
    return weight


def tiles(shape: Sequence[int], tile: Sequence[int], overlap: float, align: int = 1) -> list[tuple[slice, slice, slice]]:
    """Slices (z, y, x) of every tile covering ``shape``."""
    starts = [tile_starts(s, min(t, s), overlap, align) for s, t in zip(shape, tile)]
    return [tuple(slice(o, o + min(t, s)) for o, t, s in zip(origin, tile, shape))
            for origin in itertools.product(*starts)]


def pad_to(volume: torch.Tensor, shape: Sequence[int], value: float) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the last three axes of ``volume`` at their far ends up to at least ``shape``; returns (padded, crop back)."""
    spatial = volume.shape[-3:]
    extra = [max(0, int(target) - int(n)) for n, target in zip(spatial, shape)]
    if any(extra):
        flat = [p for e in reversed(extra) for p in (0, e)]
        volume = torch.nn.functional.pad(volume, flat, value=value)
    return volume, tuple(slice(0, int(n)) for n in spatial)


@torch.no_grad()
def sliding_window(
    volume: torch.Tensor,
    tile: Sequence[int],
    fn: Callable[[torch.Tensor], torch.Tensor],
    overlap: float = 0.5,
    batch_size: int = 1,
    out_channels: int | None = None,
    scale: int | float = 1,
    pad_value: float = -1.0,
    device: torch.device | str | None = None,
    align: int = 1,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of ``volume`` (C, z, y, x) and blend the outputs.

    ``fn`` maps a batch (N, C, *tile) to (N, C_out, *(tile * scale)): ``scale``
    is 1 for image-to-image, 1/f for an encoder, f for a decoder. Volumes
    smaller than the tile are padded with ``pad_value`` and cropped back;
    ``align`` keeps tile starts on multiples of a downsampling factor (the
    volume is then padded up to a multiple of it too).
    Tiles run on ``device`` (default: the volume's); accumulation stays on
    the volume's device in float32. Returns (C_out, *(shape * scale)).
    """
    tile = [int(t) for t in tile]
    target = [max(t, int(math.ceil(n / align)) * align) for t, n in zip(tile, volume.shape[-3:])]
    padded, crop = pad_to(volume, target, pad_value)
    shape = padded.shape[-3:]
    slices = tiles(shape, tile, overlap, align)
    out_shape = [int(round(s * scale)) for s in shape]
    out_tile = [int(round(t * scale)) for t in tile]
    blended = [len({s[a].start for s in slices}) > 1 for a in range(3)]
    weight = separable_weight(out_tile, blended).to(volume.device)
    accumulator = None
    norm = torch.zeros(out_shape, dtype=torch.float32, device=volume.device)
    run_device = device or volume.device
    for first in range(0, len(slices), batch_size):
        chunk = slices[first:first + batch_size]
        batch = torch.stack([padded[(slice(None), *s)] for s in chunk]).to(run_device)
        result = fn(batch).float().to(volume.device)
        if accumulator is None:
            channels = out_channels or result.shape[1]
            accumulator = torch.zeros((channels, *out_shape), dtype=torch.float32, device=volume.device)
        for s, out in zip(chunk, result):
            target = tuple(slice(int(round(a.start * scale)), int(round(a.start * scale)) + t) for a, t in zip(s, out_tile))
            accumulator[(slice(None), *target)] += out * weight
            norm[target] += weight
    blended = accumulator / norm
    out_crop = tuple(slice(int(round(c.start * scale)), int(math.ceil(c.stop * scale - 1e-9))) for c in crop)
    return blended[(slice(None), *out_crop)]


def fit_tile(shape: Sequence[int], tile: Sequence[int], divisor: int) -> list[int]:
    """``tile`` shrunk to the volume where the volume is smaller, rounded up to ``divisor``."""
    return [int(min(t, int(np.ceil(s / divisor)) * divisor)) for s, t in zip(shape, tile)]
