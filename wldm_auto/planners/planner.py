"""Default planner: turns a fingerprint into ``plans.json`` with reasons in ``notes``.

Target spacing is 2 mm isotropic unless asked otherwise (the paper's
setting). The patch size starts from the paper's 128^3, is capped by the
median body extent at the target spacing and shrunk until a rough
activation-memory estimate of the stage-1 VAE fits the memory target; the
batch size is the largest even number (at least 2: the SMD loss needs two
patients per batch) that still fits.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np

from wldm_auto.planners.presets import PRESETS, apply_preset
from wldm_auto.planners.recipe import EDGE_STD_MM, RECIPE_NOTES, REGISTRATION_NOTES
from wldm_auto.planners.schema import (
    WDM_UNET_CHANNELS, ConfigurationPlan, DiffusionPlan, InferencePlan, Plans, PreprocessingPlan, RegistrationPlan,
    RegressionPlan, VAEPlan, residual_diffusion_plan, wavelet_diffusion_plan,
)

log = logging.getLogger(__name__)

PLANS_NAME = "wldmPlans"
CONFIGURATION = "3d_wldm"
PAPER_PATCH = 128
CPU_MEMORY_GB = 2.0
# Rough count of float tensors of the level's width kept per voxel for backward,
# per WaveletBlock (convs, DWT sub-bands, activations) in encoder + decoder.
TENSORS_PER_LEVEL = 24
MAX_BATCH = 8
CHANNEL_DROPOUT = 0.5


def wavelet_unet_levels(patch: Sequence[int], most: int = len(WDM_UNET_CHANNELS)) -> int:
    """Most U-Net levels (<= ``most``) whose downsamplings divide the Haar sub-band patch (half the patch)."""
    levels = 1
    while levels < most and all((p // 2) % 2**levels == 0 and p % 2 == 0 for p in patch):
        levels += 1
    return levels


def default_memory_target() -> tuple[float, str]:
    """(GB, reason): 85% of the first CUDA device, else a small CPU budget."""
    try:
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            return round(0.85 * total, 1), f"85% of the {total:.0f} GB of CUDA device 0 ({torch.cuda.get_device_name(0)})"
    except ImportError:  # planning does not need torch; training does
        pass
    return CPU_MEMORY_GB, f"no CUDA device: a {CPU_MEMORY_GB:g} GB CPU budget (use --gpu-memory-gb to plan for a GPU)"


def estimate_vae_memory_gb(patch: Sequence[int], batch: int, vae: VAEPlan, bytes_per_value: int = 2) -> float:
    """Rough activation memory of one VAE training step (two modalities per patient)."""
    voxels = float(np.prod(patch))
    per_voxel = sum(c / 8**level for level, c in enumerate(vae.channels)) * TENSORS_PER_LEVEL * vae.blocks_per_level
    return 2 * batch * voxels * per_voxel * bytes_per_value / 2**30 + 0.5  # +0.5 GB weights/workspace


def divisor_for(vae: VAEPlan, diffusion: DiffusionPlan) -> int:
    """Patch edges must divide by the VAE downsampling times the U-Net's latent downsampling."""
    return vae.downsampling_factor * 2 ** (len(diffusion.unet_channels) - 1)


def plan_patch_and_batch(
    median_shape: Sequence[int], memory_gb: float, vae: VAEPlan, diffusion: DiffusionPlan,
    dataset_voxels: float,
) -> tuple[list[int], int, float, str]:
    """(patch_zyx, batch, estimated GB, reason)."""
    div = divisor_for(vae, diffusion)
    cap = [max(div, min(PAPER_PATCH, int(math.ceil(s / div)) * div)) for s in median_shape]
    patch = list(cap)
    while estimate_vae_memory_gb(patch, 2, vae) > memory_gb and max(patch) > div:
        axis = int(np.argmax(patch))  # shrink the longest edge first: keeps patches near-cubic
        patch[axis] -= div
    batch = 2
    while (batch + 2 <= MAX_BATCH and estimate_vae_memory_gb(patch, batch + 2, vae) <= memory_gb
           and (batch + 2) * np.prod(patch) <= 0.05 * dataset_voxels):
        batch += 2
    estimate = estimate_vae_memory_gb(patch, batch, vae)
    reason = (f"start at min(128, median shape {list(median_shape)} rounded up to multiples of {div}) = {cap}; "
              f"longest edge shrunk in steps of {div} until the VAE estimate fits {memory_gb:g} GB: {patch}; "
              f"batch {batch} (even, >= 2 for SMD pairs, <= {MAX_BATCH}, <= 5% of the dataset's voxels)")
    if estimate > memory_gb:
        reason += f"; WARNING: even the smallest patch needs ~{estimate:.1f} GB"
    return patch, batch, round(estimate, 2), reason


