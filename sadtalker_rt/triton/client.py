"""A client of a repository made by ``triton-repo``: prepare an avatar once, then stream frames for any audio,
over gRPC streaming or HTTP ``generate_stream``.

    client = TritonClient("triton://127.0.0.1:8001")
    avatar = client.prepare_avatar("photo.png")
    for frame in client.stream(avatar, "speech.wav"):
        ...                          # frame.index, frame.image: (H, W, 3) uint8 RGB
    client.write_video(avatar, "speech.wav", "out.mp4")

A stream is complete only when every frame of the audio has arrived and the server said it was final; anything
else (the server stopped, the connection broke, a frame late beyond ``timeout``) raises ``ServingError``, and
``write_video`` then leaves no file behind. Needs ``tritonclient[grpc,http]`` (the ``triton`` extra).
"""
from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from ..errors import EnvironmentProblem, SadTalkerError, UsageError
from ..stages import FPS, SAMPLE_RATE
from .layout import AVATAR, OPTION_FIELDS, TALKING_HEAD

SCHEMES = {"triton": "grpc", "grpc": "grpc", "http": "http", "triton+http": "http"}


class ServingError(SadTalkerError):
    """The Triton server could not be reached, refused a request, or stopped during a stream."""

    exit_code = 8


@dataclass(frozen=True)
class AvatarRef:
    avatar_id: str
    width: int
    height: int


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
        from ..runtime.audio_features import frame_count

        wav = _audio(audio)
        if options is not None and options.duration is not None:
            wav = wav[: int(round(options.duration * SAMPLE_RATE))]
        expected = frame_count(len(wav))
        values = {"avatar_id": np.frombuffer(avatar.avatar_id.encode(), np.uint8), "audio": wav,
                  **_option_values(options)}
        frames = self._grpc_stream(values) if self.protocol == "grpc" else self._http_stream(values, avatar)
        received = 0
        for index, image in frames:
            if index != received:
                raise ServingError(f"frame {index} arrived where frame {received} was expected.")
            received += 1
            yield StreamedFrame(index, index / FPS, image)
        if received != expected:
            raise ServingError(f"the stream ended after {received} of {expected} frames.")

    def _grpc_stream(self, values: dict) -> Iterator[tuple[int, np.ndarray]]:
        answers: queue.Queue = queue.Queue()
        client = self._client()
        try:
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            client.async_stream_infer(TALKING_HEAD, self._inputs(values), enable_empty_final_response=True)
            while True:
                try:
                    result, error = answers.get(timeout=self.timeout)
                except queue.Empty:
                    raise ServingError(f"no frame from the server for {self.timeout:.0f} s.") from None
                if error is not None:
                    raise ServingError(f"the stream failed: {_message(error)}")
                response = result.get_response()
                if response.outputs:
                    yield int(result.as_numpy("index")[0]), result.as_numpy("frame")
                if response.parameters.get("triton_final_response") and \
                        response.parameters["triton_final_response"].bool_param:
                    return
        except ServingError:
            raise
        except Exception as err:            # the server went away while starting or during the stream
            raise ServingError(f"the stream failed: {_message(err)}") from None
        finally:
            try:
                client.stop_stream(cancel_requests=True)
                client.close()
            except Exception:
                pass

    def _http_stream(self, values: dict, avatar: AvatarRef) -> Iterator[tuple[int, np.ndarray]]:
        body = json.dumps({k: v.tolist() for k, v in values.items()}).encode()
        request = urllib.request.Request(f"http://{self.address}/v2/models/{TALKING_HEAD}/generate_stream",
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


def _triton_dtype(dtype) -> str:
    from .layout import TRITON_DTYPES

    return TRITON_DTYPES[np.dtype(dtype).name]


def _message(err) -> str:
    text = err.message() if hasattr(err, "message") and callable(err.message) else str(err)
    return " ".join(str(text).split())[:300]
