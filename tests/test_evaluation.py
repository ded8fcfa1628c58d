"""Evaluation metrics against hand-computed values, and wldm_evaluate end to end on the phantom CT."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from skimage.metrics import structural_similarity

from wldm_auto.cli.evaluate import main
from wldm_auto.evaluation import metrics as M
from wldm_auto.evaluation.evaluate import METRICS, evaluate_folder

PHANTOM_CT = Path(__file__).resolve().parents[1] / "wldm_auto/dataset_conversion/example_data/mri_dir_porcine_phantom/ct.nii.gz"
C1 = (0.01 * 4024) ** 2


def cube(values: list[float]) -> np.ndarray:
    return np.array(values, np.float64).reshape(2, 2, 2)


MASK = cube([1, 1, 1, 1, 0, 0, 0, 0]).astype(bool)


def test_mae_hand() -> None:
    ct = cube([0, 100, -50, 1000, 7, 7, 7, 7])
    sct = cube([10, 80, -20, 1040, 900, 900, 900, 900])  # errors outside the mask must not count
    assert M.mae(ct, sct, MASK) == pytest.approx((10 + 20 + 30 + 40) / 4)
    assert math.isnan(M.mae(ct, sct, np.zeros_like(MASK)))


def test_psnr_hand_with_clipping() -> None:
    ct = cube([-2000, 100, 3500, 0, 0, 0, 0, 0])  # -2000 -> -1024 and 3500 -> 3000 after clipping
    sct = cube([-1024, 110, 3000, 20, 5000, 5000, 5000, 5000])
    mse = (0 + 10 ** 2 + 0 + 20 ** 2) / 4
    assert M.psnr(ct, sct, MASK) == pytest.approx(10 * math.log10(4024 ** 2 / mse))
    assert M.psnr(ct, ct, MASK) == math.inf


def test_one_metrics_module_for_training_and_evaluation() -> None:
    """io.metrics holds MAE and PSNR for both (reference, prediction, mask); the evaluation's are those."""
    from wldm_auto.io import metrics as shared
    from wldm_auto.trainers import base, vae_trainer

    for module in (base, vae_trainer):  # training validates with the same functions (imported where used)
        assert "wldm_auto.io.metrics" in Path(module.__file__).read_text()
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(PHANTOM_CT), sitk.sitkFloat32))[100:140]
    sct = np.roll(ct, 3, axis=2) + np.float32(25.0)
    mask = M.default_body_mask(ct)
    assert M.mae(ct, sct, mask) == shared.mae(ct, sct, mask) == shared.mae(sct, ct, mask)  # symmetric
    assert M.psnr(ct, sct, mask) == shared.psnr(ct, sct, mask) == shared.psnr(sct, ct, mask, (-1024.0, 3000.0))
    ct_clipped = np.clip(ct[mask].astype(np.float64), -1024, 3000)
    mse = np.mean((ct_clipped - np.clip(sct[mask].astype(np.float64), -1024, 3000)) ** 2)
    assert M.psnr(ct, sct, mask) == pytest.approx(10 * math.log10(4024 ** 2 / mse), rel=1e-12)
    # another data range, as training's MR PSNR in [-1, 1]: both clipped to it first
    assert shared.psnr(cube([0, 0.5, 3, 0, 0, 0, 0, 0]), cube([0, 0, 0, 0, 0, 0, 0, 0]), MASK, (-1.0, 1.0)) == \
        pytest.approx(10 * math.log10(4 / ((0.25 + 1) / 4)))
    with pytest.raises(ValueError, match="shape mismatch"):
        shared.mae(ct, sct[:-1], mask)


def test_ncc_hand() -> None:
    ct = cube([1, 2, 3, 4, 0, 0, 0, 0])
    sct = cube([1, 3, 2, 4, 9, -9, 9, -9])
    # deviations from 2.5: (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5): sum of products 4, sums of squares 5 and 5
    assert M.ncc(ct, sct, MASK) == pytest.approx(4 / math.sqrt(5 * 5))
    assert M.ncc(ct, 2 * ct + 7, MASK) == pytest.approx(1.0)
    assert M.ncc(ct, -ct, MASK) == pytest.approx(-1.0)


