"""MappingNet (3DMM coefficient window -> head pose, translation, expression deltas) and the keypoint transform.

Upstream: OpenTalker/SadTalker ``src/facerender/modules/mapping.py`` and ``make_animation.py`` (Apache-2.0).
Weights come from ``mapping_00229-model.pth.tar`` (coeff_nc 70) or ``mapping_00109-model.pth.tar`` (73),
entry ``['mapping']``; the same files serve both render sizes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._loading import load_on_meta, module_template, to_tensor

OUTPUT_NAMES = ("yaw", "pitch", "roll", "t", "exp")
NUM_BINS = 66


class MappingNet(nn.Module):
    """(B, coeff_nc, 27) -> yaw, pitch, roll logits (B, 66), t (B, 3), exp (B, 3 * num_kp)."""

    def __init__(self, coeff_nc: int = 70, descriptor_nc: int = 1024, layer: int = 3, num_kp: int = 15,
                 num_bins: int = NUM_BINS):
        super().__init__()
        self.first = nn.Sequential(nn.Conv1d(coeff_nc, descriptor_nc, kernel_size=7))
        for i in range(layer):
            block = nn.Sequential(nn.LeakyReLU(0.1), nn.Conv1d(descriptor_nc, descriptor_nc, kernel_size=3, dilation=3))
            setattr(self, f"encoder{i}", block)
        self.fc_roll = nn.Linear(descriptor_nc, num_bins)
        self.fc_pitch = nn.Linear(descriptor_nc, num_bins)
        self.fc_yaw = nn.Linear(descriptor_nc, num_bins)
        self.fc_t = nn.Linear(descriptor_nc, 3)
        self.fc_exp = nn.Linear(descriptor_nc, 3 * num_kp)
        self.layer = layer

    def forward(self, semantics: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns (yaw, pitch, roll, t, exp), in ``OUTPUT_NAMES`` order."""
        out = self.first(semantics)
        for i in range(self.layer):
            out = getattr(self, f"encoder{i}")(out) + out[:, :, 3:-3]
        out = out.mean(dim=2)
        return self.fc_yaw(out), self.fc_pitch(out), self.fc_roll(out), self.fc_t(out), self.fc_exp(out)


def headpose_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """Expected bin under a softmax over 66 bins of 3 degrees: (B, 66) -> (B,) in [-99, 96]."""
    bins = torch.arange(logits.shape[1], dtype=logits.dtype, device=logits.device)
    return (F.softmax(logits, dim=1) * bins).sum(dim=1) * 3 - 99


def rotation_matrix(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """R = P . Y . R_roll from angles in degrees (B,) -> (B, 3, 3).

    NOTE: the official code converts with 3.14, not pi; the recorded numerics depend on it.
    """
    yaw, pitch, roll = (a / 180 * 3.14 for a in (yaw, pitch, roll))
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)

    def matrix(*rows: torch.Tensor) -> torch.Tensor:
        return torch.stack(rows, dim=1).reshape(-1, 3, 3)

    cos_p, sin_p, cos_y, sin_y, cos_r, sin_r = (f(a) for a in (pitch, yaw, roll) for f in (torch.cos, torch.sin))
    pitch_mat = matrix(one, zero, zero, zero, cos_p, -sin_p, zero, sin_p, cos_p)
    yaw_mat = matrix(cos_y, zero, sin_y, zero, one, zero, -sin_y, zero, cos_y)
    roll_mat = matrix(cos_r, -sin_r, zero, sin_r, cos_r, zero, zero, zero, one)
    return torch.matmul(torch.matmul(pitch_mat, yaw_mat), roll_mat)


def keypoint_transformation(kp_canonical: torch.Tensor, yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor,
                            t: torch.Tensor, exp: torch.Tensor, *, yaw_in: torch.Tensor | None = None,
                            pitch_in: torch.Tensor | None = None, roll_in: torch.Tensor | None = None) -> torch.Tensor:
    """kp' = R . kp + (0, t_y, 0) + exp, per keypoint.

    Args:
        kp_canonical: (B, K, 3) from the KPDetector.
        yaw, pitch, roll: (B, 66) head-pose logits from MappingNet.
        t: (B, 3); only t_y is used (the official code zeroes t_x and t_z).
        exp: (B, 3 * K) expression deltas.
        yaw_in, pitch_in, roll_in: optional (B,) angles in degrees that replace the predicted ones (free view).

    Returns:
        (B, K, 3) transformed keypoints.
    """
    yaw = headpose_to_degrees(yaw) if yaw_in is None else yaw_in
    pitch = headpose_to_degrees(pitch) if pitch_in is None else pitch_in
    roll = headpose_to_degrees(roll) if roll_in is None else roll_in
    rotation = rotation_matrix(yaw, pitch, roll)
    kp_rotated = torch.matmul(kp_canonical, rotation.transpose(1, 2))
    # t_x and t_z are zeroed (official); built without a host constant so CUDA graphs can capture it.
    zero = torch.zeros_like(t[:, 1])
    t_y_only = torch.stack([zero, t[:, 1], zero], dim=1)
    return kp_rotated + t_y_only.unsqueeze(1) + exp.reshape(-1, kp_canonical.shape[1], 3)


def given_angles(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor, angles: torch.Tensor,
                 angle_given: torch.Tensor) -> dict[str, torch.Tensor]:
    """Free view as a graph can take it: ``angles`` (B, 3) yaw, pitch, roll in degrees replace the predicted
    angles where ``angle_given`` (1, 3) is 1, exactly (a select, not a blend)."""
    names = ("yaw_in", "pitch_in", "roll_in")
    return {name: torch.where(angle_given[:, i] > 0.5, angles[:, i], headpose_to_degrees(logits))
            for i, (name, logits) in enumerate(zip(names, (yaw, pitch, roll)))}


def keypoint_transformation_free_view(kp_canonical: torch.Tensor, yaw: torch.Tensor, pitch: torch.Tensor,
                                      roll: torch.Tensor, t: torch.Tensor, exp: torch.Tensor, angles: torch.Tensor,
                                      angle_given: torch.Tensor) -> torch.Tensor:
    """``keypoint_transformation`` with the official ``yaw_in`` / ``pitch_in`` / ``roll_in`` of free view."""
    return keypoint_transformation(kp_canonical, yaw, pitch, roll, t, exp,
                                   **given_angles(yaw, pitch, roll, angles, angle_given))


class MappingWithTransform(nn.Module):
    """The per-frame mapping stage: (kp_canonical (B, K, 3), semantics (B, C, 27)) -> kp (B, K, 3)."""

    def __init__(self, mapping: MappingNet):
        super().__init__()
        self.mapping = mapping

    def forward(self, kp_canonical: torch.Tensor, semantics: torch.Tensor) -> torch.Tensor:
        return keypoint_transformation(kp_canonical, *self.mapping(semantics))


def official_template(coeff_nc: int = 70, **cfg) -> dict[str, tuple[tuple[int, ...], str]]:
    """Official key -> (shape, dtype) of the ``['mapping']`` state dict."""
    with torch.device("meta"):
        return module_template(MappingNet(coeff_nc, **cfg))


def checkpoint_filter_fn(state_dict) -> dict[str, torch.Tensor]:
    """Official keys already match the module."""
    return {k: to_tensor(v) for k, v in state_dict.items()}


def build(state_dict, source: str, coeff_nc: int = 70, **cfg) -> MappingNet:
    return load_on_meta(lambda: MappingNet(coeff_nc, **cfg), checkpoint_filter_fn(state_dict), source)
