"""Exported ONNX graphs run by onnxruntime. Never imports torch.

The graphs' manifest (written by ``sadtalker-rt export``) names each stage's file and its sha256;
a graph whose bytes do not match is refused before it is loaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import EnvironmentProblem, WeightsError
from ...stages import STAGES
from . import SerialBackend, check_feeds
from ..manifest import load_manifest, verified_path


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    wanted = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    if not wanted:
        raise EnvironmentProblem(f"--device {device} needs onnxruntime-gpu; this onnxruntime offers "
                                 f"{', '.join(available)} (pip install onnxruntime-gpu).")
    return wanted + ["CPUExecutionProvider"]


class OnnxRuntimeRunner:
    def __init__(self, stage_name: str, path: Path, providers: list[str], size: int | None = None):
        import onnxruntime as ort

        self.stage = STAGES[stage_name]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types per build
            raise WeightsError(f"{path} could not be loaded by onnxruntime ({str(err).splitlines()[0][:200]}).") from None
        names = {i.name for i in self.session.get_inputs()}
        expected = {t.name for t in self.stage.inputs}
        if names != expected:
            raise WeightsError(f"{path} takes inputs {sorted(names)}, but stage {stage_name} needs {sorted(expected)}.")
        self.output_names = [t.name for t in self.stage.outputs]
        if size is not None:
            for graph_input in self.session.get_inputs():
                expected = self.stage.input(graph_input.name).resolve(size, batch=-1, frames=-1)
                static = [(d, e) for d, e in zip(graph_input.shape, expected) if isinstance(d, int) and e != -1]
                if len(graph_input.shape) != len(expected) or any(d != e for d, e in static):
                    raise WeightsError(f"{path} takes {graph_input.name} of shape {graph_input.shape}, but its manifest "
                                       f"says size {size} ({list(expected)}); it was exported for another size.")

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.stage, feeds)
        feeds = {k: np.ascontiguousarray(v, dtype=self.stage.input(k).dtype) for k, v in feeds.items()}
        values = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, values))


class OnnxRuntimeBackend(SerialBackend):
    name = "onnxruntime"

    def __init__(self, directory: Path, size: int | None = None, device: str = "cpu"):
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)
        self.size = int(self.manifest["size"])
        self.precision = self.manifest.get("precision")
        self.device = device
        self._providers = _providers(device)
        self._runners: dict[str, OnnxRuntimeRunner] = {}
        weights = self.manifest.get("weights", {})
        self.notes = [f"graphs exported from {weights.get('description', 'unknown weights')}"]

    def runner(self, stage: str) -> OnnxRuntimeRunner:
        if stage not in self._runners:
            path = verified_path(self.directory, self.manifest, stage)
            self._runners[stage] = OnnxRuntimeRunner(stage, path, self._providers, self.size)
        return self._runners[stage]

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"backend": "onnxruntime", "onnxruntime": ort.__version__, "providers": self._providers,
                "precision": self.manifest.get("precision"), "weights": self.manifest.get("weights", {}).get("identity")}
