"""``sadtalker-rt bench``: latency and parity of every backend, side by side in one run.

The baseline runs first: the official loop's way, float32 eager PyTorch with the whole generator per
call (the source image re-encoded every call) at the official batch of 2. Its end-to-end run records
every stage's inputs and outputs; those are the reference inputs that every other backend is fed, and
its outputs are the float32 reference that parity is measured against. Each backend then goes through
the same steps:

1. setup: open the backend (export ONNX graphs or build engines where needed) and load every stage;
2. warm-up and per-stage parity: each stage runs ``warmup`` times on the reference inputs; the first
   call's outputs are compared with the reference outputs;
3. end to end: prepare the avatar, then motion + render + paste-back of ``frames`` frames through
   ``TalkingHead``, with a timing hook around every runner (``InstrumentedBackend``);
4. per-stage timing: per-frame stages at the end-to-end batch are timed from the end-to-end run's own
   calls when it made at least ``repeats`` of them; every other (stage, batch) gets ``warmup`` + ``repeats``
   dedicated calls on the reference inputs.

Frames of the end-to-end run are compared with the baseline's: whole-frame PSNR and SSIM, PSNR inside
the mouth box, the largest keypoint difference, and the head pose recovered from the keypoints, so
that a frozen mouth or head fails even where whole-frame PSNR looks fine. Thresholds live in
``THRESHOLDS`` and are written into every report. ``SCHEMA`` is the JSON schema of the report
(documented field by field in ``benchmarks/README.md``). Only the stdlib and numpy are imported here;
torch, onnxruntime and TensorRT are imported inside the functions that use them.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np

from . import __version__
from .errors import SadTalkerError, UsageError
from .runtime.backends import SerialBackend
from .stages import BATCH, FPS, FRAMES, ORDER, POSE_CHUNK, SAMPLE_RATE, SAMPLES_PER_FRAME, STAGES, mapping_stage

SCHEMA_VERSION = 1
OFFICIAL_BATCH = 2                        # frames per generator call in the official loop
MIB = 1024.0 * 1024.0

RUNTIMES = ("torch", "onnxruntime", "tensorrt")
ALIASES = {"onnxruntime": ("onnxruntime-fp32", "onnxruntime-fp16"), "tensorrt": ("tensorrt-fp32", "tensorrt-fp16"),
           "torch-fp32": ("torch",)}

# The mouth box when landmarks are not used (or not found): lower middle of the S x S crop frame, where
# the official crop puts the mouth (x 30-70 %, y 62-90 % of the side).
FIXED_MOUTH_BOX = (0.30, 0.62, 0.70, 0.90)
MOUTH_MARGIN = 0.35                       # landmark box grown by this share of its size on each side (head motion)
MOUTH_POINTS = slice(48, 68)              # iBUG 68-point layout: outer and inner lips


@dataclass(frozen=True)
class Threshold:
    limit: float
    op: str                               # "<=" (an error) or ">=" (a quality)
    reason: str

    def passes(self, value: float | None) -> bool:
        if value is None or math.isnan(value):
            return False
        return value <= self.limit if self.op == "<=" else value >= self.limit


# Pass/fail bounds of the parity checks; each reason is written into the report.
THRESHOLDS: dict[str, Threshold] = {
    "stage_max_rel_fp32": Threshold(
        1e-4, "<=", "FP32 stages: max|diff| / max(1, max|ref|), the export contract for FP32 graphs "
                    "(the stage table's rtol_fp32)"),
    "stage_max_rel_fp16": Threshold(
        5e-2, "<=", "FP16 (and TF32) stages, non-image outputs: the export bound for FP16 graphs"),
    "stage_image_psnr_db_fp16": Threshold(
        40.0, ">=", "FP16 (and TF32) stages, image outputs: judged by PSNR as the export does; 40 dB is ~1 % RMS"),
    "frame_psnr_db": Threshold(
        40.0, ">=", "worst frame of the end-to-end run against the reference; ~1 % RMS error, invisible at a glance"),
    "frame_ssim": Threshold(
        0.98, ">=", "worst frame; structure rather than energy: blur, ringing or a shifted face lower it"),
    "mouth_psnr_db": Threshold(
        40.0, ">=", "worst frame inside the mouth box; the box is ~10 % of the frame, so an error there costs "
                    "~10 dB less whole-frame PSNR than it costs here: a frozen or wrong mouth fails here first"),
    "kp_max_abs": Threshold(
        5e-3, "<=", "keypoints span [-1, 1] across the frame: 5e-3 is ~0.6 px at 256 and a sixth of a voxel of "
                    "the 64-wide motion volume; FP32 mapping graphs differ by ~1e-6"),
    "head_pose_deg": Threshold(
        0.5, "<=", "largest yaw, pitch or roll difference, in degrees; below what a viewer notices, far above "
                   "FP32 noise (~1e-4 deg)"),
}

HEAD_POSE_METHOD = ("rotation fitted by least squares (Kabsch) from the reference kp_canonical to each frame's "
                    "kp_driving, decomposed as R = Rx(pitch) Ry(yaw) Rz(roll) like the mapping stage; the expression "
                    "offsets are part of the residual and are the same for matching backends")


# ---------------------------------------------------------------------------------------------- config

@dataclass
class BenchConfig:
    """What one ``sadtalker-rt bench`` run measures. Paths may be None: the bundled demo photo and speech."""

    weights: object                                   # sadtalker_rt.models.checkpoints.WeightSource
    size: int = 256
    backends: tuple[str, ...] = ()                    # empty: every backend this machine can run
    batch_sizes: tuple[int, ...] = (OFFICIAL_BATCH,)  # per-frame stage timings; the first is the end-to-end batch
    frames: int = 8
    warmup: int = 1
    repeats: int = 3
    image: Optional[Path] = None
    audio: Optional[Path] = None
    engines_dir: Optional[Path] = None
    device: str = "auto"                              # auto, cpu or cuda
    preprocess: str = "crop"
    mouth_box: str = "landmarks"                      # landmarks (fixed box where no face is found) or fixed
    export_source: Optional[np.ndarray] = None        # (1, 3, S, S) image exports validate on; None: the avatar's frame

    def validate(self) -> None:
        if self.frames < 1:
            raise UsageError(f"--frames must be at least 1, not {self.frames}.")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise UsageError(f"--batch-sizes must be positive integers, not {list(self.batch_sizes)}.")
        if self.warmup < 0 or self.repeats < 1:
            raise UsageError(f"--warmup must be >= 0 and --repeats >= 1 (got {self.warmup}, {self.repeats}).")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, not '{self.device}'.")
        if self.mouth_box not in ("landmarks", "fixed"):
            raise UsageError(f"mouth_box must be 'landmarks' or 'fixed', not '{self.mouth_box}'.")

    @property
    def e2e_batch(self) -> int:
        return self.batch_sizes[0]


def parse_list(text: str | None, kind: type = str) -> tuple:
    """'a, b,c' -> ('a', 'b', 'c'); with kind=int, integers (a UsageError names the bad item)."""
    if text is None:
        return ()
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        return tuple(kind(t) for t in items)
    except ValueError:
        raise UsageError(f"'{text}' is not a comma-separated list of {kind.__name__} values.") from None


def expand_backends(names: tuple[str, ...], known: tuple[str, ...]) -> tuple[str, ...]:
    """Aliases expanded (onnxruntime -> both precisions), duplicates dropped, unknown names refused."""
    out: list[str] = []
    for name in names:
        for item in ALIASES.get(name, (name,)):
            if item not in known:
                raise UsageError(f"unknown backend '{name}'; choose from {', '.join(known)} "
                                 f"(onnxruntime and tensorrt mean both precisions).")
            if item not in out:
                out.append(item)
    return tuple(out)


def default_backends(device: str, engines_dir: Path | None) -> tuple[str, ...]:
    """CPU: torch, onnxruntime FP32 and FP16. CUDA: torch FP32 and FP16, onnxruntime FP32 where onnxruntime has
    a CUDA provider, TensorRT FP32 and FP16 where --engines-dir is given and TensorRT imports."""
    if device != "cuda":
        return ("torch", "onnxruntime-fp32", "onnxruntime-fp16")
    names = ["torch", "torch-fp16"]
    if "CUDAExecutionProvider" in _ort_providers():
        names.append("onnxruntime-fp32")
    if engines_dir is not None and _tensorrt_version()[0] is not None:
        names += ["tensorrt-fp32", "tensorrt-fp16"]
    return tuple(names)


# ---------------------------------------------------------------------------------------------- measuring

class MemoryProbe:
    """Peak resident memory of this process around a call.

    On Linux the kernel's high-water mark (VmHWM, the same counter as ``getrusage().ru_maxrss``) is reset
    before each call through /proc/self/clear_refs, so the peak after the call is the call's own. Elsewhere
    ``ru_maxrss`` only ever grows, so a call shows only what it adds above the earlier peak (a lower bound).
    """

    def __init__(self):
        self.reset_works = self._reset()
        self.method = ("VmHWM of /proc/self/status, reset before each call via /proc/self/clear_refs "
                       "(= getrusage ru_maxrss)" if self.reset_works else
                       "getrusage ru_maxrss growth during the call (a lower bound: the counter never resets here)")

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> float | None:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(key + ":"):
                        return float(line.split()[1]) * 1024.0
        except OSError:
            return None
        return None

    @staticmethod
    def _maxrss() -> float:
        import resource

        value = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return value if sys.platform == "darwin" else value * 1024.0      # bytes on macOS, KiB elsewhere

    def start(self) -> tuple[float, float]:
        """(resident bytes now, high-water mark now); resets the mark where possible."""
        if self.reset_works:
            self._reset()
        rss = self._status("VmRSS")
        return (rss if rss is not None else self._maxrss()), self._maxrss()

    def peak(self, started: tuple[float, float]) -> tuple[float, float]:
        """(peak resident bytes during the call, bytes above the resident size at its start)."""
        rss, mark = started
        peak = self._maxrss()
        if not self.reset_works and peak <= mark:
            return peak, 0.0
        return peak, max(0.0, peak - rss)


class GpuProbe:
    """GPU memory around a call, through torch: the caching allocator's peak for torch backends, the
    device-wide memory in use after the call (cudaMemGetInfo) for the others. Inactive on CPU."""

    def __init__(self, device: str, runtime: str):
        self.active = device == "cuda"
        self.allocator = runtime == "torch"
        self.method = None
        if self.active:
            self.method = ("torch.cuda.max_memory_allocated during the call" if self.allocator else
                           "device memory in use after the call (torch.cuda.mem_get_info: total - free)")

    def start(self) -> None:
        if self.active:
            import torch

            torch.cuda.synchronize()
            if self.allocator:
                torch.cuda.reset_peak_memory_stats()

    def stop(self) -> float | None:
        if not self.active:
            return None
        import torch

        torch.cuda.synchronize()
        if self.allocator:
            return torch.cuda.max_memory_allocated() / MIB
        free, total = torch.cuda.mem_get_info()
        return (total - free) / MIB


@dataclass
class Call:
    stage: str
    phase: str                 # "warmup", "timed-prepare", "timed-generate" or "timing"
    batch: int
    seconds: float
    peak_rss: float            # bytes
    rss_delta: float           # bytes
    gpu_mib: float | None


@dataclass
class CallLog:
    """What an instrumented backend saw: one Call per infer, the first feeds and outputs of each stage per phase,
    and the renderer's and mapping's full inputs and outputs of the end-to-end run."""

    calls: list = field(default_factory=list)
    first: dict = field(default_factory=dict)          # (phase, stage) -> (feeds, outputs)
    series: dict = field(default_factory=dict)         # (phase, stage, name) -> [arrays]
    phase: str = "setup"

    def keep(self, stage: str, feeds: dict, outputs: dict) -> None:
        self.first.setdefault((self.phase, stage), (dict(feeds), dict(outputs)))
        if STAGES[stage].rate == "frame":
            for name, value in list(feeds.items()) + list(outputs.items()):
                if name in ("kp_driving", "frames", "semantics", "kp"):
                    self.series.setdefault((self.phase, stage, name), []).append(np.asarray(value))

    def stacked(self, phase: str, stage: str, name: str) -> np.ndarray | None:
        arrays = self.series.get((phase, stage, name))
        return None if not arrays else np.concatenate(arrays, axis=0)

    def of(self, stage: str, phase: str, batch: int | None = None) -> list[Call]:
        return [c for c in self.calls if c.stage == stage and c.phase == phase and (batch is None or c.batch == batch)]


def call_batch(stage: str, feeds: Mapping[str, np.ndarray]) -> int:
    """Frames of one call: the dynamic axis of its inputs (batch or utterance frames), else 1."""
    for tensor in STAGES[stage].inputs:
        if BATCH in tensor.shape or FRAMES in tensor.shape:
            return int(np.shape(feeds[tensor.name])[0])
    return 1


class InstrumentedRunner:
    """Times a runner's ``infer`` (perf_counter; CUDA synchronised on both sides on a GPU) and records it."""

    def __init__(self, inner, stage: str, owner: "InstrumentedBackend"):
        self.inner = inner
        self.stage = STAGES[stage]
        self.owner = owner

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        owner = self.owner
        owner.gpu.start()
        started = owner.memory.start()
        owner.sync()
        begin = time.perf_counter()
        outputs = self.inner.infer(feeds)
        owner.sync()
        seconds = time.perf_counter() - begin
        peak, delta = owner.memory.peak(started)
        gpu = owner.gpu.stop()
        log = owner.log
        batch = call_batch(self.stage.name, feeds)
        log.calls.append(Call(self.stage.name, log.phase, batch, seconds, peak, delta, gpu))
        log.keep(self.stage.name, feeds, outputs)
        return outputs


