"""Checkpoints: tensors and plain data only, written atomically, loaded with ``weights_only=True``.

A :class:`Checkpoint` names its trainer, step, network weights (state dicts
by name) and the plans it was trained under (as plain JSON data); a model to
predict with also names its stage, configuration, fold and MR channel count.
Everything else (optimisers, scaler, RNG states, history, a stage's own
values such as ``latent_scale``) travels in ``extra``. On disk it is one flat
dict, so nothing in it needs unpickling of arbitrary objects and a checkpoint
someone hands you cannot run code when loaded. :func:`save_checkpoint` and
:func:`load_checkpoint` are its one writer and reader.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wldm_auto.io.files import atomic_path, disk_full_errno


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or not one of ours."""


REQUIRED_KEYS = ("trainer", "step", "networks", "plans")


@dataclass
class Checkpoint(Mapping[str, Any]):
    """One model as stored; reads like the flat dict it is saved as (``checkpoint["step"]``).

    Identity fields a checkpoint lacks are None and absent from that dict.
    """

    trainer: str
    step: int
    networks: dict[str, dict[str, torch.Tensor]]
    plans: dict[str, Any]
    stage: str | None = None
    configuration: str | None = None
    fold: int | None = None
    mr_channels: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        """The typed view of a flat checkpoint dict; ValueError naming the required keys it lacks."""
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ValueError(f"checkpoint state lacks {', '.join(missing)}")
        typed = {k: data[k] for k in _FIELDS if k in data}
        return cls(**typed, extra={k: v for k, v in data.items() if k not in _FIELDS})

    def to_dict(self) -> dict[str, Any]:
        """The flat dict written to disk: the fields that are set, then ``extra``."""
        data = {name: getattr(self, name) for name in _FIELDS if getattr(self, name) is not None}
        data.update(self.extra)
        return data

    def __getitem__(self, key: str) -> Any:
        if key in _FIELDS:
            value = getattr(self, key)
            if value is None:
                raise KeyError(key)
            return value
        return self.extra[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


_FIELDS = tuple(f.name for f in dataclasses.fields(Checkpoint) if f.name != "extra")


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


def save_checkpoint(checkpoint: Checkpoint | Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``checkpoint`` (or its flat dict) to ``path`` atomically (temporary file, fsync, rename).

    A full disk raises :class:`DiskFullError` (one line naming ``path``); the
    file already at ``path`` is left as it was.
    """
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint.from_dict(checkpoint)
    state = checkpoint.to_dict()
    with disk_full_guard(path), atomic_path(path, suffix=".pt") as tmp:
        with open(tmp, "wb") as handle:  # Python file I/O: a full disk surfaces as OSError(ENOSPC)
            torch.save(state, handle)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
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
    return Checkpoint.from_dict(state)


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
