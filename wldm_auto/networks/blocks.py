"""WaveletBlock: the Wavelet Residual Module (WRM) of 3D-WLDM, and its plain ablation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wldm_auto.networks.wavelets import dwt3d, idwt3d_low_high, split_low_high


def num_groups(channels: int, group_width: int) -> int:
    """Groups for a group-wise conv with ``group_width`` channels per group (at least 1; must divide)."""
    if channels < 1 or group_width < 1:
        raise ValueError(f"channels ({channels}) and group_width ({group_width}) must be positive")
    groups = max(1, channels // group_width)
    if channels % groups:
        raise ValueError(
            f"{channels} channels cannot be split into {groups} groups of group_width {group_width}; "
            "choose channels divisible by group_width"
        )
    return groups


NORMALIZATIONS = ("group", "voxel")


class VoxelNorm(nn.Module):
    """LayerNorm over the channels of each voxel, with a per-channel scale and shift.

    Unlike GroupNorm it uses no statistics over space, so a network built from it is
    local: its output at a voxel depends only on that voxel's receptive field, and a
    volume processed in tiles of any size (or whole) gives the output of training-sized
    patches. GroupNorm statistics of a 16x32x32 training patch differ from those of a
    larger inference tile, and the output shifts with the tile size.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if torch.is_grad_enabled():
            var = (x - mean).pow(2).mean(dim=1, keepdim=True)
            return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)
        # inference: the same operations in the same order (same result, bit for bit), in place, so a large
        # tile holds one copy of the activation instead of three
        centred = x - mean
        var = centred.pow(2).mean(dim=1, keepdim=True)
        return centred.mul_(torch.rsqrt(var + self.eps)).mul_(self.weight.view(shape)).add_(self.bias.view(shape))


def norm_layer(kind: str, channels: int, group_width: int) -> nn.Module:
    """``"group"``: GroupNorm with ``group_width`` channels per group; ``"voxel"``: :class:`VoxelNorm`."""
    if kind == "group":
        return nn.GroupNorm(num_groups(channels, group_width), channels)
    if kind == "voxel":
        return VoxelNorm(channels)
    raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {kind!r}")


class PointwiseConv3d(nn.Conv3d):
    """1x1x1 convolution; at inference on the CPU one matrix product over the channels.

    Same parameters (and state-dict keys) as ``nn.Conv3d(in, out, 1)``. On large CPU tiles the
    oneDNN convolution reorders its input and output into blocked layouts, holding about four
    activation-sized buffers for a 1x1x1 conv; the matrix product holds only its output. The result
    equals the convolution up to float rounding (the channel sums may be added in another order).
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu" or not x.is_contiguous():
            return super().forward(x)
        batch, _, *spatial = x.shape
        weight = self.weight.reshape(self.out_channels, self.in_channels).to(x.dtype)
        out = torch.matmul(weight, x.reshape(batch, self.in_channels, -1))
        if self.bias is not None:
            out += self.bias.to(x.dtype)[:, None]
        return out.reshape(batch, self.out_channels, *spatial)


def group_conv(channels: int, groups: int) -> nn.Conv3d:
    """Group-wise 3x3x3 convolution that keeps the channel count."""
    return nn.Conv3d(channels, channels, 3, padding=1, groups=groups)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Replicate-pad the trailing end of each spatial axis up to a multiple; returns the original size."""
    size = tuple(x.shape[2:])
    extra = [(-s) % multiple for s in size]
    if any(extra):
        # F.pad takes (W_lo, W_hi, H_lo, H_hi, D_lo, D_hi)
        x = F.pad(x, (0, extra[2], 0, extra[1], 0, extra[0]), mode="replicate")
    return x, size  # type: ignore[return-value]


