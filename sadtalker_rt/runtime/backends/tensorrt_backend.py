"""TensorRT engines built by ``sadtalker-rt build``, run through CUDA streams. Never imports torch.

Each engine's record in ``engines.json`` is checked against this GPU and TensorRT before anything is
deserialized, and an engine that may not run here is refused with one sentence. Inputs and outputs are
bound by name. Device buffers are allocated once per (tensor, shape, slot); per-avatar inputs (static
shapes, fed as the same array object again) stay on the device. With ``cuda_graphs=True`` a runner
captures each fixed binding once and replays it. Written to the TensorRT 10.x and 11.x Python API
(name-based tensors, ``execute_async_v3``); the two do not differ in what is used here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..cuda import Cuda, DeviceTensor, import_tensorrt, platform_fields
from ..engine_plan import check_engine, engine_action, load_engines_record, refusal, shape_problem
from ...errors import UsageError, WeightsError
from ...stages import STAGES, Stage
from . import check_feeds

_WARMED = "warmed"      # a binding that ran once uncaptured: TensorRT finishes lazy set-up on a first run


@dataclass(frozen=True)
class TensorIO:
    name: str
    is_input: bool
    dtype: np.dtype


def engine_io(trt, engine) -> list[TensorIO]:
    """The engine's inputs and outputs, by name."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    return [TensorIO(n, engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT,
                     np.dtype(trt.nptype(engine.get_tensor_dtype(n)))) for n in names]


