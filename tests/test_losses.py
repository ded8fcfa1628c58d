"""wldm_auto.trainers.losses: masked MSE, SMD (hand-computed), hinge GAN losses, KL."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wldm_auto.networks.vae import DiagonalGaussian
from wldm_auto.trainers.losses import (
    d_hinge_loss,
    g_adv_loss,
    kl_loss,
    laplace_nll,
    masked_l1_per_sample,
    masked_mse,
    masked_mse_per_sample,
    smd_loss,
)


def _cos(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def test_masked_mse_matches_numpy_and_ignores_masked_out() -> None:
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((2, 2, 3, 4, 5)), rng.standard_normal((2, 2, 3, 4, 5))
    mask = rng.random((2, 1, 3, 4, 5)) > 0.5
    full_mask = np.broadcast_to(mask, pred.shape)
    expected = np.mean((pred - target)[full_mask] ** 2)
    got = masked_mse(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(mask.astype(np.float64)))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # changing masked-out voxels does not change the loss
    pred2 = pred.copy()
    pred2[~full_mask] += 100.0
    got2 = masked_mse(torch.from_numpy(pred2), torch.from_numpy(target), torch.from_numpy(mask.astype(np.float64)))
    assert got2.item() == pytest.approx(expected, rel=1e-12)


def test_per_sample_distances_match_numpy_per_sample() -> None:
    rng = np.random.default_rng(1)
    pred, target = rng.standard_normal((3, 2, 3, 4, 5)), rng.standard_normal((3, 2, 3, 4, 5))
    mask = rng.random((3, 1, 3, 4, 5)) > 0.4
    mask[2] = False  # an empty sample gives 0, not NaN
    full = np.broadcast_to(mask, pred.shape)
    args = torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(mask.astype(np.float64))
    l1, l2 = masked_l1_per_sample(*args).numpy(), masked_mse_per_sample(*args).numpy()
    for b in range(2):
        diff = (pred - target)[b][full[b]]
        assert l1[b] == pytest.approx(np.abs(diff).mean(), rel=1e-12)
        assert l2[b] == pytest.approx((diff ** 2).mean(), rel=1e-12)
    assert l1[2] == 0.0 and l2[2] == 0.0


def test_masked_mse_empty_mask_is_zero_with_grad() -> None:
    pred = torch.randn(1, 1, 2, 2, 2, requires_grad=True)
    loss = masked_mse(pred, torch.zeros_like(pred), torch.zeros_like(pred))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and torch.all(pred.grad == 0)


def test_smd_hand_computed() -> None:
    # batch of 2 patients (a, b), 2 latent channels (S = ch 0, M = ch 1), 3 voxels
    ct = np.array([[[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]], [[-1.0, 0.5, 1.5], [2.0, 1.0, -0.5]]])
    mr = np.array([[[0.8, 2.5, -0.2], [1.0, 1.0, 1.0]], [[-0.5, 1.0, 1.0], [-1.0, 0.2, 0.7]]])
    s_ct, m_ct, s_mr, m_mr = ct[:, 0], ct[:, 1], mr[:, 0], mr[:, 1]
    stru = -(_cos(s_ct[0], s_mr[0]) + _cos(s_ct[1], s_mr[1])) + (_cos(s_ct[0], s_ct[1]) + _cos(s_mr[0], s_mr[1]))
    modal = (_cos(m_ct[0], m_mr[0]) + _cos(m_ct[1], m_mr[1])) - (_cos(m_ct[0], m_ct[1]) + _cos(m_mr[0], m_mr[1]))
    out = smd_loss(torch.from_numpy(ct), torch.from_numpy(mr))
    assert out["stru"].item() == pytest.approx(stru, abs=1e-6)
    assert out["modal"].item() == pytest.approx(modal, abs=1e-6)
    assert out["total"].item() == pytest.approx(stru + modal, abs=1e-6)


def test_smd_mean_over_pairs() -> None:
    gen = torch.Generator().manual_seed(3)
    ct, mr = torch.randn(4, 4, 2, 2, 2, generator=gen), torch.randn(4, 4, 2, 2, 2, generator=gen)
    both = smd_loss(ct, mr)
    first, second = smd_loss(ct[:2], mr[:2]), smd_loss(ct[2:], mr[2:])
    for key in ("stru", "modal", "total"):
        assert both[key].item() == pytest.approx((first[key].item() + second[key].item()) / 2, abs=1e-6)


def test_smd_signs() -> None:
    gen = torch.Generator().manual_seed(0)
    ct, mr = torch.randn(2, 4, 3, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, 3, generator=gen)
    base = smd_loss(ct, mr)
    aligned_mr = mr.clone()
    aligned_mr[:, :2] = ct[:, :2]  # S_MR == S_CT for each patient
    assert smd_loss(ct, aligned_mr)["stru"] < base["stru"]
    shared_ct = ct.clone()
    shared_ct[1, 2:] = ct[0, 2:]  # M_CT_a == M_CT_b
    assert smd_loss(shared_ct, mr)["modal"] < base["modal"]


def test_smd_gradients_and_errors() -> None:
    ct = torch.randn(2, 4, 2, 2, 2, requires_grad=True)
    smd_loss(ct, torch.randn(2, 4, 2, 2, 2))["total"].backward()
    assert ct.grad is not None and torch.isfinite(ct.grad).all()
    with pytest.raises(ValueError, match="pairs"):
        smd_loss(torch.randn(3, 4, 2), torch.randn(3, 4, 2))
    with pytest.raises(ValueError, match="even number of latent channels"):
        smd_loss(torch.randn(2, 3, 2), torch.randn(2, 3, 2))
    with pytest.raises(ValueError, match="same shape"):
        smd_loss(torch.randn(2, 4, 2), torch.randn(2, 4, 3))


def test_hinge_losses_hand_values() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2] -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = [0, 1, 2]   -> mean 1
    assert d_hinge_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1.0))
    assert g_adv_loss(fake).item() == pytest.approx(1 / 3)


def test_kl_loss_reduction() -> None:
    mean = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])  # (B=2, C=1, 2 voxels)
    logvar = torch.tensor([[[0.0, 0.0]], [[np.log(2.0), 0.0]]])
    post = DiagonalGaussian(mean, logvar)
    # sample 0: 0.5 * 1 ; sample 1: 0.5 * (2 - 1 - ln 2); summed per sample, averaged over the batch
    expected = (0.5 + 0.5 * (1.0 - np.log(2.0))) / 2
    assert post.kl().item() == pytest.approx(expected, rel=1e-6)
    # the training loss averages over the 2 latent elements per sample as well
    assert kl_loss(post).item() == pytest.approx(expected / 2, rel=1e-6)
    assert post.kl_per_sample().shape == (2,)


def test_smd_pooled_modality_leaves_the_voxels_of_m_free() -> None:
    """Voxel-wise L_modal is at its minimum (-4) only for one constant M per modality; pooled, any
    texture around a per-modality mean reaches it too (the collapse the plan notes describe)."""
    gen = torch.Generator().manual_seed(1)
    shape = (2, 4, 3, 3, 3)
    s = torch.randn(shape, generator=gen)
    ct, mr = s.clone(), s.clone()
    offset = torch.tensor([3.0, -3.0])[None, :, None, None, None]
    ct[:, 2:] = offset + 0.5 * torch.randn(2, 2, 3, 3, 3, generator=gen)
    mr[:, 2:] = -offset + 0.5 * torch.randn(2, 2, 3, 3, 3, generator=gen)
    voxel, pooled = smd_loss(ct, mr)["modal"].item(), smd_loss(ct, mr, pooled_modality=True)["modal"].item()
    assert pooled == pytest.approx(-4.0, abs=1e-3)
    assert voxel > -3.99
    # the structure term does not depend on the pooling
    assert smd_loss(ct, mr)["stru"].item() == pytest.approx(smd_loss(ct, mr, True)["stru"].item(), abs=1e-6)
    # pooled by hand: cosine of channel means
    m = lambda z, i: z[i, 2:].flatten(1).mean(1)  # noqa: E731
    expected = (_cos(m(ct, 0).numpy(), m(mr, 0).numpy()) + _cos(m(ct, 1).numpy(), m(mr, 1).numpy())
                - _cos(m(ct, 0).numpy(), m(ct, 1).numpy()) - _cos(m(mr, 0).numpy(), m(mr, 1).numpy()))
    assert pooled == pytest.approx(expected, abs=1e-5)


def test_laplace_nll_is_smallest_at_the_absolute_error() -> None:
    """|e| / b + log b over the mask: minimal (value 1 + log|e|, zero gradient) where b = |e|."""
    error = torch.full((1, 1, 2, 2, 2), 0.3)
    mask = torch.ones_like(error)
    mask[..., 0, 0, 0] = 0  # left out: its log-scale gets no gradient
    values = {}
    for b in (0.1, 0.3, 0.9):
        s = torch.full_like(error, float(np.log(b)), requires_grad=True)
        loss = laplace_nll(s, error, mask)
        loss.backward()
        values[b] = (loss.item(), s.grad)
    assert values[0.3][0] == pytest.approx(1 + np.log(0.3), abs=1e-6)
    assert values[0.1][0] > values[0.3][0] and values[0.9][0] > values[0.3][0]
    assert torch.allclose(values[0.3][1], torch.zeros_like(error), atol=1e-7)
    assert values[0.1][1][..., 0, 0, 0].item() == 0 and values[0.1][1][..., 1, 1, 1].item() < 0  # b too small: grow
    assert torch.isfinite(laplace_nll(torch.full_like(error, -1e4), error, mask))  # clamped, no overflow
