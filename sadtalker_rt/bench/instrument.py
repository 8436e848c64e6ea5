"""A timing hook around every runner of a backend: each ``infer`` becomes a ``Call`` in a ``CallLog``."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ..runtime.backends import SerialBackend
from ..stages import BATCH, FRAMES, STAGES
from .probes import GpuProbe, MemoryProbe


@dataclass
class Call:
    stage: str
    phase: str                 # "warmup", "parity-prepare", "parity-generate", "timed-prepare", "timed-generate",
                               # or "timing"
    batch: int
    seconds: float
    peak_rss: float            # bytes
    rss_delta: float           # bytes
    gpu_mib: float | None
    round: int = -1            # timing round (-1: outside the timing rounds)


@dataclass
class CallLog:
    """What an instrumented backend saw: one Call per infer, the first feeds and outputs of each stage per phase,
    and the renderer's and mapping's full inputs and outputs of the end-to-end run."""

    calls: list = field(default_factory=list)
    round: int = -1                                    # the timing round of the calls now being logged
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
        gpu = owner.gpu.stop(self.stage.name)
        log = owner.log
        batch = call_batch(self.stage.name, feeds)
        log.calls.append(Call(self.stage.name, log.phase, batch, seconds, peak, delta, gpu, log.round))
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