class TensorRTRunner:
    """One engine with one execution context. ``enqueue`` issues work on a stream and returns device
    tensors; ``infer`` is the synchronous Runner interface (numpy in, numpy out)."""

    def __init__(self, stage: Stage, engine, io: list[TensorIO], cuda: Cuda, record: dict | None = None,
                 cuda_graphs: bool = False):
        self.stage = stage
        self.inputs = [t for t in io if t.is_input]
        self.outputs = [t for t in io if not t.is_input]
        for kind, engine_side, table_side in (("inputs", self.inputs, stage.inputs),
                                               ("outputs", self.outputs, stage.outputs)):
            if {t.name for t in engine_side} != {t.name for t in table_side}:
                raise WeightsError(f"the {stage.name} engine has {kind} {sorted(t.name for t in engine_side)}, "
                                   f"but the stage table names {sorted(t.name for t in table_side)}.")
        self.cuda = cuda
        self.record = record or {}
        self.cuda_graphs = cuda_graphs
        self.context = engine.create_execution_context()
        self.stream = cuda.stream()
        self._buffers: dict[tuple, object] = {}           # (name, shape, slot) -> device buffer
        self._resident: dict[str, tuple[np.ndarray, DeviceTensor]] = {}
        self._host: dict[tuple, np.ndarray] = {}          # (name, shape) -> pinned array, for infer()
        self._graphs: dict[tuple, object] = {}          # binding -> _WARMED, a graph, or why capture failed
        self.capture_error: str | None = None

    def _buffer(self, name: str, shape: tuple, dtype: np.dtype, slot) -> DeviceTensor:
        key = (name, tuple(shape), slot)
        if key not in self._buffers:
            self._buffers[key] = self.cuda.malloc(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        return DeviceTensor(self._buffers[key].ptr, tuple(shape), dtype)

    def _device_input(self, io: TensorIO, value, stream, slot: int) -> DeviceTensor:
        if isinstance(value, DeviceTensor):
            if np.dtype(value.dtype) != io.dtype:
                raise WeightsError(f"{self.stage.name}.{io.name} is {io.dtype} in its engine, but the tensor fed "
                                   f"is {np.dtype(value.dtype)}.")
            return value
        static = not self.stage.input(io.name).dynamic_axes()
        cached = self._resident.get(io.name)
        if static and cached is not None and cached[0] is value:
            return cached[1]
        array = np.ascontiguousarray(value, dtype=io.dtype)
        tensor = self._buffer(io.name, array.shape, io.dtype, "resident" if static else slot)
        self.cuda.upload(tensor.ptr, array, stream)
        if static:      # treated as immutable from here on, as the avatar's features are
            self._resident[io.name] = (value, tensor)
        return tensor

    def enqueue(self, feeds: dict, stream, slot: int = 0) -> dict[str, DeviceTensor]:
        """Bind every input and output by name and issue the engine on ``stream``. Output tensors live in
        slot ``slot`` until the next enqueue with the same slot and shapes."""
        check_feeds(self.stage, feeds)
        bound = []
        for io in self.inputs:
            tensor = self._device_input(io, feeds[io.name], stream, slot)
            problem = shape_problem(self.stage.name, self.record, io.name, tensor.shape)
            if problem:
                raise UsageError(problem)
            if not self.context.set_input_shape(io.name, tensor.shape):
                raise UsageError(f"the {self.stage.name} engine refused shape {tensor.shape} for {io.name}.")
            self.context.set_tensor_address(io.name, tensor.ptr)
            bound.append((io.name, tensor.ptr, tensor.shape))
        outputs = {}
        for io in self.outputs:
            tensor = self._buffer(io.name, tuple(self.context.get_tensor_shape(io.name)), io.dtype, slot)
            self.context.set_tensor_address(io.name, tensor.ptr)
            bound.append((io.name, tensor.ptr, tensor.shape))
            outputs[io.name] = tensor
        self._execute(stream, tuple(bound))
        return outputs

    def _run(self, stream) -> None:
        if not self.context.execute_async_v3(int(stream)):
            raise RuntimeError(f"TensorRT could not run the {self.stage.name} engine (see its log above).")

    def _execute(self, stream, binding: tuple) -> None:
        if not self.cuda_graphs:
            self._run(stream)
            return
        # A graph replays fixed addresses and shapes, so each binding gets its own graph; the uploads of
        # changing inputs (issued above, outside the graph) refill the same buffers before each replay.
        graph = self._graphs.get(binding)
        if graph is None:
            self._run(stream)
            self._graphs[binding] = _WARMED
            return
        if graph is _WARMED:
            graph = self._capture(stream)
            self._graphs[binding] = graph
        if isinstance(graph, str):
            self._run(stream)
        else:
            self.cuda.launch_graph(graph, stream)

    def _capture(self, stream):
        """A CUDA graph of one run, or the reason it could not be captured (then this binding runs plainly).
        While capturing nothing executes, so a failed capture leaves nothing half done; the capture is always
        ended and the CUDA error it left behind is cleared, or the next call would report it."""
        self.cuda.begin_capture(stream)
        launched = self.context.execute_async_v3(int(stream))
        try:
            graph = self.cuda.end_capture(stream)
        except RuntimeError as err:         # e.g. cudaErrorStreamCaptureInvalidated
            graph = None
            self.capture_error = str(err)
        if not launched:
            self.capture_error = f"TensorRT could not enqueue the {self.stage.name} engine while capturing"
            graph = None
        if graph is None:
            self.cuda.clear_error()
            return self.capture_error
        return graph

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.enqueue(feeds, self.stream)
        host = {}
        for name, tensor in outputs.items():
            key = (name, tensor.shape)
            if key not in self._host:
                self._host[key] = self.cuda.pinned(tensor.shape, tensor.dtype)
            self.cuda.download(self._host[key], tensor.ptr, self.stream)
            host[name] = self._host[key]
        self.cuda.synchronize_stream(self.stream)
        # Copies: the pinned buffers are refilled by the next call.
        return {name: array.astype(self.stage.output(name).dtype) for name, array in host.items()}


class CudaExecutor:
    """The ``FramePipeline`` executor for TensorRT runners: launches, events and copies on CUDA streams."""

    enhance_in_worker = False       # the renderer's next batch runs on its streams while the host enhances

    def __init__(self, runner: Callable[[str], TensorRTRunner], cuda: Cuda):
        self._runner = runner
        self.cuda = cuda

    def make_stream(self):
        return self.cuda.stream()

    def launch(self, stage: str, feeds: dict, stream, slot: int = 0) -> dict[str, DeviceTensor]:
        return self._runner(stage).enqueue(feeds, stream, slot)

    def record(self, stream):
        event = self.cuda.event()
        self.cuda.record(event, stream)
        return event

    def wait(self, stream, event) -> None:
        self.cuda.wait(stream, event)

    def synchronize(self, event) -> None:
        self.cuda.synchronize_event(event)

    def host_buffer(self, shape: tuple, dtype) -> np.ndarray:
        return self.cuda.pinned(shape, dtype)

    def copy_to_host(self, src: DeviceTensor, dst: np.ndarray, stream) -> None:
        if tuple(src.shape) != dst.shape or np.dtype(src.dtype) != dst.dtype:
            raise ValueError(f"cannot copy a {src.shape} {np.dtype(src.dtype)} tensor into a {dst.shape} {dst.dtype} "
                             f"buffer")
        self.cuda.download(dst, src.ptr, stream)


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, directory: Path, cuda_graphs: bool = False):
        """The render size is the engines' own, recorded in engines.json."""
        self.directory = Path(directory)
        self._trt = import_tensorrt()
        self.cuda = Cuda()
        self.platform = platform_fields(self._trt, self.cuda)
        self.record = load_engines_record(self.directory)
        self.size = int(self.record["size"])
        self.precision = self.record.get("precision")
        self.cuda_graphs = cuda_graphs
        for stage, entry in self.record["stages"].items():     # refuse early, before any engine is read
            reason = check_engine(entry, self.platform)
            if reason:
                raise WeightsError(refusal(stage, self.directory, reason))
        self._runtime = self._trt.Runtime(self._trt.Logger(self._trt.Logger.WARNING))
        self._runners: dict[str, TensorRTRunner] = {}
        self.notes = [f"TensorRT {self.platform['trt_version']} engines ({self.record.get('precision')}) on "
                      f"{self.platform['gpu_name']}"]

    @property
    def manifest(self) -> dict:
        """``engines.json``: an entry per stage under "stages", as a graph folder's manifest has (with the files a
        stage reads besides its engine, e.g. the enhancer's fixed noise)."""
        return self.record

    def runner(self, stage: str) -> TensorRTRunner:
        if stage not in self._runners:
            entry = self.record["stages"].get(stage)
            action, reason = engine_action(entry, self.platform, self.directory, building=False)
            if action == "refuse":
                raise WeightsError(refusal(stage, self.directory, reason))
            path = self.directory / entry["file"]
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise WeightsError(refusal(stage, self.directory, "TensorRT could not deserialize it"))
            self._runners[stage] = TensorRTRunner(STAGES[stage], engine, engine_io(self._trt, engine), self.cuda,
                                                  entry, self.cuda_graphs)
        return self._runners[stage]

    def executor(self) -> CudaExecutor:
        return CudaExecutor(self.runner, self.cuda)

    def describe(self) -> dict:
        return {"backend": "tensorrt", "tensorrt": self.platform["trt_version"], "gpu": self.platform["gpu_name"],
                "compute_capability": self.platform["compute_capability"], "precision": self.record.get("precision"),
                "max_batch": self.record.get("max_batch"), "cuda_graphs": self.cuda_graphs}
