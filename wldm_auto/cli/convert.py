"""Console entry points for dataset conversion and validation (thin wrappers over the API)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable

from wldm_auto.cli.common import run_cli, setup_logging
from wldm_auto.paths import RAW, raw_root, resolve_dataset_name

log = logging.getLogger(__name__)

_ENV = ("Environment: wldm_raw must name the folder that holds raw datasets; the dataset is written to "
        "$wldm_raw/DatasetXXX_Name (XXX = the id, 3 digits). Nothing is written under that name until the "
        "conversion has finished and the result is valid.")
_FORMATTER = argparse.RawDescriptionHelpFormatter


def _run(action: Callable[[], int]) -> int:
    """Console logging, then ``action`` with expected errors as one ``error: ...`` line (exit 1)."""
    setup_logging()
    return run_cli(action, "interrupted (nothing was written under the dataset name)")


def _add_common(parser: argparse.ArgumentParser, link: bool = True) -> None:
    parser.add_argument("-d", "--dataset-id", type=int, required=True, help="numeric dataset id, 1..999")
    if link:
        parser.add_argument("--link", action="store_true",
                            help="symlink input files instead of copying them (files that need format "
                                 "conversion are still written); the inputs must then stay where they are")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset with the same id (only if it looks like a dataset and no other "
                             "dataset links into it)")


def _done(path: Path) -> int:
    print(f"dataset written to {path}")
    return 0


def main_paired(argv: list[str] | None = None) -> int:
    """wldm_convert_paired: paired MR/CT(/mask) folders -> raw dataset."""
    parser = argparse.ArgumentParser(
        prog="wldm_convert_paired", formatter_class=_FORMATTER,
        description="Convert folders of paired MR and CT images (and optional masks) into a raw dataset.\n\n"
                    "Expected layout (images matched by name without ending; endings may differ):\n"
                    "  MR_DIR/CASE.nii.gz  or  MR_DIR/CASE/  (a DICOM series folder)\n"
                    "  CT_DIR/CASE.mha     or  CT_DIR/CASE/\n"
                    "  MASK_DIR/CASE.nii.gz  (optional body mask on the MR grid)\n"
                    "Supported endings: .nii.gz .nii .mha .mhd .nrrd .nhdr.\n\n" + _ENV)
    parser.add_argument("-mr", "--mr-dir", type=Path, required=True, help="folder of MR images")
    parser.add_argument("-ct", "--ct-dir", type=Path, required=True, help="folder of CT images (HU)")
    parser.add_argument("-mask", "--mask-dir", type=Path, help="optional folder of body masks")
    parser.add_argument("-n", "--name", required=True, help="dataset name (letters, digits, - and _)")
    _add_common(parser)
    parser.add_argument("--allow-unmatched", action="store_true",
                        help="skip (with a warning) names missing from one of the folders instead of failing")
    parser.add_argument("--file-ending", help="file ending of the dataset (default: the MR files' ending if "
                                              "they all share one, else .nii.gz)")
    args = parser.parse_args(argv)

    def action() -> int:
        from wldm_auto.dataset_conversion.paired import convert_paired
        return _done(convert_paired(args.mr_dir, args.ct_dir, args.dataset_id, args.name, mask_dir=args.mask_dir,
                                    link=args.link, overwrite=args.overwrite, file_ending=args.file_ending,
                                    allow_unmatched=args.allow_unmatched))
    return _run(action)


def _synthrad_parser(prog: str, year: int, regions: tuple[str, ...], example: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=_FORMATTER,
        description=f"Convert the SynthRAD{year} Task 1 (MR -> CT) training data into a raw dataset.\n\n"
                    f"Expected layout (INPUT may be the folder holding Task1/, Task1/ itself, or one region "
                    f"folder):\n  {example}\nRegions: {', '.join(regions)}. Case names are the patient folder "
                    f"names; mask goes to masksTr; overview folders are skipped.\n\n" + _ENV)
    parser.add_argument("-i", "--input", type=Path, required=True, help="SynthRAD Task 1 folder")
    parser.add_argument("-n", "--name", required=True, help="dataset name (letters, digits, - and _)")
    parser.add_argument("--regions", nargs="+", metavar="REGION",
                        help=f"convert only these regions ({' '.join(regions)}); default: all found")
    _add_common(parser)
    return parser


def main_synthrad2023(argv: list[str] | None = None) -> int:
    """wldm_convert_synthrad2023: SynthRAD2023 Task 1 -> raw dataset."""
    from wldm_auto.dataset_conversion.synthrad2023 import REGIONS
    args = _synthrad_parser("wldm_convert_synthrad2023", 2023, REGIONS,
                            "INPUT/Task1/brain/1BA001/{mr,ct,mask}.nii.gz, INPUT/Task1/pelvis/1PA001/...").parse_args(argv)

    def action() -> int:
        from wldm_auto.dataset_conversion.synthrad2023 import convert_synthrad2023
        return _done(convert_synthrad2023(args.input, args.dataset_id, args.name, link=args.link,
                                          overwrite=args.overwrite, regions=args.regions))
    return _run(action)


def main_synthrad2025(argv: list[str] | None = None) -> int:
    """wldm_convert_synthrad2025: SynthRAD2025 Task 1 -> raw dataset."""
    from wldm_auto.dataset_conversion.synthrad2025 import REGIONS
    args = _synthrad_parser("wldm_convert_synthrad2025", 2025, REGIONS,
                            "INPUT/Task1/AB/1ABA005/{mr,ct,mask}.mha, INPUT/Task1/HN/..., INPUT/Task1/TH/...").parse_args(argv)

    def action() -> int:
        from wldm_auto.dataset_conversion.synthrad2025 import convert_synthrad2025
        return _done(convert_synthrad2025(args.input, args.dataset_id, args.name, link=args.link,
                                          overwrite=args.overwrite, regions=args.regions))
    return _run(action)


def main_example(argv: list[str] | None = None) -> int:
    """wldm_convert_example: install the bundled MR/CT phantom as a raw dataset."""
    parser = argparse.ArgumentParser(
        prog="wldm_convert_example", formatter_class=_FORMATTER,
        description="Install the bundled example, one paired MR/CT porcine phantom (TCIA MRI-DIR, CC BY 4.0), "
                    "as raw dataset DatasetXXX_MRIDIRPhantom with case 'phantom'.\n\n" + _ENV)
    _add_common(parser)
    parser.add_argument("--derived-second-sequence", action="store_true",
                        help="install DatasetXXX_MRIDIRPhantomTwoSeq instead: the T2 plus a second MR channel "
                             "DERIVED from it (square root, 1.5 mm blur; not a scan) to try multi-sequence "
                             "training and prediction with missing sequences")
    args = parser.parse_args(argv)

    def action() -> int:
        from wldm_auto.dataset_conversion.example import install_example
        return _done(install_example(args.dataset_id, overwrite=args.overwrite, link=args.link,
                                     derived_second_sequence=args.derived_second_sequence))
    return _run(action)


def main_validate(argv: list[str] | None = None) -> int:
    """wldm_validate_dataset: list every problem of a raw dataset, or print OK."""
    parser = argparse.ArgumentParser(
        prog="wldm_validate_dataset", formatter_class=_FORMATTER,
        description="Check a raw dataset in $wldm_raw against the expected layout and print every problem:\n"
                    "  dataset.json (name, channel_names, target, file_ending, numTraining)\n"
                    "  imagesTr/CASE_0000<ending> (MR; _0001 ... further channels)\n"
                    "  targetsTr/CASE<ending> (CT, any geometry), masksTr/CASE<ending> (optional)\n"
                    "Image headers are read to check 3D, readability, and that MR channels and mask share "
                    "MR channel 0's grid. Exit code 0 if valid, 1 otherwise.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name: 1, 001 or Dataset001_Name")
    parser.add_argument("--no-image-check", action="store_true", help="skip reading image headers")
    args = parser.parse_args(argv)

    def action() -> int:
        from wldm_auto.io.raw_validation import validate_raw_dataset
        folder = raw_root() / resolve_dataset_name(args.dataset, search_in=(RAW,))
        problems = validate_raw_dataset(folder, check_images=not args.no_image_check)
        if problems:
            print(f"{folder}: {len(problems)} problem(s)")
            for problem in problems:
                print(f"  - {problem}")
            return 1
        from wldm_auto.io.raw_dataset import RawDataset
        print(f"OK: {len(RawDataset.load(folder).case_names())} cases ({folder})")
        return 0
    return _run(action)
