"""Registration speed and accuracy on a case with a known deformation (issue 19).

What it measures: a real CT (the TotalSegmentator abdomen-pelvis example, 122x101x112 at 3 mm, HU;
the repository's copy in ``tests/data``) is resampled onto a whole-body-sized CT grid (512x512x149
voxels, in-plane spacing and slice thickness chosen so the grid covers the CT's field of view:
about 0.72 x 0.72 x 2.26 mm). A known smooth transform (a small rigid part, a few degrees and a
few mm, plus a B-spline displacement with control points every 80 mm and coefficients of a few mm,
up to about 10 mm) warps it onto the MR grid: that warped CT is the *truth*. An MR is simulated
from the truth with ``bench/mr_simulator.py`` (T1-like, non-monotonic signal over HU, texture,
blur, bias field, Rician noise; no extra deformation) on a 333x333xN grid at 1.5x1.5x5 mm (N:
the slices that fit the CT's 336 mm long axis, 67; in-plane the MR's 500 mm field of view holds
the 366x303 mm CT in air, as a whole-body MR does). Then the ORIGINAL CT (moving) is registered
onto that MR (fixed):

* ``ours``: :func:`wldm_auto.preprocessing.registration.register_ct_to_mr` with the plan's
  defaults (:class:`~wldm_auto.planners.schema.RegistrationPlan`), or with ``--set`` overrides;
* ``plain``: a plain itk-elastix run, ``itk.elastix_registration_method`` with the unedited default
  "rigid" then "bspline" parameter maps (4 resolutions, 256 iterations, 2048 samples, B-spline
  grid 10 mm) on both images resampled to 2 mm; its transform is applied to the full CT on the
  MR grid exactly as ours is.

Each is scored by the MAE in HU inside the body (truth > -500 HU, on the MR grid) between its
registered CT and the truth; ``none_mae_hu`` is the same figure for the CT resampled without
registration (physical space), the error registration has to remove. Seconds are wall seconds
of the whole call (ours: orientation search, elastix, warping CT and validity onto the MR grid,
Jacobian and NMI figures; plain: resampling both images to 2 mm, elastix, warping the CT onto
the MR grid); ``ours_report`` is our registration report (it includes ``orientation_seconds``).
The case is seeded and deterministic (``--seed``): same seed, same volumes, voxel for voxel.

Measured (2-core CPU, NOT a quiet machine: a model training shared the cores, load average 3-5;
seed 0; the case is a 512x512x149 CT and a 333x333x67 MR, the MR's 2 mm working grid 250x250x168;
seconds exclude itk's lazy module loading, 9-14 s, paid once per process before both runs):

=========================================================  =======  ======  ======================
run                                                        seconds  MAE HU  conditions
=========================================================  =======  ======  ======================
no registration (physical space)                           -        88.4
ours, plan after issue 19 (defaults now)                   42.4     25.7    back to back, load ~3
plain default elastix, B-spline grid 20 mm                 78.6     36.3    back to back, load ~3
ours, plan before issue 19                                 135.3    35.6    own process, load ~4.5
plain default elastix, B-spline grid 10 mm (its default)   305.9    67.7    own process, load ~4.5
=========================================================  =======  ======  ======================

Where the time went (``ours_report.elastix_resolution_seconds`` and ``orientation_seconds``): the
rigid stage costs under 2 s in all, the orientation search 0.4-0.9 s at 8 mm (3.8 s at its former
4 mm, 2 levels, 128 iterations), each B-spline level 10-35 s; the rest (warping the CT and its validity mask onto the
MR grid, Jacobian and NMI figures) 15-40 s. The intermediate plans (same case, one process each,
variants of one process back to back; load varied between processes) are in the planner's
``REGISTRATION_NOTES``:

* cheap orientation search + recursive pyramid + fixed MR cropped to its body box (+30 mm):
  127.9 s, 33.1 HU (plain, 20 mm grid, in the same process: 130.7 s, 36.3 HU);
* the same with 2 B-spline levels instead of 3: 71.6 s, 24.8 HU; with 2048 samples instead of
  4096 as well (the defaults now): 41.1 s, 25.7 HU; 3 levels with 2048 samples: 56.6 s, 34.2 HU.

(The figures behind each plan default are in ``RegistrationPlan`` notes written by the planner,
``wldm_auto/planners/planner.py``.)

    python bench/registration.py                        # whole-body-sized case: ours and plain
    python bench/registration.py --skip-plain --set spatial_samples=2048 --set resolutions=[2,3]
    python bench/registration.py --quick                # small case, 6 mm working spacing: checks the script runs

The table's rows: ``python bench/registration.py --plain-grid 20`` (first two), the plan before
issue 19 with ``--skip-plain --set orientation_spacing_mm=4 --set orientation_iterations=128 --set
orientation_resolutions=2 --set pyramid='"smoothing"' --set body_margin_mm=-1 --set
resolutions='[3,3]' --set spatial_samples=4096``, plain with elastix's 10 mm grid by a run without
``--plain-grid``.

``--set KEY=JSON`` overrides one ``RegistrationPlan`` field for ``ours`` (repeatable);
``--variant NAME:KEY=JSON;KEY=JSON`` runs ours once more per variant on the same case.

Prints ONE JSON line on stdout; logging goes to stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from mr_simulator import SimulationSettings, grid_centre, random_bspline, simulate_pair  # noqa: E402

log = logging.getLogger("bench.registration")

AIR_HU = -1024.0
WINDOW = (-1024.0, 3071.0)
BODY_HU = -500.0
CT_CANDIDATES = (REPO / "tests" / "data" / "totalsegmentator_examples" / "example_ct.nii.gz",
                 Path("/work/shared/data/totalsegmentator_examples/example_ct.nii.gz"))


@dataclass(frozen=True)
class CaseSettings:
    """Geometry of the known-deformation case and of its known transform."""

    ct_size: tuple[int, int, int] = (512, 512, 149)  # CT grid (x, y, z) covering the source CT's field of view
    mr_size_xy: tuple[int, int] = (333, 333)  # MR in-plane size; its slices fit the CT's long axis
    mr_spacing: tuple[float, float, float] = (1.5, 1.5, 5.0)
    rotation_deg: float = 3.0  # max rotation about each axis (uniform)
    translation_mm: float = 6.0  # max translation along each axis (uniform)
    displacement_mm: float = 4.0  # std of the B-spline coefficients (mm)
    max_coefficient_mm: float = 10.0  # coefficients clipped to +- this (the displacement never exceeds it)
    control_spacing_mm: float = 80.0  # B-spline control-point spacing of the known transform


QUICK = CaseSettings(ct_size=(128, 128, 48), mr_size_xy=(84, 84), mr_spacing=(6.0, 6.0, 8.0))


def source_ct() -> sitk.Image:
    for path in CT_CANDIDATES:
        if path.is_file():
            return sitk.ReadImage(str(path), sitk.sitkFloat32)
    raise SystemExit(f"no source CT found (looked for {', '.join(map(str, CT_CANDIDATES))})")


def _grid(reference: sitk.Image, size: tuple[int, int, int], spacing: tuple[float, float, float]) -> sitk.Image:
    """Empty float32 grid with ``reference``'s direction and centre."""
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetDirection(reference.GetDirection())
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    half = direction @ ((np.array(size, float) - 1) * np.array(spacing) / 2.0)
    grid.SetOrigin([float(v) for v in np.array(grid_centre(reference)) - half])
    return grid


