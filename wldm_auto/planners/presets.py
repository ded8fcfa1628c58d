"""Named plan presets: edits of the planner's (GPU-sized) defaults for other budgets, as a user would make by hand.

``cpu``: the configuration the demo and the fidelity benchmark train on two CPU cores in minutes
(16x32x32 patches, narrow networks, a 2x-downsampling VAE with a width-4 shortcut and centred latents, latent
diffusion trained mostly at high noise and mostly on the decoded patch's L1 error (10x the latent loss), bone
(> 250 HU) counted 5x in the regression U-Net's L1 and in that image loss, short schedules, no adversarial loss).
Apart from the diffusion stage's timestep draws and image loss and the bone weight (measured at this budget only),
the recipe (losses, weights, prediction target, normalisation) is the planner's default; the reasons for each
choice, the preset's own included, are in the plan's notes.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from wldm_auto.io.files import read_json, write_json
from wldm_auto.planners.recipe import CPU_NOTES

CPU_VALIDATION_VOXELS = 4194304  # 4 M voxels per validation case and epoch (a whole-body MR at 2 mm has ~25 M)
# the Haar-space diffusion sections (wavelet-domain and residual): narrow U-Net, short schedule
HAAR_DIFFUSION: dict[str, Any] = {
    "unet_channels": [32, 64], "validation_ddim_steps": 10, "ema_decay": 0.995, "timestep_power": 2.0,
    "training": {"learning_rate": 1e-3, "warmup_steps": 50, "num_epochs": 4, "steps_per_epoch": 300,
                 "checkpoint_every_steps": 300, "validation_max_voxels": CPU_VALIDATION_VOXELS}}
CPU_PRESET: dict[str, Any] = {
    "patch_size": [16, 32, 32], "batch_size": 2,
    "vae": {"channels": [16, 32], "downsampling_factor": 2, "discriminator_channels": 16, "discriminator_layers": 2,
            "adv_weight": 0.0, "shortcut": 4,
            "training": {"learning_rate": 2e-3, "warmup_steps": 20, "num_epochs": 4, "steps_per_epoch": 200,
                         "checkpoint_every_steps": 200, "validation_max_voxels": CPU_VALIDATION_VOXELS}},
    "diffusion": {"unet_channels": [32, 64], "validation_ddim_steps": 10, "ema_decay": 0.995, "center_latents": True,
                  "timestep_power": 3.0, "image_loss_weight": 10.0, "bone_weight": 4.0,
                  "training": {"learning_rate": 1e-3, "warmup_steps": 50, "num_epochs": 4, "steps_per_epoch": 300,
                               "checkpoint_every_steps": 300, "validation_max_voxels": CPU_VALIDATION_VOXELS}},
    "wavelet_diffusion": HAAR_DIFFUSION,
    "residual_diffusion": HAAR_DIFFUSION,
    "regression": {"unet_channels": [16, 32, 64], "bone_weight": 4.0,
                   "training": {"learning_rate": 2e-3, "warmup_steps": 20, "num_epochs": 4, "steps_per_epoch": 300,
                                "checkpoint_every_steps": 300, "validation_max_voxels": CPU_VALIDATION_VOXELS}},
    "inference": {"ddim_steps": 10},
}
PRESETS: dict[str, dict[str, Any]] = {"cpu": CPU_PRESET}
PRESET_NOTES: dict[str, dict[str, str]] = {"cpu": CPU_NOTES}
NOTES = {"cpu": "preset 'cpu': networks and schedules sized for two CPU cores (demo, fidelity benchmark); "
                "recipe as the planner's except the diffusion stage's timestep draws and image loss and the bone "
                "weight of the regression and image losses (see the other notes)"}


def merge(target: dict[str, Any], changes: dict[str, Any]) -> None:
    """Recursively write ``changes`` into ``target`` (nested dicts merged, other values replaced)."""
    for key, value in changes.items():
        if isinstance(value, dict):
            if not isinstance(target.get(key), dict):
                raise KeyError(f"preset key {key!r} is not a section of the plan")
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def apply_preset(plans: dict[str, Any], name: str, configuration: str = "3d_wldm") -> dict[str, Any]:
    """``plans`` (a plans.json dict) with preset ``name`` applied to ``configuration``; idempotent."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    out = copy.deepcopy(plans)
    config = out["configurations"][configuration]
    merge(config, PRESETS[name])
    config.setdefault("notes", {})["preset"] = NOTES[name]
    config["notes"].update(PRESET_NOTES[name])
    return out


def apply_preset_file(plans_path: str | Path, name: str, configuration: str = "3d_wldm") -> None:
    """Apply preset ``name`` to the plans file in place (atomic write)."""
    write_json(apply_preset(read_json(plans_path), name, configuration), plans_path)
