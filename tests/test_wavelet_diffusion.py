"""Wavelet-domain diffusion (WDM/cWDM style): the Haar first stage, its trainer and prediction, on CPU."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import pywt
import SimpleITK as sitk
import torch

from conftest import PHANTOM_DIR, tiny_copy
from wldm_auto.cli.predict import main as predict_main
from wldm_auto.cli.train import main as train_main
from wldm_auto.io.geometry import Geometry
from wldm_auto.models.checkpoint import load_checkpoint
from wldm_auto.models.factory import build_schedule
from wldm_auto.models.latent import LatentSynthesizer
from wldm_auto.networks.haar import HaarFirstStage, haar_decode, haar_encode, pad_even
from wldm_auto.planners.planner import wavelet_unet_levels
from wldm_auto.planners.schema import DiffusionPlan, Plans
from wldm_auto.trainers.base import TrainerOptions
from wldm_auto.trainers.run import run_training


def test_haar_first_stage_stays_exact_inside_a_training_autocast():
    """A training step runs under bf16 autocast; the fixed Haar first stage must not (it rounded CT targets and
    decoded images to bf16: 5e-3 of the [-1, 1] range, ~10 HU)."""
    stage, x = HaarFirstStage(1), torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = stage.encode(x, "ct").mode()
        again = stage.decode(z, "ct")
    assert z.dtype == again.dtype == torch.float32
    assert torch.allclose(again, x, atol=1e-6)
    assert torch.equal(z, haar_encode(x)) and torch.equal(again, haar_decode(haar_encode(x)))


@pytest.mark.parametrize("shape", [(6, 10, 4), (12, 4, 8), (2, 2, 2)])
def test_haar_first_stage_round_trips_exactly_in_any_axis_order(shape):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *shape, generator=generator, dtype=torch.float64)
    z = haar_encode(x)
    assert z.shape == (2, 24, *(s // 2 for s in shape))
    assert torch.allclose(haar_decode(z), x, atol=1e-13, rtol=0)
    # band k of channel c is pywt's band k (low band divided by sqrt(8))
    keys = ["aaa", "aad", "ada", "add", "daa", "dad", "dda", "ddd"]
    reference = pywt.dwtn(x[1, 2].numpy(), "haar", axes=(0, 1, 2))
    for k, key in enumerate(keys):
        expected = reference[key] / (math.sqrt(8) if k == 0 else 1.0)
        np.testing.assert_allclose(z[1, k * 3 + 2].numpy(), expected, atol=1e-12)


def test_haar_low_band_is_the_block_mean_and_stays_in_range():
    x = torch.full((1, 1, 4, 4, 4), -0.75)
    z = haar_encode(x)
    assert torch.allclose(z[:, 0], torch.full_like(z[:, 0], -0.75))
    assert torch.count_nonzero(z[:, 1:]) == 0


def test_haar_first_stage_interface_and_flags():
    single, double = HaarFirstStage(1), HaarFirstStage(2)
    assert single.channels("mr") == 8 and single.channels("ct") == 8 and double.channels("mr") == 18
    mr = torch.rand(1, 2, 4, 6, 8)
    z = double.encode(mr, "mr", torch.tensor([1.0, 0.0])).mode()
    assert z.shape == (1, 18, 2, 3, 4)
    assert torch.count_nonzero(z[:, 1:16:2]) == 0  # sequence 1 missing: its sub-bands (band-major) are zero
    assert torch.count_nonzero(z[:, 0:16:2]) > 0
    assert torch.equal(z[:, 16], torch.ones_like(z[:, 16])) and torch.equal(z[:, 17], torch.zeros_like(z[:, 17]))
    ct = torch.rand(1, 1, 4, 6, 8, dtype=torch.float64)
    assert torch.allclose(single.decode(single.encode(ct, "ct").mode(), "ct"), ct, atol=1e-13)
    with pytest.raises(ValueError, match="CT coefficients"):
        single.decode(z, "ct")
    with pytest.raises(ValueError, match="decodes CT"):
        single.decode(z[:, :8], "mr")
    with pytest.raises(ValueError, match="mr input must be"):
        single.encode(mr, "mr")
    assert pad_even(torch.zeros(1, 1, 3, 4, 5), -1.0).shape == (1, 1, 4, 4, 6)


def test_whole_volume_haar_synthesis_returns_the_input_grid():
    """With an identity 'denoiser' predicting x0 = the MR's own sub-bands, sampling returns the MR (odd sizes)."""

    class CopyMR(torch.nn.Module):
        latent_channels, required_divisor = 8, 2

        def forward(self, x, t, cond):
            return cond

    plan = DiffusionPlan(first_stage="haar", prediction="x0", dsca=False, timesteps=50)
    synthesizer = LatentSynthesizer(HaarFirstStage(1), CopyMR(), build_schedule(plan), 1.0, [8, 8, 8])
    mr = torch.rand(1, 9, 11, 7) * 2 - 1
    out = synthesizer.sample(mr, steps=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 9, 11, 7)
    assert torch.allclose(out[0], mr[0], atol=1e-5)


