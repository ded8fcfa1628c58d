"""wldm_auto.networks.wavelets: 3D Haar DWT against PyWavelets, exact inverse, gradients."""
from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch

from wldm_auto.networks.wavelets import (
    DWT3d,
    IDWT3d,
    dwt3d,
    idwt3d,
    merge_low_high,
    split_low_high,
)

KEYS = ["aaa", "aad", "ada", "add", "daa", "dad", "dda", "ddd"]
SHAPES = [(2, 2, 2), (2, 4, 6), (10, 2, 8), (12, 6, 4), (4, 8, 8)]


@pytest.mark.parametrize("shape", SHAPES)
def test_dwt_matches_pywt(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((2, 3, *shape))
    bands = dwt3d(torch.from_numpy(x))
    assert bands.shape == (2, 8, 3, *(s // 2 for s in shape))
    ref = pywt.dwtn(x, "haar", axes=(2, 3, 4))
    assert list(ref) == KEYS
    for k, key in enumerate(KEYS):
        np.testing.assert_allclose(bands[:, k].numpy(), ref[key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_inverse_is_exact(shape: tuple[int, int, int]) -> None:
    gen = torch.Generator().manual_seed(1)
    x64 = torch.randn(2, 3, *shape, generator=gen, dtype=torch.float64)
    assert torch.allclose(idwt3d(dwt3d(x64)), x64, rtol=0, atol=1e-12)
    x32 = x64.float()
    assert torch.allclose(IDWT3d()(DWT3d()(x32)), x32, rtol=0, atol=1e-5)


def test_bfloat16_keeps_dtype() -> None:
    x = torch.randn(1, 2, 4, 4, 4).to(torch.bfloat16)
    bands = dwt3d(x)
    assert bands.dtype == torch.bfloat16
    assert torch.allclose(idwt3d(bands).float(), x.float(), atol=0.05)


def test_energy_preserved_and_constant_has_no_detail() -> None:
    x = torch.randn(1, 1, 6, 4, 8, dtype=torch.float64)
    assert torch.isclose(dwt3d(x).pow(2).sum(), x.pow(2).sum())
    bands = dwt3d(torch.full((1, 1, 4, 4, 4), 2.0, dtype=torch.float64))
    assert torch.allclose(bands[:, 1:], torch.zeros_like(bands[:, 1:]))
    assert torch.allclose(bands[:, 0], torch.full_like(bands[:, 0], 2.0 * 2.0**1.5))


def test_gradcheck() -> None:
    x = torch.randn(1, 2, 2, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dwt3d, (x,))
    b = torch.randn(1, 8, 1, 1, 2, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(idwt3d, (b,))


@pytest.mark.parametrize("shape,axis", [((3, 4, 4), "D"), ((4, 5, 4), "H"), ((4, 4, 7), "W")])
def test_odd_size_raises(shape: tuple[int, int, int], axis: str) -> None:
    with pytest.raises(ValueError, match=f"axis {axis}"):
        dwt3d(torch.zeros(1, 1, *shape))


def test_split_merge_roundtrip() -> None:
    bands = dwt3d(torch.randn(2, 3, 4, 6, 2))
    low, high = split_low_high(bands)
    assert low.shape == (2, 3, 2, 3, 1) and high.shape == (2, 21, 2, 3, 1)
    assert torch.equal(high[:, 3:6], bands[:, 2])  # band-major packing
    assert torch.equal(merge_low_high(low, high), bands)
    with pytest.raises(ValueError):
        merge_low_high(low, high[:, :20])


def test_idwt3d_low_high_equals_the_composed_inverse_bit_for_bit() -> None:
    from wldm_auto.networks.wavelets import idwt3d_low_high, merge_low_high

    g = torch.Generator().manual_seed(7)
    low, high = torch.randn(2, 3, 4, 5, 6, generator=g), torch.randn(2, 21, 4, 5, 6, generator=g)
    assert torch.equal(idwt3d_low_high(low, high), idwt3d(merge_low_high(low, high)))
    with pytest.raises(ValueError, match="7\\*C"):
        idwt3d_low_high(low, high[:, :20])


@pytest.mark.parametrize("in_ch, out_ch, norm", [(8, 8, "voxel"), (8, 16, "voxel"), (8, 8, "group")])
def test_wavelet_block_inference_path_matches_training_path(in_ch: int, out_ch: int, norm: str) -> None:
    """Under no_grad the block accumulates in place and runs 1x1x1 convs as matrix products (less memory on
    large tiles): the same values as the autograd path, up to float rounding; VoxelNorm bit for bit."""
    from wldm_auto.networks.blocks import PointwiseConv3d, VoxelNorm, WaveletBlock

    torch.manual_seed(3)
    block = WaveletBlock(in_ch, out_ch, 4, True, norm).eval()
    for module in block.modules():  # non-trivial norm affine parameters
        if isinstance(module, VoxelNorm):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, in_ch, 12, 10, 9)
    with torch.enable_grad():
        reference = block(x)
        norm_reference = VoxelNorm(in_ch)(x)
    with torch.no_grad():
        fast = block(x)
        norm_fast = VoxelNorm(in_ch)(x)
    torch.testing.assert_close(fast, reference.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(norm_fast, norm_reference.detach())
    assert any(isinstance(m, PointwiseConv3d) for m in block.modules())
    conv = PointwiseConv3d(in_ch, out_ch)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), torch.nn.functional.conv3d(x, conv.weight, conv.bias), atol=1e-6, rtol=1e-6)
