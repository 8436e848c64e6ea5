"""Soak test: many short jobs in one process through the Python API, watching memory and file descriptors.

A server keeps one ``TalkingHead`` and serves request after request; anything a job leaves behind (an
open container, a cached avatar, a growing list) shows up here as resident memory or descriptors that
grow with the job count. Each job prepares an avatar, writes a video of a few frames into a temporary
directory, checks it and deletes it; photos, speech and preprocess modes alternate.

    python benchmarks/soak.py                     # 100 jobs of 2-3 frames, synthetic weights, CPU
    python benchmarks/soak.py --jobs 100 --frames 1

Writes benchmarks/results/soak-cpu.json (``--json``): machine facts, one row per job (RSS after the
job from /proc/self/status VmRSS, open descriptors from /proc/self/fd, seconds) and a summary with
first/last/max and least-squares slopes per job, over all jobs and over the second half (after the
allocator and the lazily built stages have settled). Linux only (reads /proc).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SADTALKER_RT_SHARED", REPO.parent / "shared"))
PHOTOS = ("happy.png", "art_0.png", "full_body_1.png")
SPEECH = ("RD_Radio31_000.wav", "bus_chinese.wav", "chinese_poem1.wav")
MODES = ("crop", "crop", "resize", "full")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def inputs() -> tuple[list[Path], list[Path]]:
    """The shared example photos and speech where present, else the bundled demo pair."""
    from sadtalker_rt import media

    photos = [SHARED / "assets" / name for name in PHOTOS if (SHARED / "assets" / name).is_file()]
    speech = [SHARED / "assets" / name for name in SPEECH if (SHARED / "assets" / name).is_file()]
    return photos or [media.demo_image()], speech or [media.demo_audio()]


def machine() -> dict:
    import av
    import onnxruntime
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    return {
        "cpu": model,
        "cores_usable": len(os.sched_getaffinity(0)),
        "cores_total": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "pyav": av.__version__,
    }


def slope(values: list[float]) -> float:
    """Least-squares growth per job; 0 for fewer than two points."""
    if len(values) < 2:
        return 0.0
    return float(np.polyfit(np.arange(len(values), dtype=np.float64), np.asarray(values, np.float64), 1)[0])


def summarize(rows: list[dict], block: int = 10) -> dict:
    """First/last/max and least-squares slopes per job; for RSS also the floor of each block of jobs.

    RSS after a job jumps by up to ~100 MiB for a job or two (the allocator keeps freed arenas of the
    larger photos) and falls back; the floors (the least RSS of each block of ``block`` jobs) show the
    level it falls back to, so their slope is the one to read for a leak.
    """
    rss = [r["rss_mib"] for r in rows]
    fds = [r["fds"] for r in rows]
    half = len(rows) // 2
    floors = [min(rss[i:i + block]) for i in range(0, len(rss), block)]
    return {
        "jobs": len(rows),
        "frames": int(sum(r["frames"] for r in rows)),
        "seconds": round(sum(r["seconds"] for r in rows), 1),
        "rss_mib": {"first": rss[0], "last": rss[-1], "max": max(rss), "min": min(rss),
                    "median_first_block": float(np.median(rss[:block])),
                    "median_last_block": float(np.median(rss[-block:])),
                    "slope_per_job": round(slope(rss), 3), "slope_per_job_second_half": round(slope(rss[half:]), 3),
                    "floor_per_block": floors, "floor_slope_per_job": round(slope(floors) / block, 4)},
        "fds": {"first": fds[0], "last": fds[-1], "max": max(fds),
                "slope_per_job": round(slope(fds), 4), "slope_per_job_second_half": round(slope(fds[half:]), 4)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--frames", type=int, default=None, help="frames per job (default: 2 and 3 alternately)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "soak-cpu.json")
    args = parser.parse_args(argv)

    from sadtalker_rt import media
    from sadtalker_rt.models.checkpoints import WeightSource
    from sadtalker_rt.runtime.pipeline import FPS, Options, TalkingHead

    photos, speech = inputs()
    report = {
        "benchmark": "soak: short jobs through one TalkingHead (synthetic weights, torch backend, CPU)",
        "machine": machine(),
        "config": {"jobs": args.jobs, "frames": args.frames or "2 and 3 alternately", "size": args.size,
                   "batch_size": args.batch_size, "photos": [p.name for p in photos],
                   "speech": [s.name for s in speech], "preprocess": list(MODES)},
        "note": "the CPU may be shared with other processes; seconds per job are for orientation, not speed",
        "rows": [],
    }
    rss_start = rss_mib()
    start = time.perf_counter()
    head = TalkingHead.from_weights(WeightSource(synthetic_seed=0), size=args.size, device="cpu")
    report["baseline"] = {"rss_mib_before_model": round(rss_start, 1), "fds_before_model": open_fds()}
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        out = Path(scratch) / "job.mp4"
        for job in range(args.jobs):
            frames = args.frames or 2 + job % 2
            photo, audio, mode = photos[job % len(photos)], speech[job % len(speech)], MODES[job % len(MODES)]
            began = time.perf_counter()
            avatar = head.prepare_avatar(photo, mode)
            head.write_video(avatar, audio, out, Options(seed=job, batch_size=args.batch_size,
                                                         duration=(frames + 0.5) / FPS))
            written = media.probe_video(out)["frames"]
            out.unlink()
            del avatar
            left = sorted(os.listdir(scratch))
            row = {"job": job, "photo": photo.name, "speech": audio.name, "preprocess": mode, "frames": written,
                   "seconds": round(time.perf_counter() - began, 2), "rss_mib": round(rss_mib(), 1),
                   "fds": open_fds()}
            if written != frames or left:
                row["problem"] = f"wrote {written} of {frames} frames; left behind: {left}"
            report["rows"].append(row)
            print(f"job {job:3d} {mode:<6} {photo.name:<16} {written} frames {row['seconds']:6.1f} s  "
                  f"RSS {row['rss_mib']:7.1f} MiB  fds {row['fds']}", flush=True)
            if (job + 1) % 10 == 0 or job + 1 == args.jobs:
                report["summary"] = summarize(report["rows"])
                report["summary"]["wall_seconds"] = round(time.perf_counter() - start, 1)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(report, indent=1) + "\n")
    problems = [r for r in report["rows"] if "problem" in r]
    summary = report["summary"]
    rss = summary["rss_mib"]
    print(f"RSS MiB first {rss['first']} last {rss['last']} max {rss['max']} slope {rss['slope_per_job']}/job "
          f"(second half {rss['slope_per_job_second_half']}/job, floor {rss['floor_slope_per_job']}/job); fds first "
          f"{summary['fds']['first']} last {summary['fds']['last']}; {len(problems)} problems; wrote {args.json}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