def case_grids(source: sitk.Image, settings: CaseSettings) -> tuple[sitk.Image, sitk.Image]:
    """(CT grid, MR grid), both centred on ``source`` and inside its field of view along z."""
    extent = np.array(source.GetSize()) * np.array(source.GetSpacing())
    in_plane = float(max(extent[0], extent[1]) / settings.ct_size[0])
    ct_spacing = (in_plane, in_plane, float(extent[2] / settings.ct_size[2]))
    slices = max(2, int(extent[2] // settings.mr_spacing[2]))
    return (_grid(source, settings.ct_size, ct_spacing),
            _grid(source, (*settings.mr_size_xy, slices), settings.mr_spacing))


def known_transform(grid: sitk.Image, rng: np.random.Generator, settings: CaseSettings) -> sitk.Transform:
    """The known smooth map (MR-grid points -> CT points): rigid about the centre, then a B-spline."""
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(grid_centre(grid))
    rigid.SetRotation(*[float(a) for a in np.deg2rad(rng.uniform(-settings.rotation_deg, settings.rotation_deg, 3))])
    rigid.SetTranslation([float(t) for t in rng.uniform(-settings.translation_mm, settings.translation_mm, 3)])
    bspline = random_bspline(grid, rng, settings.control_spacing_mm, settings.displacement_mm,
                             settings.max_coefficient_mm)
    return sitk.CompositeTransform([rigid, bspline])


def warp(image: sitk.Image, transform: sitk.Transform, grid: sitk.Image) -> sitk.Image:
    """``image`` (HU) resampled through ``transform`` onto ``grid`` (linear, air outside)."""
    return sitk.Resample(image, grid, transform, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)


def make_case(seed: int = 0, settings: CaseSettings = CaseSettings(), source: sitk.Image | None = None
              ) -> dict[str, Any]:
    """The known-deformation case: ``ct`` (moving, CT grid), ``mr`` (fixed, int16), ``truth`` (HU, MR grid),
    ``transform`` (the known map). Deterministic in (``seed``, ``settings``, ``source``)."""
    source = source_ct() if source is None else source
    source = sitk.Clamp(source, sitk.sitkFloat32, *WINDOW)
    ct_grid, mr_grid = case_grids(source, settings)
    ct = sitk.Resample(source, ct_grid, sitk.Transform(), sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    rng = np.random.default_rng(seed)
    transform = known_transform(mr_grid, rng, settings)
    truth = warp(ct, transform, mr_grid)
    still = SimulationSettings(spacing=settings.mr_spacing, rotation_deg=0.0, scale=0.0, displacement_mm=0.0,
                               keep_fraction=(1.0, 1.0))
    mr, _ = simulate_pair(truth, int(rng.integers(2**31)), still)
    return {"ct": ct, "mr": mr, "truth": truth, "transform": transform}


def body_mae(ct: sitk.Image, truth: sitk.Image) -> float:
    """MAE in HU between ``ct`` and ``truth`` (same grid) over the truth's body (> -500 HU)."""
    t = sitk.GetArrayViewFromImage(truth)
    body = t > BODY_HU
    return float(np.abs(sitk.GetArrayViewFromImage(ct)[body].astype(np.float64) - t[body]).mean())


def run_ours(mr: sitk.Image, ct: sitk.Image, plan) -> tuple[sitk.Image, float, dict[str, Any]]:  # noqa: ANN001
    """Our registration as the pipeline calls it: with the MR body mask of the default plan (not timed)."""
    from wldm_auto.planners.schema import BodyMaskPlan
    from wldm_auto.preprocessing.body_mask import body_mask_from_mr
    from wldm_auto.preprocessing.registration import register_ct_to_mr

    body = body_mask_from_mr(mr, BodyMaskPlan())
    start = time.perf_counter()
    result = register_ct_to_mr(mr, ct, plan, WINDOW, body)
    return result.ct, time.perf_counter() - start, result.report


def run_plain(mr: sitk.Image, ct: sitk.Image, spacing: float = 2.0, grid_mm: float | None = None
              ) -> tuple[sitk.Image, float]:
    """Plain default elastix (rigid, then B-spline) at ``spacing`` mm; CT warped onto the MR grid.

    ``grid_mm``: the B-spline's final grid spacing (default: elastix's, 10 mm)."""
    import itk

    from wldm_auto.preprocessing.registration import _to_itk, _warp, clip_ct
    from wldm_auto.preprocessing.resampling import resample_to_spacing

    start = time.perf_counter()
    fixed = resample_to_spacing(sitk.Cast(mr, sitk.sitkFloat32), [spacing] * 3, sitk.sitkLinear, 0.0)
    clipped = clip_ct(ct, WINDOW)
    moving = resample_to_spacing(clipped, [spacing] * 3, sitk.sitkLinear, AIR_HU)
    params = itk.ParameterObject.New()
    for name in ("rigid", "bspline"):
        pmap = params.GetDefaultParameterMap(name)
        if name == "bspline" and grid_mm is not None:
            pmap["FinalGridSpacingInPhysicalUnits"] = [str(float(grid_mm))]
        params.AddParameterMap(pmap)
    with tempfile.TemporaryDirectory(prefix="wldm_bench_plain_") as tmp:
        _, transform_params = itk.elastix_registration_method(
            _to_itk(fixed), _to_itk(moving), parameter_object=params, log_to_console=False,
            output_directory=tmp)
    registered = _warp(clipped, transform_params, mr, AIR_HU)
    return registered, time.perf_counter() - start


def plan_with(overrides: dict[str, Any]):  # noqa: ANN201
    from wldm_auto.planners.schema import RegistrationPlan

    known = {f.name for f in dataclasses.fields(RegistrationPlan)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SystemExit(f"unknown RegistrationPlan field(s): {', '.join(unknown)}")
    return dataclasses.replace(RegistrationPlan(), **overrides)


def parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip()] = json.loads(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small case (CT 128x128x48, MR 84x84 at 6x6x8 mm)")
    parser.add_argument("--skip-plain", action="store_true", help="do not run the plain default elastix")
    parser.add_argument("--skip-ours", action="store_true", help="do not run ours with the (--set) plan")
    parser.add_argument("--plain-grid", type=float, action="append", default=[], metavar="MM",
                        help="B-spline final grid spacing of the plain run (repeatable: one plain run each; "
                             "default: elastix's default, 10 mm)")
    parser.add_argument("--plain-first", action="store_true", help="run plain before ours (default: ours first)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=JSON",
                        help="override a RegistrationPlan field for ours (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=JSON;KEY=JSON",
                        help="run ours again with these overrides (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    # --quick: 6 mm working spacing for both (the small case's MR has 6x6x8 mm voxels)
    spacing = 6.0 if args.quick else 2.0
    quick_plan = {"working_spacing_mm": spacing} if args.quick else {}
    start = time.perf_counter()
    case = make_case(args.seed, QUICK if args.quick else CaseSettings())
    log.info("case made in %.1f s: CT %s, MR %s", time.perf_counter() - start, case["ct"].GetSize(),
             case["mr"].GetSize())
    # itk loads its modules lazily (seconds): done here so neither timed run pays for it
    itk_start = time.perf_counter()
    import itk

    itk.ParameterObject.New()
    itk.elastix_registration_method, itk.transformix_filter  # noqa: B018 - touch to load
    itk_seconds = time.perf_counter() - itk_start
    none = warp(case["ct"], sitk.Transform(), case["truth"])
    out: dict[str, Any] = {"seed": args.seed, "quick": args.quick, "ct_size": list(case["ct"].GetSize()),
                           "ct_spacing": [round(s, 3) for s in case["ct"].GetSpacing()],
                           "mr_size": list(case["mr"].GetSize()), "mr_spacing": list(case["mr"].GetSpacing()),
                           "none_mae_hu": round(body_mae(none, case["truth"]), 2),
                           "itk_load_seconds": round(itk_seconds, 1)}
    log.info("no registration: MAE %.1f HU", out["none_mae_hu"])

    def plain() -> None:
        for grid_mm in args.plain_grid or [None]:
            name = "plain" if grid_mm is None else f"plain_grid{grid_mm:g}"
            registered, seconds = run_plain(case["mr"], case["ct"], spacing, grid_mm)
            out.update({f"{name}_seconds": round(seconds, 1), f"{name}_mae_hu": round(body_mae(registered, case["truth"]), 2)})
            log.info("%s (default elastix): %.1f s, MAE %.1f HU", name, seconds, out[f"{name}_mae_hu"])

    def ours(name: str, overrides: dict[str, Any]) -> None:
        registered, seconds, report = run_ours(case["mr"], case["ct"], plan_with(overrides))
        out.update({f"{name}_seconds": round(seconds, 1), f"{name}_mae_hu": round(body_mae(registered, case["truth"]), 2),
                    f"{name}_overrides": overrides, f"{name}_report": report})
        log.info("%s: %.1f s, MAE %.1f HU (orientation %s in %s s; elastix seconds per resolution %s)", name,
                 seconds, out[f"{name}_mae_hu"], report.get("initial_orientation"), report.get("orientation_seconds"),
                 report.get("elastix_resolution_seconds"))

    if args.plain_first and not args.skip_plain:
        plain()
    if not args.skip_ours:
        ours("ours", {**quick_plan, **parse_sets(args.sets)})
    if not args.plain_first and not args.skip_plain:
        plain()
    for variant in args.variant:
        name, _, sets = variant.partition(":")
        ours(name, {**quick_plan, **parse_sets([s for s in sets.split(";") if s.strip()])})
    out["total_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
