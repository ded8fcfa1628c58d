"""Typed view of ``plans.json`` (DESIGN.md section 4).

The JSON is the source of truth and stays hand-editable; these dataclasses
are the one place that knows its schema. Loading rejects unknown keys (naming
the key and where it was found) and values of the wrong type, so a typo in an
edited plan fails loudly instead of being ignored.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wldm_auto.io.files import read_json, write_json

PLANS_VERSION = 1


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
    resolutions: list[int] = field(default_factory=lambda: [3, 3])
    histogram_bins: int = 32
    spatial_samples: int = 4096
    initial_orientations: list[str] = field(default_factory=lambda: ["identity", "rot180_x", "rot180_y", "rot180_z"])
    orientation_margin: float = 0.02
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
    target_spacing: list[float] = field(default_factory=lambda: [2.0, 2.0, 2.0])
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
    """

    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    blocks_per_level: int = 1
    group_width: int = 8
    latent_channels: int = 8
    downsampling_factor: int = 4
    wrm: bool = True
    normalization: str = "voxel"
    reconstruction_loss: str = "l1"
    ct_weight: float = 1.0
    kl_weight: float = 1e-6
    smd_weight: float = 0.01
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
    > 0 weights the loss over timesteps by min-SNR-gamma (0: unweighted).
    """

    first_stage: str = "vae"
    timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "x0"
    min_snr_gamma: float = 0.0
    unet_channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    dsca: bool = True
    ema_decay: float = 0.999
    validation_ddim_steps: int = 10
    training: TrainingPlan = field(default_factory=TrainingPlan)


# WDM (Friedrich et al. 2024): base 64, multipliers (1, 2, 2, 4, 4), x0-prediction, no attention
WDM_UNET_CHANNELS = [64, 128, 128, 256, 256]


def wavelet_diffusion_plan() -> DiffusionPlan:
    """Defaults of the wavelet-domain (WDM-style) configuration: Haar first stage, x0 target, no DSCA."""
    return DiffusionPlan(first_stage="haar", prediction="x0", dsca=False, unet_channels=list(WDM_UNET_CHANNELS))


@dataclass
class RegressionPlan:
    """Baseline: a 3D U-Net mapping normalised MR to normalised CT (masked L1)."""

    unet_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    blocks_per_level: int = 2
    group_width: int = 8
    training: TrainingPlan = field(default_factory=TrainingPlan)


@dataclass
class InferencePlan:
    """Prediction settings. ``tile_overlap`` applies to VAE encoding/decoding tiles, which are
    ``image_tile_scale`` training patches wide per axis when the VAE is local (voxel
    normalisation; a GroupNorm VAE's output depends on the tile, so it keeps the patch);
    latent sampling uses tiles ``latent_tile_scale`` times the patch's latent size
    with ``latent_overlap`` (every DDIM step re-blends the whole latent, so a small
    overlap leaves no seams)."""

    ddim_steps: int = 50
    ddim_eta: float = 0.0
    tile_overlap: float = 0.5
    image_tile_scale: int = 4
    latent_tile_scale: int = 2
    latent_overlap: float = 0.25
    samples: int = 1


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
    regression: RegressionPlan = field(default_factory=RegressionPlan)
    inference: InferencePlan = field(default_factory=InferencePlan)
    # probability that a training sample sees only a random non-empty proper subset of its MR channels
    # (the others are zeroed and flagged missing), so one model serves any subset at prediction
    mr_channel_dropout: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)


FIRST_STAGES = ("vae", "haar")


@dataclass
class Plans:
    """Everything trainers and the predictor need, as planned for one dataset.

    Array conventions: ``spacing``/``target_spacing`` in ITK (x, y, z) order,
    ``median_shape``/``patch_size`` in numpy (z, y, x) order.
    """

    dataset_name: str
    plans_name: str
    channel_names: dict[str, str]
    registration: RegistrationPlan
    preprocessing: PreprocessingPlan
    configurations: dict[str, ConfigurationPlan]
    planner: dict[str, Any] = field(default_factory=dict)
    fingerprint_hash: str = ""
    version: int = PLANS_VERSION
    notes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "plans") -> "Plans":
        plans = _build(cls, data, source)
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


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Validate (and lightly coerce int->float) ``value`` against ``annotation``."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
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


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise PlanError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PlanError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check_type(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise PlanError(f"{where}: missing key {name!r}")
    return cls(**kwargs)
