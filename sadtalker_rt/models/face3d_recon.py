"""3DMM coefficient regressor: Deep3DFaceRecon's ``ReconNetWrapper`` with a ResNet-50 backbone.

Upstream: OpenTalker/SadTalker ``src/face3d/models/networks.py`` (from sicxu/Deep3DFaceRecon_pytorch,
MIT; the trained weights inherit the Basel Face Model's non-commercial terms). The backbone is the
torchvision ResNet-50 layout (stride on the 3x3 conv, "v1.5") without its fc layer; seven 1x1 conv
heads on the pooled features give 257 coefficients. Weights: ``SadTalker_V0.0.2_*.safetensors``
keys ``face_3drecon.*`` or the legacy ``epoch_20.pth`` ``['net_recon']``, with identical key names.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ._loading import load_strict, module_template

HEAD_CHANNELS = (80, 64, 80, 3, 27, 2, 1)   # id, exp, tex, angle, gamma, (tx, ty), tz
STAGE_BLOCKS = (3, 4, 6, 3)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_chs: int, mid_chs: int, stride: int = 1):
        super().__init__()
        out_chs = mid_chs * self.expansion
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet50Features(nn.Module):
    """ResNet-50 up to global average pooling: (B, 3, H, W) -> (B, 2048, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_chs = 64
        for index, (mid_chs, blocks) in enumerate(zip((64, 128, 256, 512), STAGE_BLOCKS)):
            stride = 1 if index == 0 else 2
            layer = []
            for block in range(blocks):
                layer.append(Bottleneck(in_chs, mid_chs, stride if block == 0 else 1))
                in_chs = mid_chs * Bottleneck.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x)


class ReconNet(nn.Module):
    """RGB in [0, 1], (B, 3, 224, 224), no normalisation -> (B, 257) coefficients:
    id 0:80, exp 80:144, tex 144:224, angle 224:227, gamma 227:254, trans 254:257."""

    def __init__(self):
        super().__init__()
        self.backbone = ResNet50Features()
        self.final_layers = nn.ModuleList(
            nn.Conv2d(self.backbone.num_features, chs, 1, bias=True) for chs in HEAD_CHANNELS)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.backbone(image)
        return torch.flatten(torch.cat([head(features) for head in self.final_layers], dim=1), 1)


def official_template() -> dict[str, tuple[tuple[int, ...], str]]:
    """Official key -> (shape, dtype) of ``face_3drecon.*`` (prefix removed)."""
    with torch.device("meta"):
        return dict(sorted(module_template(ReconNet()).items()))


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # The module mirrors the official names, and use_last_fc=False means there is no fc to drop.
    return dict(state_dict)


def build(state_dict: Mapping, source: str) -> ReconNet:
    return load_strict(ReconNet(), checkpoint_filter_fn(state_dict), source)