class WaveletBlock(nn.Module):
    """Wavelet Residual Module (paper's WaveletBlock), or a plain residual block if ``wrm=False``.

    Mapping to the paper's three streams, for an input ``x`` with C = ``in_ch`` channels:

    * primary stream: ``p = x + pw(SiLU(GN(gconv(x))))`` (group-wise 3x3x3 conv,
      GroupNorm, SiLU, point-wise 1x1x1 conv, residual);
    * high-frequency stream: ``L1, H1 = DWT(x)``; ``H1' = gconv(H1)`` on the
      7 detail sub-bands (7*C channels, groups never mix sub-bands);
    * low-frequency stream: ``L2, H2 = DWT(L1)``; ``L1'' = IDWT(gconv(L2), gconv(H2))``;
      ``L1'`` is the identity of ``L1`` (a residual path, no extra parameters),
      so the refined low band is ``L1 + L1''``;
    * fusion: ``f = IDWT(L1 + L1'', H1')`` is the frequency-enhanced map at the
      input resolution; ``y = p + f``; ``out = pw_out(SiLU(GN(y))) + shortcut(x)``
      where the shortcut is a 1x1x1 conv when ``in_ch != out_ch`` (identity otherwise).
      The GN/SiLU before ``pw_out`` is our choice: every frequency stream is
      linear, so this gives the block its nonlinearity on the fused map.

    The two DWT levels need spatial sizes divisible by 4; other sizes are
    replicate-padded at the far end for the frequency streams only and the
    fused map is cropped back, so any size works. ``norm``: ``"group"`` (GroupNorm
    with the group count of the group-wise convs) or ``"voxel"`` (:class:`VoxelNorm`).

    ``wrm=False`` (ablation): ``GN-SiLU-conv3 -> GN-SiLU-conv3`` plus shortcut,
    full 3x3x3 convs, of similar parameter count.
    """

    def __init__(self, in_ch: int, out_ch: int, group_width: int, wrm: bool = True, norm: str = "group") -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.wrm = in_ch, out_ch, wrm
        g_in = num_groups(in_ch, group_width)
        if wrm:
            self.primary = nn.Sequential(
                group_conv(in_ch, g_in), norm_layer(norm, in_ch, group_width), nn.SiLU(), PointwiseConv3d(in_ch, in_ch)
            )
            self.high1 = group_conv(7 * in_ch, 7 * g_in)
            self.low2 = group_conv(in_ch, g_in)
            self.high2 = group_conv(7 * in_ch, 7 * g_in)
            self.out_norm = norm_layer(norm, in_ch, group_width)
            self.out_conv = PointwiseConv3d(in_ch, out_ch)
        else:
            self.body = nn.Sequential(
                norm_layer(norm, in_ch, group_width), nn.SiLU(), nn.Conv3d(in_ch, out_ch, 3, padding=1),
                norm_layer(norm, out_ch, group_width), nn.SiLU(), nn.Conv3d(out_ch, out_ch, 3, padding=1),
            )
        self.shortcut: nn.Module = PointwiseConv3d(in_ch, out_ch) if in_ch != out_ch else nn.Identity()

    def frequency_map(self, x: torch.Tensor) -> torch.Tensor:
        """High- and low-frequency streams fused by IDWT, at the resolution of ``x``."""
        padded, size = _pad_to_multiple(x, 4)
        low1, high1 = split_low_high(dwt3d(padded))
        del padded
        training = torch.is_grad_enabled()
        if not training:  # inference: copy 1/8 of the bands, so the other 7/8 are freed now
            low1 = low1.contiguous()
        high1 = self.high1(high1)
        low2, high2 = split_low_high(dwt3d(low1))
        low1_refined = idwt3d_low_high(self.low2(low2), self.high2(high2))
        low1 = low1 + low1_refined if training else low1.add_(low1_refined)
        fused = idwt3d_low_high(low1, high1)
        return fused[:, :, : size[0], : size[1], : size[2]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.wrm:
            return self.body(x) + self.shortcut(x)
        if torch.is_grad_enabled():
            y = x + self.primary(x) + self.frequency_map(x)
            return self.out_conv(F.silu(self.out_norm(y))) + self.shortcut(x)
        # inference: the same sums in the same order, accumulated in place (fewer activation-sized copies alive)
        y = self.primary(x).add_(x)  # x + p: addition commutes exactly
        y.add_(self.frequency_map(x))
        h = F.silu(self.out_norm(y), inplace=True)
        del y
        return self.out_conv(h).add_(self.shortcut(x))
