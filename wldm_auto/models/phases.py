"""Seconds per named phase of one prediction, so whole-volume time can be attributed (read, encode, ...)."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import ContextManager

import torch


class Phases:
    """Accumulates wall-clock seconds per phase name; ``with phases("encode"): ...``.

    On a CUDA device each phase ends with a synchronisation, so queued kernels are
    charged to the phase that launched them (costs a little; only when timing).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._cuda = torch.device(device) if device is not None and torch.device(device).type == "cuda" else None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._cuda is not None:
                torch.cuda.synchronize(self._cuda)  # this device's queue (not GPU 0's)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def update(self, seconds: dict[str, float]) -> None:
        """Add another timer's seconds to these."""
        for name, value in seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + value

    def table(self) -> str:
        """One line: ``read 1.2 s, encode 30.1 s, ... (total 45.0 s)``."""
        parts = ", ".join(f"{name} {value:.1f} s" for name, value in self.seconds.items())
        return f"{parts} (total {sum(self.seconds.values()):.1f} s)"


def phase(phases: Phases | None, name: str) -> ContextManager:
    """``phases(name)``, or a no-op when nobody is timing."""
    return nullcontext() if phases is None else phases(name)
