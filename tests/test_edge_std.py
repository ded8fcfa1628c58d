"""The std map's edge term (``inference/edges.py``, plan ``inference.edge_std_mm``)."""
from __future__ import annotations

import numpy as np
import pytest

from wldm_auto.inference.edges import edge_std


def test_a_ramp_gives_edge_mm_times_its_slope_whatever_the_spacing():
    # 40 HU per voxel along x at 2.5 mm: 16 HU/mm; along z at 4 mm: 10 HU/mm
    z, y, x = np.meshgrid(np.arange(12), np.arange(10), np.arange(14), indexing="ij")
    along_x = edge_std((40.0 * x).astype(np.float32), (2.5, 1.0, 4.0), 3.0)
    np.testing.assert_allclose(along_x, 3.0 * 16.0, rtol=1e-5)
    along_z = edge_std((40.0 * z).astype(np.float32), (2.5, 1.0, 4.0), 3.0)
    np.testing.assert_allclose(along_z, 3.0 * 10.0, rtol=1e-5)
    assert along_x.dtype == np.float32 and along_x.shape == x.shape


def test_a_step_is_flagged_along_its_edge_only():
    volume = np.zeros((8, 8, 30), dtype=np.float32)
    volume[..., 15:] = 1000.0  # soft tissue next to bone-like HU
    std = edge_std(volume, (1.0, 1.0, 1.0), 2.0)
    profile = std[4, 4]
    assert profile.argmax() in (14, 15) and profile.max() > 100  # at the edge
    assert profile[:5].max() < 1e-3 * profile.max() and profile[-5:].max() < 1e-3 * profile.max()  # far from it
    assert np.all(np.diff(profile[:15]) >= -1e-4) and np.all(np.diff(profile[15:]) <= 1e-4)  # falls away from it
    np.testing.assert_array_equal(edge_std(volume, (1.0, 1.0, 1.0), 0.0), 0.0)


def test_edge_mm_is_checked():
    with pytest.raises(ValueError, match="edge_mm"):
        edge_std(np.zeros((4, 4, 4), np.float32), (1, 1, 1), -1.0)
