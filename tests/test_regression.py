"""Regression baseline: U-Net shapes, whole-volume synthesizer, trainer, wldm_train/wldm_predict (CPU)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import PHANTOM_DIR, TEST_DATA, tiny_copy
from wldm_auto.cli.predict import main as predict_main
from wldm_auto.cli.train import main as train_main
from wldm_auto.io.geometry import Geometry
from wldm_auto.models.checkpoint import load_checkpoint, save_checkpoint
from wldm_auto.models.factory import build_regression_unet
from wldm_auto.models.regression import RegressionSynthesizer
from wldm_auto.models.tiling import pad_to
from wldm_auto.planners.schema import RegressionPlan
from wldm_auto.trainers.base import TrainerOptions
from wldm_auto.trainers.run import run_training

TINY = RegressionPlan(unet_channels=[8, 16, 32], group_width=4, blocks_per_level=1)


def test_unet_shapes_and_invalid_inputs() -> None:
    torch.manual_seed(0)
    net = build_regression_unet(2, TINY)
    assert net.required_divisor == 4
    x = torch.randn(2, 2, 12, 20, 28)  # odd multiples of 4: 3, 5, 7
    assert net(x).shape == (2, 1, 12, 20, 28)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 2, 12, 18, 28))
    with pytest.raises(ValueError, match=r"\(B, 2, D, H, W\)"):
        net(torch.randn(1, 1, 12, 20, 28))
    with pytest.raises(ValueError, match="unet_channels"):
        build_regression_unet(1, RegressionPlan(unet_channels=[]))


def test_synthesizer_whole_volume_is_deterministic() -> None:
    torch.manual_seed(0)
    net = build_regression_unet(1, TINY).eval()
    mr = torch.rand(1, 13, 22, 30) * 2 - 1  # not divisible by 4
    tiled = RegressionSynthesizer(net, [8, 8, 16], overlap=0.5).sample(mr, num_samples=3)
    assert tiled.shape == (3, 13, 22, 30) and torch.equal(tiled[0], tiled[2])
    # one tile covering the volume: exactly the network on the (air-)padded volume
    whole = RegressionSynthesizer(net, [16, 24, 32]).sample(mr, steps=7, eta=1.0)
    padded, crop = pad_to(mr, [16, 24, 32], -1.0)
    with torch.no_grad():
        expected = net(padded[None])[0, 0][crop]
    assert whole.shape == (1, 13, 22, 30)
    assert torch.allclose(whole[0], expected, atol=1e-5)


@pytest.fixture(scope="module")
def trained(preprocessed_small, tmp_path_factory):
    """The regression baseline trained 40 steps (4 epochs) on the small phantom dataset."""
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("regression")
    dataset = tiny_copy(preprocessed_small, root, monkeypatch)
    final = run_training(dataset, "regression", 0,
                         options=TrainerOptions(device="cpu", num_workers=0, num_steps=40, steps_per_epoch=10))
    yield {"root": root, "dataset": dataset, "final": final, "model": final.parent.parent}
    monkeypatch.undo()


def test_training_loss_falls_and_checkpoints_are_complete(trained):
    folder = trained["final"].parent
    assert trained["model"].name == "RegressionTrainer__wldmPlans__3d_wldm"
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt", "progress.png", "history.json"):
        assert (folder / name).is_file(), name
    history = json.loads((folder / "history.json").read_text())
    assert [h["step"] for h in history] == [10, 20, 30, 40]
    assert all(np.isfinite(h["val_mae_ct_hu"]) and np.isfinite(h["val_psnr_ct"]) for h in history)
    loss = [h["train_loss"] for h in history]
    assert loss[-1] < loss[0], loss
    state = load_checkpoint(trained["final"])
    assert state["stage"] == "regression" and state["trainer"] == "RegressionTrainer" and state["step"] == 40
    assert set(state["networks"]) == {"net"}
    assert state["plans"]["configurations"]["3d_wldm"]["regression"]["unet_channels"] == [8, 16]


def test_cli_train_and_exact_resume(preprocessed_small, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_small, tmp_path / "a", monkeypatch)
    assert train_main([dataset, "regression", "--device", "cpu", "--steps", "6", "--steps-per-epoch", "3",
                       "--num-workers", "0"]) == 0
    straight = tmp_path / "a" / "results" / dataset / "RegressionTrainer__wldmPlans__3d_wldm" / "fold_0"
    dataset = tiny_copy(preprocessed_small, tmp_path / "b", monkeypatch)
    half = run_training(dataset, "regression", 0, options=TrainerOptions(
        device="cpu", num_workers=0, num_steps=6, steps_per_epoch=3, stop_at_step=4))
    assert half.name == "checkpoint_latest.pt" and load_checkpoint(half)["step"] == 4
    resumed = run_training(dataset, "regression", 0, resume=True,
                           options=TrainerOptions(device="cpu", num_workers=0, num_steps=6, steps_per_epoch=3))
    a = load_checkpoint(straight / "checkpoint_final.pt")
    b = load_checkpoint(resumed)
    for key, value in a["networks"]["net"].items():
        assert torch.equal(value, b["networks"]["net"][key]), key
    figures = ("step", "train_loss", "val_mae_ct_hu")
    assert [[h[k] for k in figures] for h in a["history"]] == [[h[k] for k in figures] for h in b["history"]]


def test_predict_keeps_exact_geometry_without_std(trained, tmp_path, caplog):
    inputs = tmp_path / "in"
    inputs.mkdir()
    mr = sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz"))
    sitk.WriteImage(sitk.RegionOfInterest(mr, [97, 91, 41], [80, 80, 26]), str(inputs / "phantom_0000.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(TEST_DATA / "totalsegmentator_examples" / "example_mr_sm.nii.gz")),
                    str(inputs / "abdomen.mha"))
    out = tmp_path / "sct"
    with caplog.at_level(logging.INFO, logger="wldm_auto.inference.predictor"):
        code = predict_main(["-i", str(inputs), "-o", str(out), "-m", str(trained["model"]), "--samples", "3",
                             "--save-std", "--device", "cpu"])
    assert code == 0
    for sct_name, source in (("phantom.nii.gz", "phantom_0000.nii.gz"), ("abdomen.mha", "abdomen.mha")):
        reference, sct = sitk.ReadImage(str(inputs / source)), sitk.ReadImage(str(out / sct_name))
        assert sct.GetPixelID() == sitk.sitkInt16, sct_name
        assert Geometry.of(sct).size == Geometry.of(reference).size, sct_name
        assert Geometry.of(sct).spacing == Geometry.of(reference).spacing, sct_name
        assert Geometry.of(sct).is_close(Geometry.of(reference), 1e-6), sct_name
        array = sitk.GetArrayViewFromImage(sct)
        assert array.min() >= -1024 and array.max() <= 3071, sct_name
        assert (array == -1024).any() and (array > -1024).any(), sct_name
    assert not list(out.glob("*_std*")), "a single deterministic fold has no spread"
    assert "std map not written" in caplog.text


def test_mirroring_gives_a_deterministic_model_a_std_map(trained, tmp_path, caplog):
    """--mirror-axes: the sCT is the mean over the flipped MRs and their spread is the std map."""
    from wldm_auto import Predictor

    inputs = tmp_path / "in"
    inputs.mkdir()
    mr = sitk.RegionOfInterest(sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz")), [97, 91, 41], [64, 64, 20])
    sitk.WriteImage(mr, str(inputs / "p.nii.gz"))
    with caplog.at_level(logging.INFO, logger="wldm_auto.inference.predictor"):
        assert predict_main(["-i", str(inputs), "-o", str(tmp_path / "m"), "-m", str(trained["model"]),
                             "--mirror-axes", "1", "2", "--save-std", "--device", "cpu"]) == 0
    assert "test-time mirroring along axes [1, 2] (4 draws per sample)" in caplog.text
    assert predict_main(["-i", str(inputs), "-o", str(tmp_path / "plain"), "-m", str(trained["model"]),
                         "--device", "cpu"]) == 0
    sct, std = (sitk.ReadImage(str(tmp_path / "m" / n)) for n in ("p.nii.gz", "p_std.nii.gz"))
    for image in (sct, std):
        assert Geometry.of(image).size == Geometry.of(mr).size and Geometry.of(image).is_close(Geometry.of(mr), 1e-6)
    body = sitk.GetArrayViewFromImage(sct) > -1024
    spread = sitk.GetArrayViewFromImage(std)
    assert spread[body].mean() > 0 and spread.min() >= 0
    plain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain" / "p.nii.gz")))
    difference = np.abs(sitk.GetArrayFromImage(sct).astype(float) - plain)[body]
    assert 0 < difference.mean() < 200  # another estimate of the same sCT
    # the Python API: the same voxels
    result = Predictor.from_model_folder(trained["model"], device="cpu", mirror_axes=[1, 2]).predict(mr)
    assert result.draws == 4
    assert np.array_equal(sitk.GetArrayFromImage(result.sct), sitk.GetArrayFromImage(sct))
    assert np.array_equal(sitk.GetArrayFromImage(result.std), sitk.GetArrayFromImage(std))


def test_prediction_rejects_other_stages(trained, tmp_path, capsys):
    state = load_checkpoint(trained["final"])
    state.stage = "vae"
    (tmp_path / "model" / "fold_0").mkdir(parents=True)
    save_checkpoint(state, tmp_path / "model" / "fold_0" / "checkpoint_final.pt")
    code = predict_main(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "model"),
                         "--device", "cpu"])
    assert code == 1 and "'vae' checkpoint" in capsys.readouterr().err
