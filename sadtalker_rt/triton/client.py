"""A client of a repository made by ``triton-repo``: prepare an avatar once, then stream frames for any audio,
over gRPC streaming or HTTP ``generate_stream``.

    client = TritonClient("triton://127.0.0.1:8001")
    avatar = client.prepare_avatar("photo.png")
    for frame in client.stream(avatar, "speech.wav"):
        ...                          # frame.index, frame.image: (H, W, 3) uint8 RGB
    for frame in client.stream_chunks(avatar, microphone_chunks()):
        ...                          # audio in chunks as it arrives (gRPC): frames as soon as they are final
    client.write_video(avatar, "speech.wav", "out.mp4")

Over gRPC every stream is a Triton sequence on ``talking_head``: one request per chunk on one gRPC stream (the
whole audio is a sequence of one chunk). HTTP ``generate_stream`` carries no sequence id, so it takes the whole
audio, on ``talking_head_whole``. A stream is complete only when every frame of the audio has arrived and the
server said it was final; anything else (the server stopped, the connection broke, a frame late beyond
``timeout``) raises ``ServingError``, and ``write_video`` then leaves no file behind. Needs
``tritonclient[grpc,http]`` (the ``triton`` extra).
"""
from __future__ import annotations

import json
import queue
import secrets
import threading
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np

from ..errors import EnvironmentProblem, SadTalkerError, UsageError
from ..stages import FPS, SAMPLE_RATE
from .layout import AVATAR, OPTION_FIELDS, TALKING_HEAD, TALKING_HEAD_WHOLE

SCHEMES = {"triton": "grpc", "grpc": "grpc", "http": "http", "triton+http": "http"}


class ServingError(SadTalkerError):
    """The Triton server could not be reached, refused a request, or stopped during a stream."""

    exit_code = 8


@dataclass(frozen=True)
class AvatarRef:
    avatar_id: str
    width: int
    height: int

    @property
    def output_size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def notes(self) -> list[str]:
        return []


@dataclass
class StreamedFrame:
    index: int
    timestamp: float
    image: np.ndarray


