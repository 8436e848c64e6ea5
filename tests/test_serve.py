"""sadtalker-rt serve on loopback: concurrent websocket sessions and video jobs equal the offline output; refusals;
nothing leaked afterwards."""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
httpx = pytest.importorskip("httpx")
from websockets.sync.client import connect  # noqa: E402

from conftest import CheapRendererBackend, cheap_face_enhancer  # noqa: E402
from sadtalker_rt import media  # noqa: E402
from sadtalker_rt.models.checkpoints import WeightSource  # noqa: E402
from sadtalker_rt.runtime.pipeline import Options, TalkingHead  # noqa: E402
from sadtalker_rt.serving.app import FRAME_HEADER  # noqa: E402
from sadtalker_rt.serving.limits import ServeConfig  # noqa: E402
from sadtalker_rt.serving.server import make_server  # noqa: E402

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module", params=["stand-in renderer", pytest.param("real renderer", marks=pytest.mark.heavy)])
def head(request) -> TalkingHead:
    """Every stage real; by default the renderer (seconds per frame on a CPU) is the deterministic stand-in."""
    real = TalkingHead.from_weights(WeightSource(synthetic_seed=0), size=256)
    return real if request.param == "real renderer" else TalkingHead(CheapRendererBackend(real.backend), real.size)


class Running:
    def __init__(self, head, config):
        self.server = make_server(head, "127.0.0.1", 0, config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test")
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.http, self.ws = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"
        self.service = self.server.config.app.state.service

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def wav_bytes(pcm: np.ndarray) -> bytes:
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, pcm, 16000, format="WAV", subtype="PCM_16")
    return out.getvalue()


def stream_session(ws_url: str, avatar: str, pcm: np.ndarray, seed: int, chunk: int, query: str = "") -> list[bytes]:
    frames = []
    with connect(f"{ws_url}/stream?avatar={avatar}&seed={seed}{query}", additional_headers=AUTH) as ws:
        for i in range(0, len(pcm), chunk):
            ws.send(pcm[i:i + chunk].tobytes())
        ws.send("end")
        while True:
            message = ws.recv(timeout=3600)     # every render of every session on 2 shared CPU cores
            if isinstance(message, str):
                reply = json.loads(message)
                assert reply == {"type": "end", "frames": len(frames)}, reply
                return frames
            frames.append(message)


def refusal(ws_url: str, query: str, headers=None, send: bytes = None) -> str:
    with connect(f"{ws_url}/stream?{query}", additional_headers=headers or {}) as ws:
        if send is not None:
            ws.send(send)
        reply = json.loads(ws.recv(timeout=60))
        assert reply["type"] == "error"
        return reply["message"]


def decoded_video(data: bytes) -> list[np.ndarray]:
    import av

    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_serve_sessions_jobs_refusals_and_no_leaks(head, assets_dir, tmp_path, monkeypatch):
    photo = (assets_dir / "happy.png").read_bytes()
    speech = media.load_audio(assets_dir / "bus_chinese.wav")
    pcm = np.clip(np.rint(speech[16000:16000 + 1000] * 32768), -32768, 32767).astype("<i2")     # one frame
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    threads, fds = threading.active_count(), open_fds()
    config = ServeConfig(token=TOKEN, max_sessions=6, max_upload_bytes=2 * 2**20, max_audio_seconds=2.0,
                         batch_size=1)
    server = Running(head, config)
    try:
        with httpx.Client(base_url=server.http, timeout=600) as client:
            assert "sadtalker-rt" in client.get("/").text
            # refusals: no token, wrong token, too large, unknown avatar
            assert client.post("/avatars", files={"photo": photo}).status_code == 401
            assert client.post("/avatars", files={"photo": photo}, headers={"Authorization": "Bearer no"}
                               ).status_code == 401
            big = client.post("/avatars", files={"photo": b"\0" * (3 * 2**20)}, headers=AUTH)
            assert big.status_code == 413 and "limit" in big.json()["error"]
            assert "token" in refusal(server.ws, "avatar=x")
            assert "unknown avatar" in refusal(server.ws, "avatar=x", AUTH)
            reply = client.post("/avatars", files={"photo": photo}, headers=AUTH)
            assert reply.status_code == 200, reply.text
            avatar_id = reply.json()["avatar"]
            assert client.post("/avatars", files={"photo": photo}, headers=AUTH).json()["avatar"] == avatar_id
            avatar = server.service.avatars[avatar_id]

            # 4 websocket sessions and 2 video jobs at once
            seeds = [0, 1, 0, 2]
            with ThreadPoolExecutor(6) as pool:
                sessions = [pool.submit(stream_session, server.ws, avatar_id, pcm, seed, chunk)
                            for seed, chunk in zip(seeds, (16, 320, 333, len(pcm)))]
                jobs = [pool.submit(client.post, "/videos", files={"photo": photo, "audio": wav_bytes(pcm)},
                                    data={"seed": str(seed)}, headers=AUTH) for seed in (0, 3)]
                streamed = [s.result() for s in sessions]
                videos = [j.result() for j in jobs]

            wav = pcm.astype(np.float32) / 32768
            for seed, frames in zip(seeds, streamed):
                expected = list(head.generate(avatar, wav, Options(seed=seed, batch_size=1)))
                assert len(frames) == len(expected) == 1
                for got, want in zip(frames, expected):
                    assert FRAME_HEADER.unpack(got[:12]) == (want.index, want.timestamp)
                    assert got == server.service.encode(want), f"session with seed {seed}: frame {want.index} differs"
            for seed, reply in zip((0, 3), videos):
                assert reply.status_code == 200 and reply.headers["content-type"] == "video/mp4"
                offline = tmp_path / f"offline-{seed}.mp4"
                head.write_video(avatar, wav, offline, Options(seed=seed, batch_size=1))
                got, want = decoded_video(reply.content), decoded_video(offline.read_bytes())
                assert len(got) == len(want) == 1
                assert all(np.array_equal(g, w) for g, w in zip(got, want))

            # too many sessions: the seventh is refused at once, with a reason
            with contextlib.ExitStack() as idle:
                for _ in range(6):
                    idle.enter_context(connect(f"{server.ws}/stream?avatar={avatar_id}", additional_headers=AUTH))
                deadline = time.time() + 30
                while server.service.slots.used < 6 and time.time() < deadline:
                    time.sleep(0.05)
                assert "busy" in refusal(server.ws, f"avatar={avatar_id}", AUTH)
                assert client.post("/videos", files={"photo": photo, "audio": wav_bytes(pcm)},
                                   headers=AUTH).status_code == 503
            # too much audio in one session, and a disconnect mid-session: both free their slot
            assert "limit" in refusal(server.ws, f"avatar={avatar_id}", AUTH, send=b"\0" * (2**20 + 2))
            long_pcm = np.zeros(int(2.5 * 16000), "<i2")
            with connect(f"{server.ws}/stream?avatar={avatar_id}", additional_headers=AUTH) as ws:
                ws.send(long_pcm[:16000].tobytes())
                ws.send(long_pcm[16000:].tobytes())
                assert "2 s" in json.loads(ws.recv(timeout=60))["message"]
            with connect(f"{server.ws}/stream?avatar={avatar_id}", additional_headers=AUTH) as ws:
                ws.send(long_pcm[:20000].tobytes())          # and leave without "end"
            deadline = time.time() + 30
            while server.service.slots.used and time.time() < deadline:
                time.sleep(0.05)
            assert server.service.slots.used == 0
    finally:
        server.stop()
    time.sleep(0.5)
    assert threading.active_count() <= threads, [t.name for t in threading.enumerate()]
    assert open_fds() <= fds
    # torch keeps a compile cache folder in the temp dir once it is touched; that is torch's, not a leak
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []


