"""Reports a person reads: training curves, the demo's comparison table and verdicts, stage timings."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from wldm_auto.evaluation.report import BoneShares, ModelRow, table_lines, verdicts, write_report
from wldm_auto.trainers.progress import draw_progress, progress_panels


def _summary(mae: float, dice: float) -> dict:
    metrics = {k: {"mean": v} for k, v in (("mae", mae), ("psnr", 25.0), ("ssim", 0.8), ("ms_ssim", 0.8),
                                              ("ncc", 0.9), ("dice_bone", dice))}
    return {"metrics": metrics}


HISTORY = [{"epoch": i, "step": 100 * (i + 1), "lr": 1e-3, "epoch_seconds": 5.0, "train_rec_ct": 0.1 / (i + 1),
            "train_smd_stru": -0.5 * i, "val_mae_ct_hu": 90.0 - 10 * i, "val_psnr_ct": 25.0 + i, "val_psnr_mr": 20.0}
           for i in range(3)]


def test_progress_separates_units_and_keeps_negative_losses(tmp_path: Path) -> None:
    panels = dict((title, keys) for title, keys in progress_panels(HISTORY))
    hu = [t for t in panels if "HU" in t]
    db = [t for t in panels if "dB" in t]
    assert len(hu) == 1 and panels[hu[0]] == ["val_mae_ct_hu"] and "lower is better" in hu[0]
    assert len(db) == 1 and set(panels[db[0]]) == {"val_psnr_ct", "val_psnr_mr"} and "higher is better" in db[0]
    # every training loss has an axis of its own (a negative SMD term is not squashed by a log scale)
    assert ["train_smd_stru"] in panels.values() and ["train_rec_ct"] in panels.values()
    draw_progress(HISTORY, tmp_path / "progress.png", "test")
    assert (tmp_path / "progress.png").stat().st_size > 1000


def test_report_headers_say_units_and_direction_and_verdicts_explain(tmp_path: Path) -> None:
    bulk = ModelRow("bulk density", _summary(110.0, 0.0))
    good = ModelRow("regression U-Net", _summary(60.0, 0.5))
    vae_limited = ModelRow("3D-WLDM", _summary(130.0, 0.3), ceiling_mae=120.0)
    diffusion_limited = ModelRow("LDM", _summary(115.0, 0.2), ceiling_mae=40.0)
    header = table_lines([good, bulk])[0]
    assert "MAE HU (lower better)" in header and "PSNR dB (higher better)" in header
    assert "bone Dice (higher better)" in header
    sentences = verdicts([good, vae_limited, diffusion_limited, bulk], bulk)
    assert len(sentences) == 3
    assert sentences[0].startswith("regression U-Net beats bulk density")
    assert "does NOT beat" in sentences[1] and "first stage alone loses 120.0 HU" in sentences[1]
    assert "does NOT beat" in sentences[2] and "diffusion stage loses the rest" in sentences[2]
    text = write_report(tmp_path, "title", [good, vae_limited, bulk], bulk, ["a note"])
    assert (tmp_path / "metrics.csv").read_text().startswith("model,MAE HU (lower better)")
    assert "a note" in text and (tmp_path / "README.txt").read_text() == text


def test_bone_verdicts_tell_missing_training_bone_from_too_little_training(tmp_path: Path) -> None:
    bulk = ModelRow("bulk density", _summary(110.0, 0.0))
    no_bone = ModelRow("3D-WLDM", _summary(90.0, 0.0), ceiling_mae=40.0, ceiling_bone_dice=0.7)
    # the training CT holds a tenth of the test CT's bone: more steps cannot help, and the sentence says so
    scarce = verdicts([no_bone, bulk], bulk, BoneShares(train=0.007, test=0.074))
    assert len(scarce) == 1 and scarce[0].startswith("3D-WLDM does NOT beat bulk density on bone Dice (0.000 vs 0.000)")
    assert "0.7 % bone against the test CT's 7.4 %" in scarce[0] and "more steps will not" in scarce[0]
    assert "It does beat it on MAE (90.0 vs 110.0 HU)" in scarce[0]
    # enough bone in training: the first stage keeps it (ceiling Dice 0.7), so the diffusion stage loses it
    kept = verdicts([no_bone, bulk], bulk, BoneShares(train=0.05, test=0.074))[0]
    assert "first stage keeps bone (bone Dice 0.700" in kept and "train stage 2 longer" in kept
    lost_early = ModelRow("LDM", _summary(90.0, 0.0), ceiling_mae=40.0, ceiling_bone_dice=0.0)
    assert "first stage already loses the bone" in verdicts([lost_early, bulk], bulk, BoneShares(0.05, 0.074))[0]
    assert "cannot tell the models apart" in verdicts([no_bone, bulk], bulk, BoneShares(0.05, 0.0))[0]
    # a model without a first stage and no bone figures: the old advice
    plain = ModelRow("regression U-Net", _summary(90.0, 0.0))
    assert "needs more training" in verdicts([plain, bulk], bulk)[0]
    # both metrics lost: one reason each
    both = verdicts([ModelRow("LDM", _summary(130.0, 0.0), ceiling_mae=120.0), bulk], bulk,
                    BoneShares(0.007, 0.074))[0]
    assert "MAE (130.0 vs 110.0 HU): its first stage alone loses 120.0 HU" in both
    assert "; nor on bone Dice (0.000 vs 0.000): its training CT holds 0.7 %" in both
    text = write_report(tmp_path, "title", [no_bone, bulk], bulk, [], BoneShares(0.007, 0.074))
    assert "more steps will not teach it" in text


def test_bone_voxels_pool_cases_and_leave_padding_out(tmp_path: Path) -> None:
    from wldm_auto.cli.demo import TEST_CASE, _bone_shares
    from wldm_auto.evaluation.metrics import bone_voxels

    ct = np.full((4, 5, 5), -1000.0)
    ct[:, 1:4, 1:4] = 40.0  # 36 body voxels
    ct[0, 2, 2] = 700.0  # 1 bone voxel
    ct[3] = -2048.0  # padding is not body
    assert bone_voxels(ct) == (1, 27)
    mask = np.zeros(ct.shape, np.uint8)
    mask[0] = 1
    assert bone_voxels(ct, mask) == (1, 25)
    train = []
    for i, bone in enumerate((1, 3)):  # two training cases pool their voxels: 2 + 4 bone of 27 + 27 body
        case = ct.copy()
        case[1, 1, 1:1 + bone] = 700.0
        train.append(tmp_path / f"train{i}.nii.gz")
        sitk.WriteImage(sitk.GetImageFromArray(case.astype(np.float32)), str(train[-1]))
    for sub, array in (("ct", ct.astype(np.float32)), ("mask", mask)):
        (tmp_path / "test" / sub).mkdir(parents=True)
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "test" / sub / f"{TEST_CASE}.nii.gz"))
    shares = _bone_shares(train, tmp_path / "test")
    assert shares.train == pytest.approx(6 / 54) and shares.test == pytest.approx(1 / 25)


def test_demo_timings_survive_a_rerun_that_reuses_stages(tmp_path: Path) -> None:
    from wldm_auto.cli.demo import Timings

    first = Timings(tmp_path / "timings.json")
    first.record("train_vae", 321.0, did_work=True)
    again = Timings(tmp_path / "timings.json")
    again.record("train_vae", 0.4, did_work=False)  # reused: a later run must not overwrite 321 s with ~0
    assert again.values["train_vae"] == 321.0 and "earlier run" in again.line()
    assert Timings(tmp_path / "timings.json").values["train_vae"] == 321.0


_FINGERPRINT = {"key": "k", "cases": {"a": {"body_extent_mm": [40.0, 40.0, 50.0], "ct": {"p0.5": -1000, "max": 100}}}}


def test_bulk_density_is_water_in_the_body_and_air_outside(small_phantom) -> None:
    from wldm_auto.inference.baselines import bulk_density_sct
    from wldm_auto.planners.planner import plan_dataset
    from wldm_auto.preprocessing.case import body_mask

    mr, _ = small_phantom
    mr = sitk.ConstantPad(sitk.Cast(mr, sitk.sitkFloat32), [6, 6, 0], [6, 6, 0], 0.0)  # air around the body
    plans = plan_dataset("Dataset999_X", _FINGERPRINT, {"0": "MR"}, spacing=[4.0])
    sct = bulk_density_sct(mr, plans)
    body = sitk.GetArrayFromImage(body_mask(mr, plans)) > 0
    values = sitk.GetArrayViewFromImage(sct)
    assert sct.GetSize() == mr.GetSize() and sct.GetOrigin() == mr.GetOrigin()
    assert sct.GetPixelID() == sitk.sitkInt16
    assert np.all(values[body] == 0) and np.all(values[~body] == -1024)
    assert 0.3 < body.mean() < 0.8  # the phantom's body, not the air around it


def test_first_stage_path_without_a_network_is_the_resampling_floor(small_phantom) -> None:
    from wldm_auto.inference.first_stage import first_stage_reconstruction
    from wldm_auto.planners.planner import plan_dataset

    mr, _ = small_phantom
    mr = sitk.Cast(mr, sitk.sitkFloat32)
    rng = np.random.default_rng(0)
    ct_array = np.where(sitk.GetArrayViewFromImage(mr) > 200, 40.0, -1024.0) + rng.normal(0, 5, mr.GetSize()[::-1])
    ct = sitk.GetImageFromArray(ct_array.astype(np.float32))
    ct.CopyInformation(mr)
    plans = plan_dataset("Dataset999_X", _FINGERPRINT, {"0": "MR"}, spacing=[4.0])
    back = first_stage_reconstruction(mr, ct, plans, "3d_wldm")
    assert back.GetSize() == mr.GetSize() and back.GetSpacing() == mr.GetSpacing()
    body = sitk.GetArrayViewFromImage(back) > -1024
    error = np.abs(sitk.GetArrayViewFromImage(back) - ct_array)[body]
    assert 0 < error.mean() < 200  # resampling to 4 mm and back loses something, not everything
    with pytest.raises(ValueError, match="MR grid"):
        first_stage_reconstruction(mr, sitk.Shrink(ct, [2, 2, 2]), plans, "3d_wldm")


def test_bspline_export_follows_a_real_ct_closer_than_linear() -> None:
    """inference.export_interpolation: a real 3 mm CT (TotalSegmentator example) to a 2 mm plan grid and back."""
    from dataclasses import replace

    from conftest import TEST_DATA
    from wldm_auto.inference.first_stage import first_stage_reconstruction
    from wldm_auto.planners.planner import plan_dataset

    ct = sitk.ReadImage(str(TEST_DATA / "totalsegmentator_examples" / "example_ct_sm.nii.gz"), sitk.sitkFloat32)
    truth = sitk.GetArrayFromImage(ct)
    plans = plan_dataset("Dataset999_X", _FINGERPRINT, {"0": "MR"}, spacing=[2.0])
    errors = {}
    for interpolation in ("linear", "bspline"):
        config = plans.configuration("3d_wldm")
        config = replace(config, inference=replace(config.inference, export_interpolation=interpolation))
        edited = replace(plans, configurations={**plans.configurations, "3d_wldm": config})
        back = sitk.GetArrayFromImage(first_stage_reconstruction(ct, ct, edited, "3d_wldm"))  # the CT as its own MR
        body = back > -1024
        assert body.mean() > 0.2
        errors[interpolation] = float(np.abs(back - truth)[body].mean())
    # measured 17.5 HU (linear) and 11.7 HU (B-spline)
    assert 5 < errors["bspline"] < 0.8 * errors["linear"] < 25, errors
