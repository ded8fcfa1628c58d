"""wldm_auto.networks: WaveletBlock, shared MR/CT WaveletVAE, discriminator; a short real-data fit."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import PHANTOM_DIR

from wldm_auto.models.factory import build_vae
from wldm_auto.networks.blocks import WaveletBlock
from wldm_auto.networks.discriminator import PatchDiscriminator3D
from wldm_auto.networks.vae import DiagonalGaussian, channels_to_space, shortcut_maps, space_to_channels
from wldm_auto.planners.schema import VAEPlan


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("wrm", [True, False])
@pytest.mark.parametrize("size", [(8, 8, 8), (6, 10, 14), (5, 3, 7)])
def test_wavelet_block_shapes(wrm: bool, size: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    block = WaveletBlock(8, 16, group_width=4, wrm=wrm)
    x = torch.randn(2, 8, *size, requires_grad=True)
    y = block(x)
    assert y.shape == (2, 16, *size)
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert WaveletBlock(8, 8, group_width=4, wrm=wrm)(x).shape == (2, 8, *size)


def test_wavelet_block_parameter_counts_comparable() -> None:
    for c_in, c_out, gw in [(8, 16, 4), (32, 32, 8), (64, 64, 8)]:
        wrm, plain = n_params(WaveletBlock(c_in, c_out, gw, True)), n_params(WaveletBlock(c_in, c_out, gw, False))
        assert 0.5 <= wrm / plain <= 2.1, (c_in, c_out, gw, wrm, plain)


def test_wavelet_block_frequency_stream_is_used() -> None:
    torch.manual_seed(0)
    block = WaveletBlock(4, 4, group_width=2)
    x = torch.randn(1, 4, 8, 8, 8)
    before = block(x)
    with torch.no_grad():
        block.high1.weight.add_(1.0)
    assert not torch.allclose(block(x), before)


def test_wavelet_block_bad_groups() -> None:
    with pytest.raises(ValueError, match="group_width"):
        WaveletBlock(9, 9, group_width=2)


def tiny_plan(**kw: object) -> VAEPlan:
    base = {"channels": [8, 16, 32], "latent_channels": 4, "group_width": 4, "downsampling_factor": 4}
    base.update(kw)
    return VAEPlan(**base)  # type: ignore[arg-type]


def test_vae_latent_shape_and_shared_body() -> None:
    torch.manual_seed(0)
    vae = build_vae(mr_channels=2, plan=tiny_plan())
    assert vae.required_divisor == 4
    assert vae.latent_shape((32, 24, 16)) == (4, 8, 6, 4)
    mr, ct = torch.randn(2, 2, 32, 24, 16), torch.randn(2, 1, 32, 24, 16)
    rec_mr, post_mr = vae(mr, "mr")
    rec_ct, post_ct = vae(ct, "ct", sample=False)
    assert isinstance(post_mr, DiagonalGaussian)
    assert post_mr.mean.shape == post_ct.mean.shape == (2, 4, 8, 6, 4)
    assert rec_mr.shape == mr.shape and rec_ct.shape == ct.shape
    assert torch.equal(rec_ct, vae.decode(post_ct.mode(), "ct"))
    # the body is shared: the only modality-specific parameters are stems and heads
    specific = {n for n, _ in vae.named_parameters() if n.startswith(("stems.", "heads."))}
    assert {n.split(".")[1] for n in specific} == {"mr", "ct"}
    assert n_params(vae) - sum(p.numel() for n, p in vae.named_parameters() if n in specific) > 0.9 * n_params(vae)
    # sampling is reproducible with a generator and differs from the mode
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(post_mr.sample(g1), post_mr.sample(g2))
    assert not torch.equal(post_mr.sample(), post_mr.mode())
    assert post_mr.logvar.min() >= -30 and post_mr.logvar.max() <= 20


def test_vae_structure_and_modality_halves() -> None:
    vae = build_vae(1, tiny_plan(latent_channels=6))
    z = torch.arange(6.0).view(1, 6, 1, 1, 1).expand(1, 6, 2, 2, 2)
    assert vae.structure(z)[0, :, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert vae.modality_part(z)[0, :, 0, 0, 0].tolist() == [3.0, 4.0, 5.0]


def test_vae_errors() -> None:
    with pytest.raises(ValueError, match="downsampling_factor=2.*channels=\\[8, 16, 32\\]"):
        build_vae(1, tiny_plan(downsampling_factor=2))
    with pytest.raises(ValueError, match="even"):
        build_vae(1, tiny_plan(latent_channels=5))
    vae = build_vae(1, tiny_plan(channels=[8, 16], downsampling_factor=2))
    with pytest.raises(ValueError, match="divisible"):
        vae(torch.randn(1, 1, 8, 7, 8), "ct")
    with pytest.raises(ValueError, match="divisible"):
        vae.latent_shape((8, 8, 5))
    with pytest.raises(ValueError, match="modality"):
        vae(torch.randn(1, 1, 8, 8, 8), "pet")
    with pytest.raises(ValueError, match="modality"):
        vae.decode(torch.randn(1, 4, 4, 4, 4), "CT")
    with pytest.raises(ValueError, match="mr input"):
        vae(torch.randn(1, 2, 8, 8, 8), "mr")


def test_vae_plain_ablation_runs() -> None:
    vae = build_vae(1, tiny_plan(wrm=False, blocks_per_level=2))
    rec, _ = vae(torch.randn(1, 1, 8, 8, 8), "mr")
    assert rec.shape == (1, 1, 8, 8, 8)


def test_discriminator_patch_map() -> None:
    disc = PatchDiscriminator3D(in_channels=1, channels=8, layers=3)
    assert disc(torch.randn(2, 1, 16, 24, 32)).shape == (2, 1, 2, 3, 4)
    sn = PatchDiscriminator3D(in_channels=2, channels=4, layers=2, spectral_norm=True)
    assert sn(torch.randn(1, 2, 8, 8, 8)).shape == (1, 1, 2, 2, 2)
    with pytest.raises(ValueError):
        disc(torch.randn(1, 1, 4, 16, 16))


def phantom_patches(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` random size^3 crops from the object part of the phantom MR, scaled to [-1, 1]."""
    mr = sitk.GetArrayFromImage(sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz"))).astype(np.float32)
    lo, hi = np.percentile(mr, [0.5, 99.5])
    mr = np.clip((mr - lo) / (hi - lo), 0.0, 1.0) * 2.0 - 1.0
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        z = rng.integers(10, mr.shape[0] - size - 10)
        y, x = rng.integers(60, 196 - size, size=2)
        crops.append(mr[z : z + size, y : y + size, x : x + size])
    return torch.from_numpy(np.stack(crops)[:, None].astype(np.float32))


def test_tiny_vae_learns_phantom_patches() -> None:
    torch.manual_seed(0)
    data = phantom_patches(4, 16, seed=0)
    vae = build_vae(1, VAEPlan(channels=[8, 16], latent_channels=4, group_width=4, downsampling_factor=2))
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)

    def rec_loss() -> float:
        with torch.no_grad():
            rec, _ = vae(data, "mr", sample=False)
            return torch.mean((rec - data) ** 2).item()

    initial = rec_loss()
    for _ in range(60):
        rec, post = vae(data, "mr")
        loss = torch.mean((rec - data) ** 2) + 1e-6 * post.kl()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = rec_loss()
    assert final < 0.5 * initial, (initial, final)


