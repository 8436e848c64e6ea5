"""Streams against a Triton server at several concurrency levels: throughput, latency, and the batches Triton
formed on the per-frame stages (from its own statistics, before and after each run).

The levels are interleaved round by round (1, 4, 16, 1, 4, 16, ...) so that whatever else loads the machine
falls on all of them alike; each level's throughput is the median over the rounds with its range, and the
report carries the load average seen. Before each run the free memory is checked: a run that would need more
than is available is skipped with the reason (a server killed for memory would end every stream anyway).
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import UsageError
from ..stages import SAMPLES_PER_FRAME, STAGES
from .layout import batched

STREAM_MB = 64          # what one stream holds on the client and in the glue model (frames in flight, state)
RENDERER_FRAME_MB = 650  # onnxruntime CPU working memory per frame of a 256 renderer batch (8 frames: ~5 GB)


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--concurrency takes comma-separated numbers, not '{text}'.") from None
    if not levels or min(levels) < 1:
        raise UsageError("--concurrency needs numbers of at least 1.")
    return levels


def available_mb() -> Optional[float]:
    """MemAvailable of this machine (None where /proc/meminfo is absent)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def renderer_peak_mb(repository: dict) -> float:
    """The memory the renderer's CPU instances reach at their largest batch (``describe_repository``)."""
    scale = (repository.get("size", 256) / 256) ** 2
    return repository["renderer instances"] * repository["max batch"] * RENDERER_FRAME_MB * scale


