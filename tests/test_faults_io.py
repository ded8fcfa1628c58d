"""Fault matrix for image I/O, prediction and evaluation (issue 16).

One test per fault: the bad input, the one-line error naming the file or
case, the inputs unchanged (by hash) and the state left behind.
"""
from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PHANTOM_DIR, crop_center, tiny_copy
from wldm_auto.cli.evaluate import main as evaluate_main
from wldm_auto.cli.predict import main as predict_main
from wldm_auto.evaluation.evaluate import EvaluationError, evaluate_folder
from wldm_auto.io import images as images_module
from wldm_auto.io.files import WriteError, hash_file, write_json
from wldm_auto.io.images import ImageReadError, ImageWriteError, check_complete, is_dicom_folder, read_image, write_image


def cut_to_half(path: Path) -> None:
    """Keep only the first half of the file's bytes (a copy interrupted, a full disk)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def listing(folder: Path) -> list[str]:
    """Every path under ``folder``, relative, sorted (hidden temporary files included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def strict_json(path: Path):
    """Parse ``path`` as strict JSON: bare NaN/Infinity are an error, as in most JSON readers."""
    def reject(name: str):
        raise ValueError(f"{path}: not valid JSON ({name})")
    return json.loads(path.read_text(), parse_constant=reject)


# --------------------------------------------------------------------------- 1: truncated images

def _write(image: sitk.Image, path: Path, compress: bool) -> Path:
    sitk.WriteImage(image, str(path), compress)
    return path


TRUNCATED = {  # name: (file written, compress, the file to cut: the data file for .mhd/.nhdr)
    "nii_gz": ("mr.nii.gz", True, "mr.nii.gz"),
    "nii": ("mr.nii", False, "mr.nii"),
    "mha": ("mr.mha", False, "mr.mha"),
    "mha_compressed": ("mr.mha", True, "mr.mha"),
    "mhd": ("mr.mhd", False, "mr.raw"),
    "nrrd": ("mr.nrrd", False, "mr.nrrd"),
    "nrrd_gzip": ("mr.nrrd", True, "mr.nrrd"),
}


@pytest.mark.parametrize("kind", list(TRUNCATED))
def test_truncated_image_is_rejected_naming_the_file(tmp_path, small_phantom, kind):
    name, compress, cut = TRUNCATED[kind]
    path = _write(small_phantom[0], tmp_path / name, compress)
    cut_to_half(tmp_path / cut)
    before = hash_file(tmp_path)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = one_line(str(info.value))
    assert message.startswith(f"{path}: truncated or corrupt")
    assert "expected" in message and "bytes of" in message and "found" in message
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_image(path, check_values=False)  # no value check does not mean no completeness check
    assert hash_file(tmp_path) == before  # reading never changes the file


def test_truncated_float_nifti_says_truncated_with_the_byte_counts(tmp_path, small_phantom):
    path = tmp_path / "ct.nii"
    sitk.WriteImage(sitk.Cast(small_phantom[1], sitk.sitkFloat32), str(path), False)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size - 1000])
    payload = 40 * 40 * 20 * 4
    with pytest.raises(ImageReadError, match=f"expected {payload} bytes of voxel data, found {payload - 1000}"):
        read_image(path, sitk.sitkFloat32)


def test_gzip_corrupted_in_the_middle_is_rejected(tmp_path, small_phantom):
    path = _write(small_phantom[0], tmp_path / "mr.nii.gz", True)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # zeroed block: inflate error or CRC mismatch
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_image(path)


def test_empty_file_is_rejected_as_truncated(tmp_path):
    path = tmp_path / "sct.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        check_complete(path)


@pytest.mark.parametrize("name,compress", [("a.nii.gz", True), ("a.nii", False), ("a.mha", True), ("a.mha", False),
                                           ("a.nrrd", True), ("a.nhdr", True), ("a.mhd", True)])
