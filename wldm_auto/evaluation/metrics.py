"""Synthetic-CT metrics as the SynthRAD challenges report them (pure numpy/scipy/skimage).

Every function takes the reference ``ct``, the synthetic ``sct`` (same shape,
HU) and a ``mask`` of the voxels to score (any array, > 0 is inside). An empty
mask gives NaN. The SSIM family works on images clipped to [-1024, 3000] HU,
set to -1024 outside the mask and shifted by +1024 (so non-negative), with
data range 4024 and a 7-voxel uniform window. Large volumes are processed in
axial slabs (with a halo of the window radius, so the result is exact) to
bound memory.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage, stats
from skimage.metrics import structural_similarity

from wldm_auto.evaluation import uncertainty
from wldm_auto.io import metrics as shared
from wldm_auto.io.body_mask import ct_body_mask
from wldm_auto.io.hu import BODY_THRESHOLD_HU, BONE_THRESHOLD_HU, SYNTHRAD_RANGE_HU
from wldm_auto.io.metrics import inside as _mask

log = logging.getLogger(__name__)

HU_RANGE = SYNTHRAD_RANGE_HU
DATA_RANGE = HU_RANGE[1] - HU_RANGE[0]  # 4024
SSIM_WINDOW = 7
K1, K2 = 0.01, 0.03  # SSIM stabilising constants (as skimage)
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
BONE_HU = BONE_THRESHOLD_HU
BODY_HU = BODY_THRESHOLD_HU
SLAB = 64  # axial slices per slab in the SSIM computations

DEFINITIONS = {
    "mae": "mean |sCT - CT| in HU inside the mask (no clipping)",
    "psnr": "10 log10(4024^2 / MSE), both images clipped to [-1024, 3000] HU, MSE inside the mask (dB)",
    "ssim": "SynthRAD2023: clip to [-1024, 3000], outside mask -1024, +1024; skimage 3D SSIM (7-voxel uniform "
            "window, data range 4024, sample covariance); mean of the SSIM map inside the mask",
    "ms_ssim": "SynthRAD2025-style masked MS-SSIM: same preprocessing; 5 scales (2x average pooling, mask pooled "
               "> 0.5), weights 0.0448/0.2856/0.3001/0.2363/0.1333; contrast-structure at scales 1..M-1, "
               "SSIM (luminance x cs) at scale M, each averaged inside the mask and clipped at 0; fewer scales "
               "(weights renormalised) when the volume or mask is too small for a 7-voxel window",
    "ncc": "Pearson correlation of CT and sCT inside the mask",
    "dice_bone": "Dice of CT > 250 HU and sCT > 250 HU inside the mask (1.0 when both are empty)",
    "spearman_error_std": "Spearman rank correlation of |sCT - CT| and the std map inside the mask",
    **uncertainty.DEFINITIONS,
}


def mae(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute error (HU): mean over mask voxels of |sct - ct|; no clipping."""
    return shared.mae(ct, sct, mask)


