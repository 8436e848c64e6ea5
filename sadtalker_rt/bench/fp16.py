"""FP16 graphs measured on a CPU the way export validation measures them.

onnxruntime's CPU provider runs most float16 nodes in float32 (it inserts Casts and drops the pairs between
neighbours), so the outputs of an FP16 graph run there are nearly float32 and hide FP16's error. Export
validation judges FP16 graphs on a copy that stores every float16 tensor as float16 would
(``emulate_fp16_storage``); this backend runs the same copy, so the bench's FP16 parity is the export's.
Stages kept in FP32 run from their graphs unchanged.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.backends import check_feeds
from ..stages import STAGES


class _EmulatedRunner:
    def __init__(self, stage: str, model_bytes: bytes):
        import onnxruntime as ort

        self.stage = STAGES[stage]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL    # keep the round trips
        self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self.output_names = [t.name for t in self.stage.outputs]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.stage, feeds)
        feeds = {k: np.ascontiguousarray(v, dtype=self.stage.input(k).dtype) for k, v in feeds.items()}
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


class EmulatedFp16Backend:
    """The FP16 graphs of an export directory, FP16 stages run with float16 storage emulated."""

    name = "onnxruntime-fp16-emulated"
    METHOD = "FP16 storage emulated on CPU (every float16 tensor rounded through float16), as export validation"

    def __init__(self, directory: Path):
        from ..runtime.manifest import load_manifest

        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)
        self.size = int(self.manifest["size"])
        self._runners: dict = {}

    def runner(self, stage: str):
        if stage not in self._runners:
            import onnx

            from ..build.export.mixed_precision import emulate_fp16_storage
            from ..runtime.backends.onnxruntime_backend import OnnxRuntimeRunner
            from ..runtime.manifest import verified_path

            path = verified_path(self.directory, self.manifest, stage)
            if self.manifest["stages"][stage].get("precision") == "fp16":
                model = emulate_fp16_storage(onnx.load(str(path)))
                self._runners[stage] = _EmulatedRunner(stage, model.SerializeToString())
            else:
                self._runners[stage] = OnnxRuntimeRunner(stage, path, ["CPUExecutionProvider"], self.size)
        return self._runners[stage]
