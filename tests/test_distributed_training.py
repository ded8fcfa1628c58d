"""Every stage trains on two CPU processes (torchrun, Gloo, DistributedDataParallel) through ``wldm_train``.

The VAE is covered by ``test_trainer.py::test_ddp_two_gloo_processes``; these
are the second stage, the wavelet-domain model, the regression baseline and the
residual diffusion on a regression prior.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import tiny_copy
from wldm_auto.models.checkpoint import load_checkpoint
from wldm_auto.trainers.base import TrainerOptions
from wldm_auto.trainers.registry import default_trainer
from wldm_auto.trainers.run import run_training


@pytest.mark.parametrize(("stage", "port"), [("diffusion", 29521), ("wavelet_diffusion", 29523),
                                             ("regression", 29525), ("residual_diffusion", 29527)])
def test_two_gloo_processes_train_every_stage(stage, port, preprocessed_small, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    if stage == "diffusion":  # needs the fold's VAE
        run_training(dataset, "vae", 0, options=TrainerOptions(device="cpu", num_workers=0, num_steps=2,
                                                               steps_per_epoch=2))
    if stage == "residual_diffusion":  # needs the fold's regression prior
        run_training(dataset, "regression", 0, options=TrainerOptions(device="cpu", num_workers=0, num_steps=2,
                                                                      steps_per_epoch=2))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "wldm_auto.cli.train", dataset, stage, "--device", "cpu", "--steps", "2",
               "--steps-per-epoch", "2", "--num-workers", "0"]
    done = subprocess.run(command, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend gloo, rank 1 of 2" in done.stderr and "world size 2" in done.stderr
    trainer = default_trainer(stage)
    folder = tmp_path / "results" / dataset / f"{trainer}__wldmPlans__3d_wldm" / "fold_0"
    final = load_checkpoint(folder / "checkpoint_final.pt")
    assert final["step"] == 2 and final["trainer"] == trainer
