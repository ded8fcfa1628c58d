"""wldm_calibrate_std: fit a scale for a model's std maps on held-out cases and store it with the model."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wldm_auto.cli.common import add_log_file, run_cli, setup_logging

DESCRIPTION = """\
Calibrate the uncertainty (std) maps of a trained model: fit one scale s on
validation cases the model never saw and store it as MODEL_FOLDER/std_scale.json.
From then on wldm_predict and the Python API (wldm_auto.Predictor) multiply every
std map of that model by s (wldm_predict --no-std-scale / std_scale=False ignore it).

Steps:
  1. hold out a few cases with a CT registered to their MR (not used in training),
  2. wldm_predict -i val_mr/ -o val_sct/ -m MODEL_FOLDER --samples 5 --save-std
  3. wldm_calibrate_std -m MODEL_FOLDER -ct val_ct/ -s val_sct/ --samples 5
  4. predict new cases with the same --samples (and folds): their std maps come scaled.
A regression U-Net with an error head (plan regression.error_head) needs no --samples:
its one pass gives the std map (step 2 with --save-std alone).

Pairing by case name, as wldm_evaluate: CT_DIR/CASE<ending> with SCT_DIR/CASE<ending>
and SCT_DIR/CASE_std<ending> (--std-dir if the std maps lie elsewhere). CTs without an
sCT are ignored, so CT_DIR may hold every case. Voxels: inside MASK_DIR/CASE<ending> (> 0),
or without --mask the CT's body (CT > -500 HU, largest connected component, holes
filled), where std > 0 (outside the sCT's body std is 0 and those voxels say nothing).

The fit: r = |sCT - CT| / std, pooled over all cases; s = quantile(r, 0.9545) / 2, so
that after scaling exactly 95.45 % of those voxels (a Gaussian's share) have
|error| <= 2 * s * std, the coverage at k = 2 the project checks. The maximum-likelihood
scale sqrt(mean(r^2)) is stored too, for information: heavy-tailed errors (registration,
edges) inflate it. The scale holds for the number of samples, folds, mirrorings and the
edge term it was fitted with: pass --samples/--steps/--folds/--mirror-axes/--edge-std-mm
as used in step 2 so std_scale.json records them and a prediction with other settings is
warned about.

std_scale.json (written atomically): scale, method, ml_scale, coverage_2_before,
coverage_2_after, cases, n_voxels, created, samples, steps, folds, mirror_axes, edge_std_mm,
second_opinion_factor, per-case figures.
An existing one is kept unless --overwrite. Log: MODEL_FOLDER/logs/.

  wldm_calibrate_std -m $wldm_results/Dataset001_X/DiffusionTrainer__wldmPlans__3d_wldm \\
      -ct val_ct/ -s val_sct/ --mask val_masks/ --samples 5 --steps 50
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wldm_calibrate_std", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", type=Path, required=True, metavar="MODEL_FOLDER",
                        help="the model folder (<Trainer>__<plans>__<config>) that made the predictions")
    parser.add_argument("-ct", "--ct", dest="ct_dir", type=Path, required=True, metavar="CT_DIR",
                        help="folder of reference CTs (HU) on the MR grid of the held-out cases")
    parser.add_argument("-s", "--sct", dest="sct_dir", type=Path, required=True, metavar="SCT_DIR",
                        help="wldm_predict --save-std output for those cases (CASE + CASE_std)")
    parser.add_argument("--std-dir", type=Path, metavar="STD_DIR", help="where CASE_std lies (default: SCT_DIR)")
    parser.add_argument("--mask", dest="mask_dir", type=Path, metavar="MASK_DIR",
                        help="folder of masks (> 0 inside); default: the body of each CT (CT > -500 HU)")
    parser.add_argument("--samples", type=int, help="samples per fold the predictions were made with (recorded)")
    parser.add_argument("--steps", type=int, help="DDIM steps the predictions were made with (recorded)")
    parser.add_argument("--folds", type=int, nargs="+", help="folds the predictions ensembled (recorded)")
    parser.add_argument("--mirror-axes", type=int, nargs="*", choices=[0, 1, 2], metavar="AXIS",
                        help="wldm_predict --mirror-axes the predictions were made with (recorded; without axes: "
                             "none)")
    parser.add_argument("--edge-std-mm", type=float, metavar="MM",
                        help="the std maps' edge term the predictions were made with (recorded): the model's plan "
                             "inference.edge_std_mm, or wldm_predict --edge-std-mm if given there")
    parser.add_argument("--second-opinion-factor", type=float, metavar="K",
                        help="the second-opinion factor the predictions were made with (recorded; 0: they had no "
                             "wldm_predict --second-opinion): the plan's inference.second_opinion_factor, or "
                             "wldm_predict --second-opinion-factor if given there")
    parser.add_argument("--resample", action="store_true",
                        help="resample sCT/std/mask that lie on another grid onto the CT's (else an error)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="fit on the cases that have a CT (and mask) instead of failing on those that do not")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing std_scale.json")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def action() -> int:
        from wldm_auto.inference.calibration import (check_model_folder, fit_from_folders, std_scale_path,
                                                     write_std_scale)
        from wldm_auto.inference.folds import check_edge_std_mm
        from wldm_auto.inference.second_opinion import check_factor

        for option, value in (("--samples", args.samples), ("--steps", args.steps)):
            if value is not None and value < 1:
                raise ValueError(f"{option} must be at least 1, got {value}")
        check_edge_std_mm(args.edge_std_mm, "--edge-std-mm")
        check_factor(args.second_opinion_factor, "--second-opinion-factor")
        target = std_scale_path(check_model_folder(args.model))
        if target.exists() and not args.overwrite:  # before the (slow) fit
            raise FileExistsError(f"{target}: exists; --overwrite replaces it")
        for what, folder in (("CT", args.ct_dir), ("sCT", args.sct_dir), ("std", args.std_dir),
                             ("mask", args.mask_dir)):
            if folder is not None and not folder.is_dir():
                raise ValueError(f"{what} folder {folder} not found" + (" (it is a file)" if folder.is_file() else ""))
        add_log_file(args.model, "calibrate_std")  # every check passed: only now create anything
        calibration = fit_from_folders(args.ct_dir, args.sct_dir, args.std_dir, args.mask_dir, args.resample,
                                       args.allow_missing)
        path = write_std_scale(args.model, calibration.scale,
                               calibration.record(args.samples, args.steps, args.folds, args.mirror_axes,
                                                  args.edge_std_mm, args.second_opinion_factor), args.overwrite)
        print(f"std scale {calibration.scale:.4g} (maximum likelihood {calibration.ml_scale:.4g}) from "
              f"{len(calibration.cases)} case(s), {calibration.n_voxels} voxels -> {path}")
        print(f"coverage of |error| <= 2 std: {100 * calibration.coverage_2_before:.1f} % before, "
              f"{100 * calibration.coverage_2_after:.1f} % after (Gaussian 95.4 %)")
        for case in calibration.cases:
            print(f"  {case.case:<20} {100 * case.coverage_2_before:5.1f} % -> {100 * case.coverage_2_after:5.1f} %  "
                  f"(MAE {case.mae_hu:.1f} HU, mean std {case.mean_std_hu:.1f} HU)")
        return 0

    return run_cli(action)


if __name__ == "__main__":
    sys.exit(main())
