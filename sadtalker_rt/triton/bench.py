"""Streams against a Triton server at several concurrency levels: throughput, latency, and the batches Triton
formed on the per-frame stages (from its own statistics, before and after each level)."""
from __future__ import annotations

import json
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import UsageError
from ..stages import SAMPLES_PER_FRAME, STAGES
from .layout import batched


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--concurrency takes comma-separated numbers, not '{text}'.") from None
    if not levels or min(levels) < 1:
        raise UsageError("--concurrency needs numbers of at least 1.")
    return levels


def _delta(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    return {k: after[k] - before.get(k, 0) for k in sorted(after) if after[k] - before.get(k, 0)}


def run(url: str, image: Optional[Path], audio: Optional[Path], frames: int, levels: list[int], batch_size: int = 1,
        label: str = "", log: Callable[[str], None] = lambda line: None) -> dict:
    from .. import media
    from ..runtime.pipeline import Options
    from .client import TritonClient

    if frames < 1:
        raise UsageError("--frames must be at least 1.")
    client = TritonClient(url)
    avatar = client.prepare_avatar(image or media.demo_image())
    wav = media.load_audio(audio or media.demo_audio())[: frames * SAMPLES_PER_FRAME]
    options = Options(batch_size=batch_size)
    per_frame = [name for name, stage in STAGES.items() if batched(stage)]
    log(f"warm-up stream of {frames} frames")
    list(client.stream(avatar, wav, options))
    results = []
    for n in levels:
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

        log(f"{n} concurrent streams of {frames} frames")
        start = time.perf_counter()
        threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        formed = {name: _delta(client.batch_statistics(name), before[name]) for name in per_frame}
        results.append({
            "streams": n, "frames_per_stream": frames, "wall_s": round(wall, 3),
            "frames_per_s": round(n * frames / wall, 3), "errors": errors,
            "first_frame_s": {"median": round(float(np.median(first)), 3), "max": round(max(first), 3)},
            "stream_s": {"median": round(float(np.median(total)), 3), "max": round(max(total), 3)},
            "batches": {name: {str(k): v for k, v in counts.items()} for name, counts in formed.items()},
            "mean_batch": {name: round(sum(k * v for k, v in counts.items()) / max(1, sum(counts.values())), 2)
                           for name, counts in formed.items()},
        })
    return {"command": "sadtalker-rt " + " ".join(sys.argv[1:]) if sys.argv[1:] else "sadtalker_rt.triton.bench.run",
            "url": url, "label": label, "host": platform.node() and platform.processor() or platform.machine(),
            "batch_size": batch_size, "results": results}


def to_markdown(report: dict) -> str:
    lines = [f"# Triton streams{' (' + report['label'] + ')' if report['label'] else ''}", "",
             f"Command: `{report['command']}`", "",
             "| streams | frames/s | first frame median / max (s) | stream median / max (s) | renderer batches "
             "(size: count) | mean renderer batch | errors |",
             "|---:|---:|---|---|---|---:|---:|"]
    for r in report["results"]:
        batches = ", ".join(f"{k}: {v}" for k, v in r["batches"].get("renderer", {}).items())
        lines.append(f"| {r['streams']} | {r['frames_per_s']:.2f} | {r['first_frame_s']['median']:.2f} / "
                     f"{r['first_frame_s']['max']:.2f} | {r['stream_s']['median']:.2f} / {r['stream_s']['max']:.2f} | "
                     f"{batches} | {r['mean_batch'].get('renderer', 0):.2f} | {len(r['errors'])} |")
    return "\n".join(lines) + "\n"


def write_json(report: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
