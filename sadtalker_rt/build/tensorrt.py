"""Build one TensorRT engine per exported stage, reusing each engine whose cache key still matches.

``build_engines`` checks the environment, then ``run_builds`` does the bookkeeping (plan, reuse,
atomic writes, ``engines.json``) around a ``build`` callable. Engines are built through Polygraphy's
TensorRT loaders (``polygraphy_loader``): a strongly typed network parsed from the ONNX file (the
precision is the one in the mixed-precision graph, the only way TensorRT 11 offers, the same on 10.x),
the stage table's optimization profiles, TF32 off, a workspace limit and a shared timing cache.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__
from ..runtime.manifest import MANIFEST, load_manifest, sha256_of, verified_path
from ..errors import UsageError, WeightsError
from ..stages import STAGES
from .polygraphy_check import polygraphy_command
from ..runtime.cuda import Cuda, import_tensorrt, platform_fields
from ..runtime.engine_plan import (DEFAULT_WORKSPACE_GIB, ENGINES_JSON, FORMAT, EngineKey, ProfileShapes,
                                   builder_settings, check_grid_sample, engine_action, engine_record, grid_sample_choice,
                                   load_engines_record, profile_shapes, write_atomic)

TIMING_CACHE = "timing.cache"
Progress = Callable[[str, int, int], None]
BuildEngine = Callable[[Path, ProfileShapes], bytes]      # (graph, profile shapes) -> serialized engine
# (stage, precision, graph, engine bytes, profile shapes) -> (parity verdicts, passed)
CheckEngine = Callable[[str, str, Path, bytes, ProfileShapes], tuple[list, bool]]


@dataclass
class BuildResult:
    record: dict                # what engines.json now holds
    built: dict[str, str]       # stage -> why it was (re)built
    reused: list[str]
    parity_failures: dict[str, str] = field(default_factory=dict)   # stage -> the polygraphy command to check it


@dataclass
class PlannedEngine:
    stage: str
    graph: Path
    key: EngineKey
    action: str                 # "reuse" or "build"
    reason: str | None          # why it is (re)built
    previous: dict | None


def plan_builds(manifest: dict, onnx_dir: Path, out_dir: Path, platform: dict, max_batch: int | None = None,
                opt_batch: int | None = None, stages: tuple[str, ...] | None = None,
                builder: dict | None = None) -> list[PlannedEngine]:
    """What to do for each stage of the export: reuse its engine, or build it and why.

    Profiles come from the stage table; ``max_batch`` / ``opt_batch`` override its BATCH axis. A stage
    whose graph holds a native 5-D GridSample is refused where this TensorRT cannot build it; the other
    stages of that export build anywhere.
    """
    previous = load_engines_record(out_dir, required=False)["stages"]
    size = int(manifest["size"])
    planned = []
    for name, entry in manifest["stages"].items():
        if stages is not None and name not in stages:
            continue
        if name not in STAGES:
            raise WeightsError(f"{Path(onnx_dir) / MANIFEST} names stage '{name}', which this toolkit does not know.")
        check_grid_sample(entry.get("grid_sample"), platform["trt_version"], onnx_dir)
        graph = verified_path(onnx_dir, manifest, name)
        shapes = profile_shapes(STAGES[name], size, max_batch, opt_batch)
        key = EngineKey(entry["sha256"], name, entry["precision"], shapes, **platform,
                        builder=builder if builder is not None else builder_settings())
        action, reason = engine_action(previous.get(name), key, out_dir, building=True)
        planned.append(PlannedEngine(name, graph, key, action, reason, previous.get(name)))
    return planned


def run_builds(manifest: dict, onnx_dir: Path, out_dir: Path, platform: dict, build: BuildEngine,
               max_batch: int | None = None, opt_batch: int | None = None, progress: Progress | None = None,
               stages: tuple[str, ...] | None = None, builder: dict | None = None,
               check: CheckEngine | None = None) -> BuildResult:
    """Build or reuse each engine, write it atomically and record it in ``engines.json`` (after each engine,
    so an interrupted build keeps what it finished). ``check`` measures each new engine against its graph;
    a failing engine is kept and recorded with its parity, and named in ``parity_failures``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    planned = plan_builds(manifest, onnx_dir, out_dir, platform, max_batch, opt_batch, stages, builder)
    kept = load_engines_record(out_dir, required=False)["stages"] if stages is not None else {}
    record = {
        "format": FORMAT, "toolkit_version": __version__, "size": int(manifest["size"]),
        "precision": manifest.get("precision"), "grid_sample": manifest.get("grid_sample"),
        "onnx_manifest_sha256": sha256_of(Path(onnx_dir) / MANIFEST),
        "weights": manifest.get("weights", {}).get("identity"), **platform,
        "max_batch": max_batch, "opt_batch": opt_batch,      # overrides of the stage table's profiles, or None
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
            seconds = round(time.perf_counter() - start, 1)
            extra = {}
            if check is not None:
                verdicts, passed = check(item.stage, item.key.precision, item.graph, data, item.key.profile)
                extra = {"parity": [v.as_dict() for v in verdicts], "parity_passed": passed}
                if not passed:
                    result.parity_failures[item.stage] = polygraphy_command(
                        item.graph, item.stage, item.key.precision, item.key.profile)
            file = f"{item.stage}.engine"
            write_atomic(out_dir / file, data)
            record["stages"][item.stage] = engine_record(
                item.key, file, hashlib.sha256(data).hexdigest(), built_because=item.reason,
                build_seconds=seconds, **extra)
            result.built[item.stage] = item.reason
        _carry_side_files(manifest["stages"][item.stage], Path(onnx_dir), out_dir, record["stages"][item.stage])
        write_atomic(out_dir / ENGINES_JSON, json.dumps(record, indent=2).encode())
    if progress:
        progress("engines", len(planned), len(planned))
    return result


SIDE_FILES = ("fixed_noise",)     # manifest fields naming files a stage's runtime reads beside its graph


def _carry_side_files(graph_entry: dict, onnx_dir: Path, out_dir: Path, engine_entry: dict) -> None:
    """Copy the files a stage needs at run time besides its engine (the enhancer's fixed decoder noise) from the
    graph folder, checked against the manifest's sha256, so an engine folder runs on its own."""
    for field_name in SIDE_FILES:
        side = graph_entry.get(field_name)
        if not side:
            continue
        source = Path(onnx_dir) / side["file"]
        if not source.is_file() or sha256_of(source) != side["sha256"]:
            raise WeightsError(f"{source} is missing or does not match the sha256 in {onnx_dir / MANIFEST}.")
        write_atomic(out_dir / side["file"], source.read_bytes())
        engine_entry[field_name] = dict(side)


def installed_trt_version() -> str | None:
    """The version of the TensorRT installed here, or None where it is absent or does not load."""
    try:
        import tensorrt
    except (ImportError, OSError):
        return None
    return str(tensorrt.__version__)


def resolve_grid_sample(choice: str = "auto") -> str:
    """``--grid-sample auto``: the form the installed TensorRT can build ("native" from 11.2, "decomposed"
    before); "native" where no TensorRT is installed (onnxruntime runs either)."""
    if choice != "auto":
        return choice
    version = installed_trt_version()
    return "native" if version is None else grid_sample_choice(version)


def build_engines(onnx_dir: Path, out_dir: Path, max_batch: int | None = None, opt_batch: int | None = None,
                  workspace_gib: float = DEFAULT_WORKSPACE_GIB, progress: Progress | None = None,
                  stages: tuple[str, ...] | None = None) -> BuildResult:
    """Build (or reuse) an engine for every stage exported in ``onnx_dir`` into ``out_dir``; see ``run_builds``.

    Profiles are the stage table's; ``max_batch`` (``--max-batch``) overrides the largest batch."""
    if max_batch is not None and max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, not {max_batch}.")
    if not workspace_gib > 0:
        raise UsageError(f"--workspace must be a positive number of GiB, not {workspace_gib}.")
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    manifest = load_manifest(onnx_dir)
    trt = import_tensorrt()
    platform = platform_fields(trt, Cuda())
    settings = builder_settings(workspace_gib)
    builder = PolygraphyEngineBuilder(trt, settings, out_dir / TIMING_CACHE)
    if max_batch is not None and opt_batch is not None:
        opt_batch = min(opt_batch, max_batch)
    return run_builds(manifest, onnx_dir, out_dir, platform, builder.build, max_batch, opt_batch, progress, stages,
                      settings, check=check_with_polygraphy)


def check_with_polygraphy(stage: str, precision: str, graph: Path, engine: bytes, shapes: ProfileShapes):
    """The engine in Polygraphy's TensorRT runner against its graph in Polygraphy's onnxruntime runner."""
    from .polygraphy_check import engine_parity, tensorrt_runner

    return engine_parity(stage, precision, graph, tensorrt_runner(engine), shapes)


def polygraphy_loader(trt, graph: Path, shapes: ProfileShapes, settings: dict, timing_cache: Path):
    """Polygraphy's loader chain for one engine (lazy: nothing runs until it is called, which returns the
    serialized engine). Polygraphy locks the timing cache file while it reads it and merges into it after
    the build; a cache from another GPU or TensorRT version is ignored by TensorRT."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    profile = Profile()
    for name, (low, opt, high) in shapes.items():
        profile.add(name, low, opt, high)
    # From the file, so external weights resolve. STRONGLY_TYPED: opt-in on 10.x, the only mode on 11.x.
    network = NetworkFromOnnxPath(str(graph), strongly_typed=settings["strongly_typed"])
    config = CreateConfig(tf32=settings["tf32"], profiles=[profile],
                          memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(settings["workspace_gib"] * (1 << 30))},
                          load_timing_cache=str(timing_cache))
    return EngineBytesFromNetwork(network, config=config, save_timing_cache=str(timing_cache))


class PolygraphyEngineBuilder:
    """ONNX graph -> serialized engine through Polygraphy, sharing one timing cache file."""

    def __init__(self, trt, settings: dict, timing_cache: Path):
        self.trt = trt
        self.settings = settings
        self.timing_cache = Path(timing_cache)

    def build(self, graph: Path, shapes: ProfileShapes) -> bytes:
        from polygraphy.exception import PolygraphyException

        try:
            serialized = polygraphy_loader(self.trt, graph, shapes, self.settings, self.timing_cache)()
        except PolygraphyException as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else "see the log above"
            raise WeightsError(f"TensorRT {self.trt.__version__} could not build an engine from {graph.name}: "
                               f"{reason[:500]} (details in the log above)."
                               ) from None
        return bytes(memoryview(serialized))

