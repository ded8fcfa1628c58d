"""wldm_predict: synthetic CT (int16 HU, input MR geometry) for a folder of MR volumes."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from wldm_auto.cli.common import attach_log_file, run_cli, setup_logging

DESCRIPTION = """\
Predict synthetic CT for every MR in a folder with a trained diffusion model
(-tr DiffusionTrainer, the default; -tr WaveletDiffusionTrainer for the
wavelet-domain model) or the regression baseline (-tr RegressionTrainer;
deterministic, so --steps, --samples and --eta do not apply and --save-std needs
several folds, test-time mirroring, or a U-Net trained with the plan's
regression.error_head, whose predicted error gives a std map from one pass).

Input: CASE_0000.nii.gz (+ _0001 ... for more MR channels), CASE.mha (one channel)
or DICOM series sub-folders. A model trained on several MR sequences takes any
non-empty subset of them (e.g. only CASE_0001): the log says which were used and
which were missing; a channel the model never saw fails that case, naming it. Output per case: CASE<ending> (int16 HU, exactly the
input MR's size, spacing, origin and direction; outside the body -1024), with
--save-std CASE_std<ending> (voxel-wise standard deviation over samples, folds and
mirrorings, plus an error head's predicted std in variance, HU; multiplied by the model's std scale when the model folder holds std_scale.json
from wldm_calibrate_std, --no-std-scale ignores it), with --confidence-hu H
CASE_confidence<ending> (uint8 on the sCT's grid: 1 inside the body where
2 * std < H HU, i.e. voxels whose sCT is within about H HU at ~95 % when the std
is calibrated; 0 where 2 * std >= H and everywhere outside the body, where the sCT
is air by construction; needs a std map: several samples of a diffusion model,
several folds, mirroring or an error head, checked before any case is predicted), with --mumap
CASE_mumap<ending> (float32 attenuation map for PET/MR, cm^-1 at 511 keV, from
the sCT by the bilinear HU-to-mu conversion of Carney et al. 2006,
Med Phys 33:976, with the kVp and coefficients of the plan's mu_map section:
120 kVp unless the plan says otherwise; air 0, water 0.096), with --dicom-out a
CT DICOM series CASE_dicom/ (ImageType DERIVED\\SECONDARY, a series description
naming the model; signed int16 HU, rescale slope 1, intercept 0). When the
input MR is a DICOM series, that series carries the MR's patient module, Study
Instance UID, Frame of Reference UID and patient position (so it joins the
MR's study and fuses with it without registration) with its own Series and
SOP Instance UIDs, reproducible from the MR series, the model and the voxels;
NIfTI/MHA input gives new UIDs. The output folder
holds nothing else: the log goes to OUTPUT_logs/ beside it. The output folder must
not be the input folder or lie inside it. Every image is written to a temporary
name, checked, then renamed: a full disk fails the case (and the rest), naming the
file, and --continue skips only cases whose outputs read back completely.

Each case runs the same code as the Python API (wldm_auto.Predictor), which
predicts from images in memory without writing files.

Several processes, GPUs or machines (the same output folder whatever their number;
each process logs to its own file):
  --num-parts N --part-id I   this job predicts part I of N (cases[I::N] of the sorted
                              cases), e.g. one part per job of a job array
  torchrun --nproc_per_node 4 -m wldm_auto.cli.predict -i ... -o ... -m ...
                              4 processes (one GPU each), each predicting its share
  torchrun --nproc_per_node 4 -m wldm_auto.cli.predict ... --split-case
                              every case spread over the 4 GPUs (encoding, the tiles of
                              every DDIM step, decoding); same voxels as one process

  wldm_predict -i mr/ -o sct/ -d 001 -f 0 --steps 50 --samples 5 --save-std
  wldm_predict -i mr/ -o sct/ -d 001 -tr RegressionTrainer --mirror-axes 0 1 2 --save-std
  wldm_predict -i mr/ -o sct/ -m $wldm_results/Dataset001_X/DiffusionTrainer__wldmPlans__3d_wldm
  wldm_predict -i mr_dicom/ -o sct/ -m model.zip --dicom-out --mumap

-m takes a model zip from wldm_export_model as it is: every file's SHA-256 is
checked, it is unpacked into a temporary folder under $TMPDIR (removed once the
model is loaded; nothing is installed) and its checkpoints are loaded with weights only.
wldm_install_model installs a zip for good.
"""


def log_beside(output: Path, prefix: str) -> logging.FileHandler:
    """Also log (DEBUG and up) to ``<output>_logs/<prefix>_<time>.log`` beside ``output``; returns the handler.

    The prediction folder holds only predictions (``wldm_evaluate`` and PACS imports read all of it)."""
    resolved = output.resolve()
    return attach_log_file(resolved.parent / f"{resolved.name}_logs" if resolved.name else resolved / "logs", prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wldm_predict", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", type=Path, required=True, help="folder of MR images or DICOM folders")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="folder for the sCT files (not the input folder nor inside it; log in OUTPUT_logs/)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-d", "--dataset", help="dataset id/name whose trained model to use (with -tr, -p, -c)")
    source.add_argument("-m", "--model", type=Path,
                        help="a model folder (<Trainer>__<plans>__<config>) or a model zip (wldm_export_model)")
    parser.add_argument("-f", "--folds", type=int, nargs="+", help="folds to ensemble (default: all present)")
    parser.add_argument("-tr", "--trainer", default="DiffusionTrainer", help="trainer name (with -d)")
    parser.add_argument("-p", "--plans", default="wldmPlans", help="plans name (with -d)")
    parser.add_argument("-c", "--configuration", default="3d_wldm", help="configuration (with -d)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pt", help="checkpoint file in each fold folder")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the plan's, 50)")
    parser.add_argument("--samples", type=int,
                        help="samples per fold (averaged; spread -> --save-std; default: the plan's inference.samples, 1)")
    parser.add_argument("--eta", type=float,
                        help="DDIM eta (default: the plan's inference.ddim_eta, 0 = deterministic given the start noise)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the start noise")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    parser.add_argument("--overlap", type=float, help="tile overlap in [0, 1) (default: the plan's, 0.5)")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "float16"],
                        help="the networks' autocast dtype (blending and DDIM steps stay float32; default: the "
                             "plan's inference.precision, float32; bfloat16 on a GPU without it: float16)")
    parser.add_argument("--mirror-axes", type=int, nargs="*", choices=[0, 1, 2], metavar="AXIS",
                        help="test-time mirroring: also predict on the MR flipped along every subset of these "
                             "axes (0 z, 1 y, 2 x) and average; 2**len(axes) times the time, and the flips' "
                             "spread enters --save-std (a regression model's only std map). Given without axes: "
                             "off. Default: the plan's inference.mirror_axes (none)")
    parser.add_argument("--save-std", action="store_true", help="write CASE_std: standard deviation over samples (HU)")
    parser.add_argument("--edge-std-mm", type=float, metavar="MM",
                        help="the std map's edge term: MM x the sCT's gradient (HU/mm, smoothed over 2 mm) added in "
                             "variance, the HU change of a structure MM off; 0: off. Default: the plan's "
                             "inference.edge_std_mm (4 in new plans, 0 in plans written before it)")
    parser.add_argument("--second-opinion", type=Path, metavar="DIR",
                        help="a second model's sCTs of the same cases (e.g. 3D-WLDM's wldm_predict output folder, "
                             "CASE<ending> on the MR's grid): where the two sCTs differ, K x their smoothed "
                             "difference is added to the std map in variance (needs --save-std or --confidence-hu; "
                             "fit the std scale on validation predictions made the same way)")
    parser.add_argument("--second-opinion-factor", type=float, metavar="K",
                        help="weight K of the second opinion's disagreement (>= 0; default: the plan's "
                             "inference.second_opinion_factor, 2; smoothing: inference.second_opinion_smoothing_mm, "
                             "4 mm)")
    parser.add_argument("--no-std-scale", action="store_true",
                        help="ignore the model folder's std_scale.json (wldm_calibrate_std): raw std over the draws")
    parser.add_argument("--confidence-hu", type=float, metavar="H",
                        help="also write CASE_confidence: uint8, 1 inside the body where 2 * std < H HU (H > 0; "
                             "needs several samples or folds)")
    parser.add_argument("--dicom-out", action="store_true",
                        help="also write a CT DICOM series per case (CASE_dicom/; joins a DICOM MR's study)")
    parser.add_argument("--mumap", action="store_true",
                        help="also write CASE_mumap: PET attenuation map, float32 cm^-1 at 511 keV (plan mu_map)")
    parser.add_argument("--file-ending", help="output file ending (default: the input's; .nii.gz for DICOM)")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="skip cases whose outputs exist and read back completely")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    ranks = parser.add_argument_group("several processes (job arrays, torchrun)")
    ranks.add_argument("--num-parts", type=int, default=1, help="split the cases into this many parts (default 1)")
    ranks.add_argument("--part-id", type=int, default=0, help="the part this job predicts, 0 .. num-parts - 1")
    ranks.add_argument("--split-case", action="store_true",
                       help="under torchrun: spread every case over all ranks instead of sharing out the cases")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def action() -> int:
        from wldm_auto.inference.inputs import check_input_folder
        from wldm_auto.inference.calibration import check_confidence_hu
        from wldm_auto.inference.folds import (check_edge_std_mm, check_eta, check_overlap, check_seed, load_model,
                                               resolve_device)
        from wldm_auto.inference.predictor import (check_confidence, check_second_opinion, plan_samples,
                                                   predict_folder, prepare_prediction, second_opinion_cases)
        from wldm_auto.inference.second_opinion import check_factor
        from wldm_auto.inference.sharding import start_ranks

        if (args.samples is not None and args.samples < 1) or (args.steps is not None and args.steps < 1):
            raise ValueError("--samples and --steps must be at least 1")
        check_confidence_hu(args.confidence_hu, "--confidence-hu")
        check_edge_std_mm(args.edge_std_mm, "--edge-std-mm")
        check_eta(args.eta, "--eta")
        check_overlap(args.overlap, "--overlap")
        check_seed(args.seed, "--seed")
        check_factor(args.second_opinion_factor, "--second-opinion-factor")
        if args.second_opinion_factor is not None and args.second_opinion is None:
            raise ValueError("--second-opinion-factor weighs a second opinion: give --second-opinion DIR too")
        if args.second_opinion is not None:
            if not args.second_opinion.is_dir():
                raise ValueError(f"--second-opinion {args.second_opinion}: not a folder (give the folder of the "
                                 "second model's sCTs)")
            if args.split_case:
                raise ValueError("--second-opinion is not supported with --split-case (share out the cases instead)")
        device = resolve_device(args.device, "--device")
        check_input_folder(args.input)
        ranks, device = start_ranks(device, args.split_case, args.num_parts, args.part_id)
        if args.model is not None:
            model = args.model
        else:
            from wldm_auto.paths import RESULTS, model_folder_name, resolve_dataset_name, results_root

            name = resolve_dataset_name(args.dataset, (RESULTS,))
            model = results_root() / name / model_folder_name(args.trainer, args.plans, args.configuration)
        folds = load_model(model, args.folds, device, args.overlap, args.checkpoint, precision=args.precision,
                           std_scale=not args.no_std_scale, mirror_axes=args.mirror_axes,
                           edge_std_mm=args.edge_std_mm)
        check_confidence(folds, plan_samples(folds, args.samples), args.confidence_hu, "--confidence-hu")
        if args.second_opinion is not None:
            check_second_opinion(folds, plan_samples(folds, args.samples), args.save_std, args.confidence_hu)
        ranks.spread(folds)
        cases = prepare_prediction(args.input, args.output, args.resume, args.overwrite, args.file_ending,
                                   *ranks.share)
        if args.second_opinion is not None:
            second_opinion_cases(args.second_opinion, args.output, cases)
        # every check passed: only now create anything
        args.output.mkdir(parents=True, exist_ok=True)
        handler = log_beside(args.output, ranks.log_prefix())
        try:
            if ranks.writes:
                outcomes = predict_folder(args.input, args.output, folds, args.steps, args.samples, args.seed,
                                          args.eta, args.save_std, args.resume, args.overwrite, args.file_ending,
                                          args.dicom_out, cases=cases, mumap=args.mumap, announce=ranks.announce,
                                          confidence_hu=args.confidence_hu, second_opinion_dir=args.second_opinion,
                                          second_opinion_factor=args.second_opinion_factor)
            else:  # --split-case, ranks > 0: compute with rank 0, which writes
                outcomes = ranks.follow(folds, cases, args.output, args.steps, args.samples, args.seed, args.eta,
                                        args.file_ending, args.save_std, args.confidence_hu)
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
            ranks.finish()
        failed = [o for o in outcomes if o.status == "failed"]
        if not ranks.writes:
            return 1 if failed else 0
        done = sum(o.status == "done" for o in outcomes)
        skipped = sum(o.status == "skipped" for o in outcomes)
        print(f"{done} predicted, {skipped} skipped (existing), {len(failed)} failed -> {args.output}")
        for outcome in failed:
            print(f"failed: {outcome.case}: {outcome.message}", file=sys.stderr)
        return 1 if failed else 0

    return run_cli(action)


if __name__ == "__main__":
    sys.exit(main())
