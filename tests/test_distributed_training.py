"""Every stage trains on two CPU processes (torchrun, Gloo, DistributedDataParallel) through ``wldm_train``.

The VAE is covered by ``test_trainer.py::test_ddp_two_gloo_processes``; these
are the second stage, the wavelet-domain model, the regression baseline and the
residual diffusion on a regression prior.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest
import torch

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
    assert len(final["rng_ranks"]) == 2  # each rank's random state, for --c
    if stage in ("diffusion", "residual_diffusion"):  # rank 1 diffuses at rank 0's measured (and saved) scales
        assert "rank 1: using rank 0's scales" in done.stderr
        agreed = re.search(r"rank 1: using rank 0's scales (\{.*?\}) \(measured here", done.stderr)
        assert agreed and ast.literal_eval(agreed.group(1))["latent_scale"] == final["latent_scale"]


LAUNCH = """
import sys
from wldm_auto.trainers.base import TrainerOptions
from wldm_auto.trainers.run import run_training
dataset, stop, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"
run_training(dataset, "vae", 0, resume=resume, options=TrainerOptions(
    device="cpu", num_workers=0, num_steps=4, steps_per_epoch=2, stop_at_step=stop or None))
"""


def test_two_ranks_resume_exactly(preprocessed_small, tmp_path, monkeypatch):
    """Stopped after step 2 and continued with --c, two Gloo ranks end with the weights of an uninterrupted run:
    each rank continues its own random stream (the VAE samples its posterior), not rank 0's."""
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH)

    def launch(dataset: str, port: int, stop: int, mode: str) -> None:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(port), str(script), dataset, str(stop), mode]
        done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                              encoding="utf-8", errors="replace", timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    dataset = tiny_copy(preprocessed_small, tmp_path / "a", monkeypatch)
    launch(dataset, 29541, 0, "fresh")
    straight = tmp_path / "a" / "results" / dataset / "VAETrainer__wldmPlans__3d_wldm" / "fold_0"
    dataset = tiny_copy(preprocessed_small, tmp_path / "b", monkeypatch)
    launch(dataset, 29543, 2, "fresh")
    resumed = tmp_path / "b" / "results" / dataset / "VAETrainer__wldmPlans__3d_wldm" / "fold_0"
    assert load_checkpoint(resumed / "checkpoint_latest.pt")["step"] == 2
    launch(dataset, 29545, 0, "resume")
    a = load_checkpoint(straight / "checkpoint_final.pt")["networks"]["vae"]
    b = load_checkpoint(resumed / "checkpoint_final.pt")["networks"]["vae"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
