"""Fidelity benchmark: every model trained on training cases and graded on cases it never saw.

    python bench/fidelity.py [--work DIR] [--quick] [--threads N] [--rows ROW,ROW] [--vae-steps N] [--seed N]
                             [--folds N] [--fresh]

Data (``fidelity_data.py``): the MRI-DIR phantom cut into a training slab and a held-out test
slab along its long axis (a gap of at least one training patch between them), and MR-like
volumes simulated from real CTs (``mr_simulator.py``; whole cases held out). The simulated cases
are a PROXY for learnability, not a claim about patients; every output says so.

Rows: 3D-WLDM (WRM + SMD + DSCA), its ablations (vanilla LDM without WRM/SMD/DSCA, +WRM, +WRM+SMD),
wavelet-domain diffusion (fixed Haar first stage), the regression U-Net, residual diffusion on that
regression U-Net (beyond the paper) and a bulk-density sCT (body = 0 HU). Every model of the paper
and the baselines gets the same budget, steps x batch x patch voxels summed over its stages: a
latent model splits it between its VAE and its diffusion U-Net, the one-stage models (regression,
wavelet-domain) train for the sum. (The VAE of "+WRM+SMD" and 3D-WLDM is the same network, trained
once.) The residual model reuses the regression row's trained U-Net as its prior and trains the
diffusion share on top, so its budget is the regression's plus that share (printed); with out-of-fold
priors (``--set '{"residual_diffusion": {"prior_folds": "out_of_fold"}}'``) the regression is also trained
on 3 cross-fitting folds of the training cases (folds 1-3 of ``splits_final.json``), each training case's
prior coming from the fold that held it out, and those count in its budget too. All networks
use the ``cpu`` plan preset. ``--samples N`` (N > 1): the stochastic models draw N samples (their sCT
as their plan makes it: the samples' mean, or residual diffusion's posterior-mean estimate) and their
std maps are graded too (AUSE, coverage, calibration: ``wldm_evaluate``); the regression U-Net's std map
comes from its error head (plan ``regression.error_head``) and is graded with any number of samples.
``--mirror-axes 0 1 2``: test-time mirroring (plan ``inference.mirror_axes``), each sample drawn on the 8
flipped MRs, whose spread adds to every std map. Both are prediction settings: trained models are reused.
``--folds N`` (N > 1): a fold ensemble, as ``wldm_predict -f 0 1 ..`` makes one: every network of a row is also
trained on the cross-fitting folds 1..N-1 (each on the training cases less a third of them), the row predicts
with folds 0..N-1 (their mean; their spread adds to every std map) and its budget and training seconds count
every fold. The validation case, on which the std scale is fitted, is held out by every fold.
``--second-opinion ROW`` (e.g. 3d_wldm): that row's fold-0, one-sample sCTs of the test and validation cases
are the second opinion of every other row with a std map (``wldm_predict --second-opinion``: their smoothed
disagreement adds to the std maps, the std scale is fitted on validation maps made the same way); the JSON
keeps the row's std quality without it (``uncertainty_without_second_opinion``).

Columns: MAE (HU), PSNR (dB), SSIM, MS-SSIM, bone Dice (> 250 HU), all computed by
``wldm_evaluate``'s code inside the test masks and averaged over the test cases; for latent models
the first-stage ceiling: MAE of VAE encode -> decode of the TRUE CT, on the same grid and mask
as the sCT (no sCT can beat it); training seconds (including validation) and prediction seconds
per case. Also written to ``WORK/report``: ``fidelity.csv`` (per model and case),
``learning_curves.png`` (validation MAE against step, per trainer), the evaluation figures.

The last stdout line is one JSON object. ``--quick`` (run by the test suite) does the same at a
tiny size (6 mm, a few steps): it checks the machinery, its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity_data  # noqa: E402
from mr_simulator import PROXY_NOTE  # noqa: E402
from wldm_auto.evaluation import metrics as M  # noqa: E402
from wldm_auto.evaluation.uncertainty import KEYS as STD_MAP_KEYS  # noqa: E402
from wldm_auto.evaluation.evaluate import evaluate_folder  # noqa: E402
from wldm_auto.inference.baselines import bulk_density_sct  # noqa: E402
from wldm_auto.inference.calibration import fit_from_folders, scale_std  # noqa: E402
from wldm_auto.inference.first_stage import first_stage_reconstruction  # noqa: E402
from wldm_auto.inference.folds import check_mirror_axes, load_model  # noqa: E402
from wldm_auto.inference.predictor import predict_folder, spread_possible  # noqa: E402
from wldm_auto.io.files import hash_data, hash_file, read_json, write_json  # noqa: E402
from wldm_auto.io.images import read_image, write_image  # noqa: E402
from wldm_auto.models.checkpoint import load_checkpoint  # noqa: E402
from wldm_auto.paths import PREPROCESSED, RAW, RESULTS, model_folder_name  # noqa: E402
from wldm_auto.planners.presets import CPU_PRESET, apply_preset, merge  # noqa: E402
from wldm_auto.planners.recipe import EDGE_STD_MM  # noqa: E402
from wldm_auto.planners.schema import InferencePlan, Plans  # noqa: E402
from wldm_auto.preprocessing.pipeline import plan_and_preprocess  # noqa: E402
from wldm_auto.trainers.base import TrainerOptions  # noqa: E402
from wldm_auto.trainers.run import run_training  # noqa: E402

log = logging.getLogger("fidelity")

CONFIGURATION = "3d_wldm"
PLANS_NAME = "wldmPlans"
SEED = 12345
# folds 1..N of splits_final.json partition the training cases, for residual diffusion's out-of-fold priors
# (plan residual_diffusion.prior_folds "out_of_fold") and fold ensembles (--folds); every row trains on fold 0
CROSS_FIT_FOLDS = 3


@dataclass(frozen=True)
class Row:
    label: str
    vae: str | None  # stage-1 trainer (latent models)
    stage: str | None  # the (second) stage's name and trainer
    trainer: str | None
    prior: str | None = None  # a trained regression U-Net the row's model builds on (residual diffusion)


ROWS: dict[str, Row] = {
    "3d_wldm": Row("3D-WLDM (WRM + SMD + DSCA)", "VAETrainer", "diffusion", "DiffusionTrainer"),
    "ldm_vanilla": Row("vanilla LDM (no WRM, SMD, DSCA)", "VAETrainer_noWRM_noSMD", "diffusion",
                       "DiffusionTrainer_noDSCA_noSMD_noWRM"),
    "ldm_wrm": Row("LDM + WRM", "VAETrainer_noSMD", "diffusion", "DiffusionTrainer_noDSCA_noSMD"),
    "ldm_wrm_smd": Row("LDM + WRM + SMD", "VAETrainer", "diffusion", "DiffusionTrainer_noDSCA"),
    "wavelet_diffusion": Row("wavelet-domain diffusion (Haar)", None, "wavelet_diffusion", "WaveletDiffusionTrainer"),
    "regression": Row("regression U-Net", None, "regression", "RegressionTrainer"),
    "residual_diffusion": Row("residual diffusion on regression", None, "residual_diffusion",
                              "ResidualDiffusionTrainer", prior="RegressionTrainer"),
    "bulk_density": Row("bulk density (body = 0 HU)", None, None, None),
}
LATENT_ROWS = ("3d_wldm", "ldm_vanilla", "ldm_wrm", "ldm_wrm_smd")


@dataclass(frozen=True)
class Setup:
    """Sizes of a benchmark run (full or quick)."""

    quick: bool  # the tiny data set (machinery check)
    spacing: float  # mm, isotropic preprocessing grid
    vae_steps: int
    diffusion_steps: int
    curve_points: int  # validations per training run (points of the learning curves)
    ddim_steps: int
    plan: dict  # plan edits on top of the cpu preset
    seed: int = SEED  # training seed of every stage (batches, augmentation, initial weights, noise)

    @property
    def one_stage_steps(self) -> int:
        return self.vae_steps + self.diffusion_steps

    def steps(self, row: Row) -> int:
        """Training steps of ``row``'s own stage: a model on a VAE or a prior gets the diffusion share."""
        return self.diffusion_steps if (row.vae or row.prior) else self.one_stage_steps