def psnr(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB) = 10 log10(4024^2 / MSE); both clipped to [-1024, 3000], MSE over the mask; inf if equal."""
    return shared.psnr(ct, sct, mask, HU_RANGE)


def ncc(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """Normalised cross-correlation: Pearson r = sum(da * db) / sqrt(sum(da^2) sum(db^2)) over the mask.

    ``da``, ``db`` are the deviations from the in-mask means; NaN if either image is constant there.
    """
    m = _mask(mask, ct, sct)
    a = ct[m].astype(np.float64)
    b = sct[m].astype(np.float64)
    a -= a.mean() if a.size else 0.0
    b -= b.mean() if b.size else 0.0
    denominator = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / denominator) if denominator > 0 else float("nan")


def bone_dice(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, threshold: float = BONE_HU) -> float:
    """Dice 2|A & B| / (|A| + |B|) of A = ct > 250 HU and B = sct > 250 HU inside the mask; 1.0 if both empty."""
    m = _mask(mask, ct, sct)
    a = (ct > threshold) & m
    b = (sct > threshold) & m
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else float(2.0 * np.count_nonzero(a & b) / total)


def bone_voxels(ct: np.ndarray, mask: np.ndarray | None = None, threshold: float = BONE_HU) -> tuple[int, int]:
    """(voxels of ``ct`` above ``threshold`` inside ``mask``, voxels inside ``mask``); without a mask, the body is
    ct > -500 HU (padding below it is left out). Counts, so that several cases pool into one share."""
    ct = np.asarray(ct)
    inside = ct > BODY_HU if mask is None else np.asarray(mask) > 0
    return int(np.count_nonzero((ct > threshold) & inside)), int(np.count_nonzero(inside))


def spearman_uncertainty(ct: np.ndarray, sct: np.ndarray, std: np.ndarray, mask: np.ndarray) -> float:
    """Spearman rank correlation of |sct - ct| and ``std`` over the mask (scipy.stats.spearmanr).

    NaN when fewer than two voxels or either quantity is constant (no ranking).
    """
    m = _mask(mask, ct, sct, std)
    error = np.abs(sct[m].astype(np.float64) - ct[m])
    spread = std[m].astype(np.float64)
    if error.size < 2 or np.ptp(error) == 0 or np.ptp(spread) == 0:
        return float("nan")
    return float(stats.spearmanr(error, spread).statistic)


def default_body_mask(ct: np.ndarray, threshold: float = BODY_HU) -> np.ndarray:
    """Body of a CT: ct > -500 HU, largest connected component (faces), holes filled in 3D then per axial slice."""
    return ct_body_mask(ct, threshold)


def ssim_inputs(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The SSIM preprocessing: clip to [-1024, 3000], -1024 outside the mask, shift by +1024."""
    m = _mask(mask, ct, sct)
    dtype = np.result_type(ct.dtype, sct.dtype, np.float32)
    out = []
    for image in (ct, sct):
        x = np.clip(image.astype(dtype), *HU_RANGE)
        x[~m] = HU_RANGE[0]
        out.append(x - HU_RANGE[0])
    return out[0], out[1]


