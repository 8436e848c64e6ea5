"""TalkingHead.stream equals the offline generate frame for frame, whatever the chunk sizes."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sadtalker_rt import media
from sadtalker_rt.runtime.pipeline import Options
from sadtalker_rt.runtime.streaming import FrameStream

CHUNK_MS = (1, 20, 333, None)          # None: the whole audio as one chunk


def chunked(wav: np.ndarray, ms):
    n = len(wav) if ms is None else ms * 16
    return [wav[i:i + n] for i in range(0, len(wav), max(n, 1))]


SPEECH = ("RD_Radio31_000.wav", "bus_chinese.wav", "chinese_poem1.wav")


def max_lag_frames(batch_size: int, chunk_frames: float) -> float:
    """Audio frames a frame may wait for beyond its own (sadtalker_rt.runtime.streaming): the renderer needs 13
    more frames' coefficients, smoothing 6 more raw poses, the PoseVAE chunk holding that pose up to 31 more, a
    mel window 3.3 more (rounded up: 55); plus the rest of a renderer batch and of the chunk that brought it."""
    return 55 + batch_size - 1 + chunk_frames


def speech(assets_dir, name: str, seconds: float) -> np.ndarray:
    return media.load_audio(assets_dir / name)[:int(seconds * 16000)]


def streamed(head, avatar, wav, ms, options):
    """Frames of ``stream`` and, per frame, the audio frames that had arrived when it came out."""
    session = FrameStream(head, avatar, options)
    frames, heard = [], []
    received = 0
    for chunk in chunked(wav, ms):
        received += len(chunk)
        for frame in session.push(chunk):
            frames.append(frame)
            heard.append(received / 640)
    for frame in session.close():
        frames.append(frame)
        heard.append(None)
    return frames, heard


def assert_same_frames(got, expected):
    assert [f.index for f in got] == list(range(len(expected)))
    assert [f.timestamp for f in got] == [f.timestamp for f in expected]
    for g, e in zip(got, expected):
        assert np.array_equal(g.image, e.image), f"frame {g.index} differs"


@pytest.mark.parametrize("name", SPEECH)
def test_stream_equals_generate_on_every_speech_file(head, avatar, assets_dir, name):
    wav = speech(assets_dir, name, 0.5)
    options = Options(seed=7, batch_size=2)
    expected = list(head.generate(avatar, wav, options))
    assert len(expected) == 12
    for ms in CHUNK_MS:
        assert_same_frames(streamed(head, avatar, wav, ms, options)[0], expected)


def test_frames_come_out_before_the_audio_ends(head, avatar, assets_dir):
    wav = speech(assets_dir, "bus_chinese.wav", 3.0)
    options = Options(seed=2, batch_size=3, expression_scale=1.5)
    expected = list(head.generate(avatar, wav, options))
    got, heard = streamed(head, avatar, wav, 20, options)
    assert_same_frames(got, expected)
    early = [(f.index, h) for f, h in zip(got, heard) if h is not None]
    bound = max_lag_frames(options.batch_size, 20 / 40)
    assert len(early) >= 75 - bound, f"only {len(early)} of 75 frames before the end"
    assert max(h - index for index, h in early) <= bound


def test_real_renderer_streams_the_offline_frames(real_head, avatar, assets_dir):
    wav = speech(assets_dir, "RD_Radio31_000.wav", 0.05)
    options = Options(seed=1, batch_size=1)
    expected = list(real_head.generate(avatar, wav, options))
    assert len(expected) == 1
    assert_same_frames(streamed(real_head, avatar, wav, 20, options)[0], expected)


def test_int16_bytes_async_still_and_duration(head, avatar, assets_dir):
    wav = speech(assets_dir, "chinese_poem1.wav", 0.6)
    pcm = np.clip(np.rint(wav * 32768), -32768, 32767).astype("<i2")
    options = Options(seed=3, still=True, duration=0.45)
    expected = list(head.generate(avatar, pcm.astype(np.float32) / 32768, options))
    assert len(expected) == 11

    async def chunks():
        for i in range(0, len(pcm), 333):
            yield pcm[i:i + 333].tobytes()

    async def collect():
        return [frame async for frame in head.stream(avatar, chunks(), options)]

    assert_same_frames(asyncio.run(collect()), expected)
    assert_same_frames(list(head.stream(avatar, [pcm], options)), expected)


@pytest.mark.heavy
@pytest.mark.parametrize("name", SPEECH)
@pytest.mark.parametrize("ms", CHUNK_MS)
def test_stream_equals_generate_on_long_speech(head, avatar, assets_dir, name, ms):
    wav = speech(assets_dir, name, 6.0)
    options = Options(seed=5, batch_size=4)
    assert_same_frames(streamed(head, avatar, wav, ms, options)[0], list(head.generate(avatar, wav, options)))


@pytest.mark.heavy
@pytest.mark.parametrize("ms", CHUNK_MS)
def test_real_renderer_every_chunk_size(real_head, avatar, assets_dir, ms):
    wav = speech(assets_dir, "bus_chinese.wav", 0.25)
    options = Options(seed=4, batch_size=2)
    assert_same_frames(streamed(real_head, avatar, wav, ms, options)[0],
                       list(real_head.generate(avatar, wav, options)))


def test_streaming_bench_reports_one_and_two_sessions(head, avatar, assets_dir):
    pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
    from sadtalker_rt.serving import bench as bench_streaming

    wav = speech(assets_dir, "bus_chinese.wav", 1.8)
    report = bench_streaming.run(head, avatar, wav, sessions=(1, 2), chunk_ms=40, options=Options(batch_size=1))
    assert report["offline"]["frames"] == 45
    for n in (1, 2):
        timing = report["streaming"][n]
        assert timing["frames"] == 45
        assert 0 < timing["first_frame_s"] <= timing["first_frame_s_max"]
        assert timing["realtime_factor"] >= 0.9 and timing["max_lag_ms"] >= timing["lag_ms"]   # fed in real time
        assert len(report["load_average"]["after"][n]) == 3 and report["process_cpu_s"][n] > 0
    report["command"] = "sadtalker-rt bench --streaming"
    markdown = bench_streaming.to_markdown(report)
    assert "| stream | 2 |" in markdown and "`sadtalker-rt bench --streaming`" in markdown and "2 session(s)" in markdown
