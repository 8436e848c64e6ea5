"""The Python-backend models of a generated repository (``repository``); each ``model.py`` there imports one.

``StageModel`` runs one stage's graph with this package's onnxruntime runner; per-frame stages get the requests
Triton batched together and run them as one call. ``AvatarModel`` prepares an avatar from a photo and keeps it
in the avatar store (a folder shared by the glue models' processes), answering its id. ``TalkingHeadModel`` is
decoupled: it takes an avatar id and audio (in chunks, or whole) and sends each frame as soon as it is final,
running this package's pipeline with every stage called through BLS on the stage models (``BlsBackend``), so
Triton schedules and batches them across streams.

The stub's numpy bridge (``Tensor.as_numpy``, ``Tensor(name, array)``) predates numpy 2 and reads garbage under
it, so tensors cross through DLPack only (``_array``, ``_tensor``). Only imported inside Triton's Python stub.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import queue
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..stages import STAGES
from . import layout
from .layout import INTRA_OP_THREADS


def _pb():
    # Provided by the Triton Python backend inside its stub process, not by any distribution.
    return importlib.import_module("triton_python_backend_utils")


def _array(tensor) -> np.ndarray:
    return np.from_dlpack(tensor).copy()


def _tensor(name: str, array: np.ndarray):
    if not (array.flags.c_contiguous and array.flags.writeable):    # DLPack 0.x exports writable arrays only
        array = np.array(array, order="C", copy=True)
    return _pb().Tensor.from_dlpack(name, array.__dlpack__())


def _input(request, name: str):
    tensor = _pb().get_input_tensor_by_name(request, name)
    return None if tensor is None else _array(tensor)


def _text(array) -> str:
    return bytes(np.asarray(array, np.uint8)).decode()


def _parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _error(message: str):
    pb = _pb()
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message))


class StageModel:
    def initialize(self, args: dict) -> None:
        from ..runtime.backends.onnxruntime_backend import OnnxRuntimeRunner

        params = _parameters(args)
        self.stage = STAGES[params["stage"]]
        graph = Path(args["model_repository"]) / args["model_version"] / params["graph"]
        self.runner = OnnxRuntimeRunner(self.stage.name, graph, ["CPUExecutionProvider"], int(params["size"]),
                                        int(params.get(INTRA_OP_THREADS, "0")))
        self.batched = json.loads(args["model_config"]).get("max_batch_size", 0) > 0

    def execute(self, requests):
        names = [t.name for t in self.stage.inputs]
        if not self.batched:
            return [self._respond(lambda r=r: self.runner.infer({n: _input(r, n) for n in names})) for r in requests]
        feeds = [{n: _input(r, n) for n in names} for r in requests]
        rows = [len(f[names[0]]) for f in feeds]
        try:
            outputs = self.runner.infer({n: np.concatenate([f[n] for f in feeds]) for n in names})
        except Exception as err:                 # the whole batch failed: every request hears why
            return [_error(f"{self.stage.name}: {err}") for _ in requests]
        responses, start = [], 0
        for count in rows:
            part = {k: v[start:start + count] for k, v in outputs.items()}
            responses.append(_pb().InferenceResponse([_tensor(k, v) for k, v in part.items()]))
            start += count
        return responses

    def _respond(self, run):
        try:
            return _pb().InferenceResponse([_tensor(k, v) for k, v in run().items()])
        except Exception as err:
            return _error(f"{self.stage.name}: {err}")


class BlsRunner:
    """A stage run as a request to its Triton model; per-avatar inputs get a row per frame where it is batched."""

    def __init__(self, stage: str, batched: bool):
        self.stage = STAGES[stage]
        self.repeat = layout.batched_inputs(self.stage) if batched else ()
        self.outputs = [t.name for t in self.stage.outputs]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..runtime.backends import check_feeds

        check_feeds(self.stage, feeds)
        rows = max(len(v) for v in feeds.values())
        tensors = []
        for t in self.stage.inputs:
            value = np.asarray(feeds[t.name], t.dtype)
            if t.name in self.repeat and len(value) != rows:
                value = np.repeat(value, rows, axis=0)
            tensors.append(_tensor(t.name, value))
        pb = _pb()
        response = pb.InferenceRequest(model_name=self.stage.name, requested_output_names=self.outputs,
                                       inputs=tensors).exec()
        if response.has_error():
            raise RuntimeError(f"stage model {self.stage.name}: {response.error().message()}")
        return {n: _array(pb.get_output_tensor_by_name(response, n)) for n in self.outputs}


class BlsBackend:
    """A backend for ``TalkingHead`` whose stages are the repository's stage models."""

    name = "triton"
    precision = None

    def __init__(self, size: int, batched_stages: set[str], stages: list[str]):
        from ..runtime.scheduler import SerialExecutor

        self.size = size
        self.notes: list[str] = []
        self._runners = {name: BlsRunner(name, name in batched_stages) for name in stages}
        self._executor = SerialExecutor(self.runner)

    def runner(self, stage: str) -> BlsRunner:
        return self._runners[stage]

    def executor(self):
        return self._executor

    def describe(self) -> dict:
        return {"backend": "triton-bls", "size": self.size}


