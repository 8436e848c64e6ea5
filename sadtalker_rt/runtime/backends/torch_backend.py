"""The reference backend: stage modules built from official or synthetic weights, run eagerly."""
from __future__ import annotations

import numpy as np

from ...stages import STAGES, Stage
from . import SerialBackend, check_feeds


class TorchRunner:
    def __init__(self, stage: Stage, module, device: str, precision: str = "fp32", cuda_graphs: bool = False):
        import torch

        self.stage = stage
        # FP16 through autocast: convolutions in half, while grid sampling, normalisation statistics and
        # softmax stay float32 (autocast's own policy); stages with an fp32_reason are left alone.
        self.autocast = precision == "fp16" and not stage.fp32_reason and device != "cpu"
        # FP32 means FP32: PyTorch's default TF32 convolutions moved keypoints by 0.017 on an H100.
        self.allow_tf32 = self.autocast
        self.module = module.to(device).eval()
        self.device = torch.device(device)
        self._resident: dict[str, tuple[np.ndarray, object]] = {}
        # Per-frame stages replay a captured CUDA graph per input shape: one launch instead of hundreds.
        self.cuda_graphs = cuda_graphs and stage.rate == "frame" and self.device.type == "cuda"
        self._graphs: dict[tuple, tuple] = {}

    def _tensor(self, name: str, array: np.ndarray):
        import torch

        # Per-avatar inputs (batch 1, same array object every call) are uploaded once and kept on the device.
        cached = self._resident.get(name)
        if cached is not None and cached[0] is array:
            return cached[1]
        contiguous = np.ascontiguousarray(array)
        if not contiguous.flags.writeable:      # e.g. the enhancer's fixed noise, broadcast: torch warns on these
            contiguous = contiguous.copy()
        tensor = torch.from_numpy(contiguous).to(self.device)
        if self.stage.input(name).shape[0] == 1 and self.device.type != "cpu":
            self._resident[name] = (array, tensor)
        return tensor

    def _run(self, tensors: dict):
        import torch

        cudnn = torch.backends.cudnn
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast), \
                cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                            allow_tf32=self.allow_tf32):
            outputs = self.module(**tensors)
        return outputs if isinstance(outputs, (tuple, list)) else (outputs,)

    def _replay(self, feeds: dict[str, np.ndarray]):
        import torch

        key = tuple((k, feeds[k].shape) for k in sorted(feeds))
        if key not in self._graphs:
            static = {k: self._tensor(k, v).clone() for k, v in feeds.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):          # warm-up outside the capture: cuDNN picks its kernels here
                    self._run(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self._run(static)
            self._graphs[key] = (graph, static, outputs, {})
        graph, static, outputs, fed = self._graphs[key]
        with torch.inference_mode():
            for name, array in feeds.items():
                if fed.get(name) is not array:      # per-avatar inputs are copied in once, per-batch ones every call
                    static[name].copy_(torch.from_numpy(np.ascontiguousarray(array)), non_blocking=False)
                    if self.stage.input(name).shape[0] == 1:
                        fed[name] = array
        graph.replay()
        return outputs

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.stage, feeds)
        if self.cuda_graphs:
            outputs = self._replay(feeds)
        else:
            outputs = self._run({k: self._tensor(k, v) for k, v in feeds.items()})
        return {t.name: o.float().cpu().numpy() if t.dtype == "float32" else o.cpu().numpy()
                for t, o in zip(self.stage.outputs, outputs)}


class TorchBackend(SerialBackend):
    name = "torch"

    def __init__(self, weights, size: int = 256, device: str = "cpu", precision: str = "fp32",
                 cuda_graphs: bool = False):
        if precision == "fp16" and device == "cpu":
            from ...errors import UsageError

            raise UsageError("--precision fp16 with the torch backend needs --device cuda.")
        self.precision = precision
        self.cuda_graphs = cuda_graphs
        self.notes: list[str] = []
        self.weights = weights
        self.size = size
        self.device = device
        self._runners: dict[str, TorchRunner] = {}
        self._subnetworks: dict[str, object] = {}

    def subnetwork(self, name: str):
        if name not in self._subnetworks:
            self._subnetworks[name] = self.weights.build(name)
        return self._subnetworks[name]

    def runner(self, stage: str) -> TorchRunner:
        if stage not in self._runners:
            from ...models.stage_modules import stage_module

            module = stage_module(stage, self.subnetwork)
            self._runners[stage] = TorchRunner(STAGES[stage], module, self.device, self.precision,
                                               self.cuda_graphs)
        return self._runners[stage]

    def describe(self) -> dict:
        import torch

        return {"backend": "torch", "device": self.device, "torch": torch.__version__,
                "weights": self.weights.identity(), "precision": self.precision,
                "cuda_graphs": self.cuda_graphs}