def test_voxel_norm_vae_is_local_group_norm_is_not() -> None:
    """Adding air far away leaves a voxel-normalised VAE's output unchanged there; GroupNorm shifts it everywhere
    (its statistics cover the whole input), which is why a GroupNorm VAE needs inference tiles of its patch size."""
    torch.manual_seed(0)
    volume = torch.rand(1, 1, 16, 32, 64) * 2 - 1
    larger = torch.nn.functional.pad(volume, (0, 64), value=-1.0)  # 64 voxels of air beyond x = 63
    change = {}
    for norm in ("voxel", "group"):
        torch.manual_seed(1)
        vae = build_vae(1, tiny_plan(channels=[8, 16], downsampling_factor=2, normalization=norm)).eval()
        assert vae.local == (norm == "voxel")
        with torch.no_grad():
            alone = vae.decode(vae.encode(volume, "ct").mode(), "ct")
            inside = vae.decode(vae.encode(larger, "ct").mode(), "ct")[..., :64]
        change[norm] = float((alone - inside)[..., :16].abs().max())  # 48+ voxels from the added air
    assert change["voxel"] == 0.0
    assert change["group"] > 0.1


def test_voxel_norm_matches_layer_norm_over_channels() -> None:
    from wldm_auto.networks.blocks import VoxelNorm

    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 4, 5)
    norm = VoxelNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 6))
        norm.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    expected = torch.nn.functional.layer_norm(x.movedim(1, -1), (6,), norm.weight, norm.bias).movedim(-1, 1)
    assert torch.allclose(norm(x), expected, atol=1e-5)


