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


def test_error_head_sees_the_features_but_cannot_change_them() -> None:
    """The error head is built last and reads detached features: same sCT head, no gradient into the trunk."""
    from dataclasses import replace

    from wldm_auto.trainers.losses import laplace_nll

    torch.manual_seed(0)
    plain = build_regression_unet(1, TINY)
    torch.manual_seed(0)
    headed = build_regression_unet(1, replace(TINY, error_head=True))
    x = torch.randn(2, 1, 8, 12, 16)
    both = headed(x, with_error=True)
    assert both.shape == (2, 2, 8, 12, 16)
    assert torch.equal(plain(x), headed(x)) and torch.equal(both[:, :1], plain(x))
    laplace_nll(both[:, 1:], torch.rand(2, 1, 8, 12, 16), torch.ones(2, 1, 8, 12, 16)).backward()
    head = {id(p) for p in headed.error_head.parameters()}
    # (the cat passes zeros back through the sCT head, so its parameters get gradients of exactly 0)
    assert all(p.grad is None or not p.grad.any() for p in headed.parameters() if id(p) not in head)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in headed.error_head.parameters())
    with pytest.raises(ValueError, match="error_head"):
        plain(x, with_error=True)
    # the synthesizer: one pass gives the sCT and sqrt(2) * b, positive
    synthesizer = RegressionSynthesizer(headed.eval(), [8, 8, 16], overlap=0.5)
    assert synthesizer.predicts_std and not RegressionSynthesizer(plain, [8, 8, 16]).predicts_std
    mr = torch.rand(1, 13, 22, 30) * 2 - 1
    draws, std = synthesizer.sample_with_std(mr, num_samples=2)
    assert draws.shape == (2, 13, 22, 30) and std.shape == (13, 22, 30) and float(std.min()) > 0
    assert torch.equal(draws[0], synthesizer.predict(mr))
    assert torch.equal(draws[0], RegressionSynthesizer(plain.eval(), [8, 8, 16], overlap=0.5).predict(mr))


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
    with caplog.at_level(logging.INFO, logger="wldm_auto.inference"):
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
    with caplog.at_level(logging.INFO, logger="wldm_auto.inference"):
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


def test_new_plans_have_an_error_head_and_older_plans_do_not(preprocessed_small):
    """The planner writes error_head true; a plan written before the key existed still means no head."""
    from wldm_auto.planners.schema import parse_section

    plans = json.loads((preprocessed_small.preprocessed / preprocessed_small.dataset / "plans.json").read_text())
    section = plans["configurations"]["3d_wldm"]["regression"]
    assert section["error_head"] is True
    older = {k: v for k, v in section.items() if k != "error_head"}
    assert parse_section(RegressionPlan, older, "x.regression").error_head is False
    # the std maps' edge term likewise: written by the planner, absent from older plans
    from wldm_auto.planners.recipe import EDGE_STD_MM
    from wldm_auto.planners.schema import InferencePlan

    inference = plans["configurations"]["3d_wldm"]["inference"]
    assert inference["edge_std_mm"] == EDGE_STD_MM > 0
    older = {k: v for k, v in inference.items() if k != "edge_std_mm"}
    assert parse_section(InferencePlan, older, "x.inference").edge_std_mm == 0.0


@pytest.fixture(scope="module")
def trained_with_error_head(preprocessed_small, tmp_path_factory):
    """The same 40 steps with the plan's ``regression.error_head`` on."""
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("regression_error_head")
    dataset = tiny_copy(preprocessed_small, root, monkeypatch)
    plans_path = root / "pre" / dataset / "plans.json"
    plans = json.loads(plans_path.read_text())
    plans["configurations"]["3d_wldm"]["regression"]["error_head"] = True
    plans_path.write_text(json.dumps(plans))
    final = run_training(dataset, "regression", 0,
                         options=TrainerOptions(device="cpu", num_workers=0, num_steps=40, steps_per_epoch=10))
    yield {"final": final, "model": final.parent.parent}
    monkeypatch.undo()


