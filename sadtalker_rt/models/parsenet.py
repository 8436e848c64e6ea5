"""Face parsing network used for GFPGAN's paste-back mask (facexlib ``ParseNet``).

Upstream: xinntao/facexlib ``facexlib/parsing/parsenet.py`` (MIT), as ``init_parsing_model('parsenet')``
builds it: in/out size 512, 19 classes, 10 residual body blocks, LeakyReLU, batch norm. The whole file
``parsing_parsenet.pth`` is the state dict. Face (B, 3, 512, 512) RGB in [-1, 1] -> logits (B, 19, 512, 512);
the official code discards the second output (an image), so it is not computed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._loading import load_on_meta, module_template, to_tensor

PARSE_CLASSES = 19


class _Norm(nn.Module):
    def __init__(self, channels: int, batch_norm: bool):
        super().__init__()
        if batch_norm:
            self.norm = nn.BatchNorm2d(channels)
        self.batch_norm = batch_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.batch_norm else x


class ConvLayer(nn.Module):
    """[nearest x2] -> reflection pad -> conv (stride 2 when ``scale`` is 'down') -> [batch norm] -> [LeakyReLU]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, scale: str = "none",
                 batch_norm: bool = False, relu: bool = False):
        super().__init__()
        self.scale = scale
        self.pad = int(np.ceil((kernel_size - 1) / 2))
        self.conv2d = nn.Conv2d(in_channels, out_channels, kernel_size, 2 if scale == "down" else 1,
                                bias=not batch_norm)
        self.norm = _Norm(out_channels, batch_norm)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        out = self.norm(self.conv2d(F.pad(x, (self.pad,) * 4, mode="reflect")))
        return F.leaky_relu(out, 0.2) if self.relu else out


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, scale: str = "none"):
        super().__init__()
        self.has_shortcut = not (scale == "none" and c_in == c_out)
        if self.has_shortcut:
            self.shortcut_func = ConvLayer(c_in, c_out, 3, scale)
        first, second = {"down": ("none", "down"), "up": ("up", "none"), "none": ("none", "none")}[scale]
        self.conv1 = ConvLayer(c_in, c_out, 3, first, batch_norm=True, relu=True)
        self.conv2 = ConvLayer(c_out, c_out, 3, second, batch_norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut_func(x) if self.has_shortcut else x
        return identity + self.conv2(self.conv1(x))


class ParseNet(nn.Module):
    def __init__(self, in_size: int = 512, out_size: int = 512, min_feat_size: int = 32, base_ch: int = 64,
                 parsing_ch: int = PARSE_CLASSES, res_depth: int = 10, ch_range: tuple[int, int] = (32, 256)):
        super().__init__()

        def clip(c: int) -> int:
            return max(ch_range[0], min(c, ch_range[1]))

        min_feat_size = min(in_size, min_feat_size)
        down_steps = int(np.log2(in_size // min_feat_size))
        up_steps = int(np.log2(out_size // min_feat_size))
        encoder: list[nn.Module] = [ConvLayer(3, base_ch, 3)]
        head = base_ch
        for _ in range(down_steps):
            encoder.append(ResidualBlock(clip(head), clip(head * 2), scale="down"))
            head *= 2
        self.encoder = nn.Sequential(*encoder)
        self.body = nn.Sequential(*(ResidualBlock(clip(head), clip(head)) for _ in range(res_depth)))
        decoder = []
        for _ in range(up_steps):
            decoder.append(ResidualBlock(clip(head), clip(head // 2), scale="up"))
            head //= 2
        self.decoder = nn.Sequential(*decoder)
        self.out_img_conv = ConvLayer(clip(head), 3)       # loaded, never run: the paste mask needs only the logits
        self.out_mask_conv = ConvLayer(clip(head), parsing_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.encoder(x)
        return self.out_mask_conv(self.decoder(feat + self.body(feat)))


def official_template(**cfg) -> dict[str, tuple[tuple[int, ...], str]]:
    """Official key -> (shape, dtype) of ``parsing_parsenet.pth``."""
    with torch.device("meta"):
        return module_template(ParseNet(**cfg))


def checkpoint_filter_fn(state_dict) -> dict[str, torch.Tensor]:
    """Official keys match the module one to one."""
    return {k: to_tensor(v) for k, v in state_dict.items()}


def build(state_dict, source: str, **cfg) -> ParseNet:
    return load_on_meta(lambda: ParseNet(**cfg), checkpoint_filter_fn(state_dict), source)