def test_space_to_channels_round_trip_and_layout() -> None:
    x = torch.arange(2 * 1 * 4 * 6 * 8, dtype=torch.float32).reshape(2, 1, 4, 6, 8)
    blocks = space_to_channels(x, 2)
    assert blocks.shape == (2, 8, 2, 3, 4)
    # channel (dz, dy, dx) of latent voxel (i, j, k) is input voxel (2i + dz, 2j + dy, 2k + dx)
    assert blocks[1, 5, 1, 2, 3] == x[1, 0, 2 + 1, 4 + 0, 6 + 1]
    assert torch.equal(channels_to_space(blocks, 2), x)


@pytest.mark.parametrize("n,latent,width", [(8, 8, 8), (8, 8, 1), (8, 8, 2), (64, 8, 8), (8, 16, 8), (24, 16, 8)])
def test_shortcut_maps_average_and_copy(n: int, latent: int, width: int) -> None:
    down, up = shortcut_maps(n, latent, width)
    assert down.shape == (latent, n) and up.shape == (n, latent)
    assert torch.allclose(down.sum(dim=1), torch.ones(latent)) and torch.allclose(up.sum(dim=1), torch.ones(n))
    roundtrip = up @ down  # what encode -> decode keeps of the n values: a projection
    assert torch.allclose(roundtrip @ roundtrip, roundtrip, atol=1e-6)
    assert torch.linalg.matrix_rank(roundtrip) == min(width, n, latent)
    if width == n == latent:
        assert torch.allclose(roundtrip, torch.eye(n))


def test_lossless_shortcut_vae_starts_as_the_identity() -> None:
    """2x downsampling, 8 latent channels, width 8: a fresh VAE reconstructs the CT exactly (learnt paths at 0)
    and the CT latent's mean is the space-to-channel rearrangement of the CT."""
    torch.manual_seed(0)
    vae = build_vae(1, VAEPlan(channels=[8, 16], latent_channels=8, group_width=4, downsampling_factor=2, shortcut=8))
    ct = torch.rand(2, 1, 8, 8, 8) * 2 - 1
    posterior = vae.encode(ct, "ct")
    assert torch.allclose(posterior.mode(), space_to_channels(ct, 2), atol=1e-6)
    assert torch.allclose(vae.decode(posterior.mode(), "ct"), ct, atol=1e-6)
    # the learnt paths still get gradients: training moves them away from 0
    rec, _ = vae(ct, "ct", sample=False)
    (rec - ct + 0.1).square().mean().backward()
    assert vae.heads["ct"].weight.grad.abs().sum() > 0 and vae.to_moments[-1].weight.grad.abs().sum() > 0


def test_mean_shortcut_decodes_the_block_mean() -> None:
    torch.manual_seed(0)
    vae = build_vae(1, VAEPlan(channels=[8, 16], latent_channels=8, group_width=4, downsampling_factor=2, shortcut=1))
    ct = torch.rand(1, 1, 4, 4, 4)
    block_mean = torch.nn.functional.avg_pool3d(ct, 2)
    expected = torch.nn.functional.interpolate(block_mean, scale_factor=2, mode="nearest")
    assert torch.allclose(vae.decode(vae.encode(ct, "ct").mode(), "ct"), expected, atol=1e-6)
    off = build_vae(1, VAEPlan(channels=[8, 16], latent_channels=8, group_width=4, downsampling_factor=2))
    assert not off.shortcut and not hasattr(off, "_down_ct")