class InstrumentedBackend(SerialBackend):
    """Wraps any backend (``runner(stage)``) so that every call lands in ``log``; stages run in order."""

    def __init__(self, backend, device: str, runtime: str, memory: MemoryProbe):
        self.backend = backend
        self.log = CallLog()
        self.memory = memory
        self.gpu = GpuProbe(device, runtime)
        self.device = device
        self._runners: dict[str, InstrumentedRunner] = {}

    @property
    def size(self) -> int:
        return self.backend.size

    def runner(self, stage: str) -> InstrumentedRunner:
        if stage not in self._runners:
            self._runners[stage] = InstrumentedRunner(self.backend.runner(stage), stage, self)
        return self._runners[stage]

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self.log.phase = self.log.phase, name
        try:
            yield
        finally:
            self.log.phase = previous


def summarize(values_ms: list[float]) -> dict:
    values = np.asarray(values_ms, dtype=np.float64)
    return {"median": float(np.median(values)), "p95": float(np.percentile(values, 95)), "min": float(values.min()),
            "mean": float(values.mean())}


# ---------------------------------------------------------------------------------------------- the official baseline

class OfficialRenderer:
    """The official loop's renderer call: the whole generator, the source image batch-expanded and re-encoded
    on every call (``OcclusionAwareSPADEGenerator.forward``). Takes the renderer stage's feeds and ignores the
    cached features in them."""

    def __init__(self, generator, backend: "OfficialBackend"):
        self.stage = STAGES["renderer"]
        self.generator = generator
        self.backend = backend

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from .runtime.backends import check_feeds

        check_feeds(self.stage, feeds)
        if self.backend.source_image is None:
            raise RuntimeError("the official renderer needs the source image; run kp_detector first")
        device = self.backend.device
        kp_driving = torch.from_numpy(np.ascontiguousarray(feeds["kp_driving"])).to(device)
        kp_source = torch.from_numpy(np.ascontiguousarray(feeds["kp_source"])).to(device)
        image = torch.from_numpy(np.ascontiguousarray(self.backend.source_image)).to(device)
        batch = kp_driving.shape[0]
        with torch.inference_mode():
            out = self.generator(image.expand(batch, -1, -1, -1), kp_source.expand(batch, -1, -1), kp_driving)
        return {"frames": out["prediction"].float().cpu().numpy()}


class _SourceTap:
    """Passes a stage through and remembers the source image fed to it."""

    def __init__(self, inner, backend: "OfficialBackend"):
        self.inner = inner
        self.stage = inner.stage
        self.backend = backend

    def infer(self, feeds):
        self.backend.source_image = np.asarray(feeds["source_image"])
        return self.inner.infer(feeds)


class OfficialBackend(SerialBackend):
    """Float32 eager PyTorch as the official inference loop runs it: every stage from the torch backend, the
    renderer replaced by the whole generator per call."""

    name = "official"

    def __init__(self, torch_backend):
        self.torch = torch_backend
        self.size = torch_backend.size
        self.device = torch_backend.device
        self.source_image: np.ndarray | None = None
        self._renderer = None

    def runner(self, stage: str):
        if stage == "renderer":
            if self._renderer is None:
                generator = self.torch.subnetwork("generator").to(self.device).eval()
                self._renderer = OfficialRenderer(generator, self)
            return self._renderer
        inner = self.torch.runner(stage)
        return _SourceTap(inner, self) if stage == "kp_detector" else inner


# ---------------------------------------------------------------------------------------------- opening backends

