"""What to build and whether an engine may run: grid-sample support, optimization profiles, cache keys.

Pure Python: no TensorRT, no GPU. A serialized engine is tied to its graph, its profile, the TensorRT
version and the GPU, so each engine's record in ``engines.json`` carries all of these, and one function
(``check_engine``) says in one sentence why an engine may not run. ``sadtalker-rt build`` rebuilds such
an engine; the runtime refuses it with that sentence.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import __version__
from .manifest import sha256_of
from ..errors import UsageError, WeightsError
from ..stages import BATCH, FRAMES, Stage

ENGINES_JSON = "engines.json"
FORMAT = "sadtalker-rt/engines-1"
NATIVE_GRID_SAMPLE_FROM = (11, 2)       # TensorRT release notes: rank-5 GridSample from 11.2; 4-D only before
DEFAULT_WORKSPACE_GIB = 4.0

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]   # input name -> (min, opt, max)


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.8.0.43' -> (10, 8, 0, 43); trailing labels such as '.post1' are ignored."""
    numbers = []
    for part in str(version).split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
    return tuple(numbers)


def grid_sample_choice(trt_version: str) -> str:
    """The export's ``--grid-sample`` that this TensorRT can build: "native" from 11.2, "decomposed" before."""
    return "native" if version_tuple(trt_version)[:2] >= NATIVE_GRID_SAMPLE_FROM else "decomposed"


def check_grid_sample(exported: str | None, trt_version: str, onnx_dir: Path | str = "the graphs") -> None:
    """Refuse a native (5-D GridSample) export for a TensorRT that cannot parse it. Decomposed builds anywhere."""
    if exported == "native" and grid_sample_choice(trt_version) != "native":
        raise WeightsError(f"{onnx_dir} was exported with --grid-sample native (5-D GridSample), which TensorRT "
                           f"{trt_version} cannot build (it needs 11.2 or later); re-export with "
                           f"`sadtalker-rt export --grid-sample decomposed`.")


def profile_shapes(stage: Stage, size: int, max_batch: int | None = None,
                   opt_batch: int | None = None) -> ProfileShapes:
    """Min/opt/max shape of every input from the stage table's ``profile`` of its dynamic axis; static inputs fixed.

    ``max_batch`` / ``opt_batch`` override the table's max / opt of the BATCH axis (``--max-batch``); the
    opt is lowered to the max where it would exceed it. The FRAMES axis always follows the table.
    """
    lo, opt, hi = stage.profile
    batch_hi = hi if max_batch is None else max_batch
    batch_opt = min(opt, batch_hi) if opt_batch is None else opt_batch
    if not 1 <= batch_opt <= batch_hi:
        raise UsageError(f"batch sizes must satisfy 1 <= opt ({batch_opt}) <= max ({batch_hi}).")
    points = ({BATCH: 1, FRAMES: lo}, {BATCH: batch_opt, FRAMES: opt}, {BATCH: batch_hi, FRAMES: hi})
    return {t.name: tuple(t.resolve(size, **axes) for axes in points) for t in stage.inputs}


def builder_settings(workspace_gib: float = DEFAULT_WORKSPACE_GIB) -> dict:
    """The builder configuration an engine depends on besides its graph and profile: part of its key.

    Networks are strongly typed (precision comes from the graph; TensorRT 11 knows no other way) and TF32
    is off, so FP32 layers compute in FP32 (TensorRT enables TF32 by default).
    """
    return {"strongly_typed": True, "tf32": False, "workspace_gib": float(workspace_gib)}


def _canonical_profile(profile: ProfileShapes | dict) -> dict[str, list[list[int]]]:
    return {name: [[int(d) for d in shape] for shape in shapes] for name, shapes in sorted(profile.items())}


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Two builds with equal keys produce interchangeable engines."""

    graph_sha256: str
    stage: str
    precision: str
    profile: dict                  # ProfileShapes
    trt_version: str
    gpu_name: str
    compute_capability: str        # "8.6"
    builder: dict = field(default_factory=builder_settings)

    def fields(self) -> dict:
        return {**asdict(self), "profile": _canonical_profile(self.profile)}

    def digest(self) -> str:
        return cache_key(self.graph_sha256, self.stage, self.precision, self.profile, self.trt_version,
                         self.gpu_name, self.compute_capability, self.builder)


def cache_key(graph_sha256: str, stage: str, precision: str, profile_shapes: ProfileShapes | dict, trt_version: str,
              gpu_name: str, compute_capability: str, builder: dict | None = None) -> str:
    """sha256 of the canonical JSON of the key fields (sorted keys, no whitespace, shapes as lists)."""
    fields = {"format": FORMAT, "graph_sha256": graph_sha256, "stage": stage, "precision": precision,
              "profile": _canonical_profile(profile_shapes), "trt_version": trt_version, "gpu_name": gpu_name,
              "compute_capability": str(compute_capability),
              "builder": builder if builder is not None else builder_settings()}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def engine_record(key: EngineKey, file: str, engine_sha256: str, **extra) -> dict:
    """One stage's entry in ``engines.json``: the key fields, the key itself and the engine file."""
    return {**key.fields(), "key": key.digest(), "file": file, "engine_sha256": engine_sha256, **extra}


def _short(sha: str) -> str:
    return f"{sha[:12]}..."


