"""The Python prediction API (``wldm_auto.Predictor``): same voxels as ``wldm_predict``, exact geometry, no files."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import PHANTOM_DIR, TEST_DATA, oblique, tiny_copy, tiny_models
from wldm_auto.cli.predict import main as predict_main
from wldm_auto.dataset_conversion.example import derived_sequence
from wldm_auto.trainers.base import TrainerOptions
from wldm_auto.trainers.run import run_training


def geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


@pytest.fixture(scope="module")
def models(preprocessed_small, tmp_path_factory):
    """A diffusion model (VAE + diffusion, 8 steps each) and a regression model (4 steps), one fold each."""
    with tiny_models(preprocessed_small, tmp_path_factory.mktemp("api_models"),
                     ("vae", "diffusion", "regression")) as folders:
        yield {"diffusion": folders["diffusion"], "regression": folders["regression"]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An oblique, odd-sized phantom crop (.mha: geometry stored exactly) and a DICOM series folder."""
    folder = tmp_path_factory.mktemp("api_in")
    mr = sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz"))
    sitk.WriteImage(oblique(sitk.RegionOfInterest(mr, [97, 91, 41], [80, 80, 26])), str(folder / "phantom.mha"))
    shutil.copytree(TEST_DATA / "totalsegmentator_examples" / "example_ct_dicom", folder / "series")
    return folder


def read_series(folder: Path) -> sitk.Image:
    return sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))


def run_cli(inputs: Path, out: Path, model: Path, *extra: str) -> None:
    code = predict_main(["-i", str(inputs), "-o", str(out), "-m", str(model), "--device", "cpu",
                         "--file-ending", ".mha", *extra])
    assert code == 0


@pytest.mark.parametrize("samples", [1, 2])
def test_diffusion_api_equals_cli_bit_for_bit(models, inputs, tmp_path, samples):
    from wldm_auto import Prediction, Predictor

    out = tmp_path / "sct"
    run_cli(inputs, out, models["diffusion"], "--steps", "2", "--samples", str(samples), "--seed", "5",
            "--save-std")
    predictor = Predictor.from_model_folder(models["diffusion"], folds=(0,), device="cpu")
    for name, image in (("phantom", sitk.ReadImage(str(inputs / "phantom.mha"))), ("series", inputs / "series")):
        result = predictor.predict(image, steps=2, samples=samples, seed=5)
        assert isinstance(result, Prediction)
        cli = sitk.ReadImage(str(out / f"{name}.mha"))
        assert result.sct.GetPixelID() == sitk.sitkInt16 == cli.GetPixelID()
        assert geometry(result.sct) == geometry(cli)
        assert np.array_equal(sitk.GetArrayViewFromImage(result.sct), sitk.GetArrayViewFromImage(cli)), name
        assert (sitk.GetArrayViewFromImage(result.sct) == -1024).any()
        if samples == 1:
            assert result.std is None and not (out / f"{name}_std.mha").exists()
        else:
            cli_std = sitk.ReadImage(str(out / f"{name}_std.mha"))
            assert result.std.GetPixelID() == sitk.sitkFloat32
            assert geometry(result.std) == geometry(cli_std)
            std = sitk.GetArrayViewFromImage(result.std)
            assert np.array_equal(std, sitk.GetArrayViewFromImage(cli_std)), name
            assert std.max() > 0 and std.min() == 0.0  # spread inside the body, 0 outside
    # another seed is another draw: the comparison above can fail
    other = predictor.predict(inputs / "series", steps=2, samples=samples, seed=6)
    assert not np.array_equal(sitk.GetArrayViewFromImage(other.sct),
                              sitk.GetArrayViewFromImage(sitk.ReadImage(str(out / "series.mha"))))


