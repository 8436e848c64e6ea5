"""Artifacts keyed by content: the graphs and engines for given weights, size and precision are found in the
cache, or made once and kept there, so ``run --backend onnxruntime|tensorrt`` needs no export or build by hand.

The key of a graph folder covers what changes the graphs: the weights' bytes, the render size, precision and
grid-sample form, the opset, and the versions of this toolkit, torch, onnx and onnxruntime. Engines are built
into a folder per graph folder; the TensorRT builder's own keys (GPU, TensorRT version, profiles) decide there
whether an engine is reused. Folders are made beside their final place and renamed when complete, so an
interrupted export never leaves a folder that looks finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .. import __version__
from ..runtime.manifest import FORMAT, MANIFEST, sha256_of
from ..stages import OPSET

Progress = Callable[[str, int, int], None]


def cache_root() -> Path:
    """``$SADTALKER_RT_CACHE``, else ``$XDG_CACHE_HOME/sadtalker-rt``, else ``~/.cache/sadtalker-rt``."""
    if os.environ.get("SADTALKER_RT_CACHE"):
        return Path(os.environ["SADTALKER_RT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sadtalker-rt"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def weights_digest(weights) -> str:
    """sha256 over the bytes of every file the weights are read from (synthetic weights: their seed).

    Digests are remembered per (path, size, mtime) in the cache, so a checkpoint is hashed once.
    """
    if weights.synthetic:
        return weights.identity()
    memo_path = cache_root() / "file-digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    digest = hashlib.sha256()
    changed = False
    for path in weights.files():
        stat = path.stat()
        tag = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if tag not in memo:
            memo[tag] = sha256_of(path)
            changed = True
        digest.update(f"{path.name}:{memo[tag]}".encode())
    if changed:
        _write_json_atomic(memo_path, memo)
    return "sha256-" + digest.hexdigest()[:32]


def graphs_key(weights, size: int, precision: str, grid_sample: str) -> dict:
    return {"format": FORMAT, "weights": weights_digest(weights), "size": size, "precision": precision,
            "grid_sample": grid_sample, "opset": OPSET, "toolkit": __version__, "torch": _version("torch"),
            "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime")}


def key_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def graphs_for(weights, size: int, precision: str, grid_sample: str = "native",
               progress: Progress | None = None) -> Path:
    """The cached graph folder for these weights and options, exported and validated first if missing."""
    from .export.onnx_export import export_graphs

    key = graphs_key(weights, size, precision, grid_sample)
    return _cached_folder(cache_root() / "graphs" / key_name(key), key, lambda staging: export_graphs(
        weights, size, staging, precision=precision, grid_sample=grid_sample, progress=progress))


def enhancer_graphs_for(enhancer_weights, precision: str, progress: Progress | None = None) -> Path:
    """The cached folder of the enhancer stages (``face_parse`` too where the parsing weights exist) for these
    weights and precision; render size does not enter (faces are 512 x 512). Calibrated on the demo photo's face
    and its mirror image."""
    from .export.enhancer_inputs import aligned_faces
    from .export.onnx_export import export_graphs
    from .. import media
    from ..stages import ENHANCER_STAGES

    stages = tuple(s for s in ENHANCER_STAGES if s != "face_parse" or enhancer_weights.has("parsenet"))
    key = {"format": FORMAT, "weights": weights_digest(enhancer_weights), "precision": precision, "stages": stages,
           "opset": OPSET, "toolkit": __version__, "torch": _version("torch"), "onnx": _version("onnx"),
           "onnxruntime": _version("onnxruntime")}

    def export(staging: Path) -> None:
        photo = media.load_image(media.demo_image())
        faces = aligned_faces([photo, photo[:, ::-1]])
        export_graphs(None, 256, staging, precision=precision, stages=stages, enhancer_weights=enhancer_weights,
                      faces=faces, progress=progress)

    return _cached_folder(cache_root() / "enhancer-graphs" / key_name(key), key, export)


def _cached_folder(folder: Path, key: dict, make: Callable[[Path], None]) -> Path:
    if (folder / MANIFEST).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        make(staging)
        _write_json_atomic(staging / "cache-key.json", key)
        try:
            staging.rename(folder)
        except OSError:            # another process finished the same export first: keep theirs
            if not (folder / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def engines_for(graphs: Path, progress: Progress | None = None, **build_options) -> Path:
    """The engine folder for a graph folder; engines whose key still matches are reused by the builder.

    An engine whose recorded parity against its graph failed is refused, now and on every later run."""
    from .export.onnx_export import ExportValidationError
    from .tensorrt import build_engines

    folder = cache_root() / "engines" / Path(graphs).name
    result = build_engines(Path(graphs), folder, progress=progress, **build_options)
    failed = sorted(name for name, entry in result.record["stages"].items() if entry.get("parity_passed") is False)
    if failed:
        raise ExportValidationError(f"the {', '.join(failed)} engine(s) in {folder} do not match their ONNX graphs "
                                    "(parity recorded in engines.json; `sadtalker-rt build` prints the Polygraphy "
                                    "command to check them); run with --backend onnxruntime meanwhile.")
    return folder


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(handle, "w") as out:
        json.dump(data, out, indent=2, sort_keys=True)
    os.replace(tmp, path)
