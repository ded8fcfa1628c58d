"""The regression baseline: a plain 3D U-Net trained with masked L1 from MR to CT patches.

Independent of both WLDM stages (no VAE needed). Validation predicts whole
validation volumes with Gaussian-blended sliding windows and reports CT MAE
and PSNR in HU, like the diffusion trainer, so the two compare directly.
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

from wldm_auto.models.factory import build_regression_synthesizer, build_regression_unet
from wldm_auto.models.regression import RegressionSynthesizer
from wldm_auto.planners.schema import RegressionPlan, TrainingPlan
from wldm_auto.trainers.base import BaseTrainer
from wldm_auto.trainers.losses import bone_weighted_l1, laplace_nll

log = logging.getLogger(__name__)


class RegressionTrainer(BaseTrainer):
    """Masked-L1 regression U-Net (bone weighted by the plan's ``bone_weight``); best checkpoint by validation
    MAE (HU). With the plan's ``error_head``, the error head learns by the Laplace likelihood of the sCT
    head's (detached) absolute error; its loss is added, and it cannot reach the sCT head's weights."""

    stage = "regression"
    best_metric = "val_mae_ct_hu"
    best_mode = "min"

    @property
    def regression_plan(self) -> RegressionPlan:
        return self.config.regression

    @property
    def training_plan(self) -> TrainingPlan:
        return self.config.regression.training

    def build(self) -> None:
        self.net = build_regression_unet(self.train_data.num_mr_channels, self.regression_plan)
        divisor = self.net.required_divisor
        if any(p % divisor for p in self.config.patch_size):
            raise ValueError(f"patch size {self.config.patch_size} is not divisible by {divisor}, which the "
                             f"regression U-Net with {len(self.regression_plan.unet_channels)} levels needs: "
                             "edit patch_size or regression.unet_channels in plans.json")
        self.model = self.wrap(self.net)
        self.opt = self.make_optimizer(self.net.parameters(), self.training_plan.learning_rate)
        # gradient-clipping groups: an error head is clipped apart, so it cannot change how the sCT head's
        # gradients are clipped (the sCT head then trains exactly as without it)
        head = list(self.net.error_head.parameters()) if self.net.error_head is not None else []
        ids = {id(p) for p in head}
        self.clip_groups = [[p for p in self.net.parameters() if id(p) not in ids], *([head] if head else [])]

    def networks(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        mr = batch["mr"].to(self.device, non_blocking=True)
        ct = batch["ct"].to(self.device, non_blocking=True)
        valid = batch["valid"].to(self.device, non_blocking=True)
        available = batch["available"].to(self.device, non_blocking=True)
        with_error = self.net.error_head is not None
        with self.autocast():
            prediction = self.model(mr, available, with_error=with_error).float()
        sct = prediction[:, :1]
        loss = bone_weighted_l1(sct, ct, valid, self.bone_level, self.regression_plan.bone_weight)
        metrics = {"loss": loss}
        if with_error:
            metrics["l1"] = loss
            metrics["error_nll"] = laplace_nll(prediction[:, 1:], (ct - sct.detach()).abs(), valid)
            metrics["loss"] = loss + metrics["error_nll"]
        self.optimise(metrics["loss"], self.opt, *self.clip_groups)
        return {k: v.item() for k, v in metrics.items()}

    def synthesizer(self) -> RegressionSynthesizer:
        return build_regression_synthesizer(self.net, self.config, self.config.inference.tile_overlap, self.device)

    def validate(self) -> dict[str, float]:
        """Whole validation volumes, one tiled pass each: CT MAE and PSNR in HU on body & valid voxels."""
        return self.validate_synthesis(self.synthesizer().predict)