def test_bone_dice_hand() -> None:
    ct = cube([300, 400, 500, 0, 900, 900, 900, 900])  # bone: 3 voxels in the mask
    sct = cube([300, 400, 0, 0, 0, 0, 0, 0])  # bone: 2 voxels, both overlapping
    assert M.bone_dice(ct, sct, MASK) == pytest.approx(2 * 2 / (3 + 2))
    assert M.bone_dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), MASK) == 1.0  # both empty
    assert M.bone_dice(ct, np.zeros((2, 2, 2)), MASK) == 0.0


def test_spearman_hand() -> None:
    ct = np.zeros((2, 2, 2))
    sct = cube([1, 2, 3, 4, 0, 0, 0, 0])  # |error| ranks 1, 2, 3, 4
    assert M.spearman_uncertainty(ct, sct, cube([0.1, 0.5, 2, 30, 0, 0, 0, 0]), MASK) == pytest.approx(1.0)
    # std ranks 1, 3, 2, 4: Pearson of the ranks = 4 / 5 (as in test_ncc_hand)
    assert M.spearman_uncertainty(ct, sct, cube([1, 3, 2, 4, 0, 0, 0, 0]), MASK) == pytest.approx(0.8)
    assert math.isnan(M.spearman_uncertainty(ct, sct, np.ones((2, 2, 2)), MASK))  # constant std: no ranking


def test_default_body_mask_hand() -> None:
    ct = np.full((7, 7, 7), -1000.0)
    ct[1:4, 1:4, 1:4] = 0.0  # 27-voxel body ...
    ct[2, 2, 2] = -1000.0  # ... with an air hole inside
    ct[6, 6, 6] = 0.0  # an isolated voxel: not the largest component
    mask = M.default_body_mask(ct)
    assert mask.sum() == 27 and mask[2, 2, 2] and not mask[6, 6, 6]
    assert not M.default_body_mask(np.full((3, 3, 3), -1000.0)).any()


def test_ssim_identical_and_constant_hand() -> None:
    rng = np.random.default_rng(0)
    ct = rng.normal(0, 300, (12, 12, 12))
    mask = np.ones(ct.shape, bool)
    assert M.ssim_synthrad(ct, ct, mask) == pytest.approx(1.0)
    # constant images 0 HU and 100 HU: variances 0, so SSIM = luminance = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0 + 1024, 100 + 1024
    expected = (2 * a * b + C1) / (a * a + b * b + C1)
    assert M.ssim_synthrad(np.zeros((8, 8, 8)), np.full((8, 8, 8), 100.0), np.ones((8, 8, 8))) == pytest.approx(expected)


def test_ssim_matches_skimage_with_documented_preprocessing() -> None:
    rng = np.random.default_rng(1)
    ct = rng.normal(0, 600, (20, 14, 13))
    sct = ct + rng.normal(0, 150, ct.shape)
    mask = np.zeros(ct.shape, bool)
    mask[3:17, 2:12, 1:11] = True
    x = np.clip(ct, -1024, 3000)
    y = np.clip(sct, -1024, 3000)
    x[~mask], y[~mask] = -1024, -1024
    _, full = structural_similarity(x + 1024, y + 1024, win_size=7, data_range=4024, full=True, channel_axis=None,
                                    gaussian_weights=False)
    expected = full[mask].mean()
    assert M.ssim_synthrad(ct, sct, mask) == pytest.approx(expected, abs=1e-10)
    assert M.ssim_synthrad(ct, sct, mask, slab=7) == pytest.approx(expected, abs=1e-10)  # slab-wise is exact
    assert M.ms_ssim_masked(ct, sct, mask, scales=1) == pytest.approx(expected, abs=1e-10)  # 1 scale = SSIM


def test_ms_ssim_scales_and_renormalised_weights_hand() -> None:
    assert M.ms_ssim_scales((112, 112, 112)) == 5  # 112 // 16 = 7
    assert M.ms_ssim_scales((111, 200, 200)) == 4
    assert M.ms_ssim_scales((16, 16, 16)) == 2
    assert M.ms_ssim_scales((6, 50, 50)) == 0
    # constant images: cs = 1 at every scale, luminance l at the last: MS-SSIM = l ** (w2 / (w1 + w2)) on 16^3
    a, b = 0 + 1024, 100 + 1024
    luminance = (2 * a * b + C1) / (a * a + b * b + C1)
    value = M.ms_ssim_masked(np.zeros((16, 16, 16)), np.full((16, 16, 16), 100.0), np.ones((16, 16, 16)))
    assert value == pytest.approx(luminance ** (0.2856 / (0.0448 + 0.2856)))
    with pytest.raises(ValueError, match="smaller than"):
        M.ms_ssim_masked(np.zeros((6, 9, 9)), np.zeros((6, 9, 9)), np.ones((6, 9, 9)))