def parse_url(url: str) -> tuple[str, str]:
    """``triton://HOST:PORT`` or ``grpc://`` (gRPC), ``http://`` or ``triton+http://`` (HTTP) -> (protocol, host:port)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "grpc", url
    if scheme not in SCHEMES or not rest:
        raise UsageError(f"a Triton endpoint looks like triton://HOST:PORT (gRPC) or http://HOST:PORT, not '{url}'.")
    return SCHEMES[scheme], rest.rstrip("/")


def _option_values(options) -> dict[str, np.ndarray]:
    if options is None:
        return {}
    options.validate()
    values = asdict(options)
    return {f.name: np.array([values[f.name]], f.dtype) for f in OPTION_FIELDS}


def _audio(audio) -> np.ndarray:
    from .. import media

    wav = media.load_audio(audio, SAMPLE_RATE) if not isinstance(audio, np.ndarray) else audio
    return np.ascontiguousarray(wav, np.float32).reshape(-1)


class TritonClient:
    def __init__(self, url: str, timeout: float = 600.0, protocol: Optional[str] = None):
        self.protocol, self.address = parse_url(url)
        self.protocol = protocol or self.protocol
        self.timeout = timeout          # the longest wait for one frame (and for an avatar)
        try:
            if self.protocol == "grpc":
                import tritonclient.grpc as module
            else:
                import tritonclient.http as module
        except ImportError:
            raise EnvironmentProblem("the Triton client needs tritonclient (pip install 'sadtalker-rt[triton]').") from None
        self._module = module

    def _client(self):
        if self.protocol == "grpc":
            return self._module.InferenceServerClient(self.address)
        return self._module.InferenceServerClient(self.address, network_timeout=self.timeout,
                                                  connection_timeout=self.timeout)

    def _inputs(self, values: dict[str, np.ndarray]) -> list:
        inputs = []
        for name, value in values.items():
            item = self._module.InferInput(name, list(value.shape), _triton_dtype(value.dtype))
            item.set_data_from_numpy(value)
            inputs.append(item)
        return inputs

    def ready(self) -> bool:
        try:
            return bool(self._client().is_server_ready())
        except Exception:
            return False

    def has_model(self, name: str) -> bool:
        try:
            return bool(self._client().is_model_ready(name))
        except Exception:
            return False

    def check_models(self) -> None:
        """ServingError unless the server answers and has the repository's glue models ready."""
        try:
            client = self._client()
            missing = [m for m in (AVATAR, TALKING_HEAD) if not client.is_model_ready(m, client_timeout=10)]
        except Exception as err:
            raise ServingError(f"the Triton server at {self.address} does not answer: {_message(err)}") from None
        if missing:
            raise ServingError(f"the Triton server at {self.address} has no ready {' or '.join(missing)} model; "
                               "serve a repository made by `sadtalker-rt triton-repo`.")

    def prepare_avatar(self, image: Union[str, Path, bytes], preprocess: str = "crop") -> AvatarRef:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        values = {"image": np.frombuffer(data, np.uint8), "preprocess": np.frombuffer(preprocess.encode(), np.uint8)}
        try:
            result = self._client().infer(AVATAR, self._inputs(values))
        except Exception as err:
            raise ServingError(f"preparing the avatar failed: {_message(err)}") from None
        avatar_id = bytes(result.as_numpy("avatar_id").astype(np.uint8)).decode()
        return AvatarRef(avatar_id, int(result.as_numpy("width")[0]), int(result.as_numpy("height")[0]))

    def stream(self, avatar: AvatarRef, audio, options=None) -> Iterator[StreamedFrame]:
        """Frames in order as the server finishes them; ServingError unless all of them arrive."""
        wav = _audio(audio)
        if self.protocol == "grpc":
            session = self.open_stream(avatar, options)
            try:
                session.send(wav, last=True)
                yield from session
            finally:
                session.close()
            return
        from ..runtime.audio_features import frame_count

        if options is not None and options.duration is not None:
            wav = wav[: int(round(options.duration * SAMPLE_RATE))]
        values = {"avatar_id": np.frombuffer(avatar.avatar_id.encode(), np.uint8), "audio": wav,
                  **_option_values(options)}
        yield from _in_order(self._http_stream(values, avatar), lambda: frame_count(len(wav)))

    def open_stream(self, avatar: AvatarRef, options=None) -> "ChunkStream":
        """A stream to feed audio chunks into (``send``, then ``end``) while reading its frames (iterate it);
        gRPC only. ``close`` it when done (``stream_chunks`` does all of this)."""
        if self.protocol != "grpc":
            raise UsageError("audio in chunks needs gRPC (triton://HOST:PORT): HTTP generate_stream carries no "
                             "sequence id.")
        return ChunkStream(self, avatar, options)

    def stream_chunks(self, avatar: AvatarRef, chunks: Iterable, options=None) -> Iterator[StreamedFrame]:
        """Frames of 16 kHz mono PCM ``chunks`` (bytes of int16, int16 or float arrays, any sizes) as soon as the
        server has them; each chunk is sent as it comes (from a thread), so a live source never waits for
        frames."""
        session = self.open_stream(avatar, options)

        def feed() -> None:
            try:
                for chunk in chunks:
                    session.send(chunk)
                    if session.ended:
                        break
                session.end()
            except BaseException as err:       # the reader hears it instead of waiting for frames
                session.fail(err)

        threading.Thread(target=feed, name="triton-chunks", daemon=True).start()
        try:
            yield from session
        finally:
            session.close()         # a sender still waiting on its source fails at its next send and ends

    def _http_stream(self, values: dict, avatar: AvatarRef) -> Iterator[tuple[int, np.ndarray]]:
        body = json.dumps({k: v.tolist() for k, v in values.items()}).encode()
        request = urllib.request.Request(f"http://{self.address}/v2/models/{TALKING_HEAD_WHOLE}/generate_stream",
                                         data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                for line in answer:
                    if not line.startswith(b"data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        raise ServingError(f"the stream failed: {event['error']}")
                    if "frame" in event:
                        image = np.asarray(event["frame"], np.uint8).reshape(avatar.height, avatar.width, 3)
                        yield int(np.asarray(event["index"]).reshape(-1)[0]), image
        except urllib.error.HTTPError as err:
            raise ServingError(f"the stream was refused: {_message(err.read().decode(errors='replace'))}") from None
        except ServingError:
            raise
        except Exception as err:
            raise ServingError(f"the stream failed: {_message(err)}") from None

    def write_video(self, avatar: AvatarRef, audio, output: Union[str, Path], options=None,
                    overwrite: bool = False) -> Path:
        """The mp4 (H.264 + AAC); written atomically, so a failed stream leaves nothing at ``output``."""
        from ..media import VideoWriter

        wav = _audio(audio)
        with VideoWriter(Path(output), avatar.width, avatar.height, audio=wav, fps=FPS, sample_rate=SAMPLE_RATE,
                         overwrite=overwrite) as writer:
            for frame in self.stream(avatar, wav, options):
                writer.write(frame.image)
        return Path(output)

    def batch_statistics(self, model: str) -> dict[int, int]:
        """{batch size: executions} as Triton counted them for ``model``."""
        stats = self._client().get_inference_statistics(model, as_json=True) if self.protocol == "grpc" else \
            self._client().get_inference_statistics(model)
        found: dict[int, int] = {}
        for entry in stats["model_stats"]:
            for batch in entry.get("batch_stats", []):
                found[int(batch["batch_size"])] = found.get(int(batch["batch_size"]), 0) + \
                    int(batch["compute_infer"]["count"])
        return found


def _in_order(frames, expected: Callable[[], int]) -> Iterator[StreamedFrame]:
    """Frames numbered from 0 without a gap, and as many as ``expected()`` tells once they have ended."""
    received = 0
    for index, image in frames:
        if index != received:
            raise ServingError(f"frame {index} arrived where frame {received} was expected.")
        received += 1
        yield StreamedFrame(index, index / FPS, image)
    if received != expected():
        raise ServingError(f"the stream ended after {received} of {expected()} frames.")


_FAILED = object()


class ChunkStream:
    """One utterance over one gRPC stream: every ``send`` is a request of one Triton sequence (the first names
    the avatar and options and starts it, the last ends it); iterating gives the frames as they arrive, in
    order, and ends when the server has answered the last chunk with every frame of the audio."""

    def __init__(self, client: "TritonClient", avatar: AvatarRef, options=None):
        self.client, self.timeout = client, client.timeout
        self.sequence_id = secrets.randbits(63) or 1
        self._first = {"avatar_id": np.frombuffer(avatar.avatar_id.encode(), np.uint8), **_option_values(options)}
        duration = None if options is None else options.duration
        self.limit = None if duration is None else int(round(duration * SAMPLE_RATE))
        self.samples = self.requests = self.answered = self.received = 0
        self.ended = False
        self._answers: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._grpc = client._client()
        try:
            self._grpc.start_stream(callback=lambda result, error: self._answers.put((result, error)))
        except Exception as err:
            raise ServingError(f"the stream could not start: {_message(err)}") from None

    def send(self, chunk, last: bool = False) -> None:
        """Sends a chunk at once (frames come back through iteration); ``last`` ends the utterance."""
        from ..runtime.streaming import pcm_to_float

        samples = np.ascontiguousarray(pcm_to_float(chunk), np.float32)
        with self._lock:
            if self.ended:
                raise UsageError("this stream has ended; open another.")
            if self.limit is not None:
                samples = samples[: max(0, self.limit - self.samples)]
                last = last or self.samples + len(samples) >= self.limit
            if not len(samples) and not last:
                return
            values = {**(self._first if self.requests == 0 else {}), "audio": samples}
            try:
                self._grpc.async_stream_infer(TALKING_HEAD, self.client._inputs(values), request_id=str(self.requests),
                                              sequence_id=self.sequence_id, sequence_start=self.requests == 0,
                                              sequence_end=last, enable_empty_final_response=True)
            except Exception as err:
                raise ServingError(f"the stream failed: {_message(err)}") from None
            self.samples += len(samples)
            self.requests += 1
            self.ended = last

    def end(self) -> None:
        """The utterance is complete (sends an empty last chunk unless the last one was sent already)."""
        if not self.ended:
            self.send(np.zeros(0, np.float32), last=True)

    def fail(self, err: BaseException) -> None:
        self._answers.put((_FAILED, err))

    def __iter__(self) -> Iterator[StreamedFrame]:
        from ..runtime.audio_features import frame_count

        for frame in _in_order(self._frames(), lambda: frame_count(self.samples)):
            self.received += 1
            yield frame

    def _frames(self) -> Iterator[tuple[int, np.ndarray]]:
        while not (self.ended and self.answered == self.requests):
            try:
                result, error = self._answers.get(timeout=self.timeout)
            except queue.Empty:
                raise ServingError(f"no frame from the server for {self.timeout:.0f} s.") from None
            if result is _FAILED:
                raise ServingError(f"the audio source failed: {_message(error)}") from error
            if error is not None:
                raise ServingError(f"the stream failed: {_message(error)}")
            response = result.get_response()
            if response.outputs:
                yield int(result.as_numpy("index")[0]), result.as_numpy("frame")
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                self.answered += 1

    def close(self) -> None:
        """Ends the gRPC stream (cancelling what the server has not answered) and wakes a waiting reader."""
        self.fail(ServingError("the stream was closed"))
        try:
            self._grpc.stop_stream(cancel_requests=True)
            self._grpc.close()
        except Exception:
            pass


def _triton_dtype(dtype) -> str:
    from .layout import TRITON_DTYPES

    return TRITON_DTYPES[np.dtype(dtype).name]


def _message(err) -> str:
    text = err.message() if hasattr(err, "message") and callable(err.message) else str(err)
    return " ".join(str(text).split())[:300]
