"""Hounsfield-unit constants every stage shares (one place, so stages cannot disagree)."""
from __future__ import annotations

AIR_HU = -1024  # air: outside the body in every sCT we write, and padding of CT grids
SYNTHRAD_RANGE_HU = (-1024.0, 3000.0)  # SynthRAD's clip for PSNR (data range 4024 HU)
BODY_THRESHOLD_HU = -500.0  # CT voxels above this are object/body (default evaluation mask, CT statistics)
BONE_THRESHOLD_HU = 250.0  # CT voxels above this are bone (bone Dice)
