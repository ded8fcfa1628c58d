"""Python API: synthetic CT for an MR held in memory, no files written.

    import SimpleITK as sitk
    from wldm_auto import Predictor

    predictor = Predictor.from_model_folder("results/Dataset001_X/DiffusionTrainer__wldmPlans__3d_wldm",
                                            folds=(0,), device="auto")
    result = predictor.predict(sitk.ReadImage("mr.nii.gz"), steps=50, samples=5)
    result.sct   # SimpleITK int16 HU image, exactly the MR's size, spacing, origin and direction
    result.std   # float32 HU standard deviation over samples/folds, or None with one draw
    result = predictor.predict(mr, steps=50, samples=5, confidence_hu=100)
    result.confidence  # uint8: 1 inside the body where 2 * std < 100 HU

When the model folder holds ``std_scale.json`` (``wldm_calibrate_std``) every
std is multiplied by its scale (``result.std_scale`` says by what;
``from_model_folder(..., std_scale=False)`` ignores the file).

Each call runs :func:`wldm_auto.inference.predictor.synthesize`, the same
per-case code ``wldm_predict`` runs, so with the same model, seed, steps and
samples both give the same voxels.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from wldm_auto.inference.folds import CHECKPOINT, LoadedFold, check_std_scale_settings, load_model, resolve_device
from wldm_auto.inference.predictor import channel_flags, plan_samples, second_opinion_used, synthesize
from wldm_auto.inference.second_opinion import check_factor
from wldm_auto.io.images import check_image, read_image

log = logging.getLogger(__name__)

ImageLike = Union[sitk.Image, str, os.PathLike, np.ndarray]
MRInput = Union[ImageLike, Sequence[ImageLike], Mapping[Union[int, str], ImageLike]]


@dataclass(frozen=True)
class Prediction:
    """The sCT of one MR, in the MR's exact geometry."""

    sct: sitk.Image  # int16 HU, -1024 outside the body
    std: sitk.Image | None  # float32 HU over samples x mirrorings x folds (times std_scale); None with one draw
    confidence: sitk.Image | None = None  # uint8, 1 inside the body where 2 * std < confidence_hu (when asked)
    std_scale: float = 1.0  # factor applied to std (the model folder's std_scale.json; 1.0 without one)
    draws: int = 1  # predictions made: samples x mirrorings per diffusion fold, mirrorings per regression fold