def median_cropped_shape(fingerprint: dict[str, Any], spacing: Sequence[float], margin_mm: float) -> list[int]:
    """Median body-box shape (z, y, x) at ``spacing`` with the crop margin on both sides."""
    extents = np.array([c["body_extent_mm"] for c in fingerprint["cases"].values()])
    shapes = np.ceil((extents + 2 * margin_mm) / np.asarray(spacing)).astype(int)
    return [int(v) for v in np.median(shapes, axis=0)[::-1]]


def plan_dataset(
    dataset_name: str,
    fingerprint: dict[str, Any],
    channel_names: dict[str, str],
    spacing: Sequence[float] | None = None,
    gpu_memory_gb: float | None = None,
    registration: bool = True,
    preset: str | None = None,
) -> Plans:
    """Plan preprocessing and the ``3d_wldm`` configuration from a fingerprint.

    ``preset``: a name from :data:`~wldm_auto.planners.presets.PRESETS` applied to the planned
    configuration (recorded in ``planner``); None keeps the planner's (GPU-sized) defaults.
    """
    check_preset(preset)
    if not fingerprint["cases"]:
        raise ValueError("fingerprint holds no usable case: nothing to plan")
    pre = PreprocessingPlan()
    # the target spacing is written to the configuration (configurations.<name>.spacing), which is what
    # preprocessing and prediction read; the note stays with the other preprocessing choices
    where = f"written to configurations.{CONFIGURATION}.spacing"
    if spacing is None:
        target = [2.0, 2.0, 2.0]
        pre.notes["target_spacing"] = f"2 mm isotropic, the paper's setting (override with --spacing); {where}"
    else:
        values = [float(v) for v in spacing]
        target = values * 3 if len(values) == 1 else values
        pre.notes["target_spacing"] = f"given on the command line (--spacing); {where}"
    if len(target) != 3 or not all(math.isfinite(v) and v > 0 for v in target):
        raise ValueError(f"--spacing needs 1 or 3 positive, finite numbers, got {spacing}")
    if gpu_memory_gb is not None and not (math.isfinite(float(gpu_memory_gb)) and float(gpu_memory_gb) > 0):
        raise ValueError(f"--gpu-memory-gb needs a positive, finite number, got {gpu_memory_gb}")
    ct_low = [c["ct"]["p0.5"] for c in fingerprint["cases"].values() if "ct" in c]
    ct_high = [c["ct"]["max"] for c in fingerprint["cases"].values() if "ct" in c]
    pre.notes["ct_window"] = (f"[-1024, 3071] HU keeps bone and metal (dataset CT 0.5th percentile in body "
                              f"{np.median(ct_low):.0f} HU, max {np.max(ct_high):.0f} HU); the paper used [-800, 800]")
    pre.notes["mr_percentiles"] = "robust 0.5/99.5 percentiles inside the body map each MR channel to [-1, 1]"
    pre.notes["body_mask"] = "MR above 10% of its 99.5th percentile, closed, largest component, holes filled (masksTr used when given)"
    pre.notes["crop_margin_mm"] = "10 mm of air around the body box keeps the skin edge inside every patch"

    reg = RegistrationPlan(enabled=bool(registration))
    reg.working_spacing_mm = float(max(2.0, min(target)))
    reg.bspline_grid_spacing_mm = float(max(20.0, 5 * reg.working_spacing_mm))
    reg.notes["enabled"] = ("on: CT is registered onto the MR (rigid, then B-spline)" if registration
                            else "off (--no-registration): MR and CT are taken as already aligned in physical space")
    reg.notes["working_spacing_mm"] = ("registration runs on images resampled to the coarser of 2 mm and the target "
                                       "spacing; the transform is then applied to the full-resolution CT")
    reg.notes["initial_orientations"] = ("a short rigid run from each 180-degree rotation picks the start when it beats "
                                         "the identity by orientation_margin (scans from different sessions may be flipped)")
    reg.notes["bspline_grid_spacing_mm"] = ("control points every 20 mm (at least 5 working voxels apart), with a "
                                            "bending-energy penalty: local soft-tissue motion without folding")
    reg.notes.update(REGISTRATION_NOTES)

    # edge_std_mm written out: plans without the key keep meaning no edge term
    vae, diffusion, inference = VAEPlan(), DiffusionPlan(), InferencePlan(edge_std_mm=EDGE_STD_MM)
    median = median_cropped_shape(fingerprint, target, pre.crop_margin_mm)
    if gpu_memory_gb is None:
        memory, memory_reason = default_memory_target()
    else:
        memory, memory_reason = float(gpu_memory_gb), "given on the command line (--gpu-memory-gb)"
    total_voxels = float(sum(np.prod(np.ceil((np.array(c["body_extent_mm"]) + 2 * pre.crop_margin_mm)
                                             / np.array(target))) for c in fingerprint["cases"].values()))
    patch, batch, estimate, patch_reason = plan_patch_and_batch(median, memory, vae, diffusion, total_voxels)
    wavelet = wavelet_diffusion_plan()
    wavelet.unet_channels = list(WDM_UNET_CHANNELS[:wavelet_unet_levels(patch)])
    residual = residual_diffusion_plan()
    residual.unet_channels = list(wavelet.unet_channels)
    several = len(channel_names) > 1
    config = ConfigurationPlan(
        data_identifier=f"{PLANS_NAME}_{CONFIGURATION}",
        spacing=list(target),
        median_shape=median,
        patch_size=patch,
        batch_size=batch,
        estimated_memory_gb=estimate,
        vae=vae, diffusion=diffusion, wavelet_diffusion=wavelet, residual_diffusion=residual, inference=inference,
        regression=RegressionPlan(error_head=True),  # written out: plans without the key keep meaning "off"
        mr_channel_dropout=CHANNEL_DROPOUT if several else 0.0,
        notes={
            "memory_target": f"{memory:g} GB: {memory_reason}",
            "patch_size": patch_reason,
            "median_shape": "median body box (+margin) at the target spacing, numpy (z, y, x) order",
            "vae": ("paper leaves widths open: 3 levels (32/64/128 channels), 4x downsampling, 8 latent channels "
                    "(first 4 structure S, last 4 modality M); SMD 0.01 (the SMD loss is bounded in [-8, 8]: 0.1 let "
                    "it dominate and lowered reconstruction PSNR on the phantom); see the vae_* notes for the losses"),
            "diffusion": ("paper: T=1000, linear betas from 1e-4 (paper prints 0.2 as end; 0.02 is the standard value "
                          "used); prediction target: see diffusion_prediction"),
            "wavelet_diffusion": (f"WDM/cWDM-style alternative (wldm_train DATASET wavelet_diffusion): fixed Haar "
                                  f"sub-bands instead of a VAE, x0-prediction, no DSCA; U-Net widths "
                                  f"{wavelet.unet_channels}: WDM's 64 x (1, 2, 2, 4, 4), as many levels as half "
                                  f"the patch {patch} divides into"),
            "residual_diffusion": ("beyond the paper (wldm_train DATASET residual_diffusion, after the regression "
                                   "stage): diffusion of CT minus the trained regression U-Net's sCT, conditioned on "
                                   "the MR and that sCT, in the Haar sub-bands (exact: the prior's detail is kept); "
                                   "the mean of the samples is the sCT, their spread the uncertainty"),
            "mr_channel_dropout": (f"{len(channel_names)} MR sequences: a training sample sees a random non-empty "
                                   f"proper subset of them with probability {CHANNEL_DROPOUT} (flagged missing), so "
                                   "prediction works with any subset" if several
                                   else "one MR sequence: nothing to drop"),
            "inference": ("50 DDIM steps; VAE tiles 4x the patch (a local, voxel-normalised VAE) overlapping by half; "
                          "latent sampling tiles the size of the patch latent with 0.25 overlap (one shared noise field, "
                          "re-blended every step; the GroupNorm U-Nets see the tile size they were trained on: 2x "
                          "tiles gave the wavelet-domain model 145.5 against 109.1 HU on the fidelity benchmark, "
                          "3D-WLDM 89.0 against 88.8; latent_overlap 0 is about 2x faster at +0.8 HU for 3D-WLDM, "
                          "see InferencePlan); 1 sample (raise for a std map); std maps gain an edge term "
                          "(edge_std_mm, recipe note inference_edge_std)"),
            **RECIPE_NOTES,
        },
    )
    plans = Plans(
        dataset_name=dataset_name,
        plans_name=PLANS_NAME,
        channel_names=dict(channel_names),
        registration=reg,
        preprocessing=pre,
        configurations={CONFIGURATION: config},
        planner=planner_options(spacing, gpu_memory_gb, registration, preset),
        fingerprint_hash=fingerprint["key"],
        notes={"conventions": "spacing in ITK (x, y, z) mm; shapes and patch sizes in numpy (z, y, x) voxels",
               "cases": f"{len(fingerprint['cases'])} cases planned"},
    )
    if preset is None:
        return plans
    return Plans.from_dict(apply_preset(plans.to_dict(), preset, CONFIGURATION), f"plans with preset {preset!r}")


def check_preset(preset: str | None) -> None:
    """One-line ValueError naming the known presets when ``preset`` is not one of them (None is fine)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(sorted(PRESETS))})")


def planner_options(spacing: Sequence[float] | None, gpu_memory_gb: float | None, registration: bool,
                    preset: str | None = None) -> dict[str, Any]:
    """The options a plan was made with (``plans.planner``); a plan is kept while they are unchanged.

    ``preset`` is recorded only when given, so plans made before presets existed stay current."""
    options: dict[str, Any] = {"spacing": None if spacing is None else [float(v) for v in spacing],
                               "gpu_memory_gb": gpu_memory_gb, "registration": bool(registration)}
    if preset is not None:
        options["preset"] = preset
    return options
