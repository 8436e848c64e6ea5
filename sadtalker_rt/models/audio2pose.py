"""Audio2Pose (PoseVAE): mel windows + a style class + one latent per 32 frames -> head pose.

Upstream: OpenTalker/SadTalker ``src/audio2pose_models/`` (Apache-2.0), config ``auido2pose.yaml``.
Inference uses the audio encoder and the CVAE decoder (spec 5.2); the CVAE encoder
(``netG.encoder.*``) and the motion discriminator (``netD_motion.*``) are in the checkpoint for
training only and are dropped by ``checkpoint_filter_fn``. Weights: ``SadTalker_V0.0.2_*.safetensors``
keys ``audio2pose.*``, or ``auido2pose_00140-model.pth`` ['model'], with identical key names.

The latent noise is an input (the official code draws it with an unseeded ``torch.randn``).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..stages import POSE, POSE_CHUNK, POSE_STYLES, pose_chunks
from ._loading import load_strict, module_template
from .audio2exp import wav2lip_audio_encoder

LATENT = 64
AUDIO_EMB_IN = 512
AUDIO_EMB_OUT = 6
POSE_DIMS = POSE.stop - POSE.start
DECODER_SIZES = (128, 192)
ENCODER_SIZES = (192, 128)
TRAINING_ONLY_PREFIXES = ("netG.encoder.", "netD_motion.")


class ResidualConv(nn.Module):
    """Pre-activation residual block: [BN, ReLU, conv(stride), BN, ReLU, conv] + [conv(stride), BN]."""

    def __init__(self, in_chs: int, out_chs: int, stride, padding: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.BatchNorm2d(in_chs), nn.ReLU(),
            nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=padding),
            nn.BatchNorm2d(out_chs), nn.ReLU(),
            nn.Conv2d(out_chs, out_chs, 3, padding=1),
        )
        self.conv_skip = nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1),
                                       nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(x) + self.conv_skip(x)


class Upsample(nn.Module):
    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_chs, out_chs, kernel_size=(2, 1), stride=(2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x)


class ResUnet(nn.Module):
    """(B, 1, 32, 6) -> (B, 1, 32, 6) in (0, 1); strides act on the time axis only."""

    def __init__(self, filters=(32, 64, 128, 256)):
        super().__init__()
        f0, f1, f2, f3 = filters
        self.input_layer = nn.Sequential(nn.Conv2d(1, f0, 3, padding=1), nn.BatchNorm2d(f0), nn.ReLU(),
                                         nn.Conv2d(f0, f0, 3, padding=1))
        self.input_skip = nn.Sequential(nn.Conv2d(1, f0, 3, padding=1))
        self.residual_conv_1 = ResidualConv(f0, f1, (2, 1), 1)
        self.residual_conv_2 = ResidualConv(f1, f2, (2, 1), 1)
        self.bridge = ResidualConv(f2, f3, (2, 1), 1)
        self.upsample_1 = Upsample(f3, f3)
        self.up_residual_conv1 = ResidualConv(f3 + f2, f2, 1, 1)
        self.upsample_2 = Upsample(f2, f2)
        self.up_residual_conv2 = ResidualConv(f2 + f1, f1, 1, 1)
        self.upsample_3 = Upsample(f1, f1)
        self.up_residual_conv3 = ResidualConv(f1 + f0, f0, 1, 1)
        self.output_layer = nn.Sequential(nn.Conv2d(f0, 1, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.input_layer(x) + self.input_skip(x)
        x2 = self.residual_conv_1(x1)
        x3 = self.residual_conv_2(x2)
        x4 = self.upsample_1(self.bridge(x3))
        x6 = self.upsample_2(self.up_residual_conv1(torch.cat([x4, x3], dim=1)))
        x8 = self.upsample_3(self.up_residual_conv2(torch.cat([x6, x2], dim=1)))
        x10 = self.up_residual_conv3(torch.cat([x8, x1], dim=1))
        return self.output_layer(x10)


class AudioEncoder(nn.Module):
    """(B, T, 1, 80, 16) -> (B, T, 512); the same layout as ExpNet's encoder, separate weights."""

    def __init__(self):
        super().__init__()
        self.audio_encoder = wav2lip_audio_encoder()

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        # NOTE: batch-major; the official code is correct for B = 1 only, the one case inference uses.
        B, T = mels.shape[:2]
        return self.audio_encoder(mels.reshape(B * T, 1, 80, 16)).reshape(B, T, AUDIO_EMB_IN)


