"""MR channels that may be missing: the availability flags every MR-reading network takes.

A model trained on C > 1 MR sequences sees, besides the C normalised images,
C constant flag channels (1 = the sequence is there, 0 = missing; a missing
image is all zeros). Training drops sequences at random (the plan's
``mr_channel_dropout``), so one model serves any non-empty subset of its
sequences at prediction. Single-sequence models take the image alone (a
flag that is always 1 carries nothing), so their layout is unchanged.
"""
from __future__ import annotations

import torch


def uses_flags(mr_channels: int) -> bool:
    """Whether a model of ``mr_channels`` sequences takes availability flags (only with more than one)."""
    return mr_channels > 1


def network_channels(mr_channels: int) -> int:
    """Input channels of the MR path: the images, plus one flag each when there are several."""
    return 2 * mr_channels if uses_flags(mr_channels) else mr_channels


def availability(available: torch.Tensor | None, batch: int, mr_channels: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``available`` as a (batch, C) 0/1 tensor: None = all present, a (C,) vector is shared by the batch."""
    if available is None:
        return torch.ones(batch, mr_channels, device=device, dtype=dtype)
    available = torch.as_tensor(available, device=device, dtype=dtype)
    if available.dim() == 1:
        available = available.expand(batch, -1)
    if tuple(available.shape) != (batch, mr_channels):
        raise ValueError(f"availability must be ({mr_channels},) or ({batch}, {mr_channels}), "
                         f"got {tuple(available.shape)}")
    return available


def with_flags(mr: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, D, H, W) MR -> the network input: missing channels zeroed, C flag channels appended (C > 1).

    For C = 1 the input is returned unchanged (and ``available`` must say the channel is there).
    """
    batch, channels = mr.shape[:2]
    flags = availability(available, batch, channels, mr.device, mr.dtype)
    if not uses_flags(channels):
        if bool((flags == 0).any()):
            raise ValueError("a single-sequence model cannot run without its only MR channel")
        return mr
    view = flags[:, :, None, None, None]
    return torch.cat([mr * view, view.expand_as(mr)], dim=1)
