"""Training batches from preprocessed arrays: random patches, paired patients, deterministic per step.

``StepBatches[k]`` is the batch of global training step ``k``: a pure function of
``(seed, k, rank)``. A run resumed at step ``k`` therefore sees exactly the
batches it would have seen, and background workers produce identical batches
whatever their number.

Batches are made of pairs of different patients (the SMD loss compares two
patients): items ``2i`` and ``2i + 1`` form pair ``i``, i.e. ``batch["mr"][0::2]``
holds the first patient of every pair and ``batch["mr"][1::2]`` the second.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

from wldm_auto.io.files import read_json
from wldm_auto.planners.schema import AugmentationPlan
from wldm_auto.io.preprocessed_layout import ARRAYS
from wldm_auto.trainers.augmentation import Augmentation, build_augmentation

log = logging.getLogger(__name__)

PAD_IMAGE = -1.0  # MR and CT outside the image (air in the [-1, 1] normalisation)
PAD_MASK = 0  # valid and body outside the image
BODY_TRIES = 64  # random voxels tried before falling back to listing every body voxel


class PreprocessedDataset:
    """The preprocessed arrays of ``cases`` in ``folder``, memory-mapped on demand.

    A case without its ``CASE.json`` (written last by preprocessing, so absent when
    the case failed or was interrupted) is skipped with a warning; a case whose JSON
    exists but an array is missing is an error. Arrays are opened per call with
    ``np.load(mmap_mode="r")`` and never kept, so the object pickles cheaply into
    worker processes and holds no file descriptors.
    """

    def __init__(self, folder: Path, cases: Sequence[str]) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"preprocessed folder {self.folder} does not exist: run plan_and_preprocess first")
        skipped = [c for c in cases if not (self.folder / f"{c}.json").is_file()]
        if skipped:
            log.warning("%d case(s) listed but not preprocessed in %s, skipped: %s",
                        len(skipped), self.folder, ", ".join(skipped))
        self.cases = [c for c in cases if c not in skipped]
        if not self.cases:
            raise ValueError(f"none of the {len(cases)} listed case(s) is preprocessed in {self.folder}")
        missing = [f"{c}{s}" for c in self.cases for s in ARRAYS.values() if not (self.folder / f"{c}{s}").is_file()]
        if missing:
            raise ValueError(f"preprocessed arrays missing in {self.folder}: {', '.join(missing)} "
                             "(rerun plan_and_preprocess)")
        self._properties = {c: read_json(self.folder / f"{c}.json") for c in self.cases}
        self.num_mr_channels = self._check_shapes()

    def _check_shapes(self) -> int:
        channels = set()
        for case in self.cases:
            mr, ct, masks = self.arrays(case)
            if not (mr.shape[1:] == ct.shape[1:] == masks.shape[1:]) or ct.shape[0] != 1 or masks.shape[0] != 2:
                raise ValueError(f"case {case}: inconsistent array shapes mr {mr.shape}, ct {ct.shape}, "
                                 f"masks {masks.shape}")
            channels.add(mr.shape[0])
        if len(channels) != 1:
            raise ValueError(f"cases in {self.folder} differ in their number of MR channels: {sorted(channels)}")
        return channels.pop()

    def __len__(self) -> int:
        return len(self.cases)

    def properties(self, case: str) -> dict[str, Any]:
        """The case's ``CASE.json`` (geometry, normalisation, registration report)."""
        return self._properties[case]

    def voxel_count(self, case: str) -> int:
        """Voxels of the case's preprocessed (z, y, x) grid (read from the array header only)."""
        return int(np.prod(np.load(self.folder / f"{case}{ARRAYS['ct']}", mmap_mode="r").shape[1:]))

    def arrays(self, case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read-only memory maps ``(mr, ct, masks)`` of ``case``; only what is sliced is read."""
        return tuple(np.load(self.folder / f"{case}{s}", mmap_mode="r") for s in ARRAYS.values())  # type: ignore[return-value]


def validation_box(body: np.ndarray, max_voxels: int) -> tuple[slice, slice, slice]:
    """The whole (z, y, x) volume, or with ``max_voxels`` > 0 a box of at most that many voxels centred on
    the body's bounding box (its longest side shortened first): the same box every epoch, so validation
    figures stay comparable while their cost is bounded on whole-body volumes."""
    shape = list(body.shape)
    if max_voxels <= 0 or math.prod(shape) <= max_voxels:
        return tuple(slice(0, n) for n in shape)  # type: ignore[return-value]
    size = list(shape)
    while math.prod(size) > max_voxels:
        axis = size.index(max(size))
        size[axis] = max(1, int(size[axis] * 0.9))
    found = np.nonzero(np.asarray(body))
    centre = [int((a.min() + a.max()) // 2) if a.size else n // 2 for a, n in zip(found, shape)]
    starts = [min(max(0, c - s // 2), n - s) for c, s, n in zip(centre, size, shape)]
    return tuple(slice(a, a + s) for a, s in zip(starts, size))  # type: ignore[return-value]


def _random_body_voxel(body: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A uniformly random voxel of ``body`` (z, y, x), or None if it is empty.

    Rejection sampling first (a few single-voxel reads), then every body voxel listed.
    """
    shape = np.array(body.shape)
    for _ in range(BODY_TRIES):
        voxel = rng.integers(0, shape)
        if body[tuple(voxel)]:
            return voxel
    where = np.flatnonzero(np.asarray(body).reshape(-1))
    if where.size == 0:
        return None
    return np.array(np.unravel_index(where[rng.integers(where.size)], body.shape))


def _read_padded(array: np.ndarray, start: np.ndarray, size: Sequence[int], fill: float, dtype: Any) -> np.ndarray:
    """``array[:, start:start+size]`` with out-of-image voxels set to ``fill``; only the inside is read.

    The box must overlap the image (``sample_patch``'s always does: acvl-utils returns zeros, not
    ``fill``, for a box wholly outside). The result is a new array, never a view of ``array``.
    """
    box = [[int(s), int(s) + int(n)] for s, n in zip(start, size)]
    patch = crop_and_pad_nd(array, box, pad_value=fill, cast_cropped_to=dtype)
    # without padding or a dtype change acvl-utils returns a view of the (memory-mapped) input
    return np.array(patch) if not patch.flags.owndata or isinstance(patch, np.memmap) else patch


def sample_patch(
    mr: np.ndarray, ct: np.ndarray, masks: np.ndarray, patch_size: Sequence[int],
    rng: np.random.Generator, body_fraction: float = 0.67,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random ``patch_size`` (z, y, x) patch of ``(mr, ct, masks)``: float32, float32, uint8.

    With probability ``body_fraction`` the patch is centred on a random body voxel
    (``masks[1]``), otherwise its position is uniform. Axes where the image is
    smaller than the patch are padded (MR and CT with -1, masks with 0); the image
    then lies entirely inside the patch.
    """
    size = np.asarray(patch_size, dtype=int)
    shape = np.asarray(mr.shape[1:], dtype=int)
    if size.shape != (3,) or np.any(size < 1):
        raise ValueError(f"patch_size must be three positive ints (z, y, x), got {list(patch_size)}")
    lo, hi = np.minimum(0, shape - size), np.maximum(0, shape - size)
    centre = _random_body_voxel(masks[1], rng) if rng.random() < body_fraction else None
    if centre is None:
        start = rng.integers(lo, hi + 1)
    else:
        start = np.clip(centre - size // 2, lo, hi)
    return (_read_padded(mr, start, size, PAD_IMAGE, np.float32),
            _read_padded(ct, start, size, PAD_IMAGE, np.float32),
            _read_padded(masks, start, size, PAD_MASK, np.uint8))


def drop_channels(mr: np.ndarray, probability: float, rng: np.random.Generator) -> np.ndarray:
    """Zero random MR sequences in place; returns the (B, C) float32 availability flags.

    With ``probability`` a sample keeps only a uniformly drawn non-empty proper
    subset of its C sequences (C > 1); otherwise it keeps all. Nothing is drawn
    from ``rng`` for single-sequence data or ``probability`` 0, so such batches
    stay exactly what they were before channel dropout existed.
    """
    batch, channels = mr.shape[:2]
    available = np.ones((batch, channels), dtype=np.float32)
    if channels < 2 or probability <= 0:
        return available
    for b in range(batch):
        if rng.random() < probability:
            subset = int(rng.integers(1, 2**channels - 1))  # bit c set = sequence c kept; never none, never all
            keep = np.array([(subset >> c) & 1 for c in range(channels)], dtype=bool)
            mr[b, ~keep] = 0.0
            available[b] = keep
    return available


def step_rngs(seed: int, step: int, rank: int) -> tuple[np.random.Generator, np.ndarray]:
    """A generator and a legacy ``np.random.seed`` state, both derived from ``(seed, step, rank)`` only."""
    sequence = np.random.SeedSequence([int(seed), int(step), int(rank)])
    rng_seq, legacy_seq = sequence.spawn(2)
    return np.random.default_rng(rng_seq), legacy_seq.generate_state(4)


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``k`` is the batch of training step ``k`` (see the module docstring).

    Items are dicts: ``mr`` (B, C, *patch), ``ct``, ``valid``, ``body`` (B, 1, *patch),
    all float32 tensors (masks 0/1), ``available`` (B, C) flags of the MR sequences
    kept by ``channel_dropout`` (dropped ones are zeroed), and ``cases`` (list of B names). ``rank`` (of
    ``world_size`` processes) enters the seed so every process draws its own batches.
    ``augment_params``: the plan's ``augmentation`` section (a dict: overrides of its defaults;
    None: the defaults).
    """

    def __init__(
        self, dataset: PreprocessedDataset, patch_size: Sequence[int], batch_size: int, seed: int,
        augment: bool = True, rank: int = 0, world_size: int = 1,
        augment_params: AugmentationPlan | dict[str, Any] | None = None,
        body_fraction: float = 0.67, num_steps: int = 2**62, channel_dropout: float = 0.0,
        case_sampling: str = "uniform",
    ) -> None:
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"batch_size must be even and >= 2 (pairs of patients for the SMD loss), got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.dataset = dataset
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.body_fraction = body_fraction
        self.num_steps = num_steps
        if not 0.0 <= channel_dropout <= 1.0:
            raise ValueError(f"mr_channel_dropout must be in [0, 1], got {channel_dropout}")
        self.channel_dropout = float(channel_dropout)
        self.augmentation: Augmentation | None = (
            build_augmentation(augment_params, self.patch_size) if augment else None)
        if len(dataset) < 2:
            log.warning("only one training case: both members of every pair are %s", dataset.cases[0])
        # case_sampling "volume": cases drawn in proportion to their voxel counts; "uniform": None (equal odds)
        self.case_weights: np.ndarray | None = None
        if case_sampling == "volume":
            counts = np.array([dataset.voxel_count(c) for c in dataset.cases], dtype=np.float64)
            self.case_weights = counts / counts.sum()
        elif case_sampling != "uniform":
            raise ValueError(f"case_sampling must be 'uniform' or 'volume', got {case_sampling!r}")

    def __len__(self) -> int:
        return self.num_steps

    def _pairs(self, rng: np.random.Generator) -> list[str]:
        if self.case_weights is not None:
            return self._weighted_pairs(rng)
        n, names = len(self.dataset), []
        for _ in range(self.batch_size // 2):
            a = int(rng.integers(n))
            b = a
            if n > 1:
                b = int(rng.integers(n - 1))
                b += b >= a
            names += [self.dataset.cases[a], self.dataset.cases[b]]
        return names

    def _weighted_pairs(self, rng: np.random.Generator) -> list[str]:
        """Pairs of distinct cases (where there are two), each drawn with the odds of ``case_weights``."""
        weights, names = self.case_weights, []
        for _ in range(self.batch_size // 2):
            a = int(rng.choice(len(weights), p=weights))
            others = weights.copy()
            others[a] = 0.0
            b = int(rng.choice(len(weights), p=others / others.sum())) if others.sum() > 0 else a
            names += [self.dataset.cases[a], self.dataset.cases[b]]
        return names

    def __getitem__(self, step: int) -> dict[str, Any]:
        rng, legacy = step_rngs(self.seed, step, self.rank)
        saved = np.random.get_state()
        np.random.seed(legacy)  # batchgenerators draws from the global numpy RNG
        try:
            return self._batch(rng)
        finally:
            np.random.set_state(saved)

    def _batch(self, rng: np.random.Generator) -> dict[str, Any]:
        cases = self._pairs(rng)
        size = self.augmentation.input_patch_size if self.augmentation is not None else self.patch_size
        patches = [sample_patch(*self.dataset.arrays(c), size, rng, self.body_fraction) for c in cases]
        arrays = {key: np.stack([p[i] for p in patches]) for i, key in enumerate(("mr", "ct", "masks"))}
        if self.augmentation is not None:
            arrays = self.augmentation(arrays)
        masks = arrays["masks"].astype(np.float32)
        mr = np.ascontiguousarray(arrays["mr"], dtype=np.float32)
        available = drop_channels(mr, self.channel_dropout, rng)
        return {
            "mr": torch.from_numpy(mr),
            "available": torch.from_numpy(available),
            "ct": torch.from_numpy(np.ascontiguousarray(arrays["ct"], dtype=np.float32)),
            "valid": torch.from_numpy(np.ascontiguousarray(masks[:, 0:1])),
            "body": torch.from_numpy(np.ascontiguousarray(masks[:, 1:2])),
            "cases": cases,
        }
