"""Canonical keypoint detector of the face-vid2vid renderer (SadTalker ``KPDetector``, key prefix ``kp_extractor.``).

Upstream: OpenTalker/SadTalker ``src/facerender/modules/keypoint_detector.py`` (Apache-2.0), after
NVIDIA's face-vid2vid. Image (B, 3, S, S) in [0, 1] -> keypoints (B, 15, 3) in [-1, 1], (x, y, z)
order; S is 256 or 512 (any multiple of 128 works).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._loading import load_on_meta, module_template, to_tensor
from .ops import DownBlock2d, UpBlock3d, coordinate_grid


class AntiAliasDownsample(nn.Module):
    """Gaussian blur then decimation, as one stride-s depthwise conv.

    The official module zero-pads, convolves at full resolution and keeps every s-th pixel; a strided
    conv computes exactly those outputs and exports without a strided slice.
    """

    def __init__(self, channels: int, scale: float):
        super().__init__()
        sigma = (1 / scale - 1) / 2
        size = 2 * round(sigma * 4) + 1
        coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        profile = torch.exp(-coords**2 / (2 * sigma**2))
        kernel = profile[:, None] * profile[None, :]
        kernel = kernel / kernel.sum()
        self.register_buffer("weight", kernel.expand(channels, 1, size, size).clone())
        self.stride = int(1 / scale)
        self.padding = size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, stride=self.stride, padding=self.padding, groups=self.weight.shape[0])


class KPHourglass(nn.Module):
    """2-D encoder -> 1x1 conv -> channel-major view to 3-D -> 3-D decoder."""

    def __init__(self, block_expansion: int, in_chs: int, reshape_chs: int, reshape_depth: int,
                 num_blocks: int, max_features: int):
        super().__init__()
        self.down_blocks = nn.Sequential()
        for i in range(num_blocks):
            block_in = in_chs if i == 0 else min(max_features, block_expansion * 2**i)
            block_out = min(max_features, block_expansion * 2**(i + 1))
            self.down_blocks.add_module(f"down{i}", DownBlock2d(block_in, block_out))
        self.conv = nn.Conv2d(min(max_features, block_expansion * 2**num_blocks), reshape_chs, 1)
        self.up_blocks = nn.Sequential()
        for i in range(num_blocks):
            self.up_blocks.add_module(f"up{i}", UpBlock3d(min(max_features, block_expansion * 2**(num_blocks - i)),
                                                          min(max_features, block_expansion * 2**(num_blocks - i - 1))))
        self.reshape_depth = reshape_depth
        self.out_chs = min(max_features, block_expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(self.down_blocks(x))
        c, h, w = out.shape[1:]
        out = out.reshape(-1, c // self.reshape_depth, self.reshape_depth, h, w)  # 3-D channel c <- 16c + d
        return self.up_blocks(out)


class KPDetector(nn.Module):
    """Keypoints as the expected (x, y, z) position under a softmax heatmap over the feature volume."""

    def __init__(self, block_expansion: int = 32, num_kp: int = 15, image_channel: int = 3, max_features: int = 1024,
                 reshape_channel: int = 16384, reshape_depth: int = 16, num_blocks: int = 5,
                 temperature: float = 0.1, scale_factor: float = 0.25):
        super().__init__()
        self.predictor = KPHourglass(block_expansion, image_channel, reshape_channel, reshape_depth, num_blocks,
                                     max_features)
        self.kp = nn.Conv3d(self.predictor.out_chs, num_kp, 3, padding=1)
        self.down = AntiAliasDownsample(image_channel, scale_factor)
        self.temperature = temperature

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.kp(self.predictor(self.down(image)))
        d, h, w = logits.shape[2:]
        # NOTE: softmax and expectation over up to 262,144 voxels stay in float32 whatever the module dtype.
        heatmap = F.softmax(logits.float().flatten(2) / self.temperature, dim=2)        # (B, K, D*H*W)
        grid = coordinate_grid(d, h, w, device=logits.device).reshape(-1, 3)
        # NOTE: an elementwise product and sum (not a matmul) keeps the official summation order.
        return (heatmap.unsqueeze(-1) * grid).sum(dim=2).to(image.dtype)


def official_template(**cfg) -> dict[str, tuple[tuple[int, ...], str]]:
    """Official key -> (shape, dtype) of ``kp_extractor.*`` (prefix removed)."""
    with torch.device("meta"):
        return module_template(KPDetector(**cfg))


def checkpoint_filter_fn(state_dict) -> dict[str, torch.Tensor]:
    """Official keys already match the module; the legacy pickle's ``['kp_detector']`` uses the same keys."""
    return {k: to_tensor(v) for k, v in state_dict.items()}


def build(state_dict, source: str, **cfg) -> KPDetector:
    return load_on_meta(lambda: KPDetector(**cfg), checkpoint_filter_fn(state_dict), source)
