"""Data of the fidelity benchmark: the phantom's spatial hold-out and simulated whole-body-like pairs.

Two kinds of cases, all built from real scans in this repository:

* real: the MRI-DIR phantom (the only real MR/CT pair), registered once (CT onto MR, elastix),
  then cut along its long axis into a training slab and a test slab with a gap of at least one
  training patch between them (``wldm_auto/dataset_conversion/holdout.py``);
* simulated: MR-like volumes made from real CTs by ``mr_simulator.py`` (the TotalSegmentator
  abdomen-pelvis CT, the example CT DICOM series, and the phantom CT's training slab only, so
  nothing of the phantom's test slab reaches training); one seed per case, whole cases held out.

Training and validation cases form a raw dataset (``imagesTr``/``targetsTr``; MR and CT already
aligned, so the pipeline runs without registration); test cases never enter it: their MR, the
reference CT on the MR grid and the evaluation mask (the pipeline's MR body mask AND real CT) lie in
``test/``. Everything is cached under ``WORK/data`` with a key over the settings.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from mr_simulator import PROXY_NOTE, SimulationSettings, simulate_pair
from wldm_auto.dataset_conversion.holdout import split_aligned_pair
from wldm_auto.io.files import hash_data, read_json, write_json
from wldm_auto.io.images import read_dicom_series, read_image, write_image
from wldm_auto.io.raw_dataset import write_dataset_json
from wldm_auto.planners.schema import BodyMaskPlan, RegistrationPlan
from wldm_auto.preprocessing.body_mask import body_mask_from_mr
from wldm_auto.preprocessing.registration import register_ct_to_mr

log = logging.getLogger("fidelity")

REPO = Path(__file__).resolve().parents[1]
TS_DIR = REPO / "tests" / "data" / "totalsegmentator_examples"
PHANTOM_DIR = REPO / "wldm_auto" / "dataset_conversion" / "example_data" / "mri_dir_porcine_phantom"
CT_WINDOW = (-1024.0, 3071.0)
PADDING_HU = -2048  # written where a training CT has no real value: preprocessing marks it invalid
TEST_FRACTION = 0.25  # of the phantom's body along its long axis
DATASET_ID = 950
DATASET_NAME = "FidelityBenchmark"
BUILD_VERSION = 2  # bump when the cases change
REGISTRATION_VERSION = 1  # bump when the phantom's registration changes


@dataclass(frozen=True)
class CaseSpec:
    name: str
    role: str  # "train", "val" or "test"
    source: str  # "phantom" (real pair), or a simulation source: "abdomen", "dicom", "phantom_ct"
    seed: int = 0
    keep: float = 1.0  # central share of each axis kept (a small validation case keeps learning curves cheap)


# the full benchmark: 6 simulated + 1 real training cases, 1 validation case, 4 test cases (3 simulated, 1 real)
FULL_CASES = (
    CaseSpec("phantom_train", "train", "phantom"),
    CaseSpec("sim_abdomen_00", "train", "abdomen", 100),
    CaseSpec("sim_abdomen_01", "train", "abdomen", 101),
    CaseSpec("sim_abdomen_02", "train", "abdomen", 102),
    CaseSpec("sim_abdomen_03", "train", "abdomen", 103),
    CaseSpec("sim_dicom_00", "train", "dicom", 200),
    CaseSpec("sim_phantomct_00", "train", "phantom_ct", 300),
    CaseSpec("sim_abdomen_val", "val", "abdomen", 150, keep=0.6),
    CaseSpec("phantom_test", "test", "phantom"),
    CaseSpec("sim_abdomen_t0", "test", "abdomen", 1000),
    CaseSpec("sim_abdomen_t1", "test", "abdomen", 1001),
    CaseSpec("sim_dicom_t0", "test", "dicom", 1100),
)
QUICK_CASES = (
    CaseSpec("phantom_train", "train", "phantom"),
    CaseSpec("sim_abdomen_00", "train", "abdomen", 100),
    CaseSpec("sim_abdomen_val", "val", "abdomen", 150, keep=0.6),
    CaseSpec("phantom_test", "test", "phantom"),
    CaseSpec("sim_abdomen_t0", "test", "abdomen", 1000),
)


@dataclass
class BenchData:
    """Where the benchmark's data lie and what each case is."""

    raw: Path  # the raw dataset (training + validation cases)
    test: Path  # test/mr, test/ct, test/mask
    manifest: dict

    def cases(self, role: str) -> list[str]:
        return [c["name"] for c in self.manifest["cases"] if c["role"] == role]


def registration_plan(quick: bool) -> RegistrationPlan:
    """The planner's default registration (2 mm); quick mode: 8 mm and short runs (seconds, coarse)."""
    plan = RegistrationPlan()
    if quick:
        plan.working_spacing_mm, plan.bspline_grid_spacing_mm = 8.0, 48.0
        plan.iterations, plan.resolutions = [32, 32], [1, 1]
    return plan


def registration_key(quick: bool) -> str:
    """What the phantom's registration depends on: its plan (the planner's defaults), window and version."""
    return hash_data(dataclasses.asdict(registration_plan(quick)), CT_WINDOW, REGISTRATION_VERSION)


