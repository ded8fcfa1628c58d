"""Patch augmentation with batchgenerators 0.25: small transforms in a list, each with its own probability.

A batch is a dict of numpy arrays ``mr`` (B, C, z, y, x), ``ct`` (B, 1, ...) and
``masks`` (B, 2, ...) = [valid, body], images in [-1, 1].

Spatial (identical for every array): mirroring and a small affine (rotation,
scale), linear interpolation, constant border. CT and masks are never passed
as batchgenerators' ``seg`` (it resamples ``seg`` by an argmax over every
distinct value: minutes per patch for a continuous CT); instead MR, CT and
masks are stacked as channels of ``data``, transformed once, and split again.
The border value is -1 for every channel: images are air (-1) outside, and
masks enter as ``mask - 1`` (so 0/1 become -1/0 and the border -1 means
"outside"), come back as ``+ 1`` and are re-thresholded at 0.5. Images are
therefore transformed without any shift.

Intensity (MR channels only, never CT or masks): multiplicative brightness,
contrast, gamma (statistics retained). They act on ``mr + 1`` (air = 0, so a
brightness factor leaves air unchanged); MR is shifted back and clipped to
[-1, 1] afterwards.

The parameters are the plan's ``augmentation`` section
(:class:`~wldm_auto.planners.schema.AugmentationPlan`, whose defaults are :data:`DEFAULT_PARAMS`).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.spatial_transforms import (
    MirrorTransform,
    SpatialTransform_2,
)

from wldm_auto.planners.schema import AugmentationPlan, parse_section

log = logging.getLogger(__name__)

DEFAULT_PARAMS: dict[str, Any] = dataclasses.asdict(AugmentationPlan())  # the plan section's defaults
BORDER = -1.0  # border value of every stacked channel (see module docstring)


class ToChannels(AbstractTransform):
    """Stack ``mr``, ``ct`` and ``masks - 1`` as float32 channels of ``data``."""

    def __call__(self, **d: Any) -> dict[str, Any]:
        mr, ct, masks = d.pop("mr"), d.pop("ct"), d.pop("masks")
        d["_split"] = (mr.shape[1], ct.shape[1], masks.dtype)
        d["data"] = np.concatenate([mr.astype(np.float32), ct.astype(np.float32),
                                    masks.astype(np.float32) - 1.0], axis=1)
        return d


class FromChannels(AbstractTransform):
    """Undo :class:`ToChannels`: split ``data``, clip images to [-1, 1], re-threshold masks at 0.5."""

    def __call__(self, **d: Any) -> dict[str, Any]:
        c_mr, c_ct, mask_dtype = d.pop("_split")
        data = d.pop("data")
        d["mr"] = np.clip(data[:, :c_mr], -1.0, 1.0)
        d["ct"] = np.clip(data[:, c_mr:c_mr + c_ct], -1.0, 1.0)
        d["masks"] = (data[:, c_mr + c_ct:] + 1.0 >= 0.5).astype(mask_dtype)
        return d


class AffineTransform(AbstractTransform):
    """``SpatialTransform_2`` without elastic deformation, centre-cropped to ``patch_size`` (None: input size)."""

    def __init__(self, patch_size: Sequence[int] | None, **kwargs: Any) -> None:
        self.patch_size = None if patch_size is None else tuple(patch_size)
        self.kwargs = kwargs

    def __call__(self, **d: Any) -> dict[str, Any]:
        size = self.patch_size or d["data"].shape[2:]
        transform = SpatialTransform_2(
            size, do_elastic_deform=False, random_crop=False, order_data=1, border_mode_data="constant",
            border_cval_data=BORDER, **self.kwargs)
        return transform(**d)


class ShiftMR(AbstractTransform):
    """Add ``offset`` to ``mr``; clip to [-1, 1] afterwards when ``clip``."""

    def __init__(self, offset: float, clip: bool = False) -> None:
        self.offset, self.clip = offset, clip

    def __call__(self, **d: Any) -> dict[str, Any]:
        mr = d["mr"].astype(np.float32) + np.float32(self.offset)
        d["mr"] = np.clip(mr, -1.0, 1.0) if self.clip else mr
        return d


@dataclass
class Augmentation:
    """A composed list of transforms; ``input_patch_size`` is the patch to sample (None: any)."""

    transforms: list[AbstractTransform]
    input_patch_size: tuple[int, ...] | None
    params: dict[str, Any]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Augment ``{"mr", "ct", "masks"}``; the caller's arrays are left untouched."""
        out = Compose(self.transforms)(**dict(batch))
        return {k: out[k] for k in ("mr", "ct", "masks")}


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    ca, sa, cb, sb, cc, sc = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(c), math.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rx @ ry @ rz


