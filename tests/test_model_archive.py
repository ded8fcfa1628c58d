"""Shareable model zips: export -> install -> predict equals the original folder bit for bit; bad zips are refused."""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import PHANTOM_DIR, crop_center, tiny_models
from wldm_auto.cli.model_archive import main_export, main_install
from wldm_auto.cli.predict import main as predict_main
from wldm_auto.inference.model_archive import FORMAT_VERSION, ArchiveError, install_model

FOLD_CHECKPOINT = "fold_0/checkpoint_final.pt"


@pytest.fixture(scope="module")
def trained(preprocessed_small, tmp_path_factory):
    """A diffusion model with two folds (fold 1: fold 0's weights, enough for the ensemble code) and its VAE."""
    with tiny_models(preprocessed_small, tmp_path_factory.mktemp("archive_models"), ("vae", "diffusion")) as folders:
        shutil.copytree(folders["diffusion"] / "fold_0", folders["diffusion"] / "fold_1")
        yield {"model": folders["diffusion"], "vae": folders["vae"]}


@pytest.fixture(scope="module")
def mr_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archive_in")
    mr = sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz"))
    sitk.WriteImage(crop_center(mr, (64, 60, 24)), str(folder / "phantom.mha"))
    return folder


@pytest.fixture(scope="module")
def archive(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("archive_zip") / "model.zip"
    assert main_export(["-m", str(trained["model"]), "-o", str(path), "-f", "0", "1", "--licence", "CC BY 4.0",
                        "--description", "tiny phantom model"]) == 0
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def predict(inputs: Path, out: Path, *model: str) -> np.ndarray:
    assert predict_main(["-i", str(inputs), "-o", str(out), *model, "--device", "cpu", "--steps", "2",
                         "--samples", "2", "--seed", "3", "--save-std", "--file-ending", ".mha"]) == 0
    return np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(out / name))) for name in
                     ("phantom.mha", "phantom_std.mha")])