def _slabs(n: int, slab: int, minimum: int) -> list[tuple[int, int]]:
    """Axial ranges of ``slab`` slices covering ``n``; a last range shorter than ``minimum`` joins the previous."""
    bounds = [(start, min(n, start + slab)) for start in range(0, n, slab)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < minimum:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


def _masked_means(maps: Callable[[np.ndarray, np.ndarray], Sequence[np.ndarray]], x: np.ndarray, y: np.ndarray,
                  mask: np.ndarray, slab: int = SLAB, window: int = SSIM_WINDOW) -> list[float]:
    """Mean inside ``mask`` of each map ``maps(x, y)`` returns, computed slab by slab along axis 0.

    Each slab is extended by the window radius on both sides (clipped at the
    volume's ends), so a local filter of that window gives the whole-volume values.
    """
    halo = window // 2
    sums: list[float] | None = None
    count = 0
    for z0, z1 in _slabs(x.shape[0], max(slab, window), window):
        inside = mask[z0:z1]
        if not inside.any():
            continue
        a0, a1 = max(0, z0 - halo), min(x.shape[0], z1 + halo)
        values = [float(np.sum(m[z0 - a0: z1 - a0][inside], dtype=np.float64)) for m in maps(x[a0:a1], y[a0:a1])]
        sums = values if sums is None else [s + v for s, v in zip(sums, values)]
        count += int(inside.sum())
    if sums is None:
        raise ValueError("empty mask")
    return [s / count for s in sums]


def _check_window(shape: tuple[int, ...], window: int) -> None:
    if min(shape) < window:
        raise ValueError(f"volume of shape {shape} is smaller than the {window}-voxel SSIM window")


def ssim_synthrad(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, slab: int = SLAB) -> float:
    """SSIM as SynthRAD2023 evaluates it: mean of skimage's 3D SSIM map inside the mask.

    Both images: clip to [-1024, 3000], -1024 outside the mask, +1024; then
    ``structural_similarity(ct, sct, win_size=7, data_range=4024, full=True,
    channel_axis=None, gaussian_weights=False)`` (float64) and the mean of the
    full SSIM map over the mask voxels.
    """
    m = _mask(mask, ct, sct)
    _check_window(ct.shape, SSIM_WINDOW)
    if not m.any():
        return float("nan")
    x, y = ssim_inputs(ct, sct, m)

    def ssim_map(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray]:
        _, full = structural_similarity(a.astype(np.float64), b.astype(np.float64), win_size=SSIM_WINDOW,
                                        data_range=DATA_RANGE, full=True, channel_axis=None, gaussian_weights=False)
        return (full,)

    return _masked_means(ssim_map, x, y, m, slab)[0]


def ssim_terms(x: np.ndarray, y: np.ndarray, data_range: float = DATA_RANGE,
               window: int = SSIM_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """Luminance map l = (2 ux uy + C1) / (ux^2 + uy^2 + C1) and contrast-structure map
    cs = (2 sxy + C2) / (sx^2 + sy^2 + C2), with uniform-window means and sample (co)variances
    (skimage's conventions: C1 = (0.01 R)^2, C2 = (0.03 R)^2, reflect at the borders); l * cs is skimage's map.
    """
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    points = window ** x.ndim
    norm = points / (points - 1)

    def mean(a: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(a, size=window)

    ux, uy = mean(x), mean(y)
    vx = norm * (mean(x * x) - ux * ux)
    vy = norm * (mean(y * y) - uy * uy)
    vxy = norm * (mean(x * y) - ux * uy)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    luminance = (2 * ux * uy + c1) / (ux * ux + uy * uy + c1)
    contrast_structure = (2 * vxy + c2) / (vx + vy + c2)
    return luminance, contrast_structure


def ms_ssim_scales(shape: tuple[int, ...], window: int = SSIM_WINDOW, max_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """How many scales fit: the largest M <= 5 with min(shape) // 2^(M-1) >= window (0 if none)."""
    return max((m for m in range(1, max_scales + 1) if min(shape) // 2 ** (m - 1) >= window), default=0)


def _pool2(a: np.ndarray) -> np.ndarray:
    """2x2x2 average pooling (a trailing odd voxel is dropped)."""
    z, y, x = (n // 2 * 2 for n in a.shape)
    a = a[:z, :y, :x]
    return a.reshape(z // 2, 2, y // 2, 2, x // 2, 2).mean(axis=(1, 3, 5), dtype=np.float64).astype(a.dtype)


def ms_ssim_masked(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, scales: int | None = None,
                   slab: int = SLAB) -> float:
    """Masked multi-scale SSIM (SynthRAD2025 style) of two 3D volumes.

    MS-SSIM = prod_{j<M} cs_j^{w_j} * ssim_M^{w_M}, with weights
    (0.0448, 0.2856, 0.3001, 0.2363, 0.1333). At scale j, cs_j is the mean of
    the contrast-structure map inside the (downsampled) mask, and at the last
    scale ssim_M the mean of luminance x cs; each term is clipped at 0 before
    the power. Scales: 2x2x2 average pooling of both images, the mask pooled
    and kept where more than half of its 8 voxels are inside. Same
    preprocessing as :func:`ssim_synthrad` (clip, -1024 outside, +1024, data
    range 4024, 7-voxel uniform window). When the volume is too small for 5
    scales (smallest side // 2^(M-1) < 7), or the pooled mask empties, as many
    scales as fit are used and their weights renormalised to sum to 1.
    ``scales`` forces a number of scales (at most what fits).
    """
    m = _mask(mask, ct, sct)
    fit = ms_ssim_scales(ct.shape)
    if fit == 0:
        _check_window(ct.shape, SSIM_WINDOW)
    if scales is not None and not 1 <= scales <= fit:
        raise ValueError(f"{scales} MS-SSIM scales requested; a volume of shape {ct.shape} fits 1..{fit}")
    if not m.any():
        return float("nan")
    x, y = ssim_inputs(ct, sct, m)
    levels = [(x, y, m)]
    for _ in range(1, scales or fit):
        x, y, m = _pool2(x), _pool2(y), _pool2(m.astype(np.float32)) > 0.5
        if not m.any():
            log.debug("MS-SSIM: mask empty at scale %d, using %d scales", len(levels) + 1, len(levels))
            break
        levels.append((x, y, m))
    weights = np.asarray(MS_SSIM_WEIGHTS[: len(levels)], np.float64)
    weights /= weights.sum()
    result = 1.0
    for j, (x, y, m) in enumerate(levels):
        last = j == len(levels) - 1

        def term(a: np.ndarray, b: np.ndarray, last: bool = last) -> tuple[np.ndarray]:
            luminance, contrast_structure = ssim_terms(a, b)
            return (luminance * contrast_structure if last else contrast_structure,)

        value = _masked_means(term, x, y, m, slab)[0]
        result *= max(value, 0.0) ** weights[j]
    return float(result)
