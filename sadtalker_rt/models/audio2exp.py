"""ExpNet (``SimpleWrapperV2``): mel windows -> 64 expression coefficients per video frame.

Upstream: OpenTalker/SadTalker ``src/audio2exp_models/networks.py`` (Apache-2.0). A Wav2Lip-layout
audio encoder (spec 4.1) and one linear head over [audio (512), reference expression (64),
blink ratio (1)]. Weights: ``SadTalker_V0.0.2_*.safetensors`` keys ``audio2exp.*``, or
``auido2exp_00300-model.pth`` ['model'], with identical key names.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..stages import EXPRESSION
from ._loading import load_strict, module_template

AUDIO_EMB = 512
EXP_DIMS = EXPRESSION.stop - EXPRESSION.start


class ConvBlock(nn.Module):
    """Wav2Lip's Conv2d: conv -> batch norm -> optional residual add -> ReLU."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride, padding: int, residual: bool = False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding),
                                        nn.BatchNorm2d(out_chs))
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


def wav2lip_audio_encoder() -> nn.Sequential:
    """(N, 1, 80, 16) mel windows -> (N, 512, 1, 1). Shared layout of ExpNet and Audio2Pose."""
    return nn.Sequential(
        ConvBlock(1, 32, 3, 1, 1),
        ConvBlock(32, 32, 3, 1, 1, residual=True),
        ConvBlock(32, 32, 3, 1, 1, residual=True),
        ConvBlock(32, 64, 3, (3, 1), 1),
        ConvBlock(64, 64, 3, 1, 1, residual=True),
        ConvBlock(64, 64, 3, 1, 1, residual=True),
        ConvBlock(64, 128, 3, 3, 1),
        ConvBlock(128, 128, 3, 1, 1, residual=True),
        ConvBlock(128, 128, 3, 1, 1, residual=True),
        ConvBlock(128, 256, 3, (3, 2), 1),
        ConvBlock(256, 256, 3, 1, 1, residual=True),
        ConvBlock(256, 512, 3, 1, 0),
        ConvBlock(512, 512, 1, 1, 0),
    )


class SimpleWrapperV2(nn.Module):
    """ExpNet. Frames are independent (batch norm in eval), so a whole sequence runs as one batch."""

    def __init__(self):
        super().__init__()
        self.audio_encoder = wav2lip_audio_encoder()
        self.mapping1 = nn.Linear(AUDIO_EMB + EXP_DIMS + 1, EXP_DIMS)

    def forward(self, indiv_mels: torch.Tensor, ref: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        """indiv_mels (B, T, 1, 80, 16), ref (B, T, 70 or 64), ratio (B, T, 1) -> exp (B, T, 64)."""
        B, T = indiv_mels.shape[:2]
        audio = self.audio_encoder(indiv_mels.reshape(B * T, 1, 80, 16)).reshape(B * T, AUDIO_EMB)
        ref_exp = ref[..., :EXP_DIMS].reshape(B * T, EXP_DIMS)
        features = torch.cat([audio, ref_exp, ratio.reshape(B * T, 1)], dim=1)
        return self.mapping1(features).reshape(B, T, EXP_DIMS)


def official_template() -> dict[str, tuple[tuple[int, ...], str]]:
    """Official key -> (shape, dtype) of the ``audio2exp.`` sub-network, prefix removed."""
    with torch.device("meta"):
        return module_template(SimpleWrapperV2())


def checkpoint_filter_fn(state_dict: Mapping) -> dict:
    """Official and module keys are the same; nothing is renamed or dropped."""
    return dict(state_dict)


def build(state_dict: Mapping, source: str) -> SimpleWrapperV2:
    return load_strict(SimpleWrapperV2(), checkpoint_filter_fn(state_dict), source)
