"""Exported ONNX graphs run by onnxruntime. Never imports torch.

The graphs' manifest (written by ``sadtalker-rt export``) names each stage's file and its sha256;
a graph whose bytes do not match is refused before it is loaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import EnvironmentProblem, UsageError, WeightsError
from ...stages import STAGES
from . import SerialBackend, check_feeds
from ..manifest import load_manifest, verified_path


DEVICES = {       # --device -> execution providers, in onnxruntime's order of preference
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
GPU_GRID_SAMPLE_5D_FROM = (1, 25)     # onnxruntime-gpu runs 5-D GridSample on the GPU (float32) from 1.25.0


def providers_for(device: str, available: list[str]) -> list[str]:
    """The execution providers for ``--device``; refuse where this onnxruntime build lacks one of them."""
    if device not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)} for --backend onnxruntime, not '{device}'.")
    wanted = list(DEVICES[device])
    missing = [p for p in wanted if p not in available]
    if missing:
        raise EnvironmentProblem(f"--device {device} needs onnxruntime's {' and '.join(missing)}, which this "
                                 f"onnxruntime build lacks (it offers {', '.join(available)}); "
                                 f"pip install 'sadtalker-rt[gpu]' (onnxruntime-gpu) instead of onnxruntime.")
    return wanted


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    return providers_for(device, list(ort.get_available_providers()))


def grid_sample_note(version: str, device: str) -> str | None:
    """onnxruntime-gpu before 1.25 runs 5-D GridSample on the CPU (silently, copying the volume each call)."""
    numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if device != "cpu" and numbers < GPU_GRID_SAMPLE_5D_FROM:
        return (f"onnxruntime {version} runs the renderer's 5-D GridSample on the CPU; onnxruntime-gpu 1.25.0 "
                f"or later runs it on the GPU (float32)")
    return None


class OnnxRuntimeRunner:
    def __init__(self, stage_name: str, path: Path, providers: list[str], size: int | None = None,
                 intra_op_threads: int = 0):
        """``intra_op_threads``: threads of one call (0: onnxruntime's choice, one per core)."""
        import onnxruntime as ort

        self.stage = STAGES[stage_name]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types per build
            raise WeightsError(f"{path} could not be loaded by onnxruntime ({str(err).splitlines()[0][:200]}).") from None
        if providers[0] not in self.session.get_providers():       # onnxruntime falls back silently
            raise EnvironmentProblem(f"onnxruntime could not start its {providers[0]} for {path.name} (it runs "
                                     f"{', '.join(self.session.get_providers())}); check the CUDA, cuDNN and "
                                     f"TensorRT libraries that onnxruntime-gpu needs.")
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

    def __init__(self, directory: Path, device: str = "cpu", intra_op_threads: int = 0):
        """``intra_op_threads``: threads of one call, every stage (0: onnxruntime's choice, one per core)."""
        self.directory = Path(directory)
        self.intra_op_threads = intra_op_threads
        self.manifest = load_manifest(self.directory)
        self.size = int(self.manifest["size"])
        self.precision = self.manifest.get("precision")
        self.device = device
        self._providers = _providers(device)
        self._runners: dict[str, OnnxRuntimeRunner] = {}
        weights = self.manifest.get("weights", {})
        self.notes = [f"graphs exported from {weights.get('description', 'unknown weights')}"]
        import onnxruntime as ort

        note = grid_sample_note(ort.__version__, device)
        if note:
            self.notes.append(note)

    def runner(self, stage: str) -> OnnxRuntimeRunner:
        if stage not in self._runners:
            path = verified_path(self.directory, self.manifest, stage)
            self._runners[stage] = OnnxRuntimeRunner(stage, path, self._providers, self.size,
                                                     intra_op_threads=self.intra_op_threads)
        return self._runners[stage]

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"backend": "onnxruntime", "onnxruntime": ort.__version__, "providers": self._providers,
                "precision": self.manifest.get("precision"), "weights": self.manifest.get("weights", {}).get("identity")}