class Predictor:
    """A trained model (one or more folds) that predicts sCT from MR images in memory."""

    def __init__(self, folds: list[LoadedFold], device: torch.device, progress: bool = True) -> None:
        if not folds:
            raise ValueError("a Predictor needs at least one loaded fold")
        self.folds = folds
        self.device = device
        self.progress = progress
        self._checked_samples: set[tuple[int, float]] = set()  # (samples, second-opinion factor) checked against
        # the std scale's settings

    @classmethod
    def from_model_folder(cls, path: str | os.PathLike, folds: Sequence[int] | None = (0,), device: str = "cuda",
                          checkpoint: str = CHECKPOINT, overlap: float | None = None,
                          progress: bool = True, precision: str | None = None,
                          std_scale: bool = True, mirror_axes: Sequence[int] | None = None,
                          edge_std_mm: float | None = None) -> "Predictor":
        """Load ``<Trainer>__<plans>__<config>/fold_F/checkpoint`` for each fold in ``folds``; ``path`` may
        also be a model zip (``wldm_export_model``: hashes checked, unpacked to a temporary folder).

        ``folds=None``: every fold with a finished checkpoint. ``device``: "cuda",
        "cpu" or "auto" (CUDA if available); "cuda" without CUDA is a ValueError.
        ``progress``: show a progress bar while sampling. ``precision``: the networks' autocast dtype,
        "float32", "bfloat16" or "float16" (None: the plan's ``inference.precision``, float32 unless edited);
        tile blending and DDIM steps stay float32 (``wldm_predict --precision``; bfloat16 on a GPU
        without it runs float16). ``std_scale``: multiply std maps by the scale in the model folder's
        ``std_scale.json`` when it has one (False: ignore it, ``wldm_predict --no-std-scale``).
        ``mirror_axes``: test-time mirroring along these axes (0 z, 1 y, 2 x; [] off; None: the plan's
        ``inference.mirror_axes``): every sample is also drawn on the flipped MRs, 2 ** len(axes) draws.
        ``edge_std_mm``: the std maps' edge term, edge_std_mm x the sCT's smoothed gradient added in variance
        (0: off; None: the plan's ``inference.edge_std_mm``, 4 in new plans; ``wldm_predict --edge-std-mm``).
        """
        resolved = resolve_device(device)
        return cls(load_model(Path(path), list(folds) if folds is not None else None, resolved, overlap, checkpoint,
                              precision=precision, std_scale=std_scale, mirror_axes=mirror_axes,
                              edge_std_mm=edge_std_mm), resolved, progress)

    @property
    def std_scale(self) -> float:
        """The factor std maps are multiplied by (the model's ``std_scale.json``; 1.0 without one or ignored)."""
        return self.folds[0].std_scale

    @property
    def mr_channels(self) -> int:
        """Number of MR sequences the model was trained on."""
        return self.folds[0].mr_channels

    @property
    def channel_names(self) -> dict[int, str]:
        """Channel index -> sequence name from the plan (e.g. {0: "T2"})."""
        names = self.folds[0].plans.channel_names
        return {c: names.get(str(c), f"{c:04d}") for c in range(self.mr_channels)}

    def predict(self, image: MRInput, steps: int | None = None, samples: int | None = None, seed: int = 0,
                eta: float | None = None, *, spacing: Sequence[float] | None = None,
                origin: Sequence[float] | None = None, direction: Sequence[float] | None = None,
                confidence_hu: float | None = None, second_opinion: ImageLike | None = None,
                second_opinion_factor: float | None = None) -> Prediction:
        """sCT (and std with more than one draw) for one MR; nothing is written to disk.

        ``image``: a ``SimpleITK.Image``, a path (image file or DICOM series
        folder), or a NumPy array in (z, y, x) order (as ``sitk.GetArrayFromImage``
        gives) with ``spacing`` (mm) and optionally ``origin`` (default 0) and
        ``direction`` (9 numbers, default identity), all in SimpleITK's (x, y, z)
        order. A model of several sequences takes a list/tuple (channel 0, 1, ...)
        or a dict {channel index or name: image} of any non-empty subset.
        ``steps``/``samples``/``eta`` None: the plan's (``inference.ddim_steps``,
        ``inference.samples``, ``inference.ddim_eta``). Draws: ``samples`` per diffusion fold,
        one per regression fold, each times 2 ** len(mirror axes) with test-time mirroring; seeds
        ``seed + 1000 * fold position``.
        ``confidence_hu`` (HU > 0): also the confidence mask, 1 inside the body where
        2 * std < ``confidence_hu`` (needs several draws or an error head: a ValueError otherwise).
        ``second_opinion``: another model's sCT of this MR (image, path or array, on the MR's grid): their
        smoothed disagreement, times ``second_opinion_factor`` (None: the plan's), adds to the std map
        (``wldm_predict --second-opinion``; needs a std map).
        One-line ValueError for input that cannot be used.
        """
        images, labels = self._channels(image, spacing, origin, direction)
        first = self.folds[0]
        present, available = channel_flags("image", labels, first, first.plans.configuration(first.configuration))
        planned = plan_samples(self.folds, samples)
        second_opinion_factor = check_factor(second_opinion_factor)
        used = second_opinion_used(self.folds, second_opinion_factor, second_opinion is not None)
        if planned >= 1 and (planned, used) not in self._checked_samples:  # warn once per setting, not per image
            self._checked_samples.add((planned, used))
            check_std_scale_settings(self.folds, planned, used)
        if second_opinion is not None:
            second_opinion = as_image(second_opinion, "second opinion", spacing, origin, direction)
        result = synthesize(self.folds, {c: images[c] for c in present}, available, steps, samples, seed, eta,
                            want_std=True, names=[labels[c] for c in present], progress=self.progress,
                            confidence_hu=confidence_hu, second_opinion=second_opinion,
                            second_opinion_factor=second_opinion_factor)
        return Prediction(result.sct, result.std, result.confidence, result.std_scale, result.draws)

    def _channels(self, image: MRInput, spacing: Sequence[float] | None, origin: Sequence[float] | None,
                  direction: Sequence[float] | None) -> tuple[dict[int, sitk.Image], dict[int, str]]:
        """(channel -> float32 image, channel -> label for messages) of what the user gave."""
        if isinstance(image, Mapping):
            given = {self._channel_index(key): value for key, value in image.items()}
        elif isinstance(image, (list, tuple)):
            given = dict(enumerate(image))
        else:
            given = {0: image}
        if not given:
            raise ValueError("no MR image given (an empty list or dict)")
        single = len(given) == 1
        labels = {c: ("image" if single else f"channel {c}") for c in given}
        images = {c: as_image(value, labels[c], spacing, origin, direction) for c, value in given.items()}
        for c, value in given.items():
            if isinstance(value, (str, os.PathLike)):
                labels[c] = str(value)
        return images, labels

    def _channel_index(self, key: int | str) -> int:
        """A dict key -> channel index: an int, "0001", or a sequence name from the plan."""
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return int(key)
        if isinstance(key, str):
            if key.isdigit():
                return int(key)
            for index, name in self.channel_names.items():
                if name == key:
                    return index
        known = ", ".join(f"{c} ({n})" for c, n in self.channel_names.items())
        raise ValueError(f"channel {key!r}: not a channel of this model (it knows {known})")


