"""The GPU libraries: importing TensorRT and cuda-python, and the few CUDA runtime calls the engines need.

``Cuda`` wraps cuda-python's runtime API (``cuda.bindings.runtime``; ``cuda.cudart`` in older releases):
device buffers, pinned host arrays, streams, events, asynchronous copies and CUDA graphs. Every call
checks its error code. Tests substitute an object with the same methods, so the code that uses it runs
on a CPU; this module itself needs a GPU.
"""
from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass

import numpy as np

from ..errors import EnvironmentProblem

INSTALL_HINT = "pip install 'sadtalker-rt[tensorrt]' on a machine with an NVIDIA GPU"


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise EnvironmentProblem(f"TensorRT is not installed; {INSTALL_HINT}.") from None
    except OSError as err:      # the wheel is there but its shared libraries did not load
        raise EnvironmentProblem(f"TensorRT could not load its libraries ({err}); {INSTALL_HINT}.") from None
    return tensorrt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart      # cuda-python before 12.6
        except ImportError:
            raise EnvironmentProblem(f"cuda-python is not installed; {INSTALL_HINT}.") from None
    return cudart


@dataclass(frozen=True)
class DeviceTensor:
    """A tensor in device memory; ``ptr`` is its address. The memory belongs to whoever made it."""

    ptr: int
    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class DeviceBuffer:
    """cudaMalloc'd memory, freed when the object is collected."""

    def __init__(self, cuda: "Cuda", nbytes: int):
        self.nbytes = nbytes
        self.ptr = int(cuda.call(cuda.rt.cudaMalloc, max(nbytes, 1)))
        weakref.finalize(self, cuda.rt.cudaFree, self.ptr)


class Handle:
    """A stream, event or graph with its destroy call attached; ``int(handle)`` is the raw CUDA handle."""

    def __init__(self, raw, destroy):
        self.raw = raw
        weakref.finalize(self, destroy, raw)

    def __int__(self) -> int:
        return int(self.raw)


class Cuda:
    """The CUDA runtime calls used by engines and the frame pipeline, on one device."""

    def __init__(self, device: int = 0, cudart=None):
        self.rt = cudart if cudart is not None else import_cudart()
        err, count = self.rt.cudaGetDeviceCount()
        if err != self.rt.cudaError_t.cudaSuccess or count == 0:
            reason = self.error_name(err) if err != self.rt.cudaError_t.cudaSuccess else "no devices"
            raise EnvironmentProblem(f"No NVIDIA GPU is visible to CUDA ({reason}); TensorRT engines are built "
                                     f"and run on the GPU they are for.")
        self.device = device
        self.call(self.rt.cudaSetDevice, device)

    def error_name(self, err) -> str:
        name = self.rt.cudaGetErrorName(err)[1]
        return name.decode() if isinstance(name, bytes) else str(name)

    def call(self, function, *args):
        """Run a cuda-python call, raise on its error code, return its value(s) without the code."""
        result = function(*args)
        err, values = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA {function.__name__} failed: {self.error_name(err)}")
        return values[0] if len(values) == 1 else (values or None)

    def properties(self) -> tuple[str, str]:
        """(GPU name, compute capability "major.minor")."""
        props = self.call(self.rt.cudaGetDeviceProperties, self.device)
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"

    # -- memory ---------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> DeviceBuffer:
        return DeviceBuffer(self, nbytes)

    def pinned(self, shape: tuple, dtype) -> np.ndarray:
        """A page-locked host array (cudaHostAlloc): copies to and from it are truly asynchronous."""
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, 1)
        ptr = int(self.call(self.rt.cudaHostAlloc, nbytes, self.rt.cudaHostAllocDefault))
        owner = (ctypes.c_byte * nbytes).from_address(ptr)
        weakref.finalize(owner, self.rt.cudaFreeHost, ptr)
        # The array's base keeps ``owner`` alive, and with it the allocation.
        return np.frombuffer(owner, dtype=dtype, count=int(np.prod(shape, dtype=np.int64))).reshape(shape)

    def upload(self, dst_ptr: int, array: np.ndarray, stream: Handle) -> None:
        array = np.ascontiguousarray(array)
        self.call(self.rt.cudaMemcpyAsync, dst_ptr, array.ctypes.data, array.nbytes,
                  self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.raw)

    def download(self, array: np.ndarray, src_ptr: int, stream: Handle) -> None:
        if not array.flags.c_contiguous:
            raise ValueError("device-to-host copies need a contiguous host array")
        self.call(self.rt.cudaMemcpyAsync, array.ctypes.data, src_ptr, array.nbytes,
                  self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.raw)

    # -- streams, events, graphs ---------------------------------------------------------------
    def stream(self) -> Handle:
        raw = self.call(self.rt.cudaStreamCreateWithFlags, self.rt.cudaStreamNonBlocking)
        return Handle(raw, self.rt.cudaStreamDestroy)

    def event(self) -> Handle:
        raw = self.call(self.rt.cudaEventCreateWithFlags, self.rt.cudaEventDisableTiming)
        return Handle(raw, self.rt.cudaEventDestroy)

    def record(self, event: Handle, stream: Handle) -> None:
        self.call(self.rt.cudaEventRecord, event.raw, stream.raw)

    def wait(self, stream: Handle, event: Handle) -> None:
        """Work issued to ``stream`` after this call starts once ``event`` has completed; the host does not wait."""
        self.call(self.rt.cudaStreamWaitEvent, stream.raw, event.raw, 0)

    def synchronize_event(self, event: Handle) -> None:
        self.call(self.rt.cudaEventSynchronize, event.raw)

    def synchronize_stream(self, stream: Handle) -> None:
        self.call(self.rt.cudaStreamSynchronize, stream.raw)

    def begin_capture(self, stream: Handle) -> None:
        self.call(self.rt.cudaStreamBeginCapture, stream.raw,
                  self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)

    def end_capture(self, stream: Handle) -> Handle:
        """The captured work as an executable graph (cudaGraphInstantiate)."""
        graph = self.call(self.rt.cudaStreamEndCapture, stream.raw)
        try:
            executable = self.call(self.rt.cudaGraphInstantiate, graph, 0)
        finally:
            self.call(self.rt.cudaGraphDestroy, graph)
        return Handle(executable, self.rt.cudaGraphExecDestroy)

    def clear_error(self) -> None:
        """Reset the last CUDA error of this thread (cudaGetLastError), e.g. after a failed capture."""
        self.rt.cudaGetLastError()

    def launch_graph(self, graph: Handle, stream: Handle) -> None:
        self.call(self.rt.cudaGraphLaunch, graph.raw, stream.raw)


def platform_fields(trt, cuda: Cuda) -> dict:
    """The engine-key fields that describe this machine: TensorRT version, GPU name, compute capability."""
    name, capability = cuda.properties()
    return {"trt_version": trt.__version__, "gpu_name": name, "compute_capability": capability}
