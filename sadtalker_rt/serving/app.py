"""The web application: avatars from uploaded photos, websocket streaming sessions, whole-file jobs, the page.

    POST /avatars             multipart ``photo`` (+ ``preprocess``) -> {"avatar": sha256, ...}, cached by content
    WS   /stream?avatar=ID&OPTIONS
                              binary messages: 16 kHz mono PCM, signed 16-bit little-endian, any sizes;
                              text "end" when the audio is complete. Replies: binary frames, a 12-byte header
                              (uint32 index, float64 timestamp in seconds, little-endian) then a JPEG; a text
                              {"type": "end", "frames": N} at the end, {"type": "error", "message": ...} on refusal
    POST /videos              multipart ``photo`` and ``audio`` (+ ``preprocess`` and OPTIONS as fields) -> video/mp4
    GET  /                    the page

OPTIONS (``Options``' names): seed, still, pose_style, expression_scale, enhancer (when the server has it),
enhancer_noise, enhancer_points, input_yaw, input_pitch, input_roll. A session takes one degree per angle
(fixed angles stream at once; a list moves the head over the whole video, whose length a stream only knows
at its end); a video job takes lists too ("0,30,-20"). Reference videos are not taken; unknown names are
refused.

A bearer token (``Authorization: Bearer T``, or ``?token=T`` where a browser cannot set headers) guards
everything but the page when one is configured. The frames come from an engine (``engines``): the runtime in
this process (sessions take turns per model call) or a Triton server (each session one gRPC stream, batched
there with every other stream). Each session's queues are bounded: a slow client only slows itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import json
import shutil
import struct
import tempfile
import threading
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Optional


from ..errors import SadTalkerError
from ..stages import SAMPLE_RATE
from .engines import as_engine
from .limits import ServeConfig, Slots

FRAME_HEADER = struct.Struct("<Id")
REQUEST_FIELDS = ("avatar", "token", "photo", "audio", "preprocess")
OPTION_FIELDS = ("seed", "still", "pose_style", "expression_scale", "enhancer", "enhancer_noise", "enhancer_points",
                 "input_yaw", "input_pitch", "input_roll")


def _parse_option(name: str, value: str):
    value = str(value).strip()
    if name in ("seed", "pose_style"):
        return int(value)
    if name == "expression_scale":
        return float(value)
    if name == "still":
        if value.lower() not in ("", "0", "1", "true", "false", "yes", "no"):
            raise ValueError(f"still is true or false, not '{value}'")
        return value.lower() in ("1", "true", "yes")
    if name == "enhancer":
        return value or None
    return value            # names and degrees, checked by Options.validate
POLICY_VIOLATION, TRY_AGAIN_LATER, TOO_BIG = 1008, 1013, 1009


class Refusal(Exception):
    def __init__(self, status: int, message: str, ws_code: int = POLICY_VIOLATION):
        super().__init__(message)
        self.status, self.message, self.ws_code = status, message, ws_code


class Service:
    """The engine, the avatar cache and the session slots shared by every request."""

    def __init__(self, head, config: ServeConfig):
        self.config = config
        self.engine = as_engine(head)
        self.slots = Slots(config.max_sessions)
        self.avatars: OrderedDict[str, object] = OrderedDict()
        self._avatar_lock = threading.Lock()
        self._preparing: dict[str, threading.Lock] = {}

    def check_token(self, headers, query) -> None:
        if self.config.token is None:
            return
        given = query.get("token") or ""
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            raise Refusal(401, "a bearer token is required (Authorization: Bearer TOKEN, or ?token=TOKEN).")
        if not hmac.compare_digest(given.encode(), self.config.token.encode()):
            raise Refusal(401, "the bearer token is wrong.")

    def avatar(self, photo: bytes, preprocess: str) -> tuple[str, object]:
        """The prepared avatar of ``photo`` (prepared once per content and mode)."""
        key = f"{hashlib.sha256(photo).hexdigest()}-{preprocess}"
        with self._avatar_lock:
            lock = self._preparing.setdefault(key, threading.Lock())
        try:
            with lock:                 # two uploads of one photo prepare it once
                with self._avatar_lock:
                    if key in self.avatars:
                        self.avatars.move_to_end(key)
                        return key, self.avatars[key]
                avatar = self.engine.prepare_avatar(photo, preprocess)
                with self._avatar_lock:
                    self.avatars[key] = avatar
                    while len(self.avatars) > self.config.max_avatars:
                        self.avatars.popitem(last=False)
                return key, avatar
        finally:
            with self._avatar_lock:
                self._preparing.pop(key, None)

    def find_avatar(self, key: str):
        with self._avatar_lock:
            if key not in self.avatars:
                raise Refusal(404, f"unknown avatar '{key}': upload the photo to /avatars first.")
            self.avatars.move_to_end(key)
            return self.avatars[key]

    def take_slot(self) -> None:
        if not self.slots.try_take():
            raise Refusal(503, f"the server is busy: {self.slots.limit} sessions are running, which is the limit; "
                               "try again later.", TRY_AGAIN_LATER)

    def options(self, fields, streaming: bool):
        """``Options`` from query parameters or form fields (other names are refused, besides those of the
        request itself)."""
        from ..runtime.pipeline import Options

        given = {k: v for k, v in fields.items() if k not in REQUEST_FIELDS and not isinstance(v, bytes)}
        unknown = sorted(set(given) - set(OPTION_FIELDS) - {"ref_eyeblink", "ref_pose"})
        if unknown:
            raise Refusal(400, f"unknown option {', '.join(map(repr, unknown))}; options: {', '.join(OPTION_FIELDS)}.")
        if "ref_eyeblink" in given or "ref_pose" in given:
            raise Refusal(400, "reference videos (ref_eyeblink, ref_pose) are not taken by the server; "
                               "use the command line or the Python API.")
        try:
            options = Options(batch_size=self.config.batch_size, **{k: _parse_option(k, v) for k, v in given.items()})
            options.validate()
            view = options.free_view()
        except (ValueError, SadTalkerError) as err:
            raise Refusal(400, f"bad option: {err}") from None
        if options.enhancer is not None and not self.engine.has_enhancer:
            raise Refusal(400, "this server was started without the enhancer (sadtalker-rt serve --enhancer gfpgan, "
                               "with the in-process engine).")
        if streaming and view.moving:
            raise Refusal(400, "a session takes one degree per angle (input_yaw, input_pitch, input_roll): a list "
                               "moves the head over the whole video, whose length a stream knows only at its end; "
                               "send the whole audio to /videos for that.")
        return options

    def encode(self, frame) -> bytes:
        from PIL import Image

        out = io.BytesIO()
        out.write(FRAME_HEADER.pack(frame.index, frame.timestamp))
        Image.fromarray(frame.image).save(out, "JPEG", quality=self.config.jpeg_quality)
        return out.getvalue()


async def read_limited(request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refusal(413, f"the upload is {int(declared)} bytes; the limit is {limit}.")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise Refusal(413, f"the upload is over the limit of {limit} bytes.")
    return bytes(body)


async def read_form(request, limit: int) -> dict:
    from starlette.requests import Request

    body = await read_limited(request, limit)
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=2, max_fields=8, max_part_size=limit)
    try:
        return {k: (await v.read() if hasattr(v, "read") else v) for k, v in form.items()}
    finally:
        await form.close()


def create_app(head, config: Optional[ServeConfig] = None):
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocketDisconnect

    service = Service(head, config or ServeConfig())
    cfg = service.config

    def refused(err: Refusal) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status)

    async def page(request):
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text("utf-8"))

    async def upload_avatar(request):
        try:
            service.check_token(request.headers, request.query_params)
            form = await read_form(request, cfg.max_upload_bytes)
            if not isinstance(form.get("photo"), bytes):
                raise Refusal(400, "send the photo as the multipart field 'photo'.")
            key, avatar = await asyncio.to_thread(service.avatar, form["photo"], str(form.get("preprocess", "crop")))
        except Refusal as err:
            return refused(err)
        except SadTalkerError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        width, height = avatar.output_size
        return JSONResponse({"avatar": key, "width": width, "height": height, "notes": avatar.notes})

    async def video(request):
        try:
            service.check_token(request.headers, request.query_params)
            form = await read_form(request, cfg.max_upload_bytes)
            if not isinstance(form.get("photo"), bytes) or not isinstance(form.get("audio"), bytes):
                raise Refusal(400, "send multipart fields 'photo' and 'audio'.")
            options = service.options(form, streaming=False)
            service.take_slot()
        except Refusal as err:
            return refused(err)
        tmp = Path(tempfile.mkdtemp(prefix="sadtalker-rt-"))
        try:
            out = await asyncio.to_thread(_render_job, service, form, options, tmp)
        except (Refusal, SadTalkerError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            return refused(err) if isinstance(err, Refusal) else JSONResponse({"error": str(err)}, status_code=400)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            service.slots.give_back()
        return FileResponse(out, media_type="video/mp4", filename="talk.mp4",
                            background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True))

    async def session(ws):
        await ws.accept()
        try:
            service.check_token(ws.headers, ws.query_params)
            avatar = service.find_avatar(ws.query_params.get("avatar", ""))
            options = service.options(ws.query_params, streaming=True)
            service.take_slot()
        except Refusal as err:
            await ws.send_text(json.dumps({"type": "error", "message": err.message}))
            await ws.close(err.ws_code, err.message[:120])
            return
        try:
            await _run_session(service, ws, avatar, options)
        except (WebSocketDisconnect, OSError, RuntimeError):
            pass            # the client went away (sending to a closed socket raises one of these)
        finally:
            service.slots.give_back()

    app = Starlette(routes=[Route("/", page), Route("/avatars", upload_avatar, methods=["POST"]),
                            Route("/videos", video, methods=["POST"]), WebSocketRoute("/stream", session)])
    app.state.service = service
    return app


def _render_job(service: Service, form: dict, options, tmp: Path) -> Path:
    from .. import media

    _, avatar = service.avatar(form["photo"], str(form.get("preprocess", "crop")))
    audio = tmp / "audio"
    audio.write_bytes(form["audio"])
    wav = media.load_audio(audio, SAMPLE_RATE)
    if len(wav) > service.config.max_audio_seconds * SAMPLE_RATE:
        raise Refusal(413, f"the audio is {len(wav) / SAMPLE_RATE:.1f} s; the limit is "
                           f"{service.config.max_audio_seconds:g} s.")
    return service.engine.write_video(avatar, wav, tmp / "talk.mp4", options)


async def _run_session(service: Service, ws, avatar, options) -> None:
    """Three tasks joined by bounded queues: receive PCM, render (the engine's stream of frames), send frames."""
    from starlette.websockets import WebSocketDisconnect

    cfg = service.config
    audio: asyncio.Queue = asyncio.Queue(cfg.audio_queue)
    frames: asyncio.Queue = asyncio.Queue(cfg.frame_queue)
    done = object()
    max_samples = int(cfg.max_audio_seconds * SAMPLE_RATE)

    async def receive():
        received = 0
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            if message.get("bytes") is not None:
                data = message["bytes"]
                if len(data) > cfg.max_message_bytes:
                    raise Refusal(413, f"a PCM message of {len(data)} bytes is over the limit of "
                                       f"{cfg.max_message_bytes}.", TOO_BIG)
                if len(data) % 2:
                    raise Refusal(400, "a PCM message must be whole 16-bit samples (an even number of bytes).")
                received += len(data) // 2
                if received > max_samples:
                    raise Refusal(413, f"the audio is over the limit of {cfg.max_audio_seconds:g} s.", TOO_BIG)
                await audio.put(data)           # full queue: we stop reading, the client's sends back up
            elif message.get("text", "").strip() in ("end", '{"type": "end"}', '{"type":"end"}'):
                await audio.put(None)
                return

    async def chunks():
        while (chunk := await audio.get()) is not None:
            yield chunk

    async def render():
        async with contextlib.aclosing(service.engine.stream(avatar, chunks(), options)) as stream:
            async for frame in stream:
                await frames.put(await asyncio.to_thread(service.encode, frame))   # full: slows this session only
        await frames.put(done)

    async def send():
        count = 0
        while (encoded := await frames.get()) is not done:
            await ws.send_bytes(encoded)
            count += 1
        await ws.send_text(json.dumps({"type": "end", "frames": count}))

    tasks = [asyncio.ensure_future(t()) for t in (receive, render, send)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()
        await tasks[2]
        await ws.close()
    except Refusal as err:
        await _close_with(ws, err.message, err.ws_code)
    except SadTalkerError as err:
        await _close_with(ws, str(err), POLICY_VIOLATION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _close_with(ws, message: str, code: int) -> None:
    try:
        await ws.send_text(json.dumps({"type": "error", "message": message}))
        await ws.close(code, message[:120])
    except Exception:       # the client is gone already
        pass
