"""Which backend runs, on what, from which artifacts: the options of ``run`` (and ``serve``) checked together,
so an option the chosen backend would ignore is refused instead of silently dropped.

torch         the reference modules from the weights; --precision fp16 and --cuda-graphs on cuda only.
onnxruntime   --graphs DIR, or graphs exported from the weights once and cached (``build.cache``).
tensorrt      --engines DIR, or engines built from cached graphs; runs on cuda.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import UsageError
from .stages import RENDER_SIZES

BACKENDS = ("torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16")
DEFAULT_SIZE = RENDER_SIZES[0]
# The CPU default is the fastest path that passed the reduced-precision gates (``bench.cpu_variants.gate``); none has
# yet (benchmarks/results/cpu-reduced-precision.md), so CPUs render in float32, the exact path.
CPU_DEFAULT_PRECISION = "fp32"
CPU_PATH_REASON = ("no reduced-precision CPU path passes the parity gates yet; see "
                   "benchmarks/results/cpu-reduced-precision.md")


def weight_source(checkpoints: Optional[Path], synthetic_weights: Optional[int], size: int, old_version: bool = False):
    from .models.checkpoints import WeightSource

    if (checkpoints is None) == (synthetic_weights is None):
        raise UsageError("give either --checkpoints DIR (official weights) or --synthetic-weights [SEED].")
    if checkpoints is not None and not checkpoints.is_dir():
        raise UsageError(f"--checkpoints {checkpoints} is not a directory.")
    if size not in RENDER_SIZES:
        raise UsageError(f"--size must be {' or '.join(map(str, RENDER_SIZES))}, not {size}.")
    return WeightSource(checkpoints, synthetic_weights, size=size, old_version=old_version)


@dataclass
class BackendChoice:
    backend: str = "torch"
    device: Optional[str] = None
    precision: Optional[str] = None
    cuda_graphs: bool = False
    graphs: Optional[Path] = None
    engines: Optional[Path] = None

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, not '{self.backend}'.")
        if self.device not in (None, "cpu", "cuda") and not (self.backend == "onnxruntime" and self.device == "tensorrt"):
            raise UsageError(f"--device must be cpu or cuda (or tensorrt with --backend onnxruntime), "
                             f"not '{self.device}'.")
        if self.precision not in (None, *PRECISIONS):
            raise UsageError(f"--precision must be fp32 or fp16, not '{self.precision}'.")
        on_cuda = self.device == "cuda"
        if self.backend == "torch":
            self._refuse(self.graphs, "--graphs", "--backend onnxruntime")
            self._refuse(self.engines, "--engines", "--backend tensorrt")
            if self.precision == "fp16" and not on_cuda:
                raise UsageError("--precision fp16 with --backend torch runs on cuda only (add --device cuda).")
            if self.cuda_graphs and not on_cuda:
                raise UsageError("--cuda-graphs with --backend torch needs --device cuda.")
        elif self.backend == "onnxruntime":
            self._refuse(self.cuda_graphs or None, "--cuda-graphs", "--backend torch or tensorrt")
            if self.engines is not None and self.graphs is None:   # the old spelling, kept for one release
                self.graphs, self.engines = self.engines, None
                self.notes_for_user.append("--engines for onnxruntime graph folders is deprecated; use --graphs.")
            self._refuse(self.engines, "--engines", "--backend tensorrt")
        else:
            self._refuse(self.graphs, "--graphs", "--backend onnxruntime")
            if self.device == "cpu":
                raise UsageError("--backend tensorrt runs on cuda; leave out --device cpu.")

    def __post_init__(self) -> None:
        self.notes_for_user: list[str] = []

    def cpu_path(self, precision: str) -> str:
        """The line ``run`` prints on a CPU: which path renders, and why that one."""
        line = f"rendering on cpu with {self.backend} in {precision}"
        if self.precision is None and precision != CPU_DEFAULT_PRECISION:
            return f"{line} (as the graphs in {self.graphs} were made)."
        if self.precision is None:
            return f"{line}, the default: {CPU_PATH_REASON}."
        return f"{line} (--precision {self.precision})."

    def _say_cpu_path(self, device: str, precision: str) -> None:
        if device == "cpu":
            self.notes_for_user.append(self.cpu_path(precision))

    @staticmethod
    def _refuse(value, option: str, where: str) -> None:
        if value is not None:
            raise UsageError(f"{option} is for {where}; the chosen backend would ignore it.")

    def open(self, talking_head, checkpoints, synthetic_seed, size, old_version, progress=None):
        """A ``TalkingHead`` (the class is passed in) on this backend, making cached artifacts when needed."""
        device = self.device or ("cuda" if self.backend == "tensorrt" else "cpu")
        precision = self.precision or (CPU_DEFAULT_PRECISION if device == "cpu" else "fp32")
        folder = self.graphs if self.backend == "onnxruntime" else self.engines
        if self.backend == "torch" or folder is None:
            weights = weight_source(checkpoints, synthetic_seed, size or DEFAULT_SIZE, old_version)
            if weights.synthetic:
                self.notes_for_user.append(f"{weights.describe()}.")
            if self.backend == "torch":
                head = talking_head.from_weights(weights, size=size or DEFAULT_SIZE, device=device,
                                                 precision=precision, cuda_graphs=self.cuda_graphs)
                self._say_cpu_path(device, precision)
                head.backend.notes[:0] = self.notes_for_user
                return head
            folder = self._cached_artifacts(weights, size or DEFAULT_SIZE, precision, progress)
        elif checkpoints is not None or synthetic_seed is not None:
            raise UsageError(f"--backend {self.backend} with {folder} reads its weights from there; leave out "
                             "--checkpoints and --synthetic-weights.")
        head = talking_head.from_engines(folder, backend=self.backend, device=device, cuda_graphs=self.cuda_graphs)
        recorded = head.backend.precision
        if self.precision is not None and recorded is not None and self.precision != recorded:
            raise UsageError(f"--precision {self.precision} does not match {folder} ({recorded}).")
        if size is not None and size != head.size:
            raise UsageError(f"--size {size} does not match {folder} (size {head.size}).")
        self._say_cpu_path(device, recorded or precision)
        head.backend.notes[:0] = self.notes_for_user
        return head

    def open_enhancer(self, head, enhancer_weights, progress=None) -> None:
        """Give ``head`` its face enhancer on the same backend as its renderer: the torch modules, or the
        enhancer's graphs run by onnxruntime or their engines run by TensorRT, from the ``--graphs``/``--engines``
        folder when it holds them, else exported (and built) once and cached. ``enhancer_weights`` may be None only
        with a folder that holds the enhancer."""
        from .runtime.enhancer import enhancer_on_graphs

        device = self.device or ("cuda" if self.backend == "tensorrt" else "cpu")
        if self.backend == "torch":
            head.enable_enhancer(enhancer_weights, device=device)
            return
        folder = self.graphs if self.backend == "onnxruntime" else self.engines
        if folder is not None and "enhancer" in head.backend.manifest.get("stages", {}):
            if enhancer_weights is not None:
                raise UsageError(f"{folder} holds the enhancer's {'graphs' if self.backend == 'onnxruntime' else 'engines'}"
                                 "; leave out --enhancer-weights.")
            head.enhancer = enhancer_on_graphs(head.backend)
            return
        if enhancer_weights is None:
            raise UsageError(f"{folder} has no enhancer {'graphs' if self.backend == 'onnxruntime' else 'engines'}: "
                             "give --enhancer-weights, or export the folder with --enhancer gfpgan.")
        from .build import cache
        from .runtime.backends import open_backend

        graphs = cache.enhancer_graphs_for(enhancer_weights, head.backend.precision or "fp32", progress)
        if self.backend == "onnxruntime":
            head.enhancer = enhancer_on_graphs(open_backend("onnxruntime", engines=graphs, device=device))
            return
        engines = cache.engines_for(graphs, progress)        # the enhancer's fixed noise is carried into the folder
        head.enhancer = enhancer_on_graphs(open_backend("tensorrt", engines=engines, cuda_graphs=self.cuda_graphs))

    def _cached_artifacts(self, weights, size: int, precision: str, progress) -> Path:
        from .build import cache

        if self.backend == "onnxruntime":
            return cache.graphs_for(weights, size, precision, "native", progress)
        from .runtime.cuda import import_tensorrt
        from .runtime.engine_plan import grid_sample_choice

        trt = import_tensorrt()          # refuses with the install hint before any export runs
        graphs = cache.graphs_for(weights, size, precision, grid_sample_choice(trt.__version__), progress)
        return cache.engines_for(graphs, progress)