def test_samples_default_to_the_plans_inference_samples(models, inputs, tmp_path, monkeypatch):
    """No ``samples`` / ``--samples``: the plan's ``inference.samples`` (1 as planned; here set to 2)."""
    from wldm_auto import Predictor
    from wldm_auto.inference import predictor as module

    predictor = Predictor.from_model_folder(models["diffusion"], folds=(0,), device="cpu")
    fold = predictor.folds[0]
    inference = fold.plans.configuration(fold.configuration).inference
    assert inference.samples == 1 and module.plan_samples(predictor.folds) == 1
    assert predictor.predict(inputs / "phantom.mha", steps=2, seed=5).std is None
    inference.samples = 2
    planned = predictor.predict(inputs / "phantom.mha", steps=2, seed=5)
    explicit = predictor.predict(inputs / "phantom.mha", steps=2, samples=2, seed=5)
    assert planned.std is not None
    for a, b in ((planned.sct, explicit.sct), (planned.std, explicit.std)):
        assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))

    original = module.plan_samples

    def plan_says_two(folds, samples=None):  # the CLI reads the same plan field through the same function
        for loaded in folds:
            loaded.plans.configuration(loaded.configuration).inference.samples = 2
        return original(folds, samples)

    monkeypatch.setattr(module, "plan_samples", plan_says_two)
    out = tmp_path / "sct"
    run_cli(inputs, out, models["diffusion"], "--steps", "2", "--seed", "5", "--save-std")
    for name, image in (("phantom.mha", explicit.sct), ("phantom_std.mha", explicit.std)):
        assert np.array_equal(sitk.GetArrayViewFromImage(sitk.ReadImage(str(out / name))),
                              sitk.GetArrayViewFromImage(image)), name


def test_regression_api_equals_cli_and_folds_give_std(models, inputs, tmp_path):
    from wldm_auto import Predictor

    out = tmp_path / "sct"
    run_cli(inputs, out, models["regression"], "--samples", "2", "--save-std")
    predictor = Predictor.from_model_folder(models["regression"], device="cpu")
    result = predictor.predict(inputs / "phantom.mha", samples=2)
    cli = sitk.ReadImage(str(out / "phantom.mha"))
    assert np.array_equal(sitk.GetArrayViewFromImage(result.sct), sitk.GetArrayViewFromImage(cli))
    assert geometry(result.sct) == geometry(cli)
    assert result.std is None and not (out / "phantom_std.mha").exists()  # deterministic, one fold
    # two folds (here the same weights twice): a std map, zero everywhere, and the same mean
    model = tmp_path / "two_folds"
    shutil.copytree(models["regression"], model)
    shutil.copytree(model / "fold_0", model / "fold_1")
    # (the plan's edge term off: it alone makes the map non-zero along the sCT's edges)
    both = Predictor.from_model_folder(model, folds=(0, 1), device="cpu", edge_std_mm=0).predict(inputs / "phantom.mha")
    assert both.std is not None and geometry(both.std) == geometry(cli)
    assert float(sitk.GetArrayViewFromImage(both.std).max()) == 0.0
    assert np.array_equal(sitk.GetArrayViewFromImage(both.sct), sitk.GetArrayViewFromImage(result.sct))
    run_cli(inputs, tmp_path / "sct2", model, "-f", "0", "1", "--save-std", "--edge-std-mm", "0")
    assert np.array_equal(sitk.GetArrayViewFromImage(both.std),
                          sitk.GetArrayViewFromImage(sitk.ReadImage(str(tmp_path / "sct2" / "phantom_std.mha"))))


