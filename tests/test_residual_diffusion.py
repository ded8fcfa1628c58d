"""Residual diffusion on a regression prior: trainer, checkpoint, exact geometry, prior kept for r = 0 (CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import PHANTOM_DIR, tiny_copy, tiny_models
from wldm_auto.cli.predict import main as predict_main
from wldm_auto.io.geometry import Geometry
from wldm_auto.models.checkpoint import load_checkpoint
from wldm_auto.models.loading import build_synthesizer, load_synthesis_checkpoint
from wldm_auto.models.residual import ResidualSynthesizer
from wldm_auto.planners.schema import Plans
from wldm_auto.trainers.base import TrainerOptions
from wldm_auto.trainers.run import run_training


@pytest.fixture(scope="module")
def trained(preprocessed_small, tmp_path_factory):
    """Regression prior (4 steps) then residual diffusion (8 steps) on the small phantom dataset."""
    root = tmp_path_factory.mktemp("residual")
    with tiny_models(preprocessed_small, root, ("regression", "residual_diffusion")) as folders:
        yield {"root": root, "regression": folders["regression"], "model": folders["residual_diffusion"]}


def test_missing_prior_is_a_clear_error(preprocessed_small, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    with pytest.raises(FileNotFoundError, match="train the regression prior first"):
        run_training(dataset, "residual_diffusion", 0,
                     options=TrainerOptions(device="cpu", num_workers=0, num_steps=2, steps_per_epoch=1))


def test_checkpoint_embeds_prior_and_scales(trained):
    folder = trained["model"] / "fold_0"
    assert trained["model"].name == "ResidualDiffusionTrainer__wldmPlans__3d_wldm"
    state = load_checkpoint(folder / "checkpoint_final.pt")
    assert state["stage"] == "residual_diffusion" and state["step"] == 8
    assert set(state["networks"]) == {"unet", "ema", "prior"}  # Haar first stage: nothing to store
    prior = load_checkpoint(trained["regression"] / "fold_0" / "checkpoint_final.pt")
    for key, value in prior["networks"]["net"].items():
        assert torch.equal(value, state["networks"]["prior"][key]), key  # frozen: unchanged by training
    assert state["latent_scale"] == 1.0 and 0.1 < state["residual_scale"] < 1000.0
    history = json.loads((folder / "history.json").read_text())
    assert [h["step"] for h in history] == [4, 8]
    assert all(np.isfinite(h["val_mae_ct_hu"]) for h in history)
    # the denoiser sees [Haar(MR): 8 bands, Haar(prior): 8 bands] and predicts 8 CT bands
    assert state["networks"]["unet"]["stem.weight"].shape[1] == 8 + 8 + 8


def test_zero_residual_returns_the_prior_and_samples_differ(trained):
    stored = load_synthesis_checkpoint(trained["model"] / "fold_0" / "checkpoint_final.pt")
    config = Plans.from_dict(stored.plans).configuration("3d_wldm")
    synthesizer = build_synthesizer(stored, config, 0.5, torch.device("cpu"))
    assert isinstance(synthesizer, ResidualSynthesizer) and synthesizer.is_stochastic
    torch.manual_seed(0)
    mr = torch.rand(1, 14, 30, 26) * 2 - 1  # odd sizes: padded for the Haar transform and the U-Nets
    prior = synthesizer.prior.predict(mr)
    _, z_prior = synthesizer.condition(mr, prior)
    base = synthesizer.latent.decode_ct(z_prior, mr.shape[-3:])
    assert torch.allclose(base, prior, atol=1e-5)  # Haar: exact, so r = 0 gives the prior back
    generator = torch.Generator().manual_seed(1)
    samples = synthesizer.sample(mr, 3, num_samples=2, generator=generator)
    assert samples.shape == (2, 14, 30, 26) and torch.isfinite(samples).all()
    assert not torch.equal(samples[0], samples[1])


def test_predict_exact_geometry_with_std(trained, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    mr = sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz"))
    sitk.WriteImage(sitk.RegionOfInterest(mr, [97, 91, 41], [80, 80, 26]), str(inputs / "phantom_0000.nii.gz"))
    out = tmp_path / "sct"
    assert predict_main(["-i", str(inputs), "-o", str(out), "-m", str(trained["model"]), "--samples", "2",
                         "--steps", "2", "--save-std", "--device", "cpu"]) == 0
    reference = sitk.ReadImage(str(inputs / "phantom_0000.nii.gz"))
    sct, std = sitk.ReadImage(str(out / "phantom.nii.gz")), sitk.ReadImage(str(out / "phantom_std.nii.gz"))
    for image in (sct, std):
        assert Geometry.of(image).size == Geometry.of(reference).size
        assert Geometry.of(image).is_close(Geometry.of(reference), 1e-6)
    array = sitk.GetArrayViewFromImage(sct)
    assert array.min() >= -1024 and array.max() <= 3071 and (array > -1024).any()
    assert sitk.GetArrayViewFromImage(std).max() > 0


def test_posterior_mean_sct_does_not_depend_on_the_samples(trained, tmp_path):
    """The residual plan's sCT is prior + the denoiser's one-step clean estimate; the samples give only the std."""
    stored = load_synthesis_checkpoint(trained["model"] / "fold_0" / "checkpoint_final.pt")
    config = Plans.from_dict(stored.plans).configuration("3d_wldm")
    assert config.residual_diffusion.sct_estimate == "posterior_mean"  # the planner's default for this section
    synthesizer = build_synthesizer(stored, config, 0.5, torch.device("cpu"))
    torch.manual_seed(0)
    mr = torch.rand(1, 14, 30, 26) * 2 - 1
    estimate = synthesizer.mean_estimate(mr, torch.Generator().manual_seed(5))
    one_step = synthesizer.sample(mr, 1, num_samples=1, generator=torch.Generator().manual_seed(5))[0]
    assert torch.equal(estimate, one_step)
    synthesizer.latent.sct_estimate = "sample_mean"
    assert synthesizer.mean_estimate(mr) is None

    inputs = tmp_path / "in"
    inputs.mkdir()
    mr_image = sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz"))
    sitk.WriteImage(sitk.RegionOfInterest(mr_image, [97, 91, 41], [64, 64, 20]), str(inputs / "p.nii.gz"))
    arrays = {}
    for samples in ("2", "3"):
        out = tmp_path / f"s{samples}"
        assert predict_main(["-i", str(inputs), "-o", str(out), "-m", str(trained["model"]), "--samples", samples,
                             "--steps", "2", "--save-std", "--device", "cpu"]) == 0
        arrays[samples] = [sitk.GetArrayFromImage(sitk.ReadImage(str(out / n))) for n in ("p.nii.gz", "p_std.nii.gz")]
    assert np.array_equal(arrays["2"][0], arrays["3"][0])  # the same sCT whatever the number of samples
    out = tmp_path / "estimate_only"  # one sample, no std: the estimate alone, nothing sampled
    assert predict_main(["-i", str(inputs), "-o", str(out), "-m", str(trained["model"]), "--samples", "1",
                         "--steps", "2", "--device", "cpu"]) == 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "p.nii.gz"))), arrays["2"][0])
    assert not np.array_equal(arrays["2"][1], arrays["3"][1]) and arrays["3"][1].max() > 0  # the std from them


def test_out_of_fold_owners_map_each_training_case_to_the_fold_holding_it_out():
    from wldm_auto.trainers.residual_trainer import out_of_fold_owners

    splits = [{"train": ["b", "c"], "val": ["a"]}, {"train": ["a", "c"], "val": ["b"]},
              {"train": ["a", "b"], "val": ["c"]}]
    assert out_of_fold_owners(splits, 0) == {"b": 1, "c": 2}
    assert out_of_fold_owners(splits, 2) == {"a": 0, "b": 1}
    with pytest.raises(ValueError, match=r"no other fold of splits_final.json holds out c \(fold 0"):
        out_of_fold_owners([{"train": ["b", "c"], "val": ["a"]}, {"train": ["a", "c"], "val": ["b"]}], 0)


def test_each_patch_gets_the_prior_of_its_case():
    from types import SimpleNamespace

    from wldm_auto.trainers.residual_trainer import ResidualDiffusionTrainer

    class Offset(torch.nn.Module):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def forward(self, mr: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
            return mr[:, :1] + self.value

    own, one, two = Offset(0.0), Offset(1.0), Offset(2.0)
    trainer = SimpleNamespace(prior_net=own, case_priors={"b": one, "c": two})
    mr, available = torch.zeros(4, 1, 2, 2, 2), torch.ones(4, 1)
    prior = ResidualDiffusionTrainer.prior(trainer, mr, available, ["c", "b", "a", "c"])
    assert prior[:, 0, 0, 0, 0].tolist() == [2.0, 1.0, 0.0, 2.0]  # "a": no holder listed, the fold's own prior
    assert ResidualDiffusionTrainer.prior(trainer, mr, available, None).abs().max() == 0
    trainer.case_priors = {}
    assert ResidualDiffusionTrainer.prior(trainer, mr, available, ["b", "c", "b", "c"]).abs().max() == 0


def test_prior_blur_is_a_gaussian_in_mm_of_random_width():
    """plan residual_diffusion.prior_blur_mm: the training prior smoothed by a Gaussian of sigma uniform in
    [0, prior_blur_mm] mm, per axis in voxels of the plan's spacing (x y z), edges replicated."""
    from types import SimpleNamespace

    from scipy import ndimage

    from wldm_auto.trainers.residual_trainer import ResidualDiffusionTrainer

    trainer = SimpleNamespace(config=SimpleNamespace(spacing=[1.0, 2.0, 3.0]),
                              diffusion_plan=SimpleNamespace(prior_blur_mm=6.0))
    prior = torch.randn(2, 1, 20, 24, 28)
    torch.manual_seed(1)
    sigma_mm = float(torch.rand(())) * 6.0  # 4.5 mm: 4.5, 2.3 and 1.5 voxels along x, y, z
    torch.manual_seed(1)
    got = ResidualDiffusionTrainer.blurred(trainer, prior)
    expected = ndimage.gaussian_filter(prior.numpy(), [0, 0, sigma_mm / 3.0, sigma_mm / 2.0, sigma_mm / 1.0],
                                       mode="nearest", truncate=3.0)
    assert 0.5 < sigma_mm and np.abs(got.numpy() - expected).max() < 1e-5
    widths = set()
    for seed in range(20):  # a new width per batch
        torch.manual_seed(seed)
        widths.add(round(float(ResidualDiffusionTrainer.blurred(trainer, prior).std()), 4))
    assert len(widths) == 20


