"""diffusion.image_loss_weight: the decoded clean-latent estimate is compared with the CT patch, and it trains."""
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


def _set_image_loss(dataset: str, weight: float) -> None:
    plans_path = Path(os.environ["wldm_preprocessed"]) / dataset / "plans.json"
    plans = json.loads(plans_path.read_text())
    plans["configurations"]["3d_wldm"]["diffusion"]["image_loss_weight"] = weight
    plans_path.write_text(json.dumps(plans))


def test_image_loss_is_logged_and_changes_the_training(preprocessed_small, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    options = TrainerOptions(device="cpu", num_workers=0, num_steps=4, steps_per_epoch=2)
    run_training(dataset, "vae", 0, options=options)
    first = run_training(dataset, "diffusion", 0, options=options)
    plain = load_checkpoint(first)
    shutil.rmtree(first.parent.parent)  # the same trainer again, on the changed plan
    _set_image_loss(dataset, 1.0)
    with_image = load_checkpoint(run_training(dataset, "diffusion", 0, options=options))
    history = with_image["history"]
    assert all(np.isfinite(h["train_image_l1"]) and h["train_image_l1"] > 0 for h in history)
    # the total is the latent loss plus the weighted image term
    for h in history:
        assert h["train_loss"] == pytest.approx(h["train_latent"] + h["train_image_l1"], rel=1e-4)
    assert "train_image_l1" not in plain["history"][0]
    a, b = plain["networks"]["unet"], with_image["networks"]["unet"]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the image term reached the U-Net's weights