FULL = Setup(quick=False, spacing=3.0, vae_steps=350, diffusion_steps=1550, curve_points=4, ddim_steps=10, plan={})
QUICK = Setup(quick=True, spacing=6.0, vae_steps=4, diffusion_steps=4, curve_points=2, ddim_steps=2, plan={
    "patch_size": [8, 16, 16],
    "vae": {"channels": [8, 16], "discriminator_channels": 8, "adv_start_step": 2},
    "diffusion": {"unet_channels": [16, 16], "validation_ddim_steps": 2},
    "wavelet_diffusion": {"unet_channels": [16, 16], "validation_ddim_steps": 2},
    "residual_diffusion": {"unet_channels": [16, 16], "validation_ddim_steps": 2},
    "regression": {"unet_channels": [8, 16, 16], "blocks_per_level": 1},
})


def _timer() -> float:
    return time.perf_counter()


# -- preparation ---------------------------------------------------------------------------------
def prepare(work: Path, setup: Setup, overrides: dict) -> tuple[fidelity_data.BenchData, Path, Plans]:
    """Data, preprocessing, the benchmark's plan and its split (fold 0: training vs validation cases)."""
    patch_z = setup.plan.get("patch_size", CPU_PRESET["patch_size"])[0]
    data = fidelity_data.build(work, setup.quick, patch_z * setup.spacing)
    for variable, sub in ((RAW, "data/raw"), (PREPROCESSED, "preprocessed")):
        (work / sub).mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(work / sub)
    summary = plan_and_preprocess(fidelity_data.DATASET_ID, 1, registration=False, spacing=[setup.spacing])
    if summary.failed:
        raise SystemExit(f"preprocessing failed: {summary.failed[0].case}: {summary.failed[0].message}")
    plans_path = summary.folder / "plans.json"
    plans = apply_preset(read_json(planner_plans(plans_path)), "cpu", CONFIGURATION)
    config = plans["configurations"][CONFIGURATION]
    merge(config, setup.plan)
    merge(config, overrides)
    # prediction settings: the package defaults with the planner's edge term (a plan written by an older planner
    # keeps what it had), then --set's own "inference" section (e.g. {"edge_std_mm": 0})
    config["inference"] = {**asdict(InferencePlan(edge_std_mm=EDGE_STD_MM)), "ddim_steps": setup.ddim_steps,
                           **overrides.get("inference", {})}
    for section, steps in (("vae", setup.vae_steps), ("diffusion", setup.diffusion_steps),
                           ("wavelet_diffusion", setup.one_stage_steps), ("regression", setup.one_stage_steps),
                           ("residual_diffusion", setup.diffusion_steps)):
        per_epoch = max(1, steps // setup.curve_points)  # the benchmark's budget, written where a reader looks
        config[section]["training"].update(num_epochs=setup.curve_points, steps_per_epoch=per_epoch,
                                           checkpoint_every_steps=per_epoch)
    config["notes"]["fidelity_benchmark"] = f"bench/fidelity.py: {PROXY_NOTE}"
    if read_json(plans_path) != plans:
        write_json(plans, plans_path)
    write_json(splits(data.cases("train"), data.cases("val")), summary.folder / "splits_final.json")
    # one results folder per plan and budget: a changed recipe never reuses a model trained under another
    keyed = {k: v for k, v in config.items() if k not in ("notes", "inference")}
    if setup.seed != SEED:  # (the default seed leaves the key as it was before seeds could change)
        keyed["training_seed"] = setup.seed
    key = hash_data(keyed, plans["preprocessing"])[:12]
    results = work / "results" / key
    results.mkdir(parents=True, exist_ok=True)
    os.environ[RESULTS] = str(results)
    return data, summary.folder, Plans.load(plans_path)


def planner_plans(plans_path: Path) -> Path:
    """The planner's own plan, which every run edits afresh (preset, sizes, ``--set``), so one run's ``--set`` never
    reaches the next: kept beside ``plans.json`` as ``plans.planner.json`` while ``plans.json`` is the benchmark's
    edit of it (the pipeline replaces ``plans.json`` with a new plan when the data or planner options change)."""
    base = plans_path.with_name("plans.planner.json")
    current = read_json(plans_path)
    if "fidelity_benchmark" not in current["configurations"][CONFIGURATION].get("notes", {}):
        write_json(current, base)  # a fresh plan from the planner
    elif not base.is_file():
        raise SystemExit(f"{plans_path} was edited by an earlier benchmark run and the planner's plan it came from is "
                         "not kept beside it: delete it (the pipeline plans again) or use a new --work folder")
    return base


def splits(train: list[str], val: list[str]) -> list[dict[str, list[str]]]:
    """Fold 0: the benchmark's training and validation cases; folds 1..CROSS_FIT_FOLDS: each holds out every
    CROSS_FIT_FOLDS-th training case and trains on the others (out-of-fold regression priors)."""
    parts = [train[g::CROSS_FIT_FOLDS] for g in range(CROSS_FIT_FOLDS) if train[g::CROSS_FIT_FOLDS]]
    folds = [{"train": list(train), "val": list(val)}]
    if len(parts) > 1:
        folds += [{"train": [c for c in train if c not in part], "val": part} for part in parts]
    return folds


def prior_folds(row: Row, plans: Plans, data: fidelity_data.BenchData, folds: list[int]) -> list[int]:
    """The folds of ``row``'s regression prior to train: the row's own ``folds`` (each fold's model builds on
    its fold's prior), and every cross-fitting fold when its plan asks for out-of-fold priors."""
    if not row.prior:
        return []
    if plans.configuration(CONFIGURATION).residual_diffusion.prior_folds != "out_of_fold":
        return list(folds)
    return list(range(len(splits(data.cases("train"), data.cases("val")))))


def run_label(trainer: str, fold: int) -> str:
    """How a training run is named in the budget and the seconds: the trainer, plus its fold if not 0."""
    return trainer + (f" fold {fold}" if fold else "")


def model_folder(trainer: str) -> Path:
    return Path(os.environ[RESULTS]) / f"Dataset{fidelity_data.DATASET_ID:03d}_{fidelity_data.DATASET_NAME}" / \
        model_folder_name(trainer, PLANS_NAME, CONFIGURATION)


# -- training ------------------------------------------------------------------------------------
def train(work: Path, stage: str, trainer: str, steps: int, setup: Setup, workers: int | None,
          fold_index: int = 0) -> float:
    """Train one stage (or reuse a finished run); returns its seconds (training + validation, from history.json)."""
    fold = model_folder(trainer) / f"fold_{fold_index}"
    if not (fold / "checkpoint_final.pt").is_file():
        resume = (fold / "checkpoint_latest.pt").is_file()
        log.info("training %s (%s) fold %d: %d steps%s", trainer, stage, fold_index, steps,
                 " (resumed)" if resume else "")
        options = TrainerOptions(device="cpu" if not torch.cuda.is_available() else "auto", seed=setup.seed,
                                 num_steps=steps, steps_per_epoch=max(1, steps // setup.curve_points),
                                 num_workers=workers)
        run_training(fidelity_data.DATASET_ID, stage, fold_index, trainer, CONFIGURATION, resume=resume,
                     options=options)
    else:
        log.info("%s already trained: reusing %s", trainer, fold)
    return float(sum(h.get("epoch_seconds", 0.0) for h in read_json(fold / "history.json")))


def budget(row: str, setup: Setup, plans: Plans, data: fidelity_data.BenchData, folds: list[int]) -> dict[str, Any]:
    """Steps, batch and patch of every stage a row trains (each fold of ``folds`` a run of its own), and their
    voxels in total."""
    config = plans.configuration(CONFIGURATION)
    patch, batch = list(config.patch_size), config.batch_size
    spec = ROWS[row]
    stages = []
    if spec.vae:
        stages += [{"stage": "vae", "trainer": run_label(spec.vae, f), "steps": setup.vae_steps} for f in folds]
    for fold in prior_folds(spec, plans, data, folds):
        stages.append({"stage": "regression", "trainer": run_label(spec.prior, fold), "steps": setup.one_stage_steps})
    if spec.stage:
        stages += [{"stage": spec.stage, "trainer": run_label(spec.trainer, f), "steps": setup.steps(spec)}
                   for f in folds]
    for s in stages:
        s.update(batch=batch, patch=patch, voxels=s["steps"] * batch * int(np.prod(patch)))
    return {"stages": stages, "voxels": sum(s["voxels"] for s in stages)}


# -- prediction, first-stage ceiling, bulk density -------------------------------------------------
def predict(work: Path, row: str, test_mr: Path, plans: Plans, samples: int = 1, name: str | None = None,
            folds: list[int] | None = None, second_opinion: Path | None = None) -> tuple[Path, float]:
    """Predict every MR of ``test_mr`` with the row's model (seed 0; ``samples`` > 1: their mean, and their
    std map ``CASE_std`` for a stochastic model; ``folds``: the ensemble of those folds, default fold 0) into
    ``predictions/<name or row>``; returns (folder, mean seconds per case). ``second_opinion``: a folder of
    another model's sCTs of the same cases, whose disagreement adds to the std maps (``wldm_predict
    --second-opinion``, the plan's factor and smoothing).

    Reused when the model's checkpoints, its configuration as this code reads it (a new plan key's default
    changes what a stored plan means) and the prediction settings are unchanged (stored with the timings)."""
    trainer = ROWS[row].trainer
    folds = list(folds or [0])
    checkpoints = [model_folder(trainer) / f"fold_{f}" / "checkpoint_final.pt" for f in folds]
    checkpoint = checkpoints[0]
    out = work / "predictions" / (name or row)
    inference = plans.configuration(CONFIGURATION).inference  # the benchmark's, not the one stored at training
    stored = load_checkpoint(checkpoint, map_location="cpu")
    as_read = Plans.from_dict(stored.plans, str(checkpoint)).configuration(stored.configuration)
    hashes = {str(f): hash_file(c) for f, c in zip(folds, checkpoints)}
    stamp = {"checkpoint": hashes[str(folds[0])], "configuration": asdict(replace(as_read, inference=inference)),
             "samples": samples}
    if len(folds) > 1:  # (a single fold 0 keeps the stamp of the runs before ensembles could be asked for)
        stamp["folds"] = hashes
    if second_opinion is not None:
        stamp["second_opinion"] = {p.name: hash_file(p) for p in sorted(second_opinion.glob("*.nii.gz"))}
    timing_path = work / "predictions" / f"{name or row}.json"
    if timing_path.is_file() and read_json(timing_path).get("stamp") == stamp and out.is_dir():
        return out, float(read_json(timing_path)["seconds_per_case"])
    shutil.rmtree(out, ignore_errors=True)
    loaded = load_model(model_folder(trainer), folds, torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                        inference=inference)
    outcomes = predict_folder(test_mr, out, loaded, steps=inference.ddim_steps, samples=samples, seed=0,
                              save_std=spread_possible(loaded, samples), second_opinion_dir=second_opinion)
    failed = [o for o in outcomes if o.status != "done"]
    if failed:
        raise SystemExit(f"{name or row}: prediction failed for {failed[0].case}: {failed[0].message}")
    seconds = float(np.mean([o.seconds for o in outcomes]))
    write_json({"stamp": stamp, "seconds_per_case": seconds, "cases": {o.case: o.seconds for o in outcomes}},
               timing_path)
    return out, seconds


def val_mr_folder(work: Path, data: fidelity_data.BenchData) -> Path:
    """A folder of the validation cases' MRs (copied once), to predict them as a user would."""
    val_mr = work / "data" / "val_mr"
    val_mr.mkdir(parents=True, exist_ok=True)
    for case in data.cases("val"):
        target = val_mr / f"{case}_0000.nii.gz"
        if not target.is_file():
            shutil.copy2(data.raw / "imagesTr" / target.name, target)
    return val_mr


def calibrated_std(work: Path, data: fidelity_data.BenchData, row: str, plans: Plans, samples: int,
                   test_predictions: Path, folds: list[int] | None = None, label: str | None = None,
                   second_opinion: Path | None = None) -> tuple[Path, float]:
    """The std scale fitted on the validation cases (``wldm_calibrate_std``'s fit: 2 x std covers 95.45 %
    of their voxels) and a copy of the test predictions with their std maps multiplied by it. ``label``: the
    predictions' name (default the row); ``second_opinion``: the second model's sCTs of the validation cases."""
    label = label or row
    val_predictions, _ = predict(work, row, val_mr_folder(work, data), plans, samples, name=f"{label}_val",
                                 folds=folds, second_opinion=second_opinion)
    scale = fit_from_folders(data.raw / "targetsTr", val_predictions).scale
    out = work / "predictions" / f"{label}_calibrated"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for path in test_predictions.glob("*.nii.gz"):
        if path.name.endswith("_std.nii.gz"):
            write_image(scale_std(read_image(path, sitk.sitkFloat32), scale), out / path.name)
        else:
            shutil.copy2(path, out / path.name)
    return out, scale


def first_stage_ceilings(data: fidelity_data.BenchData, plans: Plans, trainer: str | None) -> dict[str, float]:
    """Per test case: MAE (HU, test mask, MR grid) of the true CT through the row's first stage and back.

    ``trainer`` None: no network, only preprocessing and the way back (the resampling floor)."""
    synthesizer = None
    if trainer is not None:
        synthesizer = load_model(model_folder(trainer), [0], torch.device("cpu"),
                                 inference=plans.configuration(CONFIGURATION).inference)[0].synthesizer
    out = {}
    for case in data.cases("test"):
        mr = read_image(data.test / "mr" / f"{case}.nii.gz", sitk.sitkFloat32)
        ct = read_image(data.test / "ct" / f"{case}.nii.gz", sitk.sitkFloat32)
        mask = sitk.GetArrayFromImage(read_image(data.test / "mask" / f"{case}.nii.gz")) > 0
        back = first_stage_reconstruction(mr, ct, plans, CONFIGURATION, synthesizer)
        out[case] = M.mae(sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(back), mask)
    return out


def bulk_density(data: fidelity_data.BenchData, plans: Plans, out: Path) -> Path:
    """sCT = 0 HU inside the pipeline's MR body mask, -1024 outside (the simplest MR-only baseline)."""
    out.mkdir(parents=True, exist_ok=True)
    for case in data.cases("test"):
        mr = read_image(data.test / "mr" / f"{case}.nii.gz", sitk.sitkFloat32)
        write_image(bulk_density_sct(mr, plans), out / f"{case}.nii.gz")
    return out


# -- evaluation and report ---------------------------------------------------------------------------
METRIC_KEYS = {"mae_hu": "mae", "psnr": "psnr", "ssim": "ssim", "ms_ssim": "ms_ssim", "bone_dice": "dice_bone"}
# the std map's quality (wldm_evaluate, with --samples > 1 for the stochastic models)
UNCERTAINTY_KEYS = ("spearman_error_std", *STD_MAP_KEYS)


def evaluate(work: Path, data: fidelity_data.BenchData, row: str, predictions: Path, figures: bool
             ) -> dict[str, dict[str, float]]:
    """Per test case: the metrics ``wldm_evaluate`` writes to metrics.csv (read back from it)."""
    out = work / "evaluation" / row
    shutil.rmtree(out, ignore_errors=True)
    evaluate_folder(data.test / "ct", predictions, out, mask_dir=data.test / "mask", mr_dir=data.test / "mr",
                    figures=figures)
    per_case = {}
    with open(out / "metrics.csv", newline="") as handle:
        for record in csv.DictReader(handle):
            columns = {**METRIC_KEYS, **{key: key for key in UNCERTAINTY_KEYS}}
            per_case[record["case"]] = {key: float(record[column]) if record[column] else math.nan
                                        for key, column in columns.items()}
    if not any(math.isfinite(v["ause"]) for v in per_case.values()):  # no std maps
        for case in per_case.values():
            for key in UNCERTAINTY_KEYS:
                del case[key]
    return per_case


def uncertainty(work: Path, row: str, per_case: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    """The std maps' quality averaged over the test cases, and the case-level correlation of mean std and
    MAE (from the row's evaluation summary); None without std maps."""
    if "ause" not in next(iter(per_case.values())):
        return None
    out: dict[str, Any] = {key: float(np.mean([v[key] for v in per_case.values()])) for key in UNCERTAINTY_KEYS}
    out["case_std_vs_mae"] = read_json(work / "evaluation" / row / "summary.json")["case_std_vs_mae"]
    return out


def learning_curves(work: Path, rows: list[str], path: Path) -> None:
    """Validation MAE (HU) against training step: first stages (CT reconstruction) and sCT models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    seen = set()
    for row in rows:
        spec = ROWS[row]
        for trainer, ax, label in ((spec.vae, axes[0], spec.vae), (spec.trainer, axes[1], spec.label)):
            if trainer is None or trainer in seen:
                continue
            seen.add(trainer)
            history = model_folder(trainer) / "fold_0" / "history.json"
            if not history.is_file():
                continue
            records = [h for h in read_json(history) if "val_mae_ct_hu" in h]
            ax.plot([h["step"] for h in records], [h["val_mae_ct_hu"] for h in records], marker="o", label=label)
    axes[0].set_title("first stage: CT reconstruction (encode -> decode)")
    axes[1].set_title("synthetic CT from MR")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.set_ylabel("validation MAE (HU, lower is better)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (a row set without a first stage leaves the left panel empty)
            ax.legend(fontsize=8)
    fig.suptitle("validation case: simulated MR (a proxy, not patients); one curve per trainer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def print_table(results: dict[str, dict], cases: list[str]) -> None:
    header = (f"{'model':34s} {'MAE HU v':>9s} {'PSNR dB ^':>9s} {'SSIM ^':>7s} {'MS-SSIM ^':>9s} {'bone Dice ^':>11s} "
              f"{'1st-stage MAE':>13s} {'train s':>8s} {'predict s':>9s}")
    print("\n" + header)
    print("-" * len(header))
    for row, r in results.items():
        print(f"{ROWS[row].label:34s} {_f(r['mae_hu']):>9s} {_f(r['psnr'], 2):>9s} {_f(r['ssim'], 3):>7s} "
              f"{_f(r['ms_ssim'], 3):>9s} {_f(r['bone_dice'], 3):>11s} {_f(r.get('first_stage_mae_hu')):>13s} "
              f"{_f(r['train_seconds'], 0):>8s} {_f(r['predict_seconds'], 1):>9s}")
    print("\nMAE (HU) per test case (v lower is better):")
    print(f"{'model':34s}" + "".join(f"{c:>18s}" for c in cases))
    for row, r in results.items():
        print(f"{ROWS[row].label:34s}" + "".join(f"{_f(r['per_case'][c]['mae_hu']):>18s}" for c in cases))
    graded = {}
    for row, r in results.items():  # raw, then times the scale fitted on the validation case(s)
        opinion = f" + {r['second_opinion']}" if r.get("second_opinion") else ""
        for suffix, key in ((" (own std only)", "uncertainty_without_second_opinion"), (opinion, "uncertainty"),
                            (f"{opinion} (calibrated)", "uncertainty_calibrated")):
            if r.get(key):
                graded[f"{row}{suffix}"] = r[key]
    if graded:
        print("\nstd map quality (mean over the test cases; Gaussian coverage 0.683 / 0.954 / 0.997):")
        print(f"{'model':34s} {'Spearman ^':>10s} {'AUSE HU v':>9s} {'cov 1':>6s} {'cov 2':>6s} {'cov 3':>6s} "
              f"{'ECE v':>6s} {'case r ^':>8s}")
        for label, u in graded.items():
            print(f"{label:34s} {_f(u['spearman_error_std'], 3):>10s} {_f(u['ause']):>9s} "
                  f"{_f(u['coverage_1'], 3):>6s} {_f(u['coverage_2'], 3):>6s} {_f(u['coverage_3'], 3):>6s} "
                  f"{_f(u['ece'], 3):>6s} {_f(u['case_std_vs_mae']['spearman'], 2):>8s}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/wldm_fidelity"), help="work folder (reused by reruns)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few steps (checks the machinery only)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--workers", type=int, default=None, help="augmentation workers (default: cores - 1)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--set", dest="overrides", default="{}",
                        help="JSON merged into the benchmark's configuration (e.g. '{\"vae\": {\"kl_weight\": 0}}')")
    parser.add_argument("--samples", type=int, default=1,
                        help="samples per case of the stochastic models (> 1: their std maps are graded; the sCT "
                             "is the samples' mean, or the posterior-mean estimate where the plan says so; default 1)")
    parser.add_argument("--mirror-axes", type=int, nargs="*", choices=[0, 1, 2], metavar="AXIS",
                        help="test-time mirroring of every model along these axes (0 z, 1 y, 2 x; plan "
                             "inference.mirror_axes): 2**len(axes) draws per sample, the regression U-Net gets a "
                             "std map; default: none")
    parser.add_argument("--ddim-steps", type=int, default=None, metavar="N",
                        help="DDIM steps per sample of the diffusion models (a prediction setting: trained models are "
                             "reused, predictions redone; default: 10, --quick 2)")
    parser.add_argument("--vae-steps", type=int, default=None, metavar="N",
                        help="the latent models' VAE share of the budget, in steps; their diffusion stage gets the "
                             "rest, every other row the same total (default: the setup's, 350 of 1900 in full mode)")
    parser.add_argument("--seed", type=int, default=SEED, metavar="N",
                        help=f"training seed of every stage (default {SEED}); another seed trains every model anew in "
                             "its own results folder (for the spread of a row over seeds)")
    parser.add_argument("--folds", type=int, default=1, metavar="N",
                        help="fold ensemble of N models per row (default 1: fold 0 alone): every network also trains "
                             f"on cross-fitting folds 1..N-1 (N at most {1 + CROSS_FIT_FOLDS}; each fold trains on the "
                             "training cases less a third of them) and the row predicts with all N, whose spread adds "
                             "to the std maps; the budget counts every fold")
    parser.add_argument("--second-opinion", metavar="ROW",
                        help="a row (e.g. 3d_wldm) whose fold-0, one-sample sCTs of the test and validation cases "
                             "are the second opinion of every row with a std map (wldm_predict --second-opinion: "
                             "their smoothed disagreement adds to the std maps; the plan's inference."
                             "second_opinion_factor, set with --set '{\"inference\": {...}}'); trained here if "
                             "needed (fold 0 only)")
    parser.add_argument("--fresh", action="store_true", help="retrain and repredict everything (keeps the data)")
    parser.add_argument("--no-figures", action="store_true", help="skip the per-case evaluation figures (--quick: "
                        "always skipped)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)} (known: {', '.join(ROWS)})")
    try:
        mirror_axes = check_mirror_axes(args.mirror_axes, "--mirror-axes") or []
    except ValueError as exc:
        parser.error(str(exc))
    opinion = args.second_opinion
    if opinion is not None and (opinion not in ROWS or ROWS[opinion].trainer is None):
        parser.error(f"--second-opinion {opinion}: not a trained row (one of "
                     f"{', '.join(r for r in ROWS if ROWS[r].trainer)})")
    if args.ddim_steps is not None and args.ddim_steps < 1:
        parser.error("--ddim-steps must be >= 1")
    if not 1 <= args.folds <= 1 + CROSS_FIT_FOLDS:
        parser.error(f"--folds must be between 1 and {1 + CROSS_FIT_FOLDS} (fold 0 and the {CROSS_FIT_FOLDS} "
                     "cross-fitting folds)")
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = QUICK if args.quick else FULL
    if args.vae_steps is not None:
        if not 1 <= args.vae_steps < setup.one_stage_steps:
            parser.error(f"--vae-steps must be between 1 and {setup.one_stage_steps - 1} (the budget is "
                         f"{setup.one_stage_steps} steps)")
        setup = replace(setup, vae_steps=args.vae_steps, diffusion_steps=setup.one_stage_steps - args.vae_steps)
    try:
        TrainerOptions(seed=args.seed).check()  # the trainers' own bound, before any data are built
    except ValueError as exc:
        parser.error(str(exc))
    setup = replace(setup, seed=args.seed)
    work = args.work.resolve()
    start = _timer()
    data, preprocessed, plans = prepare(work, setup, json.loads(args.overrides))
    ddim_steps = args.ddim_steps or setup.ddim_steps
    plans.configuration(CONFIGURATION).inference.ddim_steps = ddim_steps  # a prediction setting, like mirroring
    if mirror_axes:  # a prediction setting: trained models are reused, predictions redone
        plans.configuration(CONFIGURATION).inference.mirror_axes = mirror_axes
    test_cases = data.cases("test")
    available = len(splits(data.cases("train"), data.cases("val")))
    if args.folds > available:
        parser.error(f"--folds {args.folds}: this data set's training cases make {available} folds")
    folds = list(range(args.folds))
    if args.fresh:  # (after every check: a refused run deletes nothing)
        for sub in ("results", "predictions", "evaluation", "report"):
            shutil.rmtree(work / sub, ignore_errors=True)
        Path(os.environ[RESULTS]).mkdir(parents=True)  # this run's results folder, made by prepare()

    seconds: dict[str, float] = {}
    row_folds = {row: folds for row in rows}  # what to train: every row's folds, the second opinion's fold 0
    if opinion is not None and opinion not in row_folds:
        row_folds[opinion] = [0]
    vaes = sorted({(ROWS[r].vae, f) for r, fs in row_folds.items() if ROWS[r].vae for f in fs})
    for trainer, fold in vaes:
        seconds[run_label(trainer, fold)] = train(work, "vae", trainer, setup.vae_steps, setup, args.workers, fold)
    priors = {(ROWS[r].prior, f) for r, fs in row_folds.items() for f in prior_folds(ROWS[r], plans, data, fs)}
    for trainer, fold in sorted(priors):
        seconds[run_label(trainer, fold)] = train(work, "regression", trainer, setup.one_stage_steps, setup,
                                                  args.workers, fold)
    for row, row_fold_list in row_folds.items():
        spec = ROWS[row]
        if spec.trainer:
            for fold in row_fold_list:
                seconds[run_label(spec.trainer, fold)] = train(work, spec.stage, spec.trainer, setup.steps(spec),
                                                                 setup, args.workers, fold)

    results: dict[str, dict] = {}
    floor = first_stage_ceilings(data, plans, None)
    opinions: dict[str, Path] = {}  # "test"/"val" -> the second opinion's sCTs
    if opinion is not None:
        opinions["test"], _ = predict(work, opinion, data.test / "mr", plans, 1, name=f"{opinion}_opinion")
        opinions["val"], _ = predict(work, opinion, val_mr_folder(work, data), plans, 1,
                                     name=f"{opinion}_opinion_val")
    for row in rows:
        spec = ROWS[row]
        if spec.trainer is None:
            folder, predict_seconds = bulk_density(data, plans, work / "predictions" / row), 0.0
        else:
            folder, predict_seconds = predict(work, row, data.test / "mr", plans, args.samples, folds=folds)
        per_case = evaluate(work, data, row, folder, figures=not (args.no_figures or args.quick))
        result: dict[str, Any] = {key: float(np.nanmean([per_case[c][key] for c in test_cases])) for key in METRIC_KEYS}
        result["uncertainty"] = uncertainty(work, row, per_case)
        label = row
        if result["uncertainty"] is not None and opinion is not None and opinion != row:
            # the same model's std maps again, with the second opinion's disagreement (its sCT is unchanged)
            label = f"{row}+{opinion}"
            folder, _ = predict(work, row, data.test / "mr", plans, args.samples, name=label, folds=folds,
                                second_opinion=opinions["test"])
            plain, again = result["uncertainty"], evaluate(work, data, label, folder, figures=False)
            per_case = {case: {**values, **{k: v for k, v in again[case].items() if k in UNCERTAINTY_KEYS}}
                        for case, values in per_case.items()}
            result["uncertainty"] = uncertainty(work, label, per_case)
            result["uncertainty_without_second_opinion"] = plain
            result["second_opinion"] = opinion
            result["second_opinion_train_seconds"] = float(sum(  # its fold 0: not in this row's train_seconds
                seconds.get(run_label(t, 0), 0.0) for t in (ROWS[opinion].vae, ROWS[opinion].trainer) if t))
        if result["uncertainty"] is not None:  # again with the std scale fitted on the validation case(s)
            scaled, scale = calibrated_std(work, data, row, plans, args.samples, folder, folds, label,
                                           opinions.get("val") if label != row else None)
            calibrated = evaluate(work, data, f"{label}_calibrated", scaled, figures=False)
            result["uncertainty_calibrated"] = {**uncertainty(work, f"{label}_calibrated", calibrated),
                                                "std_scale": scale}
        if spec.vae:
            ceilings = first_stage_ceilings(data, plans, spec.trainer)
            result["first_stage_mae_hu"] = float(np.mean(list(ceilings.values())))
            for case in test_cases:
                per_case[case]["first_stage_mae_hu"] = ceilings[case]
        trained = [run_label(t, f) for t in (spec.vae, spec.trainer) if t for f in folds]
        trained += [run_label(spec.prior, f) for f in prior_folds(spec, plans, data, folds)]
        result["train_seconds"] = float(sum(seconds.get(t, 0.0) for t in trained))
        result["predict_seconds"] = predict_seconds
        result["budget"] = budget(row, setup, plans, data, folds) if spec.trainer else None
        result["per_case"] = per_case
        results[row] = result

    report = work / "report"
    report.mkdir(parents=True, exist_ok=True)
    learning_curves(work, rows, report / "learning_curves.png")
    with open(report / "fidelity.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "case", *METRIC_KEYS, "first_stage_mae_hu"])
        for row, r in results.items():
            for case in test_cases:
                values = r["per_case"][case]
                writer.writerow([row, case, *[f"{values[k]:.6g}" for k in METRIC_KEYS],
                                 f"{values['first_stage_mae_hu']:.6g}" if "first_stage_mae_hu" in values else ""])

    print(f"\nfidelity benchmark ({'quick: machinery check only' if args.quick else 'full'}"
          f"{f'; fold ensembles of {len(folds)}' if len(folds) > 1 else ''}); test cases: {', '.join(test_cases)}")
    print(f"NOTE: {PROXY_NOTE}; phantom_test is the real phantom's held-out slab.")
    for row in rows:
        b = results[row]["budget"]
        if b:
            print(f"budget {row}: " + " + ".join(f"{s['trainer']} {s['steps']} steps x batch {s['batch']} x patch "
                                                f"{'x'.join(map(str, s['patch']))}" for s in b["stages"])
                  + f" = {b['voxels']:,} voxels")
    print(f"resampling floor (true CT to the {setup.spacing:g} mm grid and back, no network): "
          f"{np.mean(list(floor.values())):.1f} HU MAE")
    print_table(results, test_cases)
    print(f"\nreport: {report}; total {(_timer() - start):.0f} s")
    summary = {
        "models": {row: {k: v for k, v in r.items()} for row, r in results.items()},
        "test_cases": test_cases,
        "resampling_floor_mae_hu": float(np.mean(list(floor.values()))),
        "quick": bool(args.quick),
        "threads": torch.get_num_threads(),
        "spacing_mm": setup.spacing,
        "ddim_steps": ddim_steps,
        "samples": args.samples,
        "mirror_axes": mirror_axes,
        "seed": setup.seed,
        "folds": folds,
        "second_opinion": opinion,
        "seconds": round(_timer() - start, 1),
        "note": PROXY_NOTE,
    }
    write_json(summary, report / "fidelity.json")
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
