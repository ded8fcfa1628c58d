"""Preprocessing cost per case: registration + resampling; first run, cached run, cached-registration run.

What it measures: the bundled porcine phantom (one MR/CT pair, not aligned)
is installed with ``install_example`` into a temporary ``wldm_raw``, then
``plan_and_preprocess`` runs in three fresh Python processes, one after the
other, on the same temporary ``wldm_preprocessed``:

1. ``first``: nothing cached - fingerprint, plan, splits, body mask,
   registration (elastix, unless ``--no-registration``), cropping,
   resampling to ``--spacing`` mm, normalisation, writing the arrays;
2. ``cached``: the same command again - everything is current, so it only
   hashes the inputs and checks keys (this is the cost of re-running the
   command by mistake or after an interruption);
3. ``reg_cached`` (unless ``--no-reg-cached-run``): ``plans.json`` is
   edited by hand (``preprocessing.mr_percentiles`` from [0.5, 99.5] to
   [1.0, 99.0], kept because hand edits survive) and the command runs
   again: the arrays are redone at the same spacing but the registration
   comes from its cache (its key does not cover the MR normalisation), so
   this is body mask + cropping + resampling + normalisation alone.

Per run it reports the wall seconds of ``plan_and_preprocess`` (imports
excluded), the stages that ran, the case's outcome and seconds, whether the
registration came from the cache, the registration report's ``seconds``
(elastix time of the run that made the cached registration; with
registration off it is the time of the physical-space CT resampling) and
the peak RSS of that process (``ru_maxrss`` of RUSAGE_SELF, i.e. numpy +
ITK/elastix + the interpreter; with ``--num-processes`` > 1 the workers'
peak is in ``peak_rss_workers_gb``, RUSAGE_CHILDREN).

What to expect: with registration, the first run is dominated by elastix
(about 40 s on two cores for this phantom: four candidate orientations at
8 mm, then rigid + B-spline; 90.7 s before issue 19's registration
defaults, 38.4 s after, registration report seconds of the first run, the
machine not quiet); the cached run takes well
under a second (hashing the raw files, checking keys); the
cached-registration run takes a few seconds at most. Peak RSS is about
0.15 GB after imports, about 0.5 GB for a run without registration and
over 1 GB with elastix (1.35 GB measured on the cropped phantom); it grows
with the raw image size, not with the number of cases (one case per worker
at a time).

    python bench/preprocess.py                       # full phantom, 2 mm, with registration
    python bench/preprocess.py --no-registration --spacing 1.5
    python bench/preprocess.py --quick               # cropped phantom, 4 mm, no registration: checks the script runs

(--quick turns registration off: elastix alone takes tens of seconds even on
the cropped phantom, and a cropped MR does not register reliably.) A case
whose registration fails is listed with its message and counted in
``failed_cases``; failures are not cached, so every run redoes them.

Registration speed AND accuracy (issue 19) are measured by ``bench/registration.py``, not here: a
real CT on a whole-body-sized grid (512x512x149) warped by a known smooth transform, an MR simulated
from it (333x333x67 at 1.5x1.5x5 mm), our registration and a plain default itk-elastix run scored by
MAE in HU inside the body against the truth. Measured back to back on a shared (not quiet) 2-core
CPU: ours 42.4 s and 25.7 HU MAE, plain default elastix (rigid + B-spline, 20 mm grid, 2 mm) 78.6 s
and 36.3 HU; no registration 88.4 HU (details and the plan before the issue in that script's
docstring).

Prints ONE JSON line on stdout; logging goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.preprocess")

DATASET_ID = 987
QUICK_CROP_XYZ = (96, 96, 40)  # central MR block of the phantom for --quick (as in the tests)


def peak_rss_gb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20


def install(raw: Path, quick: bool) -> str:
    """Install the phantom into ``raw`` (``$wldm_raw`` must point there); returns the dataset folder name."""
    import SimpleITK as sitk

    from wldm_auto.dataset_conversion.example import install_example

    folder = install_example(DATASET_ID)
    if quick:  # replace the copied MR by its central block (same physical geometry, fewer voxels)
        (mr_path,) = sorted((folder / "imagesTr").glob("*_0000.nii.gz"))
        mr = sitk.ReadImage(str(mr_path))
        index = [(n - s) // 2 for n, s in zip(mr.GetSize(), QUICK_CROP_XYZ)]
        sitk.WriteImage(sitk.RegionOfInterest(mr, list(QUICK_CROP_XYZ), index), str(mr_path))
    return folder.name


def edit_normalisation(plans_path: Path) -> None:
    """Hand-edit the MR percentiles: the arrays must be redone, the registration need not."""
    plans = json.loads(plans_path.read_text())
    plans["preprocessing"]["mr_percentiles"] = [1.0, 99.0]
    plans_path.write_text(json.dumps(plans, indent=2))


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One plan_and_preprocess in this fresh process; returns its figures."""
    from wldm_auto.io.files import read_json
    from wldm_auto.planners.schema import Plans
    from wldm_auto.preprocessing.pipeline import plan_and_preprocess

    import_rss = peak_rss_gb()
    start = time.perf_counter()
    summary = plan_and_preprocess(args.dataset, num_processes=args.num_processes,
                                  registration=not args.no_registration, spacing=[args.run_spacing])
    seconds = time.perf_counter() - start
    plans = Plans.load(summary.folder / "plans.json")
    arrays = summary.folder / plans.configuration("3d_wldm").data_identifier
    cases = []
    for outcome in summary.outcomes:
        record: dict[str, Any] = {"case": outcome.case, "status": outcome.status,
                                  "seconds": round(outcome.seconds, 2),
                                  "registration_from_cache": outcome.registration_cached}
        if outcome.status == "failed":
            record["message"] = outcome.message
        properties = arrays / f"{outcome.case}.json"
        if properties.is_file():
            report = read_json(properties).get("registration", {})
            record["registration_report_seconds"] = report.get("seconds")
            record["registration"] = report.get("registration", "elastix")
        cases.append(record)
    shapes = {}
    for path in sorted(arrays.glob("*_mr.npy")):
        import numpy as np

        shapes[path.name[: -len("_mr.npy")]] = list(np.load(path, mmap_mode="r").shape)
    return {"seconds": round(seconds, 2), "stages_run": summary.stages_run, "cases": cases,
            "preprocessed_shapes_czyx": shapes, "peak_rss_gb": round(peak_rss_gb(), 3),
            "imports_peak_rss_gb": round(import_rss, 3), "peak_rss_workers_gb": round(peak_rss_gb(resource.RUSAGE_CHILDREN), 3)}


