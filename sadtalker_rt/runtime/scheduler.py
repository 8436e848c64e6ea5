"""The per-frame loop as work on three streams: mapping, rendering and device-to-host copies overlap.

For batches k = 0..n-1 the pipeline issues mapping(k+1) on the mapping stream before renderer(k) on the
render stream, and copies the frames of batch k into a ring of preallocated host buffers on the copy
stream once renderer(k) has finished. While the host turns batch k-1 into images, the GPU maps and
renders ahead. Outputs alternate between two slots per stage, and each launch waits for the events
that say the previous reader of its slot is done:

    mapping(k)  [mapping stream]  waits renderer(k-2)        (it read mapping slot k % 2)
    renderer(k) [render stream]   waits mapping(k), copy(k-2) (copy(k-2) read render slot k % 2)
    copy(k)     [copy stream]     waits renderer(k)
    host        frames of k       after copy(k) completes; host slot k % slots is rewritten at k + slots

The scheduler only sees an ``Executor``: ``SerialExecutor`` runs any backend's runners at once (events
are no-ops), ``sadtalker_rt.runtime.backends.tensorrt_backend.CudaExecutor`` issues the same calls to CUDA.
Pure Python and numpy.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

import numpy as np

from ..stages import STAGES

DEVICE_SLOTS = 2        # output slots per stage: batch k writes slot k % 2 while slot (k - 1) % 2 is read
PER_FRAME_MAPPING_INPUTS = ("angles",)   # besides the semantics windows: one row per frame, sliced per batch
T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    # Whether the pipeline enhances batch k in a worker thread while batch k + 1 renders (host backends), or
    # on the calling thread while the renderer's launches of k + 1 run on the device's streams.
    enhance_in_worker: bool

    def make_stream(self) -> object: ...

    def launch(self, stage: str, feeds: dict[str, object], stream: object, slot: int) -> dict[str, object]:
        """Issue one stage on ``stream``, writing its outputs to output slot ``slot``; return output handles.
        Feeds are numpy arrays or output handles of earlier launches."""

    def record(self, stream: object) -> object:
        """An event that completes when the work issued to ``stream`` so far has completed."""

    def wait(self, stream: object, event: object) -> None:
        """Work issued to ``stream`` from now on starts after ``event``; the host does not wait."""

    def synchronize(self, event: object) -> None:
        """The host waits for ``event``."""

    def host_buffer(self, shape: tuple, dtype) -> np.ndarray: ...

    def copy_to_host(self, src: object, dst: np.ndarray, stream: object) -> None: ...


class SerialExecutor:
    """Runs each launch at once through a backend's runners (torch, onnxruntime): nothing to overlap."""

    # Measured on 2 cores (benchmarks/results/cpu-enhancer-overlap.json): the worker thread made onnxruntime renders
    # with the enhancer 0.88x as fast (both sessions compete for the same cores), so host backends stay sequential;
    # ``TalkingHead.enhance_ahead = True`` turns it on where cores are to spare.
    enhance_in_worker = False

    def __init__(self, runner: Callable[[str], object]):
        self._runner = runner

    def make_stream(self) -> None:
        return None

    def launch(self, stage: str, feeds: dict, stream: None, slot: int = 0) -> dict[str, np.ndarray]:
        return self._runner(stage).infer(feeds)

    def record(self, stream: None) -> None:
        return None

    def wait(self, stream: None, event: None) -> None:
        return None

    def synchronize(self, event: None) -> None:
        return None

    def host_buffer(self, shape: tuple, dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    def copy_to_host(self, src: np.ndarray, dst: np.ndarray, stream: None) -> None:
        np.copyto(dst, src)


def _fixed_feeds(stage: str, features: dict[str, np.ndarray], *per_batch: str) -> dict[str, np.ndarray]:
    names = [t.name for t in STAGES[stage].inputs if t.name not in per_batch]
    missing = [n for n in names if n not in features]
    if missing:
        raise KeyError(f"stage {stage} needs the avatar features {missing}; got {sorted(features)}")
    return {n: features[n] for n in names}


class FramePipeline:
    """Mapping then renderer per batch of frames, overlapped through an ``Executor``.

    ``features`` holds the avatar's per-photo inputs (kp_canonical, kp_source, feature_3d, source_compressed);
    the same array objects are fed on every launch, so a GPU executor keeps them resident.
    """

    def __init__(self, executor: Executor, features: dict[str, np.ndarray], size: int, batch_size: int,
                 mapping: str = "mapping", host_slots: int = 2):
        if batch_size < 1 or host_slots < 2:
            raise ValueError(f"need batch_size >= 1 and host_slots >= 2, not {batch_size} and {host_slots}")
        self.executor = executor
        self.mapping = mapping
        self.batch_size = batch_size
        self.mapping_fixed = _fixed_feeds(mapping, features, "semantics", *PER_FRAME_MAPPING_INPUTS)
        self.renderer_fixed = _fixed_feeds("renderer", features, "kp_driving")
        frames = STAGES["renderer"].output("frames")
        self.host = [executor.host_buffer(frames.resolve(size, batch=batch_size), frames.dtype)
                     for _ in range(host_slots)]
        self.map_stream = executor.make_stream()
        self.render_stream = executor.make_stream()
        self.copy_stream = executor.make_stream()

    def render_batch(self, semantics: np.ndarray, per_frame: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Mapping and renderer of one batch at once, nothing overlapped (streaming, where the next batch's
        audio has not arrived yet): (n, 3, S, S) frames in a host buffer that the next call rewrites.
        ``per_frame``: the mapping's other inputs of these frames, as in ``frames``."""
        ex = self.executor
        feeds = {**self.mapping_fixed, **self._full_batch({"semantics": semantics, **(per_frame or {})})}
        kp = ex.launch(self.mapping, feeds, self.map_stream, 0)["kp"]
        ex.wait(self.render_stream, ex.record(self.map_stream))
        rendered = ex.launch("renderer", {**self.renderer_fixed, "kp_driving": kp}, self.render_stream, 0)["frames"]
        ex.wait(self.copy_stream, ex.record(self.render_stream))
        ex.copy_to_host(rendered, self.host[0], self.copy_stream)
        ex.synchronize(ex.record(self.copy_stream))
        return self.host[0][:len(semantics)]

    def _full_batch(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A short last batch padded with copies of its last frame, as the official lane layout pads it: every
        batch renders at the batch size (float32 kernels sum in another order at another batch size, and the
        renderer amplifies that to 1e-4 in the frames; a TensorRT profile or CUDA graph sees one shape)."""
        short = self.batch_size - len(rows["semantics"])
        if short <= 0:
            return rows
        return {name: np.concatenate([values, np.repeat(values[-1:], short, axis=0)]) for name, values in rows.items()}

    def frames(self, targets: np.ndarray, per_frame: dict[str, np.ndarray] | None = None
               ) -> Iterator[tuple[int, np.ndarray]]:
        """(index, (3, S, S) frame) in order, one per row of ``targets`` (the mapping's semantics windows).
        ``per_frame`` holds the mapping's other per-frame inputs (free view: ``angles``), one row per frame.

        A frame is a view into a host buffer that is rewritten ``host_slots`` batches later: convert or copy
        it before then.
        """
        ex, bs = self.executor, self.batch_size
        starts = list(range(0, len(targets), bs))
        mapped, map_done, render_done, copy_done = {}, {}, {}, {}

        def issue_mapping(k: int) -> None:
            if k >= DEVICE_SLOTS:
                ex.wait(self.map_stream, render_done[k - DEVICE_SLOTS])
            rows = slice(starts[k], starts[k] + bs)
            feeds = {**self.mapping_fixed, **self._full_batch(
                {"semantics": targets[rows], **{name: values[rows] for name, values in (per_frame or {}).items()}})}
            mapped[k] = ex.launch(self.mapping, feeds, self.map_stream, k % DEVICE_SLOTS)["kp"]
            map_done[k] = ex.record(self.map_stream)

        def deliver(k: int) -> Iterator[tuple[int, np.ndarray]]:
            ex.synchronize(copy_done[k])
            count = min(bs, len(targets) - starts[k])
            host = self.host[k % len(self.host)]
            for i in range(count):
                yield starts[k] + i, host[i]

        try:
            if starts:
                issue_mapping(0)
            for k in range(len(starts)):
                if k + 1 < len(starts):
                    issue_mapping(k + 1)        # the mapping stream runs ahead while renderer(k) runs
                ex.wait(self.render_stream, map_done.pop(k))
                if k >= DEVICE_SLOTS:
                    ex.wait(self.render_stream, copy_done[k - DEVICE_SLOTS])
                feeds = {**self.renderer_fixed, "kp_driving": mapped.pop(k)}
                rendered = ex.launch("renderer", feeds, self.render_stream, k % DEVICE_SLOTS)["frames"]
                render_done[k] = ex.record(self.render_stream)
                ex.wait(self.copy_stream, render_done[k])
                ex.copy_to_host(rendered, self.host[k % len(self.host)], self.copy_stream)
                copy_done[k] = ex.record(self.copy_stream)
                if k >= 1:
                    yield from deliver(k - 1)
                render_done.pop(k - DEVICE_SLOTS + 1, None)     # no later launch waits on these
                copy_done.pop(k - DEVICE_SLOTS, None)
            if starts:
                yield from deliver(len(starts) - 1)
            render_done.clear()                 # all of it is done: the last copy waited on the last render
            copy_done.clear()
        finally:
            # A consumer that stops early must not leave copies in flight into buffers that may be freed.
            for pending in (map_done, render_done, copy_done):
                if pending:
                    ex.synchronize(pending[max(pending)])


def one_batch_ahead(batches: Iterable[T], work: Callable[[T], R]) -> Iterator[R]:
    """``work(batch)`` for each batch, in order, in one worker thread while the calling thread produces the
    next batch: work(k) overlaps producing k + 1 (and consuming k - 1). At most one batch is in the worker.

    For host backends whose calls release the GIL (onnxruntime, torch, OpenCV). Errors come out where the
    sequential ``map(work, batches)`` would raise them: a failed producer after the result of the batch before
    it. When the consumer stops early or an error is raised, the worker finishes its batch and is joined before
    this generator exits, and ``batches`` is closed: no thread outlives the generator.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sadtalker-rt-ahead")
    produced = iter(batches)
    pending: Future | None = None
    try:
        while True:
            try:
                batch = next(produced)          # producing batch k here overlaps work(k - 1) in the worker
            except StopIteration:
                break
            except Exception:
                if pending is not None:
                    last, pending = pending.result(), None
                    yield last
                raise
            done = pending.result() if pending is not None else None
            first, pending = pending is None, pool.submit(work, batch)
            if not first:
                yield done
        if pending is not None:
            last, pending = pending.result(), None
            yield last
    finally:
        pool.shutdown(wait=True)                # a running work(k) ends before the generator does
        close = getattr(produced, "close", None)
        if close is not None:
            close()
