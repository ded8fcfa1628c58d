"""Noise schedule, DDIM/DDPM samplers and whole-latent tiled sampling (CPU, seconds)."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from wldm_auto.diffusion.samplers import DDIMSampler, DDPMSampler, sample
from wldm_auto.diffusion.schedule import NoiseSchedule
from wldm_auto.diffusion.tiled import TiledDenoiser, sample_whole_latent
from wldm_auto.diffusion.tiling import tiles
from wldm_auto.models.factory import build_schedule
from wldm_auto.planners.schema import DiffusionPlan

# ---------------------------------------------------------------- schedule

def test_linear_betas_endpoints_and_monotone_alphas() -> None:
    schedule = NoiseSchedule(1000, "linear", 1e-4, 0.02)
    assert schedule.betas.dtype == torch.float64
    assert schedule.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert schedule.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    abar = schedule.alphas_cumprod
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    assert bool((abar[1:] < abar[:-1]).all())
    assert 0.99 < abar[0].item() < 1.0 and abar[-1].item() < 1e-4


def test_cosine_schedule_in_range() -> None:
    schedule = NoiseSchedule(1000, "cosine")
    assert bool((schedule.betas > 0).all()) and schedule.betas.max().item() <= 0.999
    abar = schedule.alphas_cumprod
    assert bool((abar[1:] < abar[:-1]).all()) and 0.0 <= abar[-1].item() < 1e-3 and abar[0].item() > 0.999


def test_unknown_names_raise() -> None:
    with pytest.raises(ValueError, match="linear, cosine"):
        NoiseSchedule(schedule="quadratic")
    with pytest.raises(ValueError, match="epsilon, v, x0"):
        NoiseSchedule(prediction="sample")


def test_from_plan() -> None:
    plan = DiffusionPlan(timesteps=100, beta_schedule="linear", beta_start=1e-3, beta_end=0.05, prediction="v")
    schedule = build_schedule(plan)
    assert schedule.timesteps == 100 and schedule.prediction == "v"
    assert schedule.betas[-1].item() == pytest.approx(0.05)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_add_noise_split_round_trip(schedule_name: str, prediction: str) -> None:
    schedule = NoiseSchedule(1000, schedule_name, prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 3, 4, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 2, 3, 4, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 998, 999])
    x_t = schedule.add_noise(x0, eps, t)
    x0_pred, eps_pred = schedule.split(x_t, t, schedule.training_target(x0, eps, t))
    assert x0_pred.dtype == torch.float64
    torch.testing.assert_close(x0_pred, x0, atol=1e-10, rtol=0)
    torch.testing.assert_close(eps_pred, eps, atol=1e-10, rtol=0)


def test_add_noise_keeps_dtype() -> None:
    schedule = NoiseSchedule()
    x0 = torch.ones(2, 1, 2, 2, 2)
    out = schedule.add_noise(x0, torch.zeros_like(x0), torch.tensor([0, 999]))
    assert out.dtype == torch.float32
    assert out[0].mean().item() == pytest.approx(math.sqrt(schedule.alphas_cumprod[0].item()), rel=1e-6)


# ---------------------------------------------------------------- samplers

def test_ddim_timesteps() -> None:
    sampler = DDIMSampler(NoiseSchedule(1000), 10)
    assert sampler.timesteps == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert DDIMSampler(NoiseSchedule(20), 20).timesteps == list(range(19, -1, -1))
    assert DDPMSampler(NoiseSchedule(20)).timesteps == list(range(19, -1, -1))
    with pytest.raises(ValueError):
        DDIMSampler(NoiseSchedule(20), 21)


def _toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.3 * x + 1e-3 * t.to(x.dtype).reshape(-1, 1, 1, 1, 1)


def test_ddim_seeded_determinism() -> None:
    sampler = DDIMSampler(NoiseSchedule(100), 10, eta=0.7)
    shape = (2, 1, 4, 4, 4)
    runs = [sample(_toy_model, shape, sampler, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_stochastic_step_needs_noise() -> None:
    schedule = NoiseSchedule(10)
    x = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="noise"):
        DDIMSampler(schedule, 5, eta=1.0).step(x, 9, 7, x)
    with pytest.raises(ValueError, match="noise"):
        DDPMSampler(schedule).step(x, 9, 8, x)
    assert torch.equal(DDIMSampler(schedule, 5, eta=1.0).step(x, 0, -1, x), x)


MU, SIGMA = 1.5, 0.5


def _gaussian_denoiser(schedule: NoiseSchedule):
    """Exact E[eps | x_t] for data N(MU, SIGMA^2)."""
    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1).to(x.dtype)
        return (x - abar.sqrt() * MU) * (1 - abar).sqrt() / (abar * SIGMA ** 2 + 1 - abar)
    return model_fn


def test_samplers_recover_gaussian_with_optimal_denoiser() -> None:
    # T=200 with the DDPM betas rescaled by 1000/200, so that abar_T ~ 5e-5 and x_T ~ N(0, 1)
    schedule = NoiseSchedule(200, "linear", beta_start=5e-4, beta_end=0.1)
    model_fn = _gaussian_denoiser(schedule)
    shape = (4000, 1, 1, 1, 1)
    kwargs = {"dtype": torch.float64}
    ddpm = sample(model_fn, shape, DDPMSampler(schedule), generator=torch.Generator().manual_seed(0), **kwargs)
    ddim1 = sample(model_fn, shape, DDIMSampler(schedule, 200, eta=1.0), generator=torch.Generator().manual_seed(0), **kwargs)
    ddim0 = sample(model_fn, shape, DDIMSampler(schedule, 50, eta=0.0), generator=torch.Generator().manual_seed(1), **kwargs)
    for x in (ddpm, ddim1, ddim0):
        assert x.mean().item() == pytest.approx(MU, abs=0.05)
        assert x.std().item() == pytest.approx(SIGMA, abs=0.05)
    # DDIM with eta=1 over all T steps is the DDPM update: same noise, same samples
    torch.testing.assert_close(ddim1, ddpm, atol=1e-8, rtol=0)
    other_seed = sample(model_fn, shape, DDPMSampler(schedule), generator=torch.Generator().manual_seed(5), **kwargs)
    assert other_seed.mean().item() == pytest.approx(ddpm.mean().item(), abs=0.05)
    assert other_seed.std().item() == pytest.approx(ddpm.std().item(), abs=0.05)


# ---------------------------------------------------------------- tiled

class _TinyNet(torch.nn.Module):
    """Conv over [x, cond] plus a timestep term: a stand-in for the U-Net."""

    def __init__(self, channels: int = 2, cond_channels: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(channels + cond_channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x, cond], 1)) + 1e-3 * t.float().reshape(-1, 1, 1, 1, 1)


def test_tiled_single_tile_equals_direct() -> None:
    net = _TinyNet()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 8, 12, 8, generator=g)
    cond = torch.randn(2, 2, 8, 12, 8, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        tiled = TiledDenoiser(net, cond, (8, 16, 16))(x, t)
        one_per_call = TiledDenoiser(net, cond, (8, 16, 16), batch_size=1)(x, t)
        direct = net(x, t, cond)
    assert torch.equal(tiled, direct)
    # one sample per call: only the convolution's batch-size-dependent rounding differs
    torch.testing.assert_close(one_per_call, direct, atol=1e-6, rtol=0)


def test_tiled_pointwise_many_tiles_and_divisor_padding() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 13, 21, 6, generator=g)
    cond = torch.randn(1, 2, 13, 21, 6, generator=g)
    calls: list[tuple[int, ...]] = []

    def model_fn(xt: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        assert all(s % 4 == 0 for s in xt.shape[-3:])
        calls.append(tuple(xt.shape))
        return 2 * xt + c

    denoiser = TiledDenoiser(model_fn, cond, (8, 8, 8), overlap=0.5, batch_size=5, divisor=4)
    out = denoiser(x, torch.tensor([1, 2, 3]))
    torch.testing.assert_close(out, 2 * x + cond, atol=1e-5, rtol=0)
    layout = denoiser.layout(x.shape[-3:], x.device)
    assert layout.tile == (8, 8, 8) and layout.padded == (13, 21, 8) and len(layout.slices) > 10
    assert sum(c[0] for c in calls) == 3 * len(layout.slices) and max(c[0] for c in calls) == 5


def test_tiled_batching_does_not_change_result() -> None:
    net = _TinyNet()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 12, 20, 16, generator=g)
    cond = torch.randn(1, 2, 12, 20, 16, generator=g)
    t = torch.tensor([3, 7])
    with torch.no_grad():
        one = TiledDenoiser(net, cond, (8, 8, 8), batch_size=1)(x, t)
        many = TiledDenoiser(net, cond, (8, 8, 8), batch_size=7)(x, t)
    torch.testing.assert_close(one, many, atol=1e-6, rtol=0)


def _neighbour_diffs(volume: torch.Tensor, borders: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """|v[i+1] - v[i]| along the last axis, split into pairs straddling a tile border and the rest."""
    diffs = (volume[..., 1:] - volume[..., :-1]).abs()
    at_border = torch.tensor([i + 1 in borders for i in range(diffs.shape[-1])])
    return diffs[..., at_border], diffs[..., ~at_border]


@pytest.mark.parametrize("margin", [None, 2])
def test_tiled_blending_has_no_seams(margin: int | None) -> None:
    # overlap 0.25 (or balanced tiles overlapping by 2 voxels): tile borders and the crossings between tile
    # centres differ
    shape, tile, overlap = (12, 12, 40), (8, 8, 8), 0.25
    g = torch.Generator().manual_seed(3)
    offsets: list[float] = []

    def model_fn(xt: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        offset = torch.randn(xt.shape[0], 1, 1, 1, 1, generator=g)
        offsets.extend(offset.flatten().tolist())
        return xt + offset

    x = torch.full((1, 1, *shape), 0.25)
    denoiser = TiledDenoiser(model_fn, None, tile, overlap=overlap, batch_size=1, margin=margin)
    out = denoiser(x, torch.tensor([0]))
    slices = denoiser.layout(shape, x.device).slices
    assert slices == tiles(shape, tile, overlap) if margin is None else len(slices) > 3
    borders = ({s[2].start for s in slices} | {s[2].stop for s in slices}) - {0, shape[2]}
    # every row along the last axis, the volume's faces (where all tiles have low weight) included
    border, interior = _neighbour_diffs(out, borders)
    assert border.pow(2).mean() <= interior.pow(2).mean()
    assert border.max() <= interior.max()
    # the same measure on hard-stitched tiles (last tile wins) does see the seams
    stitched = x.clone()
    for s, offset in zip(slices, offsets):
        stitched[(0, 0, *s)] = 0.25 + offset
    border, interior = _neighbour_diffs(stitched, borders)
    assert border.pow(2).mean() > interior.pow(2).mean()


def test_tiled_margin_takes_the_fewest_tiles_and_stays_exact() -> None:
    """``margin``: the fewest tiles of at most ``tile`` overlapping by >= margin (less the divisor), fewer
    voxels per step than tiles of half the size at overlap 0.25, and a pointwise model is reproduced exactly."""
    g = torch.Generator().manual_seed(6)
    shape = (113, 45, 63)  # the whole-body latent of bench/sampler.py (250 x 180 x 450 at 2 mm, factor 4)
    x = torch.randn(1, 2, *shape, generator=g)
    cond = torch.randn(1, 2, *shape, generator=g)

    def model_fn(xt: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return 2 * xt + c

    denoiser = TiledDenoiser(model_fn, cond, (64, 64, 64), batch_size=2, divisor=4, margin=8)
    torch.testing.assert_close(denoiser(x, torch.tensor([5])), 2 * x + cond, atol=1e-5, rtol=0)
    layout = denoiser.layout(shape, x.device)
    assert all(t <= 64 and t % 4 == 0 for t in layout.tile)
    for axis in range(3):
        starts = sorted({s[axis].start for s in layout.slices})
        assert all(layout.tile[axis] - (b - a) >= 8 - 4 for a, b in zip(starts, starts[1:]))
    fraction = TiledDenoiser(model_fn, cond, (32, 32, 32), overlap=0.25, divisor=4).layout(shape, x.device)
    voxels = [len(lay.slices) * math.prod(lay.tile) for lay in (layout, fraction)]
    assert len(layout.slices) == 2 and voxels[0] <= 0.4 * voxels[1]
    with pytest.raises(ValueError, match="margin"):
        TiledDenoiser(model_fn, cond, (8, 8, 8), margin=-1)


def test_sample_whole_latent_one_tile_equals_sample() -> None:
    net = _TinyNet()
    cond = torch.randn(1, 2, 8, 8, 8, generator=torch.Generator().manual_seed(4))
    sampler = DDIMSampler(NoiseSchedule(100), 5, eta=0.5)
    whole = sample_whole_latent(net, cond, 2, sampler, tile=(8, 8, 8), generator=torch.Generator().manual_seed(9),
                                num_samples=2)
    direct = sample(lambda x, t: net(x, t, cond.expand(2, -1, -1, -1, -1)), (2, 2, 8, 8, 8), sampler,
                    generator=torch.Generator().manual_seed(9))
    assert whole.shape == (2, 2, 8, 8, 8)
    torch.testing.assert_close(whole, direct, atol=1e-6, rtol=0)
    assert not torch.allclose(whole[0], whole[1])


def test_sample_whole_latent_many_tiles_runs() -> None:
    net = _TinyNet()
    cond = torch.randn(1, 2, 12, 16, 20, generator=torch.Generator().manual_seed(5))
    sampler = DDIMSampler(NoiseSchedule(100), 4)
    runs = [sample_whole_latent(net, cond, 2, sampler, tile=(8, 8, 8), generator=torch.Generator().manual_seed(1))
            for _ in range(2)]
    assert runs[0].shape == (1, 2, 12, 16, 20) and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_min_snr_weight_hand_values(prediction: str) -> None:
    schedule = NoiseSchedule(1000, "linear", 1e-4, 0.02, prediction)
    t = torch.tensor([0, 300, 999])
    abar = schedule.alphas_cumprod[t]
    snr = abar / (1 - abar)
    capped = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64))
    expected = {"epsilon": capped / snr, "x0": capped, "v": capped / (snr + 1)}[prediction]
    assert torch.allclose(schedule.min_snr_weight(t, 5.0), expected.float())
    assert torch.equal(schedule.min_snr_weight(t, 0.0), torch.ones(3))
    # low noise (huge SNR) is capped: every type weighs step 0 like an x0 loss of weight 5
    x0_weight = {"epsilon": snr[0], "x0": 1.0, "v": snr[0] + 1}[prediction]
    assert float(schedule.min_snr_weight(t, 5.0)[0] * x0_weight) == pytest.approx(5.0, rel=1e-5)


def test_sample_timesteps_uniform_and_biased_to_high_noise() -> None:
    schedule = NoiseSchedule(timesteps=1000)
    torch.manual_seed(0)
    uniform = schedule.sample_timesteps(200_000, "cpu")
    torch.manual_seed(0)
    assert torch.equal(uniform, torch.randint(0, 1000, (200_000,)))  # power 1: the draws training always made
    biased = schedule.sample_timesteps(200_000, "cpu", power=2.0)
    assert biased.dtype == torch.long and int(biased.min()) >= 0 and int(biased.max()) <= 999
    # share of t >= T/2 is 0.5 ** (1 / p): 0.5 uniform, 0.707 at p = 2
    assert float((uniform >= 500).float().mean()) == pytest.approx(0.5, abs=0.005)
    assert float((biased >= 500).float().mean()) == pytest.approx(0.5 ** 0.5, abs=0.005)
    assert float((biased == 999).float().mean()) == pytest.approx(1e-3 ** 0.5, abs=0.003)  # u ** 2 < 1e-3


def test_ablation_diffusion_trainers_pick_their_first_stage() -> None:
    """The paper's ablation rows as registered trainers: each diffusion variant names the VAE it stands on."""
    from wldm_auto.trainers.registry import trainer_class

    expected = {"DiffusionTrainer": "VAETrainer", "DiffusionTrainer_noDSCA": "VAETrainer",
                "DiffusionTrainer_noDSCA_noSMD": "VAETrainer_noSMD",
                "DiffusionTrainer_noDSCA_noSMD_noWRM": "VAETrainer_noWRM_noSMD"}
    for name, vae in expected.items():
        cls = trainer_class(name)
        assert cls.vae_trainer == vae and cls.stage == "diffusion"
        assert trainer_class(vae).stage == "vae"


