"""wldm_demo: the whole pipeline (so far) on the bundled real phantom.

Creates ``OUTPUT/{raw,preprocessed,results}``, points the wldm_* variables at
them for this process, installs the example dataset (kept if already there),
plans and preprocesses it, and prints where everything is.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from wldm_auto.cli.common import run_cli, setup_logging

log = logging.getLogger("wldm_demo")

DATASET_ID = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wldm_demo",
        description="Run the pipeline on the bundled MRI-DIR porcine phantom (real paired MR and CT, "
                    "not aligned): install it as Dataset001_MRIDIRPhantom, register CT onto MR, plan and "
                    "preprocess. Re-running reuses everything already done.")
    parser.add_argument("--output", type=Path, default=Path("demo_output"),
                        help="folder for raw/, preprocessed/ and results/ (default ./demo_output)")
    parser.add_argument("--spacing", type=float, nargs="+", default=None,
                        help="target spacing in mm (default: the planner's 2 mm)")
    parser.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes (default 1)")
    args = parser.parse_args(argv)
    setup_logging()

    def action() -> int:
        from wldm_auto.dataset_conversion.example import install_example
        from wldm_auto.paths import PREPROCESSED, RAW, RESULTS
        from wldm_auto.preprocessing.pipeline import plan_and_preprocess

        start = time.time()
        out = args.output.resolve()
        for variable, sub in ((RAW, "raw"), (PREPROCESSED, "preprocessed"), (RESULTS, "results")):
            (out / sub).mkdir(parents=True, exist_ok=True)
            os.environ[variable] = str(out / sub)
        existing = sorted((out / "raw").glob(f"Dataset{DATASET_ID:03d}_*"))
        if existing:
            log.info("example dataset already installed: %s", existing[0])
        else:
            install_example(DATASET_ID)
        summary = plan_and_preprocess(DATASET_ID, args.num_processes, spacing=args.spacing)
        folder = summary.folder
        print("\nwldm_auto demo: conversion, planning and preprocessing of the MRI-DIR phantom")
        print(f"  raw dataset          {out / 'raw'}")
        print(f"  plans (editable)     {folder / 'plans.json'}")
        print(f"  registration QC      {folder / 'registration' / 'phantom' / 'overlay.png'}")
        print(f"  registration report  {folder / 'registration' / 'phantom' / 'report.json'}")
        print(f"  training arrays      {folder / 'wldmPlans_3d_wldm'}")
        print(f"  total {time.time() - start:.1f} s; stages run: {', '.join(summary.stages_run) or 'none (all current)'}")
        print("  (training and prediction are not part of this release yet)")
        for outcome in summary.failed:
            print(f"failed: {outcome.case}: {outcome.message}", file=sys.stderr)
        return 1 if summary.failed else 0

    return run_cli(action, "interrupted: run `make demo` again to resume where it stopped")


if __name__ == "__main__":
    sys.exit(main())
