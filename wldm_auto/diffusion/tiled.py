"""Whole-volume latent sampling with a tiled, Gaussian-blended denoiser.

At every sampling step the noise prediction for the WHOLE latent is
assembled from overlapping tiles (batched, blended with Gaussian weights
built from :func:`wldm_auto.diffusion.tiling.gaussian_weight` one axis at a
time, accumulated in float32), and
the sampler then steps the whole latent at once with one shared noise
field: no seams and no per-tile drift (DESIGN.md section 5).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wldm_auto.diffusion.ranks import RankShare, map_batches
from wldm_auto.diffusion.samplers import Sampler, sample
from wldm_auto.diffusion.tiling import balanced_tiles, fit_tile, separable_weight, tiles

log = logging.getLogger(__name__)

CondModelFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def replicate_pad(volume: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the last three axes of a 5-D ``volume`` up to ``shape`` (centred, edge values); returns (padded, crop back)."""
    pads, crop = [], []
    for n, target in zip(volume.shape[-3:], shape):
        extra = max(0, int(target) - int(n))
        before = extra // 2
        pads.append((before, extra - before))
        crop.append(slice(before, before + int(n)))
    flat = [p for pair in reversed(pads) for p in pair]
    if any(flat):
        volume = F.pad(volume, flat, mode="replicate")
    return volume, tuple(crop)


@dataclass(frozen=True)
class _Layout:
    """Tiling of one latent shape: padded shape, crop back, tile slices, weights."""

    tile: tuple[int, int, int]
    padded: tuple[int, int, int]
    crop: tuple[slice, ...]
    slices: list[tuple[slice, slice, slice]]
    weight: torch.Tensor
    norm: torch.Tensor


