"""Checkpoints: tensors and plain data only, written atomically, loaded with ``weights_only=True``.

A checkpoint is a dict of state dicts (networks, optimisers, scaler), the
step, RNG states (as tensors and lists), the plans (as plain JSON data) and
the trainer's name. Nothing in it needs unpickling of arbitrary objects, so
a checkpoint someone hands you cannot run code when loaded.
"""
from __future__ import annotations

import errno
import os
import pickle
import random
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from wldm_auto.io.files import atomic_path, disk_full_errno


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or not one of ours."""


REQUIRED_KEYS = ("trainer", "step", "networks", "plans")

class DiskFullError(OSError):
    """Writing a file failed because the disk (or the user's quota) is full; ``str()`` is one line naming it."""

    @classmethod
    def for_path(cls, path: str | os.PathLike, code: int = errno.ENOSPC) -> "DiskFullError":
        what = "disk quota exceeded" if code == getattr(errno, "EDQUOT", None) else "no space left on device"
        return cls(code, f"{path}: disk full ({what}); any earlier version of this file is kept: "
                         "free some space, then continue with --c", str(path))

    def __str__(self) -> str:
        return str(self.strerror)


@contextmanager
def disk_full_guard(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into a one-line :class:`DiskFullError` naming it."""
    try:
        yield
    except DiskFullError:
        raise
    except (OSError, RuntimeError) as exc:
        code = disk_full_errno(exc)
        if code is None:
            raise
        raise DiskFullError.for_path(path, code) from None


def rng_state() -> dict[str, Any]:
    """Torch (CPU, CUDA), NumPy and Python RNG states as tensors and plain lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename).

    A full disk raises :class:`DiskFullError` (one line naming ``path``); the
    file already at ``path`` is left as it was.
    """
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {', '.join(missing)}")
    with disk_full_guard(path), atomic_path(path, suffix=".pt") as tmp:
        with open(tmp, "wb") as handle:  # Python file I/O: a full disk surfaces as OSError(ENOSPC)
            torch.save(state, handle)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; CheckpointError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(_load_problem(path, exc)) from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path}: not a wldm_auto checkpoint (expected keys {', '.join(REQUIRED_KEYS)})")
    return state


_REFUSED = re.compile(r"GLOBAL (\S+) was not an allowed global|whose module (\S+) is blocked|(\S+) must be \S+ to load")


def _load_problem(path: Path, exc: Exception) -> str:
    """One line saying why ``path`` could not be loaded, without torch's advice to load unsafely."""
    text = str(exc)
    refused = _REFUSED.search(text) if isinstance(exc, pickle.UnpicklingError) else None
    if refused:
        what = next(g for g in refused.groups() if g)
        return (f"{path}: not a wldm_auto checkpoint: it holds pickled objects ({what}), which are refused "
                "because loading them can run code; do not trust this file")
    if "TorchScript" in text:
        return f"{path}: a TorchScript archive, not a wldm_auto checkpoint"
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in detail.splitlines()
             if line.strip() and "weights_only" not in line and "Weights only load failed" not in line]
    first = lines[0] if lines else type(exc).__name__
    return f"{path}: not a readable checkpoint (truncated or corrupted?): {first[:200]}"