def test_error_head_trains_beside_an_unchanged_sct_head(trained, trained_with_error_head):
    """Same seed and steps: the sCT head's weights equal the plain model's bit for bit (the head has its
    own gradient clipping); the head's likelihood loss falls."""
    plain = load_checkpoint(trained["final"])["networks"]["net"]
    headed = load_checkpoint(trained_with_error_head["final"])
    weights = headed["networks"]["net"]
    assert set(weights) - set(plain) and all(k.startswith("error_head.") for k in set(weights) - set(plain))
    for key, value in plain.items():
        assert torch.equal(value, weights[key]), key
    nll = [h["train_error_nll"] for h in headed["history"]]
    assert nll[-1] < nll[0], nll
    assert [h["val_mae_ct_hu"] for h in headed["history"]] == \
        [h["val_mae_ct_hu"] for h in load_checkpoint(trained["final"])["history"]]


def test_error_head_writes_a_std_map_from_one_pass(trained, trained_with_error_head, tmp_path):
    """One fold, no mirroring: a std map (sqrt(2) b in HU) with the MR's geometry, and the plain sCT."""
    from wldm_auto import Predictor

    inputs = tmp_path / "in"
    inputs.mkdir()
    mr = sitk.RegionOfInterest(sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz")), [97, 91, 41], [64, 64, 20])
    sitk.WriteImage(mr, str(inputs / "p.nii.gz"))
    for name, model in (("plain", trained["model"]), ("headed", trained_with_error_head["model"])):
        assert predict_main(["-i", str(inputs), "-o", str(tmp_path / name), "-m", str(model), "--save-std",
                             "--device", "cpu"]) == 0
    assert not (tmp_path / "plain" / "p_std.nii.gz").exists()
    sct, std = (sitk.ReadImage(str(tmp_path / "headed" / n)) for n in ("p.nii.gz", "p_std.nii.gz"))
    assert Geometry.of(std).size == Geometry.of(mr).size and Geometry.of(std).is_close(Geometry.of(mr), 1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(sct),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain" / "p.nii.gz"))))
    body = sitk.GetArrayViewFromImage(sct) > -1024
    spread = sitk.GetArrayViewFromImage(std)
    assert spread[body].min() > 0 and np.all(spread[~body] == 0)
    assert 1 < np.median(spread[body]) < 4095  # HU, between nothing and the whole CT window
    predictor = Predictor.from_model_folder(trained_with_error_head["model"], device="cpu")
    result = predictor.predict(mr)
    assert result.draws == 1 and np.array_equal(sitk.GetArrayFromImage(result.std), sitk.GetArrayFromImage(std))
    # with mirroring: the mirrorings' spread and the head's std (averaged over them) add in variance
    mirrored = Predictor.from_model_folder(trained_with_error_head["model"], device="cpu", mirror_axes=[2]).predict(mr)
    assert mirrored.draws == 2
    mirrored_std = sitk.GetArrayViewFromImage(mirrored.std)
    assert mirrored_std[body].min() > 0 and not np.array_equal(mirrored_std, spread)


def test_edge_term_widens_the_std_along_edges_only(trained_with_error_head, tmp_path, capsys):
    """``edge_std_mm`` (plan, ``Predictor``, ``wldm_predict --edge-std-mm``): the std map gains edge_mm x the sCT's
    smoothed gradient in variance; the sCT and the std away from edges stay as they were."""
    from wldm_auto import Predictor

    mr = sitk.RegionOfInterest(sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz")), [97, 91, 41], [64, 64, 20])
    model = trained_with_error_head["model"]
    plain, edged = (Predictor.from_model_folder(model, device="cpu", progress=False, edge_std_mm=mm).predict(mr)
                    for mm in (0.0, 4.0))
    assert np.array_equal(sitk.GetArrayFromImage(plain.sct), sitk.GetArrayFromImage(edged.sct))
    before, after = (sitk.GetArrayFromImage(r.std).astype(np.float64) for r in (plain, edged))
    body = sitk.GetArrayViewFromImage(plain.sct) > -1024
    assert np.all(after >= before - 1e-3)
    added = np.sqrt(np.clip(after ** 2 - before ** 2, 0, None))[body]
    sct = sitk.GetArrayFromImage(plain.sct).astype(np.float64)
    steep = np.sqrt(sum(g ** 2 for g in np.gradient(sct)))[body]
    # the term goes where the sCT is steep: the steepest tenth of the body gets several times the flattest's
    order = np.argsort(steep)
    tenth = len(order) // 10
    assert added[order[-tenth:]].mean() > 3 * added[order[:tenth]].mean() > 0
    # the command line gives the API's map; a negative length is refused by name
    inputs = tmp_path / "in"
    inputs.mkdir()
    sitk.WriteImage(mr, str(inputs / "p.nii.gz"))
    assert predict_main(["-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(model), "--save-std",
                         "--device", "cpu", "--edge-std-mm", "4"]) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "p_std.nii.gz"))),
                                  sitk.GetArrayFromImage(edged.std))
    capsys.readouterr()
    assert predict_main(["-i", str(inputs), "-o", str(tmp_path / "bad"), "-m", str(model), "--save-std",
                         "--device", "cpu", "--edge-std-mm", "-1"]) == 1
    assert "--edge-std-mm must be a length >= 0" in capsys.readouterr().err


