"""MR-like volumes simulated from real CTs, for the fidelity benchmark (a proxy, never a claim about patients).

What it is for: with one real MR/CT pair (the MRI-DIR phantom) nothing says whether a model
generalises to new bodies. This simulator turns every real CT we have into several paired cases
with different shapes and MR appearances, so whole cases can be held out. A model that learns
this mapping has learnt something about context (which dark voxels are air and which are bone);
it says nothing about how well it would do on patients.

Assumptions, each a simplification chosen on purpose:

1. Tissue from HU alone. The CT decides the tissue at each voxel; there is no tissue the CT does
   not show (no oedema, no MR-only contrast).
2. One T1-weighted-like signal per tissue class, given as anchors of a piecewise-linear curve over
   HU (:data:`T1_ANCHORS`): air and lung dark, fat bright, fluid dark-grey, muscle and organs
   grey, trabecular bone (fatty marrow) bright, cortical bone dark. The curve is NOT monotonic:
   air (-1000 HU) and cortical bone (+1200 HU) are both dark, fat (-100 HU) and marrow
   (+300 HU) both bright, so MR intensity alone cannot tell them apart; context has to.
   Linear interpolation between anchors stands in for partial volume.
3. Per case (one seed): the anchors are jittered (relative +-``anchor_jitter``); the CT is first
   deformed by a small random affine map (rotation, anisotropic scaling) and a smooth random
   B-spline displacement, and its long axis cropped at random. The deformed CT IS the case's CT:
   MR and CT of a case are aligned exactly (no registration error, no motion).
4. MR formation: signal from the curve, multiplicative smooth in-tissue texture, a Gaussian point
   spread (``blur_voxels``), a smooth multiplicative bias field (low-order, +-``bias``), Rician
   noise (``noise`` times the fat signal), a random global gain; stored as int16 on the same
   grid as the CT. No chemical shift, susceptibility, flow, fold-over or field-of-view limits.
5. Everything is drawn from ``numpy.random.default_rng(seed)``: the same source and seed give the
   same volumes, voxel for voxel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

AIR_HU = -1024.0
PROXY_NOTE = ("simulated MR from real CTs (bench/mr_simulator.py): a proxy for learnability, "
              "not a claim about patients")

# (HU, relative T1-like signal): non-monotonic on purpose (see assumption 2)
T1_ANCHORS: tuple[tuple[float, float], ...] = (
    (-1024.0, 0.00),  # air
    (-900.0, 0.02),  # lung parenchyma
    (-400.0, 0.06),
    (-150.0, 0.80),  # fat
    (-90.0, 1.00),
    (-30.0, 0.55),  # fat/water partial volume
    (5.0, 0.22),  # fluid (dark on T1)
    (40.0, 0.40),  # muscle
    (80.0, 0.50),  # organs
    (180.0, 0.62),  # trabecular bone: fatty marrow, bright
    (350.0, 0.66),
    (650.0, 0.25),
    (1000.0, 0.05),  # cortical bone: no signal
    (3071.0, 0.03),
)


@dataclass(frozen=True)
class SimulationSettings:
    """Knobs of the simulator (defaults are the benchmark's)."""

    spacing: tuple[float, float, float] = (2.0, 2.0, 3.0)  # output grid (x, y, z) mm, MR and CT alike
    rotation_deg: float = 6.0  # max rotation about each axis
    scale: float = 0.08  # max relative scaling per axis
    displacement_mm: float = 5.0  # std of the B-spline coefficients (mm)
    control_spacing_mm: float = 60.0  # B-spline control-point spacing
    keep_fraction: tuple[float, float] = (0.8, 1.0)  # share of the long (z) axis kept by the random crop
    anchor_jitter: float = 0.12  # relative jitter of each tissue signal
    texture: float = 0.05  # std of the smooth multiplicative in-tissue texture
    blur_voxels: float = 0.6  # Gaussian point spread of the MR (voxels of the output grid)
    bias: float = 0.25  # amplitude of the multiplicative bias field (log scale)
    noise: float = 0.025  # Rician noise std relative to the fat signal
    gain: tuple[float, float] = (800.0, 1600.0)  # fat signal in the stored int16 MR


def mr_signal(hu: np.ndarray, anchors: Sequence[tuple[float, float]] = T1_ANCHORS) -> np.ndarray:
    """Relative MR signal (float32) of each voxel from its HU, piecewise linear between ``anchors``."""
    xs = np.array([a[0] for a in anchors], np.float64)
    ys = np.array([a[1] for a in anchors], np.float64)
    return np.interp(hu.astype(np.float64), xs, ys).astype(np.float32)


def _output_grid(ct: sitk.Image, spacing: Sequence[float], keep: float, offset: float) -> sitk.Image:
    """An empty image on ``ct``'s orientation at ``spacing``, z cropped to ``keep`` of the extent at ``offset``."""
    size = [max(2, int(round(n * s / t))) for n, s, t in zip(ct.GetSize(), ct.GetSpacing(), spacing)]
    kept = max(2, int(round(size[2] * keep)))
    start = int(round((size[2] - kept) * offset))
    direction = np.array(ct.GetDirection()).reshape(3, 3)
    origin = np.array(ct.TransformIndexToPhysicalPoint((0, 0, 0)), float)
    # first output voxel centre: same corner as the input, shifted by ``start`` slices
    half = 0.5 * (np.array(spacing) - np.array(ct.GetSpacing()))
    origin = origin + direction @ (half + np.array([0.0, 0.0, start * spacing[2]]))
    grid = sitk.Image([size[0], size[1], kept], sitk.sitkFloat32)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetDirection(ct.GetDirection())
    grid.SetOrigin([float(v) for v in origin])
    return grid


def grid_centre(image: sitk.Image) -> list[float]:
    """Physical point of the centre of ``image``'s grid."""
    size = np.array(image.GetSize(), float)
    return [float(v) for v in image.TransformContinuousIndexToPhysicalPoint(list((size - 1) / 2))]


def random_bspline(grid: sitk.Image, rng: np.random.Generator, control_spacing_mm: float, displacement_mm: float,
                   max_mm: float | None = None) -> sitk.BSplineTransform:
    """Cubic B-spline over ``grid`` with control points about ``control_spacing_mm`` apart and normal
    coefficients of std ``displacement_mm`` (clipped to +-``max_mm`` when given)."""
    extent = np.array(grid.GetSize()) * np.array(grid.GetSpacing())
    mesh = [max(1, int(round(e / control_spacing_mm))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(grid, mesh, 3)
    coefficients = rng.normal(0.0, displacement_mm, len(bspline.GetParameters()))
    if max_mm is not None:
        coefficients = np.clip(coefficients, -max_mm, max_mm)
    bspline.SetParameters(coefficients.tolist())
    return bspline


def random_transform(grid: sitk.Image, rng: np.random.Generator, settings: SimulationSettings) -> sitk.Transform:
    """Smooth random spatial map: affine (rotation, anisotropic scale) about the centre, then B-spline."""
    angles = np.deg2rad(rng.uniform(-settings.rotation_deg, settings.rotation_deg, 3))
    affine = sitk.Euler3DTransform()
    affine.SetCenter(grid_centre(grid))
    affine.SetRotation(*[float(a) for a in angles])
    scaled = sitk.AffineTransform(3)
    scaled.SetCenter(grid_centre(grid))
    scaled.SetMatrix(np.diag(1.0 + rng.uniform(-settings.scale, settings.scale, 3)).ravel().tolist())
    bspline = random_bspline(grid, rng, settings.control_spacing_mm, settings.displacement_mm)
    return sitk.CompositeTransform([affine, scaled, bspline])


def _smooth_field(shape: Sequence[int], rng: np.random.Generator, coarse: int) -> np.ndarray:
    """A smooth random field in [-1, 1]: normal noise on a coarse grid, cubic-upsampled to ``shape``."""
    small = rng.normal(0.0, 1.0, [coarse] * 3)
    zoom = [s / coarse for s in shape]
    field = ndimage.zoom(small, zoom, order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]
    field = np.pad(field, [(0, s - f) for s, f in zip(shape, field.shape)], mode="edge")
    peak = np.abs(field).max()
    return (field / peak if peak > 0 else field).astype(np.float32)


def simulate_pair(ct: sitk.Image, seed: int, settings: SimulationSettings = SimulationSettings()
                  ) -> tuple[sitk.Image, sitk.Image]:
    """(MR, CT) of one simulated case made from a real ``ct`` (HU): int16 images on one shared grid.

    The CT is deformed (assumption 3) and becomes the case's reference; the MR is simulated from
    it (assumptions 2 and 4). Deterministic in (``ct``, ``seed``, ``settings``).
    """
    rng = np.random.default_rng(seed)
    keep = rng.uniform(*settings.keep_fraction)
    grid = _output_grid(ct, settings.spacing, keep, rng.uniform())
    transform = random_transform(grid, rng, settings)
    source = sitk.Cast(sitk.Clamp(sitk.Cast(ct, sitk.sitkFloat32), sitk.sitkFloat32, AIR_HU, 3071.0), sitk.sitkFloat32)
    warped = sitk.Resample(source, grid, transform, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    hu = sitk.GetArrayFromImage(warped)

    jitter = 1.0 + rng.uniform(-settings.anchor_jitter, settings.anchor_jitter, len(T1_ANCHORS))
    anchors = [(h, s * j) for (h, s), j in zip(T1_ANCHORS, jitter)]
    signal = mr_signal(hu, anchors)
    texture = 1.0 + settings.texture * _smooth_field(hu.shape, rng, 12)
    signal *= texture
    spacing_zyx = np.array(settings.spacing[::-1])
    signal = ndimage.gaussian_filter(signal, settings.blur_voxels * spacing_zyx.min() / spacing_zyx)
    signal *= np.exp(settings.bias * _smooth_field(hu.shape, rng, 3))
    sigma = settings.noise
    real = signal + rng.normal(0.0, sigma, hu.shape).astype(np.float32)
    imaginary = rng.normal(0.0, sigma, hu.shape).astype(np.float32)
    magnitude = np.sqrt(real * real + imaginary * imaginary) * rng.uniform(*settings.gain)

    mr_image = sitk.GetImageFromArray(np.clip(np.rint(magnitude), 0, 32767).astype(np.int16))
    mr_image.CopyInformation(grid)
    ct_image = sitk.GetImageFromArray(np.clip(np.rint(hu), -1024, 3071).astype(np.int16))
    ct_image.CopyInformation(grid)
    return mr_image, ct_image
