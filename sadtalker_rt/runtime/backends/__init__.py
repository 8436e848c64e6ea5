"""Backends run stages by name. Each gives ``runner(stage) -> Runner``; a runner's ``infer`` takes and
returns dicts of named numpy arrays, bound by name, never by position.

``torch``: the reference modules (needs torch; CPU or CUDA).
``onnxruntime``: exported graphs (no torch import).
``tensorrt``: engines built from those graphs (no torch import).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ...errors import UsageError
from ...stages import STAGES, Stage
from ..scheduler import Executor, SerialExecutor

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class Runner(Protocol):
    stage: Stage

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str
    size: int                   # render size
    precision: str | None       # "fp32" or "fp16", as the graphs, engines or modules run
    notes: list[str]            # lines for the user (what was loaded, from where)

    def runner(self, stage: str) -> Runner: ...

    def executor(self) -> Executor:
        """How the frame scheduler issues work: CUDA streams (TensorRT) or stage calls in order."""


    def describe(self) -> dict: ...


class SerialBackend:
    """For backends whose runners return host arrays (torch, onnxruntime, test stand-ins): the frame scheduler
    calls their stages in order."""

    def executor(self) -> SerialExecutor:
        return SerialExecutor(self.runner)


def check_feeds(stage: Stage, feeds: dict[str, np.ndarray]) -> None:
    """Names must match the stage table exactly; a wrong name is a bug, so say which."""
    expected = {t.name for t in stage.inputs}
    if set(feeds) != expected:
        raise KeyError(f"stage {stage.name} takes {sorted(expected)}, got {sorted(feeds)}")


def open_backend(name: str, *, weights=None, engines: Path | None = None, size: int = 256,
                 device: str = "cpu", precision: str = "fp32", cuda_graphs: bool = False) -> Backend:
    if name == "torch":
        if weights is None:
            raise UsageError("--backend torch needs --checkpoints DIR or --synthetic-weights.")
        from .torch_backend import TorchBackend

        return TorchBackend(weights, size=size, device=device, precision=precision, cuda_graphs=cuda_graphs)
    if name == "onnxruntime":
        if engines is None:
            raise UsageError("--backend onnxruntime needs --engines DIR (made by `sadtalker-rt export`).")
        from .onnxruntime_backend import OnnxRuntimeBackend

        if cuda_graphs:
            raise UsageError("--cuda-graphs is for --backend torch (on cuda) and --backend tensorrt.")
        return OnnxRuntimeBackend(engines, device=device)
    if name == "tensorrt":
        if engines is None:
            raise UsageError("--backend tensorrt needs --engines DIR (made by `sadtalker-rt build`).")
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(engines, cuda_graphs=cuda_graphs)
    raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, not '{name}'.")


__all__ = ["BACKENDS", "Backend", "Runner", "STAGES", "SerialBackend", "check_feeds", "open_backend"]
