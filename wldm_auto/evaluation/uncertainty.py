"""Quality of a sCT's uncertainty (std map) against its true error, inside the mask (pure numpy/scipy).

``error`` is |sCT - CT| (HU) and ``std`` the predicted standard deviation (HU) of the mask voxels.

* Sparsification: remove voxels in order of decreasing std (and, as the oracle, of decreasing
  |error|); at removed fractions f = i / K, i = 0 .. K-1 (K = 50) the MAE of the voxels left.
  Voxels of equal std are removed in random order and the curve is the expectation over those
  orders (within the tie group straddling the cut, each voxel counts with the share of the group
  that is kept); so a constant std gives the random-removal curve, flat at the MAE, and ties
  never favour either curve. One sort per curve, cumulative sums, no loop over voxels.
* AUSE: trapezoid area over f in [0, (K-1)/K] between the std curve and the oracle (HU).
* Coverage k: share of voxels with |error| <= k * std (a std of 0 covers only an error of 0).
* ECE: the std read as a Gaussian predictive; for p = 0.05, 0.10, ..., 0.95 the share of voxels
  with |error| <= z * std, z = norm.ppf((1 + p) / 2), against p; mean |observed - p|.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from wldm_auto.io.metrics import inside as _mask

SPARSIFICATION_STEPS = 50  # K: removed fractions 0, 1/K, ..., (K-1)/K
CONFIDENCE_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05, 0.10, ..., 0.95
COVERAGE_K = (1, 2, 3)
COVERAGE_EXPECTED = {f"coverage_{k}": float(2 * stats.norm.cdf(k) - 1) for k in COVERAGE_K}  # 0.6827 ...
MIN_CASES = 3  # fewest cases with a std map for the per-case correlation of mean std and MAE
KEYS = ("ause", *COVERAGE_EXPECTED, "ece", "mean_std")

DEFINITIONS = {
    "ause": f"area under the sparsification error (HU): remove mask voxels by decreasing std and, as oracle, by "
            f"decreasing |sCT - CT|; MAE of the rest at removed fractions 0, 1/{SPARSIFICATION_STEPS}, ..., "
            f"{SPARSIFICATION_STEPS - 1}/{SPARSIFICATION_STEPS}; trapezoid area between the two curves (0 = std "
            "ranks the errors perfectly; ties in std count as random order, their expectation)",
    **{key: f"share (0..1) of mask voxels with |sCT - CT| <= {k} * std (a std of 0 covers only an error of 0); "
            f"Gaussian expectation {value:.4f}" for k, (key, value) in zip(COVERAGE_K, COVERAGE_EXPECTED.items())},
    "ece": "expected calibration error (0..1) of the std as a Gaussian: mean over p = 0.05, 0.10, ..., 0.95 of "
           "|share of mask voxels with |sCT - CT| <= norm.ppf((1 + p) / 2) * std - p|",
    "mean_std": "mean of the std map inside the mask (HU)",
    "coverage_expected": "Gaussian share within k std: 2 Phi(k) - 1 = 0.6827, 0.9545, 0.9973 for k = 1, 2, 3",
    "case_std_vs_mae": f"Pearson and Spearman correlation, across the cases with a std map, of each case's mean_std "
                       f"and its mae; null when fewer than {MIN_CASES} cases or either is constant",
}


@dataclass(frozen=True)
class UncertaintyReport:
    """The per-case numbers (``values``, keyed as :data:`KEYS`) and the curves behind them (for figures)."""

    values: dict[str, float]
    fractions: np.ndarray  # removed fractions, (K,)
    mae_by_std: np.ndarray  # MAE left after removing by std, (K,)
    mae_oracle: np.ndarray  # MAE left after removing by |error|, (K,)
    levels: np.ndarray  # confidence levels p, (19,)
    observed: np.ndarray  # observed share within the p interval, (19,)


def masked_error_and_std(ct: np.ndarray, sct: np.ndarray, std: np.ndarray,
                         mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|sct - ct| (float64) and std (its own dtype) of the mask voxels, as 1D arrays."""
    m = _mask(mask, ct, sct, std)
    return np.abs(sct[m].astype(np.float64) - ct[m]), std[m]


def removed_fractions(steps: int = SPARSIFICATION_STEPS) -> np.ndarray:
    """f = 0, 1/steps, ..., (steps-1)/steps."""
    return np.arange(steps, dtype=np.float64) / steps


def sparsification_curve(error: np.ndarray, score: np.ndarray, steps: int = SPARSIFICATION_STEPS) -> np.ndarray:
    """MAE of the voxels left after removing floor(f n) voxels of highest ``score``, for each removed fraction f.

    Voxels of equal score are taken in random order and the expectation is returned (see
    :func:`curve_of_sorted`); so the order of the argsort within ties does not matter.
    """
    order = np.argsort(score)
    return curve_of_sorted(score[order], error[order], steps)


