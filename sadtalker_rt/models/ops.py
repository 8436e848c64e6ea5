"""Export-friendly operations and blocks shared by the face-vid2vid renderer modules.

Batch norms are plain ``nn.BatchNorm*d``: the official vendored SynchronizedBatchNorm is exactly
``F.batch_norm`` with running statistics in eval mode, under the same state-dict keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_decomposed_grid_sample = False


class use_decomposed_grid_sample:
    """Make ``grid_sample_3d`` use gathers instead of the 5-D GridSample op.

    Takes effect on construction, so it works as a plain call or as a context manager; leaving the
    ``with`` block restores the previous choice.
    """

    def __init__(self, enabled: bool = True):
        global _decomposed_grid_sample
        self.previous = _decomposed_grid_sample
        _decomposed_grid_sample = bool(enabled)

    def __enter__(self) -> "use_decomposed_grid_sample":
        return self

    def __exit__(self, *exc) -> None:
        global _decomposed_grid_sample
        _decomposed_grid_sample = self.previous


def grid_sample_3d(input: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Trilinear 5-D grid sample with zero padding and align_corners=False (the official defaults)."""
    if _decomposed_grid_sample:
        return grid_sample_3d_decomposed(input, grid)
    return F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def grid_sample_3d_decomposed(input: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``grid_sample_3d`` from floor, clamp, gather, mul, add and where only.

    Follows torch's CPU kernel operation by operation (unnormalize, corner weights as products
    in x, y, z order, corners accumulated in the kernel's order), so results agree to float32
    rounding. Corners outside the volume contribute zero, as padding_mode='zeros' does.

    Args:
        input: (N, C, D, H, W).
        grid: (N, Do, Ho, Wo, 3) holding (x, y, z) in [-1, 1] (values outside are allowed).

    Returns:
        (N, C, Do, Ho, Wo).
    """
    n, c, d, h, w = input.shape
    out_shape = grid.shape[1:4]
    voxels = input.permute(0, 2, 3, 4, 1).reshape(-1, c)              # (N*D*H*W, C)
    grid = grid.reshape(n, -1, 3)                                       # (N, P, 3)
    batch_offset = (torch.arange(n, device=grid.device) * (d * h * w)).reshape(n, 1)

    def axis(coord: torch.Tensor, size: int):
        pos = ((coord + 1) * size - 1) / 2                              # align_corners=False
        low = torch.floor(pos)
        high = low + 1
        corners = []
        for index, weight in ((low, high - pos), (high, pos - low)):
            valid = (index >= 0) & (index <= size - 1)
            corners.append((index.clamp(0, size - 1).long(), weight, valid))
        return corners

    xs, ys, zs = axis(grid[..., 0], w), axis(grid[..., 1], h), axis(grid[..., 2], d)
    out = torch.zeros(n, grid.shape[1], c, dtype=input.dtype, device=input.device)
    for zi, wz, vz in zs:                # torch's order: tnw, tne, tsw, tse, bnw, bne, bsw, bse
        for yi, wy, vy in ys:
            for xi, wx, vx in xs:
                index = batch_offset + (zi * h + yi) * w + xi                      # (N, P)
                values = voxels[index.reshape(-1)].reshape(n, -1, c)            # (N, P, C)
                weight = (wx * wy * wz).unsqueeze(-1)
                valid = (vx & vy & vz).unsqueeze(-1)
                out = out + torch.where(valid, values * weight, torch.zeros_like(values))
    return out.reshape(n, *out_shape, c).permute(0, 4, 1, 2, 3)


def coordinate_grid(depth: int, height: int, width: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(D, H, W, 3) grid of (x, y, z) in [-1, 1], corner-aligned (±1 at the first and last voxel centres)."""

    def axis(size: int) -> torch.Tensor:
        return 2 * (torch.arange(size, dtype=dtype, device=device) / (size - 1)) - 1

    x = axis(width).reshape(1, 1, width).expand(depth, height, width)
    y = axis(height).reshape(1, height, 1).expand(depth, height, width)
    z = axis(depth).reshape(depth, 1, 1).expand(depth, height, width)
    return torch.stack([x, y, z], dim=-1)


def upsample_nearest(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest upsampling of the last two dims by an integer factor (scale (1, f, f) on 5-D input).

    Exports as one ONNX Resize (nearest, asymmetric, floor) whose output keeps static channel counts under a
    dynamic batch, which the InstanceNormalization export that follows needs.
    """
    factor = int(factor)     # a traced shape division would otherwise turn into a dynamic scale
    if factor == 1:
        return x
    scale = (factor, factor) if x.dim() == 4 else (1, factor, factor)
    return F.interpolate(x, scale_factor=scale, mode="nearest")


class SameBlock2d(nn.Module):
    """conv -> BN -> ReLU (or LeakyReLU 0.01)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, padding: int = 1, lrelu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_chs)
        self.lrelu = lrelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.leaky_relu(x, 0.01) if self.lrelu else F.relu(x)


class DownBlock2d(nn.Module):
    """conv3 -> BN -> ReLU -> 2x2 average pool."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, padding=1)
        self.norm = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.relu(self.norm(self.conv(x))), 2)


class DownBlock3d(nn.Module):
    """conv3^3 -> BN3d -> ReLU -> (1, 2, 2) average pool."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv3d(in_chs, out_chs, 3, padding=1)
        self.norm = nn.BatchNorm3d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(F.relu(self.norm(self.conv(x))), (1, 2, 2))


class UpBlock3d(nn.Module):
    """Nearest (1, 2, 2) upsampling -> conv3^3 -> BN3d -> ReLU."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv3d(in_chs, out_chs, 3, padding=1)
        self.norm = nn.BatchNorm3d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(upsample_nearest(x, 2))))


class ResBlock3d(nn.Module):
    """Pre-activation residual block: x + conv2(relu(norm2(conv1(relu(norm1(x))))))."""

    def __init__(self, chs: int):
        super().__init__()
        self.conv1 = nn.Conv3d(chs, chs, 3, padding=1)
        self.conv2 = nn.Conv3d(chs, chs, 3, padding=1)
        self.norm1 = nn.BatchNorm3d(chs)
        self.norm2 = nn.BatchNorm3d(chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(out))) + x