class AvatarStore:
    """Avatars by id in a folder: written once (atomically), read by any glue model process."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, object] = {}
        self._lock = threading.Lock()

    @staticmethod
    def identity(image: bytes, preprocess: str, size: int) -> str:
        return hashlib.sha256(b"%s|%d|" % (preprocess.encode(), size) + image).hexdigest()[:32]

    def path(self, avatar_id: str) -> Path:
        if not (len(avatar_id) == 32 and all(c in "0123456789abcdef" for c in avatar_id)):
            raise KeyError(f"'{avatar_id[:40]}' is not an avatar id")
        return self.folder / f"{avatar_id}.pkl"

    def has(self, avatar_id: str) -> bool:
        return avatar_id in self._memory or self.path(avatar_id).is_file()

    def put(self, avatar_id: str, avatar) -> None:
        handle, tmp = tempfile.mkstemp(prefix=f".{avatar_id}-", dir=self.folder)
        with os.fdopen(handle, "wb") as out:
            pickle.dump(avatar, out, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, self.path(avatar_id))
        with self._lock:
            self._memory[avatar_id] = avatar

    def get(self, avatar_id: str):
        with self._lock:
            if avatar_id in self._memory:
                return self._memory[avatar_id]
        path = self.path(avatar_id)
        if not path.is_file():
            raise KeyError(f"unknown avatar id {avatar_id}; prepare the avatar first (model '{layout.AVATAR}')")
        with open(path, "rb") as handle:     # written by this server's own avatar model
            avatar = pickle.load(handle)
        with self._lock:
            self._memory[avatar_id] = avatar
        return avatar


def _glue_setup(args: dict):
    from ..runtime.pipeline import TalkingHead

    params = _parameters(args)
    size = int(params["size"])
    batched = {s for s in params.get("batched_stages", "").split(",") if s}
    stages = [s for s in params.get("stages", ",".join(STAGES)).split(",") if s]
    return TalkingHead(BlsBackend(size, batched, stages), size), AvatarStore(params["avatar_store"])


class AvatarModel:
    def initialize(self, args: dict) -> None:
        self.head, self.store = _glue_setup(args)

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        try:
            data = _input(request, "image").tobytes()
            mode = _input(request, "preprocess")
            preprocess = _text(mode) if mode is not None and len(mode) else "crop"
            avatar_id = AvatarStore.identity(data, preprocess, self.head.size)
            if not self.store.has(avatar_id):
                self.store.put(avatar_id, self.head.prepare_avatar(_decode(data), preprocess, name="the photo"))
            width, height = self.store.get(avatar_id).output_size
        except Exception as err:
            return _error(str(err))
        return _pb().InferenceResponse([_tensor("avatar_id", np.frombuffer(avatar_id.encode(), np.uint8)),
                                        _tensor("width", np.array([width], np.int32)),
                                        _tensor("height", np.array([height], np.int32))])


def _decode(data: bytes) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB through the package's own loader."""
    from .. import media

    with tempfile.NamedTemporaryFile(suffix=".img") as tmp:
        tmp.write(data)
        tmp.flush()
        return media.load_image(tmp.name)


def options_from(request):
    """``runtime.pipeline.Options`` from a request's optional option inputs."""
    from ..runtime.pipeline import Options

    values = {}
    for field in layout.OPTION_FIELDS:
        value = _input(request, field.name)
        if value is not None and len(value):
            values[field.name] = value.reshape(-1)[0].item()
    if "still" in values:
        values["still"] = bool(values["still"])
    options = Options(**values)
    options.validate()
    return options


def frames_of(head, avatar, audio: np.ndarray, options):
    """The seam to the pipeline: frames of ``audio`` for ``avatar``, each yielded as soon as it is final."""
    return head.generate(avatar, audio, options)