def oracle_curve(error: np.ndarray, steps: int = SPARSIFICATION_STEPS) -> np.ndarray:
    """The sparsification curve removing by the true error itself (the best any std can do)."""
    ordered = np.sort(error)
    return curve_of_sorted(ordered, ordered, steps)


def curve_of_sorted(key: np.ndarray, error: np.ndarray, steps: int = SPARSIFICATION_STEPS) -> np.ndarray:
    """Sparsification curve from ``key`` sorted ascending and ``error`` in that order (float64 sums).

    Keeping the m = n - floor(i n / steps) voxels of lowest key: those below the key of the m-th voxel,
    and of its tie group [low, high) the expected share (m - low) / (high - low) of the group's error sum.
    """
    n = error.size
    if n == 0:
        return np.full(steps, np.nan)
    cumulative = np.concatenate(([0.0], np.cumsum(error, dtype=np.float64)))
    kept = n - (np.arange(steps, dtype=np.int64) * n) // steps  # >= 1
    boundary = key[kept - 1]
    low = np.searchsorted(key, boundary, side="left")
    high = np.searchsorted(key, boundary, side="right")
    share = (kept - low) / (high - low)
    return (cumulative[low] + share * (cumulative[high] - cumulative[low])) / kept


def ause(fractions: np.ndarray, mae_by_std: np.ndarray, mae_oracle: np.ndarray) -> float:
    """Trapezoid area (HU) between the std and oracle sparsification curves over ``fractions``."""
    gap = mae_by_std - mae_oracle  # by hand: np.trapezoid needs numpy >= 2, setup.py allows 1.24
    return float(np.sum((gap[1:] + gap[:-1]) / 2 * np.diff(fractions)))


def error_ratio(error: np.ndarray, std: np.ndarray) -> np.ndarray:
    """|error| / std, so that ratio <= k iff |error| <= k * std: 0 where both are 0, inf where std <= 0 otherwise."""
    ratio = np.full(error.shape, np.inf)
    np.divide(error, std, out=ratio, where=std > 0)
    ratio[(std == 0) & (error == 0)] = 0.0
    return ratio


def share_within(ratio: np.ndarray, bounds: Sequence[float] | np.ndarray) -> np.ndarray:
    """For each bound k, the share of voxels with ratio <= k (NaN for no voxels)."""
    if ratio.size == 0:
        return np.full(len(bounds), np.nan)
    return np.array([np.count_nonzero(ratio <= k) for k in bounds], np.float64) / ratio.size


def gaussian_bounds(levels: Sequence[float] | np.ndarray) -> np.ndarray:
    """z with P(|Z| <= z) = p for a standard normal Z: norm.ppf((1 + p) / 2)."""
    return stats.norm.ppf((1 + np.asarray(levels, np.float64)) / 2)


def expected_calibration_error(levels: np.ndarray, observed: np.ndarray) -> float:
    """Mean over the confidence levels of |observed share - level|."""
    return float(np.mean(np.abs(observed - levels)))


def uncertainty_report(ct: np.ndarray, sct: np.ndarray, std: np.ndarray, mask: np.ndarray,
                       steps: int = SPARSIFICATION_STEPS,
                       levels: Sequence[float] = CONFIDENCE_LEVELS) -> UncertaintyReport:
    """AUSE, coverage 1/2/3, ECE and mean std of one case, with the sparsification and reliability curves."""
    error, spread = masked_error_and_std(ct, sct, std, mask)
    fractions = removed_fractions(steps)
    by_std = sparsification_curve(error, spread, steps)
    oracle = oracle_curve(error, steps)
    ratio = error_ratio(error, spread)
    p = np.asarray(levels, np.float64)
    observed = share_within(ratio, gaussian_bounds(p))
    coverage = share_within(ratio, COVERAGE_K)
    values = {
        "ause": ause(fractions, by_std, oracle) if error.size else float("nan"),
        **{key: float(c) for key, c in zip(COVERAGE_EXPECTED, coverage)},
        "ece": expected_calibration_error(p, observed) if error.size else float("nan"),
        "mean_std": float(np.mean(spread, dtype=np.float64)) if error.size else float("nan"),
    }
    return UncertaintyReport(values, fractions, by_std, oracle, p, observed)


def case_correlation(mean_std: Sequence[float], mae: Sequence[float]) -> dict[str, float | int]:
    """Pearson and Spearman correlation across cases of mean std and MAE, over the cases where both are finite.

    NaN when fewer than :data:`MIN_CASES` such cases or either quantity is constant; ``n`` is their number.
    """
    x, y = np.asarray(mean_std, np.float64), np.asarray(mae, np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    out: dict[str, float | int] = {"pearson": float("nan"), "spearman": float("nan"), "n": int(x.size)}
    if x.size >= MIN_CASES and np.ptp(x) > 0 and np.ptp(y) > 0:
        out["pearson"] = float(stats.pearsonr(x, y).statistic)
        out["spearman"] = float(stats.spearmanr(x, y).statistic)
    return out
