"""Companion methods on the phantom: latent (3D-WLDM) vs wavelet-domain (WDM-style) diffusion, one vs two MR sequences.

    python bench/companions.py --work /tmp/companions [--diffusion-steps 2000] [--threads 2]

Everything goes through the Python API behind the command-line tools a user runs (benchmarks call
the API, not argparse): the example installer (plain, and with a derived second sequence: the T2
plus a channel DERIVED from it, not a second scan), ``plan_and_preprocess`` (3 mm, registration on,
the 'cpu' plan preset), ``run_training`` (same seed and steps for the two diffusion kinds),
``predict_folder`` (same DDIM steps and seed; the plan's samples, as ``wldm_predict``) and
``evaluate_folder`` against the registered CT inside body AND real CT. Finished stages are reused when run again. Prints one JSON line per evaluated
prediction and a table at the end; training seconds per step come from each model's history.json.

One object, trained and evaluated on itself: this compares the machinery, not generalisation.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from wldm_auto.dataset_conversion.example import install_example
from wldm_auto.evaluation.evaluate import evaluate_folder
from wldm_auto.inference.folds import load_model
from wldm_auto.inference.predictor import predict_folder
from wldm_auto.io.files import read_json, write_json
from wldm_auto.paths import PREPROCESSED, RAW, RESULTS, model_folder_name
from wldm_auto.preprocessing.pipeline import plan_and_preprocess
from wldm_auto.trainers.base import TrainerOptions
from wldm_auto.trainers.run import run_training

ONE, TWO = 11, 12  # dataset ids
def _prepare(dataset_id: int, derived: bool, spacing: float) -> tuple[Path, Path, str]:
    raw_root = Path(os.environ[RAW])
    existing = sorted(raw_root.glob(f"Dataset{dataset_id:03d}_*"))
    raw = existing[0] if existing else install_example(dataset_id, derived_second_sequence=derived)
    summary = plan_and_preprocess(dataset_id, 1, spacing=[spacing], preset="cpu")
    if summary.failed:
        raise SystemExit(f"preprocessing failed: {summary.failed[0].message}")
    return raw, summary.folder, summary.dataset


def _reference(out: Path, preprocessed: Path, raw: Path) -> tuple[Path, Path, Path]:
    """Registered CT (HU, MR grid), evaluation mask (body AND real CT) and MR folders for the evaluation."""
    import SimpleITK as sitk

    from wldm_auto.io.images import read_image, write_image
    from wldm_auto.planners.schema import Plans
    from wldm_auto.preprocessing.case import body_mask

    ref, masks, mr_dir = out / "reference" / "ct", out / "reference" / "masks", out / "reference" / "mr"
    for folder in (ref, masks, mr_dir):
        folder.mkdir(parents=True, exist_ok=True)
    registration = preprocessed / "registration" / "phantom"
    mr_path = raw / "imagesTr" / "phantom_0000.nii.gz"
    shutil.copyfile(registration / "ct_registered.nii.gz", ref / "phantom.nii.gz")
    shutil.copyfile(mr_path, mr_dir / "phantom.nii.gz")
    body = body_mask(read_image(mr_path, sitk.sitkFloat32), Plans.load(preprocessed / "plans.json"))
    valid = read_image(registration / "valid_mask.nii.gz")
    write_image(sitk.And(body > 0, valid > 0), masks / "phantom.nii.gz")
    return ref, masks, mr_dir


def _train(dataset: str, stage: str, trainer: str, steps: int, epochs: int) -> dict:
    folder = Path(os.environ[RESULTS]) / dataset / model_folder_name(trainer) / "fold_0"
    if not (folder / "checkpoint_final.pt").is_file():
        options = TrainerOptions(device="cpu", seed=12345, num_steps=steps, steps_per_epoch=max(1, steps // epochs))
        run_training(dataset, stage, 0, trainer, resume=(folder / "checkpoint_latest.pt").is_file(), options=options)
    history = read_json(folder / "history.json")
    seconds = sum(h["epoch_seconds"] for h in history)
    return {"trainer": trainer, "steps": history[-1]["step"], "train_seconds": round(seconds, 1),
            "seconds_per_step_incl_validation": round(seconds / history[-1]["step"], 3)}


def _predict_and_evaluate(label: str, dataset: str, trainer: str, mr_dir: Path, out: Path, ref: Path, masks: Path,
                          ddim_steps: int) -> dict:
    target = out / "predictions" / label
    start = time.time()
    if not any(target.glob("phantom.*")):
        folds = load_model(Path(os.environ[RESULTS]) / dataset / model_folder_name(trainer), None, torch.device("cpu"))
        outcomes = predict_folder(mr_dir, target, folds, steps=ddim_steps, samples=None, seed=0,
                                  overwrite=True)
        failed = [o for o in outcomes if o.status == "failed"]
        if failed:
            raise SystemExit(f"prediction {label} failed: {failed[0].case}: {failed[0].message}")
    seconds = time.time() - start
    report = out / "evaluation" / label
    metrics = evaluate_folder(ref, target, report, mask_dir=masks, figures=False)["metrics"]
    row = {"label": label, "trainer": trainer, "predict_seconds": round(seconds, 1)}
    row.update({k: round(v["mean"], 4) for k, v in metrics.items() if k != "n" and v.get("mean") is not None})
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="working folder (raw/, preprocessed/, results/ ...)")
    parser.add_argument("--diffusion-steps", type=int, default=2000, help="training steps of both diffusion kinds")
    parser.add_argument("--stage1-steps", type=int, default=600, help="training steps of the VAE and regression U-Net")
    parser.add_argument("--ddim-steps", type=int, default=20, help="DDIM steps at prediction")
    parser.add_argument("--spacing", type=float, default=3.0, help="target spacing in mm (default 3, as the demo)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # as the CLIs log
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.work.resolve()
    for variable, sub in ((RAW, "raw"), (PREPROCESSED, "preprocessed"), (RESULTS, "results")):
        (out / sub).mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(out / sub)

    raw1, pre1, one = _prepare(ONE, False, args.spacing)
    raw2, pre2, two = _prepare(TWO, True, args.spacing)
    training = []
    for dataset, stage, trainer, steps in (
            (one, "vae", "VAETrainer", args.stage1_steps),
            (one, "diffusion", "DiffusionTrainer", args.diffusion_steps),
            (one, "wavelet_diffusion", "WaveletDiffusionTrainer", args.diffusion_steps),
            (one, "regression", "RegressionTrainer", args.stage1_steps),
            (two, "vae", "VAETrainer", args.stage1_steps),
            (two, "diffusion", "DiffusionTrainer", args.diffusion_steps),
            (two, "regression", "RegressionTrainer", args.stage1_steps)):
        row = {"dataset": dataset, **_train(dataset, stage, trainer, steps, 4)}
        print(json.dumps(row), flush=True)
        training.append(row)

    # one reference for every model: dataset ONE's registered CT (the T2 is the same in both datasets)
    ref, masks, mr_dir = _reference(out, pre1, raw1)
    inputs = {"both": out / "inputs" / "both", "t2_only": out / "inputs" / "t2_only",
              "derived_only": out / "inputs" / "derived_only"}
    for name, channels in (("both", (0, 1)), ("t2_only", (0,)), ("derived_only", (1,))):
        inputs[name].mkdir(parents=True, exist_ok=True)
        for c in channels:
            target = inputs[name] / f"phantom_{c:04d}.nii.gz"
            if not target.exists():
                shutil.copyfile(raw2 / "imagesTr" / f"phantom_{c:04d}.nii.gz", target)
    rows = [
        _predict_and_evaluate("latent_1seq", one, "DiffusionTrainer", mr_dir, out, ref, masks, args.ddim_steps),
        _predict_and_evaluate("wavelet_1seq", one, "WaveletDiffusionTrainer", mr_dir, out, ref, masks, args.ddim_steps),
        _predict_and_evaluate("regression_1seq", one, "RegressionTrainer", mr_dir, out, ref, masks, args.ddim_steps),
    ]
    for name, folder in inputs.items():
        for kind, trainer in (("latent", "DiffusionTrainer"), ("regression", "RegressionTrainer")):
            rows.append(_predict_and_evaluate(f"{kind}_2seq_{name}", two, trainer, folder, out, ref, masks,
                                              args.ddim_steps))
    available = [k for k in rows[0] if k not in ("label", "trainer", "predict_seconds")]
    print("\n" + f"{'prediction':32s}" + "".join(f"{k:>12s}" for k in available) + f"{'predict s':>12s}")
    for row in rows:
        print(f"{row['label']:32s}" + "".join(f"{row.get(k, float('nan')):12.4g}" for k in available)
              + f"{row['predict_seconds']:12.1f}")
    write_json({"training": training, "predictions": rows, "args": {k: str(v) for k, v in vars(args).items()}},
               out / "companions.json")
    print(f"\n{out / 'companions.json'}")


if __name__ == "__main__":
    main()