def test_planner_fits_wdm_levels_to_the_patch():
    assert wavelet_unet_levels([128, 128, 128]) == 5
    assert wavelet_unet_levels([48, 64, 64]) == 4  # 24 divides by 8, not by 16
    assert wavelet_unet_levels([16, 16, 16]) == 4
    assert wavelet_unet_levels([6, 8, 8]) == 1


def test_default_plan_has_a_wavelet_section_and_rejects_dsca_with_haar(preprocessed_small, tmp_path, monkeypatch):
    plans = Plans.load(preprocessed_small.preprocessed / preprocessed_small.dataset / "plans.json")
    wavelet = plans.configuration("3d_wldm").wavelet_diffusion
    assert (wavelet.first_stage, wavelet.prediction, wavelet.dsca) == ("haar", "x0", False)
    assert wavelet.unet_channels[:3] == [64, 128, 128]
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    path = tmp_path / "pre" / dataset / "plans.json"
    data = json.loads(path.read_text())
    data["configurations"]["3d_wldm"]["wavelet_diffusion"]["dsca"] = True
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="set dsca to false"):
        run_training(dataset, "wavelet_diffusion", 0, options=TrainerOptions(device="cpu", num_workers=0, num_steps=1))


@pytest.fixture(scope="module")
def trained(preprocessed_small, tmp_path_factory):
    """The wavelet-domain model trained 8 steps from the command line (no VAE exists in this results folder)."""
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("wavelet")
    dataset = tiny_copy(preprocessed_small, root, monkeypatch)
    code = train_main([dataset, "wavelet_diffusion", "-f", "0", "--steps", "8", "--steps-per-epoch", "4",
                       "--device", "cpu", "--num-workers", "0"])
    assert code == 0
    model = root / "results" / dataset / "WaveletDiffusionTrainer__wldmPlans__3d_wldm"
    yield {"root": root, "dataset": dataset, "model": model, "mp": monkeypatch}
    monkeypatch.undo()


def test_wavelet_diffusion_trains_without_a_vae(trained):
    state = load_checkpoint(trained["model"] / "fold_0" / "checkpoint_final.pt")
    assert state["stage"] == "wavelet_diffusion" and state["step"] == 8
    assert set(state["networks"]) == {"unet", "ema"}
    assert state["first_stage"] == "haar" and state["latent_scale"] == 1.0
    assert state["networks"]["unet"]["stem.weight"].shape[1] == 16  # 8 noisy CT sub-bands + 8 MR sub-bands
    history = json.loads((trained["model"] / "fold_0" / "history.json").read_text())
    assert len(history) == 2 and all(np.isfinite(h["val_mae_ct_hu"]) for h in history)
    assert not (trained["root"] / "results" / trained["dataset"] / "VAETrainer__wldmPlans__3d_wldm").exists()


def test_wavelet_diffusion_loss_falls(preprocessed_small, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    final = run_training(dataset, "wavelet_diffusion", 0,
                         options=TrainerOptions(device="cpu", num_workers=0, num_steps=40, steps_per_epoch=20))
    history = json.loads((final.parent / "history.json").read_text())
    assert history[1]["train_loss"] < 0.8 * history[0]["train_loss"], history


def test_wavelet_diffusion_predicts_on_the_exact_input_grid(trained, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    mr = sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz"))
    crop = sitk.RegionOfInterest(mr, [97, 91, 41], [80, 80, 26])  # odd sizes
    sitk.WriteImage(crop, str(folder / "phantom_0000.mha"))
    out = tmp_path / "sct"
    code = predict_main(["-i", str(folder), "-o", str(out), "-d", trained["dataset"], "-tr",
                         "WaveletDiffusionTrainer", "--steps", "3", "--samples", "2", "--save-std",
                         "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    sct = sitk.ReadImage(str(out / "phantom.mha"))
    assert Geometry.of(sct) == Geometry.of(crop)  # .mha stores the geometry exactly
    array = sitk.GetArrayViewFromImage(sct)
    assert sct.GetPixelID() == sitk.sitkInt16
    assert array.min() >= -1024 and array.max() <= 3071 and (array > -1024).any()
    std = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "phantom_std.mha")))
    assert std.max() > 0
