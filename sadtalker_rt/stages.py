"""The stage table: the one contract that export, engines, runtime, conformance and benchmarks read.

Each stage is a graph with named inputs and outputs. ``rate`` says how often it runs: once per
avatar (``image``), once per utterance or pose chunk (``audio``), or per rendered frame (``frame``).
Shapes use ints, ``"S"`` / ``"F"`` for the render size and its quarter, and axis names for
dynamic axes. An input's ``source`` names the stage output that feeds it (``"stage.output"``); inputs
without one come from the host glue (audio features, coefficients, photos). ``kind`` says what a
tensor holds: export draws its example inputs from it, and image outputs are judged by PSNR.
Only the stdlib is imported here.
"""
from __future__ import annotations

from dataclasses import dataclass

# The official pipeline's clocks and layouts.
FPS = 25                        # video frames per second
SAMPLE_RATE = 16000             # mono audio samples per second
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS
POSE_CHUNK = 32                 # frames audio2pose decodes per call (the PoseVAE's sequence length)
SEMANTIC_RADIUS = 13            # the renderer is driven by windows of 2r+1 coefficient frames
SEMANTIC_WINDOW = 2 * SEMANTIC_RADIUS + 1
EXPRESSION = slice(0, 64)       # coefficient columns: expression, head pose (angles, translation), crop
POSE = slice(64, 70)
CROP = slice(70, 73)
COEFFS = POSE.stop              # what audio2exp + audio2pose generate per frame
FULL_COEFFS = CROP.stop         # full modes drive the renderer with the crop parameters too
POSE_STYLES = 46                # PoseVAE classes

RENDER_SIZES = (256, 512)
PREPROCESS_MODES = ("crop", "extcrop", "resize", "full", "extfull")
FULL_MODES = ("full", "extfull")     # paste back into the whole photo; 73 coefficients per frame
OPSET = 20                      # the first ONNX opset whose GridSample takes 5-D input

BATCH = "batch"      # frames rendered per call
FRAMES = "frames"    # video frames of an utterance


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple
    dtype: str = "float32"
    kind: str = "value"         # image | face | keypoints | semantics | mels | noise | class | degrees | mask | value
    source: str = ""            # "stage.output" that feeds this input; "" for host inputs

    def resolve(self, size: int, **axes: int) -> tuple[int, ...]:
        """Concrete shape at render size ``size`` with the given values of the dynamic axes."""
        values = {"S": size, "F": size // 4, **axes}
        return tuple(values[d] if isinstance(d, str) else d for d in self.shape)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if d in (BATCH, FRAMES)}


# Pass/fail bounds of a stage's outputs per precision (``Stage.tolerance``); sadtalker_rt.parity applies them.
FP16_MAX_REL = 5e-2          # reduced precision, non-image outputs: max|diff| / max(1, max|ref|)
FP16_MIN_PSNR_DB = 40.0      # reduced precision, image outputs (values in [0, 1]): PSNR against float32
# Class maps (argmax outputs, kind "class"): the share of elements that must agree; near-ties may flip.
MIN_CLASS_AGREEMENT = {"fp32": 0.9999, "fp16": 0.995}
REDUCED_PRECISIONS = ("fp16", "fp16-autocast", "tf32")