def register_phantom(folder: Path, quick: bool) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """(MR, CT on the MR grid, valid mask) of the phantom, registered once and cached in ``folder``."""
    mr = read_image(PHANTOM_DIR / "mr_t2.nii.gz", sitk.sitkFloat32)
    plan = registration_plan(quick)
    key = registration_key(quick)
    report_path = folder / "report.json"
    if report_path.is_file() and read_json(report_path).get("key") == key:
        return mr, read_image(folder / "ct_registered.nii.gz", sitk.sitkFloat32), read_image(folder / "valid.nii.gz")
    log.info("registering the phantom CT onto its MR (elastix, %g mm)", plan.working_spacing_mm)
    ct = read_image(PHANTOM_DIR / "ct.nii.gz", sitk.sitkFloat32)
    body = body_mask_from_mr(mr, BodyMaskPlan())
    result = register_ct_to_mr(mr, ct, plan, CT_WINDOW, body)
    folder.mkdir(parents=True, exist_ok=True)
    write_image(sitk.Cast(sitk.Round(result.ct), sitk.sitkInt16), folder / "ct_registered.nii.gz")
    write_image(result.valid, folder / "valid.nii.gz")
    write_json({**result.report, "key": key}, report_path)
    return mr, read_image(folder / "ct_registered.nii.gz", sitk.sitkFloat32), result.valid


def _central(image: sitk.Image, keep: float) -> sitk.Image:
    """The central ``keep`` share of every axis of ``image`` (geometry kept)."""
    size = [max(2, int(round(n * keep))) for n in image.GetSize()]
    return sitk.RegionOfInterest(image, size, [(n - k) // 2 for n, k in zip(image.GetSize(), size)])


def evaluation_mask(mr: sitk.Image, valid: sitk.Image | None = None) -> sitk.Image:
    """Where a test case is scored: the pipeline's body mask of the MR, AND real CT when ``valid`` is given."""
    body = body_mask_from_mr(mr, BodyMaskPlan())
    return body if valid is None else sitk.And(body > 0, valid > 0)


def build(work: Path, quick: bool, patch_mm_along_split: float, settings: SimulationSettings | None = None
          ) -> BenchData:
    """Build (or reuse) the benchmark data under ``work/data``."""
    settings = settings or (SimulationSettings(spacing=(4.0, 4.0, 4.0)) if quick else SimulationSettings())
    specs = QUICK_CASES if quick else FULL_CASES
    folder = work / "data"
    # the phantom cases are cut from its registration: new registration defaults rebuild them too
    key = hash_data(BUILD_VERSION, quick, patch_mm_along_split, dataclasses.asdict(settings),
                    [dataclasses.asdict(s) for s in specs], registration_key(quick))
    manifest_path = folder / "manifest.json"
    raw = folder / "raw" / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
    if manifest_path.is_file() and read_json(manifest_path).get("key") == key:
        return BenchData(raw, folder / "test", read_json(manifest_path))
    for stale in ("raw", "test"):
        shutil.rmtree(folder / stale, ignore_errors=True)
    manifest_path.unlink(missing_ok=True)

    mr, ct_reg, valid = register_phantom(folder / "phantom_registration", quick)
    pair = split_aligned_pair(mr, ct_reg, valid, body_mask_from_mr(mr, BodyMaskPlan()), TEST_FRACTION,
                              patch_mm_along_split, padding=PADDING_HU)
    split = pair.split
    log.info("phantom hold-out along %s: train %s, gap %s (%.0f mm), test %s", "xyz"[split.axis], split.train,
             split.gap, split.gap_mm, split.test)
    sources = {
        "abdomen": read_image(TS_DIR / "example_ct.nii.gz", sitk.sitkFloat32),
        "dicom": read_dicom_series(TS_DIR / "example_ct_dicom"),
        # the phantom CT's TRAINING slab only (on the MR grid; the simulator clamps its padding to air)
        "phantom_ct": pair.train_ct,
    }
    for d in ("imagesTr", "targetsTr"):
        (raw / d).mkdir(parents=True, exist_ok=True)
    for d in ("mr", "ct", "mask"):
        (folder / "test" / d).mkdir(parents=True, exist_ok=True)
    records = []
    for spec in specs:
        if spec.source == "phantom":
            test = spec.role == "test"
            case_mr = sitk.Cast(pair.test_mr if test else pair.train_mr, sitk.sitkInt16)
            case_ct = pair.test_ct if test else pair.train_ct
            case_valid = pair.test_valid
        else:
            case_mr, case_ct = simulate_pair(sources[spec.source], spec.seed, settings)
            case_valid = None
        if spec.keep < 1.0:
            case_mr, case_ct = (_central(image, spec.keep) for image in (case_mr, case_ct))
        if spec.role == "test":
            write_image(case_mr, folder / "test" / "mr" / f"{spec.name}.nii.gz")
            write_image(case_ct, folder / "test" / "ct" / f"{spec.name}.nii.gz")
            write_image(evaluation_mask(case_mr, case_valid), folder / "test" / "mask" / f"{spec.name}.nii.gz")
        else:
            write_image(case_mr, raw / "imagesTr" / f"{spec.name}_0000.nii.gz")
            write_image(case_ct, raw / "targetsTr" / f"{spec.name}.nii.gz")
        records.append({**dataclasses.asdict(spec), "size_xyz": list(case_mr.GetSize()),
                        "spacing_xyz": list(case_mr.GetSpacing()),
                        "kind": "real (phantom hold-out slab)" if spec.source == "phantom" else "simulated"})
        log.info("%s (%s, %s): %s", spec.name, spec.role, records[-1]["kind"], case_mr.GetSize())
    train_count = sum(1 for s in specs if s.role != "test")
    write_dataset_json(raw, DATASET_NAME, train_count, description=f"fidelity benchmark: {PROXY_NOTE}; plus the "
                       "MRI-DIR phantom's training slab (real)", licence="CC BY 4.0 (phantom), Apache-2.0 "
                       "(TotalSegmentator example CTs)", reference="see bench/fidelity_data.py")
    manifest = {"key": key, "quick": quick, "cases": records, "phantom_split": split.to_dict(),
                "simulation": dataclasses.asdict(settings), "proxy_note": PROXY_NOTE}
    write_json(manifest, manifest_path)
    return BenchData(raw, folder / "test", manifest)