def test_geometry_is_the_inputs_for_image_path_and_array(models, inputs):
    from wldm_auto import Predictor

    predictor = Predictor.from_model_folder(models["regression"], device="cpu", progress=False)
    image = sitk.ReadImage(str(inputs / "phantom.mha"))
    assert image.GetPixelID() != sitk.sitkFloat32  # the API casts as wldm_predict does
    array = sitk.GetArrayFromImage(image)
    kept = array.copy()
    results = {
        "image": predictor.predict(image),
        "path": predictor.predict(str(inputs / "phantom.mha")),
        "array": predictor.predict(array, spacing=image.GetSpacing(), origin=image.GetOrigin(),
                                   direction=image.GetDirection()),
    }
    assert array.shape == (41, 91, 97) and np.array_equal(array, kept)  # (z, y, x), not modified
    for how, result in results.items():
        assert result.sct.GetPixelID() == sitk.sitkInt16, how
        assert geometry(result.sct) == geometry(image), how
        assert result.std is None, how
    reference = sitk.GetArrayViewFromImage(results["image"].sct)
    assert reference.min() == -1024 and reference.max() > -1024
    for how in ("path", "array"):
        assert np.array_equal(sitk.GetArrayViewFromImage(results[how].sct), reference), how
    # a DICOM series folder, and an array without origin/direction (defaults: 0 and identity)
    series = predictor.predict(inputs / "series")
    assert geometry(series.sct) == geometry(read_series(inputs / "series"))
    plain = predictor.predict(array, spacing=(2.0, 2.0, 3.0))
    assert geometry(plain.sct) == ((97, 91, 41), (2.0, 2.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def one_line_value_error(call, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_bad_inputs_are_one_line_value_errors(models, inputs, tmp_path):
    from wldm_auto import Predictor

    predictor = Predictor.from_model_folder(models["regression"], device="cpu", progress=False)
    volume = np.ones((8, 8, 8), np.float32)
    one_line_value_error(lambda: predictor.predict(sitk.Image([20, 20], sitk.sitkFloat32)), "expected a 3D image, got 2D")
    one_line_value_error(lambda: predictor.predict(np.ones((20, 20))), r"expected a 3D array in \(z, y, x\) order, got 2D")
    one_line_value_error(lambda: predictor.predict(np.ones((2, 8, 8, 8)), spacing=(1, 1, 1)), "got 4D")
    one_line_value_error(lambda: predictor.predict(volume), "a NumPy array needs spacing")
    one_line_value_error(lambda: predictor.predict(volume, spacing=(1, 1)), "spacing must be 3 finite numbers")
    one_line_value_error(lambda: predictor.predict(volume, spacing=(1, 0, 1)), "must be positive")
    one_line_value_error(lambda: predictor.predict(volume.astype(bool), spacing=(1, 1, 1)), "numeric")
    one_line_value_error(lambda: predictor.predict(sitk.ReadImage(str(inputs / "phantom.mha")), spacing=(1, 1, 1)),
                         "NumPy arrays only")
    missing = tmp_path / "nowhere" / "mr.nii.gz"
    assert one_line_value_error(lambda: predictor.predict(missing), "file not found").startswith(str(missing))
    one_line_value_error(lambda: predictor.predict(tmp_path), "no DICOM series found")  # a folder, not DICOM
    nan = np.full((8, 8, 8), np.nan, np.float32)
    one_line_value_error(lambda: predictor.predict(nan, spacing=(1, 1, 1)), "NaN/inf")
    one_line_value_error(lambda: predictor.predict({3: volume}, spacing=(1, 1, 1)), "0003 .* unknown to the model")
    one_line_value_error(lambda: predictor.predict({"T1": volume}, spacing=(1, 1, 1)), r"'T1': not a channel.*0 \(MR\)")
    one_line_value_error(lambda: predictor.predict([]), "no MR image given")
    one_line_value_error(lambda: predictor.predict(inputs / "phantom.mha", samples=0), "at least 1")
    one_line_value_error(lambda: predictor.predict(volume, spacing=(1, 1, 1), eta=float("nan")), "eta must be a finite")
    one_line_value_error(lambda: predictor.predict(volume, spacing=(1, 1, 1), seed=1.5), "seed must be a whole number")
    one_line_value_error(lambda: predictor.predict(volume, spacing=(1, 1, 1), seed=2**70), "seed must be a whole")
    one_line_value_error(lambda: predictor.predict(volume, spacing=(1, 1, 1), direction=(2, 0, 0, 0, 2, 0, 0, 0, 2)),
                         "not orthonormal")
    one_line_value_error(lambda: predictor.predict(sitk.Image([8, 8, 8], sitk.sitkComplexFloat32)),
                         "expected real voxel values")
    one_line_value_error(lambda: Predictor.from_model_folder(models["regression"], device="cpu", overlap=1.0),
                         r"overlap must be in \[0, 1\)")
    one_line_value_error(lambda: Predictor.from_model_folder(tmp_path / "no_model", device="cpu"),
                         "model folder not found")
    one_line_value_error(lambda: Predictor.from_model_folder(models["regression"], folds=(3,), device="cpu"),
                         "fold_3.*not found")
    one_line_value_error(lambda: Predictor.from_model_folder(models["regression"], device="gpu"),
                         "use 'auto', 'cpu' or 'cuda'")
    if not torch.cuda.is_available():
        one_line_value_error(lambda: Predictor.from_model_folder(models["regression"], device="cuda"),
                             "no CUDA device is available")
        assert Predictor.from_model_folder(models["regression"], device="auto").device == torch.device("cpu")


def listing(*folders: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for folder in folders for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(("option", "message"), [(["--eta", "nan"], "--eta must be a finite number"),
                                               (["--eta", "inf"], "--eta must be a finite number"),
                                               (["--overlap", "1.0"], r"--overlap must be in \[0, 1\)"),
                                               (["--overlap", "nan"], r"--overlap must be in \[0, 1\)")])
def test_cli_refuses_bad_sampling_settings_before_creating_anything(models, inputs, tmp_path, capsys, option,
                                                                    message):
    """--eta nan used to give an sCT of 0 HU in the whole body (and exit 0); a bad --overlap was silently ignored
    (diffusion) or failed every case after the output folder was made (regression)."""
    out = tmp_path / "sct"
    code = predict_main(["-i", str(inputs), "-o", str(out), "-m", str(models["diffusion"]), "--device", "cpu",
                         *option])
    assert code == 1 and not out.exists() and not (tmp_path / "sct_logs").exists()
    assert re.search(message, capsys.readouterr().err)


def test_cli_names_an_output_path_that_is_a_file(models, inputs, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert predict_main(["-i", str(inputs), "-o", str(afile), "-m", str(models["regression"]), "--device", "cpu"]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err and afile.read_text() == "keep me"


def test_non_finite_sct_is_never_written_as_water():
    from wldm_auto.inference.export import hu_int16

    image = sitk.GetImageFromArray(np.full((4, 4, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="64 NaN/inf voxels"):
        hu_int16(image, (-1024.0, 3071.0))


def test_half_precision_and_big_endian_arrays_predict_like_float32(models, inputs):
    """float16 and big-endian arrays are no SimpleITK pixel types: they are read as float32, like any array."""
    from wldm_auto import Predictor

    predictor = Predictor.from_model_folder(models["regression"], device="cpu", progress=False)
    mr = sitk.ReadImage(str(inputs / "phantom.mha"))
    array = np.clip(np.round(sitk.GetArrayFromImage(mr)), 0, 2048).astype(np.float32)  # exact in float16
    geometry = dict(spacing=mr.GetSpacing(), origin=mr.GetOrigin(), direction=mr.GetDirection())
    reference = sitk.GetArrayFromImage(predictor.predict(array, **geometry).sct)
    for variant in (array.astype(np.float16), array.astype(">f4")):
        got = sitk.GetArrayFromImage(predictor.predict(variant, **geometry).sct)
        assert np.array_equal(got, reference), variant.dtype


def test_prediction_writes_no_file(models, inputs, tmp_path, monkeypatch):
    from wldm_auto import Predictor
    from wldm_auto.inference import export, predictor as predictor_module
    from wldm_auto.io import images

    monkeypatch.chdir(tmp_path)
    loaded = Predictor.from_model_folder(models["diffusion"], device="cpu", progress=False)
    before = listing(tmp_path, inputs, models["diffusion"])

    def refuse(*args, **kwargs):
        raise AssertionError("the API wrote a file")

    for module, name in ((sitk, "WriteImage"), (images, "write_image"), (predictor_module, "write_image"),
                         (predictor_module, "write_dicom_series"), (export, "write_dicom_series"),
                         (np, "save"), (torch, "save")):
        monkeypatch.setattr(module, name, refuse)
    result = loaded.predict(inputs / "phantom.mha", steps=2, samples=2, seed=1)
    assert result.sct.GetSize() == (97, 91, 41) and result.std is not None
    assert listing(tmp_path, inputs, models["diffusion"]) == before


def test_cli_runs_the_same_per_case_function(models, inputs, tmp_path, monkeypatch):
    from wldm_auto.inference import api, predictor

    assert api.synthesize is predictor.synthesize
    calls = []
    original = predictor.synthesize

    def counting(*args, **kwargs):
        calls.append(sorted(args[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr(predictor, "synthesize", counting)
    run_cli(inputs, tmp_path / "sct", models["regression"])
    assert calls == [[0], [0]]  # phantom and series, one call each


def test_import_is_cheap():
    code = "import sys, wldm_auto; print('torch' in sys.modules, 'Predictor' in dir(wldm_auto))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", check=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.stdout.split() == ["False", "True"]
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        import wldm_auto

        wldm_auto.Nothing  # noqa: B018


@pytest.fixture(scope="module")
def two_sequence_model(preprocessed_two_sequences, tmp_path_factory):
    """A regression model of two sequences (T2, T2sqrt) trained 2 steps, and its inputs."""
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("api_two")
    dataset = tiny_copy(preprocessed_two_sequences, root, monkeypatch)
    final = run_training(dataset, "regression", 0, options=TrainerOptions(device="cpu", num_workers=0, num_steps=2))
    crop = sitk.RegionOfInterest(sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz")), [97, 91, 41], [80, 80, 26])
    yield final.parent.parent, crop, derived_sequence(crop)
    monkeypatch.undo()


def test_several_sequences_as_list_or_dict_like_the_cli(two_sequence_model, tmp_path):
    from wldm_auto import Predictor

    model, t2, second = two_sequence_model
    folder = tmp_path / "in"
    folder.mkdir()
    sitk.WriteImage(t2, str(folder / "both_0000.mha"))
    sitk.WriteImage(second, str(folder / "both_0001.mha"))
    sitk.WriteImage(second, str(folder / "sqrtonly_0001.mha"))
    t2, second = (sitk.ReadImage(str(folder / f"both_{c:04d}.mha")) for c in (0, 1))  # what the CLI reads
    run_cli(folder, tmp_path / "sct", model)
    predictor = Predictor.from_model_folder(model, device="cpu", progress=False)
    assert predictor.mr_channels == 2 and predictor.channel_names == {0: "T2", 1: "T2sqrt"}
    cli = {name: sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "sct" / f"{name}.mha")))
           for name in ("both", "sqrtonly")}
    assert not np.array_equal(cli["both"], cli["sqrtonly"])
    for given, name in (([t2, second], "both"), ((t2, second), "both"), ({0: t2, "T2sqrt": second}, "both"),
                        ({"T2sqrt": second}, "sqrtonly"), ({1: folder / "sqrtonly_0001.mha"}, "sqrtonly")):
        result = predictor.predict(given)
        assert geometry(result.sct) == geometry(t2)
        assert np.array_equal(sitk.GetArrayViewFromImage(result.sct), cli[name]), (name, type(given))
    arrays = [sitk.GetArrayFromImage(t2), sitk.GetArrayFromImage(second)]
    from_arrays = predictor.predict(arrays, spacing=t2.GetSpacing(), origin=t2.GetOrigin(),
                                    direction=t2.GetDirection())
    assert np.array_equal(sitk.GetArrayViewFromImage(from_arrays.sct), cli["both"])
