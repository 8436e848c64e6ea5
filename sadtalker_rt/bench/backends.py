"""Opening the backends a bench run measures: the baseline, torch, onnxruntime and TensorRT, exporting graphs
or building engines where needed (kept in --engines-dir, reused when their manifest matches)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SadTalkerError
from ..stages import ORDER, STAGES
from .config import BenchConfig
from .official import OfficialBackend
from .probes import ort_providers, tensorrt_version



@dataclass
class Opened:
    """A backend ready to measure, with what the report says about it."""

    backend: object
    runtime: str
    device: str
    precision: str
    stage_precision: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    parity_backend: object = None      # computes as the precision says where ``backend`` cannot (None: ``backend``)
    parity_method: str = ""            # how parity was measured, when not by ``backend`` itself


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
    torch_backends: dict = field(default_factory=dict)      # (precision, cuda graphs) -> TorchBackend, shared

    def torch_backend(self, precision: str = "fp32", cuda_graphs: bool = False):
        """One torch backend per precision, shared by the baseline and the ``torch`` backends."""
        key = (precision, cuda_graphs)
        if key not in self.torch_backends:
            from ..runtime.backends.torch_backend import TorchBackend

            self.torch_backends[key] = TorchBackend(self.config.weights, size=self.config.size, device=self.device,
                                                    precision=precision, cuda_graphs=cuda_graphs)
        return self.torch_backends[key]


Opener = Callable[[BenchContext], Opened]


def _official_precision(device: str) -> str:
    """The official loop keeps PyTorch's defaults: TF32 convolutions on CUDA where cuDNN allows them."""
    if device != "cuda":
        return "fp32"
    import torch

    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def open_official(ctx: BenchContext) -> Opened:
    precision = _official_precision(ctx.device)
    notes = ["whole generator per renderer call, source re-encoded every call (the official loop)"]
    if precision == "tf32":
        notes.append("timed with PyTorch's default TF32 convolutions; its parity reference run has TF32 off")
    return Opened(OfficialBackend(ctx.torch_backend("fp32")), "torch", ctx.device, precision,
                  {s: precision for s in ctx.stages}, notes)


def open_torch(ctx: BenchContext) -> Opened:
    # The torch backend's FP32 is true float32: it turns TF32 off around every call.
    notes = ["TF32 disabled around every call (the torch backend's FP32 policy)"] if ctx.device == "cuda" else []
    return Opened(ctx.torch_backend("fp32"), "torch", ctx.device, "fp32", {s: "fp32" for s in ctx.stages}, notes)


def _open_torch_fp16(ctx: BenchContext, cuda_graphs: bool) -> Opened:
    if ctx.device != "cuda":
        raise BackendSkipped("torch FP16 (autocast) needs a CUDA device (--device cuda)")
    per_stage = {s: "fp32" if STAGES[s].fp32_reason else "fp16-autocast" for s in ctx.stages}
    notes = ["autocast FP16; grid sampling, normalisation statistics and softmax stay FP32"]
    if cuda_graphs:
        notes.append("per-frame stages replayed from a CUDA graph per input shape (captured on the first call)")
    return Opened(ctx.torch_backend("fp16", cuda_graphs), "torch", ctx.device, "fp16", per_stage, notes)


def open_torch_fp16(ctx: BenchContext) -> Opened:
    return _open_torch_fp16(ctx, cuda_graphs=False)


def open_torch_fp16_graphs(ctx: BenchContext) -> Opened:
    return _open_torch_fp16(ctx, cuda_graphs=True)


