"""Export every stage of the stage table to ONNX, validate each graph against PyTorch, write a manifest.

Stages are exported in dependency order so that each one is traced and validated on realistic
inputs: the source image drives the keypoint detector and the source encoder, whose outputs
drive mapping and the renderer. Validation collects every failure before it reports.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ... import __version__
from ...runtime.manifest import FORMAT, MANIFEST, sha256_of
from ...errors import SadTalkerError, UsageError
from ...stages import BATCH, ENHANCER_STAGES, EXPORT_ORDER, FRAMES, OPSET, ORDER, POSE_STYLES, STAGES, Stage

TRACE_AXES = {BATCH: 2, FRAMES: 8}          # dynamic axis values used for tracing
CHECK_AXES = {BATCH: 3, FRAMES: 5}          # another shape, to prove the axes really are dynamic
# The enhancer stages run 512x512 faces through ~100 GFLOP graphs: batch 1 is the cheapest other shape.
STAGE_CHECK_AXES = {name: {BATCH: 1} for name in ENHANCER_STAGES}


class ExportValidationError(SadTalkerError):
    """A graph that does not match its PyTorch module within the stated bounds."""

    exit_code = 7


@dataclass
class StageReport:
    stage: str
    file: str
    precision: str
    seconds: float = 0.0
    parity: list = field(default_factory=list)       # one dict per (shape, output)
    fp32_islands: list = field(default_factory=list)
    failures: list = field(default_factory=list)


def state_dict_sha256(module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def example_inputs(stage: Stage, size: int, axes: dict, known: dict[str, np.ndarray],
                   rng: np.random.Generator, offset: int = 0) -> dict[str, np.ndarray]:
    """Inputs for tracing and validation: what the feeding stage produced where it ran (``known`` holds
    ``"stage.output"`` arrays and host inputs by name), else plausible data of the tensor's kind.
    ``offset``: the first known item taken (the check shape starts where the trace shape stopped)."""
    feeds = {}
    for tensor in stage.inputs:
        shape = tensor.resolve(size, **axes)
        upstream = known.get(tensor.source or tensor.name)
        if upstream is not None and upstream.shape[1:] == shape[1:]:
            feeds[tensor.name] = upstream[(offset + np.arange(shape[0])) % upstream.shape[0]]
        else:
            feeds[tensor.name] = _SAMPLERS[tensor.kind](rng, shape).astype(tensor.dtype)
    return feeds


_SAMPLERS = {
    "class": lambda rng, shape: rng.integers(0, POSE_STYLES, size=shape),
    "image": lambda rng, shape: rng.uniform(0, 1, size=shape),
    "face": lambda rng, shape: rng.uniform(-1, 1, size=shape),
    "noise": lambda rng, shape: rng.standard_normal(size=shape),
    "keypoints": lambda rng, shape: rng.uniform(-0.5, 0.5, size=shape),
    "mels": lambda rng, shape: np.clip(rng.normal(-1.5, 1.2, size=shape), -4, 4),
    # Motion coefficients around a source: small expression and pose offsets per frame.
    "semantics": lambda rng, shape: rng.normal(0, 0.3, size=(1,) + shape[1:]) + rng.normal(0, 0.05, size=shape),
    "value": lambda rng, shape: rng.normal(0, 0.5, size=shape),
    "degrees": lambda rng, shape: rng.uniform(-30, 30, size=shape),
    # Free view's given-angle flags: some given, some predicted, so both branches are validated.
    "mask": lambda rng, shape: np.resize(np.array([1.0, 0.0, 1.0]), shape),
}


def run_torch(module, stage: Stage, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    with torch.inference_mode():
        outputs = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    if not isinstance(outputs, (tuple, list)):
        outputs = (outputs,)
    return {t.name: o.float().numpy() for t, o in zip(stage.outputs, outputs)}


def trace_to_onnx(module, stage: Stage, feeds: dict[str, np.ndarray], grid_sample: str) -> bytes:
    import torch

    from ...models.ops import use_decomposed_grid_sample

    dynamic = {t.name: t.dynamic_axes() for t in stage.inputs + stage.outputs if t.dynamic_axes()}
    buffer = io.BytesIO()
    args = tuple(torch.from_numpy(feeds[t.name]) for t in stage.inputs)
    with use_decomposed_grid_sample(grid_sample == "decomposed"), torch.inference_mode(), warnings.catch_warnings():
        # Static sizes traced as constants and eval-mode InstanceNorm exported with train=True are both intended.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*instance_norm.*")
        torch.onnx.export(module, args, buffer, input_names=[t.name for t in stage.inputs],
                          output_names=[t.name for t in stage.outputs], dynamic_axes=dynamic or None,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return buffer.getvalue()


def run_onnx(model_bytes: bytes, stage: Stage, feeds: dict[str, np.ndarray],
             emulate_fp16: bool = False) -> dict[str, np.ndarray]:
    """Run a graph in onnxruntime CPU. ``emulate_fp16``: round every FP16 tensor through float16 as an FP16
    engine stores it; onnxruntime's CPU provider otherwise computes FP16 nodes in float32 and hides errors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if emulate_fp16:
        import onnx

        from .mixed_precision import emulate_fp16_storage

        model_bytes = emulate_fp16_storage(onnx.load_from_string(model_bytes)).SerializeToString()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = [t.name for t in stage.outputs]
    return dict(zip(names, session.run(names, feeds)))