def as_image(value: ImageLike, label: str = "image", spacing: Sequence[float] | None = None,
             origin: Sequence[float] | None = None, direction: Sequence[float] | None = None) -> sitk.Image:
    """A checked float32 3D ``SimpleITK.Image`` from an image, a path or a (z, y, x) array (see ``predict``).

    Images and paths are read exactly as ``wldm_predict`` reads files (cast to float32)."""
    if isinstance(value, np.ndarray):
        return _from_array(value, label, spacing, origin, direction)
    if spacing is not None or origin is not None or direction is not None:
        raise ValueError(f"{label}: spacing/origin/direction apply to NumPy arrays only; "
                         "an image or a file carries its own geometry")
    if isinstance(value, sitk.Image):
        check_image(value, label)
        return value if value.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(value, sitk.sitkFloat32)
    if isinstance(value, (str, os.PathLike)):
        return read_image(value, sitk.sitkFloat32)  # ImageReadError (a ValueError) names the path
    raise ValueError(f"{label}: expected a SimpleITK.Image, a path or a NumPy array, got {type(value).__name__}")


def _from_array(array: np.ndarray, label: str, spacing: Sequence[float] | None, origin: Sequence[float] | None,
                direction: Sequence[float] | None) -> sitk.Image:
    if array.ndim != 3:
        raise ValueError(f"{label}: expected a 3D array in (z, y, x) order, got {array.ndim}D of shape {array.shape}")
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{label}: expected a numeric (integer or float) array, got dtype {array.dtype}")
    if spacing is None:
        raise ValueError(f"{label}: a NumPy array needs spacing=(sx, sy, sz) in mm (x, y, z order, as SimpleITK)")
    spacing = _numbers(spacing, 3, "spacing", label)
    if not all(s > 0 for s in spacing):
        raise ValueError(f"{label}: spacing {spacing} must be positive")
    origin = _numbers(origin, 3, "origin", label) if origin is not None else (0.0, 0.0, 0.0)
    direction = _numbers(direction, 9, "direction", label) if direction is not None else \
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    matrix = np.reshape(direction, (3, 3))
    if abs(np.linalg.det(matrix)) < 1e-6:
        raise ValueError(f"{label}: direction {direction} is not an invertible 3x3 matrix (row-major)")
    if not np.allclose(matrix @ matrix.T, np.eye(3), atol=1e-4):
        raise ValueError(f"{label}: direction {direction} is not orthonormal (unit, perpendicular axes; a scale "
                         "belongs in spacing)")
    # float32 first (as the model reads it): float16 or big-endian arrays are no SimpleITK pixel types; a copy, so
    # the caller's array is not touched
    image = sitk.GetImageFromArray(np.array(array, dtype=np.float32, order="C"))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    check_image(image, label)
    return image


def _numbers(values: Sequence[float], count: int, what: str, label: str) -> tuple[float, ...]:
    """``values`` as ``count`` finite floats; one-line ValueError otherwise."""
    try:
        numbers = tuple(float(v) for v in np.asarray(values, dtype=float).ravel())
    except (TypeError, ValueError):
        raise ValueError(f"{label}: {what} must be {count} numbers, got {values!r}") from None
    if len(numbers) != count or not all(np.isfinite(numbers)):
        raise ValueError(f"{label}: {what} must be {count} finite numbers (x, y, z order), got {values!r}")
    return numbers