def test_complete_files_pass_the_check(tmp_path, small_phantom, name, compress):
    path = _write(small_phantom[0], tmp_path / name, compress)
    assert check_complete(path) == 0
    assert np.array_equal(sitk.GetArrayFromImage(read_image(path)), sitk.GetArrayViewFromImage(small_phantom[0]))


def test_nan_still_counted_in_the_same_pass(tmp_path):
    array = np.ones((4, 5, 6), np.float32)
    array[1, 2, 3] = np.nan
    array[2, 2, 2] = np.inf
    path = tmp_path / "nan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with pytest.raises(ImageReadError, match="holds 2 NaN/inf voxels"):
        read_image(path)


# --------------------------------------------------------------------------- 2: writes checked

def _enospc(image, filename, *args, **kwargs):
    Path(filename).write_bytes(b"\x1f\x8b partial")
    raise OSError(errno.ENOSPC, "No space left on device", str(filename))


def _short_write(image, filename, *args, **kwargs):
    """What ITK does on a full disk: writes what fits and reports success."""
    sitk.ImageFileWriter().Execute(image, str(filename), bool(args and args[0]), -1)
    cut_to_half(Path(filename))


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_write_image_full_disk_is_one_line_error_and_keeps_old_file(tmp_path, monkeypatch, small_phantom, ending):
    path = tmp_path / f"sct{ending}"
    write_image(small_phantom[1], path)
    before = path.read_bytes()
    monkeypatch.setattr(images_module.sitk, "WriteImage", _enospc)
    with pytest.raises(OSError) as info:
        write_image(small_phantom[0], path)
    assert isinstance(info.value, ImageWriteError) and info.value.errno == errno.ENOSPC
    assert one_line(str(info.value)).startswith(f"{path}: cannot write: the disk is full")
    assert path.read_bytes() == before and listing(tmp_path) == [path.name]


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_write_image_detects_a_silently_short_write(tmp_path, monkeypatch, small_phantom, ending):
    path = tmp_path / f"sct{ending}"
    monkeypatch.setattr(images_module.sitk, "WriteImage", _short_write)
    with pytest.raises(ImageWriteError, match="incomplete"):
        write_image(small_phantom[0], path)
    assert listing(tmp_path) == []  # nothing under a name that looks finished


def test_write_json_full_disk_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(WriteError) as info:
        write_json({"a": 1}, path)
    assert one_line(str(info.value)).startswith(f"{path}: cannot write: the disk is full")
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- 12a: JSON without NaN

def test_write_json_writes_null_for_non_finite(tmp_path):
    path = tmp_path / "x.json"
    write_json({"nan": math.nan, "inf": [math.inf, 1.5], "np": np.float32("nan"), "arr": np.array([np.inf, 2.0]),
                "neg": -np.inf, "ok": np.float64(0.25)}, path)
    data = strict_json(path)
    assert data == {"nan": None, "inf": [None, 1.5], "np": None, "arr": [None, 2.0], "neg": None, "ok": 0.25}


# --------------------------------------------------------------------------- prediction faults

@pytest.fixture(scope="module")
def model(preprocessed_small, tmp_path_factory):
    """A regression baseline trained 2 steps: a real model for wldm_predict, quick on CPU."""
    from wldm_auto.trainers.base import TrainerOptions
    from wldm_auto.trainers.run import run_training

    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("faults_model")
    dataset = tiny_copy(preprocessed_small, root, monkeypatch)
    final = run_training(dataset, "regression", 0,
                         options=TrainerOptions(device="cpu", num_workers=0, num_steps=2, steps_per_epoch=2))
    yield final.parent.parent
    monkeypatch.undo()