class TalkingHeadModel:
    """Decoupled. ``talking_head_whole``: a thread per request streams the frames of its whole audio.
    ``talking_head`` (``chunked``): every stream is a Triton sequence of audio chunks; Triton keeps a sequence's
    chunks in order on one instance, and the model keeps its state (the runtime's ``FrameStream``) in a thread
    per sequence, answering each chunk with the frames that became final, then that chunk's final response.
    At most ``max_streams`` run at once; more are refused."""

    def initialize(self, args: dict) -> None:
        params = _parameters(args)
        self.head, self.store = _glue_setup(args)
        self.chunked = params.get("chunked") == "1"
        self.idle = float(params.get("stream_idle_s", "60"))
        self.slots = threading.BoundedSemaphore(int(params.get("max_streams", "64")))
        self.threads: set[threading.Thread] = set()
        self.sequences: dict[int, queue.Queue] = {}
        self.lock = threading.Lock()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            if self.chunked:
                self._chunk(request, sender)
            elif self._take_slot(sender):
                self._start(self._stream, request, sender)
        return None

    def _take_slot(self, sender) -> bool:
        if self.slots.acquire(blocking=False):
            return True
        sender.send(_error("the server is busy (too many streams); try again"),
                    flags=_pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return False

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.add(thread)
        thread.start()

    def _chunk(self, request, sender) -> None:
        sequence = int(_input(request, layout.SEQUENCE_ID).reshape(-1)[0])
        starts = bool(_input(request, layout.SEQUENCE_START).reshape(-1)[0])
        ends = bool(_input(request, layout.SEQUENCE_END).reshape(-1)[0])
        with self.lock:
            inbox = self.sequences.get(sequence)
            if starts and inbox is None and self._take_slot(sender):
                inbox = self.sequences[sequence] = queue.Queue()
                self._start(self._serve_sequence, sequence, inbox)
            elif starts and inbox is not None:
                inbox = None
                sender.send(_error(f"stream {sequence} is already running"),
                            flags=_pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            elif inbox is None and not starts:
                sender.send(_error(f"no running stream {sequence} (it ended, failed or was idle over "
                                   f"{self.idle:.0f} s); start a new one"),
                            flags=_pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            if inbox is not None:         # under the lock: a stream that stops drains its inbox under it too
                inbox.put((request, sender, ends))

    def _serve_sequence(self, sequence: int, inbox: queue.Queue) -> None:
        from ..runtime.streaming import FrameStream

        pb = _pb()
        session = None
        try:
            while True:
                try:
                    request, sender, ends = inbox.get(timeout=self.idle)
                except queue.Empty:          # the client went quiet: Triton has dropped the sequence too
                    return
                try:
                    if session is None:
                        avatar_id = _input(request, "avatar_id")
                        if avatar_id is None or not len(avatar_id):
                            raise ValueError("the first chunk of a stream must name the avatar (avatar_id)")
                        session = FrameStream(self.head, self.store.get(_text(avatar_id)), options_from(request))
                    audio = _input(request, "audio").astype(np.float32).reshape(-1)
                    sent = self._send(session.push(audio) if len(audio) else iter(()), request, sender)
                    if sent and ends:
                        sent = self._send(session.close(), request, sender)
                    sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    if not sent:             # cancelled: the stream is over
                        return
                except Exception as err:
                    sender.send(_error(str(err)), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    return
                if ends:
                    return
        finally:
            with self.lock:
                self.sequences.pop(sequence, None)
                while not inbox.empty():     # chunks that arrived behind a failure hear why
                    _, sender, _ = inbox.get()
                    sender.send(_error(f"stream {sequence} has stopped"),
                                flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self.slots.release()
            self.threads.discard(threading.current_thread())

    @staticmethod
    def _send(frames, request, sender) -> bool:
        """Sends each frame as it comes; False when the client cancelled."""
        pb = _pb()
        for frame in frames:
            if request.is_cancelled():
                return False
            sender.send(pb.InferenceResponse([_tensor("frame", frame.image),
                                              _tensor("index", np.array([frame.index], np.int32))]))
        return True

    def _stream(self, request, sender) -> None:
        pb = _pb()
        try:
            avatar = self.store.get(_text(_input(request, "avatar_id")))
            audio = _input(request, "audio").astype(np.float32).reshape(-1)
            self._send(frames_of(self.head, avatar, audio, options_from(request)), request, sender)
            sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as err:
            sender.send(_error(str(err)), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            self.slots.release()
            self.threads.discard(threading.current_thread())

    def finalize(self) -> None:
        for thread in list(self.threads):
            thread.join(timeout=5)
