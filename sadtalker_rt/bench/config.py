"""What one ``sadtalker-rt bench`` run measures, and the backend names it accepts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UsageError
from ..stages import FPS, POSE_CHUNK, SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: F401 - re-exported for the bench

OFFICIAL_BATCH = 2                        # frames per generator call in the official loop
RUNTIMES = ("torch", "onnxruntime", "tensorrt")
ALIASES = {"onnxruntime": ("onnxruntime-fp32", "onnxruntime-fp16"), "tensorrt": ("tensorrt-fp32", "tensorrt-fp16"),
           "torch-fp32": ("torch",)}


@dataclass
class BenchConfig:
    """What one ``sadtalker-rt bench`` run measures. Paths may be None: the bundled demo photo and speech."""

    weights: object                                   # sadtalker_rt.models.checkpoints.WeightSource
    size: int = 256
    backends: tuple[str, ...] = ()                    # empty: every backend this machine can run
    batch_sizes: tuple[int, ...] = (OFFICIAL_BATCH,)  # per-frame stage timings; the first is the end-to-end batch
    frames: int = 8
    warmup: int = 1
    repeats: int = 1                                  # timed calls per stage and batch in each round, at least
    min_stage_s: float = 0.0                          # ... and more until each backend spent this on the stage
    rounds: int = 3                                   # rounds of interleaved timing (every backend once per round)
    threads: int = 0                                  # CPU threads of one call, every backend (0: each library's own)
    end_to_end_rounds: bool = True                    # False: the rounds time stages only (no end-to-end run)
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
        if self.warmup < 0 or self.repeats < 1 or self.rounds < 1 or self.min_stage_s < 0:
            raise UsageError(f"--warmup and --min-stage-ms must be >= 0, --repeats and --rounds >= 1 "
                             f"(got {self.warmup}, {self.min_stage_s * 1000:g}, {self.repeats}, {self.rounds}).")
        if self.threads < 0:
            raise UsageError(f"--threads must be 0 (each library's own choice) or more, not {self.threads}.")
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
    """CPU: torch, onnxruntime FP32 and FP16. CUDA: torch FP32, FP16 and FP16 replayed from CUDA graphs, onnxruntime FP32 where onnxruntime has
    a CUDA provider, TensorRT FP32 and FP16 where --engines-dir is given and TensorRT imports."""
    from .probes import ort_providers, tensorrt_version

    if device != "cuda":
        return ("torch", "onnxruntime-fp32", "onnxruntime-fp16")
    names = ["torch", "torch-fp16", "torch-fp16-graphs"]
    if "CUDAExecutionProvider" in ort_providers():
        names.append("onnxruntime-fp32")
    if engines_dir is not None and tensorrt_version()[0] is not None:
        names += ["tensorrt-fp32", "tensorrt-fp16"]
    return tuple(names)


# ---------------------------------------------------------------------------------------------- measuring
