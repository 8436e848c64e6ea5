"""Output comparisons through Polygraphy: its runners (onnxruntime, TensorRT) and its per-output error
statistics, with the toolkit's tolerances from the stage table; ``parity.from_polygraphy`` decides.

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


def compare_results(stage: Stage, precision: str, results, labels: list[str] | None = None) -> list[list]:
    """Polygraphy's per-output statistics of the first runner in ``results`` against the second (the
    reference), turned into the toolkit's ``Comparison`` rows, one list per iteration."""
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SimpleCompareFunc

    from ..parity import from_polygraphy

    (ours_name, ours), (ref_name, refs) = list(results.items())[:2]
    rtol = tolerance_for(stage, precision)
    # Polygraphy's "max" statistic with the bound as its atol: its own verdict agrees with ours on
    # outputs near magnitude 1; parity.from_polygraphy applies the scaled bound and decides.
    compare = SimpleCompareFunc(check_error_stat="max", atol=rtol, rtol=0.0, infinities_compare_equal=True)
    with _quiet():
        accuracy = Comparator.compare_accuracy(results, compare_func=compare)
    per_iteration = next(iter(accuracy[0].values())) if len(accuracy) and accuracy[0] else []
    rows = []
    for i, (mine, ref) in enumerate(zip(ours, refs)):
        stats = per_iteration[i] if i < len(per_iteration) else {}
        rows.append(from_polygraphy(stats, dict(mine.items()), dict(ref.items()), atol=0.0, rtol=rtol))
    return rows


def image_verdicts(stage: Stage, comparisons: list, precision: str) -> list[tuple[object, bool, str]]:
    """(comparison, passed, why not) per output, by the stage table's tolerance (``Stage.tolerance``): FP16 image
    outputs pass on PSNR, the rest on the bound."""
    from ..parity import passes

    verdicts = []
    for c in comparisons:
        tolerance = stage.tolerance(precision, c.name)
        if tolerance.metric == "psnr_db" and not c.problem.startswith(("missing", "not a", "shape")):
            passed = c.psnr_db is not None and passes(c.psnr_db, tolerance.limit, tolerance.op)
            verdicts.append((c, passed, "" if passed else f"PSNR {c.psnr_db:.1f} dB < {tolerance.limit:.0f} dB "
                                                          f"({tolerance.source})"))
        else:
            verdicts.append((c, c.passed, "" if c.passed else f"relative error {c.max_rel:.2e} > {c.rtol:.0e}"
                             if not c.problem.startswith(("missing", "not a", "shape", "non-finite")) else c.problem))
    return verdicts


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
    (comparisons, passed)."""
    table = STAGES[stage]
    feeds = [random_feeds(table, shapes, seed)]
    reference = reference_runner if reference_runner is not None else onnxruntime_runner(graph, name=REFERENCE)
    from polygraphy.comparator import Comparator

    with _quiet():
        results = Comparator.run([engine_runner, reference], data_loader=feeds)
    comparisons = compare_results(table, precision, results)[0]
    return comparisons, all(passed for _, passed, _ in image_verdicts(table, comparisons, precision))