@dataclass(frozen=True)
class Tolerance:
    """One output's bound: ``metric`` (``max_rel``, ``max_abs`` or ``psnr_db``) against ``limit``, with the reason
    for it and where it was declared (``source``)."""

    metric: str
    limit: float
    reason: str
    source: str = ""

    @property
    def op(self) -> str:
        return ">=" if self.metric in ("psnr_db", "face_psnr_db", "ssim", "agreement") else "<="


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
    option: str = ""                        # the run option that needs this stage; "" for the default pipeline

    def tolerance(self, precision: str, output: str) -> Tolerance:
        """The bound ``output`` of this stage is judged by when computed in ``precision`` (fp32, tf32, fp16,
        fp16-autocast). FP32 graphs follow the export contract; reduced precision gets the FP16 bounds. Class
        maps are judged by the share of agreeing elements; faces in [-1, 1] in reduced precision by PSNR as users
        see them (clipped, on [0, 1])."""
        source = f"stages.{self.name}.{precision}"
        kind = next((t.kind for t in self.outputs if t.name == output), "")
        if kind == "class":
            reduced = precision in REDUCED_PRECISIONS
            return Tolerance("agreement", MIN_CLASS_AGREEMENT["fp16" if reduced else "fp32"], "class maps: the share "
                             "of agreeing elements; near-ties of the argmax may flip", source)
        if precision not in REDUCED_PRECISIONS:
            return Tolerance("max_rel", self.rtol_fp32, "FP32: max|diff| / max(1, max|ref|), the export contract "
                             "for FP32 graphs (rtol_fp32)", source)
        if kind in ("image", "face"):           # PSNR: what a viewer sees
            return Tolerance("psnr_db" if kind == "image" else "face_psnr_db", FP16_MIN_PSNR_DB, "reduced precision, "
                             "image output: PSNR against float32; 40 dB is ~1 % RMS, invisible at a glance", source)
        return Tolerance("max_rel", FP16_MAX_REL, "reduced precision, non-image output: FP16 keeps ~3 significant "
                         "digits and errors accumulate over ~100 layers", source)

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
        # ResNet-50 3DMM regressor on the 5-point aligned 224x224 crop, RGB in [0, 1]
        inputs=(Tensor("aligned_image", (1, 3, 224, 224), kind="image"),),
        outputs=(Tensor("coeffs", (1, 257)),),
        subnetworks=("face_3drecon",),
        fp32_reason="runs once per photo; its coefficients set the source keypoints of every frame",
    ),
    "kp_detector": Stage(
        "kp_detector", "image",
        inputs=(Tensor("source_image", (1, 3, "S", "S"), kind="image"),),
        outputs=(Tensor("kp_canonical", (1, 15, 3), kind="keypoints"),),
        subnetworks=("kp_extractor",),
        fp32_reason="softmax and weighted sum over 65k-262k voxels; runs once per avatar, so FP32 is cheap",
    ),
    # Generator parts that depend only on the source image; the official loop recomputes them per frame.
    "source_encoder": Stage(
        "source_encoder", "image",
        inputs=(Tensor("source_image", (1, 3, "S", "S"), kind="image"),),
        outputs=(Tensor("feature_3d", (1, 32, 16, "F", "F")), Tensor("source_compressed", (1, 4, 16, "F", "F"))),
        subnetworks=("generator",),
        fp32_reason="runs once per photo, so FP32 is cheap; its FP16 rounding (~1e-3 relative) would reach every frame",
    ),
    # MappingNet + keypoint transformation; "mapping" for crop, extcrop and resize, "mapping_full" for full modes.
    # The source keypoints are the mapping of the source's own coefficients (one window, batch 1).
    "mapping": Stage(
        "mapping", "frame",
        inputs=(Tensor("kp_canonical", (1, 15, 3), kind="keypoints", source="kp_detector.kp_canonical"),
                Tensor("semantics", (BATCH, COEFFS, SEMANTIC_WINDOW), kind="semantics")),
        outputs=(Tensor("kp", (BATCH, 15, 3), kind="keypoints"),),
        subnetworks=("mapping",),
        fp32_reason=_MAPPING_FP32,
        profile=(1, 4, 32),
    ),
    "mapping_full": Stage(
        "mapping_full", "frame",
        inputs=(Tensor("kp_canonical", (1, 15, 3), kind="keypoints", source="kp_detector.kp_canonical"),
                Tensor("semantics", (BATCH, FULL_COEFFS, SEMANTIC_WINDOW), kind="semantics")),
        outputs=(Tensor("kp", (BATCH, 15, 3), kind="keypoints"),),
        subnetworks=("mapping_full",),
        fp32_reason=_MAPPING_FP32,
        profile=(1, 4, 32),
    ),
    # The mapping stages with free-view head pose (--input-yaw/pitch/roll): ``angles`` holds (yaw, pitch, roll)
    # in degrees per frame; where ``angle_given`` is 1 that angle replaces the one MappingNet predicts.
    # Stages of their own, so the default graphs stay as they are.
    **{f"{name}_free_view": Stage(
        f"{name}_free_view", "frame",
        inputs=(Tensor("kp_canonical", (1, 15, 3), kind="keypoints", source="kp_detector.kp_canonical"),
                Tensor("semantics", (BATCH, channels, SEMANTIC_WINDOW), kind="semantics"),
                Tensor("angles", (BATCH, 3), kind="degrees"), Tensor("angle_given", (1, 3), kind="mask")),
        outputs=(Tensor("kp", (BATCH, 15, 3), kind="keypoints"),),
        subnetworks=(name,),
        fp32_reason=_MAPPING_FP32,
        profile=(1, 4, 32),
        option="--input-yaw/--input-pitch/--input-roll",
    ) for name, channels in (("mapping", COEFFS), ("mapping_full", FULL_COEFFS))},
    # Dense motion, two 5-D grid samples, occlusion, SPADE decoder: the hot path.
    "renderer": Stage(
        "renderer", "frame",
        inputs=(
            Tensor("feature_3d", (1, 32, 16, "F", "F"), source="source_encoder.feature_3d"),
            Tensor("source_compressed", (1, 4, 16, "F", "F"), source="source_encoder.source_compressed"),
            Tensor("kp_source", (1, 15, 3), kind="keypoints", source="mapping.kp"),
            Tensor("kp_driving", (BATCH, 15, 3), kind="keypoints", source="mapping.kp"),
        ),
        outputs=(Tensor("frames", (BATCH, 3, "S", "S"), kind="image"),),
        subnetworks=("generator",),
        profile=(1, 4, 8),
    ),
    "audio2exp": Stage(
        "audio2exp", "audio",
        inputs=(Tensor("indiv_mels", (FRAMES, 1, 80, 16), kind="mels"),
                Tensor("ref_exp", (FRAMES, EXPRESSION.stop - EXPRESSION.start)), Tensor("blink", (FRAMES, 1))),
        outputs=(Tensor("exp", (FRAMES, 64)),),
        subnetworks=("audio2exp",),
        fp32_reason="~0.1 GFLOP per frame, run once per utterance; FP16 buys nothing",
        profile=(1, 200, 4000),
    ),
    # PoseVAE decoder for one chunk of POSE_CHUNK frames; the latent noise is an input.
    "audio2pose": Stage(
        "audio2pose", "audio",
        inputs=(
            Tensor("indiv_mels", (POSE_CHUNK, 1, 80, 16), kind="mels"),
            Tensor("ref_pose", (1, POSE.stop - POSE.start)),
            Tensor("pose_style", (1,), "int64", kind="class"),
            Tensor("noise", (1, 64)),
        ),
        outputs=(Tensor("motion", (POSE_CHUNK, POSE.stop - POSE.start)),),
        subnetworks=("audio2pose",),
        fp32_reason="one 32-frame chunk per call; head motion is sensitive and the cost is negligible",
    ),
}

