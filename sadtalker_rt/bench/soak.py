"""``sadtalker-rt bench --soak N``: many short jobs through one ``TalkingHead``, watching memory and descriptors.

A server keeps one pipeline and serves request after request; anything a job leaves behind (an open container,
a cached avatar, a growing list) shows up as resident memory or descriptors that grow with the job count. Each
job prepares the avatar, writes a video of a few frames into a temporary directory, checks it and deletes it;
the preprocess modes alternate. Linux only (reads /proc).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UsageError
from .config import FPS
from .probes import LoadMonitor, environment

MODES = ("crop", "crop", "resize", "full")
BLOCK = 10                  # jobs per block for the RSS floors


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise UsageError("--soak needs /proc/self/status (Linux).")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def slope(values: list[float]) -> float:
    """Least-squares growth per job; 0 for fewer than two points."""
    if len(values) < 2:
        return 0.0
    return float(np.polyfit(np.arange(len(values), dtype=np.float64), np.asarray(values, np.float64), 1)[0])


def summarize(rows: list[dict], block: int = BLOCK) -> dict:
    """First/last/max and least-squares slopes per job; for RSS also the floor of each block of jobs (RSS after a
    job jumps for a job or two as the allocator keeps freed arenas, then falls back: the floors' slope is the one
    to read for a leak)."""
    rss = [r["rss_mib"] for r in rows]
    fds = [r["fds"] for r in rows]
    half = len(rows) // 2
    floors = [min(rss[i:i + block]) for i in range(0, len(rss), block)]
    return {
        "jobs": len(rows), "frames": int(sum(r["frames"] for r in rows)),
        "seconds": round(sum(r["seconds"] for r in rows), 1),
        "rss_mib": {"first": rss[0], "last": rss[-1], "max": max(rss), "min": min(rss),
                    "slope_per_job": round(slope(rss), 3), "slope_per_job_second_half": round(slope(rss[half:]), 3),
                    "floor_per_block": floors, "floor_slope_per_job": round(slope(floors) / block, 4)},
        "fds": {"first": fds[0], "last": fds[-1], "max": max(fds), "slope_per_job": round(slope(fds), 4)},
    }


def run_soak(weights, size: int, jobs: int, frames: int, image: Path | None = None, audio: Path | None = None,
             device: str = "cpu", command: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    from .. import media
    from ..runtime.pipeline import Options, TalkingHead
    from .run import resolve_device

    if jobs < 1:
        raise UsageError(f"--soak must be at least 1 job, not {jobs}.")
    say = log or (lambda line: None)
    device = resolve_device(device)
    photo = Path(image) if image is not None else media.demo_image()
    speech = Path(audio) if audio is not None else media.demo_audio()
    load = LoadMonitor()
    rss_start, fds_start = _rss_mib(), _open_fds()
    head = TalkingHead.from_weights(weights, size=size, device=device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sadtalker-rt-soak-") as scratch:
        out = Path(scratch) / "job.mp4"
        for job in range(jobs):
            count = frames + job % 2           # alternate lengths, so that no buffer size repeats exactly
            mode = MODES[job % len(MODES)]
            began = time.perf_counter()
            avatar = head.prepare_avatar(photo, mode)
            head.write_video(avatar, speech, out, Options(seed=job, batch_size=2, duration=(count + 0.5) / FPS))
            written = media.probe_video(out)["frames"]
            out.unlink()
            del avatar
            left = sorted(os.listdir(scratch))
            row = {"job": job, "preprocess": mode, "frames": written,
                   "seconds": round(time.perf_counter() - began, 2), "rss_mib": round(_rss_mib(), 1),
                   "fds": _open_fds(), "problem": None}
            if written != count or left:
                row["problem"] = f"wrote {written} of {count} frames; left behind: {left}"
            rows.append(row)
            say(f"soak job {job + 1}/{jobs} {mode:<6} {written} frames {row['seconds']:6.1f} s  "
                f"RSS {row['rss_mib']:7.1f} MiB  fds {row['fds']}")
    return {
        "kind": "soak", "command": command, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(device), "machine_load": load.as_dict(),
        "config": {"jobs": jobs, "frames": f"{frames} and {frames + 1} alternately", "size": size, "batch_size": 2,
                   "device": device, "preprocess": list(MODES), "weights": weights.identity()},
        "before_model": {"rss_mib": round(rss_start, 1), "fds": fds_start},
        "summary": summarize(rows), "rows": rows,
    }


def soak_markdown(result: dict) -> str:
    s = result["summary"]
    rss, fds = s["rss_mib"], s["fds"]
    problems = [r for r in result["rows"] if r["problem"]]
    return "\n".join([
        f"# sadtalker-rt bench --soak: {s['jobs']} jobs, {s['frames']} frames",
        "",
        f"- command: `{result['command'] or '(not recorded)'}`",
        f"- RSS MiB: first {rss['first']}, last {rss['last']}, max {rss['max']}; slope {rss['slope_per_job']}/job "
        f"(second half {rss['slope_per_job_second_half']}/job; block floors {rss['floor_slope_per_job']}/job)",
        f"- open descriptors: first {fds['first']}, last {fds['last']}, max {fds['max']}",
        f"- problems: {len(problems)}",
    ]) + "\n"
