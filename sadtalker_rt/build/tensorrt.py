"""Build one TensorRT engine per exported stage, reusing each engine whose cache key still matches.

``build_engines`` checks the environment, then ``run_builds`` does the bookkeeping (plan, reuse,
atomic writes, ``engines.json``) around a ``build`` callable; only ``TrtEngineBuilder`` calls TensorRT.
Networks are strongly typed: the precision is the one in the (mixed-precision) ONNX graph, which is
the only way TensorRT 11 offers and works the same on 10.x.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import __version__
from ..runtime.manifest import MANIFEST, load_manifest, sha256_of, verified_path
from ..errors import UsageError, WeightsError
from ..stages import STAGES
from ..runtime.cuda import Cuda, import_tensorrt, platform_fields
from ..runtime.engine_plan import (ENGINES_JSON, FORMAT, EngineKey, ProfileShapes, check_grid_sample, engine_action,
                                   engine_record, load_engines_record, profile_shapes, write_atomic)

TIMING_CACHE = "timing.cache"
Progress = Callable[[str, int, int], None]
BuildEngine = Callable[[Path, ProfileShapes], bytes]      # (graph, profile shapes) -> serialized engine


@dataclass
class BuildResult:
    record: dict                # what engines.json now holds
    built: dict[str, str]       # stage -> why it was (re)built
    reused: list[str]


@dataclass
class PlannedEngine:
    stage: str
    graph: Path
    key: EngineKey
    action: str                 # "reuse" or "build"
    reason: str | None          # why it is (re)built
    previous: dict | None


def plan_builds(manifest: dict, onnx_dir: Path, out_dir: Path, platform: dict, max_batch: int, opt_batch: int,
                stages: tuple[str, ...] | None = None) -> list[PlannedEngine]:
    """What to do for each stage of the export: reuse its engine, or build it and why."""
    previous = load_engines_record(out_dir, required=False)["stages"]
    size = int(manifest["size"])
    planned = []
    for name, entry in manifest["stages"].items():
        if stages is not None and name not in stages:
            continue
        if name not in STAGES:
            raise WeightsError(f"{Path(onnx_dir) / MANIFEST} names stage '{name}', which this toolkit does not know.")
        graph = verified_path(onnx_dir, manifest, name)
        shapes = profile_shapes(STAGES[name], size, max_batch, opt_batch)
        key = EngineKey(entry["sha256"], name, entry["precision"], shapes, **platform)
        action, reason = engine_action(previous.get(name), key, out_dir, building=True)
        planned.append(PlannedEngine(name, graph, key, action, reason, previous.get(name)))
    return planned


def run_builds(manifest: dict, onnx_dir: Path, out_dir: Path, platform: dict, build: BuildEngine, max_batch: int,
               opt_batch: int, progress: Progress | None = None,
               stages: tuple[str, ...] | None = None) -> BuildResult:
    """Build or reuse each engine, write it atomically and record it in ``engines.json`` (after each engine,
    so an interrupted build keeps what it finished)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    planned = plan_builds(manifest, onnx_dir, out_dir, platform, max_batch, opt_batch, stages)
    kept = load_engines_record(out_dir, required=False)["stages"] if stages is not None else {}
    record = {
        "format": FORMAT, "toolkit_version": __version__, "size": int(manifest["size"]),
        "precision": manifest.get("precision"), "grid_sample": manifest.get("grid_sample"),
        "onnx_manifest_sha256": sha256_of(Path(onnx_dir) / MANIFEST),
        "weights": manifest.get("weights", {}).get("identity"), **platform,
        "max_batch": max_batch, "opt_batch": opt_batch,
        "stages": {name: entry for name, entry in kept.items() if name in manifest["stages"]},
    }
    result = BuildResult(record, {}, [])
    for i, item in enumerate(planned):
        if progress:
            progress("engines", i, len(planned))
        if item.action == "reuse":
            record["stages"][item.stage] = item.previous
            result.reused.append(item.stage)
        else:
            start = time.perf_counter()
            data = build(item.graph, item.key.profile)
            file = f"{item.stage}.engine"
            write_atomic(out_dir / file, data)
            record["stages"][item.stage] = engine_record(
                item.key, file, hashlib.sha256(data).hexdigest(), built_because=item.reason,
                build_seconds=round(time.perf_counter() - start, 1))
            result.built[item.stage] = item.reason
        write_atomic(out_dir / ENGINES_JSON, json.dumps(record, indent=2).encode())
    if progress:
        progress("engines", len(planned), len(planned))
    return result


def build_engines(onnx_dir: Path, out_dir: Path, max_batch: int = 8, opt_batch: int = 4, workspace_gib: float = 4,
                  progress: Progress | None = None, stages: tuple[str, ...] | None = None) -> BuildResult:
    """Build (or reuse) an engine for every stage exported in ``onnx_dir`` into ``out_dir``; see ``run_builds``."""
    if max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, not {max_batch}.")
    if not workspace_gib > 0:
        raise UsageError(f"--workspace must be a positive number of GiB, not {workspace_gib}.")
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    manifest = load_manifest(onnx_dir)
    trt = import_tensorrt()
    platform = platform_fields(trt, Cuda())
    check_grid_sample(manifest.get("grid_sample"), platform["trt_version"], onnx_dir)
    builder = TrtEngineBuilder(trt, workspace_gib, out_dir / TIMING_CACHE)
    return run_builds(manifest, onnx_dir, out_dir, platform, builder.build, max_batch, min(opt_batch, max_batch),
                      progress, stages)


def _collecting_logger(trt):
    """A TensorRT logger that prints warnings and keeps errors for the exception message."""

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR,
                            trt.ILogger.Severity.WARNING):
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return CollectingLogger()


class TrtEngineBuilder:
    """ONNX graph -> serialized engine through the TensorRT Python API, sharing one timing cache file."""

    def __init__(self, trt, workspace_gib: float, timing_cache: Path):
        self.trt = trt
        self.workspace_bytes = int(workspace_gib * (1 << 30))
        self.timing_cache = Path(timing_cache)
        self.logger = _collecting_logger(trt)

    def build(self, graph: Path, shapes: ProfileShapes) -> bytes:
        trt, version = self.trt, self.trt.__version__
        self.logger.errors.clear()
        builder = trt.Builder(self.logger)
        # STRONGLY_TYPED: opt-in on 10.x, the only mode on 11.x (where the flag is accepted and redundant).
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(graph)):      # from the file, so external weights resolve
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no details"
            raise WeightsError(f"TensorRT {version} could not parse {graph.name}: {errors[:1000]}.")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        dynamic = [network.get_input(i) for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
        if dynamic:
            profile = builder.create_optimization_profile()
            for tensor in dynamic:
                low, opt, high = shapes[tensor.name]
                profile.set_shape(tensor.name, low, opt, high)
            config.add_optimization_profile(profile)
        cached = self.timing_cache.read_bytes() if self.timing_cache.is_file() else b""
        if not config.set_timing_cache(config.create_timing_cache(cached), False):
            # A cache from another GPU or TensorRT version: start a new one.
            config.set_timing_cache(config.create_timing_cache(b""), False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            errors = "; ".join(self.logger.errors) or "see the TensorRT log above"
            raise WeightsError(f"TensorRT {version} could not build an engine from {graph.name}: {errors[:1000]}.")
        write_atomic(self.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
        return bytes(memoryview(serialized))
