"""The std scale (``wldm_calibrate_std``, ``std_scale.json``) and the confidence mask (``--confidence-hu``)."""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PHANTOM_DIR, oblique, tiny_models
from wldm_auto.cli.calibrate import main as calibrate_main
from wldm_auto.cli.predict import main as predict_main
from wldm_auto.inference.calibration import (GAUSSIAN_COVERAGE_2, STD_SCALE_FILE, confidence_mask, coverage,
                                             fit_from_folders, fit_std_scale, ml_std_scale, read_std_scale,
                                             read_std_scale_record, write_std_scale)

GAUSS = math.erf(2 / math.sqrt(2))


def geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# --- the fit ---------------------------------------------------------------------------------------------------

def test_fit_recovers_the_true_scale_and_gives_gaussian_coverage():
    rng = np.random.default_rng(0)
    std = rng.lognormal(3.0, 0.7, 400_000)  # HU, varying voxel to voxel
    for c in (0.4, 1.0, 2.5):
        errors = np.abs(rng.normal(0.0, c * std))
        ratios = errors / std
        scale = fit_std_scale(ratios)
        assert scale == pytest.approx(c, rel=0.02)
        assert ml_std_scale(ratios) == pytest.approx(c, rel=0.02)  # Gaussian errors: both estimators agree
        assert coverage(ratios, 2.0) == pytest.approx(math.erf(2 / c / math.sqrt(2)), abs=0.005)  # before
        assert abs(coverage(ratios, 2.0, scale) - 0.9545) <= 0.005  # after
        assert np.mean(errors <= 2 * scale * std) == pytest.approx(GAUSS, abs=0.005)
    assert GAUSSIAN_COVERAGE_2 == pytest.approx(0.9545, abs=1e-4)


def test_heavy_tails_inflate_the_ml_scale_not_the_quantile_scale():
    rng = np.random.default_rng(1)
    ratios = np.abs(rng.normal(0.0, 1.0, 200_000))
    ratios[:6_000] *= 20  # 3 % gross errors (misregistration)
    scale, ml = fit_std_scale(ratios), ml_std_scale(ratios)
    assert ml > 3 * scale  # the ML scale chases the tail
    assert coverage(ratios, 2.0, scale) == pytest.approx(0.9545, abs=0.005)
    assert coverage(ratios, 2.0, ml) > 0.97  # every typical voxel covered: far too wide a band for them
    assert coverage(ratios[6_000:], 2.0, ml) > 0.9999


def test_fit_refuses_nothing_to_fit():
    with pytest.raises(ValueError, match="no voxel"):
        fit_std_scale(np.array([]))
    with pytest.raises(ValueError, match="no std scale"):
        fit_std_scale(np.zeros(100))
    with pytest.raises(ValueError, match="finite"):
        fit_std_scale(np.array([1.0, np.inf]))


# --- fitting from folders --------------------------------------------------------------------------------------

