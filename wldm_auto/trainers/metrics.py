"""Image-similarity figures used during validation (HU for CT)."""
from __future__ import annotations

import numpy as np

from wldm_auto.io.hu import SYNTHRAD_RANGE_HU

PSNR_RANGE_HU = SYNTHRAD_RANGE_HU


def mae(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute error over the voxels of ``mask``."""
    m = mask > 0
    return float(np.abs(prediction[m].astype(np.float64) - reference[m]).mean()) if m.any() else float("nan")


def psnr(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray, data_range: tuple[float, float]) -> float:
    """PSNR (dB) over ``mask`` after clipping both images to ``data_range``."""
    m = mask > 0
    if not m.any():
        return float("nan")
    lo, hi = data_range
    a = np.clip(prediction[m].astype(np.float64), lo, hi)
    b = np.clip(reference[m].astype(np.float64), lo, hi)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10((hi - lo) ** 2 / mse))