class TiledDenoiser:
    """``(x_t, t) -> output`` over a whole latent from ``model_fn(x_tile, t_tile, cond_tile)`` on tiles.

    ``cond`` (N or 1, C_cond, D, H, W) is cut with the same tiles as x_t.
    Axes shorter than ``tile`` are used whole, replicate-padded up to a
    multiple of ``divisor`` and cropped back. Tiles of all N samples are
    batched together, ``batch_size`` per call. When one tile covers the
    latent the output is exactly ``model_fn(x_t, t, cond)``. With ``share``
    the batches are spread over its ranks (``diffusion/ranks.py``): every
    rank gets the same output, bit for bit the one of a single process.
    """

    def __init__(
        self,
        model_fn: CondModelFn,
        cond: torch.Tensor | None,
        tile: Sequence[int],
        overlap: float = 0.5,
        batch_size: int = 4,
        divisor: int = 1,
        share: RankShare | None = None,
        margin: int | None = None,
    ) -> None:
        tile = tuple(int(t) for t in tile)
        if len(tile) != 3 or min(tile) < 1:
            raise ValueError(f"tile must be three positive sizes, got {tile}")
        if any(t % divisor for t in tile):
            raise ValueError(f"tile {tile} is not divisible by the network's divisor {divisor}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if margin is not None and margin < 0:
            raise ValueError(f"margin must be >= 0 voxels, got {margin}")
        if cond is not None and cond.dim() != 5:
            raise ValueError(f"cond must be (N, C, D, H, W), got shape {tuple(cond.shape)}")
        self.model_fn = model_fn
        self.cond = cond
        self.tile = tile
        self.overlap = float(overlap)
        self.batch_size = int(batch_size)
        self.divisor = int(divisor)
        self.share = share
        self.margin = None if margin is None else int(margin)
        self._layouts: dict[tuple, _Layout] = {}

    def layout(self, shape: Sequence[int], device: torch.device) -> _Layout:
        """Tiles and blending weights for a latent of spatial ``shape`` (cached)."""
        key = (tuple(int(s) for s in shape), str(device))
        if key not in self._layouts:
            tile = tuple(fit_tile(key[0], self.tile, self.divisor))
            overlap: float | list[float] = self.overlap
            if self.margin is not None:
                balanced, overlap = balanced_tiles(key[0], tile, self.margin, self.divisor)
                tile = tuple(balanced)
            padded = tuple(max(s, t) for s, t in zip(key[0], tile))
            crop = tuple(slice((p - s) // 2, (p - s) // 2 + s) for s, p in zip(key[0], padded))
            slices = tiles(padded, tile, overlap)
            weight = separable_weight(tile, [len({s[a].start for s in slices}) > 1 for a in range(3)]).to(device)
            norm = torch.zeros(padded, dtype=torch.float32, device=device)
            for s in slices:
                norm[s] += weight
            self._layouts[key] = _Layout(tile, padded, crop, slices, weight, norm)
            log.debug("latent %s: %d tiles of %s (padded to %s)", key[0], len(slices), tile, padded)
        return self._layouts[key]

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Blended model output (N, C_out, D, H, W) for x_t (N, C, D, H, W) at timesteps t (N,)."""
        if x_t.dim() != 5:
            raise ValueError(f"x_t must be (N, C, D, H, W), got shape {tuple(x_t.shape)}")
        n, spatial = x_t.shape[0], tuple(x_t.shape[-3:])
        cond = self.cond
        if cond is not None:
            if tuple(cond.shape[-3:]) != spatial or cond.shape[0] not in (1, n):
                raise ValueError(f"cond {tuple(cond.shape)} does not match x_t {tuple(x_t.shape)}")
            cond = cond.to(x_t.device)
        t = torch.as_tensor(t, device=x_t.device).long().reshape(-1).expand(n)
        layout = self.layout(spatial, x_t.device)
        x_pad, _ = replicate_pad(x_t, layout.padded)
        cond_pad = replicate_pad(cond, layout.padded)[0] if cond is not None else None
        items = [(i, s) for s in layout.slices for i in range(n)]
        chunks = [items[first:first + self.batch_size] for first in range(0, len(items), self.batch_size)]

        def compute(b: int) -> torch.Tensor:
            chunk = chunks[b]
            x_batch = torch.stack([x_pad[(i, slice(None), *s)] for i, s in chunk])
            c_batch = None
            if cond_pad is not None:
                c_batch = torch.stack([cond_pad[(i if cond_pad.shape[0] > 1 else 0, slice(None), *s)] for i, s in chunk])
            output = self.model_fn(x_batch, t[[i for i, _ in chunk]], c_batch)
            if tuple(output.shape[-3:]) != layout.tile or output.shape[0] != len(chunk):
                raise ValueError(f"model_fn returned {tuple(output.shape)} for tiles {tuple(x_batch.shape)}")
            return output

        accumulator = None
        for b, output in map_batches([len(c) for c in chunks], compute, self.share):
            if accumulator is None:
                dtype = torch.promote_types(output.dtype, torch.float32)
                accumulator = torch.zeros((n, output.shape[1], *layout.padded), dtype=dtype, device=x_t.device)
            for (i, s), out in zip(chunks[b], output):
                accumulator[(i, slice(None), *s)] += out.to(accumulator.dtype) * layout.weight
        blended = accumulator / layout.norm
        return blended[(slice(None), slice(None), *layout.crop)].to(x_t.dtype)


@torch.no_grad()
def sample_whole_latent(
    model_fn: CondModelFn,
    cond: torch.Tensor,
    out_channels: int,
    sampler: Sampler,
    tile: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 4,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
    progress: bool = False,
    divisor: int = 1,
    dtype: torch.dtype = torch.float32,
    share: RankShare | None = None,
    margin: int | None = None,
) -> torch.Tensor:
    """Sample (num_samples, out_channels, D, H, W) latents conditioned on ``cond`` (1 or num_samples, C, D, H, W).

    One noise field per step covers the whole latent (all samples at once,
    along the batch axis); the noise prediction at each step comes from a
    :class:`TiledDenoiser`. Equals :func:`sample` with the same generator
    when one tile covers the latent. ``share``: spread each step's tiles over
    the ranks of a process group (every rank passes the same ``cond`` and an
    identically seeded ``generator``, so all hold the same latent throughout);
    only its main rank shows progress. ``margin``: see :class:`TiledDenoiser`.
    """
    if cond.dim() != 5 or cond.shape[0] not in (1, num_samples):
        raise ValueError(f"cond must be (1 or {num_samples}, C, D, H, W), got shape {tuple(cond.shape)}")
    denoiser = TiledDenoiser(model_fn, cond, tile, overlap=overlap, batch_size=batch_size, divisor=divisor,
                             share=share, margin=margin)
    shape = (num_samples, out_channels, *cond.shape[-3:])
    layout = denoiser.layout(shape[-3:], cond.device)
    ranks = f" over {share.world_size} ranks" if share is not None and share.world_size > 1 else ""
    log.info("sampling latent %s: %d tiles of %s, %d steps%s", shape, len(layout.slices), layout.tile, len(sampler),
             ranks)
    progress = progress and (share is None or share.is_main)
    return sample(denoiser, shape, sampler, generator=generator, device=cond.device, dtype=dtype, progress=progress)
