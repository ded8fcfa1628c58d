"""wldm_plan_and_preprocess: fingerprint -> plan -> preprocess, each stage skipped when current."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

from wldm_auto.cli.common import add_log_file, run_cli, setup_logging

log = logging.getLogger("wldm_plan_and_preprocess")

DESCRIPTION = """\
Plan and preprocess a raw dataset ($wldm_raw/DatasetXXX_Name) into
$wldm_preprocessed/DatasetXXX_Name:

  dataset_fingerprint.json   geometry and intensity statistics per case
  plans.json                 every setting, with reasons in "notes" (hand-editable;
                             kept on re-runs unless the data or options change)
  splits_final.json          5-fold cross-validation (seeded)
  registration/CASE/         CT registered onto the MR (elastix rigid + B-spline):
                             ct_registered.nii.gz, valid_mask.nii.gz, report.json,
                             overlay.png (check it!), transform parameters
  wldmPlans_3d_wldm/         CASE_mr.npy, CASE_ct.npy, CASE_masks.npy, CASE.json
  logs/                      a log file per run

Presets (--preset NAME) are named edits of the planned configuration, as a user
would make by hand in plans.json (reasons in its notes); without one the plan is
the planner's default, sized for the memory target (a GPU):

{presets}

A second run with nothing changed redoes nothing. A case that fails is named with
its reason; the others still finish; the exit status is then 1. Ctrl-C stops at
once (exit status 130); finished cases are kept and rerunning continues.
"""

INTERRUPTED = ("interrupted: queued cases were cancelled and running ones stopped; finished cases are kept, "
               "rerun the same command to continue")


def main(argv: list[str] | None = None) -> int:
    from wldm_auto.planners.presets import NOTES, PRESETS

    presets = "\n".join(textwrap.fill(NOTES.get(name, "").removeprefix(f"preset {name!r}: "), 80,
                                       initial_indent=f"  {name:<8}", subsequent_indent=" " * 10)
                         for name in sorted(PRESETS))
    parser = argparse.ArgumentParser(prog="wldm_plan_and_preprocess", description=DESCRIPTION.format(presets=presets),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name: 1, 001 or Dataset001_Name")
    parser.add_argument("-np", "--num-processes", type=int, default=None,
                        help="worker processes for fingerprint and preprocessing (default: usable CPU cores, at most 4)")
    parser.add_argument("--no-registration", action="store_true",
                        help="MR and CT are already aligned (e.g. SynthRAD): resample CT onto the MR grid only")
    parser.add_argument("--clean", action="store_true",
                        help="redo everything: drop the registration cache, arrays and fingerprint; back up plans.json")
    parser.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                        help="target spacing in mm: one value (isotropic) or three (x y z); default 2")
    parser.add_argument("--gpu-memory-gb", type=float,
                        help="memory target for patch/batch planning (default: 85%% of CUDA device 0, else 2 GB for CPU)")
    parser.add_argument("--preset", metavar="NAME",
                        help=f"plan preset to apply: {', '.join(sorted(PRESETS))} (see above; default: none)")
    parser.add_argument("--verbose", action="store_true", help="debug logging on the console")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    workers = args.num_processes if args.num_processes is not None else max(1, min(4, len(os.sched_getaffinity(0))))

    def action() -> int:
        from wldm_auto.paths import preprocessed_root, resolve_dataset_name
        from wldm_auto.preprocessing.pipeline import check_options, plan_and_preprocess

        check_options(workers, args.spacing, args.gpu_memory_gb, args.preset)  # before anything is read or written
        name = resolve_dataset_name(args.dataset, ("wldm_raw",))
        log_path = add_log_file(preprocessed_root(create=True) / name, "plan_and_preprocess")
        log.info("log file: %s", log_path)
        summary = plan_and_preprocess(name, workers, not args.no_registration, args.clean, args.spacing,
                                      args.gpu_memory_gb, args.preset)
        counts = {s: sum(o.status == s for o in summary.outcomes) for s in ("done", "cached", "failed")}
        print(f"{summary.dataset}: {counts['done']} preprocessed, {counts['cached']} already current, "
              f"{counts['failed']} failed in {summary.seconds:.1f} s; stages run: "
              f"{', '.join(summary.stages_run) or 'none (everything current)'}")
        print(f"outputs: {summary.folder}")
        if summary.failed:
            for outcome in summary.failed:
                print(f"failed: {outcome.case}: {outcome.message}", file=sys.stderr)
            return 1
        return 0

    return run_cli(action, INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
