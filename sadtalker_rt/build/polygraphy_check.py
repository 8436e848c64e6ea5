"""Output comparisons through Polygraphy: its runners (onnxruntime, TensorRT) and its per-output error
statistics, with the toolkit's tolerances from the stage table; ``parity.judge`` decides.

Also the command line a user can run to check an engine's graph with Polygraphy's own tool
(``polygraphy run GRAPH --onnxrt --trt ...``). Build-time code: Polygraphy is imported lazily.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Iterable

import numpy as np

from ..stages import STAGES, Stage

REFERENCE = "reference"


def tolerance_for(stage: Stage, precision: str) -> float:
    """The rtol of the toolkit's rule ``max|diff| <= rtol * max(1, max|ref|)`` for a graph of ``precision``: the
    stage table's bound for its non-image outputs (``Stage.tolerance``)."""
    return stage.tolerance(precision, "").limit


def _quiet():
    from polygraphy.logger import G_LOGGER

    return G_LOGGER.verbosity(G_LOGGER.ERROR)


def onnxruntime_runner(graph: Path | bytes, name: str = "onnxruntime", providers: Iterable[str] = ("CPUExecutionProvider",)):
    """Polygraphy's onnxruntime runner for a graph file (or its bytes)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    model = str(graph) if isinstance(graph, Path) else graph
    return OnnxrtRunner(SessionFromOnnx(model, providers=list(providers)), name=name)


def tensorrt_runner(engine_bytes: bytes, name: str = "tensorrt"):
    """Polygraphy's TensorRT runner for a serialized engine (needs TensorRT and a GPU)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(engine_bytes), name=name)


def run_outputs(runner, feeds: list[dict[str, np.ndarray]]):
    """Polygraphy's ``Comparator.run`` of one runner over the feeds: its ``RunResults``."""
    from polygraphy.comparator import Comparator

    with _quiet():
        return Comparator.run([runner], data_loader=feeds)


def with_reference(results, outputs: list[dict[str, np.ndarray]], name: str = REFERENCE):
    """``results`` (one runner's RunResults) followed by reference outputs computed elsewhere (e.g. PyTorch)."""
    from polygraphy.comparator import RunResults

    merged = RunResults()
    for runner_name, iterations in results.items():
        merged.append((runner_name, iterations))
    merged.add([dict(o) for o in outputs], runner_name=name)
    return merged


def compare_results(stage: Stage, precision: str, results) -> list[list]:
    """The first runner in ``results`` against the second (the reference), one list of ``parity.Verdict`` per
    iteration: Polygraphy's per-output error statistics, judged by the stage table's tolerances."""
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SimpleCompareFunc

    from ..parity import judge_outputs

    (ours_name, ours), (ref_name, refs) = list(results.items())[:2]
    rtol = tolerance_for(stage, precision)
    # Polygraphy's "max" statistic with the bound as its atol: its own verdict agrees with ours on
    # outputs near magnitude 1; parity.judge applies the scaled bound and decides.
    compare = SimpleCompareFunc(check_error_stat="max", atol=rtol, rtol=0.0, infinities_compare_equal=True)
    with _quiet():
        accuracy = Comparator.compare_accuracy(results, compare_func=compare)
    per_iteration = next(iter(accuracy[0].values())) if len(accuracy) and accuracy[0] else []
    rows = []
    for i, (mine, ref) in enumerate(zip(ours, refs)):
        stats = per_iteration[i] if i < len(per_iteration) else {}
        rows.append(judge_outputs(dict(mine.items()), dict(ref.items()), lambda name: stage.tolerance(precision, name),
                                  measured=polygraphy_statistics(stats)))
    return rows


def polygraphy_statistics(stats) -> dict[str, dict]:
    """Polygraphy's per-output results of one iteration (name -> ``OutputCompareResult``) as the ``measured``
    statistics of ``parity.judge``: its ``max_absdiff`` and ``mean_absdiff`` are taken as they are."""
    if not hasattr(stats, "items"):
        return {}
    return {name: {"max_abs": result.max_absdiff, "mean_abs": getattr(result, "mean_absdiff", None)}
            for name, result in stats.items() if hasattr(result, "max_absdiff")}


def random_feeds(stage: Stage, shapes: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs at the opt shapes of a profile: images in [0, 1], pose style in range, the rest small normals."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in stage.inputs:
        shape = tuple(shapes[tensor.name][1])
        if tensor.dtype == "int64":
            feeds[tensor.name] = rng.integers(0, 46, size=shape).astype(np.int64)
        elif tensor.name in ("source_image", "aligned_image"):
            feeds[tensor.name] = rng.uniform(0, 1, size=shape).astype(np.float32)
        else:
            feeds[tensor.name] = rng.normal(0, 0.5, size=shape).astype(np.float32)
    return feeds


def _shape_arg(shapes: dict, index: int) -> list[str]:
    return [f"{name}:[{','.join(str(d) for d in dims[index])}]" for name, dims in sorted(shapes.items())]


def polygraphy_command(graph: Path | str, stage: str, precision: str, shapes: dict) -> str:
    """``polygraphy run`` comparing onnxruntime with a TensorRT engine built as ``sadtalker-rt build`` builds it
    (strongly typed, TF32 off, the same profile), at the stage's tolerance: per element |diff| within
    ``rtol`` or ``rtol * |ref|`` implies the toolkit's ``max|diff| <= rtol * max(1, max|ref|)``."""
    rtol = tolerance_for(STAGES[stage], precision)
    args = ["polygraphy", "run", str(graph), "--onnxrt", "--trt", "--strongly-typed"]
    dynamic = {name: dims for name, dims in shapes.items() if tuple(dims[0]) != tuple(dims[2])}
    if dynamic:
        args += ["--trt-min-shapes", *_shape_arg(dynamic, 0), "--trt-opt-shapes", *_shape_arg(dynamic, 1),
                 "--trt-max-shapes", *_shape_arg(dynamic, 2), "--input-shapes", *_shape_arg(dynamic, 1)]
    args += ["--atol", f"{rtol:g}", "--rtol", f"{rtol:g}", "--check-error-stat", "elemwise"]
    return " ".join(shlex.quote(a) for a in args)


def engine_parity(stage: str, precision: str, graph: Path, engine_runner, shapes: dict, seed: int = 0,
                  reference_runner=None) -> tuple[list, bool]:
    """An engine (any Polygraphy runner) against its ONNX graph in onnxruntime, at the opt shapes:
    (verdicts, passed)."""
    table = STAGES[stage]
    feeds = [random_feeds(table, shapes, seed)]
    reference = reference_runner if reference_runner is not None else onnxruntime_runner(graph, name=REFERENCE)
    from polygraphy.comparator import Comparator

    with _quiet():
        results = Comparator.run([engine_runner, reference], data_loader=feeds)
    verdicts = compare_results(table, precision, results)[0]
    return verdicts, all(verdicts)
