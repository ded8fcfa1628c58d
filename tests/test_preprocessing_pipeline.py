"""End-to-end planning and preprocessing on the real phantom, at a coarse spacing to stay fast."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from wldm_auto.dataset_conversion.example import install_example
from wldm_auto.io.files import hash_file
from wldm_auto.io.geometry import Geometry
from wldm_auto.planners.schema import Plans
from wldm_auto.io.normalization import denormalise_ct
from wldm_auto.preprocessing.pipeline import plan_and_preprocess

SPACING = [6.0]
NAME = "Dataset001_MRIDIRPhantom"


def _env(monkeypatch: pytest.MonkeyPatch, root: Path) -> tuple[Path, Path]:
    raw, pre = root / "raw", root / "pre"
    raw.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("wldm_raw", str(raw))
    monkeypatch.setenv("wldm_preprocessed", str(pre))
    return raw, pre


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory: pytest.TempPathFactory):
    """Install the phantom, plan and preprocess twice; returns the paths and both summaries."""
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("pipeline")
    raw, pre = _env(monkeypatch, root)
    install_example(1)
    raw_hash = hash_file(raw)
    start = time.time()
    first = plan_and_preprocess(1, spacing=SPACING)
    first_seconds = time.time() - start
    report = pre / NAME / "registration" / "phantom" / "report.json"
    report_mtime = report.stat().st_mtime_ns
    start = time.time()
    second = plan_and_preprocess(1, spacing=SPACING)
    second_seconds = time.time() - start
    yield {"raw": raw, "pre": pre / NAME, "raw_hash": raw_hash, "first": first, "second": second,
           "first_seconds": first_seconds, "second_seconds": second_seconds, "report_mtime": report_mtime,
           "monkeypatch": monkeypatch}
    monkeypatch.undo()


def test_first_run_preprocesses_and_second_run_is_cached(phantom_run):
    first, second = phantom_run["first"], phantom_run["second"]
    assert not first.failed
    assert first.stages_run == ["fingerprint", "plan", "splits", "preprocess"]
    assert [o.status for o in first.outcomes] == ["done"]
    assert second.stages_run == []
    assert [o.status for o in second.outcomes] == ["cached"]
    assert phantom_run["second_seconds"] < 0.2 * phantom_run["first_seconds"]
    report = phantom_run["pre"] / "registration" / "phantom" / "report.json"
    assert report.stat().st_mtime_ns == phantom_run["report_mtime"]


def test_raw_dataset_is_never_written(phantom_run):
    assert hash_file(phantom_run["raw"]) == phantom_run["raw_hash"]
    assert not Path("deformationField.nii").exists()  # transformix must write into a temporary folder, not the cwd


def test_registration_report_and_improvement(phantom_run):
    report = json.loads((phantom_run["pre"] / "registration" / "phantom" / "report.json").read_text())
    for key in ("seconds", "final_metric", "jacobian_min", "jacobian_max", "folding_fraction"):
        assert np.isfinite(report[key]), key
    # registration must beat plain physical-space resampling of the unaligned scans
    assert report["nmi_registered"] > report["nmi_identity"] + 0.01
    assert report["folding_fraction"] <= 0.01
    assert report["jacobian_min"] < 1.0 < report["jacobian_max"]
    assert report["body_fraction_with_ct"] > 0.9
    assert report["final_metric"] < 0  # elastix minimises negative mutual information
    folder = phantom_run["pre"] / "registration" / "phantom"
    mr = sitk.ReadImage(str(phantom_run["raw"] / NAME / "imagesTr" / "phantom_0000.nii.gz"))
    ct = sitk.ReadImage(str(folder / "ct_registered.nii.gz"))
    valid = sitk.ReadImage(str(folder / "valid_mask.nii.gz"))
    assert Geometry.of(ct) == Geometry.of(mr) == Geometry.of(valid)
    ct_np, valid_np = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(valid)
    assert ct_np.min() >= -1024 and ct_np.max() <= 3071
    assert np.all(ct_np[valid_np == 0] == -1024)
    assert (folder / "overlay.png").stat().st_size > 10_000
    assert "(Transform \"BSplineTransform\")" in (folder / "TransformParameters.1.txt").read_text()


def test_plans_and_splits(phantom_run):
    plans = Plans.load(phantom_run["pre"] / "plans.json")
    config = plans.configuration("3d_wldm")
    assert config.spacing == [6.0, 6.0, 6.0]
    assert all(p % 16 == 0 for p in config.patch_size)
    assert config.batch_size >= 2 and config.batch_size % 2 == 0
    assert config.notes["patch_size"] and plans.preprocessing.notes["target_spacing"]
    splits = json.loads((phantom_run["pre"] / "splits_final.json").read_text())
    assert splits == [{"train": ["phantom"], "val": ["phantom"]}]


def test_arrays_and_normalisation_inverts(phantom_run):
    folder = phantom_run["pre"] / "wldmPlans_3d_wldm"
    props = json.loads((folder / "phantom.json").read_text())
    mr = np.load(folder / "phantom_mr.npy", mmap_mode="r")
    ct = np.load(folder / "phantom_ct.npy", mmap_mode="r")
    masks = np.load(folder / "phantom_masks.npy", mmap_mode="r")
    shape = tuple(props["shape_zyx"])
    assert mr.shape == (1, *shape) and ct.shape == (1, *shape) and masks.shape == (2, *shape)
    assert mr.dtype == np.float32 and ct.dtype == np.float32 and masks.dtype == np.uint8
    assert -1.0 <= mr.min() and mr.max() <= 1.0 and -1.0 <= ct.min() and ct.max() <= 1.0
    assert set(np.unique(masks)) <= {0, 1}
    assert props["valid_fraction_in_body"] > 0.9
    grid = Geometry.from_dict(props["preprocessed_geometry"])
    assert grid.spacing == (6.0, 6.0, 6.0)
    assert grid.direction == tuple(props["input_geometry"]["direction"])
    # independent path: resample the registered CT (HU) onto the stored grid, compare with the array
    ct_hu = sitk.ReadImage(str(phantom_run["pre"] / "registration" / "phantom" / "ct_registered.nii.gz"), sitk.sitkFloat32)
    expected = sitk.GetArrayFromImage(sitk.Resample(ct_hu, grid.reference_image(), sitk.Transform(), sitk.sitkLinear, -1024.0))
    restored = denormalise_ct(np.asarray(ct[0]), props["ct_window"])
    assert np.abs(restored - expected).max() < 1.0
    # MR normalisation parameters invert the raw MR intensities
    lo, hi = props["mr_normalisation"]["ranges"][0]
    assert hi > lo > -1


def test_edited_plan_is_kept_and_registration_reused(phantom_run):
    plans_path = phantom_run["pre"] / "plans.json"
    data = json.loads(plans_path.read_text())
    data["preprocessing"]["crop_margin_mm"] = 20.0
    plans_path.write_text(json.dumps(data))
    before = json.loads((phantom_run["pre"] / "wldmPlans_3d_wldm" / "phantom.json").read_text())["shape_zyx"]
    summary = plan_and_preprocess(1, spacing=SPACING)
    assert summary.stages_run == ["preprocess"]
    (outcome,) = summary.outcomes
    assert outcome.status == "done" and outcome.registration_cached
    assert Plans.load(plans_path).preprocessing.crop_margin_mm == 20.0
    after = json.loads((phantom_run["pre"] / "wldmPlans_3d_wldm" / "phantom.json").read_text())["shape_zyx"]
    assert all(a >= b for a, b in zip(after, before)) and after != before


def test_interrupted_case_is_redone_not_trusted(phantom_run):
    folder = phantom_run["pre"] / "wldmPlans_3d_wldm"
    (folder / "phantom.json").unlink()  # killed after the arrays, before the JSON that marks the case finished
    (folder / "phantom_ct.npy").write_bytes(b"half")
    summary = plan_and_preprocess(1, spacing=SPACING)
    (outcome,) = summary.outcomes
    assert outcome.status == "done" and outcome.registration_cached
    assert np.load(folder / "phantom_ct.npy").shape[0] == 1


def test_changed_options_replan_and_back_up(phantom_run):
    summary = plan_and_preprocess(1, spacing=[8.0])
    assert "plan" in summary.stages_run and not summary.failed
    assert list(phantom_run["pre"].glob("plans.*.json.bak"))
    assert Plans.load(phantom_run["pre"] / "plans.json").configuration("3d_wldm").spacing == [8.0, 8.0, 8.0]


def test_kill_9_then_rerun_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    raw, pre = _env(monkeypatch, tmp_path)
    install_example(3)
    cmd = [sys.executable, "-m", "wldm_auto.cli.plan_and_preprocess", "-d", "3", "--spacing", "6", "-np", "1"]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    registration = pre / "Dataset003_MRIDIRPhantom" / "registration" / "phantom"
    deadline = time.time() + 120
    while time.time() < deadline and not registration.exists():
        time.sleep(0.2)
    time.sleep(2.0)  # inside elastix now
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (registration / "report.json").exists()
    done = subprocess.run(cmd, env=dict(os.environ), capture_output=True, encoding="utf-8", errors="replace")
    assert done.returncode == 0, done.stderr
    assert "1 preprocessed" in done.stdout
    assert not [p for p in registration.parent.parent.rglob(".*tmp*")]


def _crop(image: sitk.Image) -> sitk.Image:
    return sitk.RegionOfInterest(image, [96, 96, 40], [(n - s) // 2 for n, s in zip(image.GetSize(), (96, 96, 40))])


def _write_case(folder: Path, name: str, mr: list[sitk.Image], ct: sitk.Image) -> None:
    for c, image in enumerate(mr):
        sitk.WriteImage(image, str(folder / "imagesTr" / f"{name}_{c:04d}.nii.gz"))
    sitk.WriteImage(ct, str(folder / "targetsTr" / f"{name}.nii.gz"))


def _small_dataset(raw: Path, dataset: str, cases: dict[str, tuple[list[sitk.Image], sitk.Image]], channels: int = 1) -> None:
    folder = raw / dataset
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "targetsTr").mkdir()
    for name, (mr, ct) in cases.items():
        _write_case(folder, name, mr, ct)
    (folder / "dataset.json").write_text(json.dumps({
        "name": dataset, "channel_names": {str(i): f"MR{i}" for i in range(channels)}, "target": "CT",
        "file_ending": ".nii.gz", "numTraining": len(cases)}))


@pytest.fixture(scope="module")
def phantom_images():
    from conftest import PHANTOM_DIR

    mr = _crop(sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz")))
    ct = sitk.ReadImage(str(PHANTOM_DIR / "ct.nii.gz"))
    return mr, ct


def test_failed_cases_are_named_and_others_finish(tmp_path, monkeypatch, capsys, phantom_images):
    from wldm_auto.cli.plan_and_preprocess import main

    raw, pre = _env(monkeypatch, tmp_path)
    mr, ct = phantom_images
    far = sitk.Image(ct)
    far.SetOrigin(tuple(o + 5000.0 for o in ct.GetOrigin()))
    nan_ct = sitk.Cast(ct, sitk.sitkFloat32)
    nan_ct[5, 5, 5] = float("nan")
    _small_dataset(raw, "Dataset004_Bad", {"good": ([mr], ct), "faraway": ([mr], far), "withnan": ([mr], nan_ct)})
    raw_hash = hash_file(raw)
    code = main(["-d", "4", "--no-registration", "--spacing", "6", "-np", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "faraway" in err and "overlap" in err
    assert "withnan" in err and "NaN" in err
    assert "good" not in err
    assert (pre / "Dataset004_Bad" / "wldmPlans_3d_wldm" / "good.json").is_file()
    assert not (pre / "Dataset004_Bad" / "wldmPlans_3d_wldm" / "faraway.json").exists()
    assert hash_file(raw) == raw_hash


def test_two_mr_channels_are_normalised_separately(tmp_path, monkeypatch, phantom_images):
    raw, pre = _env(monkeypatch, tmp_path)
    mr, ct = phantom_images
    second = sitk.Cast(sitk.Sqrt(sitk.Cast(mr, sitk.sitkFloat32)) * 10.0, sitk.sitkFloat32)
    _small_dataset(raw, "Dataset005_Two", {"a": ([mr, second], ct)}, channels=2)
    summary = plan_and_preprocess(5, registration=False, spacing=[6.0])
    assert not summary.failed
    folder = pre / "Dataset005_Two" / "wldmPlans_3d_wldm"
    arr = np.load(folder / "a_mr.npy")
    props = json.loads((folder / "a.json").read_text())
    assert arr.shape[0] == 2
    (lo0, hi0), (lo1, hi1) = props["mr_normalisation"]["ranges"]
    assert hi1 < hi0  # sqrt compresses: the channels got their own ranges
    body = np.load(folder / "a_masks.npy")[1] > 0
    for channel in arr:
        assert np.percentile(channel[body], 99.5) == pytest.approx(1.0, abs=0.02)
    assert props["registration"]["registration"].startswith("disabled")


def test_clean_redoes_everything(tmp_path, monkeypatch, phantom_images):
    raw, pre = _env(monkeypatch, tmp_path)
    mr, ct = phantom_images
    _small_dataset(raw, "Dataset006_Clean", {"a": ([mr], ct)})
    plan_and_preprocess(6, registration=False, spacing=[6.0])
    again = plan_and_preprocess(6, registration=False, spacing=[6.0], clean=True)
    assert again.stages_run == ["fingerprint", "plan", "preprocess"]  # splits kept: same cases, same folds
    assert [o.status for o in again.outcomes] == ["done"]
    assert len(list((pre / "Dataset006_Clean").glob("plans.*.json.bak"))) == 1


def test_preset_flag_plans_the_cpu_configuration(tmp_path, monkeypatch, capsys, phantom_images):
    """wldm_plan_and_preprocess --preset cpu: the preset's configuration, recorded; -h lists the presets."""
    from wldm_auto.cli.plan_and_preprocess import main
    from wldm_auto.planners.presets import CPU_PRESET

    with pytest.raises(SystemExit) as info:
        main(["-h"])
    help_text = capsys.readouterr().out
    assert info.value.code == 0 and "--preset NAME" in help_text and "  cpu " in help_text
    raw, pre = _env(monkeypatch, tmp_path)
    mr, ct = phantom_images
    _small_dataset(raw, "Dataset007_Preset", {"a": ([mr], ct)})

    assert main(["-d", "7", "--preset", "gpu"]) == 1  # unknown: one line naming the known ones, nothing made
    assert capsys.readouterr().err == "error: unknown preset 'gpu' (known: cpu)\n"
    assert not pre.exists()

    assert main(["-d", "7", "--no-registration", "--spacing", "6", "-np", "1", "--preset", "cpu"]) == 0
    plans = Plans.load(pre / "Dataset007_Preset" / "plans.json")
    config = plans.configuration("3d_wldm")
    assert config.patch_size == CPU_PRESET["patch_size"] and config.vae.channels == CPU_PRESET["vae"]["channels"]
    assert config.inference.ddim_steps == CPU_PRESET["inference"]["ddim_steps"] and "preset" in config.notes
    assert plans.planner["preset"] == "cpu" and config.spacing == [6.0, 6.0, 6.0]
    again = plan_and_preprocess(7, registration=False, spacing=[6.0], preset="cpu")
    assert "plan" not in again.stages_run  # same options: the plan (and hand edits) kept
    default = plan_and_preprocess(7, registration=False, spacing=[6.0])  # no preset: planned again, GPU-sized
    assert "plan" in default.stages_run and "preprocess" not in default.stages_run  # arrays do not depend on it
    plans = Plans.load(pre / "Dataset007_Preset" / "plans.json")
    assert "preset" not in plans.planner and plans.configuration("3d_wldm").vae.channels != CPU_PRESET["vae"]["channels"]