def test_serve_takes_the_options_and_refuses_the_rest(head, assets_dir, tmp_path):
    from sadtalker_rt.serving.app import Refusal, Service

    served = TalkingHead(head.backend, head.size, enhancer=cheap_face_enhancer())
    photo = (assets_dir / "happy.png").read_bytes()
    speech = media.load_audio(assets_dir / "bus_chinese.wav")
    pcm = np.clip(np.rint(speech[16000:16000 + 1920] * 32768), -32768, 32767).astype("<i2")     # three frames
    wav = pcm.astype(np.float32) / 32768
    server = Running(served, ServeConfig(batch_size=1))
    try:
        with httpx.Client(base_url=server.http, timeout=600) as client:
            avatar_id = client.post("/avatars", files={"photo": photo}).json()["avatar"]
            avatar = server.service.avatars[avatar_id]
            query = ("&still=1&pose_style=3&expression_scale=1.2&input_yaw=20&input_roll=-5&enhancer=gfpgan"
                     "&enhancer_noise=seeded&enhancer_points=fixed")
            frames = stream_session(server.ws, avatar_id, pcm, 4, 640, query)
            options = Options(seed=4, still=True, pose_style=3, expression_scale=1.2, input_yaw=[20], input_roll=[-5],
                              enhancer="gfpgan", enhancer_noise="seeded", enhancer_points="fixed", batch_size=1)
            expected = list(served.generate(avatar, wav, options))
            assert len(frames) == len(expected) == 3 and expected[0].image.shape == (512, 512, 3)
            assert frames == [server.service.encode(f) for f in expected]

            fields = {"seed": "2", "input_yaw": "-20,20", "enhancer": "gfpgan"}
            reply = client.post("/videos", files={"photo": photo, "audio": wav_bytes(pcm)}, data=fields)
            assert reply.status_code == 200, reply.text
            offline = tmp_path / "offline.mp4"
            served.write_video(avatar, wav, offline, Options(seed=2, input_yaw=["-20,20"], enhancer="gfpgan",
                                                             batch_size=1))
            got, want = decoded_video(reply.content), decoded_video(offline.read_bytes())
            assert len(got) == len(want) == 3 and all(np.array_equal(g, w) for g, w in zip(got, want))

            for bad, message in (("input_yaw=0,30", "one degree"), ("ref_pose=x.mp4", "reference videos"),
                                 ("colour=red", "unknown option 'colour'"), ("pose_style=99", "pose-style"),
                                 ("still=maybe", "still"), ("input_pitch=100", "-90..90"),
                                 ("enhancer=codeformer", "--enhancer must be")):
                assert message in refusal(server.ws, f"avatar={avatar_id}&{bad}"), bad
            reply = client.post("/videos", files={"photo": photo, "audio": wav_bytes(pcm)}, data={"ref_eyeblink": "x"})
            assert reply.status_code == 400 and "reference videos" in reply.json()["error"]
            assert server.service.slots.used == 0
    finally:
        server.stop()
    with pytest.raises(Refusal, match="without the enhancer"):
        Service(head, ServeConfig()).options({"enhancer": "gfpgan"}, streaming=True)
