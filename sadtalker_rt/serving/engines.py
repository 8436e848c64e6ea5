"""Where the serving app gets avatars and frames: the in-process runtime (``LocalEngine``) or a Triton Inference
Server running a repository made by ``triton-repo`` (``TritonEngine``), so the browser-facing server and the
model servers scale separately. The app calls only ``prepare_avatar``, ``stream`` and ``write_video``.
"""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from ..errors import UsageError
from .limits import FairTurns, TurnTakingBackend


class Engine:
    name = "engine"
    has_enhancer = False        # whether sessions and jobs may ask for the face enhancer

    def prepare_avatar(self, photo: bytes, preprocess: str):
        """An avatar (``output_size``, ``notes``) from an encoded photo."""
        raise NotImplementedError

    def stream(self, avatar, chunks, options):
        """An async iterator of ``Frame``s (index, timestamp, image) from an async iterator of 16 kHz PCM chunks,
        each frame as soon as it is final."""
        raise NotImplementedError

    def write_video(self, avatar, wav, output: Path, options) -> Path:
        raise NotImplementedError


class LocalEngine(Engine):
    """The runtime in this process; sessions take turns per model call."""

    name = "local"

    def __init__(self, head):
        from ..runtime.pipeline import TalkingHead

        self.turns = FairTurns()
        enhancer = head.enhancer
        if enhancer is not None:
            enhancer = enhancer.on_backend(TurnTakingBackend(enhancer.backend, self.turns))
        self.head = TalkingHead(TurnTakingBackend(head.backend, self.turns), head.size, enhancer=enhancer)
        self.has_enhancer = enhancer is not None

    def prepare_avatar(self, photo: bytes, preprocess: str):
        from .. import media

        with tempfile.TemporaryDirectory(prefix="sadtalker-rt-") as tmp:
            path = Path(tmp) / "photo"
            path.write_bytes(photo)
            image = media.load_image(path)
        return self.head.prepare_avatar(image, preprocess, name="the uploaded photo")

    def stream(self, avatar, chunks, options):
        return self.head.stream(avatar, chunks, options)

    def write_video(self, avatar, wav, output: Path, options) -> Path:
        return self.head.write_video(avatar, wav, output, options, audio_name="the uploaded audio")


class TritonEngine(Engine):
    """A Triton server: avatars through its ``avatar`` model, each session one gRPC stream of audio chunks to
    ``talking_head`` (a chunk is forwarded as soon as it arrives), video jobs as one-chunk streams."""

    name = "triton"

    def __init__(self, url: str, timeout: float = 600.0):
        from ..triton.client import TritonClient

        self.url = url
        self.client = TritonClient(url, timeout=timeout)
        if self.client.protocol != "grpc":
            raise UsageError(f"--engine takes the server's gRPC endpoint, triton://HOST:PORT, not '{url}'.")

    def check(self) -> "TritonEngine":
        """ServingError unless the server is up and serves the repository's glue models."""
        self.client.check_models()
        return self

    def prepare_avatar(self, photo: bytes, preprocess: str):
        return self.client.prepare_avatar(photo, preprocess)

    async def stream(self, avatar, chunks, options):
        session = await asyncio.to_thread(self.client.open_stream, avatar, options)

        async def forward() -> None:
            try:
                async for chunk in chunks:
                    session.send(chunk)          # queued on the gRPC stream: does not wait for the server
                    if session.ended:
                        break
                session.end()
            except BaseException as err:
                session.fail(err)
                raise

        sender = asyncio.ensure_future(forward())
        frames = iter(session)
        done = object()
        try:
            while (frame := await asyncio.to_thread(next, frames, done)) is not done:
                yield frame
            await sender
        finally:
            sender.cancel()
            await asyncio.to_thread(session.close)

    def write_video(self, avatar, wav, output: Path, options) -> Path:
        return self.client.write_video(avatar, wav, output, options)


def as_engine(head_or_engine) -> Engine:
    return head_or_engine if isinstance(head_or_engine, Engine) else LocalEngine(head_or_engine)


def engine_from(url: str) -> TritonEngine:
    """``--engine triton://HOST:PORT``: the server must answer and serve the models now."""
    if not url.startswith("triton://"):
        raise UsageError(f"--engine takes local or triton://HOST:PORT, not '{url}'.")
    return TritonEngine(url).check()
