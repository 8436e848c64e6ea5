"""Torch modules for each stage of ``sadtalker_rt.stages``: the same names and shapes the graphs have.

They are what the torch backend runs and what export traces, so the ONNX graphs, engines and the
reference agree on one definition of every stage.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..stages import STAGES
from .audio2pose import PoseDecoderStage
from .generator import FrameRenderer, SourceEncoder
from .mapping import MappingWithTransform, keypoint_transformation_free_view


class Face3dReconStage(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, aligned_image: torch.Tensor) -> torch.Tensor:
        return self.net(aligned_image)


class KPDetectorStage(nn.Module):
    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, source_image: torch.Tensor) -> torch.Tensor:
        return self.detector(source_image)


class SourceEncoderStage(nn.Module):
    def __init__(self, generator):
        super().__init__()
        self.encoder = SourceEncoder(generator)

    def forward(self, source_image: torch.Tensor):
        return self.encoder(source_image)


class MappingStage(nn.Module):
    """kp_canonical (1, 15, 3) is shared by the B windows of a batch."""

    def __init__(self, mapping):
        super().__init__()
        self.mapping = MappingWithTransform(mapping)

    def forward(self, kp_canonical: torch.Tensor, semantics: torch.Tensor) -> torch.Tensor:
        return self.mapping(kp_canonical.expand(semantics.shape[0], -1, -1), semantics)


class MappingFreeViewStage(nn.Module):
    """The mapping stage with given head angles (free view); see ``stages.STAGES['mapping_free_view']``."""

    def __init__(self, mapping):
        super().__init__()
        self.mapping = mapping

    def forward(self, kp_canonical: torch.Tensor, semantics: torch.Tensor, angles: torch.Tensor,
                angle_given: torch.Tensor) -> torch.Tensor:
        kp = kp_canonical.expand(semantics.shape[0], -1, -1)
        return keypoint_transformation_free_view(kp, *self.mapping(semantics), angles, angle_given)


class RendererStage(nn.Module):
    """Per-avatar inputs have batch 1 and are broadcast over the B driving keypoints inside the graph."""

    def __init__(self, generator):
        super().__init__()
        self.renderer = FrameRenderer(generator)

    def forward(self, feature_3d, source_compressed, kp_source, kp_driving):
        batch = kp_driving.shape[0]
        return self.renderer(feature_3d.expand(batch, -1, -1, -1, -1),
                             source_compressed.expand(batch, -1, -1, -1, -1),
                             kp_source.expand(batch, -1, -1), kp_driving)


class Audio2ExpStage(nn.Module):
    """All frames of an utterance as one batch (frames are independent)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, indiv_mels, ref_exp, blink):
        return self.net(indiv_mels[None], ref_exp[None], blink[None])[0]


class Audio2PoseStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.decoder = PoseDecoderStage(model)

    def forward(self, indiv_mels, ref_pose, pose_style, noise):
        return self.decoder(indiv_mels[None], ref_pose, pose_style, noise)[0]


class EnhancerStage(nn.Module):
    def __init__(self, gfpgan):
        super().__init__()
        self.gfpgan = gfpgan

    def forward(self, face, *noise, **named_noise):
        maps = list(noise) or [named_noise[f"noise{i}"] for i in range(len(named_noise))]
        return self.gfpgan(face, maps)


class FaceParseStage(nn.Module):
    def __init__(self, parsenet):
        super().__init__()
        self.parsenet = parsenet

    def forward(self, face):
        return self.parsenet(face).argmax(dim=1)


STAGE_MODULES = {
    "face3d_recon": Face3dReconStage,
    "kp_detector": KPDetectorStage,
    "source_encoder": SourceEncoderStage,
    "mapping": MappingStage,
    "mapping_full": MappingStage,
    "mapping_free_view": MappingFreeViewStage,
    "mapping_full_free_view": MappingFreeViewStage,
    "renderer": RendererStage,
    "audio2exp": Audio2ExpStage,
    "audio2pose": Audio2PoseStage,
    "enhancer": EnhancerStage,
    "face_parse": FaceParseStage,
}


def stage_module(stage: str, subnetwork: Callable[[str], nn.Module]) -> nn.Module:
    """The eval-mode module of ``stage``, built on the sub-network the stage table names for it;
    ``subnetwork(name)`` returns a loaded sub-network."""
    (weights,) = STAGES[stage].subnetworks
    return STAGE_MODULES[stage](subnetwork(weights)).eval()
