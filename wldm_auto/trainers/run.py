"""Python API behind ``wldm_train``: resolve dataset, plans and results folder, then train.

Results go to ``$wldm_results/DatasetXXX_Name/<Trainer>__<plans>__<configuration>/fold_F/``;
the model folder holds its own copies of plans.json, dataset.json and the
fingerprint, so it is all that inference needs.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

from wldm_auto.io.files import DISK_FULL_ERRNOS, atomic_path, read_json
from wldm_auto.paths import PREPROCESSED, model_folder_name, preprocessed_root, resolve_dataset_name, results_root
from wldm_auto.planners.schema import Plans
from wldm_auto.trainers.base import RESUMABLE, TrainerOptions
from wldm_auto.trainers.registry import default_trainer, trainer_class

log = logging.getLogger(__name__)

COPIED = ("plans.json", "dataset.json", "dataset_fingerprint.json")


def model_folder(dataset_name: str, trainer: str, plans_name: str, configuration: str) -> Path:
    return results_root(create=True) / dataset_name / model_folder_name(trainer, plans_name, configuration)


def _training_part(plans: dict) -> dict:
    """``plans`` without each configuration's ``inference`` section (prediction settings: they do not change what
    is trained, and prediction reads them from the model folder's plans.json)."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict):
        return plans
    return {**plans, "configurations": {name: {k: v for k, v in c.items() if k != "inference"}
                                        if isinstance(c, dict) else c for name, c in configurations.items()}}


def _check_metadata(preprocessed: Path, model_dir: Path) -> None:
    """Refuse (without writing anything) if the plans changed since this model folder was started; an edit of
    the prediction settings only (``inference``) is not a change of what is trained."""
    source, target = preprocessed / "plans.json", model_dir / "plans.json"
    if not (source.is_file() and target.is_file()):
        return
    new, old = read_json(source), read_json(target)
    if _training_part(new) != _training_part(old):
        raise ValueError(
            f"{source} differs from the plans this model was trained with ({target}); "
            "train the changed plan under a new results folder (move the old one) or restore the plan")
    if new != old:
        log.info("%s: prediction settings (inference) differ from %s; prediction uses the model folder's (edit "
                 "them there)", source, target)


def _copy_metadata(preprocessed: Path, model_dir: Path) -> None:
    """Copy plans/dataset/fingerprint into the model folder (the caller has run :func:`_check_metadata`); a file
    already there is kept."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source, target = preprocessed / name, model_dir / name
        if not source.is_file() or target.is_file():
            continue
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)


def _remove_stale_temporaries(fold_dir: Path) -> None:
    """Delete temporary files a killed run left while writing checkpoints or records (they can be large)."""
    for pattern in (".checkpoint_*.tmp.pt", ".history.json.*.tmp", ".progress.png.*.tmp.png"):
        for path in fold_dir.glob(pattern):
            log.info("removing %s, left by an interrupted write", path)
            path.unlink(missing_ok=True)


class _TrainingLog(logging.FileHandler):
    """The fold's training log; on a full disk it stops with one warning instead of a traceback per record."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.disk_full = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.disk_full:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        error = sys.exc_info()[1]
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            self.disk_full = True
            print(f"warning: {self.baseFilename}: disk full, the training log stops here", file=sys.stderr)
            return
        super().handleError(record)


def run_training(
    dataset: str | int,
    stage: str,
    fold: int = 0,
    trainer: str | None = None,
    configuration: str = "3d_wldm",
    resume: bool = False,
    options: TrainerOptions | None = None,
) -> Path:
    """Train one fold; returns the path of the last checkpoint written.

    Nothing is created until the options, plans, fold and data have been checked
    and the trainer is built, so a run refused at start leaves no empty ``fold_F``.
    """
    options = options or TrainerOptions()
    options.check()
    if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
        raise ValueError(f"--fold must be an integer >= 0, got {fold!r}")
    name = resolve_dataset_name(dataset, (PREPROCESSED,))
    preprocessed = preprocessed_root() / name
    if not (preprocessed / "plans.json").is_file():
        raise ValueError(f"{preprocessed / 'plans.json'} not found: run wldm_plan_and_preprocess -d {dataset} first")
    trainer_name = trainer or default_trainer(stage)
    cls = trainer_class(trainer_name)
    if cls.stage != stage:
        raise ValueError(f"trainer {trainer_name} trains stage {cls.stage!r}, not {stage!r}")
    plans = Plans.load(preprocessed / "plans.json")
    model_dir = model_folder(name, trainer_name, plans.plans_name, configuration)
    fold_dir = model_dir / f"fold_{fold}"
    # the same names --c continues from (BaseTrainer._resume_path): a folder is either empty of them
    # (start fresh, with or without --c) or continuable with --c
    existing = [n for n in RESUMABLE if (fold_dir / n).is_file()]
    if existing and not resume:
        raise FileExistsError(f"{fold_dir} already holds {', '.join(existing)}: use --c to continue it, "
                              "or move the folder away to train from scratch")
    if resume and not existing:
        log.warning("--c: %s holds no checkpoint, starting from scratch", fold_dir)
        resume = False
    is_main = int(os.environ.get("RANK", "0")) == 0
    _check_metadata(preprocessed, model_dir)
    plans_used = Plans.load(model_dir / "plans.json") if (model_dir / "plans.json").is_file() else plans
    instance = cls(plans_used, configuration, fold, preprocessed, fold_dir, options)  # checks fold, data, VAE
    if is_main:
        _copy_metadata(preprocessed, model_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    handler = None
    if is_main:
        _remove_stale_temporaries(fold_dir)
        handler = _TrainingLog(fold_dir / f"training_log_{time.strftime('%Y%m%d-%H%M%S')}.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    try:
        return instance.run(resume=resume)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