@pytest.fixture(scope="module")
def mr_volume() -> sitk.Image:
    """A 64x64x32 crop of the phantom MR (the model's input)."""
    return crop_center(sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz")), (64, 64, 32))


@pytest.fixture
def mr_dir(tmp_path, mr_volume) -> Path:
    """An input folder with two cases, a and b."""
    folder = tmp_path / "mr"
    folder.mkdir()
    for case in ("a", "b"):
        sitk.WriteImage(mr_volume, str(folder / f"{case}_0000.nii.gz"))
    return folder


def predict(model: Path, source: Path, out: Path, *extra: str) -> int:
    return predict_main(["-i", str(source), "-o", str(out), "-m", str(model), "--device", "cpu", *extra])


def test_predict_truncated_input_fails_that_case_by_name(model, mr_dir, tmp_path, capsys):
    cut_to_half(mr_dir / "a_0000.nii.gz")
    before = hash_file(mr_dir)
    out = tmp_path / "sct"
    assert predict(model, mr_dir, out) == 1
    captured = capsys.readouterr()
    assert "1 predicted, 0 skipped (existing), 1 failed" in captured.out
    failed = [line for line in captured.err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "a_0000.nii.gz: truncated or corrupt: expected" in failed[0]
    assert listing(out) == ["b.nii.gz"]
    assert hash_file(mr_dir) == before


def test_predict_full_disk_fails_cases_and_continue_redoes_them(model, mr_dir, tmp_path, capsys, monkeypatch):
    before = hash_file(mr_dir)
    out = tmp_path / "sct"
    with monkeypatch.context() as patch:
        patch.setattr(images_module.sitk, "WriteImage", _enospc)
        assert predict(model, mr_dir, out) == 1
    captured = capsys.readouterr()
    assert "0 predicted, 0 skipped (existing), 2 failed" in captured.out
    failed = [line for line in captured.err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 2
    assert f"{out / 'a.nii.gz'}: cannot write: the disk is full" in failed[0]
    assert "not predicted" in failed[1] and "disk is full" in failed[1]  # b is not even tried
    assert listing(out) == []  # no 0-byte, partial or temporary file
    assert hash_file(mr_dir) == before
    assert predict(model, mr_dir, out, "--continue") == 0
    assert "2 predicted, 0 skipped" in capsys.readouterr().out
    assert listing(out) == ["a.nii.gz", "b.nii.gz"]


def test_predict_short_write_fails_and_continue_redoes_truncated_outputs(model, mr_dir, tmp_path, capsys,
                                                                          monkeypatch):
    out = tmp_path / "sct"
    with monkeypatch.context() as patch:
        patch.setattr(images_module.sitk, "WriteImage", _short_write)
        assert predict(model, mr_dir, out) == 1
    captured = capsys.readouterr()
    assert "0 predicted" in captured.out and "incomplete" in captured.err
    assert listing(out) == []
    # an output truncated behind our back (an older version, a copy) is not trusted by --continue
    assert predict(model, mr_dir, out) == 0
    capsys.readouterr()
    cut_to_half(out / "a.nii.gz")
    assert predict(model, mr_dir, out, "--continue") == 0
    assert "1 predicted, 1 skipped" in capsys.readouterr().out
    read_image(out / "a.nii.gz")  # complete again


@pytest.mark.parametrize("where", ["same", "inside", "symlink_to_input", "same_with_overwrite"])
def test_predict_refuses_output_in_input(model, mr_dir, tmp_path, capsys, where):
    out = {"same": mr_dir, "inside": mr_dir / "sct", "same_with_overwrite": mr_dir,
           "symlink_to_input": tmp_path / "link"}[where]
    if where == "symlink_to_input":
        out.symlink_to(mr_dir, target_is_directory=True)
    extra = ["--overwrite"] if where.endswith("overwrite") else []
    before, files = hash_file(mr_dir), listing(mr_dir)
    assert predict(model, mr_dir, out, *extra) == 1
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"error: {out}: the output folder") and "input folder" in err
    assert hash_file(mr_dir) == before and listing(mr_dir) == files  # no sCT, no logs/, nothing replaced
    assert not (tmp_path / "mr_logs").exists() and not (mr_dir / "sct_logs").exists()


def test_predict_never_overwrites_an_input_file(model, mr_dir, tmp_path, capsys):
    out = tmp_path / "sct"
    out.mkdir()
    (out / "a.nii.gz").symlink_to(mr_dir / "a_0000.nii.gz")  # an "existing output" that is an input
    before = hash_file(mr_dir)
    assert predict(model, mr_dir, out, "--overwrite") == 1
    err = capsys.readouterr().err
    assert "is an input of this run" in err
    assert hash_file(mr_dir) == before


def test_predict_input_file_is_not_a_folder(model, mr_dir, tmp_path, capsys):
    out = tmp_path / "sct"
    source = mr_dir / "a_0000.nii.gz"
    assert predict(model, source, out) == 1
    err = one_line(capsys.readouterr().err)
    assert f"{source}: is a file; the input must be a folder" in err
    assert not out.exists() and not (tmp_path / "sct_logs").exists()


def test_predict_creates_nothing_before_checks_pass(model, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "sct"
    assert predict(model, empty, out) == 1
    assert "no MR images found" in one_line(capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "sct_logs").exists()


def test_predict_keeps_logs_out_and_evaluate_probes_quietly(model, mr_dir, tmp_path, capfd):
    out = tmp_path / "sct"
    assert predict(model, mr_dir, out) == 0
    assert listing(out) == ["a.nii.gz", "b.nii.gz"]  # only predictions
    assert list((tmp_path / "sct_logs").glob("predict_*.log"))
    (out / "logs").mkdir()  # as older versions left it
    (out / "logs" / "predict_old.log").write_text("INFO something\n")
    assert not is_dicom_folder(out / "logs")
    ct = tmp_path / "ct"
    ct.mkdir()
    for case in ("a", "b"):
        sitk.WriteImage(sitk.ReadImage(str(out / f"{case}.nii.gz")), str(ct / f"{case}.nii.gz"))
    capfd.readouterr()
    assert evaluate_main(["-r", str(ct), "-p", str(out), "--no-figures"]) == 0
    captured = capfd.readouterr()
    assert "No Series" not in captured.err and "2 case(s) evaluated" in captured.out


def test_predict_keeps_every_existing_output_and_refuses_colliding_names(model, mr_dir, tmp_path, capsys):
    out = tmp_path / "sct"
    out.mkdir()
    (out / "a_std.nii.gz").write_bytes(b"an earlier std map")  # its sCT was deleted, its std map was not
    (out / "b_dicom").mkdir()
    (out / "b_dicom" / "notes.txt").write_text("keep me")
    before = hash_file(out)
    assert predict(model, mr_dir, out, "--save-std", "--dicom-out") == 1
    assert "predictions exist for a, b: use --continue" in one_line(capsys.readouterr().err)
    assert hash_file(out) == before
    # case p's std map would be case p_std's sCT: refused before anything is read
    collide = tmp_path / "collide"
    collide.mkdir()
    for name in ("p", "p_std"):
        (collide / f"{name}_0000.nii.gz").write_bytes((mr_dir / "a_0000.nii.gz").read_bytes())
    assert predict(model, collide, tmp_path / "out2") == 1
    assert "cases p and p_std would both write p_std.nii.gz" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out2").exists()


def test_predict_refuses_a_fold_twice_and_continue_with_overwrite(model, mr_dir, tmp_path, capsys):
    assert predict(model, mr_dir, tmp_path / "o1", "-f", "0", "0", "--save-std") == 1
    assert "fold(s) 0 given more than once" in one_line(capsys.readouterr().err)
    assert predict(model, mr_dir, tmp_path / "o2", "--continue", "--overwrite") == 1
    assert "exclude each other" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_predict_a_library_error_or_an_absurd_spacing_fails_that_case_only(model, mr_dir, tmp_path, capsys,
                                                                             monkeypatch):
    from wldm_auto.inference import predictor

    real = predictor.synthesize

    def itk_fails_on_a(folds, images, *args, names=(), **kwargs):
        if "a_0000" in names[0]:
            raise RuntimeError("Exception thrown in SimpleITK Resample: /src/itk.cxx:42:\nITK ERROR: "
                               "ResampleImageFilter: Failed to allocate memory for image.")
        return real(folds, images, *args, names=names, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(predictor, "synthesize", itk_fails_on_a)
        assert predict(model, mr_dir, tmp_path / "o1") == 1
    captured = capsys.readouterr()
    assert "1 predicted, 0 skipped (existing), 1 failed" in captured.out
    failed = [line for line in captured.err.splitlines() if line.startswith("failed:")]
    assert failed == ["failed: a: RuntimeError: ResampleImageFilter: Failed to allocate memory for image."]
    # a header spacing of 0.5 x 0.5 x 1 m would ask for billions of voxels on the plan grid: named, not attempted
    huge = read_image(mr_dir / "a_0000.nii.gz")
    huge.SetSpacing((500.0, 500.0, 1000.0))
    sitk.WriteImage(huge, str(mr_dir / "a_0000.nii.gz"))
    assert predict(model, mr_dir, tmp_path / "o2") == 1
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "is the spacing in its header right?" in failed[0]
    assert listing(tmp_path / "o2") == ["b.nii.gz"]


def test_mr_body_mask_takes_any_intensity_scale_and_a_tiny_spacing(mr_volume):
    from wldm_auto.io.body_mask import mr_body_mask

    reference = sitk.GetArrayFromImage(mr_body_mask(mr_volume, 0.1, 6.0, True, True))
    scaled = sitk.Cast(mr_volume, sitk.sitkFloat32) * 1e35  # ITK's threshold filter stopped at 1e30
    assert np.array_equal(sitk.GetArrayFromImage(mr_body_mask(scaled, 0.1, 6.0, True, True)), reference)
    tiny = sitk.Image(mr_volume)
    tiny.SetSpacing((0.01, 0.01, 0.01))  # a 600-voxel closing ball exhausted the memory before
    assert sitk.GetArrayFromImage(mr_body_mask(tiny, 0.1, 6.0, True, True)).any()


def test_export_of_a_grid_thinner_than_a_bspline_is_finite_and_in_range():
    from wldm_auto.inference.export import to_input_grid
    from wldm_auto.io.geometry import Geometry

    # 2 slices on the plan grid (a thin MR): a cubic B-spline needs 4 and ITK extrapolated values of ~1e11 there
    values = np.random.default_rng(0).uniform(0.0, 100.0, (2, 101, 149)).astype(np.float32)
    grid = sitk.GetImageFromArray(values)
    grid.SetSpacing((3.0, 3.0, 3.0))
    reference = sitk.Image(447, 303, 6, sitk.sitkFloat32)
    reference.SetSpacing((1.0, 1.0, 1.0))
    body = sitk.Image(reference.GetSize(), sitk.sitkUInt8) + 1
    body.CopyInformation(reference)
    properties = {"preprocessed_geometry": Geometry.of(grid).to_dict()}
    out = sitk.GetArrayFromImage(to_input_grid(values, properties, reference, body, -1024.0, "bspline"))
    inside = out[out != -1024.0]
    assert inside.size > 0.6 * out.size and np.isfinite(out).all()
    assert inside.min() >= 0.0 and inside.max() <= 100.0  # interpolated, so within the values


# --------------------------------------------------------------------------- evaluation faults

@pytest.fixture
def eval_dirs(tmp_path, small_phantom) -> tuple[Path, Path]:
    """ct/ and sct/ with cases a (truncated sCT), b and c (sCT = CT + 1 HU)."""
    ct_dir, sct_dir = tmp_path / "ct", tmp_path / "sct"
    ct_dir.mkdir()
    sct_dir.mkdir()
    ct = small_phantom[1]
    for case in ("a", "b", "c"):
        sitk.WriteImage(ct, str(ct_dir / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.Cast(ct + 1, sitk.sitkInt16), str(sct_dir / f"{case}.nii.gz"))
    cut_to_half(sct_dir / "a.nii.gz")
    return ct_dir, sct_dir


def test_evaluate_reports_bad_case_and_evaluates_the_others(eval_dirs, tmp_path, capsys):
    ct_dir, sct_dir = eval_dirs
    before = hash_file(ct_dir), hash_file(sct_dir)
    out = tmp_path / "report"
    assert evaluate_main(["-r", str(ct_dir), "-p", str(sct_dir), "-o", str(out), "--no-figures"]) == 1
    captured = capsys.readouterr()
    failed = [line for line in captured.err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and failed[0].startswith(f"failed: a: {sct_dir / 'a.nii.gz'}: truncated or corrupt")
    assert captured.err.strip().splitlines()[-1] == "error: 1 case(s) could not be evaluated: a"
    assert "2 case(s) evaluated" in captured.out
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["b", "c"]
    summary = strict_json(out / "summary.json")
    assert summary["cases"] == ["b", "c"] and list(summary["failed"]) == ["a"] and summary["n_failed"] == 1
    assert summary["metrics"]["mae"]["mean"] == pytest.approx(1.0)
    assert (hash_file(ct_dir), hash_file(sct_dir)) == before


def test_evaluate_folder_raises_after_evaluating_the_rest(eval_dirs, tmp_path):
    ct_dir, sct_dir = eval_dirs
    with pytest.raises(EvaluationError, match="1 of 3 case") as info:
        evaluate_folder(ct_dir, sct_dir, tmp_path / "report", figures=False)
    assert info.value.summary["cases"] == ["b", "c"] and "truncated" in info.value.failed["a"]


def test_evaluate_default_output_is_beside_the_prediction_folder(eval_dirs, tmp_path, capsys):
    ct_dir, sct_dir = eval_dirs
    (sct_dir / "a.nii.gz").unlink()
    (ct_dir / "a.nii.gz").unlink()
    files = listing(sct_dir)
    assert evaluate_main(["-r", str(ct_dir), "-p", str(sct_dir), "--no-figures"]) == 0
    assert listing(sct_dir) == files  # nothing written into the folder that was read
    out = (tmp_path / "sct_evaluation").resolve()
    assert (out / "metrics.csv").is_file() and (out / "summary.json").is_file()
    assert str(out) in capsys.readouterr().out


def test_evaluate_refuses_output_equal_to_an_input_folder(eval_dirs, capsys):
    ct_dir, sct_dir = eval_dirs
    files = listing(sct_dir)
    assert evaluate_main(["-r", str(ct_dir), "-p", str(sct_dir), "-o", str(sct_dir), "--no-figures"]) == 1
    assert "the output folder is the sCT folder" in one_line(capsys.readouterr().err)
    assert listing(sct_dir) == files


def test_evaluate_summary_counts_non_finite_values(small_phantom, tmp_path):
    ct_dir, sct_dir = tmp_path / "ct", tmp_path / "sct"
    ct_dir.mkdir()
    sct_dir.mkdir()
    sitk.WriteImage(small_phantom[1], str(ct_dir / "same.nii.gz"))
    sitk.WriteImage(small_phantom[1], str(sct_dir / "same.nii.gz"))  # identical: PSNR is +inf
    summary = evaluate_folder(ct_dir, sct_dir, tmp_path / "out", figures=False)
    written = strict_json(tmp_path / "out" / "summary.json")
    assert written["metrics"]["psnr"] == summary["metrics"]["psnr"]
    psnr = written["metrics"]["psnr"]
    assert psnr["n"] == 0 and psnr["n_inf"] == 1 and psnr["n_nan"] == 0 and psnr["mean"] is None
    spearman = written["metrics"]["spearman_error_std"]  # no std map: NaN, counted
    assert spearman["n_nan"] == 1 and spearman["mean"] is None
    assert os.path.getsize(tmp_path / "out" / "metrics.csv") > 0


def test_a_dicom_series_with_missing_slices_is_refused_by_name(tmp_path):
    """Slices deleted from the middle of a series: ITK would stack the rest at one mean spacing and misplace every
    slice after the gap (by up to 6 mm in a 20-slice series missing 5); the read fails naming the gap."""
    import shutil

    source = Path(__file__).parent / "data" / "totalsegmentator_examples" / "example_ct_dicom"
    whole = read_image(source)  # the complete series reads as before
    assert whole.GetSize()[2] == 20
    gapped = tmp_path / "gapped"
    shutil.copytree(source, gapped)
    order = images_module.dicom_series_files(gapped, quiet=True)
    for name in order[8:11]:  # three slices from the middle
        Path(name).unlink()
    before = {p.name: hash_file(p) for p in gapped.iterdir()}
    with pytest.raises(ImageReadError, match=r"not evenly spaced: .* between slices 8 and 9 of 17 .*missing slices"):
        read_image(gapped)
    assert {p.name: hash_file(p) for p in gapped.iterdir()} == before  # the input untouched


def test_evaluate_refuses_a_file_as_output_a_disjoint_resampled_sct_and_a_negative_std(small_phantom, tmp_path,
                                                                                         capsys):
    ct = small_phantom[1]
    ct_dir, sct_dir = tmp_path / "ct", tmp_path / "sct"
    ct_dir.mkdir()
    sct_dir.mkdir()
    sitk.WriteImage(ct, str(ct_dir / "a.nii.gz"))
    sitk.WriteImage(sitk.Cast(ct + 1, sitk.sitkInt16), str(sct_dir / "a.nii.gz"))
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert evaluate_main(["-r", str(ct_dir), "-p", str(sct_dir), "-o", str(afile), "--no-figures"]) == 1
    assert "is a file, not a folder" in one_line(capsys.readouterr().err)
    assert afile.read_text() == "not a folder"
    # a std map below zero is no std map (wldm_calibrate_std refuses it too)
    std = sitk.Image(ct.GetSize(), sitk.sitkFloat32) - 50.0
    std.CopyInformation(ct)
    sitk.WriteImage(std, str(sct_dir / "a_std.nii.gz"))
    assert evaluate_main(["-r", str(ct_dir), "-p", str(sct_dir), "-o", str(tmp_path / "e1"), "--no-figures"]) == 1
    assert "holds" in (err := capsys.readouterr().err) and "negative voxels inside the mask" in err
    # and one with NaN voxels (refused when read)
    std = sitk.Image(ct.GetSize(), sitk.sitkFloat32) + 10.0
    std.CopyInformation(ct)
    array = sitk.GetArrayFromImage(std)
    array[array.shape[0] // 2] = np.nan
    nan_std = sitk.GetImageFromArray(array)
    nan_std.CopyInformation(ct)
    sitk.WriteImage(nan_std, str(sct_dir / "a_std.nii.gz"))
    assert evaluate_main(["-r", str(ct_dir), "-p", str(sct_dir), "-o", str(tmp_path / "e2"), "--no-figures"]) == 1
    assert "a_std.nii.gz: holds" in (err := capsys.readouterr().err) and "NaN/inf voxels" in err
    (sct_dir / "a_std.nii.gz").unlink()
    # an sCT 1 m away from its CT: resampling would score pure air as if it were a prediction
    moved = sitk.Cast(ct + 1, sitk.sitkInt16)
    moved.SetOrigin([o + 1000.0 for o in ct.GetOrigin()])
    sitk.WriteImage(moved, str(sct_dir / "a.nii.gz"))
    assert evaluate_main(["-r", str(ct_dir), "-p", str(sct_dir), "-o", str(tmp_path / "e3"), "--no-figures",
                          "--resample"]) == 1
    assert "does not overlap the CT at all" in capsys.readouterr().err