@dataclass
class Opened:
    """A backend ready to measure, with what the report says about it."""

    backend: object
    runtime: str
    device: str
    precision: str
    stage_precision: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


class ParityFailure(SadTalkerError):
    """A benchmarked backend failed a parity check or crashed (the reports are written first)."""

    exit_code = 1


class BackendSkipped(Exception):
    """The backend cannot run here; the message is the reason recorded in the report."""


@dataclass
class BenchContext:
    config: BenchConfig
    device: str
    work_dir: Path
    stages: tuple[str, ...]
    progress: Callable[[str, int, int], None]
    export_source: np.ndarray | None = None
    torch_backends: dict = field(default_factory=dict)      # precision -> TorchBackend, shared

    def torch_backend(self, precision: str = "fp32"):
        """One torch backend per precision, shared by the baseline and the ``torch`` backends."""
        if precision not in self.torch_backends:
            from .runtime.backends.torch_backend import TorchBackend

            self.torch_backends[precision] = TorchBackend(self.config.weights, size=self.config.size,
                                                          device=self.device, precision=precision)
        return self.torch_backends[precision]


Opener = Callable[[BenchContext], Opened]


def _torch_precision(device: str) -> str:
    if device != "cuda":
        return "fp32"
    import torch

    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def open_official(ctx: BenchContext) -> Opened:
    precision = _torch_precision(ctx.device)
    return Opened(OfficialBackend(ctx.torch_backend("fp32")), "torch", ctx.device, precision,
                  {s: precision for s in ctx.stages},
                  ["whole generator per renderer call, source re-encoded every call (the official loop)"])


def open_torch(ctx: BenchContext) -> Opened:
    precision = _torch_precision(ctx.device)
    notes = ["TF32 convolutions (PyTorch's default on CUDA)"] if precision == "tf32" else []
    return Opened(ctx.torch_backend("fp32"), "torch", ctx.device, precision, {s: precision for s in ctx.stages}, notes)


def open_torch_fp16(ctx: BenchContext) -> Opened:
    if ctx.device != "cuda":
        raise BackendSkipped("torch FP16 (autocast) needs a CUDA device (--device cuda)")
    base = _torch_precision(ctx.device)
    per_stage = {s: base if STAGES[s].fp32_reason else "fp16-autocast" for s in ctx.stages}
    return Opened(ctx.torch_backend("fp16"), "torch", ctx.device, "fp16", per_stage,
                  ["autocast FP16; grid sampling, normalisation statistics and softmax stay FP32"])


def _graphs(ctx: BenchContext, precision: str) -> tuple[Path, list[str]]:
    """Exported graphs of one precision: reused from --engines-dir when they match, else exported."""
    from .runtime.manifest import load_manifest, verified_path
    from .build.export.onnx_export import ExportValidationError, export_graphs
    from .stages import ORDER

    from .build.tensorrt import resolve_grid_sample

    weights, size = ctx.config.weights, ctx.config.size
    grid_sample = resolve_grid_sample()         # the form the installed TensorRT (if any) can build
    if ctx.config.engines_dir is not None:
        directory = Path(ctx.config.engines_dir) / f"onnx-{precision}-{size}-{weights.identity()}"
    else:
        directory = ctx.work_dir / f"onnx-{precision}"
    try:
        manifest = load_manifest(directory)
        if (manifest.get("size") == size and manifest.get("precision") == precision
                and manifest.get("grid_sample") == grid_sample
                and manifest.get("weights", {}).get("identity") == weights.identity()):
            for stage in ORDER:
                verified_path(directory, manifest, stage)
            return directory, [f"reused the {precision} graphs in {directory.name}"]
    except SadTalkerError:
        pass        # absent, damaged or other weights: export below
    begin = time.perf_counter()
    notes = []
    try:
        export_graphs(weights, size, directory, precision=precision, grid_sample=grid_sample,
                      source_image=ctx.export_source,
                      progress=_prefixed(ctx.progress, f"export {precision}"))
    except ExportValidationError as err:        # the graphs were written; the bench measures their parity itself
        notes.append(f"export validation: {err}")
    except SadTalkerError as err:
        raise BackendSkipped(f"export of the {precision} graphs failed: {err}") from None
    except Exception as err:  # an exporter bug must not cost the other backends' measurements
        raise BackendSkipped(f"export of the {precision} graphs failed ({type(err).__name__}: "
                             f"{_one_line(err)})") from None
    notes.insert(0, f"exported {precision} graphs in {time.perf_counter() - begin:.0f} s")
    return directory, notes


def _manifest_precisions(directory: Path, stages: tuple[str, ...]) -> dict:
    from .runtime.manifest import load_manifest

    entries = load_manifest(directory)["stages"]
    return {s: entries[s]["precision"] for s in stages if s in entries}


