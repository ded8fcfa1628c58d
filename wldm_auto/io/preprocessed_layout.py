"""The preprocessed dataset layout (DESIGN.md section 3): one set of arrays per case.

    <preprocessed>/DatasetXXX_Name/<plans>_<configuration>/CASE_mr.npy      (C, z, y, x) float32 in [-1, 1]
    .../CASE_ct.npy      (1, z, y, x) float32 in [-1, 1]
    .../CASE_masks.npy   (2, z, y, x): [0] valid (real CT behind the voxel), [1] body

Preprocessing writes them, training reads them: both take the file names from here.
"""
from __future__ import annotations

ARRAYS: dict[str, str] = {"mr": "_mr.npy", "ct": "_ct.npy", "masks": "_masks.npy"}  # array name -> file suffix
