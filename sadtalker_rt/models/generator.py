"""Face-vid2vid generator with a SPADE decoder (SadTalker ``OcclusionAwareSPADEGenerator``, prefix ``generator.``).

Upstream: OpenTalker/SadTalker ``src/facerender/modules/{generator,dense_motion,util}.py`` (Apache-2.0),
after NVIDIA's face-vid2vid. Split into the source-only part (``encode_source``, once per image) and the
per-frame part (``render``). Every intermediate is at most 5-D and every reshape keeps the batch as -1.
Spectral-normed convs hold the folded plain weight (W_orig / sigma); ``checkpoint_filter_fn`` folds it.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ._loading import expand_spectral_norm, fold_spectral_norm, load_on_meta, module_template
from .ops import (DownBlock2d, DownBlock3d, ResBlock3d, SameBlock2d, UpBlock3d, coordinate_grid, grid_sample_3d,
                  upsample_nearest)

MASK_THRESHOLD = 1e-3      # mask values below this are zeroed after the softmax, without renormalising
KP_VARIANCE = 0.01         # of the keypoint Gaussians in the motion heatmaps
SPECTRAL_NORM_WEIGHT = re.compile(r"^decoder\.(G_middle_\d|up_\d)\.conv_[01s]\.weight$")


class Hourglass3d(nn.Module):
    """U-Net of DownBlock3d / UpBlock3d; the output concatenates the input as the last skip."""

    def __init__(self, block_expansion: int, in_chs: int, num_blocks: int, max_features: int):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.down_blocks = nn.ModuleList(
            DownBlock3d(in_chs if i == 0 else min(max_features, block_expansion * 2**i),
                        min(max_features, block_expansion * 2**(i + 1)))
            for i in range(num_blocks))
        self.decoder = nn.Module()
        self.decoder.up_blocks = nn.ModuleList(
            UpBlock3d((1 if i == num_blocks - 1 else 2) * min(max_features, block_expansion * 2**(i + 1)),
                      min(max_features, block_expansion * 2**i))
            for i in reversed(range(num_blocks)))
        self.out_chs = block_expansion + in_chs
        self.decoder.conv = nn.Conv3d(self.out_chs, self.out_chs, 3, padding=1)
        self.decoder.norm = nn.BatchNorm3d(self.out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [x]
        for block in self.encoder.down_blocks:
            skips.append(block(skips[-1]))
        out = skips.pop()
        for block in self.decoder.up_blocks:
            out = torch.cat([block(out), skips.pop()], dim=1)
        return F.relu(self.decoder.norm(self.decoder.conv(out)))


def keypoint_gaussians(grid: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    """grid (D, H, W, 3), kp (N, 3) -> (N, D, H, W) Gaussians of variance KP_VARIANCE around each keypoint."""
    diff = grid - kp.reshape(-1, 1, 1, 1, 3)
    return torch.exp(-0.5 * (diff**2).sum(-1) / KP_VARIANCE)


class DenseMotionNetwork(nn.Module):
    """Blends per-keypoint translations of the compressed source volume into one dense deformation."""

    def __init__(self, num_kp: int = 15, feature_channel: int = 32, block_expansion: int = 32, num_blocks: int = 5,
                 max_features: int = 1024, reshape_depth: int = 16, compress: int = 4):
        super().__init__()
        self.hourglass = Hourglass3d(block_expansion, (num_kp + 1) * (compress + 1), num_blocks, max_features)
        self.mask = nn.Conv3d(self.hourglass.out_chs, num_kp + 1, 7, padding=3)
        self.compress = nn.Conv3d(feature_channel, compress, 1)
        self.norm = nn.BatchNorm3d(compress)
        self.occlusion = nn.Conv2d(self.hourglass.out_chs * reshape_depth, 1, 7, padding=3)
        self.num_kp = num_kp

    def compress_source(self, feature_3d: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.compress(feature_3d)))

    def forward(self, source_compressed: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor):
        """-> mask (B, K+1, D, H, W) before thresholding, deformation (B, D, H, W, 3), occlusion_map (B, 1, H, W)."""
        c, d, h, w = source_compressed.shape[1:]
        k1 = self.num_kp + 1
        grid = coordinate_grid(d, h, w, source_compressed.dtype, source_compressed.device)

        # NOTE: a zero keypoint prepended to both sets turns the background entry into the plain identity grid
        # and its heatmap into exactly 0, as the official code's separate background channel is.
        zero = torch.zeros_like(kp_source[:, :1])
        kp_source = torch.cat([zero, kp_source], dim=1).reshape(-1, 3)       # (B*(K+1), 3)
        kp_driving = torch.cat([zero, kp_driving], dim=1).reshape(-1, 3)
        sparse_motions = grid - kp_driving.reshape(-1, 1, 1, 1, 3) + kp_source.reshape(-1, 1, 1, 1, 3)

        repeated = source_compressed.reshape(-1, 1, c * d, h, w).expand(-1, k1, c * d, h, w)
        deformed = grid_sample_3d(repeated.reshape(-1, c, d, h, w), sparse_motions)          # (B*(K+1), C, D, H, W)
        heatmap = keypoint_gaussians(grid, kp_driving) - keypoint_gaussians(grid, kp_source)
        # channel 5k + j: j = 0 the heatmap of keypoint k, j = 1..4 its deformed compressed feature
        hourglass_in = torch.cat([heatmap.reshape(-1, 1, d, h, w), deformed], dim=1).reshape(-1, k1 * (c + 1), d, h, w)
        prediction = self.hourglass(hourglass_in)

        mask = F.softmax(self.mask(prediction), dim=1)
        kept = torch.where(mask < MASK_THRESHOLD, torch.zeros_like(mask), mask)
        weighted = sparse_motions.reshape(-1, k1, d * h * w, 3) * kept.reshape(-1, k1, d * h * w, 1)
        deformation = weighted.sum(dim=1).reshape(-1, d, h, w, 3)

        occlusion_map = torch.sigmoid(self.occlusion(prediction.reshape(-1, prediction.shape[1] * d, h, w)))
        return mask, deformation, occlusion_map


class SPADE(nn.Module):
    """Instance norm (no affine) modulated by gamma, beta predicted from the segmap."""

    def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128):
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, 3, padding=1)

    def modulate(self, normalized: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        segmap = upsample_nearest(segmap, normalized.shape[-1] // segmap.shape[-1])
        actv = self.mlp_shared(segmap)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        return self.modulate(F.instance_norm(x, eps=1e-5), segmap)


class SPADEResnetBlock(nn.Module):
    """shortcut + conv_1(lrelu(norm_1(conv_0(lrelu(norm_0(x)))))); conv_* are spectral-normed (folded)."""

    def __init__(self, fin: int, fout: int, label_nc: int):
        super().__init__()
        fmid = min(fin, fout)
        self.learned_shortcut = fin != fout
        self.conv_0 = nn.Conv2d(fin, fmid, 3, padding=1)
        self.conv_1 = nn.Conv2d(fmid, fout, 3, padding=1)
        self.norm_0 = SPADE(fin, label_nc)
        self.norm_1 = SPADE(fmid, label_nc)
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(fin, fout, 1, bias=False)
            self.norm_s = SPADE(fin, label_nc)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = F.instance_norm(x, eps=1e-5)       # norm_0 and norm_s normalise the same x: share it
        shortcut = self.conv_s(self.norm_s.modulate(normalized, segmap)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0.modulate(normalized, segmap), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, segmap), 0.2))
        return shortcut + dx


class SPADEDecoder(nn.Module):
    """(B, 256, F, F) occluded feature, also the segmap -> image (B, 3, 4F, 4F) in [0, 1]."""

    def __init__(self, ic: int = 256, oc: int = 64, label_nc: int = 256, num_middle: int = 6):
        super().__init__()
        self.fc = nn.Conv2d(ic, 2 * ic, 3, padding=1)
        for i in range(num_middle):
            setattr(self, f"G_middle_{i}", SPADEResnetBlock(2 * ic, 2 * ic, label_nc))
        self.up_0 = SPADEResnetBlock(2 * ic, ic, label_nc)
        self.up_1 = SPADEResnetBlock(ic, oc, label_nc)
        self.conv_img = nn.Conv2d(oc, 3, 3, padding=1)
        self.num_middle = num_middle

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        x = self.fc(feature)
        for i in range(self.num_middle):
            x = getattr(self, f"G_middle_{i}")(x, feature)
        x = self.up_0(upsample_nearest(x, 2), feature)
        x = self.up_1(upsample_nearest(x, 2), feature)
        return torch.sigmoid(self.conv_img(F.leaky_relu(x, 0.2)))


class OcclusionAwareSPADEGenerator(nn.Module):
    """Source image + source/driving keypoints -> rendered frame. Defaults are SadTalker's facerender.yaml."""

    def __init__(self, image_channel: int = 3, feature_channel: int = 32, num_kp: int = 15, block_expansion: int = 64,
                 max_features: int = 512, num_down_blocks: int = 2, reshape_channel: int = 32, reshape_depth: int = 16,
                 num_resblocks: int = 6, dense_motion_params: dict | None = None):
        super().__init__()
        dense_motion_params = dense_motion_params or {}
        self.dense_motion_network = DenseMotionNetwork(num_kp=num_kp, feature_channel=feature_channel,
                                                       reshape_depth=reshape_depth, **dense_motion_params)
        self.first = SameBlock2d(image_channel, block_expansion)
        self.down_blocks = nn.ModuleList(
            DownBlock2d(min(max_features, block_expansion * 2**i), min(max_features, block_expansion * 2**(i + 1)))
            for i in range(num_down_blocks))
        self.second = nn.Conv2d(min(max_features, block_expansion * 2**num_down_blocks), max_features, 1)
        self.resblocks_3d = nn.Sequential()
        for i in range(num_resblocks):
            self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(reshape_channel))
        out_chs = block_expansion * 2**num_down_blocks
        self.third = SameBlock2d(max_features, out_chs, lrelu=True)
        self.fourth = nn.Conv2d(out_chs, out_chs, 1)
        self.decoder = SPADEDecoder()
        self.reshape_channel = reshape_channel
        self.reshape_depth = reshape_depth

    def encode_source(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> feature_3d (B, 32, 16, S/4, S/4), source_compressed (B, 4, 16, S/4, S/4)."""
        out = self.first(image)
        for block in self.down_blocks:
            out = block(out)
        out = self.second(out)
        h, w = out.shape[2:]
        feature_3d = self.resblocks_3d(out.reshape(-1, self.reshape_channel, self.reshape_depth, h, w))
        return feature_3d, self.dense_motion_network.compress_source(feature_3d)

    def render(self, feature_3d: torch.Tensor, source_compressed: torch.Tensor, kp_source: torch.Tensor,
               kp_driving: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> prediction (B, 3, S, S), mask (B, 16, 16, S/4, S/4), occlusion_map (B, 1, S/4, S/4)."""
        mask, deformation, occlusion_map = self.dense_motion_network(source_compressed, kp_source, kp_driving)
        # NOTE: the identity grid is corner-aligned while sampling uses align_corners=False, so even an identity
        # warp half-blends border voxels with the zero padding; the official model was trained that way.
        warped = grid_sample_3d(feature_3d, deformation)
        c, d, h, w = warped.shape[1:]
        out = self.fourth(self.third(warped.reshape(-1, c * d, h, w))) * occlusion_map
        return {"prediction": self.decoder(out), "mask": mask, "occlusion_map": occlusion_map}

    def forward(self, image: torch.Tensor, kp_source: torch.Tensor,
                kp_driving: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.render(*self.encode_source(image), kp_source, kp_driving)


class SourceEncoder(nn.Module):
    """Export wrapper: image -> (feature_3d, source_compressed)."""

    def __init__(self, generator: OcclusionAwareSPADEGenerator):
        super().__init__()
        self.generator = generator

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.generator.encode_source(image)


class FrameRenderer(nn.Module):
    """Export wrapper: (feature_3d, source_compressed, kp_source, kp_driving) -> prediction
    (or (prediction, mask, occlusion_map) with ``with_aux``)."""

    def __init__(self, generator: OcclusionAwareSPADEGenerator, with_aux: bool = False):
        super().__init__()
        self.generator = generator
        self.with_aux = with_aux

    def forward(self, feature_3d: torch.Tensor, source_compressed: torch.Tensor, kp_source: torch.Tensor,
                kp_driving: torch.Tensor):
        out = self.generator.render(feature_3d, source_compressed, kp_source, kp_driving)
        if self.with_aux:
            return out["prediction"], out["mask"], out["occlusion_map"]
        return out["prediction"]


def official_template(**cfg) -> dict[str, tuple[tuple[int, ...], str]]:
    """Official key -> (shape, dtype) of ``generator.*`` (prefix removed), spectral-norm triples included."""
    with torch.device("meta"):
        template = module_template(OcclusionAwareSPADEGenerator(**cfg))
    return expand_spectral_norm(template, [k for k in template if SPECTRAL_NORM_WEIGHT.match(k)])


def checkpoint_filter_fn(state_dict) -> dict[str, torch.Tensor]:
    """Official keys -> module keys: each (weight_orig, weight_u, weight_v) becomes the folded ``weight``.

    The legacy pickle's ``['generator']`` uses the same keys.
    """
    return fold_spectral_norm(state_dict)


def build(state_dict, source: str, **cfg) -> OcclusionAwareSPADEGenerator:
    return load_on_meta(lambda: OcclusionAwareSPADEGenerator(**cfg), checkpoint_filter_fn(state_dict), source)