def rewrite(source: Path, target: Path, change: Callable[[str, bytes], tuple[str, bytes] | None]) -> None:
    """A copy of the zip ``source`` whose entries pass through ``change`` (None drops one)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            result = change(info.filename, old.read(info))
            if result is not None:
                new.writestr(result[0], result[1])


def edit_manifest(source: Path, target: Path, edit: Callable[[dict], None]) -> None:
    def change(name: str, data: bytes) -> tuple[str, bytes]:
        if name != "manifest.json":
            return name, data
        manifest = json.loads(data)
        edit(manifest)
        return name, json.dumps(manifest).encode()

    rewrite(source, target, change)


def test_manifest_lists_versions_hashes_licence_and_only_what_prediction_needs(trained, archive):
    model = trained["model"]
    root = f"{model.parent.name}/{model.name}"
    with zipfile.ZipFile(archive) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        names = sorted(zf.namelist())
    files = ["dataset.json", "dataset_fingerprint.json", "fold_0/checkpoint_final.pt", "fold_1/checkpoint_final.pt",
             "plans.json"]
    assert names == sorted(["manifest.json", *(f"{root}/{f}" for f in files)])  # no logs, plots, other checkpoints
    assert manifest["format_version"] == FORMAT_VERSION and manifest["folds"] == [0, 1]
    assert (manifest["dataset"], manifest["trainer"], manifest["plans"], manifest["configuration"]) == \
        (model.parent.name, "DiffusionTrainer", "wldmPlans", "3d_wldm")
    assert manifest["licence"] == "CC BY 4.0" and manifest["description"] == "tiny phantom model"
    assert manifest["created_with"]["torch"] == torch.__version__ and manifest["created_with"]["wldm_auto"]
    assert sorted(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256(model / name), "bytes": (model / name).stat().st_size}, name


def test_export_install_predict_equals_the_original_bit_for_bit(trained, archive, mr_folder, tmp_path, monkeypatch):
    from wldm_auto import Predictor

    model = trained["model"]
    results = tmp_path / "results"
    monkeypatch.setenv("wldm_results", str(results))
    assert main_install([str(archive)]) == 0
    installed = results / model.parent.name / model.name
    manifest = json.loads(zipfile.ZipFile(archive).read("manifest.json"))
    for name in manifest["files"]:
        assert (installed / name).read_bytes() == (model / name).read_bytes(), name
    assert not [p for p in results.rglob("*") if p.name.startswith(".")]  # no temporary folder left behind

    original = predict(mr_folder, tmp_path / "original", "-m", str(model), "-f", "0", "1")
    from_install = predict(mr_folder, tmp_path / "installed", "-d", model.parent.name, "-f", "0", "1")
    from_zip = predict(mr_folder, tmp_path / "zip", "-m", str(archive))
    assert np.array_equal(original, from_install) and np.array_equal(original, from_zip)
    assert original[1].max() > 0  # two folds x two samples: a std map with spread, equal too
    api = Predictor.from_model_folder(archive, folds=None, device="cpu", progress=False)
    result = api.predict(mr_folder / "phantom.mha", steps=2, samples=2, seed=3)
    assert np.array_equal(sitk.GetArrayViewFromImage(result.sct), original[0])

    # installed again: refused without --overwrite, replaced with it
    assert main_install([str(archive)]) == 1
    (installed / "fold_0" / "stale.txt").write_text("from before")
    assert main_install([str(archive), "--overwrite"]) == 0
    assert not (installed / "fold_0" / "stale.txt").exists()
    assert (installed / FOLD_CHECKPOINT).read_bytes() == (model / FOLD_CHECKPOINT).read_bytes()


def test_tampered_checkpoint_is_refused_before_anything_is_written_or_unpickled(archive, mr_folder, tmp_path,
                                                                                 monkeypatch, capsys):
    tampered = tmp_path / "tampered.zip"

    def flip_a_byte(name: str, data: bytes) -> tuple[str, bytes]:
        if name.endswith(FOLD_CHECKPOINT):
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
        return name, bytes(data)

    rewrite(archive, tampered, flip_a_byte)
    results = tmp_path / "results"
    results.mkdir()

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded before its hash was checked")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ArchiveError, match=r"tampered\.zip: .*fold_0/checkpoint_final\.pt does not match its SHA-256"):
        install_model(tampered, results)
    assert list(results.iterdir()) == []
    monkeypatch.setenv("wldm_results", str(results))
    assert main_install([str(tampered)]) == 1
    assert predict_main(["-i", str(mr_folder), "-o", str(tmp_path / "out"), "-m", str(tampered), "--device", "cpu"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("does not match its SHA-256" in line for line in errors)
    assert list(results.iterdir()) == [] and not (tmp_path / "out").exists()


def test_newer_format_is_refused_naming_both_versions(archive, tmp_path):
    newer = tmp_path / "newer.zip"

    def bump(manifest: dict) -> None:
        manifest["format_version"] = FORMAT_VERSION + 1
        manifest["created_with"]["wldm_auto"] = "9.0.0"

    edit_manifest(archive, newer, bump)
    with pytest.raises(ArchiveError) as info:
        install_model(newer, tmp_path / "results")
    message = str(info.value)
    assert f"format version {FORMAT_VERSION + 1} (written by wldm_auto 9.0.0)" in message
    assert f"(format version {FORMAT_VERSION})" in message and "\n" not in message
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("attack", ["listed", "unlisted", "absolute"])
def test_paths_outside_the_model_folder_are_refused(archive, tmp_path, attack):
    """Zip slip: an entry named ``../../x`` (listed in the manifest or not) or ``/x`` is refused; nothing lands."""
    evil = tmp_path / "evil.zip"
    payload = b"#!/bin/sh\necho owned\n"
    if attack == "listed":
        def add(manifest: dict) -> None:
            manifest["files"]["../../evil.sh"] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}

        edit_manifest(archive, tmp_path / "step.zip", add)
        with zipfile.ZipFile(tmp_path / "step.zip", "a") as zf:
            root = f"{json.loads(zf.read('manifest.json'))['dataset']}/DiffusionTrainer__wldmPlans__3d_wldm"
            zf.writestr(f"{root}/../../evil.sh", payload)
        (tmp_path / "step.zip").rename(evil)
    else:
        shutil.copy(archive, evil)
        with zipfile.ZipFile(evil, "a") as zf:
            zf.writestr("../evil.sh" if attack == "unlisted" else "/tmp/evil.sh", payload)
    results = tmp_path / "deep" / "results"
    with pytest.raises(ArchiveError, match="not a plain relative path"):
        install_model(evil, results)
    assert not results.exists() and not list(tmp_path.rglob("evil.sh"))


def test_unusable_inputs_give_one_line_errors(trained, archive, tmp_path, capsys):
    (tmp_path / "notzip.zip").write_text("hello")
    assert main_install([str(tmp_path / "notzip.zip")]) == 1
    assert "not a zip file" in capsys.readouterr().err
    rewrite(archive, tmp_path / "bare.zip", lambda name, data: None if name == "manifest.json" else (name, data))
    with pytest.raises(ArchiveError, match="not a wldm_auto model archive"):
        install_model(tmp_path / "bare.zip", tmp_path / "results")
    # export: a stage-1 model cannot predict; a zip that exists is kept unless --overwrite
    assert main_export(["-m", str(trained["vae"]), "-o", str(tmp_path / "vae.zip")]) == 1
    assert "a 'vae' checkpoint" in capsys.readouterr().err and not (tmp_path / "vae.zip").exists()
    assert main_export(["-m", str(trained["model"]), "-o", str(archive)]) == 1
    assert "use --overwrite" in capsys.readouterr().err


def test_std_scale_travels_with_the_model(trained, tmp_path, monkeypatch):
    """A fitted std scale (wldm_calibrate_std) is packed when present and installed beside the checkpoints."""
    model = tmp_path / trained["model"].parent.name / trained["model"].name
    shutil.copytree(trained["model"], model)
    (model / "std_scale.json").write_text(json.dumps({"scale": 1.7, "method": "test"}))
    path = tmp_path / "calibrated.zip"
    assert main_export(["-m", str(model), "-o", str(path), "-f", "0"]) == 0
    with zipfile.ZipFile(path) as zf:
        assert "std_scale.json" in json.loads(zf.read("manifest.json"))["files"]
    monkeypatch.setenv("wldm_results", str(tmp_path / "results"))
    assert main_install([str(path)]) == 0
    installed = tmp_path / "results" / model.parent.name / model.name / "std_scale.json"
    assert json.loads(installed.read_text())["scale"] == 1.7
