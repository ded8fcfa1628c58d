"""The explicit trainer registry: ``-tr NAME`` picks a class from this table, nothing is discovered."""
from __future__ import annotations

from wldm_auto.trainers.base import BaseTrainer
from wldm_auto.trainers.diffusion_trainer import (
    DiffusionTrainer, DiffusionTrainer_noDSCA, DiffusionTrainer_noDSCA_noSMD, DiffusionTrainer_noDSCA_noSMD_noWRM,
    WaveletDiffusionTrainer,
)
from wldm_auto.trainers.regression_trainer import RegressionTrainer
from wldm_auto.trainers.residual_trainer import ResidualDiffusionTrainer
from wldm_auto.trainers.vae_trainer import VAETrainer, VAETrainer_noSMD, VAETrainer_noWRM, VAETrainer_noWRM_noSMD

TRAINERS: dict[str, type[BaseTrainer]] = {
    "VAETrainer": VAETrainer,
    "VAETrainer_noWRM": VAETrainer_noWRM,
    "VAETrainer_noSMD": VAETrainer_noSMD,
    "VAETrainer_noWRM_noSMD": VAETrainer_noWRM_noSMD,
    "DiffusionTrainer": DiffusionTrainer,
    "DiffusionTrainer_noDSCA": DiffusionTrainer_noDSCA,
    "DiffusionTrainer_noDSCA_noSMD": DiffusionTrainer_noDSCA_noSMD,
    "DiffusionTrainer_noDSCA_noSMD_noWRM": DiffusionTrainer_noDSCA_noSMD_noWRM,
    "WaveletDiffusionTrainer": WaveletDiffusionTrainer,
    "RegressionTrainer": RegressionTrainer,
    "ResidualDiffusionTrainer": ResidualDiffusionTrainer,
}

DEFAULT_TRAINER = {"vae": "VAETrainer", "diffusion": "DiffusionTrainer",
                   "wavelet_diffusion": "WaveletDiffusionTrainer", "regression": "RegressionTrainer",
                   "residual_diffusion": "ResidualDiffusionTrainer"}


def trainer_class(name: str) -> type[BaseTrainer]:
    """The registered class called ``name``; ValueError listing the known names otherwise."""
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r} (known: {', '.join(sorted(TRAINERS))})")
    return TRAINERS[name]


def default_trainer(stage: str) -> str:
    if stage not in DEFAULT_TRAINER:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(sorted(DEFAULT_TRAINER))})")
    return DEFAULT_TRAINER[stage]
