"""Image geometry: size, spacing, origin and direction in ITK (x, y, z) order."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Geometry:
    """The physical grid of a 3D image (ITK order: x, y, z; direction row-major 3x3)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(
            tuple(int(v) for v in image.GetSize()),
            tuple(float(v) for v in image.GetSpacing()),
            tuple(float(v) for v in image.GetOrigin()),
            tuple(float(v) for v in image.GetDirection()),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Geometry":
        return cls(
            tuple(int(v) for v in data["size"]),
            tuple(float(v) for v in data["spacing"]),
            tuple(float(v) for v in data["origin"]),
            tuple(float(v) for v in data["direction"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Stamp this geometry onto ``image`` (whose size must match); returns it."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"size {image.GetSize()} does not match geometry size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def reference_image(self, pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
        """An empty image on this grid (a resampling reference)."""
        return self.apply_to(sitk.Image(list(self.size), pixel_type))

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Numpy array shape of an image on this grid."""
        return tuple(reversed(self.size))  # type: ignore[return-value]

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        return tuple(float(n * s) for n, s in zip(self.size, self.spacing))  # type: ignore[return-value]

    def is_close(self, other: "Geometry", tol: float = 1e-4) -> bool:
        """Same size, and spacing/origin/direction equal within ``tol``."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )
