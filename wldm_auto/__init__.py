"""wldm_auto: self-configuring MR-to-CT synthesis with a 3D wavelet latent diffusion model.

``from wldm_auto import Predictor`` gives the Python prediction API
(``wldm_auto.inference.api``); it is imported on first use, so ``import
wldm_auto`` stays cheap (no torch).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Prediction", "Predictor", "__version__"]

if TYPE_CHECKING:
    from wldm_auto.inference.api import Prediction, Predictor


def __getattr__(name: str) -> Any:
    """Import the prediction API (and with it torch) only when it is first asked for."""
    if name in ("Predictor", "Prediction"):
        from wldm_auto.inference import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