def _profile_difference(built: dict, wanted: dict) -> str:
    names = sorted(set(built) | set(wanted))
    changed = [n for n in names if built.get(n) != wanted.get(n)]
    name = changed[0]
    if name not in built or name not in wanted:
        return f"input {name} is {'new' if name not in built else 'gone'}"
    labels = ("min", "opt", "max")
    parts = [f"{label} {tuple(b)} then, {tuple(w)} now" for label, b, w in zip(labels, built[name], wanted[name])
             if b != w]
    return f"{name} {'; '.join(parts)}"


def check_engine(record: dict, current: EngineKey | dict) -> str | None:
    """Why the engine described by ``record`` may not run where ``current`` describes, or None if it may.

    ``current`` is an EngineKey (a build knows every field) or a dict of the fields known here (the runtime
    knows the platform: ``gpu_name``, ``compute_capability``, ``trt_version``). Missing fields are not compared.
    """
    now = current.fields() if isinstance(current, EngineKey) else dict(current)
    if "profile" in now:
        now["profile"] = _canonical_profile(now["profile"])
    for fields, why in _MISMATCHES:
        if any(field in now and _differs(record, now, field) for field in fields):
            return why(record, now)
    return None


def _differs(record: dict, now: dict, field: str) -> bool:
    if field == "profile":
        return _canonical_profile(record.get("profile", {})) != now["profile"]
    if field == "builder":
        return record.get("builder") != now["builder"]
    return str(record.get(field)) != str(now[field])


# (fields, the sentence when one of them differs), in the order they are checked: the platform first.
_MISMATCHES = (
    (("gpu_name", "compute_capability"), lambda then, now: (
        f"it was built for {then.get('gpu_name')} (compute capability {then.get('compute_capability')}) and this "
        f"GPU is {now.get('gpu_name', then.get('gpu_name'))} "
        f"({now.get('compute_capability', then.get('compute_capability'))})")),
    (("trt_version",), lambda then, now: (
        f"it was built with TensorRT {then.get('trt_version')} and this is TensorRT {now['trt_version']}")),
    (("stage",), lambda then, now: f"it is the engine of stage {then.get('stage')}, not {now['stage']}"),
    (("graph_sha256",), lambda then, now: (
        f"its ONNX graph changed (sha256 {_short(str(then.get('graph_sha256')))} then, "
        f"{_short(now['graph_sha256'])} now)")),
    (("precision",), lambda then, now: (
        f"it was built from a {then.get('precision')} graph and the graph now is {now['precision']}")),
    (("profile",), lambda then, now: (
        f"its optimization profile differs ({_profile_difference(then.get('profile', {}), now['profile'])})")),
    (("builder",), lambda then, now: (
        f"its builder settings differ ({_settings_difference(then.get('builder') or {}, now['builder'])})")),
)


def _settings_difference(built: dict, wanted: dict) -> str:
    changed = [k for k in sorted(set(built) | set(wanted)) if built.get(k) != wanted.get(k)]
    return "; ".join(f"{k} {built.get(k, 'unrecorded')} then, {wanted.get(k)} now" for k in changed)


def engine_file_problem(directory: Path, record: dict) -> str | None:
    """Why the engine file named by ``record`` cannot be used as recorded, or None."""
    path = Path(directory) / record.get("file", "")
    if not record.get("file") or not path.is_file():
        return f"its engine file {path} is missing"
    if sha256_of(path) != record.get("engine_sha256"):
        return f"its engine file {path} does not match the sha256 in {ENGINES_JSON} (changed or damaged)"
    return None


def engine_action(record: dict | None, current: EngineKey | dict, directory: Path, *,
                  building: bool) -> tuple[str, str | None]:
    """("reuse", None), or ("build" | "refuse", reason): a build rebuilds what the runtime refuses."""
    if record is None:
        reason = "there is no engine for it yet"
    else:
        reason = check_engine(record, current) or engine_file_problem(directory, record)
    if reason is None:
        return "reuse", None
    return ("build" if building else "refuse"), reason


def refusal(stage: str, directory: Path | str, reason: str) -> str:
    """The runtime's one sentence for an engine that may not run here."""
    return (f"The {stage} engine in {directory} cannot run here: {reason}; rebuild the engines on this machine "
            f"with `sadtalker-rt build ONNX_DIR -o {directory}`.")


def shape_problem(stage: str, record: dict, name: str, shape: Shape) -> str | None:
    """Why ``shape`` for input ``name`` lies outside the engine's optimization profile, or None."""
    profile = record.get("profile", {}).get(name)
    if profile is None:
        return None
    lo, _, hi = profile
    if len(shape) == len(lo) and all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
        return None
    return (f"{name} of shape {tuple(shape)} is outside the {stage} engine's profile {tuple(lo)}..{tuple(hi)}; "
            f"use a smaller --batch-size or rebuild the engines with a larger --max-batch.")


def load_engines_record(directory: Path, required: bool = True) -> dict:
    """The ``engines.json`` of ``directory``; an empty record where it is absent and not ``required``."""
    path = Path(directory) / ENGINES_JSON
    if not path.is_file():
        if required:
            raise WeightsError(f"{path} is missing; {directory} was not made by `sadtalker-rt build`.")
        return {"format": FORMAT, "stages": {}}
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path} is not valid JSON ({err}).") from None
    if record.get("format") != FORMAT:
        if not required:        # a build starts over
            return {"format": FORMAT, "stages": {}}
        raise WeightsError(f"{path} has format {record.get('format')!r}; "
                           f"this toolkit ({__version__}) reads {FORMAT!r}.")
    return record


def write_atomic(path: Path, data: bytes) -> None:
    """Write beside the target, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
