"""The export manifest: what each graph is, where it came from and how well it matched PyTorch."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .. import __version__
from ..errors import WeightsError

MANIFEST = "manifest.json"
FORMAT = "sadtalker-rt/onnx-1"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise WeightsError(f"{directory} is not a directory of exported graphs (run `sadtalker-rt export`).")
    if not path.is_file():
        raise WeightsError(f"{path} is missing; {directory} was not made by `sadtalker-rt export`.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(manifest, dict):
        raise WeightsError(f"{path} is not a manifest (a JSON object was expected).")
    if manifest.get("format") != FORMAT:
        raise WeightsError(f"{path} has format {manifest.get('format')!r}; this toolkit ({__version__}) reads {FORMAT!r}.")
    size = manifest.get("size")
    if not (isinstance(size, int) and size > 0 and size % 4 == 0) or not isinstance(manifest.get("stages"), dict):
        raise WeightsError(f"{path} lacks a render size or its stages; re-run `sadtalker-rt export`.")
    return manifest


def verified_path(directory: Path, manifest: dict, stage: str) -> Path:
    """The stage's graph file, after checking its sha256 against the manifest."""
    entry = manifest.get("stages", {}).get(stage)
    if entry is None:
        raise WeightsError(f"{Path(directory) / MANIFEST} has no stage '{stage}'; re-run `sadtalker-rt export`.")
    path = Path(directory) / entry["file"]
    if not path.is_file():
        raise WeightsError(f"{path} is missing.")
    if sha256_of(path) != entry["sha256"]:
        raise WeightsError(f"{path} does not match the sha256 recorded in its manifest; it was changed or damaged.")
    return path