def _open_onnxruntime(ctx: BenchContext, precision: str) -> Opened:
    from .runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    if ctx.device == "cuda" and "CUDAExecutionProvider" not in _ort_providers():
        raise BackendSkipped("this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
    if ctx.device == "cuda" and precision == "fp16":
        raise BackendSkipped("onnxruntime's CUDA provider runs 5-D GridSample in float32 only")
    directory, notes = _graphs(ctx, precision)
    backend = OnnxRuntimeBackend(directory, device=ctx.device)
    return Opened(backend, "onnxruntime", ctx.device, precision, _manifest_precisions(directory, ctx.stages), notes)


def open_onnxruntime_fp32(ctx: BenchContext) -> Opened:
    return _open_onnxruntime(ctx, "fp32")


def open_onnxruntime_fp16(ctx: BenchContext) -> Opened:
    return _open_onnxruntime(ctx, "fp16")


def _open_tensorrt(ctx: BenchContext, precision: str) -> Opened:
    version, problem = _tensorrt_version()
    if version is None:
        raise BackendSkipped(f"TensorRT is not usable here ({problem})")
    if ctx.device != "cuda":
        raise BackendSkipped("TensorRT needs a CUDA device (--device cuda)")
    if ctx.config.engines_dir is None:
        raise BackendSkipped("TensorRT engines are kept in --engines-dir; give one")
    from .runtime.backends.tensorrt_backend import TensorRTBackend
    from .build.tensorrt import build_engines

    onnx_dir, notes = _graphs(ctx, precision)
    engines = Path(ctx.config.engines_dir) / f"tensorrt-{precision}-{ctx.config.size}-{ctx.config.weights.identity()}"
    begin = time.perf_counter()
    result = build_engines(onnx_dir, engines, max_batch=max(8, *ctx.config.batch_sizes),
                           opt_batch=ctx.config.e2e_batch, progress=_prefixed(ctx.progress, f"engines {precision}"))
    notes.append(f"engines: {len(result.built)} built, {len(result.reused)} reused "
                 f"({time.perf_counter() - begin:.0f} s)")
    return Opened(TensorRTBackend(engines), "tensorrt", "cuda", precision, _manifest_precisions(onnx_dir, ctx.stages),
                  notes)


def open_tensorrt_fp32(ctx: BenchContext) -> Opened:
    return _open_tensorrt(ctx, "fp32")


def open_tensorrt_fp16(ctx: BenchContext) -> Opened:
    return _open_tensorrt(ctx, "fp16")


OPENERS: dict[str, Opener] = {
    "official": open_official,
    "torch": open_torch,
    "torch-fp16": open_torch_fp16,
    "onnxruntime-fp32": open_onnxruntime_fp32,
    "onnxruntime-fp16": open_onnxruntime_fp16,
    "tensorrt-fp32": open_tensorrt_fp32,
    "tensorrt-fp16": open_tensorrt_fp16,
}


# ---------------------------------------------------------------------------------------------- parity

def kabsch_rotation(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The rotation R (3, 3) that best maps the centred rows of ``source`` (K, 3) onto those of ``target``
    (target ~ source R^T), by the Kabsch algorithm."""
    a = source - source.mean(axis=0)
    b = target - target.mean(axis=0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    return vt.T @ np.diag([1.0, 1.0, d]) @ u.T


def euler_degrees(rotation: np.ndarray) -> np.ndarray:
    """(yaw, pitch, roll) in degrees of R = Rx(pitch) Ry(yaw) Rz(roll), the mapping stage's convention."""
    r = rotation
    yaw = math.asin(max(-1.0, min(1.0, r[0, 2])))
    pitch = math.atan2(-r[1, 2], r[2, 2])
    roll = math.atan2(-r[0, 1], r[0, 0])
    return np.degrees([yaw, pitch, roll])


def head_pose_delta(kp_canonical: np.ndarray, kp: np.ndarray, kp_ref: np.ndarray) -> dict:
    """Largest per-frame yaw/pitch/roll difference (degrees) between two keypoint sequences (N, K, 3), and the
    largest angle of the relative rotation."""
    canonical = np.asarray(kp_canonical, np.float64).reshape(-1, 3)
    worst = np.zeros(3)
    angle = 0.0
    for ours, ref in zip(np.asarray(kp, np.float64), np.asarray(kp_ref, np.float64)):
        r_ours, r_ref = kabsch_rotation(canonical, ours), kabsch_rotation(canonical, ref)
        diff = np.abs(euler_degrees(r_ours) - euler_degrees(r_ref))
        worst = np.maximum(worst, np.minimum(diff, 360.0 - diff))
        cos = (np.trace(r_ours @ r_ref.T) - 1.0) / 2.0
        angle = max(angle, math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
    return {"yaw": float(worst[0]), "pitch": float(worst[1]), "roll": float(worst[2]), "max": float(worst.max()),
            "rotation": angle}


def fixed_mouth_box(size: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = FIXED_MOUTH_BOX
    return int(round(x1 * size)), int(round(y1 * size)), int(round(x2 * size)), int(round(y2 * size))


def mouth_box(frame: np.ndarray | None, size: int, mode: str = "landmarks") -> dict:
    """(x1, y1, x2, y2) of the mouth in the S x S renderer frame: the lip landmarks of the source frame grown by
    MOUTH_MARGIN on each side, or the fixed lower-middle box where landmarks are not used or not found."""
    fixed = {"box": list(fixed_mouth_box(size)), "source": "fixed",
             "description": "fixed lower-middle box: x {:.0%}-{:.0%}, y {:.0%}-{:.0%} of the frame".format(
                 FIXED_MOUTH_BOX[0], FIXED_MOUTH_BOX[2], FIXED_MOUTH_BOX[1], FIXED_MOUTH_BOX[3])}
    if mode == "fixed" or frame is None:
        return fixed
    from .runtime import landmarks

    try:
        points = landmarks.detect(frame, name="the source frame").landmarks[MOUTH_POINTS]
    except SadTalkerError:
        fixed["description"] += " (no face found in the source frame)"
        return fixed
    (x1, y1), (x2, y2) = points.min(axis=0), points.max(axis=0)
    mx, my = MOUTH_MARGIN * (x2 - x1), MOUTH_MARGIN * (y2 - y1)
    box = [max(0, int(math.floor(x1 - mx))), max(0, int(math.floor(y1 - my))),
           min(size, int(math.ceil(x2 + mx))), min(size, int(math.ceil(y2 + my)))]
    if box[2] - box[0] < 4 or box[3] - box[1] < 4:
        return fixed
    return {"box": box, "source": "landmarks",
            "description": f"dlib lip landmarks (points 48-67) of the source frame, grown by {MOUTH_MARGIN:.0%} "
                           "of their extent on each side"}


def _stage_limit(stage: str, precision: str, image: bool) -> tuple[str, Threshold]:
    loose = precision.startswith("fp16") or precision == "tf32"
    if loose and image:
        return "stage_image_psnr_db_fp16", THRESHOLDS["stage_image_psnr_db_fp16"]
    if loose:
        return "stage_max_rel_fp16", THRESHOLDS["stage_max_rel_fp16"]
    base = THRESHOLDS["stage_max_rel_fp32"]
    return "stage_max_rel_fp32", Threshold(STAGES[stage].rtol_fp32, base.op, base.reason)


def stage_parity(stage: str, precision: str, ours: dict, ref: dict, batch: int) -> tuple[dict, list[dict]]:
    """Every output of one stage call against the reference: error statistics and one check per output."""
    from .parity import compare

    rows, checks = [], []
    for result in compare(ours, ref, atol=0.0, rtol=0.0):
        image = result.psnr_db is not None and result.name == "frames"
        metric, threshold = _stage_limit(stage, precision, image)
        value = result.psnr_db if metric.startswith("stage_image") else result.max_rel
        passed = threshold.passes(value) and math.isfinite(result.max_abs)     # inf: missing, misshapen or non-finite
        rows.append({"name": result.name, "shape": list(result.shape), "max_abs": result.max_abs,
                     "max_rel": result.max_rel, "mean_abs": result.mean_abs, "p99_abs": result.p99_abs,
                     "psnr_db": result.psnr_db, "metric": metric, "limit": threshold.limit, "passed": passed})
        checks.append(_check(metric, f"{stage}.{result.name}", value, threshold, passed))
    return {"batch": batch, "outputs": rows}, checks


def _check(metric: str, scope: str, value, threshold: Threshold, passed: bool | None = None) -> dict:
    return {"metric": metric, "scope": scope, "value": value, "limit": threshold.limit, "op": threshold.op,
            "passed": threshold.passes(value) if passed is None else bool(passed)}


def frame_parity(frames: np.ndarray, ref: np.ndarray, kp: np.ndarray, kp_ref: np.ndarray, kp_canonical: np.ndarray,
                 box: list[int]) -> tuple[dict, list[dict]]:
    """End-to-end frames (N, 3, S, S) and keypoints (N, K, 3) against the reference run's."""
    from .parity import psnr, region_psnr, ssim

    if frames.shape != ref.shape or kp.shape != kp_ref.shape:
        raise ValueError(f"end-to-end outputs {frames.shape} / {kp.shape} do not match the reference "
                         f"{ref.shape} / {kp_ref.shape}")
    frame_psnr = [psnr(a, b) for a, b in zip(frames, ref)]
    frame_ssim = [ssim(a, b) for a, b in zip(frames, ref)]
    mouth = [region_psnr(a, b, tuple(box)) for a, b in zip(frames, ref)]
    kp_max = float(np.abs(kp.astype(np.float64) - kp_ref).max())
    pose = head_pose_delta(kp_canonical, kp, kp_ref)
    result = {
        "frames": int(frames.shape[0]),
        "frame_psnr_db": {"min": float(min(frame_psnr)), "mean": _mean_db(frame_psnr)},
        "frame_ssim": {"min": float(min(frame_ssim)), "mean": float(np.mean(frame_ssim))},
        "mouth_psnr_db": {"min": float(min(mouth)), "mean": _mean_db(mouth)},
        "kp_max_abs": kp_max,
        "head_pose_deg": pose,
    }
    checks = [
        _check("frame_psnr_db", "end_to_end", result["frame_psnr_db"]["min"], THRESHOLDS["frame_psnr_db"]),
        _check("frame_ssim", "end_to_end", result["frame_ssim"]["min"], THRESHOLDS["frame_ssim"]),
        _check("mouth_psnr_db", "end_to_end", result["mouth_psnr_db"]["min"], THRESHOLDS["mouth_psnr_db"]),
        _check("kp_max_abs", "end_to_end", kp_max, THRESHOLDS["kp_max_abs"]),
        _check("head_pose_deg", "end_to_end", pose["max"], THRESHOLDS["head_pose_deg"]),
    ]
    return result, checks


def _mean_db(values: list[float]) -> float:
    """Mean of per-frame PSNR values; infinite when any frame is identical to its reference."""
    return float(np.mean(values))


# ---------------------------------------------------------------------------------------------- one run

@dataclass
class Reference:
    """What the baseline's end-to-end run recorded: stage inputs and outputs, frames and keypoints."""

    log: CallLog
    frames: np.ndarray
    kp_driving: np.ndarray
    kp_canonical: np.ndarray
    mouth: dict

    def feeds(self, stage: str) -> tuple[dict, dict]:
        """The first call's (feeds, outputs) of ``stage``: from the end-to-end run, else avatar preparation."""
        for phase in ("generate", "prepare"):
            if ("timed-" + phase, stage) in self.log.first:
                return self.log.first[("timed-" + phase, stage)]
        raise KeyError(stage)

    def batch_feeds(self, stage: str, batch: int) -> dict:
        """The stage's inputs with the dynamic batch axis filled to ``batch`` from the run's own values."""
        feeds, _ = self.feeds(stage)
        out = dict(feeds)
        for tensor in STAGES[stage].inputs:
            if BATCH not in tensor.shape:
                continue
            pool = self.log.stacked("timed-generate", stage, tensor.name)
            pool = np.asarray(feeds[tensor.name]) if pool is None else pool
            reps = -(-batch // pool.shape[0])
            out[tensor.name] = np.ascontiguousarray(np.concatenate([pool] * reps)[:batch])
        return out


def _rate_frames(stage: str, batch: int) -> int | None:
    rate = STAGES[stage].rate
    if rate == "frame":
        return batch
    if stage == "audio2pose":
        return POSE_CHUNK
    if rate == "audio":
        return batch
    return None


def _timing(calls: list[Call], stage: str, batch: int, source: str) -> dict:
    ms = [c.seconds * 1000.0 for c in calls]
    per_call = summarize(ms)
    frames = _rate_frames(stage, batch)
    gpu = [c.gpu_mib for c in calls if c.gpu_mib is not None]
    return {
        "batch": batch, "frames_per_call": frames, "calls": len(calls), "source": source, "ms_per_call": per_call,
        "ms_per_frame": None if frames is None else {k: per_call[k] / frames for k in ("median", "p95", "min")},
        "fps": None if frames is None else 1000.0 * frames / per_call["median"],
        "speedup_vs_official": None,
        "peak_rss_mib": max(c.peak_rss for c in calls) / MIB,
        "peak_rss_delta_mib": max(c.rss_delta for c in calls) / MIB,
        "gpu_memory_mib": max(gpu) if gpu else None,
        "copies_ms_per_call": None,
    }


class BackendBench:
    """Runs the steps of one backend (see the module docstring) and returns its report entry."""

    def __init__(self, ctx: BenchContext, name: str, opened: Opened, memory: MemoryProbe):
        self.ctx = ctx
        self.name = name
        self.opened = opened
        self.instrumented = InstrumentedBackend(opened.backend, opened.device, opened.runtime, memory)
        self.config = ctx.config

    def setup(self) -> float:
        begin = time.perf_counter()
        for stage in self.ctx.stages:
            self.instrumented.runner(stage)
        return time.perf_counter() - begin

    def warm_up_and_parity(self, reference: Reference) -> tuple[dict, list[dict]]:
        stages, checks = {}, []
        with self.instrumented.phase("warmup"):
            for stage in self.ctx.stages:
                feeds, ref_outputs = reference.feeds(stage)
                outputs = self.instrumented.runner(stage).infer(feeds)
                for _ in range(self.config.warmup - 1):
                    self.instrumented.runner(stage).infer(feeds)
                precision = self.opened.stage_precision.get(stage, self.opened.precision)
                stages[stage], stage_checks = stage_parity(stage, precision, outputs, ref_outputs,
                                                           call_batch(stage, feeds))
                checks += stage_checks
        return stages, checks

    def warm_up_official(self, image, wav: np.ndarray) -> None:
        """The baseline has no reference inputs to warm up on: a short generate of one batch does it."""
        from .runtime.pipeline import Options, TalkingHead

        head = TalkingHead(self.instrumented, self.config.size)
        with self.instrumented.phase("warmup"):
            avatar = head.prepare_avatar(image, self.config.preprocess)
            list(head.generate(avatar, wav[: OFFICIAL_BATCH * SAMPLES_PER_FRAME + 1],
                               Options(batch_size=OFFICIAL_BATCH, seed=0)))

    def end_to_end(self, image, wav: np.ndarray, batch: int) -> tuple[dict, object]:
        from .runtime.pipeline import Options, TalkingHead

        head = TalkingHead(self.instrumented, self.config.size)
        progress = _prefixed(self.ctx.progress, self.name)
        with self.instrumented.phase("timed-prepare"):
            begin = time.perf_counter()
            avatar = head.prepare_avatar(image, self.config.preprocess)
            prepare_s = time.perf_counter() - begin
        with self.instrumented.phase("timed-generate"):
            started = self.instrumented.memory.start()
            begin = time.perf_counter()
            frames = head.generate(avatar, wav, Options(batch_size=batch, seed=0), progress)
            next(frames)
            first_s = time.perf_counter() - begin
            count = 1 + sum(1 for _ in frames)
            wall = time.perf_counter() - begin
            peak, _ = self.instrumented.memory.peak(started)
        calls = [c for c in self.instrumented.log.calls if c.phase == "timed-generate"]
        peak = max([peak] + [c.peak_rss for c in calls])      # each call resets the mark: take the calls' peaks too
        stage_seconds: dict[str, float] = {}
        stage_calls: dict[str, int] = {}
        for c in calls:
            stage_seconds[c.stage] = stage_seconds.get(c.stage, 0.0) + c.seconds
            stage_calls[c.stage] = stage_calls.get(c.stage, 0) + 1
        share = {s: v / wall for s, v in stage_seconds.items()}
        share["other"] = max(0.0, 1.0 - sum(share.values()))
        audio_s = len(wav) / SAMPLE_RATE
        e2e = {
            "batch": batch, "frames": count, "audio_seconds": audio_s, "prepare_avatar_s": prepare_s,
            "wall_s": wall, "wall_per_audio_second_s": wall / audio_s, "realtime_factor": audio_s / wall,
            "first_frame_s": first_s, "fps": count / wall, "speedup_vs_official": None,
            "first_frame_speedup_vs_official": None, "stage_seconds": stage_seconds, "stage_share": share,
            "calls": stage_calls, "peak_rss_mib": peak / MIB,
        }
        return e2e, avatar

    def stage_timings(self, reference: Reference | None) -> dict:
        """Per stage and batch: the end-to-end calls where there are enough, else dedicated calls."""
        out = {}
        log = self.instrumented.log
        for stage in self.ctx.stages:
            spec = STAGES[stage]
            precision = self.opened.stage_precision.get(stage, self.opened.precision)
            runs = []
            batches = self.config.batch_sizes if spec.rate == "frame" else (None,)
            if self.name == "official" and spec.rate == "frame":
                batches = (OFFICIAL_BATCH,)
            for batch in batches:
                e2e_calls = log.of(stage, "timed-generate", batch) if spec.rate == "frame" else []
                if len(e2e_calls) >= self.config.repeats:
                    runs.append(_timing(e2e_calls, stage, batch, "end_to_end"))
                    if reference is not None:
                        runs[-1]["copies_ms_per_call"] = _copies_ms(stage, reference.batch_feeds(stage, batch),
                                                                    self.config.size, self.opened.device)
                    continue
                feeds = (reference.batch_feeds(stage, batch) if batch is not None
                         else reference.feeds(stage)[0]) if reference is not None else None
                if feeds is None:
                    continue
                runner = self.instrumented.runner(stage)
                known = {c.batch for c in log.calls if c.stage == stage}
                fresh_shape = call_batch(stage, feeds) not in known
                with self.instrumented.phase("warmup"):
                    for _ in range(self.config.warmup if fresh_shape else 0):
                        runner.infer(feeds)
                first = len(log.calls)
                with self.instrumented.phase("timing"):
                    for _ in range(self.config.repeats):
                        runner.infer(feeds)
                timing = _timing(log.calls[first:], stage, call_batch(stage, feeds), "dedicated")
                timing["copies_ms_per_call"] = _copies_ms(stage, feeds, self.config.size, self.opened.device)
                runs.append(timing)
            out[stage] = {"rate": spec.rate, "precision": precision, "runs": runs}
        return out


def _copies_ms(stage: str, feeds: dict, size: int, device: str) -> float | None:
    """On a GPU: the host-to-device copies of the per-call inputs (those with a dynamic axis; per-avatar inputs stay
    on the device) and the device-to-host copies of the outputs, timed on their own with torch (pageable memory).
    They are part of ms_per_call, which is what the pipeline pays."""
    if device != "cuda":
        return None
    import torch

    spec = STAGES[stage]
    dynamic = [np.ascontiguousarray(feeds[t.name]) for t in spec.inputs if t.dynamic_axes()]
    n = call_batch(stage, feeds)
    on_device = [torch.zeros(t.resolve(size, **{BATCH: n, FRAMES: n}), device="cuda") for t in spec.outputs]
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        for array in dynamic:
            torch.from_numpy(array).cuda()
        for tensor in on_device:
            tensor.cpu()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - begin) * 1000.0)
    return float(np.median(times[1:]))


# ---------------------------------------------------------------------------------------------- the whole bench

def resolve_device(device: str) -> str:
    if device != "auto":
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--device cuda, but torch sees no CUDA device.")
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_bench(config: BenchConfig, progress: Callable[[str, int, int], None] | None = None,
              openers: Mapping[str, Opener] | None = None,
              log: Callable[[str], None] | None = None) -> dict:
    """Measure the official baseline and every backend; return the report (see ``SCHEMA``).

    ``openers`` adds or replaces backend openers by name (``"official"`` is the baseline); tests use it for stand-ins.
    """
    from . import media

    config.validate()
    progress = progress or (lambda stage, done, total: None)
    say = log or (lambda line: None)
    table = {**OPENERS, **(openers or {})}
    device = resolve_device(config.device)
    known = tuple(n for n in table if n != "official")
    names = expand_backends(config.backends, known) if config.backends else default_backends(device, config.engines_dir)
    image = Path(config.image) if config.image is not None else media.demo_image()
    audio = Path(config.audio) if config.audio is not None else media.demo_audio()
    wav = media.load_audio(audio)[: config.frames * SAMPLES_PER_FRAME]
    if len(wav) < SAMPLES_PER_FRAME:
        raise UsageError(f"{audio} is shorter than one video frame.")
    wav = wav[: len(wav) // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME]
    unused = {"mapping", "mapping_full"} - {mapping_stage(config.preprocess)}
    stages = tuple(s for s in ORDER if s not in unused)
    memory = MemoryProbe()
    load_at_start = _load_average()
    with tempfile.TemporaryDirectory(prefix="sadtalker-rt-bench-") as tmp:
        ctx = BenchContext(config, device, Path(tmp), stages, progress, config.export_source)
        say(f"official baseline: float32 eager PyTorch, whole generator per call, batch {OFFICIAL_BATCH}")
        baseline, reference = _run_baseline(ctx, table["official"], image, wav, memory)
        if ctx.export_source is None:       # exports validate on the avatar's own source frame
            ctx.export_source = np.asarray(reference.feeds("source_encoder")[0]["source_image"])
        runs = []
        for name in names:
            say(f"{name}: ...")
            runs.append(_run_backend(ctx, name, table[name], image, wav, reference, memory))
            say(f"{name}: {_status_line(runs[-1])}")
            gc.collect()
        ctx.torch_backends.clear()
    _add_ratios(baseline, runs)
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "sadtalker-rt bench", "version": __version__},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(device, load_at_start),
        "config": {
            "size": config.size, "frames": int(reference.frames.shape[0]), "audio_seconds": len(wav) / SAMPLE_RATE,
            "fps": FPS, "preprocess": config.preprocess, "device": device, "batch_sizes": list(config.batch_sizes),
            "end_to_end_batch": config.e2e_batch, "official_batch": OFFICIAL_BATCH, "warmup": config.warmup,
            "repeats": config.repeats, "backends_requested": list(names),
            "image": _display_path(config.image, media.demo_image()),
            "audio": _display_path(config.audio, media.demo_audio()),
            "engines_dir": None if config.engines_dir is None else str(config.engines_dir),
            "weights": {"identity": config.weights.identity(), "description": config.weights.describe(),
                        "synthetic": bool(config.weights.synthetic)},
            "memory_method": memory.method,
            "gpu_memory_method": None if device != "cuda" else (
                "torch backends: torch.cuda.max_memory_allocated during the call; others: device memory in use "
                "after the call (torch.cuda.mem_get_info: total - free)"),
            "mouth_box": reference.mouth,
            "head_pose_method": HEAD_POSE_METHOD,
            "thresholds": {k: {"limit": t.limit, "op": t.op, "reason": t.reason} for k, t in THRESHOLDS.items()},
        },
        "baseline": baseline,
        "backends": runs,
    }


def _run_baseline(ctx: BenchContext, opener: Opener, image, wav: np.ndarray, memory: MemoryProbe):
    begin = time.perf_counter()
    opened = opener(ctx)
    runner = BackendBench(ctx, "official", opened, memory)
    runner.setup()
    setup_s = time.perf_counter() - begin
    if ctx.config.warmup > 0:
        runner.warm_up_official(image, wav)
    with _float32_reference(ctx.device):
        e2e, avatar = runner.end_to_end(image, wav, OFFICIAL_BATCH)
    log = runner.instrumented.log
    if ctx.device == "cuda":
        # The reference ran with TF32 off; the official loop is timed again with PyTorch's defaults.
        runner.instrumented.log = CallLog()
        e2e, _ = runner.end_to_end(image, wav, OFFICIAL_BATCH)
    reference = Reference(log, log.stacked("timed-generate", "renderer", "frames"),
                          log.stacked("timed-generate", "renderer", "kp_driving"),
                          log.first[("timed-prepare", "kp_detector")][1]["kp_canonical"],
                          mouth_box(avatar.source_frame, ctx.config.size, ctx.config.mouth_box))
    entry = _entry("official", opened, "ok", None, setup_s)
    entry.update(stages=runner.stage_timings(reference), end_to_end=e2e, parity=None)
    entry["notes"].append("the reference of every parity figure" + (" (a second run, with TF32 disabled)"
                                                                      if ctx.device == "cuda" else ""))
    return entry, reference


@contextlib.contextmanager
def _float32_reference(device: str):
    """TF32 off on CUDA: the parity reference is true float32."""
    if device != "cuda":
        yield
        return
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _entry(name: str, opened: Opened | None, status: str, reason: str | None, setup_s: float | None) -> dict:
    return {
        "name": name, "runtime": opened.runtime if opened else _runtime_of(name),
        "device": opened.device if opened else None, "precision": opened.precision if opened else _precision_of(name),
        "status": status, "reason": reason, "notes": list(opened.notes) if opened else [], "setup_s": setup_s,
        "stage_precision": dict(opened.stage_precision) if opened else {}, "stages": {}, "end_to_end": None,
        "parity": None,
    }


def _runtime_of(name: str) -> str:
    return next((r for r in RUNTIMES if name.startswith(r)), name)


def _precision_of(name: str) -> str:
    match = re.search(r"fp(16|32)$", name)
    return match.group(0) if match else "fp32"


def _run_backend(ctx: BenchContext, name: str, opener: Opener, image, wav: np.ndarray, reference: Reference,
                 memory: MemoryProbe) -> dict:
    begin = time.perf_counter()
    try:
        opened = opener(ctx)
        runner = BackendBench(ctx, name, opened, memory)
        runner.setup()
    except (BackendSkipped, SadTalkerError, ImportError) as err:      # cannot run here: say why
        return _entry(name, None, "skipped", _one_line(err), None)
    except Exception as err:  # a bug in opening one backend must not cost the others' measurements
        return _entry(name, None, "failed", f"{type(err).__name__}: {_one_line(err)}", None)
    setup_s = time.perf_counter() - begin
    entry = _entry(name, opened, "ok", None, setup_s)
    try:
        stage_rows, checks = runner.warm_up_and_parity(reference)
        e2e, _ = runner.end_to_end(image, wav, ctx.config.e2e_batch)
        log = runner.instrumented.log
        end_to_end, e2e_checks = frame_parity(log.stacked("timed-generate", "renderer", "frames"), reference.frames,
                                              log.stacked("timed-generate", "renderer", "kp_driving"),
                                              reference.kp_driving, reference.kp_canonical, reference.mouth["box"])
        checks += e2e_checks
        entry["stages"] = runner.stage_timings(reference)
        entry["end_to_end"] = e2e
        failures = [f"{c['scope']} {c['metric']} {_fmt(c['value'])} (limit {c['op']} {_fmt(c['limit'])})"
                    for c in checks if not c["passed"]]
        entry["parity"] = {"reference": "official (float32 PyTorch)", "passed": not failures, "failures": failures,
                           "stages": stage_rows, "end_to_end": end_to_end, "checks": checks}
    except Exception as err:  # one backend's crash must not cost the others' measurements; the reason is reported
        entry["status"] = "failed"
        entry["reason"] = f"{type(err).__name__}: {_one_line(err)}"
    return entry


def _add_ratios(baseline: dict, runs: list[dict]) -> None:
    """speedup_vs_official = the official figure / this figure (above 1: faster than the official loop)."""
    def base_run(stage: str) -> dict | None:
        runs_ = baseline["stages"].get(stage, {}).get("runs", [])
        return runs_[0] if runs_ else None

    for entry in [baseline] + runs:
        for stage, info in entry["stages"].items():
            ref = base_run(stage)
            for run in info["runs"]:
                if ref is None:
                    continue
                key = "ms_per_frame" if ref["ms_per_frame"] and run["ms_per_frame"] else "ms_per_call"
                run["speedup_vs_official"] = ref[key]["median"] / run[key]["median"]
        if entry["end_to_end"] and baseline["end_to_end"]:
            e2e, ref = entry["end_to_end"], baseline["end_to_end"]
            e2e["speedup_vs_official"] = ref["wall_per_audio_second_s"] / e2e["wall_per_audio_second_s"]
            e2e["first_frame_speedup_vs_official"] = ref["first_frame_s"] / e2e["first_frame_s"]


def _status_line(entry: dict) -> str:
    if entry["status"] != "ok":
        return f"{entry['status']}: {entry['reason']}"
    e2e = entry["end_to_end"]
    verdict = "parity passed" if entry["parity"]["passed"] else f"parity FAILED ({len(entry['parity']['failures'])})"
    return f"{e2e['wall_per_audio_second_s']:.2f} s per audio second, {verdict}"


def _prefixed(progress: Callable[[str, int, int], None], prefix: str) -> Callable[[str, int, int], None]:
    return lambda stage, done, total: progress(f"{prefix} {stage}", done, total)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _display_path(given: Path | None, default: Path) -> str:
    """The path as the user gave it; the bundled demo inputs by their place in the package."""
    if given is not None:
        return str(given)
    return f"sadtalker_rt/assets/{default.name} (bundled)"


# ---------------------------------------------------------------------------------------------- environment

def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def _tensorrt_version() -> tuple[str | None, str | None]:
    try:
        import tensorrt
    except ImportError:
        return None, "not installed"
    except OSError as err:
        return None, f"its libraries did not load: {_one_line(err)}"
    return tensorrt.__version__, None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(float(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        return None
    return None


def _gpu(device: str) -> dict | None:
    if device != "cuda":
        return None
    import torch

    props = torch.cuda.get_device_properties(0)
    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0] or None
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}", "driver": driver,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "memory_gib": round(props.total_memory / 1024**3, 1)}


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(device: str, load_at_start: list[float] | None = None) -> dict:
    """What the numbers were measured on; no host names or paths. The load averages show whether other work
    shared the CPU during the run."""
    torch_threads = None
    if "torch" in sys.modules:
        torch_threads = sys.modules["torch"].get_num_threads()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    trt, trt_problem = _tensorrt_version()
    return {
        "python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
        "numpy": np.__version__, "torch": _version("torch"), "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"), "onnxruntime_providers": _ort_providers(),
        "tensorrt": trt, "tensorrt_problem": trt_problem,
        "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable,
                "torch_threads": torch_threads, "memory_gib": _memory_gib(),
                "load_average_start": load_at_start, "load_average_end": _load_average()},
        "gpu": _gpu(device),
    }


