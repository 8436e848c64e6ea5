"""Streaming benchmark: audio fed in real time, as a microphone would, to 1 and N sessions sharing one model.

Per run: time to first frame after the first audio chunk was handed over, real-time factor (wall time from the
first chunk to the last frame over the audio's duration), frame-time jitter (standard deviation of the intervals
between consecutive frames), and the lag of each frame behind the moment its own audio was fully spoken. The
offline path (``generate`` on the whole audio, handed over at once) on the same audio is the reference. The
machine's load is sampled before and after each run, and the process's CPU time is counted per run (on a
loaded machine it tells what the run would take alone). One frame is generated first, untimed, so no run pays
the first calls. Pure runtime: works with any backend.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..runtime.pipeline import Options, TalkingHead
from ..stages import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME


@dataclass
class StreamTiming:
    first_frame_s: float          # after the first audio chunk was handed over (offline: after the call)
    realtime_factor: float        # wall time to the last frame / audio duration (< 1: faster than real time)
    jitter_ms: float              # std of the intervals between consecutive frames
    lag_ms: float                 # median over frames: frame out - end of the frame's own audio
    max_lag_ms: float
    frames: int


def _summarise(start: float, times: list[float], seconds: float) -> StreamTiming:
    t = np.asarray(times) - start
    lag = t - (np.arange(len(t)) + 1) / FPS     # frame i's audio is fully spoken at (i + 1) / 25 s
    return StreamTiming(float(t[0]), float(t[-1] / seconds), float(np.std(np.diff(t)) * 1e3) if len(t) > 2 else 0.0,
                        float(np.median(lag) * 1e3), float(lag.max() * 1e3), len(t))


def offline(head: TalkingHead, avatar, wav: np.ndarray, options: Options) -> StreamTiming:
    start = time.perf_counter()
    times = [time.perf_counter() for _ in head.generate(avatar, wav, options)]
    return _summarise(start, times, len(wav) / SAMPLE_RATE)


def streamed(head: TalkingHead, avatar, wav: np.ndarray, options: Options, chunk_ms: float = 20.0,
             paced: bool = True) -> StreamTiming:
    """One session; chunks are handed over at the pace the audio was spoken (``paced``) from a feeder thread.
    Times count from the moment the first chunk was handed over."""
    step = max(1, int(chunk_ms * SAMPLE_RATE / 1000))
    chunks: queue.Queue = queue.Queue()
    began = threading.Event()
    first: list[float] = []

    def feed():
        began.wait()
        start = time.perf_counter()
        for i in range(0, len(wav), step):
            if paced:
                delay = start + i / SAMPLE_RATE - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            if not first:
                first.append(time.perf_counter())
            chunks.put(wav[i:i + step])
        chunks.put(None)

    def arriving():
        began.set()
        while (chunk := chunks.get()) is not None:
            yield chunk

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    times = [time.perf_counter() for _ in head.stream(avatar, arriving(), options)]
    feeder.join()
    return _summarise(first[0], times, len(wav) / SAMPLE_RATE)


def run(head: TalkingHead, avatar, wav: np.ndarray, sessions: tuple[int, ...] = (1, 4), chunk_ms: float = 20.0,
        options: Options = Options(batch_size=1), log=lambda line: None) -> dict:
    """Offline and streamed timings; N sessions take turns per model call on one model."""
    from ..bench.probes import load_average, usable_cores
    from .limits import FairTurns, TurnTakingBackend

    seconds = len(wav) / SAMPLE_RATE
    load = {"usable_cores": usable_cores(), "before": {}, "after": {}}
    cpu: dict = {}
    report = {"audio_seconds": seconds, "chunk_ms": chunk_ms, "batch_size": options.batch_size,
              "load_average": load, "process_cpu_s": cpu, "streaming": {}}
    started = time.perf_counter()
    list(head.generate(avatar, wav[:SAMPLES_PER_FRAME], options))      # first calls (allocations, kernel choice)
    report["warm_up_s"] = time.perf_counter() - started
    load["before"]["offline"] = load_average()
    cpu_start = time.process_time()
    report["offline"] = offline(head, avatar, wav, options).__dict__
    cpu["offline"] = time.process_time() - cpu_start
    load["after"]["offline"] = load_average()
    log(f"offline: {report['offline']['frames']} frames, real-time factor {report['offline']['realtime_factor']:.2f}")
    turns = FairTurns()
    enhancer = head.enhancer and head.enhancer.on_backend(TurnTakingBackend(head.enhancer.backend, turns))
    shared = TalkingHead(TurnTakingBackend(head.backend, turns), head.size, enhancer=enhancer)
    for n in sessions:
        load["before"][n] = load_average()
        cpu_start = time.process_time()
        with ThreadPoolExecutor(n) as pool:
            runs = list(pool.map(lambda _: streamed(shared, avatar, wav, options, chunk_ms), range(n)))
        cpu[n] = time.process_time() - cpu_start
        load["after"][n] = load_average()
        summary = {key: float(np.mean([getattr(r, key) for r in runs])) for key in StreamTiming.__dataclass_fields__}
        summary["first_frame_s_max"] = max(r.first_frame_s for r in runs)
        summary["realtime_factor_max"] = max(r.realtime_factor for r in runs)
        report["streaming"][n] = summary
        log(f"{n} session(s): first frame {summary['first_frame_s']:.2f} s, real-time factor "
            f"{summary['realtime_factor']:.2f}")
    return report


def _load(values) -> str:
    return "-" if not values else f"{values[0]:.2f}"


def to_markdown(report: dict) -> str:
    lines = []
    if "command" in report:
        lines += ["# sadtalker-rt streaming bench", "", f"- command: `{report['command']}`"]
        env = report.get("environment") or {}
        cpu = env.get("cpu") or {}
        gpu = env.get("gpu")
        lines.append(f"- machine: {cpu.get('model', '?')} ({cpu.get('usable_cores', '?')} usable cores, torch threads "
                     f"{cpu.get('torch_threads', '?')}); " + (f"GPU {gpu['name']}" if gpu else "no GPU"))
        lines.append(f"- inputs: {report.get('inputs', '')}")
    load = report.get("load_average", {})
    runs = ["offline", *report["streaming"]]
    cpu = report.get("process_cpu_s", {})
    if cpu:
        lines.append("- CPU time of this process (all threads) per run: " + ", ".join(
            f"{r if r == 'offline' else f'{r} session(s)'} {cpu[r]:.0f} s" for r in cpu)
            + f"; warm-up (one frame, before timing) {report.get('warm_up_s', 0):.0f} s")
    lines.append("- load (1-minute average before -> after each run): " + ", ".join(
        f"{r if r == 'offline' else f'{r} session(s)'} {_load(load.get('before', {}).get(r))} -> "
        f"{_load(load.get('after', {}).get(r))}" for r in runs) + f"; {load.get('usable_cores', '?')} usable cores")
    lines += ["", f"Streaming, {report['audio_seconds']:.2f} s of audio in {report['chunk_ms']:g} ms chunks fed in real "
              f"time, renderer batch {report['batch_size']}; first frame counted from the first chunk handed over "
              "(offline: from the call with the whole audio); lag: frame out minus the end of its own audio; "
              "means over sessions (worst in brackets)", "",
              "| path | sessions | first frame s | real-time factor | jitter ms | median lag ms | max lag ms | frames |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [("offline generate", 1, report["offline"])] + [("stream", n, r) for n, r in report["streaming"].items()]
    for name, n, r in rows:
        worst = (f" ({r['first_frame_s_max']:.2f})", f" ({r['realtime_factor_max']:.2f})") if "first_frame_s_max" in r \
            and int(n) > 1 else ("", "")
        lines.append(f"| {name} | {n} | {r['first_frame_s']:.2f}{worst[0]} | {r['realtime_factor']:.2f}{worst[1]} "
                     f"| {r['jitter_ms']:.0f} | {r['lag_ms']:.0f} | {r['max_lag_ms']:.0f} | {r['frames']:.0f} |")
    return "\n".join(lines) + "\n"