def _delta(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    return {k: after[k] - before.get(k, 0) for k in sorted(after) if after[k] - before.get(k, 0)}


def _one_run(client, avatar, wav, options, n: int, per_frame: list[str]) -> dict:
    before = {name: client.batch_statistics(name) for name in per_frame}
    first, total, errors = [0.0] * n, [0.0] * n, []

    def one(k: int) -> None:
        start = time.perf_counter()
        try:
            for frame in client.stream(avatar, wav, options):
                if frame.index == 0:
                    first[k] = time.perf_counter() - start
            total[k] = time.perf_counter() - start
        except Exception as err:       # reported, not raised: the other streams still count
            errors.append(str(err))

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    formed = {name: _delta(client.batch_statistics(name), before[name]) for name in per_frame}
    return {"wall_s": wall, "first": first, "total": total, "errors": errors, "formed": formed}


def run(url: str, image: Optional[Path], audio: Optional[Path], frames: int, levels: list[int], batch_size: int = 1,
        label: str = "", rounds: int = 1, min_free_mb: float = 1024.0, repository: Optional[dict] = None,
        log: Callable[[str], None] = lambda line: None) -> dict:
    from .. import media
    from ..runtime.pipeline import Options
    from .client import TritonClient

    if frames < 1 or rounds < 1:
        raise UsageError("--frames and --rounds must be at least 1.")
    client = TritonClient(url)
    client.check_models()
    avatar = client.prepare_avatar(image or media.demo_image())
    wav = media.load_audio(audio or media.demo_audio())[: frames * SAMPLES_PER_FRAME]
    if len(wav) < frames * SAMPLES_PER_FRAME:
        raise UsageError(f"the audio has fewer than {frames} frames ({len(wav) / SAMPLES_PER_FRAME:.0f}).")
    options = Options(batch_size=batch_size)
    per_frame = [name for name, stage in STAGES.items() if batched(stage) and client.has_model(name)]
    log(f"warm-up stream of {frames} frames")
    list(client.stream(avatar, wav, options))
    runs: dict[int, list[dict]] = {n: [] for n in levels}
    skipped: dict[int, list[str]] = {n: [] for n in levels}
    loads = [os.getloadavg()[0]]
    for r in range(rounds):
        for n in levels:
            free = available_mb()
            if free is not None and free - n * STREAM_MB < min_free_mb:
                reason = (f"round {r + 1}: {free:.0f} MB available, {n} streams need about {n * STREAM_MB} MB "
                          f"beyond the {min_free_mb:.0f} MB kept free")
                skipped[n].append(reason)
                log(f"skipped {n} streams: {reason}")
                continue
            log(f"round {r + 1}/{rounds}: {n} concurrent streams of {frames} frames")
            runs[n].append(_one_run(client, avatar, wav, options, n, per_frame))
            loads.append(os.getloadavg()[0])
            if runs[n][-1]["errors"] and not client.ready():
                raise UsageError(f"the server stopped answering during {n} streams "
                                 f"({runs[n][-1]['errors'][0]}); nothing more to measure.")
    results = [_summary(n, frames, runs[n], skipped[n]) for n in levels]
    command = "sadtalker-rt " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "sadtalker_rt.triton.bench.run"
    return {"command": command, "url": url, "label": label, "rounds": rounds, "batch_size": batch_size,
            "host": {"machine": platform.machine(), "processor": platform.processor(), "cores": os.cpu_count()},
            "load_average": [round(min(loads), 2), round(max(loads), 2)], "repository": repository or {},
            "results": results}


def _summary(n: int, frames: int, runs: list[dict], skipped: list[str]) -> dict:
    if not runs:
        return {"streams": n, "frames_per_stream": frames, "rounds": 0, "skipped": skipped}
    rates = [n * frames / r["wall_s"] for r in runs if not r["errors"]]
    first = [t for r in runs for t in r["first"] if t]
    whole = [t for r in runs for t in r["total"] if t]
    formed: dict[str, dict[int, int]] = {}
    for r in runs:
        for name, counts in r["formed"].items():
            for size, count in counts.items():
                formed.setdefault(name, {})[size] = formed.setdefault(name, {}).get(size, 0) + count
    return {
        "streams": n, "frames_per_stream": frames, "rounds": len(runs), "skipped": skipped,
        "frames_per_s": {"median": round(statistics.median(rates), 4), "min": round(min(rates), 4),
                         "max": round(max(rates), 4)} if rates else None,
        "errors": [e for r in runs for e in r["errors"]],
        "first_frame_s": {"median": round(float(np.median(first)), 3), "max": round(max(first), 3)} if first else None,
        "stream_s": {"median": round(float(np.median(whole)), 3), "max": round(max(whole), 3)} if whole else None,
        "batches": {name: {str(k): v for k, v in sorted(c.items())} for name, c in formed.items()},
        "mean_batch": {name: round(sum(k * v for k, v in c.items()) / max(1, sum(c.values())), 2)
                       for name, c in formed.items()},
    }


def to_markdown(report: dict) -> str:
    low, high = report["load_average"]
    lines = [f"# Triton streams{' (' + report['label'] + ')' if report['label'] else ''}", "",
             f"Command: `{report['command']}`", "",
             f"{report['rounds']} interleaved round(s); load average {low:.1f}-{high:.1f} on "
             f"{report['host']['cores']} cores.", ""]
    if report.get("repository"):
        lines += ["Repository: " + ", ".join(f"{k} {v}" for k, v in report["repository"].items()), ""]
    lines += ["| streams | frames/s median (min-max) | first frame median / max (s) | stream median / max (s) | "
              "renderer batches (size: count) | mean renderer batch | errors | skipped |",
              "|---:|---|---|---|---|---:|---:|---:|"]
    for r in report["results"]:
        if not r["rounds"]:
            lines.append(f"| {r['streams']} | skipped | | | | | | {len(r['skipped'])} |")
            continue
        rate = r["frames_per_s"]
        rate_text = f"{rate['median']:.3f} ({rate['min']:.3f}-{rate['max']:.3f})" if rate else "none complete"
        batches = ", ".join(f"{k}: {v}" for k, v in r["batches"].get("renderer", {}).items())
        first = f"{r['first_frame_s']['median']:.2f} / {r['first_frame_s']['max']:.2f}" if r["first_frame_s"] else ""
        whole = f"{r['stream_s']['median']:.2f} / {r['stream_s']['max']:.2f}" if r["stream_s"] else ""
        lines.append(f"| {r['streams']} | {rate_text} | {first} | {whole} | {batches} | "
                     f"{r['mean_batch'].get('renderer', 0):.2f} | {len(r['errors'])} | {len(r['skipped'])} |")
    skipped = [s for r in report["results"] for s in r["skipped"]]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def write_json(report: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
