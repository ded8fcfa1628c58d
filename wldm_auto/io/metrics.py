"""Image-similarity figures shared by training (validation) and evaluation: pure numpy, no stage.

One argument order everywhere: ``(reference, prediction, mask)``, as scikit-image's
``(image_true, image_test)``; the reference is the real CT, the prediction the synthetic
one. A mask is any array of the images' shape (> 0 is inside); an empty mask gives NaN.
Both figures are symmetric in the two images, so a caller that swaps them gets the same
number. This is ground floor (beside ``io.hu``) so that training and evaluation, which
may not import each other, share one definition.
"""
from __future__ import annotations

import numpy as np

from wldm_auto.io.hu import SYNTHRAD_RANGE_HU


def inside(mask: np.ndarray, *arrays: np.ndarray) -> np.ndarray:
    """``mask`` as bool (> 0) after checking that every array has its shape (one-line ValueError)."""
    for array in arrays:
        if array.shape != mask.shape:
            raise ValueError(f"shape mismatch: image {array.shape} vs mask {mask.shape}")
    return np.asarray(mask) > 0


def mae(reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute error: mean over mask voxels of |prediction - reference| (float64, no clipping)."""
    m = inside(mask, reference, prediction)
    if not m.any():
        return float("nan")
    return float(np.abs(prediction[m].astype(np.float64) - reference[m]).mean())


def psnr(reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray,
         data_range: tuple[float, float] = SYNTHRAD_RANGE_HU) -> float:
    """PSNR (dB) = 10 log10((high - low)^2 / MSE), both images clipped to ``data_range`` = (low, high)
    (default SynthRAD's [-1024, 3000] HU), MSE over the mask; inf when they are equal there."""
    m = inside(mask, reference, prediction)
    if not m.any():
        return float("nan")
    low, high = data_range
    a = np.clip(reference[m].astype(np.float64), low, high)
    b = np.clip(prediction[m].astype(np.float64), low, high)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10((high - low) ** 2 / mse))
