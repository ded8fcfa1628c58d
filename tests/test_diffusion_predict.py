"""Stage 2 and prediction end to end: tiny real networks on phantom data, CPU."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PHANTOM_DIR, TEST_DATA, oblique, tiny_copy
from wldm_auto.cli.predict import main as predict_main
from wldm_auto.io.geometry import Geometry
from wldm_auto.models.checkpoint import load_checkpoint
from wldm_auto.trainers.base import TrainerOptions
from wldm_auto.trainers.run import run_training


@pytest.fixture(scope="module")
def trained(preprocessed_small, tmp_path_factory):
    """VAE and diffusion model trained a few steps on the small phantom dataset."""
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("diffusion")
    dataset = tiny_copy(preprocessed_small, root, monkeypatch)
    options = TrainerOptions(device="cpu", num_workers=0, num_steps=8, steps_per_epoch=4)
    run_training(dataset, "vae", 0, options=options)
    final = run_training(dataset, "diffusion", 0, options=options)
    yield {"root": root, "dataset": dataset, "final": final, "model": final.parent.parent, "mp": monkeypatch}
    monkeypatch.undo()


def test_diffusion_training_writes_a_self_contained_model(trained):
    state = load_checkpoint(trained["final"])
    assert state["stage"] == "diffusion" and state["step"] == 8
    assert set(state["networks"]) == {"unet", "ema", "vae"}
    assert state["latent_scale"] > 0
    assert state["latent_shift"] == [0.0] * 4  # center_latents off by default: nothing subtracted
    history = json.loads((trained["final"].parent / "history.json").read_text())
    assert len(history) == 2
    assert all(np.isfinite(h["val_mae_ct_hu"]) and np.isfinite(h["train_loss"]) for h in history)
    assert (trained["model"] / "plans.json").is_file()


def test_prediction_settings_can_replace_those_stored_at_training(trained):
    import torch

    from wldm_auto.inference.folds import load_model
    from wldm_auto.planners.schema import InferencePlan

    stored = load_model(trained["model"], [0], torch.device("cpu"))[0]
    assert stored.synthesizer.latent_tile_scale == stored.plans.configuration("3d_wldm").inference.latent_tile_scale
    given = InferencePlan(ddim_steps=3, latent_tile_scale=3, latent_overlap=0.125, latent_margin=5, image_tile_scale=2)
    fold = load_model(trained["model"], [0], torch.device("cpu"), inference=given)[0]
    assert (fold.synthesizer.latent_tile_scale, fold.synthesizer.latent_overlap) == (3, 0.125)
    assert fold.synthesizer.latent_margin == 5
    assert fold.synthesizer.image_tile_scale == 2


def test_diffusion_needs_a_trained_vae(preprocessed_small, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    with pytest.raises(FileNotFoundError, match="train stage 1 first"):
        run_training(dataset, "diffusion", 0, options=TrainerOptions(device="cpu", num_workers=0, num_steps=2))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An input folder: a phantom crop (odd size, oblique), a real MR (.mha), a DICOM series, a 2D image."""
    folder = tmp_path_factory.mktemp("mr_in")
    mr = sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz"))
    crop = sitk.RegionOfInterest(mr, [97, 91, 41], [80, 80, 26])
    sitk.WriteImage(oblique(crop), str(folder / "phantom_0000.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(TEST_DATA / "totalsegmentator_examples" / "example_mr_sm.nii.gz")),
                    str(folder / "abdomen.mha"))
    shutil.copytree(TEST_DATA / "totalsegmentator_examples" / "example_ct_dicom", folder / "series")
    return folder


def test_predict_keeps_exact_geometry_and_writes_std(trained, inputs, tmp_path, capsys):
    out = tmp_path / "sct"
    code = predict_main(["-i", str(inputs), "-o", str(out), "-m", str(trained["model"]), "--steps", "3",
                         "--samples", "2", "--save-std", "--device", "cpu", "--seed", "7"])
    assert code == 0, capsys.readouterr().err
    for name, sct_name, source in (("phantom", "phantom.nii.gz", inputs / "phantom_0000.nii.gz"),
                                   ("abdomen", "abdomen.mha", inputs / "abdomen.mha"),
                                   ("series", "series.nii.gz", None)):
        reference = sitk.ReadImage(str(source)) if source else sitk.ReadImage(
            sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(inputs / "series")))
        sct = sitk.ReadImage(str(out / sct_name))
        assert sct.GetPixelID() == sitk.sitkInt16, name
        # exact size and spacing; NIfTI stores direction/origin in float32, hence 1e-6 (.mha is exact)
        assert Geometry.of(sct).size == Geometry.of(reference).size, name
        assert Geometry.of(sct).spacing == Geometry.of(reference).spacing, name
        assert Geometry.of(sct).is_close(Geometry.of(reference), 1e-6), name
        if sct_name.endswith(".mha"):
            assert Geometry.of(sct) == Geometry.of(reference), name
        array = sitk.GetArrayViewFromImage(sct)
        assert array.min() >= -1024 and array.max() <= 3071, name
        assert (array == -1024).any() and (array > -1024).any(), name  # body inside, air outside
        std = sitk.ReadImage(str(out / sct_name.replace(".", "_std.", 1)))
        assert Geometry.of(std).is_close(Geometry.of(reference), 1e-6)
        assert sitk.GetArrayViewFromImage(std).max() > 0
    again = predict_main(["-i", str(inputs), "-o", str(out), "-m", str(trained["model"]), "--steps", "3",
                          "--device", "cpu"])
    assert again == 1 and "--continue" in capsys.readouterr().err
    skipped = predict_main(["-i", str(inputs), "-o", str(out), "-m", str(trained["model"]), "--steps", "3",
                            "--device", "cpu", "--continue"])
    assert skipped == 0 and "3 skipped" in capsys.readouterr().out


def test_same_seed_same_prediction(trained, inputs, tmp_path):
    single = tmp_path / "in"
    single.mkdir()
    shutil.copy(inputs / "abdomen.mha", single / "abdomen.mha")
    results = []
    for run in ("a", "b"):
        assert predict_main(["-i", str(single), "-o", str(tmp_path / run), "-m", str(trained["model"]),
                             "--steps", "3", "--device", "cpu", "--seed", "3"]) == 0
        results.append(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / run / "abdomen.mha"))))
    assert np.array_equal(*results)


def test_bad_inputs_fail_by_name_and_others_finish(trained, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(TEST_DATA / "totalsegmentator_examples" / "example_mr_sm.nii.gz")),
                    str(folder / "good.nii.gz"))
    sitk.WriteImage(sitk.Image([20, 20], sitk.sitkFloat32), str(folder / "flat.nii.gz"))
    (folder / "broken.nii.gz").write_bytes(b"not an image")
    code = predict_main(["-i", str(folder), "-o", str(tmp_path / "out"), "-m", str(trained["model"]),
                         "--steps", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert "flat" in err and "3D" in err and "broken" in err
    assert (tmp_path / "out" / "good.nii.gz").is_file()


def test_model_folder_without_final_checkpoint(trained, tmp_path, capsys):
    model = tmp_path / "model"
    (model / "fold_0").mkdir(parents=True)
    code = predict_main(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(model), "--device", "cpu"])
    assert code == 1 and "checkpoint_final.pt" in capsys.readouterr().err
