"""The stage table: the one contract that export, engines, runtime and benchmarks read.

Each stage is a graph with named inputs and outputs. ``rate`` says how often it runs: once per
avatar (``image``), once per utterance or pose chunk (``audio``), or per rendered frame (``frame``).
Shapes use ints, ``"S"`` / ``"F"`` for the render size and its quarter, and axis names for
dynamic axes. Only the stdlib is imported here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

BATCH = "batch"      # frames rendered per call
FRAMES = "frames"    # video frames of an utterance


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple
    dtype: str = "float32"

    def resolve(self, size: int, **axes: int) -> tuple[int, ...]:
        """Concrete shape at render size ``size`` with the given values of the dynamic axes."""
        values = {"S": size, "F": size // 4, **axes}
        return tuple(values[d] if isinstance(d, str) else d for d in self.shape)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if d in (BATCH, FRAMES)}


@dataclass(frozen=True)
class Stage:
    name: str
    rate: str                               # "image", "audio" or "frame"
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    subnetworks: tuple[str, ...]            # sources of its weights (sadtalker_rt.models.checkpoints)
    fp32_reason: str = ""                   # non-empty: the stage stays FP32 in "fp16" exports, and why
    rtol_fp32: float = 1e-4                 # export validation of FP32 graphs (issue contract)
    profile: tuple[int, int, int] = (1, 1, 1)   # TensorRT min/opt/max of the dynamic axis
    notes: str = ""

    @property
    def dynamic(self) -> bool:
        return any(t.dynamic_axes() for t in self.inputs)

    def input(self, name: str) -> Tensor:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> Tensor:
        return next(t for t in self.outputs if t.name == name)


_MAPPING_FP32 = "head pose and keypoints: FP16 lost head motion in an earlier port; ~0.1 GFLOP per frame"

STAGES: dict[str, Stage] = {
    "face3d_recon": Stage(
        "face3d_recon", "image",
        inputs=(Tensor("aligned_image", (1, 3, 224, 224)),),
        outputs=(Tensor("coeffs", (1, 257)),),
        subnetworks=("face_3drecon",),
        fp32_reason="runs once per photo; its coefficients set the source keypoints of every frame",
        notes="ResNet-50 3DMM regressor on the 5-point aligned 224x224 crop, RGB in [0, 1]",
    ),
    "kp_detector": Stage(
        "kp_detector", "image",
        inputs=(Tensor("source_image", (1, 3, "S", "S")),),
        outputs=(Tensor("kp_canonical", (1, 15, 3)),),
        subnetworks=("kp_extractor",),
        fp32_reason="softmax and weighted sum over 65k-262k voxels; runs once per avatar, so FP32 is cheap",
    ),
    "source_encoder": Stage(
        "source_encoder", "image",
        inputs=(Tensor("source_image", (1, 3, "S", "S")),),
        outputs=(Tensor("feature_3d", (1, 32, 16, "F", "F")), Tensor("source_compressed", (1, 4, 16, "F", "F"))),
        subnetworks=("generator",),
        fp32_reason="runs once per photo, so FP32 is cheap; its FP16 rounding (~1e-3 relative) would reach every frame",
        notes="generator parts that depend only on the source image; the official loop recomputes them per frame",
    ),
    "mapping": Stage(
        "mapping", "frame",
        inputs=(Tensor("kp_canonical", (1, 15, 3)), Tensor("semantics", (BATCH, 70, 27))),
        outputs=(Tensor("kp", (BATCH, 15, 3)),),
        subnetworks=("mapping",),
        fp32_reason=_MAPPING_FP32,
        profile=(1, 4, 32),
        notes="MappingNet (70 coefficients: crop, extcrop, resize) + keypoint transformation",
    ),
    "mapping_full": Stage(
        "mapping_full", "frame",
        inputs=(Tensor("kp_canonical", (1, 15, 3)), Tensor("semantics", (BATCH, 73, 27))),
        outputs=(Tensor("kp", (BATCH, 15, 3)),),
        subnetworks=("mapping_full",),
        fp32_reason=_MAPPING_FP32,
        profile=(1, 4, 32),
        notes="MappingNet (73 coefficients, crop parameters included: full, extfull) + keypoint transformation",
    ),
    "renderer": Stage(
        "renderer", "frame",
        inputs=(
            Tensor("feature_3d", (1, 32, 16, "F", "F")),
            Tensor("source_compressed", (1, 4, 16, "F", "F")),
            Tensor("kp_source", (1, 15, 3)),
            Tensor("kp_driving", (BATCH, 15, 3)),
        ),
        outputs=(Tensor("frames", (BATCH, 3, "S", "S")),),
        subnetworks=("generator",),
        profile=(1, 4, 8),
        notes="dense motion, two 5-D grid samples, occlusion, SPADE decoder: the hot path",
    ),
    "audio2exp": Stage(
        "audio2exp", "audio",
        inputs=(Tensor("indiv_mels", (FRAMES, 1, 80, 16)), Tensor("ref_exp", (FRAMES, 64)), Tensor("blink", (FRAMES, 1))),
        outputs=(Tensor("exp", (FRAMES, 64)),),
        subnetworks=("audio2exp",),
        fp32_reason="~0.1 GFLOP per frame, run once per utterance; FP16 buys nothing",
        profile=(1, 200, 4000),
    ),
    "audio2pose": Stage(
        "audio2pose", "audio",
        inputs=(
            Tensor("indiv_mels", (32, 1, 80, 16)),
            Tensor("ref_pose", (1, 6)),
            Tensor("pose_style", (1,), "int64"),
            Tensor("noise", (1, 64)),
        ),
        outputs=(Tensor("motion", (32, 6)),),
        subnetworks=("audio2pose",),
        fp32_reason="one 32-frame chunk per call; head motion is sensitive and the cost is negligible",
        notes="PoseVAE decoder for one chunk of 32 frames; the latent noise is an input",
    ),
}

RENDER_SIZES = (256, 512)
PREPROCESS_MODES = ("crop", "extcrop", "resize", "full", "extfull")


def mapping_stage(preprocess: str) -> str:
    """Full modes drive the renderer with 73 coefficients (the crop parameters included), others with 70."""
    return "mapping_full" if "full" in preprocess else "mapping"


def coeff_channels(preprocess: str) -> int:
    return STAGES[mapping_stage(preprocess)].input("semantics").shape[1]
