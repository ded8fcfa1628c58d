"""wldm_export_model / wldm_install_model: hand a trained model to a colleague as one zip."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wldm_auto.cli.common import run_cli, setup_logging

EXPORT_DESCRIPTION = """\
Write a trained model as one zip that wldm_install_model (or wldm_predict -m
model.zip) takes on another machine: plans.json, dataset.json, the dataset
fingerprint and the chosen checkpoint of each chosen fold, with manifest.json
(format version, wldm_auto/torch/python versions, SHA-256 and size of every file,
licence, description, folds, trainer/plans/configuration names). Each checkpoint
is loaded (weights only) before it is packed, so a broken one is never shipped.
Logs, progress plots and validation outputs are left out.

The licence is the one named in the model's dataset.json unless --licence gives
one: a model trained on data under a licence (e.g. CC BY-NC for SynthRAD) carries
its terms, so say them.

  wldm_export_model -d 001 -tr DiffusionTrainer -f 0 1 -o model.zip --description "T2 brain, 2 mm"
  wldm_export_model -m $wldm_results/Dataset001_X/DiffusionTrainer__wldmPlans__3d_wldm -o model.zip
"""

INSTALL_DESCRIPTION = """\
Install a model zip written by wldm_export_model under
$wldm_results/DatasetXXX_Name/<Trainer>__<plans>__<config>/, where wldm_predict -d
finds it. Nothing is written until the whole archive has been checked: its
format version (a zip from a newer wldm_auto is refused, naming both versions),
that every entry is a plain relative path listed in the manifest (no absolute
paths, '..' or links), and every file's size and SHA-256. It is then unpacked into
a temporary folder, each checkpoint is loaded with weights only (tensors and
plain data: nothing in the zip can run code), and the folder is renamed into
place. An installed model is replaced only with --overwrite.

  wldm_install_model model.zip
  wldm_predict -i mr/ -o sct/ -d 001 -tr DiffusionTrainer
"""


def main_export(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wldm_export_model", description=EXPORT_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-d", "--dataset", help="dataset id/name whose trained model to export (with -tr, -p, -c)")
    source.add_argument("-m", "--model", type=Path, help="a model folder (<Trainer>__<plans>__<config>)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the zip to write (ends in .zip)")
    parser.add_argument("-f", "--folds", type=int, nargs="+", help="folds to export (default: every finished fold)")
    parser.add_argument("-tr", "--trainer", default="DiffusionTrainer", help="trainer name (with -d)")
    parser.add_argument("-p", "--plans", default="wldmPlans", help="plans name (with -d)")
    parser.add_argument("-c", "--configuration", default="3d_wldm", help="configuration (with -d)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pt", help="checkpoint file of each fold to pack")
    parser.add_argument("--licence", "--license", dest="licence",
                        help="licence of the model (default: the one in the model's dataset.json)")
    parser.add_argument("--description", default="", help="free text stored in the manifest (data, intended use)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output zip")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def action() -> int:
        from wldm_auto.inference.model_archive import export_model

        model = args.model
        if model is None:
            from wldm_auto.paths import RESULTS, model_folder_name, resolve_dataset_name, results_root

            name = resolve_dataset_name(args.dataset, (RESULTS,))
            model = results_root() / name / model_folder_name(args.trainer, args.plans, args.configuration)
        manifest = export_model(model, args.output, args.folds, args.checkpoint, args.licence, args.description,
                                args.overwrite)
        print(f"exported {manifest.root} fold(s) {' '.join(map(str, manifest.folds))} -> {args.output} "
              f"(licence: {manifest.licence})")
        return 0

    return run_cli(action)


def main_install(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wldm_install_model", description=INSTALL_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", type=Path, help="a model zip from wldm_export_model")
    parser.add_argument("--overwrite", action="store_true", help="replace an installed model of the same name")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def action() -> int:
        from wldm_auto.inference.model_archive import install_model

        folder = install_model(args.archive, overwrite=args.overwrite)
        print(f"installed -> {folder}")
        return 0

    return run_cli(action)


if __name__ == "__main__":
    sys.exit(main_export())
