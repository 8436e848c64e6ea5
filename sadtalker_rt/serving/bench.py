"""Streaming benchmark: audio fed in real time, as a microphone would, to 1 and N sessions sharing one model.

Per run: time to first frame after the first audio chunk, real-time factor (wall time from the first chunk to
the last frame over the audio's duration), frame-time jitter (standard deviation of the intervals between
frames), and the lag of each frame behind the audio it needs. The offline path (``generate`` on the whole
audio) on the same audio is the reference. Pure runtime: works with any backend.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..runtime.pipeline import FPS, SAMPLE_RATE, Options, TalkingHead


@dataclass
class StreamTiming:
    first_frame_s: float          # after the first audio chunk was handed over
    realtime_factor: float        # wall time / audio duration (< 1: faster than real time)
    jitter_ms: float              # std of the intervals between consecutive frames
    lag_ms: float                 # median: frame out - arrival of the last audio sample it could need
    frames: int


def _summarise(start: float, times: list[float], seconds: float) -> StreamTiming:
    t = np.asarray(times) - start
    frame_audio_end = (np.arange(len(t)) + 1) / FPS     # when the audio of frame i was fully spoken
    return StreamTiming(float(t[0]), float(t[-1] / seconds), float(np.std(np.diff(t)) * 1e3) if len(t) > 2 else 0.0,
                        float(np.median(t - frame_audio_end) * 1e3), len(t))


def offline(head: TalkingHead, avatar, wav: np.ndarray, options: Options) -> StreamTiming:
    start = time.perf_counter()
    times = [time.perf_counter() for _ in head.generate(avatar, wav, options)]
    return _summarise(start, times, len(wav) / SAMPLE_RATE)


def streamed(head: TalkingHead, avatar, wav: np.ndarray, options: Options, chunk_ms: float = 20.0,
             paced: bool = True) -> StreamTiming:
    """One session; chunks are handed over at the pace the audio was spoken (``paced``) from a feeder thread."""
    import queue

    step = max(1, int(chunk_ms * SAMPLE_RATE / 1000))
    chunks: queue.Queue = queue.Queue()
    start = time.perf_counter()

    def feed():
        for i in range(0, len(wav), step):
            if paced:
                delay = start + i / SAMPLE_RATE - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            chunks.put(wav[i:i + step])
        chunks.put(None)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    def arriving():
        while (chunk := chunks.get()) is not None:
            yield chunk

    times = [time.perf_counter() for _ in head.stream(avatar, arriving(), options)]
    feeder.join()
    return _summarise(start, times, len(wav) / SAMPLE_RATE)


def run(head: TalkingHead, avatar, wav: np.ndarray, sessions: tuple[int, ...] = (1, 4), chunk_ms: float = 20.0,
        options: Options = Options(batch_size=1)) -> dict:
    """Offline and streamed timings; N sessions take turns per model call on one model."""
    from .limits import FairTurns, TurnTakingBackend

    report = {"audio_seconds": len(wav) / SAMPLE_RATE, "chunk_ms": chunk_ms, "batch_size": options.batch_size,
              "offline": offline(head, avatar, wav, options).__dict__, "streaming": {}}
    shared = TalkingHead(TurnTakingBackend(head.backend, FairTurns()), head.size)
    for n in sessions:
        with ThreadPoolExecutor(n) as pool:
            runs = list(pool.map(lambda _: streamed(shared, avatar, wav, options, chunk_ms), range(n)))
        report["streaming"][n] = {key: float(np.mean([getattr(r, key) for r in runs]))
                                  for key in StreamTiming.__dataclass_fields__}
    return report


def to_markdown(report: dict) -> str:
    lines = [f"Streaming, {report['audio_seconds']:.2f} s of audio in {report['chunk_ms']:g} ms chunks fed in real "
             f"time, renderer batch {report['batch_size']} (means over sessions)", "",
             "| path | sessions | first frame s | real-time factor | jitter ms | median lag ms | frames |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rows = [("offline generate", 1, report["offline"])] + [("stream", n, r) for n, r in report["streaming"].items()]
    for name, n, r in rows:
        lines.append(f"| {name} | {n} | {r['first_frame_s']:.2f} | {r['realtime_factor']:.2f} | {r['jitter_ms']:.0f} "
                     f"| {r['lag_ms']:.0f} | {r['frames']:.0f} |")
    return "\n".join(lines) + "\n"
