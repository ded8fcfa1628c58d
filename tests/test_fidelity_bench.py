"""bench/fidelity.py --quick: every row and column in its JSON, and the table's metrics are wldm_evaluate's."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

ROWS = ("3d_wldm", "ldm_vanilla", "ldm_wrm", "ldm_wrm_smd", "wavelet_diffusion", "regression", "residual_diffusion",
        "bulk_density")
COLUMNS = ("mae_hu", "psnr", "ssim", "ms_ssim", "bone_dice", "train_seconds", "predict_seconds")
LATENT = ("3d_wldm", "ldm_vanilla", "ldm_wrm", "ldm_wrm_smd")


def run_bench(work: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``bench/fidelity.py --quick --work WORK ARGS`` in a subprocess, without the caller's wldm_* folders."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("wldm_")}
    return subprocess.run([sys.executable, str(REPO / "bench" / "fidelity.py"), "--quick", "--work", str(work), *args],
                          capture_output=True, encoding="utf-8", errors="replace", env=env,
                          timeout=timeout)


def refused(work: Path, *args: str) -> str:
    """The stderr of ``bench/fidelity.py --quick --work WORK ARGS`` refused by its argument checks (exit status 2),
    run in this process: the checks come before any work, so a subprocess would only add its imports (~5 s)."""
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    import fidelity

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as stopped:
        fidelity.main(["--quick", "--work", str(work), *args])
    assert stopped.value.code == 2, stderr.getvalue()
    return stderr.getvalue()


def copy_work(quick_run: tuple[Path, dict], tmp_path: Path) -> Path:
    """A copy of the quick run's work folder (its trained models included) for a test to rerun the bench in."""
    work = tmp_path / "work"
    shutil.copytree(quick_run[0], work, symlinks=True)
    return work


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("fidelity")
    result = run_bench(work, "--samples", "2", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, json.loads(result.stdout.strip().splitlines()[-1])


def test_quick_json_has_every_row_and_column(quick_run: tuple[Path, dict]) -> None:
    work, summary = quick_run
    assert set(summary["models"]) == set(ROWS)
    assert summary["quick"] is True and "proxy" in summary["note"]
    assert summary["test_cases"] == ["phantom_test", "sim_abdomen_t0"]
    for row in ROWS:
        values = summary["models"][row]
        for column in COLUMNS:
            assert isinstance(values[column], float), (row, column)
        assert values["mae_hu"] > 0 and 0 <= values["bone_dice"] <= 1
        assert ("first_stage_mae_hu" in values) == (row in LATENT)
        # 2 samples: every stochastic model's std map is graded, and the regression U-Net's from its error head
        # (the cpu preset's plan has one); bulk density has none
        stochastic = row != "bulk_density"
        assert (values["uncertainty"] is not None) == stochastic, row
        if stochastic:
            u = values["uncertainty"]
            assert u["ause"] >= 0 and u["mean_std"] > 0 and -1 <= u["spearman_error_std"] <= 1, (row, u)
            assert 0 <= u["coverage_1"] <= u["coverage_2"] <= u["coverage_3"] <= 1 and 0 <= u["ece"] <= 1, (row, u)
            assert set(u["case_std_vs_mae"]) == {"pearson", "spearman", "n"}
            calibrated = values["uncertainty_calibrated"]  # std scale fitted on the validation case
            assert calibrated["std_scale"] > 0 and calibrated["mean_std"] == pytest.approx(
                u["mean_std"] * calibrated["std_scale"], rel=1e-3), (row, calibrated)
        if row in LATENT:
            assert values["first_stage_mae_hu"] > 0
            voxels = values["budget"]["voxels"]
            # the same budget for every learned model: the one-stage models train for the sum of both stages
            assert voxels == summary["models"]["regression"]["budget"]["voxels"]
    # the residual model trains the diffusion share on top of the regression row's trained U-Net (its prior)
    residual = summary["models"]["residual_diffusion"]["budget"]
    assert [s["trainer"] for s in residual["stages"]] == ["RegressionTrainer", "ResidualDiffusionTrainer"]
    assert residual["stages"][0]["voxels"] == summary["models"]["regression"]["budget"]["voxels"]
    assert residual["stages"][1]["voxels"] == summary["models"]["3d_wldm"]["budget"]["stages"][1]["voxels"]
    assert (work / "report" / "learning_curves.png").stat().st_size > 0
    assert summary["models"]["bulk_density"]["train_seconds"] == 0.0


def test_quick_metrics_are_those_of_wldm_evaluate(quick_run: tuple[Path, dict], tmp_path: Path) -> None:
    from wldm_auto.cli.evaluate import main as evaluate_main

    work, summary = quick_run
    data = work / "data" / "test"
    out = tmp_path / "evaluation"
    assert evaluate_main(["-r", str(data / "ct"), "-p", str(work / "predictions" / "regression"), "-m",
                          str(data / "mask"), "-o", str(out), "--no-figures"]) == 0
    with open(out / "metrics.csv", newline="") as handle:
        rows = {r["case"]: r for r in csv.DictReader(handle)}
    per_case = summary["models"]["regression"]["per_case"]
    for case, values in per_case.items():
        assert values["mae_hu"] == pytest.approx(float(rows[case]["mae"]), rel=1e-5)
        assert values["ssim"] == pytest.approx(float(rows[case]["ssim"]), rel=1e-5)
        assert values["bone_dice"] == pytest.approx(float(rows[case]["dice_bone"]), rel=1e-5, abs=1e-9)
    mean_mae = sum(v["mae_hu"] for v in per_case.values()) / len(per_case)
    assert summary["models"]["regression"]["mae_hu"] == pytest.approx(mean_mae, rel=1e-9)


def test_quick_phantom_holdout_shares_no_voxel_with_training(quick_run: tuple[Path, dict]) -> None:
    import SimpleITK as sitk

    work, _ = quick_run
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    split = manifest["phantom_split"]
    assert split["train"][1] <= split["gap"][0] < split["gap"][1] <= split["test"][0]
    train = sitk.ReadImage(str(next((work / "data" / "raw").glob("Dataset*/imagesTr/phantom_train_0000.nii.gz"))))
    test = sitk.ReadImage(str(work / "data" / "test" / "mr" / "phantom_test.nii.gz"))
    axis = "xyz".index(split["axis"])
    last_train = train.TransformIndexToPhysicalPoint([n - 1 if a == axis else 0 for a, n in enumerate(train.GetSize())])
    first_test = test.TransformIndexToPhysicalPoint([0, 0, 0])
    # no training voxel within the gap (one training patch) of the first test voxel
    assert abs(first_test[axis] - last_train[axis]) > split["gap_mm"]
    # and no test case name among the training cases
    raw_cases = {p.name.split("_0000")[0] for p in (work / "data" / "raw").glob("Dataset*/imagesTr/*")}
    assert not raw_cases & {p.name.split(".")[0] for p in (work / "data" / "test" / "mr").iterdir()}


def test_quick_mirroring_reuses_the_models_and_gives_regression_a_std_map(quick_run: tuple[Path, dict],
                                                                          tmp_path: Path) -> None:
    """--mirror-axes is a prediction setting: nothing retrains, the predictions are redone, and the deterministic
    regression U-Net gets a std map from its mirrorings."""
    work = copy_work(quick_run, tmp_path)
    checkpoint = next(work.glob("results/*/*/RegressionTrainer__*/fold_0/checkpoint_final.pt"))
    before = checkpoint.stat().st_mtime_ns
    result = run_bench(work, "--rows", "regression", "--mirror-axes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["mirror_axes"] == [2] and summary["samples"] == 1
    assert checkpoint.stat().st_mtime_ns == before  # reused, not retrained
    values = summary["models"]["regression"]
    assert values["uncertainty"] is not None and values["uncertainty"]["mean_std"] > 0
    assert values["mae_hu"] != pytest.approx(quick_run[1]["models"]["regression"]["mae_hu"], rel=1e-6)


def test_quick_ddim_steps_is_a_prediction_setting(quick_run: tuple[Path, dict], tmp_path: Path) -> None:
    """--ddim-steps reuses the trained diffusion model, redoes its predictions and is reported in the JSON."""
    work = copy_work(quick_run, tmp_path)
    checkpoint = next(work.glob("results/*/*/WaveletDiffusionTrainer__*/fold_0/checkpoint_final.pt"))
    before = checkpoint.stat().st_mtime_ns
    assert "--ddim-steps must be >= 1" in refused(work, "--ddim-steps", "0")
    result = run_bench(work, "--rows", "wavelet_diffusion", "--ddim-steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ddim_steps"] == 1 and quick_run[1]["ddim_steps"] == 2
    assert checkpoint.stat().st_mtime_ns == before  # reused, not retrained
    stamp = json.loads((work / "predictions" / "wavelet_diffusion.json").read_text())["stamp"]
    assert stamp["configuration"]["inference"]["ddim_steps"] == 1  # redone with one step


def test_quick_vae_steps_moves_the_split_not_the_budget(quick_run: tuple[Path, dict], tmp_path: Path) -> None:
    """--vae-steps N: the latent models' VAE trains N steps, their diffusion stage the rest of the same budget."""
    work = copy_work(quick_run, tmp_path)
    assert "--vae-steps must be between 1 and 7" in refused(work, "--vae-steps", "8")  # quick: 4 + 4 steps
    result = run_bench(work, "--rows", "ldm_vanilla,regression", "--vae-steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    models = json.loads(result.stdout.strip().splitlines()[-1])["models"]
    stages = models["ldm_vanilla"]["budget"]["stages"]
    assert [s["steps"] for s in stages] == [2, 6]
    assert [s["steps"] for s in quick_run[1]["models"]["ldm_vanilla"]["budget"]["stages"]] == [4, 4]
    assert models["ldm_vanilla"]["budget"]["voxels"] == models["regression"]["budget"]["voxels"]
    history = json.loads(max(work.glob("results/*/*/VAETrainer_noWRM_noSMD__*/fold_0/history.json"),
                             key=lambda p: p.stat().st_mtime).read_text())
    assert history[-1]["step"] == 2


def test_quick_seed_trains_anew_in_its_own_folder(quick_run: tuple[Path, dict], tmp_path: Path) -> None:
    """--seed N: the models are trained again with that seed beside the default seed's, which stay as they were."""
    work = copy_work(quick_run, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in work.glob("results/*/*/*/fold_0/checkpoint_final.pt")}
    result = run_bench(work, "--rows", "regression", "--seed", "7")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["seed"] == 7 and quick_run[1]["seed"] == 12345
    after = {p: p.stat().st_mtime_ns for p in work.glob("results/*/*/*/fold_0/checkpoint_final.pt")}
    assert all(after[p] == t for p, t in before.items())  # the default seed's models untouched
    assert len(after) == len(before) + 1  # one new regression U-Net
    assert summary["models"]["regression"]["mae_hu"] != pytest.approx(
        quick_run[1]["models"]["regression"]["mae_hu"], rel=1e-9)


def test_quick_out_of_fold_priors_train_the_cross_fitting_folds(quick_run: tuple[Path, dict], tmp_path: Path) -> None:
    """prior_folds "out_of_fold": the regression of every cross-fitting fold is trained and counted in the residual
    row's budget, and each training case's prior comes from the fold that held it out."""
    from wldm_auto.models.checkpoint import load_checkpoint

    work = copy_work(quick_run, tmp_path)
    result = run_bench(work, "--rows", "residual_diffusion", "--set",
                       '{"residual_diffusion": {"prior_folds": "out_of_fold"}}')
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    stages = summary["models"]["residual_diffusion"]["budget"]["stages"]
    assert [s["trainer"] for s in stages] == ["RegressionTrainer", "RegressionTrainer fold 1",
                                              "RegressionTrainer fold 2", "ResidualDiffusionTrainer"]
    splits = json.loads(next(work.glob("preprocessed/*/splits_final.json")).read_text())
    assert [s["val"] for s in splits[1:]] == [["phantom_train"], ["sim_abdomen_00"]]  # quick: 2 training cases
    folder = next(p for p in work.glob("results/*/*/ResidualDiffusionTrainer__*")
                  if (p / "fold_0" / "checkpoint_final.pt").is_file()
                  and load_checkpoint(p / "fold_0" / "checkpoint_final.pt")["prior_folds"] == "out_of_fold")
    sources = load_checkpoint(folder / "fold_0" / "checkpoint_final.pt")["case_prior_sources"]
    assert {c: Path(p).parent.name for c, p in sources.items()} == {"phantom_train": "fold_1",
                                                                   "sim_abdomen_00": "fold_2"}
    # a --set edits only its own run: the next run without it plans from the planner's plan again
    result = run_bench(work, "--rows", "bulk_density")
    assert result.returncode == 0, result.stderr[-3000:]
    plans = json.loads(next(work.glob("preprocessed/*/plans.json")).read_text())
    assert plans["configurations"]["3d_wldm"]["residual_diffusion"]["prior_folds"] == "own"


def test_quick_folds_ensemble_trains_the_cross_fitting_folds(quick_run: tuple[Path, dict], tmp_path: Path) -> None:
    """--folds N: the row's network is also trained on cross-fitting folds 1..N-1 (fold 0 reused), its budget and
    seconds count every fold, and it predicts with their ensemble, whose spread gives the regression a std map."""
    work = copy_work(quick_run, tmp_path)
    assert "--folds must be between 1 and 4" in refused(work, "--folds", "5")
    trained = sorted(work.glob("results/*/*/*/fold_0/checkpoint_final.pt"))
    bad = run_bench(work, "--rows", "bulk_density", "--folds", "4", "--fresh", timeout=300)  # quick: 2 training cases
    assert bad.returncode == 2 and "training cases make 3 folds" in bad.stderr
    assert trained and sorted(work.glob("results/*/*/*/fold_0/checkpoint_final.pt")) == trained  # nothing deleted
    fold_0 = next(work.glob("results/*/*/RegressionTrainer__*/fold_0/checkpoint_final.pt"))
    before = fold_0.stat().st_mtime_ns
    result = run_bench(work, "--rows", "regression", "--folds", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["folds"] == [0, 1] and quick_run[1]["folds"] == [0]
    assert fold_0.stat().st_mtime_ns == before  # reused, not retrained
    assert (fold_0.parent.parent / "fold_1" / "checkpoint_final.pt").is_file()
    values = summary["models"]["regression"]
    assert [s["trainer"] for s in values["budget"]["stages"]] == ["RegressionTrainer", "RegressionTrainer fold 1"]
    single = quick_run[1]["models"]["regression"]
    assert values["budget"]["voxels"] == 2 * single["budget"]["voxels"]
    assert values["train_seconds"] > single["train_seconds"]
    assert values["uncertainty"] is not None and values["uncertainty"]["mean_std"] > 0
    assert values["uncertainty"]["mean_std"] != pytest.approx((single["uncertainty"] or {}).get("mean_std", 0.0),
                                                              rel=1e-6)  # the folds' spread is in it
    stamp = json.loads((work / "predictions" / "regression.json").read_text())["stamp"]
    assert sorted(stamp["folds"]) == ["0", "1"]
    assert values["mae_hu"] != pytest.approx(single["mae_hu"], rel=1e-6)  # the mean of two U-Nets


def test_quick_second_opinion_adds_to_the_std_maps_only(quick_run: tuple[Path, dict], tmp_path: Path) -> None:
    """--second-opinion ROW: that row's fold-0 sCTs (test and validation cases) enter every std map of the other
    rows through wldm_predict's --second-opinion; the sCTs and the trained models stay as they were."""
    work = copy_work(quick_run, tmp_path)
    assert "--second-opinion bulk_density: not a trained row" in refused(work, "--second-opinion", "bulk_density")
    before = {p: p.stat().st_mtime_ns for p in work.glob("results/*/*/*/fold_0/checkpoint_final.pt")}
    result = run_bench(work, "--rows", "regression", "--second-opinion", "3d_wldm")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {p: p.stat().st_mtime_ns for p in work.glob("results/*/*/*/fold_0/checkpoint_final.pt")} == before
    assert summary["second_opinion"] == "3d_wldm" and quick_run[1]["second_opinion"] is None
    values, plain = summary["models"]["regression"], quick_run[1]["models"]["regression"]
    assert values["second_opinion"] == "3d_wldm" and values["second_opinion_train_seconds"] > 0
    assert values["mae_hu"] == pytest.approx(plain["mae_hu"], rel=1e-9)  # the same sCT
    assert values["uncertainty_without_second_opinion"]["mean_std"] == pytest.approx(
        plain["uncertainty"]["mean_std"], rel=1e-6)
    assert values["uncertainty"]["mean_std"] > 1.01 * plain["uncertainty"]["mean_std"]  # the disagreement added
    assert values["uncertainty_calibrated"]["std_scale"] > 0
    for name in ("3d_wldm_opinion", "3d_wldm_opinion_val", "regression+3d_wldm", "regression+3d_wldm_val"):
        assert (work / "predictions" / f"{name}.json").is_file(), name
    assert "regression + 3d_wldm (calibrated)" in result.stdout and "regression (own std only)" in result.stdout
