"""Quality of the std map: sparsification/AUSE, coverage, ECE, per-case correlation, and wldm_evaluate's outputs."""
from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from wldm_auto.evaluation import metrics as M
from wldm_auto.evaluation import uncertainty as U
from wldm_auto.evaluation.evaluate import METRICS, evaluate_folder

NEW_KEYS = ("spearman_error_std", "ause", "coverage_1", "coverage_2", "coverage_3", "ece", "mean_std")


def gaussian_errors(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel sigma_i in [5, 100] HU and errors drawn N(0, sigma_i^2)."""
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(5.0, 100.0, n)
    return rng.normal(0.0, sigma), sigma


def report(error: np.ndarray, std: np.ndarray) -> U.UncertaintyReport:
    """The report of an sCT = CT + error (CT = 0) with ``std``, all voxels in the mask."""
    return U.uncertainty_report(np.zeros_like(error), error, std, np.ones(error.shape, bool))


def test_constants_documented() -> None:
    assert U.SPARSIFICATION_STEPS == 50 and len(U.CONFIDENCE_LEVELS) == 19
    assert U.CONFIDENCE_LEVELS[0] == 0.05 and U.CONFIDENCE_LEVELS[-1] == 0.95
    assert [round(v, 4) for v in U.COVERAGE_EXPECTED.values()] == [0.6827, 0.9545, 0.9973]
    for key in (*NEW_KEYS, "coverage_expected", "case_std_vs_mae"):
        assert key in M.DEFINITIONS and "\n" not in M.DEFINITIONS[key]
    assert "0.6827" in M.DEFINITIONS["coverage_1"] and "0.9973" in M.DEFINITIONS["coverage_3"]
    assert "0.05, 0.10, ..., 0.95" in M.DEFINITIONS["ece"] and "1/50" in M.DEFINITIONS["ause"]


def test_sparsification_hand_with_ties() -> None:
    error = np.array([1.0, 2.0, 3.0, 4.0])
    std = np.array([1.0, 1.0, 2.0, 2.0])  # two tie groups: {1, 2} and {3, 4}
    # kept 4, 3, 2, 1 voxels (removed fractions 0, 1/4, 2/4, 3/4); half of a tie group counts half its sum
    by_std = U.sparsification_curve(error, std, steps=4)
    np.testing.assert_allclose(by_std, [10 / 4, (3 + 3.5) / 3, 3 / 2, 1.5 / 1], rtol=1e-15)
    np.testing.assert_allclose(U.oracle_curve(error, steps=4), [10 / 4, 6 / 3, 3 / 2, 1 / 1], rtol=1e-15)
    # std in the opposite order: the largest errors are kept longest
    np.testing.assert_allclose(U.sparsification_curve(error, -error, steps=4), [10 / 4, 9 / 3, 7 / 2, 4 / 1])
    fractions = U.removed_fractions(4)
    assert U.ause(fractions, by_std, U.oracle_curve(error, 4)) == pytest.approx(
        0.25 * ((0 + (6.5 / 3 - 2)) / 2 + (6.5 / 3 - 2 + 0) / 2 + (0 + 0.5) / 2))


def test_ause_zero_for_perfect_ranking_positive_when_shuffled() -> None:
    error, _ = gaussian_errors(200_000)
    mae = np.abs(error).mean()
    perfect = report(error, np.abs(error))
    assert abs(perfect.values["ause"]) <= 1e-9 * mae
    np.testing.assert_allclose(perfect.mae_by_std, perfect.mae_oracle, rtol=1e-12)
    shuffled = report(error, np.random.default_rng(7).permutation(np.abs(error)))
    assert shuffled.values["ause"] > 0.3 * mae
    assert np.all(shuffled.mae_by_std >= shuffled.mae_oracle - 1e-9)
    assert perfect.mae_oracle[0] == pytest.approx(mae, rel=1e-12)
    assert np.all(np.diff(perfect.mae_oracle) < 0)  # removing the largest errors lowers the MAE


def test_constant_std_is_random_removal_flat_at_the_mae() -> None:
    error, _ = gaussian_errors(100_001, seed=1)  # n not a multiple of K
    mae = np.abs(error).mean()
    flat = report(error, np.full(error.shape, 25.0, np.float32))
    np.testing.assert_allclose(flat.mae_by_std, mae, rtol=1e-12)
    expected = np.trapezoid(mae - flat.mae_oracle, U.removed_fractions())
    assert flat.values["ause"] == pytest.approx(expected, rel=1e-12) and flat.values["ause"] > 0
    assert flat.fractions[0] == 0 and flat.fractions[-1] == pytest.approx(49 / 50)


def test_coverage_and_ece_of_a_calibrated_gaussian_std() -> None:
    error, sigma = gaussian_errors(200_000, seed=2)
    calibrated = report(error, sigma).values
    for key, expected in U.COVERAGE_EXPECTED.items():
        assert calibrated[key] == pytest.approx(expected, abs=0.01)
    assert calibrated["ece"] < 0.01
    assert calibrated["mean_std"] == pytest.approx(sigma.mean(), rel=1e-12)
    narrow = report(error, 0.5 * sigma)  # std half the true sigma: 2 std is 1 sigma
    assert narrow.values["coverage_2"] == pytest.approx(U.COVERAGE_EXPECTED["coverage_1"], abs=0.01)
    assert narrow.values["ece"] > 0.15 and np.all(narrow.observed < narrow.levels)
    wide = report(error, 2.0 * sigma)
    assert wide.values["ece"] > 0.1 and np.all(wide.observed > wide.levels)
    # the reliability curve of the calibrated std is the diagonal
    np.testing.assert_allclose(report(error, sigma).observed, U.CONFIDENCE_LEVELS, atol=0.01)


def test_zero_std_covers_only_zero_error_without_dividing_by_zero() -> None:
    error = np.array([0.0, 0.0, 5.0, 1.0, -3.0])
    std = np.array([0.0, 0.0, 0.0, 1.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero RuntimeWarning
        values = report(error, std).values
    # covered at k=1: the two zero/zero voxels and |1| <= 1; at k=3 also |-3| <= 3; never 5 with std 0
    assert values["coverage_1"] == pytest.approx(3 / 5)
    assert values["coverage_2"] == pytest.approx(3 / 5)
    assert values["coverage_3"] == pytest.approx(4 / 5)
    assert math.isfinite(values["ece"]) and math.isfinite(values["ause"])


def test_case_correlation() -> None:
    assert U.case_correlation([1.0, 2.0, 4.0], [10.0, 30.0, 31.0]) == pytest.approx(
        {"pearson": np.corrcoef([1, 2, 4], [10, 30, 31])[0, 1], "spearman": 1.0, "n": 3})
    two = U.case_correlation([1.0, 2.0, float("nan")], [1.0, 2.0, 3.0])  # a case without std map
    assert two["n"] == 2 and math.isnan(two["pearson"]) and math.isnan(two["spearman"])
    constant = U.case_correlation([5.0, 5.0, 5.0], [1.0, 2.0, 3.0])
    assert constant["n"] == 3 and math.isnan(constant["spearman"])
    assert U.case_correlation([3.0, 2.0, 1.0, 0.5], [1.0, 2.0, 3.0, 4.0])["spearman"] == pytest.approx(-1.0)


# ---------------------------------------------------------------- wldm_evaluate

SCALES = {"a": 10.0, "b": 20.0, "c": 40.0}  # error sigma of the cases with a std map; "d" has none


def image(array: np.ndarray) -> sitk.Image:
    result = sitk.GetImageFromArray(array.astype(np.float32))
    result.SetSpacing((1.5, 1.5, 2.0))
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict[str, np.ndarray]]:
    """CT/sCT/std on 16^3 (whole volume is the body); cases a, b, c with calibrated std, d without; evaluated."""
    root = tmp_path_factory.mktemp("uncertainty")
    (root / "ct").mkdir()
    (root / "sct").mkdir()
    rng = np.random.default_rng(11)
    shape = (16, 16, 16)
    arrays: dict[str, np.ndarray] = {}
    for case in ("a", "b", "c", "d"):
        ct = np.clip(rng.normal(0.0, 100.0, shape), -400, 400)  # all > -500 HU: the mask is the volume
        sigma = SCALES.get(case, 15.0) * rng.uniform(0.5, 1.5, shape)
        sct = ct + rng.normal(0.0, sigma)
        sitk.WriteImage(image(ct), str(root / "ct" / f"{case}.nii.gz"))
        sitk.WriteImage(image(sct), str(root / "sct" / f"{case}.mha"))
        if case in SCALES:
            sitk.WriteImage(image(sigma), str(root / "sct" / f"{case}_std.nii.gz"))
        arrays[case] = np.stack([ct, sct, sigma]).astype(np.float32)
    summary = evaluate_folder(root / "ct", root / "sct", root / "out", figures=True, label="toy")
    return root / "out", summary, arrays


def test_evaluate_folder_writes_uncertainty_columns(run: tuple[Path, dict, dict[str, np.ndarray]]) -> None:
    out, _, arrays = run
    with open(out / "metrics.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert all(key in reader.fieldnames for key in NEW_KEYS) and "spearman_std" not in reader.fieldnames
        rows = {row["case"]: row for row in reader}
    assert sorted(rows) == ["a", "b", "c", "d"]
    assert all(rows["d"][key] == "" for key in NEW_KEYS)  # no std map: NaN, an empty cell
    for case in SCALES:
        ct, sct, sigma = arrays[case]
        expected = report(sct.astype(np.float64) - ct, sigma).values
        row = {key: float(rows[case][key]) for key in NEW_KEYS}
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-6)
        assert row["coverage_2"] == pytest.approx(0.9545, abs=0.02) and row["ece"] < 0.03
        assert row["spearman_error_std"] > 0.2 and row["ause"] > 0
        assert row["mean_std"] == pytest.approx(SCALES[case], rel=0.05)


def test_evaluate_folder_summary_and_figures(run: tuple[Path, dict, dict[str, np.ndarray]]) -> None:
    out, summary, _ = run
    written = json.loads((out / "summary.json").read_text())
    assert set(written["metrics"]) == set(METRICS) and set(NEW_KEYS) <= set(METRICS)
    for key in NEW_KEYS:
        stats = written["metrics"][key]
        assert stats["n"] == 3 and stats["n_nan"] == 1 and stats["mean"] is not None
        assert key in written["definitions"]
    assert written["metrics"]["mean_std"]["mean"] == pytest.approx(sum(SCALES.values()) / 3, rel=0.05)
    assert written["coverage_expected"] == pytest.approx(
        {"coverage_1": 0.6827, "coverage_2": 0.9545, "coverage_3": 0.9973}, abs=5e-5)
    correlation = written["case_std_vs_mae"]
    assert correlation["n"] == 3 and correlation["spearman"] == pytest.approx(1.0) and correlation["pearson"] > 0.95
    assert summary["case_std_vs_mae"] == correlation
    for case in ("a", "b", "c"):
        for kind in ("sparsification", "reliability"):
            png = out / f"{case}_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (out / "d.png").is_file()
    assert not list(out.glob("d_*.png"))


def test_evaluate_folder_correlation_null_below_three_cases(run: tuple[Path, dict, dict[str, np.ndarray]],
                                                           tmp_path: Path) -> None:
    source = run[0].parent
    ct, sct = tmp_path / "ct", tmp_path / "sct"
    ct.mkdir()
    sct.mkdir()
    for case in ("a", "b", "d"):  # two cases with a std map
        (ct / f"{case}.nii.gz").symlink_to(source / "ct" / f"{case}.nii.gz")
        (sct / f"{case}.mha").symlink_to(source / "sct" / f"{case}.mha")
    for case in ("a", "b"):
        (sct / f"{case}_std.nii.gz").symlink_to(source / "sct" / f"{case}_std.nii.gz")
    evaluate_folder(ct, sct, tmp_path / "out", figures=False)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["case_std_vs_mae"] == {"pearson": None, "spearman": None, "n": 2}
    assert not list((tmp_path / "out").glob("*.png"))
