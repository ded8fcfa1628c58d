"""Dual Skip Connection Attention (DSCA) of 3D-WLDM: SEM and MFM cross-attention on U-Net skips.

Both modules attend from the voxels of an encoder skip feature E (queries) to
a pooled grid of the MR latent (keys/values): SEM to the structure half S_MR,
MFM to the modality half M_MR. Memory is bounded in two ways:

* keys/values: the MR latent is resized (trilinear) to E's scale and then
  adaptive-average-pooled to a grid of at most ``max_kv_tokens`` cells
  (:func:`pooled_grid`), so the attention matrix is at most
  ``heads x N_q x max_kv_tokens`` whatever the input size;
* queries: when E has more than ``max_query_tokens`` voxels the queries are
  processed in chunks of that many, so one attention call never holds more
  than ``heads x max_query_tokens x max_kv_tokens`` scores per sample. (Under
  autograd a math-kernel SDPA keeps each chunk's probabilities for the
  backward pass; the fused GPU kernels keep none.)
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from wldm_auto.networks.blocks import num_groups


@lru_cache(maxsize=256)
def pooled_grid(size: tuple[int, ...], max_tokens: int) -> tuple[int, ...]:
    """A grid no larger than ``size`` on any axis with at most ``max_tokens`` cells, aspect roughly kept."""
    if max_tokens < 1 or any(s < 1 for s in size):
        raise ValueError(f"need positive sizes and max_tokens, got size={size}, max_tokens={max_tokens}")
    if math.prod(size) <= max_tokens:
        return tuple(size)
    scale = (max_tokens / math.prod(size)) ** (1.0 / len(size))
    grid = [min(n, max(1, int(n * scale))) for n in size]
    while math.prod(grid) > max_tokens:  # axes clamped to 1 can push the product over
        grid[max(range(len(grid)), key=grid.__getitem__)] -= 1
    grown = True
    while grown:  # use the remaining budget, least-resolved axis first
        grown = False
        for i in sorted(range(len(grid)), key=lambda a: grid[a] / size[a]):
            if grid[i] < size[i] and math.prod(grid) // grid[i] * (grid[i] + 1) <= max_tokens:
                grid[i] += 1
                grown = True
                break
    return tuple(grid)


class KVPool(nn.Module):
    """Resize a latent (B, C, d, h, w) to a target scale (trilinear), then average-pool it to <= ``max_tokens`` cells.

    A module of its own so a forward hook can read the key/value grid.
    """

    def __init__(self, max_tokens: int) -> None:
        super().__init__()
        if max_tokens < 1:
            raise ValueError(f"max_kv_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens

    def forward(self, source: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        if tuple(source.shape[2:]) != tuple(size):
            source = F.interpolate(source, size=size, mode="trilinear", align_corners=False)
        grid = pooled_grid(tuple(size), self.max_tokens)
        if grid != tuple(size):
            source = F.adaptive_avg_pool3d(source, grid)
        return source


class _LatentCrossAttention(nn.Module):
    """Multi-head cross-attention from the voxels of E to a pooled MR latent grid.

    Shapes: E (B, C, D, H, W) and a source latent (B, Cs, d, h, w). Inner width
    is C (``heads`` heads of C/heads channels). With ``GN`` a GroupNorm:
    Q = W_q GN(E), K = W_k GN(P), V = W_v GN(P) per token, where P is the
    pooled source; all projections are per-voxel linear maps (= 1x1x1 convs).
    """

    def __init__(
        self, channels: int, kv_channels: int, heads: int, max_kv_tokens: int, max_query_tokens: int, group_width: int
    ) -> None:
        super().__init__()
        if heads < 1 or channels % heads:
            raise ValueError(f"attention heads ({heads}) must divide the skip channels ({channels})")
        if max_query_tokens < 1:
            raise ValueError(f"max_query_tokens must be >= 1, got {max_query_tokens}")
        self.channels, self.heads, self.max_query_tokens = channels, heads, max_query_tokens
        self.q_norm = nn.GroupNorm(num_groups(channels, group_width), channels)
        self.to_q = nn.Linear(channels, channels)
        self.kv_pool = KVPool(max_kv_tokens)
        self.kv_norm = nn.GroupNorm(num_groups(kv_channels, group_width), kv_channels)
        self.to_k = nn.Linear(kv_channels, channels)
        self.to_v = nn.Linear(kv_channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def _split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, _ = tokens.shape
        return tokens.view(b, n, self.heads, self.channels // self.heads).transpose(1, 2)

    def queries(self, e: torch.Tensor) -> torch.Tensor:
        """Q as (B, heads, D*H*W, C/heads)."""
        return self._split_heads(self.to_q(self.q_norm(e).flatten(2).transpose(1, 2)))

    def keys_values(self, source: torch.Tensor, size: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V as (B, heads, <= max_kv_tokens, C/heads) from the source resized to ``size`` and pooled."""
        tokens = self.kv_norm(self.kv_pool(source, size)).flatten(2).transpose(1, 2)
        return self._split_heads(self.to_k(tokens)), self._split_heads(self.to_v(tokens))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(Q K^T / sqrt(C/heads)) V, over query chunks of at most ``max_query_tokens``."""
        if q.shape[2] <= self.max_query_tokens:
            return F.scaled_dot_product_attention(q, k, v)
        chunks = [F.scaled_dot_product_attention(c, k, v) for c in q.split(self.max_query_tokens, dim=2)]
        return torch.cat(chunks, dim=2)

    def project_out(self, heads: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """Merge heads (B, heads, N, C/heads), apply W_o, return (B, C, D, H, W)."""
        b = heads.shape[0]
        tokens = self.to_out(heads.transpose(1, 2).reshape(b, -1, self.channels))
        return tokens.transpose(1, 2).reshape(b, self.channels, *size)

    def _check(self, e: torch.Tensor, source: torch.Tensor) -> tuple[int, int, int]:
        if e.dim() != 5 or source.dim() != 5 or e.shape[0] != source.shape[0]:
            raise ValueError(f"expected 5D tensors with equal batch, got {tuple(e.shape)} and {tuple(source.shape)}")
        return tuple(e.shape[2:])  # type: ignore[return-value]


class SEM(_LatentCrossAttention):
    """Structure Enhancement Module: A_stru = W_o softmax(Q K^T / sqrt(d)) V, keys/values from S_MR.

    ``d`` is the per-head width C/heads. Returns A_stru (B, C, D, H, W), to be added to E.
    """

    def forward(self, e: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
        size = self._check(e, structure)
        k, v = self.keys_values(structure, size)
        return self.project_out(self.attend(self.queries(e), k, v), size)


class MFM(_LatentCrossAttention):
    """Modality Filtering Module: A_modal = W_o (Q - softmax(Q K^T / sqrt(d)) V), keys/values from M_MR.

    "Q" is exactly the projected query of this module, Q = W_q GN(E): a
    C-channel tensor per voxel (the heads concatenated), in the same space
    as the attention output, so the subtraction is per head and per channel;
    W_o then maps the filtered query back to E's channels. Returns A_modal
    (B, C, D, H, W), to be added to E.
    """

    def forward(self, e: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        size = self._check(e, modality)
        k, v = self.keys_values(modality, size)
        q = self.queries(e)
        return self.project_out(q - self.attend(q, k, v), size)


class DSCA(nn.Module):
    """Dual Skip Connection Attention: E' = E + gamma_s * SEM(E, S_MR) + gamma_m * MFM(E, M_MR).

    ``gamma_s`` and ``gamma_m`` are learnable scalars initialised to 0, so at
    initialisation DSCA is the identity and the U-Net starts as one with
    plain skips (ReZero/SAGAN-style gating): the attention branches cannot
    disturb early training, and the gates open as far as the loss asks.
    Their gradient is non-zero from the start (it is the branch output),
    while the branches' own weights receive gradient once a gate is non-zero.
    S_MR (B, struct_channels, ...) and M_MR (B, modal_channels, ...) may be at
    any scale; they are resized to E's. See the module docstring for memory.
    """

    def __init__(
        self,
        channels: int,
        struct_channels: int,
        modal_channels: int,
        heads: int = 4,
        max_kv_tokens: int = 512,
        max_query_tokens: int = 32768,
        group_width: int = 8,
    ) -> None:
        super().__init__()
        self.sem = SEM(channels, struct_channels, heads, max_kv_tokens, max_query_tokens, group_width)
        self.mfm = MFM(channels, modal_channels, heads, max_kv_tokens, max_query_tokens, group_width)
        self.gamma_s = nn.Parameter(torch.zeros(()))
        self.gamma_m = nn.Parameter(torch.zeros(()))

    def forward(self, e: torch.Tensor, structure: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return e + self.gamma_s * self.sem(e, structure) + self.gamma_m * self.mfm(e, modality)