def test_ms_ssim_identical_and_noise() -> None:
    rng = np.random.default_rng(2)
    ct = np.zeros((32, 32, 32))
    ct[4:28, 6:26, 5:27] = rng.normal(40, 200, (24, 20, 22))
    mask = M.default_body_mask(np.where(ct != 0, 0.0, -1000.0))
    assert M.ms_ssim_masked(ct, ct, mask) == pytest.approx(1.0)
    low = M.ms_ssim_masked(ct, ct + rng.normal(0, 30, ct.shape), mask)
    high = M.ms_ssim_masked(ct, ct + rng.normal(0, 300, ct.shape), mask)
    assert 1.0 > low > high > 0.0


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def phantom_ct() -> sitk.Image:
    """The phantom CT binned to 3x3x4 mm and cropped to 64x64x48 (object plus air)."""
    ct = sitk.BinShrink(sitk.ReadImage(str(PHANTOM_CT)), [3, 3, 4])
    index = [(n - s) // 2 for n, s in zip(ct.GetSize(), (64, 64, 48))]
    return sitk.RegionOfInterest(ct, [64, 64, 48], index)


def like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


SIGMA = 60.0


@pytest.fixture(scope="module")
def folders(phantom_ct: sitk.Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ct/ (noise, bulk), sct/ (CT + N(0, SIGMA) with a std map; bulk density) and mr/."""
    root = tmp_path_factory.mktemp("evaluation")
    for sub in ("ct", "sct", "mr"):
        (root / sub).mkdir()
    ct = sitk.GetArrayFromImage(phantom_ct).astype(np.float32)
    rng = np.random.default_rng(3)
    noise = rng.normal(0, SIGMA, ct.shape).astype(np.float32)
    body = M.default_body_mask(ct)
    for case in ("noise", "bulk"):
        sitk.WriteImage(phantom_ct, str(root / "ct" / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.ShiftScale(phantom_ct, 1000, 0.5), str(root / "mr" / f"{case}_0000.nii.gz"))
    sitk.WriteImage(like(ct + noise, phantom_ct), str(root / "sct" / "noise.nii.gz"))
    std = np.abs(np.abs(noise) + rng.normal(0, 5, ct.shape).astype(np.float32))  # a std map is >= 0
    sitk.WriteImage(like(std, phantom_ct), str(root / "sct" / "noise_std.nii.gz"))
    sitk.WriteImage(like(np.where(body, 0, -1024).astype(np.int16), phantom_ct), str(root / "sct" / "bulk.nii.gz"))
    return root


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def test_cli_end_to_end(folders: Path, phantom_ct: sitk.Image, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["-r", str(folders / "ct"), "-p", str(folders / "sct"), "--mr", str(folders / "mr"),
                 "-o", str(out)]) == 0
    rows = read_rows(out / "metrics.csv")
    assert sorted(rows) == ["bulk", "noise"]  # the std map is not a case
    noise = {k: float(v) for k, v in rows["noise"].items() if k != "case" and v}
    assert noise["mae"] == pytest.approx(SIGMA * math.sqrt(2 / math.pi), rel=0.1)
    assert noise["psnr"] == pytest.approx(20 * math.log10(4024 / SIGMA), abs=0.5)
    assert 0.5 < noise["ssim"] < 1 and 0.5 < noise["ms_ssim"] < 1 and noise["ncc"] > 0.9
    assert noise["dice_bone"] > 0.8 and noise["spearman_error_std"] > 0.9
    ct = sitk.GetArrayFromImage(phantom_ct).astype(np.float64)
    body = M.default_body_mask(ct)
    bulk = rows["bulk"]
    assert float(bulk["mae"]) == pytest.approx(np.abs(ct[body]).mean(), rel=1e-5)
    assert float(bulk["dice_bone"]) == 0.0 and bulk["spearman_error_std"] == "" and bulk["ncc"] == ""
    assert int(bulk["mask_voxels"]) == body.sum()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == set(METRICS) and summary["n_cases"] == 2
    assert "CT > -500 HU" in summary["mask"]
    mae = summary["metrics"]["mae"]
    assert mae["n"] == 2 and mae["mean"] == pytest.approx((noise["mae"] + float(bulk["mae"])) / 2, rel=1e-5)
    assert summary["metrics"]["spearman_error_std"]["n"] == 1
    assert summary["metrics"]["ause"]["n"] == 1 and summary["case_std_vs_mae"]["n"] == 1
    assert (out / "noise_sparsification.png").is_file() and (out / "noise_reliability.png").is_file()
    assert not list(out.glob("bulk_*.png"))
    for case in ("noise", "bulk"):
        png = out / f"{case}.png"
        assert png.stat().st_size > 20_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "logs").glob("evaluate_*.log"))


def test_mask_folder_and_default_output(folders: Path, phantom_ct: sitk.Image, tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    box = np.zeros(phantom_ct.GetSize()[::-1], np.uint8)
    box[10:30, 20:40, 20:40] = 1
    for case in ("noise", "bulk"):
        sitk.WriteImage(like(box, phantom_ct), str(masks / f"{case}.nii.gz"))
    sct = tmp_path / "sct"
    sct.mkdir()
    for path in (folders / "sct").iterdir():
        (sct / path.name).symlink_to(path)
    summary = evaluate_folder(folders / "ct", sct, None, mask_dir=masks, figures=False)
    rows = read_rows(tmp_path / "sct_evaluation" / "metrics.csv")
    assert int(rows["noise"]["mask_voxels"]) == 20 * 20 * 20 and summary["mask"].startswith("masks from")


def test_geometry_mismatch_and_resample(folders: Path, phantom_ct: sitk.Image, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    full = sitk.BinShrink(sitk.ReadImage(str(PHANTOM_CT)), [3, 3, 4])
    index = [(n - s) // 2 for n, s in zip(full.GetSize(), (64, 64, 48))]
    shifted = sitk.RegionOfInterest(full, [64, 64, 48], [index[0] + 1, *index[1:]])  # same CT, one voxel along x
    sct = tmp_path / "sct"
    sct.mkdir()
    sitk.WriteImage(shifted, str(sct / "noise.nii.gz"))
    ct = tmp_path / "ct"
    ct.mkdir()
    sitk.WriteImage(phantom_ct, str(ct / "noise.nii.gz"))
    assert main(["-r", str(ct), "-p", str(sct), "--no-figures"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "noise" in err and "origin" in err and "--resample" in err
    assert main(["-r", str(ct), "-p", str(sct), "--resample", "--no-figures"]) == 0
    row = read_rows(tmp_path / "sct_evaluation" / "metrics.csv")["noise"]
    assert float(row["mae"]) < 30  # exact except the first x column, which lies outside the shifted sCT
    summary = json.loads((tmp_path / "sct_evaluation" / "summary.json").read_text())
    assert summary["resampled_onto_ct_grid"] == ["noise"]


def test_missing_pairs(phantom_ct: sitk.Image, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ct, sct = tmp_path / "ct", tmp_path / "sct"
    ct.mkdir()
    sct.mkdir()
    for case in ("both", "ctonly"):
        sitk.WriteImage(phantom_ct, str(ct / f"{case}.nii.gz"))
    for case in ("both", "sctonly"):
        sitk.WriteImage(phantom_ct, str(sct / f"{case}.nii.gz"))
    assert main(["-r", str(ct), "-p", str(sct), "--no-figures"]) == 1
    err = capsys.readouterr().err
    assert "ctonly" in err and "sctonly" in err and "both" not in err.split("(")[0]
    assert main(["-r", str(ct), "-p", str(sct), "--no-figures", "--allow-missing"]) == 0
    rows = read_rows(tmp_path / "sct_evaluation" / "metrics.csv")
    assert list(rows) == ["both"] and float(rows["both"]["mae"]) == 0.0


def test_help_explains(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["-h"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "SSIM" in text and "--resample" in text and "metrics.csv" in text
