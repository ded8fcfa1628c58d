"""The regression baseline as a synthesizer: one Gaussian-blended sliding-window pass of a trained U-Net."""
from __future__ import annotations

import logging
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
    standard deviation map reflects real spread between folds only.
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

    @torch.no_grad()
    def predict(self, mr: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
        """(C, z, y, x) normalised MR -> (z, y, x) normalised CT (unclamped); ``available``: (C,) flags."""
        divisor = int(self.net.required_divisor)
        tile = fit_tile(mr.shape[-3:], [max(divisor, int(t) // divisor * divisor) for t in self.tile], divisor)

        def fn(batch: torch.Tensor) -> torch.Tensor:
            with network_autocast(self.device, self.autocast):
                return self.net(batch, available).float()

        return sliding_window(mr, tile, fn, overlap=self.overlap, batch_size=self.batch_size, pad_value=-1.0,
                              device=self.device, share=self.share)[0]

    @torch.no_grad()
    def sample(self, mr: torch.Tensor, steps: int | None = None, eta: float = 0.0, num_samples: int = 1,
               generator: torch.Generator | None = None, progress: bool = False,
               available: torch.Tensor | None = None) -> torch.Tensor:
        """(C, z, y, x) normalised MR -> (num_samples, z, y, x) normalised CT, all samples identical."""
        if progress:
            log.info("regression U-Net: one sliding-window pass over %s voxels", tuple(mr.shape[-3:]))
        return self.predict(mr, available)[None].expand(num_samples, *mr.shape[-3:])