# ---------------------------------------------------------------------------------------------- JSON

def to_json_ready(value):
    """Non-finite floats become the strings "inf", "-inf" and "nan" (JSON has no such numbers); numpy scalars
    become Python ones."""
    if isinstance(value, dict):
        return {str(k): to_json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_json(report: dict, path: Path) -> None:
    import json

    Path(path).write_text(json.dumps(to_json_ready(report), indent=2, allow_nan=False) + "\n")


_NUM = {"type": "number"}
_METRIC = {"anyOf": [{"type": "number"}, {"enum": ["inf", "-inf", "nan"]}]}
_OPT_METRIC = {"anyOf": [_METRIC, {"type": "null"}]}
_OPT_NUM = {"type": ["number", "null"]}
_STR = {"type": "string"}
_OPT_STR = {"type": ["string", "null"]}
_STATS = {"type": "object", "required": ["median", "p95", "min"],
          "properties": {k: _NUM for k in ("median", "p95", "min", "mean")}}


def _obj(props: dict, required: list[str] | None = None, extra: bool = False) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": extra}


_TIMING = _obj({
    "batch": {"type": ["integer", "null"]}, "frames_per_call": {"type": ["integer", "null"]},
    "calls": {"type": "integer", "minimum": 1}, "source": {"enum": ["end_to_end", "dedicated"]},
    "ms_per_call": _STATS, "ms_per_frame": {"anyOf": [_STATS, {"type": "null"}]}, "fps": _OPT_NUM,
    "speedup_vs_official": _OPT_NUM, "peak_rss_mib": _OPT_NUM, "peak_rss_delta_mib": _OPT_NUM,
    "gpu_memory_mib": _OPT_NUM, "copies_ms_per_call": _OPT_NUM,
})
_STAGE = _obj({"rate": {"enum": ["image", "audio", "frame"]}, "precision": _STR,
               "runs": {"type": "array", "items": _TIMING}})
_END_TO_END = _obj({
    "batch": {"type": "integer"}, "frames": {"type": "integer"}, "audio_seconds": _NUM, "prepare_avatar_s": _NUM,
    "wall_s": _NUM, "wall_per_audio_second_s": _NUM, "realtime_factor": _NUM, "first_frame_s": _NUM, "fps": _NUM,
    "speedup_vs_official": _OPT_NUM, "first_frame_speedup_vs_official": _OPT_NUM,
    "stage_seconds": {"type": "object", "additionalProperties": _NUM},
    "stage_share": {"type": "object", "additionalProperties": _NUM},
    "calls": {"type": "object", "additionalProperties": {"type": "integer"}}, "peak_rss_mib": _NUM,
})
_CHECK = _obj({"metric": _STR, "scope": _STR, "value": _OPT_METRIC, "limit": _NUM, "op": {"enum": ["<=", ">="]},
               "passed": {"type": "boolean"}})
_OUTPUT = _obj({"name": _STR, "shape": {"type": "array", "items": {"type": "integer"}}, "max_abs": _METRIC,
                "max_rel": _METRIC, "mean_abs": _METRIC, "p99_abs": _METRIC, "psnr_db": _OPT_METRIC, "metric": _STR,
                "limit": _NUM, "passed": {"type": "boolean"}})
_MIN_MEAN = _obj({"min": _METRIC, "mean": _METRIC})
_PARITY = _obj({
    "reference": _STR, "passed": {"type": "boolean"}, "failures": {"type": "array", "items": _STR},
    "stages": {"type": "object", "additionalProperties": _obj({"batch": {"type": "integer"},
                                                               "outputs": {"type": "array", "items": _OUTPUT}})},
    "end_to_end": _obj({"frames": {"type": "integer"}, "frame_psnr_db": _MIN_MEAN, "frame_ssim": _MIN_MEAN,
                        "mouth_psnr_db": _MIN_MEAN, "kp_max_abs": _METRIC,
                        "head_pose_deg": _obj({k: _NUM for k in ("yaw", "pitch", "roll", "max", "rotation")})}),
    "checks": {"type": "array", "items": _CHECK},
})
_RUN = _obj({
    "name": _STR, "runtime": _STR, "device": _OPT_STR, "precision": _STR,
    "status": {"enum": ["ok", "skipped", "failed"]}, "reason": _OPT_STR, "notes": {"type": "array", "items": _STR},
    "setup_s": _OPT_NUM, "stage_precision": {"type": "object", "additionalProperties": _STR},
    "stages": {"type": "object", "additionalProperties": _STAGE},
    "end_to_end": {"anyOf": [_END_TO_END, {"type": "null"}]},
    "parity": {"anyOf": [_PARITY, {"type": "null"}]},
})
_LOAD = {"anyOf": [{"type": "array", "items": _NUM, "minItems": 3, "maxItems": 3}, {"type": "null"}]}
_ENVIRONMENT = _obj({
    "python": _STR, "platform": _STR, "numpy": _STR, "torch": _OPT_STR, "onnx": _OPT_STR, "onnxruntime": _OPT_STR,
    "onnxruntime_providers": {"type": "array", "items": _STR}, "tensorrt": _OPT_STR, "tensorrt_problem": _OPT_STR,
    "cpu": _obj({"model": _STR, "logical_cores": {"type": ["integer", "null"]},
                 "usable_cores": {"type": ["integer", "null"]}, "torch_threads": {"type": ["integer", "null"]},
                 "memory_gib": _OPT_NUM, "load_average_start": _LOAD, "load_average_end": _LOAD}),
    "gpu": {"anyOf": [{"type": "null"}, _obj({"name": _STR, "compute_capability": _STR, "driver": _OPT_STR,
                                              "cuda": _OPT_STR, "cudnn": {"type": ["integer", "null"]},
                                              "memory_gib": _NUM})]},
})
_CONFIG = _obj({
    "size": {"type": "integer"}, "frames": {"type": "integer", "minimum": 1}, "audio_seconds": _NUM,
    "fps": {"type": "integer"}, "preprocess": _STR, "device": {"enum": ["cpu", "cuda"]},
    "batch_sizes": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1},
    "end_to_end_batch": {"type": "integer"}, "official_batch": {"type": "integer"}, "warmup": {"type": "integer"},
    "repeats": {"type": "integer"}, "backends_requested": {"type": "array", "items": _STR}, "image": _STR,
    "audio": _STR, "engines_dir": _OPT_STR,
    "weights": _obj({"identity": _STR, "description": _STR, "synthetic": {"type": "boolean"}}),
    "memory_method": _STR, "gpu_memory_method": _OPT_STR,
    "mouth_box": _obj({"box": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4},
                       "source": {"enum": ["landmarks", "fixed"]}, "description": _STR}),
    "head_pose_method": _STR,
    "thresholds": {"type": "object", "additionalProperties": _obj({"limit": _NUM, "op": {"enum": ["<=", ">="]},
                                                                  "reason": _STR})},
})

SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sadtalker-rt bench report",
    **_obj({
        "schema_version": {"const": SCHEMA_VERSION},
        "tool": _obj({"name": _STR, "version": _STR}),
        "created_utc": _STR,
        "environment": _ENVIRONMENT,
        "config": _CONFIG,
        "baseline": _RUN,
        "backends": {"type": "array", "items": _RUN},
    }),
}


# ---------------------------------------------------------------------------------------------- markdown

def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if value == 0:
        return "0"
    if abs(value) < 1e-2 or abs(value) >= 1e5:
        return f"{value:.1e}"
    return f"{value:.{digits}g}" if abs(value) < 100 else f"{value:.0f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else (f"{value:.1f}" if value < 1000 else f"{value:.0f}")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _db(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str) or not math.isfinite(value):
        return "inf" if value in ("inf", math.inf) else str(value)
    return f"{value:.1f}"


def _mark(passed: bool) -> str:
    return "pass" if passed else "**FAIL**"


def to_markdown(report: dict) -> str:
    """The report for a terminal and for GitHub: setting, a latency table, an end-to-end table, a parity table."""
    env, cfg = report["environment"], report["config"]
    cpu = env["cpu"]
    gpu = env["gpu"]
    lines = [f"# sadtalker-rt bench: {cfg['size']}x{cfg['size']}, {cfg['weights']['description'].split(';')[0]}", ""]
    hardware = f"{cpu['model']} ({cpu['usable_cores']} usable cores"
    hardware += f", torch threads {cpu['torch_threads']}" if cpu["torch_threads"] else ""
    if cpu["load_average_start"] and cpu["load_average_end"]:
        hardware += (f", 1-min load average {cpu['load_average_start'][0]:.1f} at the start and "
                     f"{cpu['load_average_end'][0]:.1f} at the end")
    hardware += ")"
    if gpu:
        hardware += (f"; {gpu['name']} (driver {gpu['driver'] or '?'}, CUDA {gpu['cuda'] or '?'}, "
                     f"cuDNN {gpu['cudnn'] or '?'})")
    else:
        hardware += "; no GPU"
    lines += [
        f"- machine: {hardware}",
        f"- software: torch {env['torch'] or '-'}, onnxruntime {env['onnxruntime'] or '-'}, "
        f"TensorRT {env['tensorrt'] or '- (' + (env['tensorrt_problem'] or '') + ')'}, Python {env['python']}",
        f"- run: {cfg['frames']} frames ({cfg['audio_seconds']:.2f} s of {cfg['audio']}), photo {cfg['image']}, "
        f"{cfg['preprocess']} mode, device {cfg['device']}",
        f"- timing: perf_counter around each call{' with CUDA synchronisation' if cfg['device'] == 'cuda' else ''}; "
        f"warm-up {cfg['warmup']}, at least {cfg['repeats']} timed calls per stage; end-to-end batch "
        f"{cfg['end_to_end_batch']}, official batch {cfg['official_batch']}",
        f"- weights: {cfg['weights']['identity']}; {report['created_utc']}",
        "",
        "## Latency per stage",
        "",
        "Median over the timed calls; `vs official` is the official loop's time divided by this one (above 1: "
        "faster), per frame for per-frame and per-utterance stages, per call for per-photo stages. The official "
        "renderer is the whole generator with the source re-encoded every call.",
        "",
        "| backend | stage | precision | batch | ms/call | p95 | min | ms/frame | frames/s | vs official | "
        "peak RSS MiB (+ during call) | timed from |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    entries = [report["baseline"]] + report["backends"]
    for entry in entries:
        if entry["status"] != "ok":
            continue
        for stage, info in entry["stages"].items():
            for run in info["runs"]:
                per_frame = run["ms_per_frame"]["median"] if run["ms_per_frame"] else None
                memory = run["peak_rss_mib"]
                gpu_mem = f" +{run['peak_rss_delta_mib']:.0f}" if run["peak_rss_delta_mib"] is not None else ""
                gpu_mem += f", GPU {run['gpu_memory_mib']:.0f}" if run["gpu_memory_mib"] is not None else ""
                lines.append(
                    f"| {entry['name']} | {stage} | {info['precision']} | {run['batch']} | "
                    f"{_ms(run['ms_per_call']['median'])} | {_ms(run['ms_per_call']['p95'])} | "
                    f"{_ms(run['ms_per_call']['min'])} | {_ms(per_frame)} | "
                    f"{'-' if run['fps'] is None else _fmt(run['fps'])} | {_ratio(run['speedup_vs_official'])} | "
                    f"{'-' if memory is None else f'{memory:.0f}'}{gpu_mem} | "
                    f"{'e2e calls' if run['source'] == 'end_to_end' else 'dedicated'} |")
    lines += [
        "",
        "## End to end",
        "",
        "Photo prepared beforehand (`prepare`, not in the wall time); then motion, render and paste-back of every "
        "frame through `TalkingHead.generate`, no video encoding. Shares are of the wall time.",
        "",
        "| backend | batch | s per audio s | first frame s | frames/s | vs official | first frame vs official | "
        "prepare s | renderer | mapping | audio | other |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in entries:
        e2e = entry["end_to_end"]
        if entry["status"] != "ok" or not e2e:
            continue
        share = e2e["stage_share"]
        mapping = sum(v for k, v in share.items() if k.startswith("mapping"))
        audio = share.get("audio2exp", 0.0) + share.get("audio2pose", 0.0)
        lines.append(
            f"| {entry['name']} | {e2e['batch']} | {e2e['wall_per_audio_second_s']:.2f} | {e2e['first_frame_s']:.2f} | "
            f"{_fmt(e2e['fps'])} | {_ratio(e2e['speedup_vs_official'])} | "
            f"{_ratio(e2e['first_frame_speedup_vs_official'])} | {e2e['prepare_avatar_s']:.2f} | "
            f"{share.get('renderer', 0.0):.0%} | {mapping:.0%} | {audio:.0%} | {share.get('other', 0.0):.0%} |")
    t = cfg["thresholds"]
    lines += [
        "",
        "## Parity against float32 PyTorch (the official baseline)",
        "",
        "Stage outputs on the baseline's own inputs; frames, mouth box "
        f"({cfg['mouth_box']['source']}, {cfg['mouth_box']['box']}), keypoints and head pose over the end-to-end run. "
        "Worst value over outputs or frames.",
        "",
        "| backend | worst stage error | frame PSNR dB | SSIM | mouth PSNR dB | kp delta | head pose delta deg | "
        "verdict |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        f"| *limit* | rel <= {_fmt(t['stage_max_rel_fp32']['limit'])} (FP32), <= "
        f"{_fmt(t['stage_max_rel_fp16']['limit'])} or >= {_db(t['stage_image_psnr_db_fp16']['limit'])} dB (FP16) | "
        f">= {_db(t['frame_psnr_db']['limit'])} | >= {t['frame_ssim']['limit']} | "
        f">= {_db(t['mouth_psnr_db']['limit'])} | "
        f"<= {_fmt(t['kp_max_abs']['limit'])} | <= {t['head_pose_deg']['limit']} | |",
    ]
    notes = []
    for entry in report["backends"]:
        if entry["status"] != "ok":
            lines.append(f"| {entry['name']} | {entry['status']} | - | - | - | - | - | {entry['status']} |")
            notes.append(f"- {entry['name']} {entry['status']}: {entry['reason']}")
            continue
        parity = entry["parity"]
        worst = _worst_stage(parity)
        e2e = parity["end_to_end"]
        lines.append(
            f"| {entry['name']} | {worst} | {_db(e2e['frame_psnr_db']['min'])} | {_fmt(e2e['frame_ssim']['min'], 4)} | "
            f"{_db(e2e['mouth_psnr_db']['min'])} | {_fmt(e2e['kp_max_abs'])} | {_fmt(e2e['head_pose_deg']['max'])} | "
            f"{_mark(parity['passed'])} |")
        notes += [f"- {entry['name']} failed: {f}" for f in parity["failures"]]
    for entry in entries:
        notes += [f"- {entry['name']}: {n}" for n in entry["notes"]]
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(lines) + "\n"


def _worst_stage(parity: dict) -> str:
    """The stage output with the largest relative error (FP16 images: the lowest PSNR), as 'value (stage.output)'."""
    worst, label = None, "-"
    for stage, info in parity["stages"].items():
        for row in info["outputs"]:
            value = row["max_rel"]
            if not isinstance(value, (int, float)):
                return f"{value} ({stage}.{row['name']})"
            if worst is None or value > worst:
                worst, label = value, f"{_fmt(value)} ({stage}.{row['name']})"
    return "0" if worst == 0 else label
