"""GFPGAN v1.4 face restorer, the "clean" architecture (``GFPGANv1Clean``): a U-Net encoder whose features
condition a StyleGAN2 decoder through spatial feature transforms (SFT) on half of its channels.

Upstream: TencentARC/GFPGAN ``gfpgan/archs/gfpganv1_clean_arch.py`` and ``stylegan2_clean_arch.py``
(Apache-2.0), built as ``GFPGANer(arch='clean', channel_multiplier=2)`` does: out_size 512,
different_w, input_is_latent, sft_half. Weights: ``GFPGANv1.4.pth`` under ``params_ema`` (else ``params``).
Face (B, 3, 512, 512) RGB in [-1, 1] -> image (B, 3, 512, 512), nominally in [-1, 1].

The decoder adds ``strength * noise`` after each of its 15 style convolutions. Noise maps are explicit
inputs here (the official call draws them fresh); ``None`` uses the checkpoint's own maps
(``stylegan_decoder.noises.noise*``), as ``randomize_noise=False`` does.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._loading import load_on_meta, module_template, to_tensor

OUT_SIZE = 512
STYLE_DIM = 512


def noise_resolutions(out_size: int = OUT_SIZE) -> list[int]:
    """Side of each decoder noise map: 4, 8, 8, 16, 16, ..., out_size, out_size."""
    layers = (int(math.log2(out_size)) - 2) * 2 + 1
    return [2 ** ((i + 5) // 2) for i in range(layers)]


def _decoder_channels(channel_multiplier: int, narrow: float = 1.0) -> dict[int, int]:
    return {4: int(512 * narrow), 8: int(512 * narrow), 16: int(512 * narrow), 32: int(512 * narrow),
            64: int(256 * channel_multiplier * narrow), 128: int(128 * channel_multiplier * narrow),
            256: int(64 * channel_multiplier * narrow), 512: int(32 * channel_multiplier * narrow),
            1024: int(16 * channel_multiplier * narrow)}


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution.

    The official code scales a per-sample copy of the weight and runs a grouped convolution; scaling
    the input channels and the output channels instead is the same sum, exports with a dynamic batch
    and keeps one shared weight. Demodulation is computed from the weight's squared norms in FP32.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_style_feat: int = STYLE_DIM,
                 demodulate: bool = True, upsample: bool = False, eps: float = 1e-8):
        super().__init__()
        self.modulation = nn.Linear(num_style_feat, in_channels, bias=True)
        self.weight = nn.Parameter(torch.zeros(1, out_channels, in_channels, kernel_size, kernel_size))
        self.demodulate = demodulate
        self.upsample = upsample
        self.eps = eps
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        style = self.modulation(style)                                     # (B, C_in)
        weight = self.weight[0]
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        out = F.conv2d(x * style[:, :, None, None].to(x.dtype), weight.to(x.dtype), padding=self.padding)
        if self.demodulate:
            # sum over (c_in, k, k) of (w * s)^2 = (sum_k w^2) @ s^2
            energy = style.float().square() @ weight.float().square().sum(dim=(2, 3)).t()   # (B, C_out)
            out = out * torch.rsqrt(energy + self.eps)[:, :, None, None].to(out.dtype)
        return out


class StyleConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_style_feat: int = STYLE_DIM,
                 upsample: bool = False):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_channels, out_channels, kernel_size, num_style_feat,
                                              demodulate=True, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))                         # noise strength
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = self.modulated_conv(x, style) * 2**0.5
        out = out + self.weight * noise
        return F.leaky_relu(out + self.bias, 0.2)


class ToRGB(nn.Module):
    def __init__(self, in_channels: int, num_style_feat: int = STYLE_DIM, upsample: bool = True):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_channels, 3, 1, num_style_feat, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.upsample = upsample

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            if self.upsample:
                skip = F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
            out = out + skip
        return out


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.expand(batch, -1, -1, -1)


class NormStyleCode(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class StyleGAN2GeneratorCSFT(nn.Module):
    """The decoder; SFT conditions scale and shift the second half of the channels after each upsampling conv.

    ``style_mlp`` is never run (GFPGAN feeds latents directly) but its weights are in the official file.
    """

    def __init__(self, out_size: int = OUT_SIZE, num_style_feat: int = STYLE_DIM, num_mlp: int = 8,
                 channel_multiplier: int = 2, narrow: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = [NormStyleCode()]
        for _ in range(num_mlp):
            layers += [nn.Linear(num_style_feat, num_style_feat), nn.LeakyReLU(0.2)]
        self.style_mlp = nn.Sequential(*layers)
        channels = _decoder_channels(channel_multiplier, narrow)
        self.constant_input = ConstantInput(channels[4], 4)
        self.style_conv1 = StyleConv(channels[4], channels[4], 3, num_style_feat)
        self.to_rgb1 = ToRGB(channels[4], num_style_feat, upsample=False)
        self.log_size = int(math.log2(out_size))
        self.noises = nn.Module()
        for i, side in enumerate(noise_resolutions(out_size)):
            self.noises.register_buffer(f"noise{i}", torch.zeros(1, 1, side, side))
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_channels = channels[4]
        for level in range(3, self.log_size + 1):
            out_channels = channels[2**level]
            self.style_convs.append(StyleConv(in_channels, out_channels, 3, num_style_feat, upsample=True))
            self.style_convs.append(StyleConv(out_channels, out_channels, 3, num_style_feat))
            self.to_rgbs.append(ToRGB(out_channels, num_style_feat))
            in_channels = out_channels

    def stored_noise(self) -> list[torch.Tensor]:
        return [getattr(self.noises, f"noise{i}") for i in range(len(noise_resolutions(2**self.log_size)))]

    def forward(self, latent: torch.Tensor, conditions: Sequence[torch.Tensor],
                noise: Sequence[torch.Tensor]) -> torch.Tensor:
        """latent (B, 16, 512); conditions alternate scale, shift per level; noise: 15 maps (B or 1, 1, r, r)."""
        out = self.style_conv1(self.constant_input(latent.shape[0]), latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv1, conv2, to_rgb in zip(self.style_convs[::2], self.style_convs[1::2], self.to_rgbs):
            out = conv1(out, latent[:, i], noise[i])
            if i < len(conditions):
                same, sft = torch.split(out, out.shape[1] // 2, dim=1)
                out = torch.cat([same, sft * conditions[i - 1] + conditions[i]], dim=1)
            out = conv2(out, latent[:, i + 1], noise[i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip


class ResBlock(nn.Module):
    """Resize by ``scale`` (bilinear) between two 3x3 convs, with a resized 1x1 skip."""

    def __init__(self, in_channels: int, out_channels: int, scale: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.conv1(x), 0.2)
        out = F.interpolate(out, scale_factor=self.scale, mode="bilinear", align_corners=False)
        out = F.leaky_relu(self.conv2(out), 0.2)
        x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return out + self.skip(x)


class GFPGANv1Clean(nn.Module):
    def __init__(self, out_size: int = OUT_SIZE, num_style_feat: int = STYLE_DIM, channel_multiplier: int = 2,
                 num_mlp: int = 8, narrow: float = 1.0):
        super().__init__()
        self.log_size = int(math.log2(out_size))
        self.num_style_feat = num_style_feat
        unet = _decoder_channels(channel_multiplier, narrow * 0.5)
        self.conv_body_first = nn.Conv2d(3, unet[out_size], 1)
        self.conv_body_down = nn.ModuleList()
        in_channels = unet[out_size]
        for level in range(self.log_size, 2, -1):
            self.conv_body_down.append(ResBlock(in_channels, unet[2 ** (level - 1)], 0.5))
            in_channels = unet[2 ** (level - 1)]
        self.final_conv = nn.Conv2d(in_channels, unet[4], 3, 1, 1)
        self.conv_body_up = nn.ModuleList()
        in_channels = unet[4]
        for level in range(3, self.log_size + 1):
            self.conv_body_up.append(ResBlock(in_channels, unet[2**level], 2))
            in_channels = unet[2**level]
        # toRGB gives the training losses their multi-scale images; inference never runs it.
        self.toRGB = nn.ModuleList(nn.Conv2d(unet[2**level], 3, 1) for level in range(3, self.log_size + 1))
        self.final_linear = nn.Linear(unet[4] * 16, (self.log_size * 2 - 2) * num_style_feat)
        self.stylegan_decoder = StyleGAN2GeneratorCSFT(out_size, num_style_feat, num_mlp, channel_multiplier, narrow)
        self.condition_scale = nn.ModuleList()
        self.condition_shift = nn.ModuleList()
        for level in range(3, self.log_size + 1):
            channels = unet[2**level]
            for head in (self.condition_scale, self.condition_shift):
                head.append(nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.LeakyReLU(0.2),
                                          nn.Conv2d(channels, channels, 3, 1, 1)))

    def forward(self, x: torch.Tensor, noise: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        feat = F.leaky_relu(self.conv_body_first(x), 0.2)
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.insert(0, feat)
        feat = F.leaky_relu(self.final_conv(feat), 0.2)
        latent = self.final_linear(feat.flatten(1)).view(feat.shape[0], -1, self.num_style_feat)
        conditions = []
        for skip, block, scale, shift in zip(skips, self.conv_body_up, self.condition_scale, self.condition_shift):
            feat = block(feat + skip)
            conditions += [scale(feat), shift(feat)]
        if noise is None:
            noise = self.stylegan_decoder.stored_noise()
        return self.stylegan_decoder(latent, conditions, noise)


def official_template(**cfg) -> dict[str, tuple[tuple[int, ...], str]]:
    """Official key -> (shape, dtype) of ``GFPGANv1.4.pth['params_ema']``."""
    with torch.device("meta"):
        return module_template(GFPGANv1Clean(**cfg))


def checkpoint_filter_fn(state_dict) -> dict[str, torch.Tensor]:
    """Official keys match the module one to one."""
    return {k: to_tensor(v) for k, v in state_dict.items()}


def build(state_dict, source: str, **cfg) -> GFPGANv1Clean:
    return load_on_meta(lambda: GFPGANv1Clean(**cfg), checkpoint_filter_fn(state_dict), source)
