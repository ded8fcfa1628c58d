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


def tiles(shape: Sequence[int], tile: Sequence[int], overlap: float, align: int = 1) -> list[tuple[slice, slice, slice]]:
    """Slices (z, y, x) of every tile covering ``shape``."""
    starts = [tile_starts(s, min(t, s), overlap, align) for s, t in zip(shape, tile)]
    return [tuple(slice(o, o + min(t, s)) for o, t, s in zip(origin, tile, shape))
            for origin in itertools.product(*starts)]


def fit_tile(shape: Sequence[int], tile: Sequence[int], divisor: int) -> list[int]:
    """``tile`` shrunk to the volume where the volume is smaller, rounded up to ``divisor``."""
    return [int(min(t, int(np.ceil(s / divisor)) * divisor)) for s, t in zip(shape, tile)]