class PoseDecoder(nn.Module):
    """CVAE decoder: [ref pose, z + class bias, audio (32 x 6)] -> MLP -> ResUnet -> 32 pose motions."""

    def __init__(self):
        super().__init__()
        self.resunet = ResUnet()
        self.MLP = nn.Sequential()
        self.MLP.add_module("L0", nn.Linear(POSE_DIMS + LATENT + POSE_CHUNK * AUDIO_EMB_OUT, DECODER_SIZES[0]))
        self.MLP.add_module("A0", nn.ReLU())
        self.MLP.add_module("L1", nn.Linear(DECODER_SIZES[0], DECODER_SIZES[1]))
        self.MLP.add_module("sigmoid", nn.Sigmoid())
        self.pose_linear = nn.Linear(POSE_DIMS, POSE_DIMS)
        self.linear_audio = nn.Linear(AUDIO_EMB_IN, AUDIO_EMB_OUT)
        self.classbias = nn.Parameter(torch.zeros(POSE_STYLES, LATENT))

    def forward(self, audio_emb: torch.Tensor, ref_pose: torch.Tensor, class_id: torch.Tensor,
                z: torch.Tensor) -> torch.Tensor:
        B = z.shape[0]
        audio = self.linear_audio(audio_emb).reshape(B, POSE_CHUNK * AUDIO_EMB_OUT)
        z = z + self.classbias[class_id]
        hidden = self.MLP(torch.cat([ref_pose, z, audio], dim=-1)).reshape(B, 1, POSE_CHUNK, POSE_DIMS)
        return self.pose_linear(self.resunet(hidden).squeeze(1))


class PoseEncoder(nn.Module):
    """CVAE encoder, training only; built for the official key layout, never run.

    Its MLP input is 454 = 192 + 64 + 192 + 6: the official code grows the yaml list in place.
    """

    def __init__(self):
        super().__init__()
        self.resunet = ResUnet()
        self.MLP = nn.Sequential()
        in_size = ENCODER_SIZES[0] + LATENT + POSE_CHUNK * AUDIO_EMB_OUT + POSE_DIMS
        self.MLP.add_module("L0", nn.Linear(in_size, ENCODER_SIZES[1]))
        self.MLP.add_module("A0", nn.ReLU())
        self.linear_means = nn.Linear(ENCODER_SIZES[1], LATENT)
        self.linear_logvar = nn.Linear(ENCODER_SIZES[1], LATENT)
        self.linear_audio = nn.Linear(AUDIO_EMB_IN, AUDIO_EMB_OUT)
        self.classbias = nn.Parameter(torch.zeros(POSE_STYLES, LATENT))