@pytest.mark.parametrize("blur_mm", [0.0, 6.0])
def test_training_latents_use_the_blurred_prior_only_when_asked(blur_mm):
    from types import SimpleNamespace

    from wldm_auto.trainers.residual_trainer import ResidualDiffusionTrainer

    mr, ct, available = torch.zeros(2, 1, 4, 4, 4), torch.full((2, 1, 4, 4, 4), 7.0), torch.ones(2, 1)
    trainer = SimpleNamespace(
        latent_scale=1.0, residual_scale=1.0, diffusion_plan=SimpleNamespace(prior_blur_mm=blur_mm),
        prior=lambda mr, available, cases: torch.ones_like(mr), blurred=lambda prior: prior + 4.0,
        ct_latent=lambda image: image, vae=SimpleNamespace(encode=lambda mr, name, available: SimpleNamespace(
            mode=lambda: mr)))
    residual, condition, (prior, _) = ResidualDiffusionTrainer.training_latents(trainer, mr, ct, available)
    base = 5.0 if blur_mm else 1.0
    assert prior.unique().tolist() == [base] and residual.unique().tolist() == [7.0 - base]
    assert condition[:, 1].unique().tolist() == [base]  # the denoiser sees the prior the residual is taken from


def test_out_of_fold_priors_need_the_other_folds_and_give_each_case_its_holder(preprocessed_small, tmp_path,
                                                                             monkeypatch):
    from wldm_auto.trainers.residual_trainer import out_of_fold_owners

    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    pre = tmp_path / "pre" / preprocessed_small.dataset
    plans = json.loads((pre / "plans.json").read_text())
    plans["configurations"]["3d_wldm"]["residual_diffusion"]["prior_folds"] = "out_of_fold"
    (pre / "plans.json").write_text(json.dumps(plans))
    splits = json.loads((pre / "splits_final.json").read_text())
    owners = out_of_fold_owners(splits, 0)
    assert owners and 0 not in owners.values()
    options = TrainerOptions(device="cpu", num_workers=0, num_steps=2, steps_per_epoch=1)
    run_training(dataset, "regression", 0, options=options)
    with pytest.raises(FileNotFoundError, match=r"missing fold\(s\) " + ", ".join(map(str, sorted(set(owners.values()))))
                       + r": wldm_train \S+ regression -f " + str(min(owners.values()))):
        run_training(dataset, "residual_diffusion", 0, options=options)
    for fold in sorted(set(owners.values())):
        run_training(dataset, "regression", fold, options=options)
    last = run_training(dataset, "residual_diffusion", 0, options=options)
    state = load_checkpoint(last.parent / "checkpoint_final.pt")
    assert state["prior_folds"] == "out_of_fold"
    assert {c: p.split("/")[-2] for c, p in state["case_prior_sources"].items()} == {
        c: f"fold_{f}" for c, f in owners.items()}
    own = load_checkpoint(last.parent.parent.parent / "RegressionTrainer__wldmPlans__3d_wldm" / "fold_0"
                          / "checkpoint_final.pt")
    for key, value in own["networks"]["net"].items():  # prediction keeps the fold's own prior
        assert torch.equal(value, state["networks"]["prior"][key]), key
