"""wldm_auto.networks.diffusion_unet / attention: latent U-Net with DSCA skips (tiny CPU configurations)."""
from __future__ import annotations

import math

import pytest
import torch

from wldm_auto.networks.attention import DSCA, KVPool, pooled_grid
from wldm_auto.networks.diffusion_unet import DiffusionUNet, timestep_embedding


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_unet(channels: list[int], latent: int = 4, dsca: bool = True, **kwargs: int) -> DiffusionUNet:
    return DiffusionUNet(latent, channels, dsca=dsca, blocks_per_level=1, **kwargs)


def open_gates(net: DiffusionUNet) -> None:
    """All DSCA gates to 1."""
    with torch.no_grad():
        for module in net.dsca.values():
            module.gamma_s.fill_(1.0)
            module.gamma_m.fill_(1.0)


@pytest.mark.parametrize(
    ("shape", "channels"), [((2, 4, 8, 12, 16), [16, 32]), ((1, 8, 16, 16, 8), [16, 32, 64])]
)
@pytest.mark.parametrize("dsca", [True, False])
def test_output_shape(shape: tuple[int, ...], channels: list[int], dsca: bool) -> None:
    torch.manual_seed(0)
    net = tiny_unet(channels, latent=shape[1], dsca=dsca)
    x, z = torch.randn(shape), torch.randn(shape)
    y = net(x, torch.randint(0, 1000, (shape[0],)), z)
    assert y.shape == x.shape
    assert torch.count_nonzero(y) == 0  # zero-initialised head
    assert net(x, torch.rand(shape[0]) * 999.0, z).shape == x.shape  # float timesteps
    assert net(x, 3, z).shape == x.shape  # scalar timestep broadcast


def test_invalid_inputs_raise() -> None:
    net = tiny_unet([16, 32, 64])
    assert net.required_divisor == 4
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 4, 8, 6, 8), torch.tensor([1]), torch.randn(1, 4, 8, 6, 8))
    with pytest.raises(ValueError, match="z_mr"):
        net(torch.randn(1, 4, 8, 8, 8), torch.tensor([1]), torch.randn(1, 4, 8, 8, 4))
    with pytest.raises(ValueError, match="t must"):
        net(torch.randn(2, 4, 8, 8, 8), torch.tensor([1, 2, 3]), torch.randn(2, 4, 8, 8, 8))
    with pytest.raises(ValueError, match="even"):
        DiffusionUNet(3, [16, 32])
    with pytest.raises(ValueError, match="heads"):
        tiny_unet([16, 32], heads=3)


def test_ablation_has_no_attention_parameters() -> None:
    with_dsca, plain = tiny_unet([16, 32, 64, 64]), tiny_unet([16, 32, 64, 64], dsca=False)
    assert n_params(plain) < n_params(with_dsca)
    assert not any("dsca" in name or "gamma" in name for name, _ in plain.named_parameters())
    assert sorted(with_dsca.dsca.keys()) == ["0", "1", "2"]  # the three finest of four scales
    assert sorted(tiny_unet([16, 32]).dsca.keys()) == ["0", "1"]


def test_dsca_identity_at_init_then_both_halves_matter() -> None:
    torch.manual_seed(0)
    dsca = DSCA(16, 2, 2, heads=4)
    e, s, m = torch.randn(2, 16, 6, 8, 4), torch.randn(2, 2, 3, 4, 2), torch.randn(2, 2, 3, 4, 2)
    assert torch.equal(dsca(e, s, m), e)  # gates at 0: branches added with zero weight
    assert dsca.sem(e, s).abs().sum() > 0 and dsca.mfm(e, m).abs().sum() > 0  # ...though not zero themselves
    with torch.no_grad():
        dsca.gamma_s.fill_(1.0)
        dsca.gamma_m.fill_(1.0)
    out = dsca(e, s, m)
    torch.testing.assert_close(out, e + dsca.sem(e, s) + dsca.mfm(e, m))
    assert (dsca(e, s + torch.randn_like(s), m) - out).abs().max() > 1e-4  # structure half used
    assert (dsca(e, s, m + torch.randn_like(m)) - out).abs().max() > 1e-4  # modality half used


