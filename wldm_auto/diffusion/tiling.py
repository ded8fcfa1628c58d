"""Overlapping tiles over a volume and their Gaussian blending weights (float32), pure tensor geometry.

Tiles are placed so that the first and last touch the volume's borders and
the step between tiles is at most ``tile * (1 - overlap)``; outputs are
blended with a separable Gaussian weight (peak at the tile centre, floored
per axis, flat along axes holding a single tile) and normalised by the summed
weight, so there are no seams and no drift. The tiled denoiser
(``diffusion/tiled.py``) and the models' sliding window
(``models/tiling.py``) both place their tiles with these.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

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


def tiles(shape: Sequence[int], tile: Sequence[int], overlap: float | Sequence[float],
          align: int = 1) -> list[tuple[slice, slice, slice]]:
    """Slices (z, y, x) of every tile covering ``shape``; ``overlap``: one fraction or one per axis."""
    overlaps = [float(overlap)] * 3 if isinstance(overlap, (int, float)) else [float(o) for o in overlap]
    starts = [tile_starts(s, min(t, s), o, align) for s, t, o in zip(shape, tile, overlaps)]
    return [tuple(slice(o, o + min(t, s)) for o, t, s in zip(origin, tile, shape))
            for origin in itertools.product(*starts)]


def fit_tile(shape: Sequence[int], tile: Sequence[int], divisor: int) -> list[int]:
    """``tile`` shrunk to the volume where the volume is smaller, rounded up to ``divisor``."""
    return [int(min(t, int(np.ceil(s / divisor)) * divisor)) for s, t in zip(shape, tile)]


def balanced_tiles(shape: Sequence[int], max_tile: Sequence[int], margin: int,
                   divisor: int = 1) -> tuple[list[int], list[float]]:
    """The fewest tiles of at most ``max_tile`` that cover ``shape`` with neighbours overlapping by at
    least ``margin`` voxels, made as small as that allows: (tile, per-axis overlap for :func:`tiles`).

    A fixed fraction of a large tile overlaps far more than a network's receptive field needs (half of a
    256-voxel tile: 128 voxels), and a fixed tile leaves the last one mostly hanging over the previous;
    here a 450-voxel axis with tiles of at most 256 and a 64-voxel margin gets 3 tiles of 196 (588 voxels
    computed) instead of 3 tiles of 256 at overlap 0.5 (768). Tiles stay multiples of ``divisor``.
    """
    tile_out, overlaps = [], []
    for size, cap in zip(shape, max_tile):
        size, cap = int(size), max(int(divisor), int(cap) // divisor * divisor)
        if size <= cap:
            tile_out.append(int(math.ceil(size / divisor)) * divisor)
            overlaps.append(0.0)
            continue
        margin_here = min(int(margin), cap // 2)
        count = int(math.ceil((size - margin_here) / (cap - margin_here)))
        tile = min(cap, int(math.ceil((size + (count - 1) * margin_here) / count / divisor)) * divisor)
        tile_out.append(tile)
        # tile_starts puts tiles step = tile * (1 - overlap) apart at most: overlap = margin / tile keeps >= margin
        overlaps.append(min(0.99, margin_here / tile))
    return tile_out, overlaps
