"""The training-free first stage of wavelet-domain diffusion (WDM/cWDM style).

One orthonormal 3D Haar level turns a (B, C, D, H, W) volume into its 8
sub-bands at half resolution, stacked band-major as 8*C channels (channel
``k*C + c`` is band ``k`` of input channel ``c``, band order as
:func:`wldm_auto.networks.wavelets.dwt3d`). The low-pass band is divided by
sqrt(8) so it equals the local mean of each 2x2x2 block and stays in the
image's [-1, 1] range; :meth:`HaarFirstStage.decode` undoes both steps
exactly. It has the ``encode(x, modality).mode()`` / ``decode(z, modality)``
interface of the wavelet VAE, so the diffusion trainer, the tiled sampler and
the predictor use either. Several MR sequences get their availability flags
appended (at half resolution) after the sub-bands.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wldm_auto.networks.channels import availability, uses_flags
from wldm_auto.networks.wavelets import dwt3d, idwt3d

LOW_BAND_SCALE = 1.0 / math.sqrt(8.0)


class _Exact:
    """A deterministic 'posterior': the coefficients themselves."""

    def __init__(self, z: torch.Tensor) -> None:
        self.z = z

    def mode(self) -> torch.Tensor:
        return self.z

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.z


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is half precision (float64 stays)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def haar_encode(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W), even sizes -> (B, 8C, D/2, H/2, W/2), low band scaled by 1/sqrt(8). In float32 even
    inside a training step's autocast: the first stage is exact, so its targets and decoded images must be."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _haar_encode(_full_precision(x))


def _haar_encode(x: torch.Tensor) -> torch.Tensor:
    bands = dwt3d(x)
    scale = torch.ones(8, device=x.device, dtype=x.dtype)
    scale[0] = LOW_BAND_SCALE
    return (bands * scale[None, :, None, None, None, None]).flatten(1, 2)


def haar_decode(z: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`haar_encode`: (B, 8C, d, h, w) -> (B, C, 2d, 2h, 2w), in float32 even inside
    an autocast (as :func:`haar_encode`)."""
    if z.dim() != 5 or z.shape[1] % 8:
        raise ValueError(f"Haar coefficients must be (B, 8*C, d, h, w), got shape {tuple(z.shape)}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        return _haar_decode(_full_precision(z))


def _haar_decode(z: torch.Tensor) -> torch.Tensor:
    bands = z.unflatten(1, (8, z.shape[1] // 8))
    scale = torch.ones(8, device=z.device, dtype=z.dtype)
    scale[0] = 1.0 / LOW_BAND_SCALE
    return idwt3d(bands * scale[None, :, None, None, None, None])


class HaarFirstStage(nn.Module):
    """Fixed Haar 'autoencoder' for ``mr_channels`` MR sequences and one CT channel (no parameters)."""

    required_divisor = 2
    whole_volume = True  # exact and local: encode/decode whole volumes, no tiles or blending needed

    def __init__(self, mr_channels: int) -> None:
        super().__init__()
        if mr_channels < 1:
            raise ValueError(f"mr_channels must be >= 1, got {mr_channels}")
        self.mr_channels = mr_channels

    def channels(self, modality: str) -> int:
        """Channels of the coefficients of ``modality`` (MR: 8 per sequence, plus its flags)."""
        if modality == "ct":
            return 8
        if modality == "mr":
            return 8 * self.mr_channels + (self.mr_channels if uses_flags(self.mr_channels) else 0)
        raise ValueError(f"modality must be 'mr' or 'ct', got {modality!r}")

    def encode(self, x: torch.Tensor, modality: str, available: torch.Tensor | None = None) -> _Exact:
        expected = 1 if modality == "ct" else self.mr_channels
        self.channels(modality)
        if x.dim() != 5 or x.shape[1] != expected:
            raise ValueError(f"{modality} input must be (B, {expected}, D, H, W), got shape {tuple(x.shape)}")
        if modality == "ct" or not uses_flags(self.mr_channels):
            return _Exact(haar_encode(x))
        flags = availability(available, x.shape[0], self.mr_channels, x.device, x.dtype)
        z = haar_encode(x * flags[:, :, None, None, None])
        view = flags[:, :, None, None, None].expand(-1, -1, *z.shape[2:])
        return _Exact(torch.cat([z, view], dim=1))

    def decode(self, z: torch.Tensor, modality: str) -> torch.Tensor:
        if modality != "ct":
            raise ValueError("the Haar first stage decodes CT coefficients only")
        if z.dim() != 5 or z.shape[1] != 8:
            raise ValueError(f"CT coefficients must be (B, 8, d, h, w), got shape {tuple(z.shape)}")
        return haar_decode(z)


def pad_even(x: torch.Tensor, value: float) -> torch.Tensor:
    """Pad the last three axes at their ends to even sizes with ``value``."""
    pads = []
    for size in reversed(x.shape[-3:]):
        pads += [0, size % 2]
    return F.pad(x, pads, value=value) if any(pads) else x
