"""bone_weight (regression and diffusion image loss): bone voxels count 1 + w times; the plan's value reaches the loss."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from wldm_auto.io.hu import BONE_THRESHOLD_HU
from wldm_auto.io.normalization import normalise_ct
from wldm_auto.planners.schema import DiffusionPlan, PlanError, RegressionPlan, parse_section
from wldm_auto.trainers import diffusion_trainer, regression_trainer
from wldm_auto.trainers.base import TrainerOptions
from wldm_auto.trainers.losses import bone_weighted_l1, masked_l1
from wldm_auto.trainers.run import run_training

from conftest import tiny_copy


def test_zero_weight_is_the_masked_l1_and_bone_counts_one_plus_w_times():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 4, 5, 6, generator=g) * 2 - 1
    pred = torch.rand(2, 1, 4, 5, 6, generator=g) * 2 - 1
    mask = (torch.rand(2, 1, 4, 5, 6, generator=g) > 0.3).float()
    level = 0.4
    assert torch.equal(bone_weighted_l1(pred, target, mask, level, 0.0), masked_l1(pred, target, mask))
    w = 3.0
    error, inside = (pred - target).abs().numpy(), mask.numpy() > 0
    weights = np.where(target.numpy() > level, 1 + w, 1.0)[inside]
    expected = (error[inside] * weights).sum() / weights.sum()
    assert float(bone_weighted_l1(pred, target, mask, level, w)) == pytest.approx(float(expected), rel=1e-5)

    # the gradient of a bone voxel is (1 + w) times that of a soft-tissue voxel with the same error
    target = torch.tensor([0.9, -0.2])
    pred = (target + 0.1).requires_grad_(True)
    bone_weighted_l1(pred, target, torch.ones(2), level, w).backward()
    assert float(pred.grad[0] / pred.grad[1]) == pytest.approx(1 + w)
    with pytest.raises(ValueError, match="bone_weight"):
        bone_weighted_l1(pred, target, torch.ones(2), level, -1.0)


def test_schema_refuses_negative_weights_and_a_diffusion_bone_weight_without_image_loss():
    with pytest.raises(PlanError, match="regression.bone_weight"):
        parse_section(RegressionPlan, {"bone_weight": -1}, "x.regression")
    with pytest.raises(PlanError, match="bone_weight.*image_loss_weight"):
        parse_section(DiffusionPlan, {"bone_weight": 2, "image_loss_weight": 0}, "x.diffusion")
    plan = parse_section(DiffusionPlan, {"bone_weight": 2, "image_loss_weight": 1}, "x.diffusion")
    assert plan.bone_weight == 2


def _set(dataset: str, section: str, **values) -> None:
    plans_path = Path(os.environ["wldm_preprocessed"]) / dataset / "plans.json"
    plans = json.loads(plans_path.read_text())
    plans["configurations"]["3d_wldm"][section].update(values)
    plans_path.write_text(json.dumps(plans))


def test_the_plans_bone_weight_and_level_reach_both_trainers_losses(preprocessed_small, tmp_path, monkeypatch):
    calls: list[tuple[str, float, float, float]] = []

    def recording(module):
        def loss(pred, target, mask, level, weight):
            calls.append((module.__name__, level, weight, float((target > level).float().mean())))
            return bone_weighted_l1(pred, target, mask, level, weight)
        return loss

    for module in (regression_trainer, diffusion_trainer):
        monkeypatch.setattr(module, "bone_weighted_l1", recording(module))
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    _set(dataset, "regression", bone_weight=4.0)
    _set(dataset, "diffusion", bone_weight=2.5, image_loss_weight=1.0)
    options = TrainerOptions(device="cpu", num_workers=0, num_steps=2, steps_per_epoch=2)
    run_training(dataset, "regression", 0, options=options)
    run_training(dataset, "vae", 0, options=options)
    run_training(dataset, "diffusion", 0, options=options)
    plans = json.loads((Path(os.environ["wldm_preprocessed"]) / dataset / "plans.json").read_text())
    level = float(normalise_ct(np.array([BONE_THRESHOLD_HU]), plans["preprocessing"]["ct_window"])[0])
    assert [(m.rsplit(".", 1)[1], w) for m, _, w, _ in calls] == [("regression_trainer", 4.0)] * 2 + \
        [("diffusion_trainer", 2.5)] * 2  # one call per training step
    assert all(lv == pytest.approx(level) for _, lv, _, _ in calls)
    assert any(share > 0 for *_, share in calls)  # the phantom's patches hold bone the weight acts on