def run_child(name: str, args: argparse.Namespace, dataset: str, spacing: float, env: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--child", "--dataset", dataset,
               "--run-spacing", str(spacing), "--num-processes", str(args.num_processes)]
    if args.no_registration:
        command.append("--no-registration")
    log.info("%s run (%g mm) in a fresh process", name, spacing)
    proc = subprocess.run(command, stdout=subprocess.PIPE, encoding="utf-8", errors="replace", env=env,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the {name} run failed (exit {proc.returncode}); see its log above")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["spacing_mm"] = spacing
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spacing", type=float, default=2.0, help="target spacing in mm (default: 2)")
    parser.add_argument("--no-reg-cached-run", action="store_true",
                        help="skip the third run (arrays redone, registration from its cache)")
    parser.add_argument("--no-registration", action="store_true", help="plan without registration (CT resampled)")
    parser.add_argument("--num-processes", type=int, default=1, help="preprocessing worker processes (default: 1)")
    parser.add_argument("--quick", action="store_true",
                        help=f"check the script: MR cropped to {QUICK_CROP_XYZ} voxels, 4 mm, no registration "
                             "(overrides --spacing and --no-registration)")
    parser.add_argument("--keep", type=Path, default=None, help="use this folder instead of a temporary one, keep it")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-spacing", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.quick:
        args.spacing, args.no_registration = 4.0, True
    if args.spacing <= 0 or args.num_processes < 1:
        parser.error("--spacing must be positive and --num-processes >= 1")

    with tempfile.TemporaryDirectory(prefix="wldm_bench_pre_") as tmp:
        root = args.keep or Path(tmp)
        raw, pre = root / "raw", root / "pre"
        raw.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, wldm_raw=str(raw), wldm_preprocessed=str(pre))
        os.environ.update(wldm_raw=str(raw))
        dataset = install(raw, args.quick)
        runs = {"first": run_child("first", args, dataset, args.spacing, env),
                "cached": run_child("cached", args, dataset, args.spacing, env)}
        if not args.no_reg_cached_run:
            edit_normalisation(pre / dataset / "plans.json")
            runs["reg_cached"] = run_child("reg_cached", args, dataset, args.spacing, env)
    failed = [c for r in runs.values() for c in r["cases"] if c["status"] == "failed"]
    print(json.dumps({
        "dataset": dataset, "quick": args.quick, "registration": not args.no_registration,
        "num_processes": args.num_processes, "cases": len(runs["first"]["cases"]),
        **{f"{name}_seconds": r["seconds"] for name, r in runs.items()},
        **{f"{name}_peak_rss_gb": r["peak_rss_gb"] for name, r in runs.items()},
        "runs": runs, "failed_cases": len(failed),
    }))


if __name__ == "__main__":
    main()
