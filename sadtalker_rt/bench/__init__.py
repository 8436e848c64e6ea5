"""``sadtalker-rt bench``: latency and parity of every backend against the official loop, measured interleaved.

Modules: ``config`` (what a run measures, backend names), ``probes`` (memory, GPU, machine load, environment),
``official`` (the official-loop baseline), ``backends`` (opening backends, exports and engines kept in
--engines-dir), ``fp16`` (FP16 graphs judged on a CPU with FP16 storage emulated, as export validation),
``instrument`` (the timing hook), ``metrics`` (parity measures; verdicts by sadtalker_rt.parity), ``run``
(orchestration: reference, parity, interleaved timing rounds, per-round ratios), ``report`` (JSON and its
schema, report.schema.json), ``markdown`` and ``soak`` (many short jobs through one pipeline). Only the stdlib
and numpy are imported here; torch, onnxruntime and TensorRT inside the functions that use them.
"""
from __future__ import annotations

from ..errors import UsageError
from .backends import OPENERS, BackendSkipped, BenchContext, Opened, ParityFailure
from .config import (ALIASES, FPS, OFFICIAL_BATCH, POSE_CHUNK, SAMPLE_RATE, BenchConfig, default_backends,
                     expand_backends, parse_list)
from .instrument import Call, CallLog, InstrumentedBackend
from .markdown import to_markdown
from .metrics import (END_TO_END_TOLERANCES, euler_degrees, fixed_mouth_box, frame_parity, head_pose_delta,
                      kabsch_rotation, mouth_box, stage_parity)
from .report import SCHEMA_FILE, SCHEMA_VERSION, schema, to_json_ready, write_json
from .run import add_ratios, run_bench, spread, timing_plan

__all__ = [
    "ALIASES", "BackendSkipped", "BenchConfig", "BenchContext", "Call", "CallLog", "END_TO_END_TOLERANCES", "FPS",
    "InstrumentedBackend", "OFFICIAL_BATCH", "OPENERS", "Opened", "POSE_CHUNK", "ParityFailure", "SAMPLE_RATE",
    "SCHEMA_FILE", "SCHEMA_VERSION", "UsageError", "add_ratios", "default_backends", "euler_degrees",
    "expand_backends", "fixed_mouth_box", "frame_parity", "head_pose_delta", "kabsch_rotation", "mouth_box",
    "parse_list", "run_bench", "schema", "spread", "stage_parity", "timing_plan", "to_json_ready", "to_markdown",
    "write_json",
]
