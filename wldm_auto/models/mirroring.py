"""Test-time mirroring: every draw of a synthesizer repeated on the MR flipped along chosen axes.

The networks are trained with random flips along the plan's ``augmentation.mirror_axes``, so a flipped
MR is as valid an input as the original; flipping its prediction back gives another estimate of the
same sCT. Averaging them is nnU-Net's test-time augmentation (a lower MAE), and their disagreement is a
map of where the model is unsure: for a deterministic model (the regression U-Net) the only spread it
has, and for a diffusion model one that its nearly identical x0-predicting samples lack. On the fidelity
benchmark's test cases the regression U-Net's std over the 8 mirrorings ranked its errors with a
voxel Spearman of 0.47 against 0.14-0.27 for the diffusion models' sample spread (InferencePlan notes).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wldm_auto.diffusion.ranks import RankShare
from wldm_auto.models.distributed import share_tiles
from wldm_auto.models.phases import Phases
from wldm_auto.models.synthesizer import Synthesizer


def mirrorings(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (0 z, 1 y, 2 x) to flip, the identity first: 2 ** len(axes) of them."""
    axes = sorted(set(int(a) for a in axes))
    return [tuple(a for a, on in zip(axes, bits) if on) for bits in itertools.product((False, True), repeat=len(axes))]


def _flip(volume: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """``volume`` (..., z, y, x) flipped along the spatial ``axes`` (0 z, 1 y, 2 x)."""
    return torch.flip(volume, [a - 3 for a in axes]) if axes else volume


@dataclass
class MirroredSynthesizer:
    """A :class:`~wldm_auto.models.synthesizer.Synthesizer` whose every sample is drawn once per mirroring.

    ``sample(mr, ..., num_samples=N)`` returns ``N * 2 ** len(axes)`` draws: for each mirroring (identity
    first) the base model's N samples of the flipped MR, flipped back. A deterministic base model is
    asked for one sample per mirroring, so it gives ``2 ** len(axes)`` draws; :attr:`draws_per_sample`
    tells the predictor how many draws one sample becomes. ``mean_estimate`` (a posterior-mean sCT
    plan) is the mean of the base model's estimates over the mirrorings.
    """

    base: Synthesizer
    axes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.axes or not set(self.axes) <= {0, 1, 2}:
            raise ValueError(f"mirror axes {self.axes}: give one or more of 0, 1, 2 (z, y, x)")
        self.axes = tuple(sorted(set(int(a) for a in self.axes)))

    @property
    def is_stochastic(self) -> bool:
        """Whether the base model's samples differ (the mirrorings differ in any case)."""
        return bool(self.base.is_stochastic)

    @property
    def draws_per_sample(self) -> int:
        return 2 ** len(self.axes)

    @property
    def device(self) -> torch.device | str:
        return getattr(self.base, "device", "cpu")

    @property
    def autocast(self) -> torch.dtype | None:
        return getattr(self.base, "autocast", None)

    @property
    def phases(self) -> Phases | None:
        return getattr(self.base, "phases", None)

    @phases.setter
    def phases(self, value: Phases | None) -> None:
        if hasattr(self.base, "phases"):
            self.base.phases = value

    @property
    def share(self) -> RankShare | None:
        return getattr(self.base, "share", None)

    @share.setter
    def share(self, value: RankShare | None) -> None:
        share_tiles([self.base], value)  # its check: a base that cannot spread its work is a TypeError

    @torch.no_grad()
    def sample(self, mr: torch.Tensor, steps: int | None, eta: float = 0.0, num_samples: int = 1,
               generator: torch.Generator | None = None, progress: bool = False,
               available: torch.Tensor | None = None) -> torch.Tensor:
        """(C, z, y, x) normalised MR -> (num_samples * 2 ** len(axes), z, y, x) normalised CT draws."""
        draws = []
        for flips in mirrorings(self.axes):
            samples = self.base.sample(_flip(mr, flips), steps, eta, num_samples, generator, progress, available)
            draws.append(_flip(samples, flips))
        return torch.cat(draws)

    @property
    def predicts_std(self) -> bool:
        """Whether the base model predicts a std map of its own (a regression U-Net's error head)."""
        return bool(getattr(self.base, "predicts_std", False))

    @torch.no_grad()
    def sample_with_std(self, mr: torch.Tensor, steps: int | None, eta: float = 0.0, num_samples: int = 1,
                        generator: torch.Generator | None = None, progress: bool = False,
                        available: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`sample` and the base model's own std map averaged over the mirrorings in variance (None
        when the base model has none)."""
        if not self.predicts_std:
            return self.sample(mr, steps, eta, num_samples, generator, progress, available), None
        draws, variance = [], None
        for flips in mirrorings(self.axes):
            samples, std = self.base.sample_with_std(_flip(mr, flips), steps, eta, num_samples, generator, progress,
                                                     available)
            draws.append(_flip(samples, flips))
            variance = _flip(std, flips) ** 2 if variance is None else variance + _flip(std, flips) ** 2
        return torch.cat(draws), torch.sqrt(variance / self.draws_per_sample)

    @torch.no_grad()
    def mean_estimate(self, mr: torch.Tensor, generator: torch.Generator | None = None,
                      available: torch.Tensor | None = None) -> torch.Tensor | None:
        """(z, y, x) mean of the base model's posterior-mean estimates over the mirrorings, or None when
        the base model has none (its sCT is the mean of the draws)."""
        estimate = getattr(self.base, "mean_estimate", None)
        if estimate is None:
            return None
        total = None
        for flips in mirrorings(self.axes):
            one = estimate(_flip(mr, flips), generator, available)
            if one is None:
                return None
            total = _flip(one, flips) if total is None else total + _flip(one, flips)
        return total / self.draws_per_sample
