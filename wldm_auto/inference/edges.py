"""The edge term of a std map: how much the sCT changes where it is steep.

An sCT is least trustworthy along its edges (bone, air, the body's outline): a structure placed a few
millimetres off, or blurred, gives the largest HU errors there, and neither a model's own error head
nor its samples' spread sees that a test case is misaligned in a way its training cases were not. This
term is the first-order HU change for a displacement of ``edge_mm``: ``edge_mm`` times the sCT's
gradient magnitude (HU/mm), smoothed by a Gaussian of :data:`SMOOTHING_MM` so that the band beside an
edge counts too. The predictor adds its square to the std map's variance (plan ``inference.edge_std_mm``).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

SMOOTHING_MM = 2.0  # Gaussian sigma of the gradient magnitude's smoothing


def edge_std(sct_hu: np.ndarray, spacing_xyz: Sequence[float], edge_mm: float) -> np.ndarray:
    """``edge_mm`` x the smoothed gradient magnitude (HU/mm) of ``sct_hu`` (z, y, x) on a grid of
    ``spacing_xyz`` (mm, ITK order): a std in HU, float32, same shape."""
    if edge_mm < 0 or not np.isfinite(edge_mm):
        raise ValueError(f"edge_mm must be a finite length >= 0, got {edge_mm}")
    spacing = [float(s) for s in reversed(spacing_xyz)]
    volume = np.asarray(sct_hu, dtype=np.float32)
    if edge_mm == 0 or min(volume.shape) < 2:
        return np.zeros(volume.shape, dtype=np.float32)
    magnitude = np.sqrt(sum(g * g for g in np.gradient(volume, *spacing)))  # float32 throughout: no copies
    smoothed = ndimage.gaussian_filter(magnitude, [SMOOTHING_MM / s for s in spacing], mode="nearest")
    smoothed *= np.float32(edge_mm)
    return smoothed
