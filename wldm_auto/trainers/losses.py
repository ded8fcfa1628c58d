"""Training losses: masked L2 and L1 (optionally bone-weighted), KL, structure-modality disentanglement (SMD),
hinge GAN."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from wldm_auto.networks.vae import DiagonalGaussian


def _masked_mean(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                 distance: Callable[[torch.Tensor], torch.Tensor], per_sample: bool,
                 voxel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``distance(pred - target)`` over the voxels where ``mask > 0``: a scalar, or (B,) per sample;
    weighted by ``voxel_weight`` (shaped like ``pred``) when given."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    weight = (mask > 0).to(pred.dtype).expand_as(pred)
    if voxel_weight is not None:
        weight = weight * voxel_weight
    error = distance(pred - target) * weight
    # clamp: an empty mask gives 0 / 1 = 0 (with grad) and no host sync on GPU
    if per_sample:
        return error.flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)
    return error.sum() / weight.sum().clamp_min(1.0)


def _square(difference: torch.Tensor) -> torch.Tensor:
    return difference.pow(2)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the voxels where ``mask > 0`` (all channels).

    ``mask`` broadcasts to ``pred`` (e.g. (B, 1, D, H, W) for multi-channel
    ``pred``). An empty mask gives a zero that still carries a graph.
    """
    return _masked_mean(pred, target, mask, _square, per_sample=False)


def masked_mse_per_sample(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the voxels where ``mask > 0``, one value per sample: shape (B,)."""
    return _masked_mean(pred, target, mask, _square, per_sample=True)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the voxels where ``mask > 0`` (as :func:`masked_mse`)."""
    return _masked_mean(pred, target, mask, torch.abs, per_sample=False)


def masked_l1_per_sample(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the voxels where ``mask > 0``, one value per sample: shape (B,)."""
    return _masked_mean(pred, target, mask, torch.abs, per_sample=True)


def bone_weighted_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, bone_level: float,
                     bone_weight: float) -> torch.Tensor:
    """Weighted mean absolute error over the voxels where ``mask > 0``: voxels whose ``target`` is above
    ``bone_level`` (bone, in the target's units) count ``1 + bone_weight`` times, the others once.

    ``bone_weight`` 0 is :func:`masked_l1`. Bone is a few per cent of a body; under a plain L1 a voxel whose
    MR could be bone or soft tissue is predicted as the more frequent soft tissue, so the sCT loses its bone.
    """
    if bone_weight < 0:
        raise ValueError(f"bone_weight must be >= 0, got {bone_weight}")
    extra = 1.0 + bone_weight * (target > bone_level).to(pred.dtype) if bone_weight else None
    return _masked_mean(pred, target, mask, torch.abs, per_sample=False, voxel_weight=extra)


def laplace_nll(log_scale: torch.Tensor, abs_error: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean Laplace negative log-likelihood (up to log 2) of ``abs_error`` under scale b = exp(``log_scale``)
    over the voxels where ``mask > 0``: |e| / b + log b, smallest at b = |e| (so b learns the expected
    absolute error). ``log_scale`` is clamped to >= -12 (b >= 6e-6): exp(-log b) stays finite."""
    log_scale = log_scale.clamp_min(-12.0)
    return _masked_mean(log_scale, torch.zeros_like(log_scale), mask,
                        lambda s: abs_error * torch.exp(-s) + s, per_sample=False)


def kl_loss(posterior: DiagonalGaussian) -> torch.Tensor:
    """KL to N(0, I) averaged over latent elements (and the batch).

    A per-element mean, like the per-voxel reconstruction losses it is added to, so a
    KL weight means the same for any patch size or latent width. (The sum over a
    latent, :meth:`DiagonalGaussian.kl`, made the paper-style weight 1e-6 thousands of
    times stronger against a per-voxel mean reconstruction loss.)
    """
    return posterior.kl() / posterior.mean[0].numel()


def _pairwise(z: torch.Tensor, name: str, pooled_modality: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(2P, C, ...) -> S_a, S_b, M_a, M_b: S each (P, C/2 * voxels); M the same, or (P, C/2) channel
    means when ``pooled_modality``."""
    if z.dim() < 2 or z.shape[0] % 2 or z.shape[0] == 0:
        raise ValueError(
            f"smd_loss needs a batch of patient pairs (0,1), (2,3), ...: {name} has batch size "
            f"{z.shape[0] if z.dim() else 'none'}, which is not a positive even number"
        )
    if z.shape[1] % 2:
        raise ValueError(f"smd_loss needs an even number of latent channels, {name} has {z.shape[1]}")
    half = z.shape[1] // 2
    s = z[:, :half].flatten(1).unflatten(0, (-1, 2))
    m = z[:, half:].flatten(2).mean(2) if pooled_modality else z[:, half:].flatten(1)
    m = m.unflatten(0, (-1, 2))
    return s[:, 0], s[:, 1], m[:, 0], m[:, 1]


def smd_loss(z_ct: torch.Tensor, z_mr: torch.Tensor, pooled_modality: bool = False) -> dict[str, torch.Tensor]:
    """Structure-Modality Disentanglement loss (paper's L_D = L_stru + L_modal).

    ``z_ct[i]`` and ``z_mr[i]`` are latents of the same patient; the batch
    holds P pairs of patients (a, b) = (2i, 2i+1). S = first half of channels,
    M = second half, flattened per sample; cos = cosine similarity. Per pair:

        L_stru  = -(cos(S_CT_a, S_MR_a) + cos(S_CT_b, S_MR_b)) + (cos(S_CT_a, S_CT_b) + cos(S_MR_a, S_MR_b))
        L_modal =  (cos(M_CT_a, M_MR_a) + cos(M_CT_b, M_MR_b)) - (cos(M_CT_a, M_CT_b) + cos(M_MR_a, M_MR_b))

    i.e. structure agrees across modalities of one patient and differs
    between patients; the modality code differs across modalities and agrees
    within one modality. Returns {"stru", "modal", "total"}, each the mean over pairs.

    Compared voxel by voxel, L_modal is smallest when M is one constant image per
    modality (half of the latent then carries no image). ``pooled_modality`` compares
    the channel means of M instead: the modality sits in M's mean, its voxels stay free.
    """
    if z_ct.shape != z_mr.shape:
        raise ValueError(f"z_ct {tuple(z_ct.shape)} and z_mr {tuple(z_mr.shape)} must have the same shape")
    sct_a, sct_b, mct_a, mct_b = _pairwise(z_ct, "z_ct", pooled_modality)
    smr_a, smr_b, mmr_a, mmr_b = _pairwise(z_mr, "z_mr", pooled_modality)

    def cos(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(u, v, dim=1, eps=1e-8)

    stru = -(cos(sct_a, smr_a) + cos(sct_b, smr_b)) + (cos(sct_a, sct_b) + cos(smr_a, smr_b))
    modal = (cos(mct_a, mmr_a) + cos(mct_b, mmr_b)) - (cos(mct_a, mct_b) + cos(mmr_a, mmr_b))
    stru, modal = stru.mean(), modal.mean()
    return {"stru": stru, "modal": modal, "total": stru + modal}


def d_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def g_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean(fake logits)."""
    return -fake_logits.mean()