def validation_runner(model_bytes: bytes, emulate_fp16: bool = False):
    """Polygraphy's onnxruntime runner (CPU) for a graph. ``emulate_fp16``: round every FP16 tensor through
    float16 as an FP16 engine stores it; onnxruntime's CPU provider otherwise computes FP16 nodes in float32
    and hides errors (and graph optimizations are off so the rounding stays where it is)."""
    from ..polygraphy_check import onnxruntime_runner

    if not emulate_fp16:
        return onnxruntime_runner(model_bytes, name="onnxruntime")
    import onnx
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from .mixed_precision import emulate_fp16_storage

    emulated = emulate_fp16_storage(onnx.load_from_string(model_bytes)).SerializeToString()
    return OnnxrtRunner(SessionFromOnnx(emulated, providers=["CPUExecutionProvider"],
                                        graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                        name="onnxruntime (fp16 storage emulated)")


def validate_graph(model_bytes: bytes, stage: Stage, checks: list[tuple[str, dict, dict]],
                   precision: str) -> tuple[list, list]:
    """The graph in onnxruntime against PyTorch's outputs through Polygraphy's runner and error statistics,
    judged by ``parity``: one row per (shape, output) and the failures among them."""
    from ..polygraphy_check import compare_results, run_outputs, with_reference

    runner = validation_runner(model_bytes, emulate_fp16=precision == "fp16")
    results = with_reference(run_outputs(runner, [feeds for _, feeds, _ in checks]), [ref for _, _, ref in checks])
    method = "fp16 storage emulated on CPU" if precision == "fp16" else "onnxruntime CPU"
    rows, failures = [], []
    ours_iterations = list(results.items())[0][1]
    for (label, _, ref), ours, verdicts in zip(checks, ours_iterations, compare_results(stage, precision, results)):
        for verdict in verdicts:
            rows.append(_parity_row(stage, label, verdict, ours, ref, f"{method}, polygraphy"))
            if not verdict.passed:
                failures.append(f"{stage.name}.{verdict.name} at {label}: {verdict.problem}")
    return rows, failures


def _parity_row(stage: Stage, label: str, verdict, ours, ref: dict, method: str) -> dict:
    """The manifest's record of one verdict; image and face outputs carry their PSNR (faces as users see them,
    clipped on [0, 1], whichever statistic judged them), class maps their agreement."""
    from ...parity import face_psnr

    row = {"shape": label, "output": verdict.name, "max_abs": verdict.max_abs, "max_rel": verdict.max_rel,
           "mean_abs": verdict.mean_abs, "p99_abs": verdict.p99_abs, "method": method}
    kind = next((t.kind for t in stage.outputs if t.name == verdict.name), "")
    compared = verdict.name in ours and verdict.name in ref and np.shape(ours[verdict.name]) == verdict.shape
    if verdict.metric == "agreement" and compared:
        row["agreement"] = verdict.value
    if kind == "image":
        row["psnr_db"] = verdict.psnr_db
    elif kind == "face" and compared:
        row["psnr_db"] = face_psnr(ours[verdict.name], ref[verdict.name])
    row["passed"] = verdict.passed
    return row


def to_mixed_precision(model_bytes: bytes, calibration: list[dict]) -> tuple[bytes, list]:
    import onnx

    from .mixed_precision import (choose_fp32_islands, convert_to_mixed_precision, islands_summary,
                                  measure_activation_ranges)

    model = onnx.load_from_string(model_bytes)
    ranges = measure_activation_ranges(model, calibration)
    islands = choose_fp32_islands(model, ranges)
    converted = convert_to_mixed_precision(model, set(islands))
    return converted.SerializeToString(), islands_summary(model, islands)


def _shape_label(stage: Stage, feeds: dict, label: str) -> str:
    dims = [f"{t.name}[0]={feeds[t.name].shape[0]}" for t in stage.inputs if t.dynamic_axes()]
    return f"{label}({', '.join(dims)})" if dims else label


def export_stage(stage: Stage, module, size: int, precision: str, grid_sample: str, out_dir: Path,
                 known: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[StageReport, dict]:
    start = time.perf_counter()
    trace_feeds = example_inputs(stage, size, TRACE_AXES, known, rng)
    check_axes = STAGE_CHECK_AXES.get(stage.name, CHECK_AXES)
    check_feeds = (example_inputs(stage, size, check_axes, known, rng, offset=TRACE_AXES[BATCH])
                   if stage.dynamic else None)
    model_bytes = trace_to_onnx(module, stage, trace_feeds, grid_sample)
    stage_precision = "fp32" if precision == "fp32" or stage.fp32_reason else "fp16"
    report = StageReport(stage.name, f"{stage.name}.onnx", stage_precision)
    if stage_precision == "fp16":
        calibration = [trace_feeds] + ([check_feeds] if check_feeds else [])
        model_bytes, report.fp32_islands = to_mixed_precision(model_bytes, calibration)
    reference = run_torch(module, stage, trace_feeds)
    checks = [("trace", trace_feeds, reference)]
    if check_feeds is not None:
        checks.append(("check", check_feeds, run_torch(module, stage, check_feeds)))
    labelled = [(_shape_label(stage, feeds, label), feeds, ref) for label, feeds, ref in checks]
    report.parity, report.failures = validate_graph(model_bytes, stage, labelled, stage_precision)
    path = out_dir / report.file
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(model_bytes)
    os.replace(tmp, path)
    report.seconds = time.perf_counter() - start
    return report, reference


def _manifest_entry(stage: Stage, report: StageReport, out_dir: Path, size: int, grid_sample: str,
                    weights_sha: dict) -> dict:
    def describe(tensors):
        return [{"name": t.name, "dtype": t.dtype, "shape": list(t.resolve(size, **{BATCH: BATCH, FRAMES: FRAMES}))}
                for t in tensors]

    return {
        "file": report.file, "sha256": sha256_of(out_dir / report.file), "rate": stage.rate,
        "precision": report.precision, "fp32_reason": stage.fp32_reason or None,
        "inputs": describe(stage.inputs), "outputs": describe(stage.outputs),
        "dynamic_axes": {t.name: {str(k): v for k, v in t.dynamic_axes().items()}
                         for t in stage.inputs + stage.outputs if t.dynamic_axes()},
        "profile": list(stage.profile), "grid_sample": grid_sample if stage.name == "renderer" else None,
        "weights_sha256": weights_sha, "fp32_islands": report.fp32_islands, "parity": report.parity,
        "export_seconds": round(report.seconds, 2),
    }


def _write_fixed_noise(gfpgan, out_dir: Path) -> dict:
    """The checkpoint's own decoder noise maps (``--enhancer-noise fixed``) beside the graph, as .npz."""
    from ...runtime.enhancer import FIXED_NOISE_FILE

    maps = {f"noise{i}": n.detach().cpu().numpy() for i, n in enumerate(gfpgan.stylegan_decoder.stored_noise())}
    path = out_dir / FIXED_NOISE_FILE
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **maps)
    os.replace(tmp, path)
    return {"file": FIXED_NOISE_FILE, "sha256": sha256_of(path)}


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def export_graphs(weights, size: int, out_dir: Path, precision: str = "fp32", grid_sample: str = "auto",
                  stages: tuple[str, ...] = ORDER, seed: int = 0, source_image: np.ndarray | None = None,
                  progress: Callable[[str, int, int], None] | None = None, enhancer_weights=None,
                  faces: np.ndarray | None = None) -> dict:
    """Export, validate and describe the stages; raise ExportValidationError listing every failure.

    ``grid_sample="auto"`` picks the form the installed TensorRT can build (``resolve_grid_sample``).

    ``source_image`` (1, 3, S, S) in [0, 1] makes the image stages and everything downstream run on a real photo.
    ``enhancer_weights`` (``models.enhancer_weights.EnhancerWeights``) serve the enhancer stages, and ``faces``
    (N, 3, 512, 512) in [-1, 1], real faces aligned to the FFHQ template, are their calibration and validation
    inputs. ``weights`` may be None when only enhancer stages are exported.
    """
    import torch

    from ...models.stage_modules import stage_module

    if precision not in ("fp32", "fp16"):
        raise UsageError(f"--precision must be fp32 or fp16, not '{precision}'.")
    if grid_sample not in ("auto", "native", "decomposed"):
        raise UsageError(f"--grid-sample must be auto, native or decomposed, not '{grid_sample}'.")
    from ..tensorrt import resolve_grid_sample

    grid_sample = resolve_grid_sample(grid_sample)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UsageError(f"unknown stages {unknown}; known: {', '.join(EXPORT_ORDER)}.")
    enhancing = [s for s in stages if s in ENHANCER_STAGES]
    if enhancing and enhancer_weights is None:
        raise UsageError(f"stages {', '.join(enhancing)} need the enhancer's weights (--enhancer gfpgan).")
    if weights is None and len(enhancing) < len(stages):
        raise UsageError("the renderer's stages need --checkpoints or --synthetic-weights.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    subnetworks: dict = {}

    enhancer_subnetworks = {n for s in ENHANCER_STAGES for n in STAGES[s].subnetworks}

    def subnetwork(name: str):
        if name not in subnetworks:
            subnetworks[name] = (enhancer_weights if name in enhancer_subnetworks else weights).build(name)
        return subnetworks[name]

    known: dict[str, np.ndarray] = {} if source_image is None else {"source_image": source_image}
    if faces is not None:
        known["face"] = np.ascontiguousarray(faces, np.float32)
    reports, entries = [], {}
    ordered = [s for s in EXPORT_ORDER if s in stages]
    for i, name in enumerate(ordered):
        if progress:
            progress("export", i, len(ordered))
        stage = STAGES[name]
        report, outputs = export_stage(stage, stage_module(name, subnetwork), size, precision, grid_sample, out_dir,
                                       known, rng)
        known.update({f"{name}.{output}": value for output, value in outputs.items()})
        reports.append(report)
        entries[name] = _manifest_entry(stage, report, out_dir, size, grid_sample,
                                        {n: state_dict_sha256(subnetwork(n)) for n in stage.subnetworks})
    if progress:
        progress("export", len(ordered), len(ordered))
    if "enhancer" in entries:
        entries["enhancer"]["fixed_noise"] = _write_fixed_noise(subnetwork("gfpgan"), out_dir)
    described = weights if weights is not None else enhancer_weights
    manifest = {
        "format": FORMAT, "toolkit_version": __version__, "size": size, "precision": precision,
        "grid_sample": grid_sample, "opset": OPSET,
        "weights": {"identity": described.identity(), "description": described.describe(),
                    "synthetic": described.synthetic},
        "exported_with": {"torch": torch.__version__, "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime")},
        "stages": entries,
    }
    if enhancing:
        manifest["enhancer_weights"] = {"identity": enhancer_weights.identity(),
                                        "description": enhancer_weights.describe(),
                                        "synthetic": enhancer_weights.synthetic}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    failures = [f for r in reports for f in r.failures]
    if failures:
        raise ExportValidationError(f"{len(failures)} parity checks failed in {out_dir}: " + "; ".join(failures))
    return manifest