ORDER = tuple(STAGES)           # export and report order: per photo, per frame, per utterance
DEFAULT_PIPELINE = tuple(name for name in ORDER if not STAGES[name].option)   # what every run calls

# The face enhancer (``--enhancer gfpgan``): GFPGAN v1.4 on 512x512 faces aligned to the FFHQ template, and
# the parsing network whose classes shape the paste-back mask. Alignment and paste-back are numpy/OpenCV.
ENHANCER_FACE = 512
ENHANCER_UPSCALE = 2
ENHANCER_NOISE_SIDES = (4, 8, 8, 16, 16, 32, 32, 64, 64, 128, 128, 256, 256, 512, 512)
ENHANCER_NOISE_MODES = ("fixed", "seeded", "fresh")
ENHANCER_STAGES = ("enhancer", "face_parse")

STAGES["enhancer"] = Stage(
    "enhancer", "frame",
    inputs=(Tensor("face", (BATCH, 3, ENHANCER_FACE, ENHANCER_FACE), kind="face"),
            *(Tensor(f"noise{i}", (BATCH, 1, side, side), kind="noise") for i, side in enumerate(ENHANCER_NOISE_SIDES))),
    outputs=(Tensor("image", (BATCH, 3, ENHANCER_FACE, ENHANCER_FACE), kind="face"),),
    subnetworks=("gfpgan",),
    profile=(1, 4, 8),
    option="--enhancer gfpgan",
)
STAGES["face_parse"] = Stage(
    "face_parse", "frame",
    inputs=(Tensor("face", (BATCH, 3, ENHANCER_FACE, ENHANCER_FACE), kind="face"),),
    outputs=(Tensor("parse", (BATCH, ENHANCER_FACE, ENHANCER_FACE), "int64", kind="class"),),
    subnetworks=("parsenet",),
    profile=(1, 4, 8),
    option="--enhancer gfpgan",
)
EXPORT_ORDER = ORDER + ENHANCER_STAGES   # what `export` can make, in order; the enhancer only when asked


def is_full(preprocess: str) -> bool:
    return preprocess in FULL_MODES


def mapping_stage(preprocess: str, free_view: bool = False) -> str:
    """Full modes drive the renderer with 73 coefficients (the crop parameters included), others with 70;
    free view (given head angles) has a stage of its own."""
    name = "mapping_full" if is_full(preprocess) else "mapping"
    return f"{name}_free_view" if free_view else name


def upstream(tensor: Tensor) -> tuple[str, str] | None:
    """(stage, output) that feeds ``tensor``, or None for a host input."""
    if not tensor.source:
        return None
    stage, _, output = tensor.source.partition(".")
    return stage, output


@dataclass(frozen=True)
class PoseChunk:
    """One CVAE call over ``mels[:, 1:]`` (frame 0 is the reference frame, motion 0).

    ``start:stop`` are the audio frames encoded (fewer than POSE_CHUNK only when the whole sequence is
    shorter; the encoder output is then front-padded by repeating its first frame); the last
    ``keep`` decoded motions are used.
    """

    start: int
    stop: int
    keep: int


def pose_chunks(T: int) -> list[PoseChunk]:
    """The chunk layout of ``Audio2Pose.test`` for T frames; one latent vector per chunk."""
    if T < 1:
        raise ValueError(f"a pose sequence needs at least one frame, got T={T}")
    n = T - 1
    full, rest = divmod(n, POSE_CHUNK)
    chunks = [PoseChunk(k * POSE_CHUNK, (k + 1) * POSE_CHUNK, POSE_CHUNK) for k in range(full)]
    if rest:
        chunks.append(PoseChunk(max(0, n - POSE_CHUNK), n, rest))
    return chunks
