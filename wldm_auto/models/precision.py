"""Half-precision inference (plan ``inference.precision``): which autocast dtype, and the context around network calls.

Only network forwards run under ``torch.autocast`` (the tiled VAE encode/decode, the denoiser on
every DDIM step, the regression U-Net); their outputs are cast to float32 before anything is
blended, so the tile accumulators and weight maps, the DDIM update arithmetic and the noise
schedule stay float32. ``"float32"`` means no autocast at all: bit for bit the plain prediction.

Devices: CUDA autocast takes bfloat16 and float16; on a GPU without bfloat16 (before Ampere)
``"bfloat16"`` falls back to float16 with a warning. CPU autocast takes bfloat16, and float16 in
recent torch (2.4 and later); where a CPU torch does not, ``"float16"`` is a ValueError (running float32
instead would report figures for a precision that never ran). float16 on a CPU runs, with a warning:
on this project's 2-core CPU (torch 2.13) it took 19x the float32 time (no native float16 kernels),
while bfloat16 took about the float32 time.
"""
from __future__ import annotations

import functools
import logging
import warnings
from contextlib import nullcontext
from typing import ContextManager

import torch

log = logging.getLogger(__name__)

# plan value -> autocast dtype (None: no autocast); planners.schema.PRECISIONS lists the same names
DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.lru_cache(maxsize=None)
def autocast_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.autocast(device_type, dtype)`` really runs a matrix product in ``dtype`` here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unsupported dtype warns and disables autocast: we test instead
        try:
            with torch.autocast(device_type=device_type, dtype=dtype):
                ones = torch.ones(2, 2, device=device_type)
                return (ones @ ones).dtype == dtype
        except (RuntimeError, ValueError):
            return False


def cuda_bf16_native(device: torch.device | str | int | None = None) -> bool:
    """Whether this CUDA GPU runs bfloat16 natively (compute capability 8.0, Ampere, or later; ROCm: torch's
    own answer). ``torch.cuda.is_bf16_supported()`` also says yes on older GPUs that only emulate it
    (V100, T4), where bfloat16 is slow and float16 with a GradScaler is the right half precision."""
    if not torch.cuda.is_available():
        return False
    if getattr(torch.version, "hip", None):
        return bool(torch.cuda.is_bf16_supported())
    index = None if device is None else torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return torch.cuda.get_device_capability(index)[0] >= 8


@functools.lru_cache(maxsize=None)
def _warn_no_bf16() -> None:
    log.warning("precision bfloat16: this GPU has no bfloat16; predicting with float16 autocast instead")


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for plan ``precision`` on ``device`` (None for float32); ValueError for an unknown
    name or a dtype this device's autocast cannot run (bfloat16 on an older GPU: float16, with a warning)."""
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(DTYPES)}")
    dtype = DTYPES[precision]
    if dtype is None:
        return None
    device_type = torch.device(device).type
    if dtype is torch.bfloat16 and device_type == "cuda" and not cuda_bf16_native(device):
        _warn_no_bf16()
        return torch.float16
    if not autocast_works(device_type, dtype):
        raise ValueError(f"precision {precision!r}: {device_type} autocast in torch {torch.__version__} does not run "
                         f"{precision}; use float32{' or bfloat16' if dtype is torch.float16 else ''}")
    if dtype is torch.float16 and device_type == "cpu":
        _warn_cpu_float16()
    return dtype


@functools.lru_cache(maxsize=None)
def _warn_cpu_float16() -> None:
    log.warning("precision float16 on a CPU: correct but slow (about 19x the float32 time measured; no native "
                "float16 kernels); bfloat16 is the CPU's half precision")


def network_autocast(device: torch.device | str, dtype: torch.dtype | None) -> ContextManager:
    """``torch.autocast`` on ``device``'s type in ``dtype``; a no-op for None (float32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
