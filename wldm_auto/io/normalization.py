"""Intensity normalisation to [-1, 1] and its exact inverse.

CT: the HU window [lo, hi] maps linearly onto [-1, 1] (values outside are
clipped first). MR: per channel, the robust percentiles inside the body map
onto [-1, 1]. The parameters are stored per case so export can undo them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def normalise_ct(hu: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """HU -> [-1, 1] (float32) after clipping to ``window``."""
    lo, hi = float(window[0]), float(window[1])
    clipped = np.clip(hu.astype(np.float32), lo, hi)
    return (2.0 * (clipped - lo) / (hi - lo) - 1.0).astype(np.float32)


def denormalise_ct(values: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """[-1, 1] -> HU (float32); the inverse of :func:`normalise_ct` inside the window."""
    lo, hi = float(window[0]), float(window[1])
    return ((values.astype(np.float32) + 1.0) * 0.5 * (hi - lo) + lo).astype(np.float32)


def mr_percentile_range(mr: np.ndarray, body: np.ndarray, percentiles: Sequence[float]) -> tuple[float, float]:
    """Robust (lo, hi) intensities of one MR channel inside the body (whole volume if empty)."""
    values = mr[body > 0] if body.any() else mr.ravel()
    lo, hi = (float(v) for v in np.percentile(values, [percentiles[0], percentiles[1]]))
    if hi <= lo:  # constant image: avoid dividing by zero, keep the mapping invertible
        hi = lo + 1.0
    return lo, hi


def normalise_mr(mr: np.ndarray, lo: float, hi: float, clip: bool = True) -> np.ndarray:
    """[lo, hi] -> [-1, 1] (float32), optionally clipped to [-1, 1]."""
    out = 2.0 * (mr.astype(np.float32) - lo) / (hi - lo) - 1.0
    return (np.clip(out, -1.0, 1.0) if clip else out).astype(np.float32)


def denormalise_mr(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """[-1, 1] -> MR intensities (float32)."""
    return ((values.astype(np.float32) + 1.0) * 0.5 * (hi - lo) + lo).astype(np.float32)
