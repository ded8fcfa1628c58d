"""The regression baseline as a synthesizer: one Gaussian-blended sliding-window pass of a trained U-Net."""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wldm_auto.diffusion.ranks import RankShare
from wldm_auto.diffusion.tiling import fit_tile
from wldm_auto.models.precision import network_autocast
from wldm_auto.models.tiling import sliding_window

log = logging.getLogger(__name__)


@dataclass
class RegressionSynthesizer:
    """A trained :class:`~wldm_auto.networks.regression_unet.RegressionUNet` behind the
    :class:`~wldm_auto.models.synthesizer.Synthesizer` interface.

    The model is deterministic (``is_stochastic`` is False): ``sample`` runs one
    Gaussian-blended sliding-window pass and returns that prediction repeated
    ``num_samples`` times (an expanded view, no copies); ``steps``, ``eta`` and
    ``generator`` are ignored. The predictor asks for one sample only, so its
    standard deviation map reflects real spread between folds or mirrorings, plus,
    when the U-Net has an error head, the head's predicted std (:meth:`sample_with_std`).
    """

    net: torch.nn.Module
    tile: Sequence[int]  # (z, y, x) voxels, e.g. the plan's patch size
    overlap: float = 0.5
    device: torch.device | str = "cpu"
    batch_size: int = 4
    share: RankShare | None = None  # spread the sliding window over these ranks (--split-case)
    autocast: torch.dtype | None = None  # the U-Net under autocast in this dtype (output blended in float32)

    @property
    def is_stochastic(self) -> bool:
        return False

    @property
    def predicts_std(self) -> bool:
        """Whether the U-Net has an error head (plan ``regression.error_head``): a std map from one pass."""
        return getattr(self.net, "error_head", None) is not None

    def _window(self, mr: torch.Tensor, available: torch.Tensor | None, with_error: bool) -> torch.Tensor:
        """One Gaussian-blended sliding-window pass: (1 or 2, z, y, x) (sCT, and log b with ``with_error``)."""
        divisor = int(self.net.required_divisor)
        tile = fit_tile(mr.shape[-3:], [max(divisor, int(t) // divisor * divisor) for t in self.tile], divisor)

        def fn(batch: torch.Tensor) -> torch.Tensor:
            with network_autocast(self.device, self.autocast):
                return self.net(batch, available, with_error=with_error).float()

        return sliding_window(mr, tile, fn, overlap=self.overlap, batch_size=self.batch_size, pad_value=-1.0,
                              device=self.device, share=self.share)

    @torch.no_grad()
    def predict(self, mr: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
        """(C, z, y, x) normalised MR -> (z, y, x) normalised CT (unclamped); ``available``: (C,) flags."""
        return self._window(mr, available, False)[0]

    @torch.no_grad()
    def predict_with_std(self, mr: torch.Tensor, available: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, y, x) normalised CT and its std in the same units from one pass of a U-Net with an error head:
        a Laplace's std, sqrt(2) * b, with log b blended over the tiles like the sCT."""
        out = self._window(mr, available, True)
        return out[0], math.sqrt(2.0) * torch.exp(out[1].clamp(-12.0, 12.0))

    @torch.no_grad()
    def sample(self, mr: torch.Tensor, steps: int | None = None, eta: float = 0.0, num_samples: int = 1,
               generator: torch.Generator | None = None, progress: bool = False,
               available: torch.Tensor | None = None) -> torch.Tensor:
        """(C, z, y, x) normalised MR -> (num_samples, z, y, x) normalised CT, all samples identical."""
        if progress:
            log.info("regression U-Net: one sliding-window pass over %s voxels", tuple(mr.shape[-3:]))
        return self.predict(mr, available)[None].expand(num_samples, *mr.shape[-3:])

    @torch.no_grad()
    def sample_with_std(self, mr: torch.Tensor, steps: int | None = None, eta: float = 0.0, num_samples: int = 1,
                        generator: torch.Generator | None = None, progress: bool = False,
                        available: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`sample` and the error head's std map (z, y, x) from the same pass (None without a head)."""
        if not self.predicts_std:
            return self.sample(mr, steps, eta, num_samples, generator, progress, available), None
        if progress:
            log.info("regression U-Net: one sliding-window pass (sCT and error head) over %s voxels",
                     tuple(mr.shape[-3:]))
        mean, std = self.predict_with_std(mr, available)
        return mean[None].expand(num_samples, *mr.shape[-3:]), std
