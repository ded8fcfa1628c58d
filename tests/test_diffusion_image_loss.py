"""diffusion.image_loss_weight (the decoded clean-latent estimate against the CT patch) and latent_loss: both train."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from wldm_auto.models.checkpoint import load_checkpoint
from wldm_auto.trainers.base import TrainerOptions
from wldm_auto.trainers.run import run_training

from conftest import tiny_copy


def _set_diffusion(dataset: str, **values) -> None:
    plans_path = Path(os.environ["wldm_preprocessed"]) / dataset / "plans.json"
    plans = json.loads(plans_path.read_text())
    plans["configurations"]["3d_wldm"]["diffusion"].update(values)
    plans_path.write_text(json.dumps(plans))


def test_image_loss_is_logged_and_changes_the_training(preprocessed_small, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    options = TrainerOptions(device="cpu", num_workers=0, num_steps=4, steps_per_epoch=2)
    run_training(dataset, "vae", 0, options=options)
    first = run_training(dataset, "diffusion", 0, options=options)
    plain = load_checkpoint(first)
    shutil.rmtree(first.parent.parent)  # the same trainer again, on the changed plan
    _set_diffusion(dataset, image_loss_weight=1.0)
    with_image = load_checkpoint(run_training(dataset, "diffusion", 0, options=options))
    history = with_image["history"]
    assert all(np.isfinite(h["train_image_l1"]) and h["train_image_l1"] > 0 for h in history)
    # the total is the latent loss plus the weighted image term
    for h in history:
        assert h["train_loss"] == pytest.approx(h["train_latent"] + h["train_image_l1"], rel=1e-4)
    assert "train_image_l1" not in plain["history"][0]
    a, b = plain["networks"]["unet"], with_image["networks"]["unet"]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the image term reached the U-Net's weights

    # diffusion.latent_loss l1: same seed, data and steps as the plain run; only the distance
    # differs, so an ignored option would reproduce the plain run's losses exactly
    shutil.rmtree(first.parent.parent)
    _set_diffusion(dataset, image_loss_weight=0.0, latent_loss="l1")
    l1 = load_checkpoint(run_training(dataset, "diffusion", 0, options=options))
    first_l2, first_l1 = plain["history"][0]["train_loss"], l1["history"][0]["train_loss"]
    assert np.isfinite(first_l1) and first_l1 != pytest.approx(first_l2, rel=1e-3)


def test_timestep_power_reaches_the_training_draws(preprocessed_small, tmp_path, monkeypatch):
    """diffusion.timestep_power: the trainer draws its timesteps with the plan's power (p > 1: mostly high noise)."""
    from wldm_auto.diffusion.schedule import NoiseSchedule

    draws: list[tuple[float, torch.Tensor]] = []
    original = NoiseSchedule.sample_timesteps

    def recording(self, n, device, power=1.0):
        t = original(self, n, device, power)
        draws.append((power, t))
        return t

    monkeypatch.setattr(NoiseSchedule, "sample_timesteps", recording)
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    options = TrainerOptions(device="cpu", num_workers=0, num_steps=3, steps_per_epoch=3)
    run_training(dataset, "vae", 0, options=options)
    _set_diffusion(dataset, timestep_power=8.0)
    run_training(dataset, "diffusion", 0, options=options)
    assert [p for p, _ in draws] == [8.0] * 3  # one draw per training step, at the plan's power
    t = torch.cat([t for _, t in draws]).float()
    plans = json.loads((Path(os.environ["wldm_preprocessed"]) / dataset / "plans.json").read_text())
    timesteps = plans["configurations"]["3d_wldm"]["diffusion"]["timesteps"]
    # expected T - 1 - T / 9 at power 8 (uniform: (T - 1) / 2)
    assert int(t.max()) <= timesteps - 1 and float(t.mean()) > 0.6 * timesteps