@pytest.mark.parametrize("half", ["structure", "modality"])
def test_both_latent_halves_reach_output_through_dsca(half: str) -> None:
    """The output change caused by perturbing one half of z_mr differs once the gates open."""
    torch.manual_seed(0)
    net = tiny_unet([16, 32]).eval()
    with torch.no_grad():
        torch.nn.init.normal_(net.out.weight, std=0.1)  # a non-zero head, so the body reaches the output
    x, z, t = torch.randn(1, 4, 8, 8, 8), torch.randn(1, 4, 8, 8, 8), torch.tensor([10])
    z2 = z.clone()
    sl = slice(0, 2) if half == "structure" else slice(2, 4)
    z2[:, sl] += torch.randn_like(z2[:, sl])
    with torch.no_grad():
        delta_closed = net(x, t, z2) - net(x, t, z)
        open_gates(net)
        delta_open = net(x, t, z2) - net(x, t, z)
    assert (delta_open - delta_closed).abs().max() > 1e-4


def test_kv_tokens_are_bounded() -> None:
    torch.manual_seed(0)
    for size in [(16, 16, 16), (8, 12, 16), (1, 300, 200), (2, 64, 64), (3, 5, 7)]:
        grid = pooled_grid(size, 64)
        assert math.prod(grid) <= 64 and all(1 <= g <= s for g, s in zip(grid, size))
    assert pooled_grid((4, 4, 4), 512) == (4, 4, 4)
    assert pooled_grid((16, 16, 16), 512) == (8, 8, 8)

    net = tiny_unet([16, 32], max_kv_tokens=27)
    grids: list[tuple[int, ...]] = []
    for module in net.modules():
        if isinstance(module, KVPool):
            module.register_forward_hook(lambda mod, inp, out: grids.append(tuple(out.shape)))
    with torch.no_grad():
        net(torch.randn(1, 4, 16, 8, 12), torch.tensor([5]), torch.randn(1, 4, 16, 8, 12))
    assert len(grids) == 4  # SEM + MFM at both scales
    assert all(g[1] == 2 and math.prod(g[2:]) <= 27 for g in grids), grids


def test_query_chunking_matches_unchunked() -> None:
    torch.manual_seed(0)
    full = DSCA(16, 2, 2, heads=4, max_kv_tokens=64)
    chunked = DSCA(16, 2, 2, heads=4, max_kv_tokens=64, max_query_tokens=100)
    with torch.no_grad():
        full.gamma_s.fill_(1.0)
        full.gamma_m.fill_(1.0)
    chunked.load_state_dict(full.state_dict())
    e, s, m = torch.randn(2, 16, 8, 10, 6), torch.randn(2, 2, 4, 5, 3), torch.randn(2, 2, 4, 5, 3)
    with torch.no_grad():
        torch.testing.assert_close(chunked(e, s, m), full(e, s, m), atol=1e-5, rtol=1e-5)


def test_timestep_embedding() -> None:
    emb = timestep_embedding(torch.tensor([0, 10, 999]), 17)
    assert emb.shape == (3, 17)
    torch.testing.assert_close(emb[0, :8], torch.ones(8))  # cos(0)
    assert not torch.equal(emb[1], emb[2])


def test_toy_denoising_loss_decreases_and_gates_get_gradient() -> None:
    torch.manual_seed(0)
    net = tiny_unet([8, 16], max_kv_tokens=64)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    z = torch.randn(4, 4, 8, 8, 8)
    x0 = torch.tanh(z.roll(1, dims=1))  # clean latent tied to the condition
    eps = torch.randn_like(x0)
    t = torch.randint(100, 900, (4,))
    alpha_bar = torch.cos(t.float() / 1000 * math.pi / 2)[:, None, None, None, None] ** 2
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (net(x_t, t, z) - eps).square().mean()
        loss.backward()
        losses.append(loss.item())
        opt.step()
        # zero head: only it gets gradient at step one; afterwards the gates must too
        if len(losses) == 2:
            gates = [p.grad for name, p in net.named_parameters() if "gamma" in name]
            assert len(gates) == 4 and all(g is not None and g.abs() > 0 for g in gates)
    assert losses[-1] < 0.8 * losses[0], losses
