"""What the machine is and does during a run: peak memory per call, GPU memory, load, versions, hardware.

No host names or local paths are recorded.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np

MIB = 1024.0 * 1024.0



class MemoryProbe:
    """Peak resident memory of this process around a call.

    On Linux the kernel's high-water mark (VmHWM, the same counter as ``getrusage().ru_maxrss``) is reset
    before each call through /proc/self/clear_refs, so the peak after the call is the call's own. Elsewhere
    ``ru_maxrss`` only ever grows, so a call shows only what it adds above the earlier peak (a lower bound).
    """

    def __init__(self):
        self.reset_works = self._reset()
        self.method = ("VmHWM of /proc/self/status, reset before each call via /proc/self/clear_refs "
                       "(= getrusage ru_maxrss)" if self.reset_works else
                       "getrusage ru_maxrss growth during the call (a lower bound: the counter never resets here)")

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> float | None:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(key + ":"):
                        return float(line.split()[1]) * 1024.0
        except OSError:
            return None
        return None

    @staticmethod
    def _maxrss() -> float:
        import resource

        value = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return value if sys.platform == "darwin" else value * 1024.0      # bytes on macOS, KiB elsewhere

    def start(self) -> tuple[float, float]:
        """(resident bytes now, high-water mark now); resets the mark where possible."""
        if self.reset_works:
            self._reset()
        rss = self._status("VmRSS")
        return (rss if rss is not None else self._maxrss()), self._maxrss()

    def peak(self, started: tuple[float, float]) -> tuple[float, float]:
        """(peak resident bytes during the call, bytes above the resident size at its start)."""
        rss, mark = started
        peak = self._maxrss()
        if not self.reset_works and peak <= mark:
            return peak, 0.0
        return peak, max(0.0, peak - rss)


class GpuProbe:
    """GPU memory of a stage, through torch; inactive on CPU.

    Torch backends: the caching allocator's peak (``max_memory_allocated``) since the stage's first call, read
    after every call and kept as a running maximum, so that the memory a stage's first call sets aside and keeps
    (cuDNN workspaces, a CUDA graph's private pool, captured during that call) counts in every later row. Other
    backends: the device memory in use after the call (cudaMemGetInfo: total - free), which includes whatever the
    runtime holds.
    """

    def __init__(self, device: str, runtime: str):
        self.active = device == "cuda"
        self.allocator = runtime == "torch"
        self.method = None
        self._stage_peak: dict[str, float] = {}
        if self.active:
            self.method = ("largest torch.cuda.max_memory_allocated since the stage's first call (its CUDA graph "
                           "pool included)" if self.allocator else
                           "device memory in use after the call (torch.cuda.mem_get_info: total - free)")

    def start(self) -> None:
        if self.active:
            import torch

            torch.cuda.synchronize()
            if self.allocator:
                torch.cuda.reset_peak_memory_stats()

    def stop(self, stage: str = "") -> float | None:
        if not self.active:
            return None
        import torch

        torch.cuda.synchronize()
        if self.allocator:
            peak = max(self._stage_peak.get(stage, 0.0), torch.cuda.max_memory_allocated() / MIB)
            self._stage_peak[stage] = peak
            return peak
        free, total = torch.cuda.mem_get_info()
        return (total - free) / MIB


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None


def ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def tensorrt_version() -> tuple[str | None, str | None]:
    try:
        import tensorrt
    except ImportError:
        return None, "not installed"
    except OSError as err:
        return None, f"its libraries did not load: {str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__}"
    return tensorrt.__version__, None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(float(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        return None
    return None


def _gpu(device: str) -> dict | None:
    if device != "cuda":
        return None
    import torch

    props = torch.cuda.get_device_properties(0)
    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0] or None
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}", "driver": driver,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "memory_gib": round(props.total_memory / 1024**3, 1)}


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def usable_cores() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class LoadMonitor:
    """The system's load averages at the start, after every timing round and at the end of a run: a 1-minute load
    above the usable cores means other work shared the CPU while this run was measured."""

    def __init__(self):
        self.start = load_average()
        self.rounds: list[list[float] | None] = []

    def mark_round(self) -> None:
        self.rounds.append(load_average())

    def as_dict(self) -> dict:
        return {"cpu_count": os.cpu_count(), "usable_cores": usable_cores(), "load_average_start": self.start,
                "load_average_rounds": self.rounds, "load_average_end": load_average(),
                "method": "os.getloadavg (1, 5 and 15-minute load averages of the whole machine)"}


def environment(device: str) -> dict:
    """What the numbers were measured on; no host names or paths (the load is in ``LoadMonitor``)."""
    torch_threads = None
    if "torch" in sys.modules:
        torch_threads = sys.modules["torch"].get_num_threads()
    usable = usable_cores()
    trt, trt_problem = tensorrt_version()
    return {
        "python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
        "numpy": np.__version__, "torch": _version("torch"), "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"), "onnxruntime_providers": ort_providers(),
        "tensorrt": trt, "tensorrt_problem": trt_problem,
        "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable,
                "torch_threads": torch_threads, "memory_gib": _memory_gib()},
        "gpu": _gpu(device),
    }