def _graphs(ctx: BenchContext, precision: str) -> tuple[Path, list[str]]:
    """Exported graphs of one precision: reused from --engines-dir when they match, else exported."""
    from ..runtime.manifest import load_manifest, verified_path
    from ..build.export.onnx_export import ExportValidationError, export_graphs

    from ..build.tensorrt import resolve_grid_sample

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
                      progress=prefixed(ctx.progress, f"export {precision}"))
    except ExportValidationError as err:        # the graphs were written; the bench measures their parity itself
        notes.append(f"export validation: {err}")
    except SadTalkerError as err:
        raise BackendSkipped(f"export of the {precision} graphs failed: {err}") from None
    except Exception as err:  # an exporter bug must not cost the other backends' measurements
        raise BackendSkipped(f"export of the {precision} graphs failed ({type(err).__name__}: "
                             f"{one_line(err)})") from None
    notes.insert(0, f"exported {precision} graphs in {time.perf_counter() - begin:.0f} s")
    return directory, notes


def _manifest_precisions(directory: Path, stages: tuple[str, ...]) -> dict:
    from ..runtime.manifest import load_manifest

    entries = load_manifest(directory)["stages"]
    return {s: entries[s]["precision"] for s in stages if s in entries}


def _open_onnxruntime(ctx: BenchContext, precision: str) -> Opened:
    from ..runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    if ctx.device == "cuda" and "CUDAExecutionProvider" not in ort_providers():
        raise BackendSkipped("this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
    if ctx.device == "cuda" and precision == "fp16":
        raise BackendSkipped("onnxruntime's CUDA provider runs 5-D GridSample in float32 only")
    directory, notes = _graphs(ctx, precision)
    backend = OnnxRuntimeBackend(directory, device=ctx.device, intra_op_threads=ctx.config.threads)
    opened = Opened(backend, "onnxruntime", ctx.device, precision, _manifest_precisions(directory, ctx.stages), notes)
    if precision == "fp16" and ctx.device == "cpu":
        # onnxruntime's CPU provider computes FP16 nodes in float32, so its outputs hide FP16's error; parity is
        # measured as export validation does, on a copy that stores every FP16 tensor as float16 would.
        from .fp16 import EmulatedFp16Backend

        opened.parity_backend = EmulatedFp16Backend(directory)
        opened.parity_method = EmulatedFp16Backend.METHOD
        opened.notes.append(f"parity: {EmulatedFp16Backend.METHOD}; timings: onnxruntime CPU as shipped, which "
                            "computes FP16 nodes in float32")
    return opened


def open_onnxruntime_fp32(ctx: BenchContext) -> Opened:
    return _open_onnxruntime(ctx, "fp32")


def open_onnxruntime_fp16(ctx: BenchContext) -> Opened:
    return _open_onnxruntime(ctx, "fp16")


def _open_tensorrt(ctx: BenchContext, precision: str) -> Opened:
    version, problem = tensorrt_version()
    if version is None:
        raise BackendSkipped(f"TensorRT is not usable here ({problem})")
    if ctx.device != "cuda":
        raise BackendSkipped("TensorRT needs a CUDA device (--device cuda)")
    if ctx.config.engines_dir is None:
        raise BackendSkipped("TensorRT engines are kept in --engines-dir; give one")
    from ..runtime.backends.tensorrt_backend import TensorRTBackend
    from ..build.tensorrt import build_engines

    onnx_dir, notes = _graphs(ctx, precision)
    engines = Path(ctx.config.engines_dir) / f"tensorrt-{precision}-{ctx.config.size}-{ctx.config.weights.identity()}"
    begin = time.perf_counter()
    result = build_engines(onnx_dir, engines, max_batch=max(8, *ctx.config.batch_sizes),
                           opt_batch=ctx.config.e2e_batch, progress=prefixed(ctx.progress, f"engines {precision}"))
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
    "torch-fp16-graphs": open_torch_fp16_graphs,
    "onnxruntime-fp32": open_onnxruntime_fp32,
    "onnxruntime-fp16": open_onnxruntime_fp16,
    "tensorrt-fp32": open_tensorrt_fp32,
    "tensorrt-fp16": open_tensorrt_fp16,
}


def prefixed(progress: Callable[[str, int, int], None], prefix: str) -> Callable[[str, int, int], None]:
    return lambda stage, done, total: progress(f"{prefix} {stage}", done, total)


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