@pytest.mark.parametrize("shape", [(450, 250, 250), (436, 224, 200), (100, 96, 96), (260, 300, 40), (257, 513, 64)])
def test_balanced_tiles_cover_with_the_margin_and_compute_less(shape) -> None:
    """Fewest tiles of at most 256 covering every voxel, neighbours overlapping by >= the margin (less the
    alignment), and fewer voxels computed than 256-voxel tiles at overlap 0.5."""
    from wldm_auto.diffusion.tiling import balanced_tiles, tiles

    shape = tuple(-(-n // 4) * 4 for n in shape)  # sliding_window pads to the alignment first
    tile, overlap = balanced_tiles(shape, [256] * 3, 64, 4)
    assert all(t <= 256 and t % 4 == 0 for t in tile)
    slices = tiles(shape, tile, overlap, 4)
    covered = np.zeros(shape, bool)
    for s in slices:
        covered[s] = True
    assert covered.all()
    for axis in range(3):
        starts = sorted({s[axis].start for s in slices})
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert all(tile[axis] - g >= 64 - 4 for g in gaps), (axis, starts, tile)
    computed = sum(int(np.prod([x.stop - x.start for x in s])) for s in slices)
    old = sum(int(np.prod([x.stop - x.start for x in s])) for s in tiles(shape, [256] * 3, 0.5, 4))
    assert computed <= old


def test_first_stage_layout_respects_the_element_budget() -> None:
    """A local VAE's tiles shrink until one first-level activation fits TILE_ELEMENTS; batches too."""
    from wldm_auto.models import latent
    from wldm_auto.models.factory import build_vae
    from wldm_auto.planners.schema import VAEPlan

    plan = VAEPlan()
    plan.channels, plan.latent_channels, plan.downsampling_factor = [64, 128], 8, 2
    vae = build_vae(1, plan)
    assert vae.local
    synthesizer = latent.LatentSynthesizer(vae, torch.nn.Identity(), None, 1.0, [64, 64, 64], image_tile_scale=4)
    tile, overlap, batch = synthesizer.first_stage_layout([450, 250, 250])
    assert np.prod(tile) * 64 <= latent.TILE_ELEMENTS and batch == 1 and all(t % 2 == 0 for t in tile)
    small, _, batch_small = synthesizer.first_stage_layout([64, 64, 64])
    assert small == [64, 64, 64] and batch_small == min(synthesizer.batch_size, latent.TILE_ELEMENTS // (64 ** 3 * 64))


def test_latent_tiles_respect_the_element_budget() -> None:
    """Sampling tiles of a wide U-Net shrink until one first-level activation fits TILE_ELEMENTS; batches too."""
    from types import SimpleNamespace

    from wldm_auto.models import latent

    vae = SimpleNamespace(required_divisor=4)
    narrow = latent.LatentSynthesizer(vae, SimpleNamespace(channels=[16], required_divisor=4), None, 1.0,
                                      [64, 64, 64], latent_tile_scale=4)
    tile = narrow.latent_tile([113, 45, 63])
    assert tile == [64, 48, 64] and narrow.latent_batch(tile) == narrow.batch_size
    wide = latent.LatentSynthesizer(vae, SimpleNamespace(channels=[2048], required_divisor=4), None, 1.0,
                                    [64, 64, 64], latent_tile_scale=4)
    tile = wide.latent_tile([113, 45, 63])
    assert math.prod(tile) * 2048 <= latent.TILE_ELEMENTS and all(t % 4 == 0 for t in tile)
    assert wide.latent_batch(tile) == 1


def test_default_latent_tiles_are_the_training_patch_latent() -> None:
    """The plan's default sampling tiles are the patch's latent (the size the GroupNorm U-Nets were trained on),
    and overlap 0 tiles a whole-body latent with the fewest such tiles."""
    from types import SimpleNamespace

    from wldm_auto.diffusion.tiled import TiledDenoiser
    from wldm_auto.models import latent
    from wldm_auto.planners.schema import InferencePlan

    plan = InferencePlan()
    assert (plan.latent_tile_scale, plan.latent_overlap, plan.latent_margin) == (1, 0.25, 0)
    vae = SimpleNamespace(required_divisor=4)
    synthesizer = latent.LatentSynthesizer(vae, SimpleNamespace(channels=[16], required_divisor=4), None, 1.0,
                                           [64, 64, 64])  # the dataclass defaults must be the plan's
    assert (synthesizer.latent_tile_scale, synthesizer.latent_overlap) == (plan.latent_tile_scale,
                                                                           plan.latent_overlap)
    tile = synthesizer.latent_tile([113, 45, 63])  # a 250 x 180 x 450 MR at 2 mm, VAE factor 4
    assert tile == [16, 16, 16]
    fast = TiledDenoiser(lambda x, t, c: x, None, tile, overlap=0.0, divisor=4)
    default = TiledDenoiser(lambda x, t, c: x, None, tile, overlap=plan.latent_overlap, divisor=4)
    assert len(fast.layout([113, 45, 63], torch.device("cpu")).slices) == 8 * 3 * 4
    assert len(default.layout([113, 45, 63], torch.device("cpu")).slices) == 10 * 4 * 5


def test_latent_valid_keeps_latent_voxels_with_any_real_voxel() -> None:
    """An odd-sized axis: the last latent voxel holds one real and one padded slice and must be in the loss."""
    from wldm_auto.trainers.diffusion_trainer import latent_valid

    valid = torch.zeros(1, 1, 6, 4, 4)
    valid[:, :, :5] = 1  # 5 real slices, 1 padded
    mask = latent_valid(valid, 2)
    assert mask.shape == (1, 1, 3, 2, 2)
    assert mask[0, 0, 2].eq(1).all()  # slices 4 (real) and 5 (padded)
    valid[:, :, 4:] = 0  # the last latent slice all padding: left out
    mask = latent_valid(valid, 2)
    assert mask[0, 0, 2].eq(0).all() and mask[0, 0, :2].eq(1).all()
    valid = torch.zeros(1, 1, 2, 2, 2)
    valid[0, 0, 0, 0, 0] = 1  # one real voxel of 8 is enough
    assert latent_valid(valid, 2).item() == 1.0


def test_latent_scale_is_measured_on_valid_latents_only() -> None:
    """Padding (a case thinner than the patch) and invalid CT must not enter the latent shift and scale: with a
    stand-in first stage whose padding latents are extreme, the scale is 1 / std of the real latents alone."""
    from types import SimpleNamespace

    from wldm_auto.trainers.diffusion_trainer import DiffusionTrainer, joined_valid_latents, valid_latents

    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ct = torch.randn(2, 1, 8, 4, 4, generator=generator) * 0.2 + 0.3
        valid = torch.ones(2, 1, 8, 4, 4)
        valid[0, :, 6:] = 0  # a thin case: its last 2 slices (1 latent slice) are padding
        ct[0, :, 6:] = -50.0  # encoded far from the real latents
        batches.append({"ct": ct, "valid": valid})

    class Posterior(SimpleNamespace):
        def mode(self) -> torch.Tensor:
            return self.z

    vae = SimpleNamespace(required_divisor=2,
                          encode=lambda x, name: Posterior(z=torch.nn.functional.avg_pool3d(x, 2).repeat(1, 2, 1, 1, 1)))
    trainer = object.__new__(DiffusionTrainer)
    trainer.vae, trainer.device = vae, torch.device("cpu")
    trainer.config = SimpleNamespace(diffusion=SimpleNamespace(center_latents=True))
    trainer.latent_shift = torch.zeros(2)
    trainer.batches = lambda start, end: batches[start:end]
    trainer._measure_latent_scale()
    real = torch.cat([valid_latents(vae.encode(b["ct"], "ct").mode(), b["valid"], 2) for b in batches], dim=1)
    assert real.shape == (2, 3 * (2 * 4 * 2 * 2 - 2 * 2)), real.shape  # per batch 32 latent voxels, 4 padded
    assert real.min() > -5  # no padding latent kept
    assert float(trainer.latent_scale) == pytest.approx(1.0 / float((real - real.mean(1, keepdim=True)).std()), rel=1e-5)
    assert trainer.latent_shift.tolist() == pytest.approx(real.mean(1).tolist(), rel=1e-5)
    assert 0.2 < trainer.latent_shift[0] < 0.4  # the padding would have pulled it to about -6
    # the residual trainer's scale shares the check: no valid latent is an error, not a NaN scale
    with pytest.raises(ValueError, match="no valid CT voxel"):
        joined_valid_latents([valid_latents(torch.ones(1, 2, 2, 2, 2), torch.zeros(1, 1, 4, 4, 4), 2)])


def test_pad_to_multiple_repeats_the_last_slice() -> None:
    from wldm_auto.models.tiling import pad_to_multiple

    volume = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    padded = pad_to_multiple(volume, 2)
    assert padded.shape == (2, 4, 4, 6)
    assert torch.equal(padded[:, :3, :, :5], volume)
    assert torch.equal(padded[:, 3, :, :5], volume[:, 2])  # the last z slice repeated, not air
    assert torch.equal(padded[:, :3, :, 5], volume[:, :, :, 4])
    assert torch.equal(pad_to_multiple(volume[:, :2, :4, :4], 2), volume[:, :2, :4, :4])


def test_encoding_an_odd_axis_puts_no_air_into_the_last_latent_voxel() -> None:
    """The first stage sees odd axes edge-padded: on the Haar first stage the last latent slice of an 11-slice
    volume has no detail across its last image slice pair (a slice and its copy), as it would with air."""
    from wldm_auto.models.latent import LatentSynthesizer
    from wldm_auto.networks.haar import HaarFirstStage, haar_encode

    torch.manual_seed(0)
    volume = torch.rand(1, 11, 6, 7) * 0.5  # tissue-like values, far from the air padding (-1)
    synthesizer = LatentSynthesizer(HaarFirstStage(1), torch.nn.Identity(), None, 1.0, [8, 8, 8])
    z = synthesizer.encode(volume, "mr")
    edge = torch.nn.functional.pad(volume[None], [0, 1, 0, 0, 0, 1], mode="replicate")
    air = torch.nn.functional.pad(volume[None], [0, 1, 0, 0, 0, 1], value=-1.0)
    assert z.shape == (8, 6, 3, 4)
    assert torch.allclose(z, haar_encode(edge)[0], atol=1e-6)
    assert not torch.allclose(z[:, -1], haar_encode(air)[0, :, -1], atol=0.1)
    # lossless round trip, cropped back to the input's shape
    assert torch.allclose(synthesizer.decode_ct(synthesizer.encode(volume, "ct"), volume.shape[-3:]), volume[0],
                          atol=1e-5)
