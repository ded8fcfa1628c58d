"""Exponential moving average of a network's weights (used at validation and prediction)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def ema_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` to hold its average."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def update_ema(ema: nn.Module, live: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * live for parameters; buffers are copied."""
    for average, current in zip(ema.parameters(), live.parameters()):
        average.lerp_(current.detach(), 1.0 - decay)
    for average, current in zip(ema.buffers(), live.buffers()):
        average.copy_(current)