def test_prediction_rejects_other_stages(trained, tmp_path, capsys):
    state = load_checkpoint(trained["final"])
    state.stage = "vae"
    (tmp_path / "model" / "fold_0").mkdir(parents=True)
    save_checkpoint(state, tmp_path / "model" / "fold_0" / "checkpoint_final.pt")
    code = predict_main(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "model"),
                         "--device", "cpu"])
    assert code == 1 and "'vae' checkpoint" in capsys.readouterr().err


def test_prediction_settings_are_read_from_the_model_folders_plans(trained, tmp_path, caplog):
    """The model folder's plans.json ``inference`` section (prediction settings) may be edited after training and
    is what prediction uses; another model's plan is not used; an unreadable one is named (once)."""
    import shutil

    from wldm_auto.inference.folds import draws_per_sample, load_model

    model = tmp_path / "model"
    shutil.copytree(trained["model"], model)
    fold = load_model(model, [0], torch.device("cpu"))[0]
    assert fold.plans.configuration("3d_wldm").inference.mirror_axes == [] and draws_per_sample(fold) == 1
    plans = json.loads((model / "plans.json").read_text())
    plans["configurations"]["3d_wldm"]["inference"].update(mirror_axes=[2], ddim_steps=7)
    (model / "plans.json").write_text(json.dumps(plans))
    fold = load_model(model, [0], torch.device("cpu"))[0]
    inference = fold.plans.configuration("3d_wldm").inference
    assert inference.mirror_axes == [2] and inference.ddim_steps == 7 and draws_per_sample(fold) == 2
    # an explicit argument still wins over the folder's setting
    assert draws_per_sample(load_model(model, [0], torch.device("cpu"), mirror_axes=[])[0]) == 1
    # another model's plan (here: another dataset) is not taken for this one's
    (model / "plans.json").write_text(json.dumps({**plans, "dataset_name": "Dataset999_Other"}))
    with caplog.at_level(logging.WARNING, logger="wldm_auto.inference"):
        fold = load_model(model, [0], torch.device("cpu"))[0]
    assert draws_per_sample(fold) == 1 and "is not the plan this checkpoint was trained with" in caplog.text
    (model / "plans.json").write_text("{")
    with pytest.raises(ValueError, match="plans.json") as error:
        load_model(model, [0], torch.device("cpu"))
    assert str(error.value).count("plans.json") == 1


def test_more_folds_train_after_an_edit_of_the_prediction_settings_only(preprocessed_small, tmp_path, monkeypatch):
    """An edit of the preprocessed plans' ``inference`` section does not block training another fold (it does not
    change what is trained); an edit of a training setting still does."""
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    options = TrainerOptions(device="cpu", num_workers=0, num_steps=2, steps_per_epoch=2)
    run_training(dataset, "regression", 0, options=options)
    plans_path = tmp_path / "pre" / dataset / "plans.json"
    plans = json.loads(plans_path.read_text())
    plans["configurations"]["3d_wldm"]["inference"]["ddim_steps"] = 9
    plans_path.write_text(json.dumps(plans))
    assert run_training(dataset, "regression", 1, options=options).is_file()
    plans["configurations"]["3d_wldm"]["regression"]["bone_weight"] = 2.0
    plans_path.write_text(json.dumps(plans))
    with pytest.raises(ValueError, match="differs from the plans this model was trained with"):
        run_training(dataset, "regression", 2, options=options)
    assert not (tmp_path / "results" / dataset / "RegressionTrainer__wldmPlans__3d_wldm" / "fold_2").exists()