def enlarged_patch_size(patch_size: Sequence[int], max_degrees: float, max_scale: float) -> tuple[int, ...]:
    """Extent of the input region a rotated (up to ``max_degrees`` per axis) and scaled patch reads.

    Approximate: the maximum over rotations of 0 or +-max_degrees about each axis;
    what falls outside is filled with the border value.
    """
    half = np.asarray(patch_size, dtype=float) / 2
    corners = np.array(list(itertools.product(*[(-h, h) for h in half])))
    angle = math.radians(max_degrees)
    extent = np.asarray(patch_size, dtype=float)
    for a, b, c in itertools.product((-angle, 0.0, angle), repeat=3):
        rotated = corners @ _rotation(a, b, c).T * max(max_scale, 1.0)
        extent = np.maximum(extent, rotated.max(0) - rotated.min(0))
    return tuple(math.ceil(e - 1e-6) for e in extent)


def augmentation_params(params: AugmentationPlan | dict[str, Any] | None) -> dict[str, Any]:
    """Checked parameters: a plan section as it is, or a dict of overrides of :data:`DEFAULT_PARAMS`.

    A dict is checked as the plan's ``augmentation`` section is (unknown keys, types, ranges): a
    ``PlanError`` (a ValueError) names the key; a section built in code is checked the same way."""
    if isinstance(params, AugmentationPlan):
        data = dataclasses.asdict(params)
    else:
        data = {**DEFAULT_PARAMS, **{k: list(v) if isinstance(v, tuple) else v for k, v in (params or {}).items()}}
    return dataclasses.asdict(parse_section(AugmentationPlan, data, "augmentation"))


def build_augmentation(params: AugmentationPlan | dict[str, Any] | None = None,
                       patch_size: Sequence[int] | None = None) -> Augmentation:
    """Transforms from the plan section ``params`` (or :data:`DEFAULT_PARAMS` overridden by a dict;
    a probability 0 drops a transform).

    With ``patch_size`` the output is that size and, when rotation or scaling is on
    and ``enlarge_input``, ``input_patch_size`` is the larger patch to sample.
    """
    p = augmentation_params(params)
    angle = math.radians(float(p["rotation_degrees"]))
    affine = p["p_rotation"] > 0 or p["p_scale"] > 0
    transforms: list[AbstractTransform] = []
    if p["p_mirror"] > 0 or affine:
        transforms.append(ToChannels())
        if affine:
            transforms.append(AffineTransform(
                patch_size, do_rotation=p["p_rotation"] > 0, angle_x=(-angle, angle), angle_y=(-angle, angle),
                angle_z=(-angle, angle), p_rot_per_sample=p["p_rotation"], do_scale=p["p_scale"] > 0,
                scale=tuple(p["scale"]), p_scale_per_sample=p["p_scale"]))
        if p["p_mirror"] > 0:  # after the affine: flips the (smaller) output patch, same distribution
            transforms.append(MirrorTransform(axes=tuple(p["mirror_axes"]), p_per_sample=p["p_mirror"]))
        transforms.append(FromChannels())
    intensity: list[AbstractTransform] = []
    if p["p_brightness"] > 0:
        intensity.append(BrightnessMultiplicativeTransform(
            tuple(p["brightness"]), per_channel=True, data_key="mr", p_per_sample=p["p_brightness"]))
    if p["p_contrast"] > 0:
        intensity.append(ContrastAugmentationTransform(
            tuple(p["contrast"]), preserve_range=True, per_channel=True, data_key="mr", p_per_sample=p["p_contrast"]))
    if p["p_gamma"] > 0:
        intensity.append(GammaTransform(
            tuple(p["gamma"]), invert_image=False, per_channel=True, data_key="mr", retain_stats=True,
            p_per_sample=p["p_gamma"]))
    if intensity:
        transforms += [ShiftMR(1.0), *intensity, ShiftMR(-1.0, clip=True)]
    input_size = None if patch_size is None else tuple(int(s) for s in patch_size)
    if input_size is not None and affine and p["enlarge_input"]:
        max_scale = max(p["scale"]) if p["p_scale"] > 0 else 1.0
        input_size = enlarged_patch_size(input_size, p["rotation_degrees"] if p["p_rotation"] > 0 else 0.0,
                                         max_scale)
    log.debug("augmentation: %s; input patch %s", [type(t).__name__ for t in transforms], input_size)
    return Augmentation(transforms, input_size, p)
