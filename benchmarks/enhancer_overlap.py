"""Does enhancing batch k in a worker thread while batch k + 1 renders pay on this CPU?

``TalkingHead.render`` with ``--enhancer gfpgan`` on a host backend, timed both ways on the same avatar and motion:
sequential (render k, enhance k, render k + 1, ...) and one batch ahead (``runtime.scheduler.one_batch_ahead``).
Rounds interleave the two, the order alternating, and every run's frames must equal the first sequential run's.
Synthetic weights; the graphs (onnxruntime) are exported once into the artifact cache.

    python benchmarks/enhancer_overlap.py --backend onnxruntime --frames 4 --batch-size 2 --rounds 2 \\
        --json benchmarks/results/cpu-enhancer-overlap.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sadtalker_rt import media  # noqa: E402
from sadtalker_rt.models.checkpoints import WeightSource  # noqa: E402
from sadtalker_rt.models.enhancer_weights import EnhancerWeights  # noqa: E402
from sadtalker_rt.runtime.pipeline import Options, TalkingHead  # noqa: E402
from sadtalker_rt.stages import FPS  # noqa: E402


def open_head(backend: str) -> TalkingHead:
    if backend == "torch":
        head = TalkingHead.from_weights(WeightSource(synthetic_seed=0), size=256)
        head.enable_enhancer(EnhancerWeights(synthetic_seed=0))
        return head
    from sadtalker_rt.build import cache
    from sadtalker_rt.runtime.backends import open_backend
    from sadtalker_rt.runtime.enhancer import enhancer_on_graphs

    head = TalkingHead.from_engines(cache.graphs_for(WeightSource(synthetic_seed=0), 256, "fp32"), "onnxruntime")
    graphs = cache.enhancer_graphs_for(EnhancerWeights(synthetic_seed=0), "fp32")
    head.enhancer = enhancer_on_graphs(open_backend("onnxruntime", engines=graphs))
    return head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--photo", type=Path, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shared = Path(os.environ.get("SADTALKER_RT_SHARED", ROOT.parent / "shared")) / "assets"
    photo = args.photo or shared / "happy.png"
    head = open_head(args.backend)
    avatar = head.prepare_avatar(photo, "crop")
    options = Options(enhancer="gfpgan", batch_size=args.batch_size, duration=args.frames / FPS)
    motion = head.motion(avatar, media.load_audio(shared / "RD_Radio31_000.wav"), options)

    def render(ahead: bool) -> tuple[float, list]:
        head.enhance_ahead = ahead
        start = time.perf_counter()
        frames = [f.image for f in head.render(avatar, motion, options)]
        return time.perf_counter() - start, frames

    warm = Options(enhancer="gfpgan", batch_size=1, duration=1 / FPS)
    list(head.render(avatar, head.motion(avatar, media.load_audio(shared / "RD_Radio31_000.wav"), warm), warm))
    load_before = os.getloadavg()
    times = {"sequential": [], "one batch ahead": []}
    reference = None
    for r in range(args.rounds):
        for ahead in ((False, True) if r % 2 == 0 else (True, False)):
            seconds, frames = render(ahead)
            if reference is None:
                reference = frames
            assert all(np.array_equal(a, b) for a, b in zip(frames, reference)), "frames differ between the modes"
            times["one batch ahead" if ahead else "sequential"].append(seconds)
            print(f"round {r + 1}: {'ahead' if ahead else 'sequential'} {seconds:.1f} s", flush=True)
    ratios = [s / a for s, a in zip(times["sequential"], times["one batch ahead"])]
    report = {
        "what": "TalkingHead.render with --enhancer gfpgan: sequential vs enhancing batch k in a worker thread while "
                "batch k + 1 renders; speedup = sequential time / one-batch-ahead time per round",
        "command": "python benchmarks/enhancer_overlap.py " + shlex.join(sys.argv[1:]),
        "backend": args.backend, "weights": "synthetic (seed 0)", "photo": photo.name, "frames": args.frames,
        "batch_size": args.batch_size, "rounds": args.rounds, "seconds": times,
        "speedup_median": statistics.median(ratios), "speedup_min_max": [min(ratios), max(ratios)],
        "frames_identical": True,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())},
    }
    print(json.dumps({k: report[k] for k in ("seconds", "speedup_median", "speedup_min_max")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