def write(array_: np.ndarray, path: Path, spacing=(2.0, 2.0, 2.5)) -> None:
    image = sitk.GetImageFromArray(array_)
    image.SetSpacing(spacing)
    image.SetOrigin((1.0, -3.0, 4.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def synthetic_folders(root: Path, c: float, cases=("a", "b", "c"), shape=(30, 40, 40)) -> dict[str, Path]:
    """CT: a body (0 HU +- texture) in air; sCT = CT + N(0, (c * std)^2) inside the body, air outside; std > 0
    only inside a body a little smaller than the CT's (as a std map is 0 outside the sCT's body)."""
    rng = np.random.default_rng(7)
    dirs = {k: root / k for k in ("ct", "sct", "mask")}
    z, y, x = np.indices(shape)
    for name in cases:
        body = ((y - 20) ** 2 + (x - 20) ** 2 < 15 ** 2) & (z > 2) & (z < shape[0] - 3)
        ct = np.where(body, rng.normal(40, 200, shape), -1024).astype(np.float32)
        inner = body & ((y - 20) ** 2 + (x - 20) ** 2 < 14 ** 2)
        std = np.where(inner, rng.lognormal(3.5, 0.5, shape), 0).astype(np.float32)
        sct = np.where(body, ct + rng.normal(0, 1, shape) * c * std, -1024).astype(np.float32)
        write(ct, dirs["ct"] / f"{name}.nii.gz")
        write(sct, dirs["sct"] / f"{name}.nii.gz")
        write(std, dirs["sct"] / f"{name}_std.nii.gz")
        write(body.astype(np.uint8), dirs["mask"] / f"{name}.nii.gz")
        write(inner.astype(np.uint8), dirs["sct"] / f"{name}_confidence.nii.gz")  # not a case of its own
    write(np.zeros(shape, np.float32), dirs["ct"] / "extra.nii.gz")  # a CT without prediction: ignored
    return dirs


def test_fit_from_folders(tmp_path):
    dirs = synthetic_folders(tmp_path, 1.6)
    for masks in (dirs["mask"], None):
        result = fit_from_folders(dirs["ct"], dirs["sct"], mask_dir=masks)
        assert [c.case for c in result.cases] == ["a", "b", "c"]
        assert result.scale == pytest.approx(1.6, rel=0.02)
        assert result.ml_scale == pytest.approx(1.6, rel=0.03)
        assert result.coverage_2_after == pytest.approx(0.9545, abs=0.005)
        assert result.coverage_2_before == pytest.approx(math.erf(2 / 1.6 / math.sqrt(2)), abs=0.01)
        assert result.n_voxels == sum(c.n_voxels for c in result.cases)
        assert all(c.n_zero_std > 0 for c in result.cases)  # the ring between std's and CT's body
        assert all(abs(c.coverage_2_after - 0.9545) < 0.02 for c in result.cases)


def test_fit_from_folders_errors(tmp_path):
    dirs = synthetic_folders(tmp_path, 1.0, cases=("a",))
    std_path = dirs["sct"] / "a_std.nii.gz"
    write(np.zeros((30, 40, 40), np.float32), std_path)
    with pytest.raises(ValueError, match="0 everywhere inside the masks"):
        fit_from_folders(dirs["ct"], dirs["sct"])
    write(np.full((30, 40, 40), -5.0, np.float32), std_path)  # wldm_evaluate refuses it with the same words
    with pytest.raises(ValueError, match="case a: .*a_std.nii.gz: the std map holds [1-9][0-9]* negative voxels"):
        fit_from_folders(dirs["ct"], dirs["sct"])
    std_path.unlink()
    with pytest.raises(ValueError, match="std map"):
        fit_from_folders(dirs["ct"], dirs["sct"])
    write(np.zeros((30, 40, 40), np.float32), dirs["sct"] / "orphan.nii.gz")
    with pytest.raises(ValueError, match="no CT .* orphan"):
        fit_from_folders(dirs["ct"], dirs["sct"])


# --- std_scale.json --------------------------------------------------------------------------------------------

def fake_model(root: Path) -> Path:
    model = root / "DiffusionTrainer__wldmPlans__3d_wldm"
    (model / "fold_0").mkdir(parents=True)
    return model


def test_std_scale_json_round_trip_and_errors(tmp_path):
    model = fake_model(tmp_path)
    assert read_std_scale(model) is None and read_std_scale_record(model) is None
    path = write_std_scale(model, 1.75, {"method": "m", "ml_scale": 2.5, "samples": 5, "steps": None})
    assert path == model / STD_SCALE_FILE
    assert read_std_scale(model) == 1.75
    assert read_std_scale_record(model)["ml_scale"] == 2.5 and read_std_scale_record(model)["samples"] == 5
    assert not list(model.glob(".*tmp*"))  # atomic: no temporary file left
    with pytest.raises(FileExistsError, match="overwrite"):
        write_std_scale(model, 2.0)
    assert read_std_scale(model) == 1.75
    write_std_scale(model, 2.0, overwrite=True)
    assert read_std_scale(model) == 2.0
    for bad in ("{not json", "[1, 2]", '{"method": "x"}', '{"scale": -1}', '{"scale": "2"}', '{"scale": NaN}',
                '{"scale": true}', '{"scale": 0}'):
        path.write_text(bad)
        with pytest.raises(ValueError, match=STD_SCALE_FILE):
            read_std_scale(model)
    for scale in (0.0, -2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite positive"):
            write_std_scale(model, scale, overwrite=True)
    with pytest.raises(ValueError, match="not a model folder"):
        write_std_scale(tmp_path, 1.0)


def test_calibrate_cli(tmp_path, capsys):
    dirs = synthetic_folders(tmp_path, 1.6)
    model = fake_model(tmp_path)
    argv = ["-m", str(model), "-ct", str(dirs["ct"]), "-s", str(dirs["sct"]), "--mask", str(dirs["mask"]),
            "--samples", "5", "--steps", "20", "--mirror-axes", "2", "0", "--second-opinion-factor", "2",
            "--edge-std-mm", "4"]
    assert calibrate_main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    record = json.loads((model / STD_SCALE_FILE).read_text())
    assert record["scale"] == pytest.approx(1.6, rel=0.02)
    assert f"{record['scale']:.4g}" in out and "95.4 %" in out and "before" in out
    assert record["cases"] == ["a", "b", "c"] and record["samples"] == 5 and record["steps"] == 20
    assert record["mirror_axes"] == [0, 2] and record["folds"] is None and record["edge_std_mm"] == 4.0
    assert record["second_opinion_factor"] == 2.0
    assert record["coverage_2_after"] == pytest.approx(0.9545, abs=0.005)
    assert record["coverage_2_before"] < 0.9 and record["ml_scale"] > 0 and record["n_voxels"] > 10_000
    assert record["created"] and "quantile" in record["method"]
    assert list((model / "logs").glob("calibrate_std_*.log"))
    # an existing file is kept unless --overwrite
    (model / STD_SCALE_FILE).write_text(json.dumps(dict(record, scale=3.0)))
    assert calibrate_main(argv) == 1
    assert "exists" in capsys.readouterr().err and read_std_scale(model) == 3.0
    assert calibrate_main([*argv, "--overwrite"]) == 0
    assert read_std_scale(model) == pytest.approx(1.6, rel=0.02)
    # no std maps: a clear error, nothing written
    for std in dirs["sct"].glob("*_std.nii.gz"):
        std.unlink()
    assert calibrate_main([*argv, "--overwrite"]) == 1
    assert "--save-std" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        calibrate_main(["-h"])
    assert exit_.value.code == 0 and "0.9545" in capsys.readouterr().out
    assert calibrate_main([*argv[:-1], "-2", "--overwrite"]) == 1
    assert "--edge-std-mm must be a length >= 0" in capsys.readouterr().err
    assert calibrate_main([*argv[:-3], "-1", *argv[-2:], "--overwrite"]) == 1
    assert "--second-opinion-factor must be a finite number >= 0" in capsys.readouterr().err


# --- the confidence mask ---------------------------------------------------------------------------------------

def test_confidence_mask_definition():
    std = np.array([[[0.0, 10.0, 49.0], [50.0, 51.0, 0.0]]], np.float32)
    body = np.array([[[1, 1, 1], [1, 1, 0]]], np.uint8)
    std_image, body_image = sitk.GetImageFromArray(std), sitk.GetImageFromArray(body)
    for image in (std_image, body_image):
        image.SetSpacing((0.5, 0.7, 3.0))
        image.SetOrigin((1.0, 2.0, 3.0))
    mask = confidence_mask(std_image, body_image, 100.0)
    assert mask.GetPixelID() == sitk.sitkUInt8 and geometry(mask) == geometry(std_image)
    assert sitk.GetArrayFromImage(mask).tolist() == [[[1, 1, 1], [0, 0, 0]]]  # 2 * 50 = 100 is not < 100
    with pytest.raises(ValueError, match="> 0"):
        confidence_mask(std_image, body_image, 0.0)


# --- applied at prediction, with a tiny trained diffusion model --------------------------------------------------

@pytest.fixture(scope="module")
def model(preprocessed_small, tmp_path_factory):
    """A tiny diffusion model (VAE + diffusion, 8 steps each), fold 0."""
    with tiny_models(preprocessed_small, tmp_path_factory.mktemp("calibration_models"), ("vae", "diffusion")) as folders:
        yield folders["diffusion"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration_in")
    mr = sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz"))
    crop = sitk.RegionOfInterest(mr, [61, 55, 21], [98, 98, 36])
    padded = sitk.ConstantPad(crop, [12, 10, 0], [9, 11, 0], 0.0)  # air around the body: it must be 0 there
    sitk.WriteImage(oblique(padded), str(folder / "phantom.mha"))
    return folder


def predict(inputs: Path, out: Path, model: Path, *extra: str) -> int:
    return predict_main(["-i", str(inputs), "-o", str(out), "-m", str(model), "--device", "cpu", "--steps", "2",
                         "--seed", "5", *extra])


def test_std_scale_is_applied_at_prediction(model, inputs, tmp_path, capsys, caplog):
    from wldm_auto import Predictor

    assert predict(inputs, tmp_path / "raw", model, "--samples", "2", "--save-std") == 0, capsys.readouterr().err
    raw_std = array(tmp_path / "raw" / "phantom_std.mha")
    assert raw_std.max() > 0
    scaled_model = tmp_path / model.name
    shutil.copytree(model, scaled_model)
    write_std_scale(scaled_model, 2.0, {"samples": 2})
    with caplog.at_level(logging.INFO, logger="wldm_auto.inference"):
        assert predict(inputs, tmp_path / "scaled", scaled_model, "--samples", "2", "--save-std") == 0
    assert sum("std maps multiplied by 2" in r.getMessage() for r in caplog.records) == 1  # logged once
    assert np.array_equal(array(tmp_path / "scaled" / "phantom_std.mha"), 2 * raw_std)
    assert np.array_equal(array(tmp_path / "scaled" / "phantom.mha"), array(tmp_path / "raw" / "phantom.mha"))
    assert predict(inputs, tmp_path / "ignored", scaled_model, "--samples", "2", "--save-std", "--no-std-scale") == 0
    assert np.array_equal(array(tmp_path / "ignored" / "phantom_std.mha"), raw_std)
    # the Python API: same voxels, the scale recorded, std_scale=False ignores it
    image = sitk.ReadImage(str(inputs / "phantom.mha"))
    scaled = Predictor.from_model_folder(scaled_model, device="cpu").predict(image, steps=2, samples=2, seed=5)
    assert scaled.std_scale == 2.0
    assert np.array_equal(sitk.GetArrayFromImage(scaled.std), 2 * raw_std)
    plain = Predictor.from_model_folder(scaled_model, device="cpu", std_scale=False)
    assert plain.std_scale == 1.0
    result = plain.predict(image, steps=2, samples=2, seed=5)
    assert result.std_scale == 1.0 and np.array_equal(sitk.GetArrayFromImage(result.std), raw_std)
    # a malformed std_scale.json stops the run before any case, naming the file
    (scaled_model / STD_SCALE_FILE).write_text('{"scale": -1}')
    assert predict(inputs, tmp_path / "bad", scaled_model, "--samples", "2", "--save-std") == 1
    assert STD_SCALE_FILE in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_confidence_mask_at_prediction(model, inputs, tmp_path, capsys, caplog):
    from wldm_auto.inference.folds import load_model
    from wldm_auto.inference.predictor import synthesize

    import torch

    folds = load_model(model, [0], torch.device("cpu"))
    image = sitk.ReadImage(str(inputs / "phantom.mha"), sitk.sitkFloat32)
    first = synthesize(folds, {0: image}, None, steps=2, samples=2, seed=5, want_std=True, progress=False)
    body = sitk.GetArrayFromImage(first.body) > 0
    std = sitk.GetArrayFromImage(first.std)
    assert body.any() and not body.all() and std[~body].max() == 0
    threshold = float(2 * np.median(std[body]))  # half the body trusted, half not
    out = tmp_path / "sct"
    assert predict(inputs, out, model, "--samples", "2", "--confidence-hu", str(threshold)) == 0, \
        capsys.readouterr().err
    assert not (out / "phantom_std.mha").exists()  # the mask does not need --save-std
    confidence = sitk.ReadImage(str(out / "phantom_confidence.mha"))
    sct = sitk.ReadImage(str(out / "phantom.mha"))
    assert confidence.GetPixelID() == sitk.sitkUInt8
    assert geometry(confidence) == geometry(sct) == geometry(image)
    mask = sitk.GetArrayFromImage(confidence)
    expected = body & (2 * std < threshold)
    assert np.array_equal(mask, expected.astype(np.uint8))
    assert 0.3 < mask[body].mean() < 0.7 and mask[~body].max() == 0
    # the API gives the same mask
    again = synthesize(folds, {0: image}, None, steps=2, samples=2, seed=5, progress=False, confidence_hu=threshold)
    assert np.array_equal(sitk.GetArrayFromImage(again.confidence), mask)
    # --continue regenerates a missing confidence file
    (out / "phantom_confidence.mha").unlink()
    with caplog.at_level(logging.WARNING):
        assert predict(inputs, out, model, "--samples", "2", "--confidence-hu", str(threshold), "--continue") == 0
    assert "phantom_confidence.mha is missing" in caplog.text
    assert np.array_equal(array(out / "phantom_confidence.mha"), mask)
    assert predict(inputs, out, model, "--samples", "2", "--confidence-hu", str(threshold), "--continue") == 0
    assert "1 skipped" in capsys.readouterr().out


def test_confidence_hu_needs_a_std_map(model, inputs, tmp_path, capsys):
    from wldm_auto import Predictor

    out = tmp_path / "sct"
    assert predict(inputs, out, model, "--samples", "1", "--confidence-hu", "100") == 1
    err = capsys.readouterr().err
    assert "--confidence-hu needs a std map" in err and "--samples" in err
    assert not out.exists()  # refused before any case, nothing created
    for bad in ("0", "-5", "nan"):
        assert predict(inputs, out, model, "--samples", "2", "--confidence-hu", bad) == 1
        assert "--confidence-hu" in capsys.readouterr().err and not out.exists()
    predictor = Predictor.from_model_folder(model, device="cpu")
    with pytest.raises(ValueError, match="confidence_hu needs a std map"):
        predictor.predict(inputs / "phantom.mha", steps=2, samples=1, confidence_hu=100)


def test_one_sample_mirrored_gives_a_std_map_and_a_scale_fitted_otherwise_is_warned_about(model, inputs, tmp_path,
                                                                                            caplog):
    scaled_model = tmp_path / model.name
    shutil.copytree(model, scaled_model)
    write_std_scale(scaled_model, 2.0, {"samples": 1, "mirror_axes": []})
    out = tmp_path / "sct"
    with caplog.at_level(logging.WARNING, logger="wldm_auto.inference"):
        assert predict(inputs, out, scaled_model, "--samples", "1", "--mirror-axes", "2", "--save-std",
                       "--confidence-hu", "100") == 0
    assert "mirrored along axes none; this run mirrors along [2]" in caplog.text
    # a scale fitted on maps without the edge term, applied to maps with the plan's: warned about too
    write_std_scale(scaled_model, 2.0, {"samples": 1, "mirror_axes": [2], "edge_std_mm": 0.0}, overwrite=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wldm_auto.inference"):
        assert predict(inputs, tmp_path / "sct_edge", scaled_model, "--samples", "1", "--mirror-axes", "2",
                       "--save-std", "--edge-std-mm", "4") == 0
    assert "edge term of 0 mm; this run adds 4 mm" in caplog.text and "mirrored along" not in caplog.text
    assert array(out / "phantom_std.mha").max() > 0 and array(out / "phantom_confidence.mha").max() == 1


def test_a_second_opinion_adds_its_disagreement_to_the_std_map(model, inputs, tmp_path, capsys, caplog):
    from wldm_auto import Predictor
    from wldm_auto.inference.second_opinion import disagreement_std

    assert predict(inputs, tmp_path / "raw", model, "--samples", "2", "--save-std") == 0, capsys.readouterr().err
    raw_sct, raw_std = array(tmp_path / "raw" / "phantom.mha"), array(tmp_path / "raw" / "phantom_std.mha")
    sct_image = sitk.ReadImage(str(tmp_path / "raw" / "phantom.mha"))
    body = raw_sct > -1024
    # a second model that reads 300 HU more in one corner of the body
    second = raw_sct.astype(np.float32)
    second[: second.shape[0] // 2, : second.shape[1] // 2] += 300.0
    folder = tmp_path / "second"
    folder.mkdir()
    second_image = sitk.GetImageFromArray(second)
    second_image.CopyInformation(sct_image)
    sitk.WriteImage(second_image, str(folder / "phantom.nii.gz"))
    before = (folder / "phantom.nii.gz").read_bytes()
    out = tmp_path / "with"
    assert predict(inputs, out, model, "--samples", "2", "--save-std", "--second-opinion", str(folder),
                   "--second-opinion-factor", "1.5") == 0, capsys.readouterr().err
    std = array(out / "phantom_std.mha")
    term = disagreement_std(raw_sct, second, body, sct_image.GetSpacing(), 1.5, 4.0)  # the plan's 4 mm
    assert term.max() > 300 and np.count_nonzero(term) < 0.9 * body.sum()
    np.testing.assert_allclose(std, np.sqrt(raw_std.astype(np.float64) ** 2 + term ** 2), rtol=1e-4, atol=1e-2)
    assert np.array_equal(array(out / "phantom.mha"), raw_sct)  # the sCT is untouched
    assert (folder / "phantom.nii.gz").read_bytes() == before  # the second opinion too
    assert std[~body].max() == 0
    # the plan's factor (2) without --second-opinion-factor; the Python API gives the same voxels
    assert predict(inputs, tmp_path / "plan", model, "--samples", "2", "--save-std", "--second-opinion",
                   str(folder)) == 0
    plan_std = array(tmp_path / "plan" / "phantom_std.mha")
    np.testing.assert_allclose(plan_std, np.sqrt(raw_std.astype(np.float64) ** 2 + (term / 1.5 * 2) ** 2),
                               rtol=1e-4, atol=1e-2)
    result = Predictor.from_model_folder(model, device="cpu").predict(
        inputs / "phantom.mha", steps=2, samples=2, seed=5, second_opinion=folder / "phantom.nii.gz")
    assert np.array_equal(sitk.GetArrayFromImage(result.std), plan_std)
    # a std scale fitted without a second opinion is warned about
    scaled_model = tmp_path / model.name
    shutil.copytree(model, scaled_model)
    write_std_scale(scaled_model, 2.0, {"samples": 2, "second_opinion_factor": 0.0})
    with caplog.at_level(logging.WARNING, logger="wldm_auto.inference"):
        assert predict(inputs, tmp_path / "scaled", scaled_model, "--samples", "2", "--save-std", "--second-opinion",
                       str(folder)) == 0
    assert "second-opinion factor of 0; this run uses 2" in caplog.text
    np.testing.assert_allclose(array(tmp_path / "scaled" / "phantom_std.mha"), 2 * plan_std, rtol=1e-6)


def test_a_second_opinion_is_refused_clearly(model, inputs, tmp_path, capsys):
    from wldm_auto import Predictor

    folder = tmp_path / "second"
    folder.mkdir()
    out = tmp_path / "sct"
    # no sCT for the case in the folder: refused before anything is created
    assert predict(inputs, out, model, "--samples", "2", "--save-std", "--second-opinion", str(folder)) == 1
    assert "no sCT for phantom" in capsys.readouterr().err and not out.exists()
    mr = sitk.ReadImage(str(inputs / "phantom.mha"))
    sitk.WriteImage(sitk.Cast(mr * 0, sitk.sitkInt16), str(folder / "phantom.mha"))
    for extra, message in (
            (["--samples", "2"], "ask for one (--save-std or --confidence-hu)"),
            (["--samples", "1", "--save-std"], "makes none (use several folds or more than one sample"),
            (["--samples", "2", "--save-std", "--second-opinion-factor", "-1"], "--second-opinion-factor must be"),
    ):
        assert predict(inputs, out, model, *extra, "--second-opinion", str(folder)) == 1
        assert message in capsys.readouterr().err and not out.exists()
    assert predict(inputs, out, model, "--samples", "2", "--save-std", "--second-opinion-factor", "2") == 1
    assert "give --second-opinion DIR too" in capsys.readouterr().err
    assert predict(inputs, out, model, "--samples", "2", "--save-std", "--second-opinion", str(inputs / "phantom.mha")) == 1
    assert "not a folder" in capsys.readouterr().err
    # the output folder may not be the second opinion's (its sCTs would be replaced)
    assert predict(inputs, folder, model, "--samples", "2", "--save-std", "--second-opinion", str(folder),
                   "--overwrite") == 1
    assert "the output folder is the second-opinion folder" in capsys.readouterr().err
    assert array(folder / "phantom.mha").max() == 0
    # on another grid: the case fails with a readable reason
    sitk.WriteImage(sitk.Cast(sitk.Shrink(mr, [2, 2, 1]) * 0, sitk.sitkInt16), str(folder / "phantom.mha"))
    assert predict(inputs, out, model, "--samples", "2", "--save-std", "--second-opinion", str(folder)) == 1
    assert "lies on another grid than the MR" in capsys.readouterr().err
    with pytest.raises(ValueError, match="another grid"):
        Predictor.from_model_folder(model, device="cpu").predict(inputs / "phantom.mha", steps=2, samples=2,
                                                                 second_opinion=folder / "phantom.mha")
