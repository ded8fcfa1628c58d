"""Typed view of ``plans.json`` (DESIGN.md section 4).

The JSON is the source of truth and stays hand-editable; these dataclasses
are the one place that knows its schema. Loading rejects unknown keys (naming
the key and where it was found), values of the wrong type and choice fields
(``prediction``, ``first_stage``, ``beta_schedule``, registration stages, ...)
outside their allowed values (:data:`CHOICES`), so a typo in an edited plan
fails loudly instead of being ignored.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wldm_auto.io.files import read_json, write_json

log = logging.getLogger(__name__)

PLANS_VERSION = 1

# Allowed values of the plan's choice fields. Planning imports no later stage, so the sets are
# written here; tests/test_schema.py checks each against the set its consumer accepts (named).
FIRST_STAGES = ("vae", "haar")  # models/factory.py (build_first_stage, check_first_stage): first stage of latent diffusion
BETA_SCHEDULES = ("linear", "cosine")  # diffusion.schedule.SCHEDULES
PREDICTIONS = ("epsilon", "v", "x0")  # diffusion.schedule.PREDICTIONS
VAE_NORMALIZATIONS = ("voxel", "group")  # networks.blocks.NORMALIZATIONS
EXPORT_INTERPOLATIONS = ("bspline", "linear")  # inference.export.EXPORT_INTERPOLATORS
SCT_ESTIMATES = ("sample_mean", "posterior_mean")  # models.latent.LatentSynthesizer.mean_estimate
PRIOR_FOLDS = ("own", "out_of_fold")  # trainers.residual_trainer.PRIOR_FOLDS: which regression predicts a training case
RECONSTRUCTION_LOSSES = ("l1", "l2")  # trainers.vae_trainer.RECONSTRUCTION_LOSSES, diffusion_trainer.LATENT_LOSSES
PRECISIONS = ("float32", "bfloat16", "float16")  # models.precision.DTYPES: prediction's network autocast
REGISTRATION_STAGES = ("rigid", "affine", "bspline")  # elastix default parameter maps (preprocessing.registration)
INITIAL_ORIENTATIONS = ("identity", "rot180_x", "rot180_y", "rot180_z")  # preprocessing.registration.ORIENTATIONS
REGISTRATION_PYRAMIDS = ("smoothing", "recursive", "shrinking")  # preprocessing.registration.PYRAMIDS
# the pairwise image metrics compiled into itk-elastix 0.25.4 (its *MetricInstallComponent symbols; the
# group-wise and point-set metrics need inputs the registration does not give)
REGISTRATION_METRICS = (
    "AdvancedMattesMutualInformation", "NormalizedMutualInformation", "AdvancedNormalizedCorrelation",
    "AdvancedMeanSquares", "AdvancedKappaStatistic", "GradientDifference", "NormalizedGradientCorrelation",
    "PatternIntensity", "SumSquaredTissueVolumeDifference",
)


class PlanError(ValueError):
    """plans.json does not match the schema; the message names the key."""


@dataclass
class RegistrationPlan:
    """CT (moving) onto MR (fixed) with elastix."""

    enabled: bool = True
    stages: list[str] = field(default_factory=lambda: ["rigid", "bspline"])
    metric: str = "AdvancedMattesMutualInformation"
    working_spacing_mm: float = 2.0
    bspline_grid_spacing_mm: float = 20.0
    iterations: list[int] = field(default_factory=lambda: [256, 256])
    resolutions: list[int] = field(default_factory=lambda: [3, 2])
    histogram_bins: int = 32
    spatial_samples: int = 2048
    initial_orientations: list[str] = field(default_factory=lambda: ["identity", "rot180_x", "rot180_y", "rot180_z"])
    orientation_margin: float = 0.02
    orientation_spacing_mm: float = 8.0
    orientation_iterations: int = 64
    orientation_resolutions: int = 1
    pyramid: str = "recursive"
    body_margin_mm: float = 30.0
    bending_energy_weight: float = 1.0
    ct_padding_threshold_hu: float = -1500.0
    max_folding_fraction: float = 0.01
    min_overlap_fraction: float = 0.05
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class BodyMaskPlan:
    """Body mask from MR channel 0 (used when no mask is given)."""

    threshold_fraction: float = 0.1
    closing_mm: float = 6.0
    keep_largest_component: bool = True
    fill_holes: bool = True


@dataclass
class PreprocessingPlan:
    """Per-case preprocessing. The spacing every case is resampled to is ``configurations.<name>.spacing``
    (plans written before it was the only one also held ``preprocessing.target_spacing``: see
    :func:`legacy_target_spacing`)."""

    body_mask: BodyMaskPlan = field(default_factory=BodyMaskPlan)
    use_provided_masks: bool = True
    crop_margin_mm: float = 10.0
    ct_window: list[float] = field(default_factory=lambda: [-1024.0, 3071.0])
    mr_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    mr_clip: bool = True
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainingPlan:
    """Optimisation schedule of one stage (AdamW, warm-up then cosine decay)."""

    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    num_epochs: int = 400
    steps_per_epoch: int = 250
    warmup_steps: int = 500
    grad_clip: float = 1.0
    checkpoint_every_steps: int = 500
    amp: bool = True
    compile: bool = False
    validation_max_voxels: int = 8388608  # per validation case and epoch: a fixed centred crop beyond this; 0 = whole


@dataclass
class VAEPlan:
    """Stage 1: shared MR/CT wavelet VAE (paper leaves widths and weights open).

    ``channels`` has one width per resolution level; the latent sits at
    ``downsampling_factor`` = 2 ** (len(channels) - 1). ``group_width`` is the
    number of channels per group of the group-wise convolutions.
    ``reconstruction_loss``: ``"l1"`` or ``"l2"`` (the paper's), per voxel, MR
    and CT each averaged over their own voxels; ``ct_weight`` scales the CT term
    (MR weight 1). ``kl_weight`` multiplies the KL averaged over latent elements.
    ``normalization``: ``"voxel"`` (per-voxel LayerNorm: the VAE is local, so tiles of
    any size give the same output) or ``"group"`` (GroupNorm).
    ``smd_pooled_modality``: compare the modality codes M in the SMD loss by their
    channel means (one vector per patch) instead of voxel by voxel, so M can agree within a
    modality without becoming a constant image. ``ema_decay`` > 0 keeps an exponential
    moving average of the VAE weights: validation and every later stage use it.
    ``shortcut``: 0 (off) or the width of a fixed space-to-channel map of the input added to the latent
    mean, and of its inverse added to the decoder's output (DC-AE's residual autoencoding): each latent
    voxel's f^3 input voxels averaged into ``shortcut`` groups (1: their mean; f^3 = latent_channels:
    lossless), so the networks learn what that re-arrangement misses.
    """

    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    blocks_per_level: int = 1
    group_width: int = 8
    latent_channels: int = 8
    downsampling_factor: int = 4
    wrm: bool = True
    shortcut: int = 0
    normalization: str = "voxel"
    reconstruction_loss: str = "l1"
    ct_weight: float = 1.0
    kl_weight: float = 1e-6
    smd_weight: float = 0.01
    smd_pooled_modality: bool = True
    ema_decay: float = 0.0
    adv_weight: float = 0.05
    adv_start_step: int = 10000
    discriminator_channels: int = 32
    discriminator_layers: int = 3
    discriminator_learning_rate: float = 1e-4
    training: TrainingPlan = field(default_factory=TrainingPlan)


@dataclass
class DiffusionPlan:
    """Stage 2: conditional diffusion U-Net in the space of a first stage.

    ``first_stage``: ``"vae"`` (3D-WLDM: the latent space of the fold's trained
    wavelet VAE, DSCA on the skips) or ``"haar"`` (WDM/cWDM style: the fixed
    one-level 3D Haar transform, 8 sub-bands per channel at half resolution,
    the low-pass band divided by sqrt(8); no training, no S/M split, so no DSCA).
    ``prediction``: ``"epsilon"`` (the paper's), ``"v"`` or ``"x0"``; ``min_snr_gamma``
    > 0 weights the loss over timesteps by min-SNR-gamma (0: unweighted). ``latent_loss``: the
    distance between prediction and target, ``"l2"`` (the paper's) or ``"l1"``. ``sct_estimate``: the sCT
    prediction writes, ``"sample_mean"`` (the paper's: the mean of the drawn samples) or
    ``"posterior_mean"`` (meant for the x0 target: the denoiser's clean estimate from pure noise, one step, i.e.
    its estimate of the mean CT given the condition; the samples then only give the std map). ``image_loss_weight``
    > 0 adds the masked L1 between the CT patch and the frozen first stage's decoding of the
    predicted clean latent (in [-1, 1] CT units), so the U-Net is trained on the error a
    reader sees in HU, not only on latent distances. ``prior_folds`` (section ``residual_diffusion`` only):
    which trained regression U-Net gives the prior of a training patch: ``"own"`` (the fold's, which has
    seen that case) or ``"out_of_fold"`` (the fold that held the case out in ``splits_final.json``, as
    nnU-Net's cascade feeds cross-validation predictions to its next stage: the residuals trained on are
    those of a prior on a case it never saw, as at prediction; needs the other folds' regressions).
    Prediction always uses the fold's own prior. ``center_latents`` (VAE first stage): subtract the per-channel
    mean of the CT latents (measured with the scale on the first training batches, stored in the checkpoint)
    before scaling, so the denoiser's clean target is centred; a latent far from 0 (e.g. the VAE's ``shortcut``
    carrying the CT's values) otherwise takes the x0 denoiser hundreds of steps to reach. ``timestep_power``: the
    training timesteps are drawn as ``t = T - 1 - floor(T * u ** p)`` with ``u`` uniform: 1 is uniform (the paper's),
    p > 1 favours high noise, where the clean estimate depends on the MR alone (the share of t >= T/2 is
    0.5 ** (1/p): 0.71 at p = 2). ``bone_weight``: in the image loss, voxels whose true CT is above 250 HU (bone,
    the bone Dice threshold) count ``1 + bone_weight`` times (0: plain L1; needs ``image_loss_weight`` > 0).
    ``prior_blur_mm`` (section ``residual_diffusion`` only): > 0 smooths each training batch's prior by a
    Gaussian of sigma uniform in [0, prior_blur_mm] mm before the residual is taken (prediction uses the prior
    as it is), so the model learns to restore what a smooth prior lacks; 0: off (recipe note residual_prior_blur).
    """

    first_stage: str = "vae"
    timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "x0"
    min_snr_gamma: float = 0.0
    latent_loss: str = "l2"
    image_loss_weight: float = 0.0
    unet_channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    dsca: bool = True
    ema_decay: float = 0.999
    validation_ddim_steps: int = 10
    sct_estimate: str = "sample_mean"
    prior_folds: str = "own"
    center_latents: bool = False
    timestep_power: float = 1.0
    bone_weight: float = 0.0
    prior_blur_mm: float = 0.0
    training: TrainingPlan = field(default_factory=TrainingPlan)


# WDM (Friedrich et al. 2024): base 64, multipliers (1, 2, 2, 4, 4), x0-prediction, no attention
WDM_UNET_CHANNELS = [64, 128, 128, 256, 256]


def wavelet_diffusion_plan() -> DiffusionPlan:
    """Defaults of the wavelet-domain (WDM-style) configuration: Haar first stage, x0 target, no DSCA."""
    return DiffusionPlan(first_stage="haar", prediction="x0", dsca=False, unet_channels=list(WDM_UNET_CHANNELS))


def residual_diffusion_plan() -> DiffusionPlan:
    """Defaults of the residual configuration (``residual_diffusion``): diffusion of CT minus a trained
    regression U-Net's prediction, conditioned on MR and that prior; Haar first stage (exact, so the prior's
    detail is kept), x0 target, no DSCA (its condition is not an S/M-split MR latent); the sCT is the
    posterior-mean estimate, the samples give the std (see the ``residual_sct_estimate`` note)."""
    return DiffusionPlan(first_stage="haar", prediction="x0", dsca=False, unet_channels=list(WDM_UNET_CHANNELS),
                         sct_estimate="posterior_mean")


@dataclass
class RegressionPlan:
    """Baseline: a 3D U-Net mapping normalised MR to normalised CT (masked L1). ``bone_weight``: voxels whose
    true CT is above 250 HU (bone, the bone Dice threshold) count ``1 + bone_weight`` times in the L1 (0: plain).
    ``error_head``: a second head on the U-Net's detached last features learns each voxel's expected absolute
    error (a Laplace scale b, by the Laplace negative log-likelihood of the sCT head's error); prediction then
    writes a std map (sqrt(2) b, with any spread over folds or mirrorings added in variance) from one pass,
    and the sCT is the same as without the head (its gradients are clipped apart, so the trained sCT head is
    bit for bit the plain one's). False here, so a plan written before the key existed has no head; the
    planner writes true into new plans (recipe note ``regression_error_head``). On the fidelity benchmark's test cases (``cpu`` preset, seed
    12345, 1900 steps; 2026-12-06) the sCT stayed 67.4 HU and the head's std ranked the errors with a voxel
    Spearman of 0.37 (AUSE 25.2 HU; per case 0.33-0.39), coverage at 2 std 0.86 (0.93-0.95 on the two
    simulated abdomens, 0.70 on the phantom's slab, which it does not know is unlike its training data), case
    Spearman / Pearson 0.60 / 0.36; with 8 mirrorings on top 0.40 (AUSE 21.8 HU, coverage 0.87), where the
    mirrorings alone give 0.47 (AUSE 16.9 HU; coverage 0.30 raw, 0.91 calibrated) at 8x the time. So the head
    is the one-pass std map; mirroring ranks the errors better. It costs one more full-resolution convolution."""

    unet_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    blocks_per_level: int = 2
    group_width: int = 8
    bone_weight: float = 0.0
    error_head: bool = False
    training: TrainingPlan = field(default_factory=TrainingPlan)


@dataclass
class InferencePlan:
    """Prediction settings. ``tile_overlap`` applies to VAE encoding/decoding tiles, which are
    ``image_tile_scale`` training patches wide per axis when the VAE is local (voxel
    normalisation; a GroupNorm VAE's output depends on the tile, so it keeps the patch);
    latent sampling uses tiles ``latent_tile_scale`` times the patch's latent size at the fraction
    ``latent_overlap`` (every DDIM step re-blends the whole latent with one shared noise field, so
    a small overlap leaves no seams); with ``latent_margin`` > 0, the fewest tiles of at most that
    size whose neighbours overlap by that many latent voxels, as small as that allows. Tiles shrink
    until a first-level U-Net activation fits the VAE tiles' element budget.
    The default is patch-sized latent tiles (scale 1) at overlap 0.25: the diffusion U-Nets use
    GroupNorm, whose statistics change with the tile, so tiles of the size they were trained on are the
    safe choice. On the fidelity benchmark's test cases (trained models, 10 DDIM steps, 1 sample, MAE in
    HU, mean of seeds 0/1/2 where given) against the former default of 2x tiles at 0.25: 3D-WLDM 88.8
    against 89.0 (seeds 1/2: SSIM 0.823 / 0.825, bone Dice 0.04 / 0.05), the wavelet-domain model 109.1
    against 145.5, the residual model's posterior-mean sCT 66.36 either way (one residual sample: 77.0
    against 75.8). Larger tiles are faster but shift the statistics: one tile per volume (8x tiles) gave
    3D-WLDM 88.2 HU but bone Dice 0.00, the wavelet-domain model 181.0 HU (an earlier run, linear export:
    146.7 with 2x tiles).
    ``latent_overlap`` 0 is the fast setting: patch-sized tiles that only share the voxels the even
    spacing leaves, so a 250 x 180 x 450 MR at 2 mm (64^3 patches) needs 96 U-Net tiles per step against
    200 at 0.25 and 490 for independent patches at 0.5 (bench/sampler.py, 50 steps: 4.9x faster than
    independent patches, against 2.7x at 0.25); it cost 3D-WLDM 0.8 HU (89.9; SSIM 0.821, bone Dice
    0.06), the wavelet-domain model nothing (109.2) and the residual model's posterior mean 0.1 HU
    (66.46). Independent patches (each encoded, sampled with its own noise and decoded, overlap 0.5;
    seed 0) gave 3D-WLDM 88.8 HU, SSIM 0.819, bone Dice 0.04: their overlaps average about 8 independent
    samples per voxel, which lowers soft-tissue MAE and blurs bone.
    A local VAE's tiles (at most ``image_tile_scale`` patches) overlap by ``first_stage_margin``
    image voxels instead of ``tile_overlap``: as few and as small tiles as that allows
    (bench/predict.py; the VAE's receptive field: with a 16-voxel overlap a tiny-width VAE's tiled
    decoding differed from whole-volume decoding by 0.04 mean / 0.71 max in [-1, 1] units, with 64
    voxels by 0.0002 / 0.011).

    ``precision``: the networks' forwards (VAE encode/decode, denoiser, regression U-Net) under
    autocast in "bfloat16" or "float16" (``models/precision.py``; blending, DDIM updates and the
    schedule stay float32); "float32" (default) is the plain prediction, bit for bit. ``wldm_predict
    --precision`` overrides it. Measured on the 2-core CPU (whole bundled phantom, tiny model trained
    8+8 steps at 4 mm, same seed; tests/test_precision.py): bfloat16 differed from float32 by at most
    22 HU and 5.6 HU on average inside the body (4 DDIM steps; 10 steps x 5 samples: 17 / 5.5 HU) in
    the same time; float16 by 3 / 0.6 HU but 19x slower on CPU (no native kernels). GPU figures:
    bench/gpu_check.py (``predict_precision``).

    ``mirror_axes``: test-time mirroring (``models/mirroring.py``; ``wldm_predict --mirror-axes``): every
    sample is also drawn on the MR flipped along each subset of these axes (0 z, 1 y, 2 x) and flipped
    back, so one sample becomes 2 ** len(axes) draws whose mean is the sCT and whose spread enters the
    std map; [] (default) is off. Use only axes the model was trained to see flipped
    (``augmentation.mirror_axes``). It costs 2 ** len(axes) times the prediction time. On the fidelity
    benchmark's test cases (4 cases, trained models, ``bench/fidelity.py --mirror-axes 0 1 2``) the
    regression U-Net's 8 mirrorings gave 66.2 HU MAE against 66.5 without, and its first std map: voxel
    Spearman |error|-std 0.47 and AUSE 14.5 HU, against 0.14-0.27 and 37-48 HU for the diffusion models'
    5-sample spread; calibrated coverage at 2 std 0.92. 3D-WLDM 86.6 HU (88.6), Spearman 0.41;
    wavelet-domain 102.6 HU (109.1), 0.38; residual 65.8 HU (66.4), 0.22 (its samples' spread dilutes
    the mirrorings').

    ``edge_std_mm``: the std map's edge term (``inference/edges.py``): wherever a std map is made (several
    draws, or a regression error head), its variance gains (edge_std_mm x the sCT's gradient magnitude in
    HU/mm, smoothed over 2 mm)^2, the HU change of a structure that far off; 0 (the default, and what a plan
    written before the key means): none. The planner writes 4 (recipe note ``inference_edge_std``): on the
    fidelity benchmark's test cases it raised the regression head's voxel Spearman from 0.37 to 0.47 and its
    uncalibrated coverage at 2 std from 0.86 to 0.95, at no measurable cost.

    ``export_interpolation``: how the sCT goes from the plan grid back to the input MR's grid,
    ``"bspline"`` (cubic, default) or ``"linear"``; the std map always linearly (a cubic spline can
    undershoot 0). On the fidelity benchmark's test cases (CT to 3 mm and back: 1 x 1 x 2.5 mm phantom,
    2 x 2 x 3 mm simulated) the resampling floor was 17.3 HU MAE with B-spline against 21.9 with
    linear, the regression U-Net 66.5 against 67.9 (better on every case) and 3D-WLDM 88.9 either
    way (its first-stage ceiling 53.1 against 53.9); it costs about 5 s more on a 250 x 250 x 450 MR
    (bench/predict.py).

    ``second_opinion_factor`` / ``second_opinion_smoothing_mm``: with a second model's sCT for the same MR
    (``wldm_predict --second-opinion DIR``, ``inference/second_opinion.py``) the std map's variance gains
    (factor x |sCT - second sCT| smoothed by a Gaussian of smoothing_mm)^2; without one they do nothing.
    2 and 4 mm: the validation case's choice on the fidelity benchmark (regression U-Net ensemble, 3D-WLDM
    as the second opinion)."""

    ddim_steps: int = 50
    ddim_eta: float = 0.0
    tile_overlap: float = 0.5
    first_stage_margin: int = 64
    image_tile_scale: int = 4
    latent_tile_scale: int = 1
    latent_overlap: float = 0.25
    latent_margin: int = 0
    samples: int = 1
    precision: str = "float32"
    export_interpolation: str = "bspline"
    mirror_axes: list[int] = field(default_factory=list)
    edge_std_mm: float = 0.0
    second_opinion_factor: float = 2.0
    second_opinion_smoothing_mm: float = 4.0


@dataclass
class AugmentationPlan:
    """Training-patch augmentation (``trainers/augmentation.py``). Probabilities are per sample; a
    probability 0 drops that transform. Spatial transforms act identically on MR, CT and masks;
    brightness, contrast and gamma on the MR channels only. Ranges are [low, high]."""

    p_mirror: float = 1.0  # then every axis in mirror_axes is flipped with probability 0.5
    mirror_axes: list[int] = field(default_factory=lambda: [0, 1, 2])
    p_rotation: float = 0.2  # angles uniform in +-rotation_degrees about each axis
    rotation_degrees: float = 15.0
    p_scale: float = 0.2  # one isotropic factor (> 1 zooms out)
    scale: list[float] = field(default_factory=lambda: [0.85, 1.15])
    enlarge_input: bool = True  # sample a larger patch for rotation/scale so corners hold image, not border
    p_brightness: float = 0.15
    brightness: list[float] = field(default_factory=lambda: [0.75, 1.25])
    p_contrast: float = 0.15
    contrast: list[float] = field(default_factory=lambda: [0.75, 1.25])
    p_gamma: float = 0.3
    gamma: list[float] = field(default_factory=lambda: [0.7, 1.5])


CASE_SAMPLINGS = ("uniform", "volume")  # ConfigurationPlan.case_sampling


@dataclass
class ConfigurationPlan:
    """One trainable configuration (e.g. ``3d_wldm``)."""

    data_identifier: str
    spacing: list[float]
    median_shape: list[int]
    patch_size: list[int]
    batch_size: int
    estimated_memory_gb: float
    vae: VAEPlan = field(default_factory=VAEPlan)
    diffusion: DiffusionPlan = field(default_factory=DiffusionPlan)
    wavelet_diffusion: DiffusionPlan = field(default_factory=wavelet_diffusion_plan)
    residual_diffusion: DiffusionPlan = field(default_factory=residual_diffusion_plan)  # absent in older plans
    regression: RegressionPlan = field(default_factory=RegressionPlan)
    inference: InferencePlan = field(default_factory=InferencePlan)
    augmentation: AugmentationPlan = field(default_factory=AugmentationPlan)
    # probability that a training sample sees only a random non-empty proper subset of its MR channels
    # (the others are zeroed and flagged missing), so one model serves any subset at prediction
    mr_channel_dropout: float = 0.0
    # how a training step picks its cases: "uniform" (each case equally often, as nnU-Net does) or "volume" (in
    # proportion to the case's preprocessed voxel count, so every part of the anatomy counts alike however the
    # cohort's scans are cut; a few short scans then no longer stand for a share of the training they do not hold)
    case_sampling: str = "uniform"
    notes: dict[str, str] = field(default_factory=dict)


# Carney et al. 2006 (Med Phys 33:976, Table 1): kVp -> [a (cm^-1 per HU+1000), b (cm^-1), breakpoint (HU)]
CARNEY_BONE = {"80": [3.64e-5, 6.26e-2, 50.0], "100": [4.43e-5, 5.44e-2, 52.0], "110": [4.92e-5, 4.88e-2, 43.0],
               "120": [5.10e-5, 4.71e-2, 47.0], "130": [5.51e-5, 4.24e-2, 37.0], "140": [5.64e-5, 4.08e-2, 30.0]}


@dataclass
class MuMapPlan:
    """CT (HU) -> linear attenuation coefficient at 511 keV (cm^-1) for PET/MR attenuation maps (``--mumap``).

    Bilinear (Carney et al. 2006): ``water_slope * (HU + 1000)`` up to the breakpoint, above it
    ``a * (HU + 1000) + b`` with ``[a, b, breakpoint] = bone[str(kvp)]``; negative values become 0.
    ``kvp``: the tube voltage of the CTs the model learnt from (the sCT mimics them)."""

    kvp: int = 120
    water_slope: float = 9.6e-5
    bone: dict[str, list[float]] = field(default_factory=lambda: {k: list(v) for k, v in CARNEY_BONE.items()})
    notes: dict[str, str] = field(default_factory=lambda: {
        "source": "Carney JPJ, Townsend DW, Rappoport V, Bendriem B. Method for transforming CT images for "
                  "attenuation correction in PET/CT imaging. Med Phys 2006;33(4):976-983 (Table 1: bone "
                  "segment a, b and breakpoint per kVp; water/air segment 9.6e-5 cm^-1 per HU + 1000)"})


@dataclass
class Plans:
    """Everything trainers and the predictor need, as planned for one dataset.

    Array conventions: ``spacing`` in ITK (x, y, z) order,
    ``median_shape``/``patch_size`` in numpy (z, y, x) order.
    """

    dataset_name: str
    plans_name: str
    channel_names: dict[str, str]
    registration: RegistrationPlan
    preprocessing: PreprocessingPlan
    configurations: dict[str, ConfigurationPlan]
    mu_map: MuMapPlan = field(default_factory=MuMapPlan)  # absent in older plans: the defaults
    planner: dict[str, Any] = field(default_factory=dict)
    fingerprint_hash: str = ""
    version: int = PLANS_VERSION
    notes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "plans") -> "Plans":
        plans = _build(cls, legacy_target_spacing(data, source), source)
        if plans.version != PLANS_VERSION:
            raise PlanError(f"{source}: version {plans.version} is not supported (expected {PLANS_VERSION})")
        if not plans.configurations:
            raise PlanError(f"{source}: 'configurations' is empty")
        return plans

    @classmethod
    def load(cls, path: str | Path) -> "Plans":
        return cls.from_dict(read_json(path), str(path))

    def save(self, path: str | Path) -> None:
        write_json(self.to_dict(), path)

    def configuration(self, name: str) -> ConfigurationPlan:
        if name not in self.configurations:
            raise PlanError(f"configuration {name!r} not in plans (have: {', '.join(self.configurations)})")
        return self.configurations[name]


# choice fields per section: field -> allowed values (for a list of strings: allowed items)
CHOICES: dict[type, dict[str, tuple[str, ...]]] = {
    RegistrationPlan: {"stages": REGISTRATION_STAGES, "metric": REGISTRATION_METRICS,
                       "initial_orientations": INITIAL_ORIENTATIONS, "pyramid": REGISTRATION_PYRAMIDS},
    VAEPlan: {"normalization": VAE_NORMALIZATIONS, "reconstruction_loss": RECONSTRUCTION_LOSSES},
    DiffusionPlan: {"first_stage": FIRST_STAGES, "beta_schedule": BETA_SCHEDULES, "prediction": PREDICTIONS,
                   "latent_loss": RECONSTRUCTION_LOSSES, "sct_estimate": SCT_ESTIMATES,
                   "prior_folds": PRIOR_FOLDS},
    InferencePlan: {"precision": PRECISIONS, "export_interpolation": EXPORT_INTERPOLATIONS},
    ConfigurationPlan: {"case_sampling": CASE_SAMPLINGS},
}


def _check_registration(plan: RegistrationPlan, where: str) -> None:
    lengths = (len(plan.stages), len(plan.iterations), len(plan.resolutions))
    if (plan.enabled and not plan.stages) or len(set(lengths)) != 1:
        raise PlanError(f"{where}: stages, iterations and resolutions need equal lengths (at least one stage "
                        f"when enabled), got {lengths[0]}, {lengths[1]}, {lengths[2]}")


def _check_augmentation(plan: AugmentationPlan, where: str) -> None:
    for name, value in dataclasses.asdict(plan).items():
        if name.startswith("p_") and not 0.0 <= value <= 1.0:
            raise PlanError(f"{where}.{name}: probability {value!r} outside [0, 1]")
    if len(set(plan.mirror_axes)) != len(plan.mirror_axes) or not set(plan.mirror_axes) <= {0, 1, 2}:
        raise PlanError(f"{where}.mirror_axes: {plan.mirror_axes} must be distinct axes among 0, 1, 2 (z, y, x)")
    if not (math.isfinite(plan.rotation_degrees) and 0.0 <= plan.rotation_degrees <= 180.0):
        raise PlanError(f"{where}.rotation_degrees: {plan.rotation_degrees!r} outside [0, 180]")
    for name in ("scale", "brightness", "contrast", "gamma"):
        low_high = getattr(plan, name)
        if len(low_high) != 2 or not all(math.isfinite(v) and v > 0 for v in low_high) or low_high[0] > low_high[1]:
            raise PlanError(f"{where}.{name}: {low_high} must be [low, high] with 0 < low <= high")


def _check_training(plan: TrainingPlan, where: str) -> None:
    if plan.validation_max_voxels < 0:
        raise PlanError(f"{where}.validation_max_voxels: {plan.validation_max_voxels!r} must be >= 0 (0: whole volumes)")


def _check_inference(plan: InferencePlan, where: str) -> None:
    for name in ("ddim_steps", "samples", "image_tile_scale", "latent_tile_scale"):
        if getattr(plan, name) < 1:
            raise PlanError(f"{where}.{name}: {getattr(plan, name)!r} must be at least 1")
    if plan.first_stage_margin < 0:
        raise PlanError(f"{where}.first_stage_margin: {plan.first_stage_margin!r} must be >= 0 (image voxels)")
    if plan.latent_margin < 0:
        raise PlanError(f"{where}.latent_margin: {plan.latent_margin!r} must be >= 0 (latent voxels; 0: "
                        "tiles at latent_overlap)")
    for name in ("tile_overlap", "latent_overlap"):
        if not 0.0 <= getattr(plan, name) < 1.0:
            raise PlanError(f"{where}.{name}: {getattr(plan, name)!r} outside [0, 1)")
    if not (math.isfinite(plan.ddim_eta) and plan.ddim_eta >= 0.0):
        raise PlanError(f"{where}.ddim_eta: {plan.ddim_eta!r} must be >= 0")
    if not (isinstance(plan.edge_std_mm, (int, float)) and math.isfinite(plan.edge_std_mm) and plan.edge_std_mm >= 0):
        raise PlanError(f"{where}.edge_std_mm: {plan.edge_std_mm!r} must be a length >= 0 (mm; 0: no edge term)")
    for name in ("second_opinion_factor", "second_opinion_smoothing_mm"):
        value = getattr(plan, name)
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise PlanError(f"{where}.{name}: {value!r} must be a finite number >= 0")
    if len(set(plan.mirror_axes)) != len(plan.mirror_axes) or not set(plan.mirror_axes) <= {0, 1, 2}:
        raise PlanError(f"{where}.mirror_axes: {plan.mirror_axes} must be distinct axes among 0, 1, 2 (z, y, x); "
                        "[]: no test-time mirroring")


def _check_mu_map(plan: MuMapPlan, where: str) -> None:
    if str(plan.kvp) not in plan.bone:
        raise PlanError(f"{where}.kvp: {plan.kvp} has no bone segment (bone holds kVp {', '.join(plan.bone)})")
    for kvp, segment in plan.bone.items():
        if len(segment) != 3 or not all(math.isfinite(v) for v in segment) or segment[0] <= 0:
            raise PlanError(f"{where}.bone.{kvp}: {segment} must be [a > 0, b, breakpoint HU]")
    if not (math.isfinite(plan.water_slope) and plan.water_slope > 0):
        raise PlanError(f"{where}.water_slope: {plan.water_slope!r} must be > 0")


# checks of whole sections beyond types and choices
def _check_diffusion(plan: DiffusionPlan, where: str) -> None:
    if plan.prior_folds != "own" and not where.endswith(".residual_diffusion"):
        raise PlanError(f"{where}.prior_folds: {plan.prior_folds!r} needs a regression prior; only the "
                        "residual_diffusion section has one (use 'own' here)")
    if not (math.isfinite(plan.prior_blur_mm) and plan.prior_blur_mm >= 0):
        raise PlanError(f"{where}.prior_blur_mm: {plan.prior_blur_mm!r} must be >= 0 mm")
    if plan.prior_blur_mm > 0 and not where.endswith(".residual_diffusion"):
        raise PlanError(f"{where}.prior_blur_mm: only the residual_diffusion section has a prior to blur")
    if not (math.isfinite(plan.timestep_power) and plan.timestep_power > 0):
        raise PlanError(f"{where}.timestep_power: {plan.timestep_power!r} must be > 0 (1: uniform timesteps)")
    _check_bone_weight(plan.bone_weight, where)
    if plan.bone_weight > 0 and plan.image_loss_weight <= 0:
        raise PlanError(f"{where}.bone_weight: {plan.bone_weight!r} weights bone in the image loss, which is off "
                        "(image_loss_weight 0): set image_loss_weight > 0 or bone_weight 0")
    if plan.center_latents and plan.first_stage == "haar":
        raise PlanError(f"{where}.center_latents: the Haar first stage is used as it is (no latents measured); "
                        "centring needs first_stage 'vae'")


def _check_bone_weight(value: float, where: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise PlanError(f"{where}.bone_weight: {value!r} must be >= 0 (0: bone counts like any voxel)")


def _check_regression(plan: RegressionPlan, where: str) -> None:
    _check_bone_weight(plan.bone_weight, where)


def _check_vae(plan: VAEPlan, where: str) -> None:
    if plan.shortcut < 0:
        raise PlanError(f"{where}.shortcut: {plan.shortcut!r} must be >= 0 (0: off; the shortcut's width in values "
                        "per latent voxel)")


VALIDATORS: dict[type, Callable[[Any, str], None]] = {
    DiffusionPlan: _check_diffusion,
    VAEPlan: _check_vae,
    RegressionPlan: _check_regression,
    RegistrationPlan: _check_registration,
    InferencePlan: _check_inference,
    TrainingPlan: _check_training,
    AugmentationPlan: _check_augmentation,
    MuMapPlan: _check_mu_map,
}


def parse_section(cls: type, data: Any, where: str) -> Any:
    """``data`` (a JSON object) as the plan section ``cls``, checked as :meth:`Plans.load` checks it."""
    return _build(cls, data, where)


def legacy_target_spacing(data: Any, source: str) -> Any:
    """``data`` without the ``preprocessing.target_spacing`` of older plans (nothing read it).

    Accepted when it equals the spacing of every configuration (as the planner wrote it); a value
    that differs was edited to change the spacing, so it is refused with where to set it instead.
    """
    pre = data.get("preprocessing") if isinstance(data, dict) else None
    if not isinstance(pre, dict) or "target_spacing" not in pre:
        return data
    where = f"{source}.preprocessing.target_spacing"
    target = _check_type(pre["target_spacing"], list[float], where)
    configurations = data.get("configurations")
    for name, config in (configurations.items() if isinstance(configurations, dict) else ()):
        spacing = config.get("spacing") if isinstance(config, dict) else None
        same = isinstance(spacing, list) and len(spacing) == len(target) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isclose(v, t, rel_tol=1e-9)
            for v, t in zip(spacing, target))
        if not same:
            raise PlanError(f"{where}: {target} is no longer read and differs from configurations.{name}.spacing "
                            f"{spacing}; set the spacing there (it is what preprocessing and prediction use) "
                            "and remove this key")
    log.debug("%s: dropped (equal to every configuration's spacing)", where)
    return {**data, "preprocessing": {k: v for k, v in pre.items() if k != "target_spacing"}}


def _check_choice(value: Any, allowed: tuple[str, ...], where: str) -> None:
    """PlanError unless ``value`` (a string or a list of strings) holds only ``allowed`` values."""
    for i, item in enumerate(value) if isinstance(value, list) else ((None, value),):
        if item not in allowed:
            at = where if i is None else f"{where}[{i}]"
            raise PlanError(f"{at}: {item!r} is not allowed (allowed: {', '.join(allowed)})")


def _check_type(value: Any, annotation: Any, where: str, default: Any = None) -> Any:
    """Validate (and lightly coerce int->float) ``value`` against ``annotation``; a section (dataclass) takes
    the keys it lacks from ``default``, the section's own defaults."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where, default)
    if annotation is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise PlanError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(annotation)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PlanError(f"{where}: expected an object, got {type(value).__name__}")
        _, item = typing.get_args(annotation)
        return {str(k): _check_type(v, item, f"{where}.{k}") for k, v in value.items()}
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PlanError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PlanError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation in (bool, str):
        if not isinstance(value, annotation):
            raise PlanError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return value
    return value


def _field_default(f: dataclasses.Field) -> Any:
    """A field's default value (its factory called), or None when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _build(cls: type, data: Any, where: str, default: Any = None) -> Any:
    """``cls`` from ``data``, checked. Keys ``data`` lacks come from ``default`` (an instance: the defaults of
    the section this is, e.g. ``residual_diffusion_plan()`` for ``residual_diffusion``, whose values differ
    from a bare ``DiffusionPlan()``'s), else from ``cls``'s own defaults."""
    if not isinstance(data, dict):
        raise PlanError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PlanError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    kwargs = {}
    choices = CHOICES.get(cls, {})
    for name, f in fields.items():
        if name in data:
            section_default = None  # only a nested section needs one: it fills the keys that section lacks
            if dataclasses.is_dataclass(hints[name]):
                section_default = getattr(default, name) if default is not None else _field_default(f)
            kwargs[name] = _check_type(data[name], hints[name], f"{where}.{name}", section_default)
            if name in choices:
                _check_choice(kwargs[name], choices[name], f"{where}.{name}")
        elif default is not None:
            kwargs[name] = copy.deepcopy(getattr(default, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise PlanError(f"{where}: missing key {name!r}")
    section = cls(**kwargs)
    if cls in VALIDATORS:
        VALIDATORS[cls](section, where)
    return section
