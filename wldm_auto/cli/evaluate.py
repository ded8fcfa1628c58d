"""wldm_evaluate: SynthRAD-style metrics of synthetic CT against reference CT, per case and summarised."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wldm_auto.cli.common import add_log_file, run_cli, setup_logging

DESCRIPTION = """\
Compare every synthetic CT in a folder with its reference CT.

Pairing is by case name (file name without its ending): CT_DIR/CASE.nii.gz with
SCT_DIR/CASE.nii.gz (any supported ending, DICOM folders too). SCT_DIR/CASE_std<ending>
(wldm_predict --save-std) is picked up as the case's uncertainty map. Masks:
MASK_DIR/CASE<ending>; without -m, the body of the reference CT (CT > -500 HU, largest
connected component, holes filled). MR for the figures: MR_DIR/CASE_0000<ending> or CASE<ending>.

Metrics inside the mask: MAE (HU, no clipping); PSNR (clip to [-1024, 3000], range 4024);
SSIM as SynthRAD2023 (clip, -1024 outside the mask, +1024, 3D skimage SSIM with a 7-voxel
window, mean inside the mask); masked MS-SSIM as SynthRAD2025 (5 scales, fewer for small
volumes); NCC (Pearson); bone Dice (> 250 HU). With a std map, how well it tracks the error:
Spearman of |sCT - CT| and std, AUSE (HU; area between the MAE-after-removal curves by std and
by true error, 50 removed fractions), coverage of |error| <= k std for k = 1, 2, 3 (Gaussian
0.6827/0.9545/0.9973), ECE (Gaussian levels 0.05..0.95), mean std; across cases, the
correlation of mean std and MAE (summary.json, 3 cases or more).

Outputs in OUT (default SCT_DIR_evaluation/ beside SCT_DIR, never inside it): metrics.csv
(one row per case), summary.json (mean, std, median, n per metric with n_nan/n_inf counting
the cases whose value is not finite, the failed cases, and the definitions), CASE.png
(axial/coronal/sagittal through the mask's centre: MR, CT and sCT in a wide and a soft-tissue
window, |error| 0..500 HU, std; titled with --label), with a std map CASE_sparsification.png
and CASE_reliability.png, logs/.

A sCT on another grid than its CT is an error unless --resample (linear, air -1024 outside).
A case present on one side only is an error unless --allow-missing.
An OUT holding an earlier evaluation is refused unless --overwrite (which first deletes
that evaluation's figures); the CT, sCT and mask folders must differ.
A case that cannot be evaluated (unreadable or truncated image, empty mask) is reported by
name and the others are evaluated; the failed ones are listed at the end (exit status 1).

  wldm_evaluate -r ct/ -p sct/ -m masks/ --mr mr/ -o report/
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wldm_evaluate", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", "--reference", dest="ct_dir", type=Path, required=True, metavar="CT_DIR",
                        help="folder of reference CT images (HU)")
    parser.add_argument("-p", "--prediction", dest="sct_dir", type=Path, required=True, metavar="SCT_DIR",
                        help="folder of synthetic CT images (HU), optionally with CASE_std maps")
    parser.add_argument("-m", "--masks", dest="mask_dir", type=Path, metavar="MASK_DIR",
                        help="folder of masks (> 0 inside); default: body mask of each reference CT")
    parser.add_argument("--mr", dest="mr_dir", type=Path, metavar="MR_DIR", help="folder of MR images (figures only)")
    parser.add_argument("-o", "--output", type=Path, metavar="OUT",
                        help="output folder (default SCT_DIR_evaluation beside SCT_DIR)")
    parser.add_argument("--resample", action="store_true",
                        help="resample sCT/std/mask that lie on another grid onto the CT's (else an error)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="evaluate the cases present on both sides (with a warning) instead of failing")
    parser.add_argument("--no-figures", action="store_true", help="skip the per-case PNG figures")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier evaluation in OUT (its metrics.csv, summary.json and figures); "
                             "without it such an OUT is refused")
    parser.add_argument("--label", help="model name for figure titles and summary.json (e.g. 'regression U-Net')")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def action() -> int:
        from wldm_auto.evaluation.evaluate import (METRICS, EvaluationError, check_output_folder, default_output,
                                                   evaluate_folder)

        out = args.output if args.output is not None else default_output(args.sct_dir)
        inputs = (("CT", args.ct_dir), ("sCT", args.sct_dir), ("mask", args.mask_dir), ("MR", args.mr_dir))
        for what, folder in inputs:  # checked before anything is created
            if folder is not None and not folder.is_dir():
                raise ValueError(f"{what} folder {folder} not found" + (" (it is a file)" if folder.is_file() else ""))
        check_output_folder(out, args.ct_dir, args.sct_dir, args.mask_dir, args.mr_dir, args.overwrite)
        out.mkdir(parents=True, exist_ok=True)
        add_log_file(out, "evaluate")
        failed: dict[str, str] = {}
        try:
            summary = evaluate_folder(args.ct_dir, args.sct_dir, out, args.mask_dir, args.mr_dir, args.resample,
                                      args.allow_missing, not args.no_figures, args.label, args.overwrite)
        except EvaluationError as exc:
            summary, failed = exc.summary, exc.failed
        print(f"{summary['n_cases']} case(s) evaluated -> {out}")
        for key in METRICS:
            stats = summary["metrics"][key]
            if stats["n"]:
                print(f"  {key:<13} {stats['mean']:10.4f} +- {stats['std']:.4f}  (median {stats['median']:.4f}, "
                      f"n={stats['n']})")
        for case, message in failed.items():
            print(f"failed: {case}: {message}", file=sys.stderr)
        if failed:
            print(f"error: {len(failed)} case(s) could not be evaluated: {', '.join(failed)}", file=sys.stderr)
            return 1
        return 0

    return run_cli(action)


if __name__ == "__main__":
    sys.exit(main())
