"""What every trained MR -> CT model offers prediction and validation: samples of normalised sCT for a normalised MR.

Implemented by :class:`~wldm_auto.models.latent.LatentSynthesizer` (a trained
wavelet VAE, or the fixed Haar transform of wavelet-domain diffusion, plus a
denoiser) and :class:`~wldm_auto.models.regression.RegressionSynthesizer`.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Synthesizer(Protocol):
    """Normalised MR (C, z, y, x) -> (num_samples, z, y, x) normalised CT samples."""

    @property
    def is_stochastic(self) -> bool:
        """Whether samples differ: False for a model whose every sample is the same prediction."""
        ...

    def sample(self, mr: torch.Tensor, steps: int | None, eta: float = 0.0, num_samples: int = 1,
               generator: torch.Generator | None = None, progress: bool = False,
               available: torch.Tensor | None = None) -> torch.Tensor:
        """``num_samples`` sCTs for ``mr``; ``steps``/``eta``: sampler settings (ignored by deterministic models);
        ``available``: (C,) flags of the MR sequences present (missing ones are zeros in ``mr``)."""
        ...
