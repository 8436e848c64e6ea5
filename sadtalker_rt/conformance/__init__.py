"""Run recorded official numerics (conformance cases) through the project's own code paths.

A cases directory holds ``manifest/<stage>.json`` (official key names and shapes),
``cases/index.json`` and ``cases/<stage>__<case>.npz`` (arrays ``in.<name>`` and ``out.<name>``).
Weights are synthesized from the manifest keys and handed to the same loader that reads official
checkpoints. Each stage's runner lives with its group: ``audio``, ``render``, ``preprocess``, ``enhancer``, ``options``.
"""
from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..parity import judge
from ..stages import Tolerance

from ..errors import InputError

# manifest stage -> sub-network name in sadtalker_rt.models.checkpoints.SUBNETWORKS
MANIFEST_SUBNETWORK = {
    "kp_detector": "kp_extractor",
    "generator": "generator",
    "audio2exp": "audio2exp",
    "audio2pose": "audio2pose",
    "face3d_recon": "face_3drecon",
    "mapping": "mapping",
    "mapping_full": "mapping_full",
    "gfpgan": "gfpgan",
    "parsenet": "parsenet",
}

RUNNER_GROUPS = ("audio", "render", "preprocess", "enhancer", "options")
RTOL = 1e-4                     # README: max|ours - ref| <= 1e-4 * max(1, max|ref|)
RESAMPLED_IMAGES = {"aligned", "face", "ext_face",   # uint8 images: within 1 grey level
                    "cropped", "restored", "pasted", "output"}
TIES_SUFFIX = ".ties"            # a runner may mark integer outputs whose deciding values tie within tolerance
MASK_THRESHOLD = 1e-3           # the generator zeroes mask values below this after the softmax


@dataclass
class OutputResult:
    name: str
    max_abs: float
    rel: float                  # max_abs / max(1, max|ref|)
    passed: bool
    threshold_flips: int = 0


@dataclass
class CaseResult:
    stage: str
    case: str
    outputs: list[OutputResult] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.error is None and all(o.passed for o in self.outputs)

    @property
    def worst_rel(self) -> float:
        return max((o.rel for o in self.outputs), default=float("nan"))


class CaseContext:
    """What a runner may ask for: modules loaded from synthetic weights of this directory's manifests."""

    def __init__(self, root: Path):
        self.root = root

    def template(self, manifest_stage: str) -> dict:
        path = self.root / "manifest" / f"{manifest_stage}.json"
        keys = json.loads(path.read_text())["keys"]
        return {k: (tuple(shape), dtype) for k, (shape, dtype) in keys.items()}

    def module(self, manifest_stage: str, seed: int):
        from ..models.checkpoints import build_subnetwork
        from ..models.synthetic import synthetic_state_dict

        arrays = synthetic_state_dict(self.template(manifest_stage), int(seed))
        return build_subnetwork(MANIFEST_SUBNETWORK[manifest_stage], arrays, f"synthetic {manifest_stage} (seed {seed})")


Runner = Callable[[dict, dict, CaseContext], dict]


def runners() -> dict[str, Runner]:
    table: dict[str, Runner] = {}
    for group in RUNNER_GROUPS:
        table.update(importlib.import_module(f"{__name__}.{group}").RUNNERS)
    return table


IMAGE_TOLERANCE = Tolerance("max_abs", 1.0, "resampled uint8 images: within 1 grey level", "conformance")
INTEGER_TOLERANCE = Tolerance("max_abs", 0.0, "integer outputs: exact", "conformance")
FLOAT_TOLERANCE = Tolerance("max_rel", RTOL, "max|ours - ref| <= 1e-4 * max(1, max|ref|)", "conformance")


def compare_output(name: str, ours: np.ndarray, ref: np.ndarray, ties: np.ndarray | None = None) -> OutputResult:
    """One output judged by sadtalker_rt.parity with the conformance tolerance for its kind. ``ties`` marks
    elements of an integer output whose deciding values tie within tolerance (an argmax): they may differ."""
    ours = np.asarray(ours)
    if ours.shape != ref.shape:
        return OutputResult(name, float("inf"), float("inf"), False)
    if name in RESAMPLED_IMAGES:
        tolerance = IMAGE_TOLERANCE
    elif np.issubdtype(ref.dtype, np.integer):
        tolerance = INTEGER_TOLERANCE
    else:
        tolerance = FLOAT_TOLERANCE
    ignore, flips = None, 0
    if name == "mask" and tolerance is FLOAT_TOLERANCE:
        # Elements within rounding of the threshold may land on the other side of it.
        scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
        bound = RTOL * scale
        diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
        near = (np.abs(ref - MASK_THRESHOLD) < 2 * bound) | (np.abs(ours - MASK_THRESHOLD) < 2 * bound)
        ignore = (diff > bound) & near & ((ref == 0) | (ours == 0))
        flips = int(ignore.sum())
    elif ties is not None and tolerance is INTEGER_TOLERANCE:
        ignore = (ours != ref) & np.asarray(ties, bool)
        flips = int(ignore.sum())
    verdict = judge(name, ours, ref, tolerance, ignore)
    return OutputResult(name, verdict.max_abs, verdict.max_rel, verdict.passed, flips)


def load_index(root: Path) -> list[dict]:
    index = root / "cases" / "index.json"
    if not index.is_file():
        raise InputError(f"{root} is not a conformance directory: {index} is missing.")
    return json.loads(index.read_text())


def run_case(root: Path, entry: dict, table: dict[str, Runner]) -> CaseResult:
    result = CaseResult(entry["stage"], entry["case"])
    start = time.perf_counter()
    runner = table.get(entry["stage"])
    if runner is None:
        result.error = f"no runner for stage '{entry['stage']}'"
        return result
    with np.load(root / "cases" / entry["file"]) as data:
        inputs = {k[3:]: data[k] for k in data.files if k.startswith("in.")}
        expected = {k[4:]: data[k] for k in data.files if k.startswith("out.")}
    try:
        ours = runner(inputs, entry, CaseContext(root))
    except Exception as err:  # a case that crashes is a failed case, reported with the others
        result.error = f"{type(err).__name__}: {err}"
        return result
    for name, ref in expected.items():
        if name not in ours:
            result.outputs.append(OutputResult(name, float("inf"), float("inf"), False))
            continue
        result.outputs.append(compare_output(name, np.asarray(ours[name]), ref, ours.get(name + TIES_SUFFIX)))
    result.seconds = time.perf_counter() - start
    return result


def run_directory(root: Path, on_result: Callable[[CaseResult], None] | None = None,
                  stages: set[str] | None = None) -> list[CaseResult]:
    root = Path(root)
    index = load_index(root)
    table = runners()
    results = []
    for entry in index:
        if stages and entry["stage"] not in stages:
            continue
        result = run_case(root, entry, table)
        results.append(result)
        if on_result:
            on_result(result)
    return results