class DiscriminatorLayer(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(in_chs, out_chs, kernel_size, stride, bias=False)
        self.norm = nn.BatchNorm1d(out_chs)


class PoseSequenceDiscriminator(nn.Module):
    """Motion discriminator, training only; built for the official key layout, never run."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(DiscriminatorLayer(POSE_DIMS, 256, 4, 2), DiscriminatorLayer(256, 512, 4, 2),
                                 DiscriminatorLayer(512, 1024, 3, 1), nn.Conv1d(1024, 1, 3))


class CVAE(nn.Module):
    def __init__(self, with_encoder: bool = False):
        super().__init__()
        if with_encoder:
            self.encoder = PoseEncoder()
        self.decoder = PoseDecoder()


class Audio2Pose(nn.Module):
    """The inference part of the official Audio2Pose; ``forward`` decodes one 32-frame chunk."""

    def __init__(self):
        super().__init__()
        self.audio_encoder = AudioEncoder()
        self.netG = CVAE()

    def forward(self, mels_chunk: torch.Tensor, ref_pose: torch.Tensor, class_id: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        """mels_chunk (1, 32, 1, 80, 16), ref_pose (1, 6), class_id (1,) int64, noise (1, 64) -> motion (1, 32, 6)."""
        return self.netG.decoder(self.audio_encoder(mels_chunk), ref_pose, class_id, noise)

    def generate(self, indiv_mels: torch.Tensor, ref: torch.Tensor, pose_style: int,
                 noise: torch.Tensor) -> torch.Tensor:
        """``Audio2Pose.test``: indiv_mels (1, T, 1, 80, 16), ref (1, 1, 70), noise (1, n_chunks, 64) -> pose (1, T, 6).

        Frame 0 is the reference (motion 0); frames 1.. are decoded in chunks of 32, a remainder from
        the last 32 frames keeping its tail (``stages.pose_chunks``). Returns ref pose + motion.
        """
        T = indiv_mels.shape[1]
        chunks = pose_chunks(T)
        if noise.shape[1] < len(chunks):
            raise ValueError(f"{T} frames need {len(chunks)} latent vectors, got {noise.shape[1]}")
        ref_pose = ref[:, 0, -POSE_DIMS:]
        class_id = torch.full((1,), int(pose_style), dtype=torch.long, device=ref.device)
        audio = indiv_mels[:, 1:]
        motions = [torch.zeros(1, 1, POSE_DIMS, dtype=ref.dtype, device=ref.device)]
        for k, chunk in enumerate(chunks):
            mels = audio[:, chunk.start:chunk.stop]
            if mels.shape[1] < POSE_CHUNK:
                # Repeating the first mel window repeats its embedding, as the official front padding does.
                mels = torch.cat([mels[:, :1].expand(-1, POSE_CHUNK - mels.shape[1], -1, -1, -1), mels], dim=1)
            motions.append(self(mels, ref_pose, class_id, noise[:, k])[:, POSE_CHUNK - chunk.keep:])
        return ref_pose[:, None] + torch.cat(motions, dim=1)


class PoseDecoderStage(nn.Module):
    """One 32-frame chunk as a self-contained graph for ONNX export; shares the weights of ``model``.

    Inputs: mels_chunk (1, 32, 1, 80, 16), ref_pose (1, 6), class_id (1,) int64, noise (1, 64).
    Output: motion (1, 32, 6), before adding the reference pose.
    """

    def __init__(self, model: Audio2Pose):
        super().__init__()
        self.audio_encoder = model.audio_encoder
        self.decoder = model.netG.decoder

    def forward(self, mels_chunk: torch.Tensor, ref_pose: torch.Tensor, class_id: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.audio_encoder(mels_chunk), ref_pose, class_id, noise)


class _OfficialLayout(nn.Module):
    """Every module the official checkpoint holds, training-only parts included."""

    def __init__(self):
        super().__init__()
        self.audio_encoder = AudioEncoder()
        self.netG = CVAE(with_encoder=True)
        self.netD_motion = PoseSequenceDiscriminator()


def official_template() -> dict[str, tuple[tuple[int, ...], str]]:
    """Official key -> (shape, dtype) of the ``audio2pose.`` sub-network (419 keys), prefix removed."""
    with torch.device("meta"):
        return module_template(_OfficialLayout())


def checkpoint_filter_fn(state_dict: Mapping) -> dict:
    """Drop the training-only CVAE encoder and discriminator; any other unexpected key stays to be refused."""
    return {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}


def build(state_dict: Mapping, source: str) -> Audio2Pose:
    return load_strict(Audio2Pose(), checkpoint_filter_fn(state_dict), source)
