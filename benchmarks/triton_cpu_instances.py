"""How to lay out the renderer's Triton instances on a CPU: the onnxruntime renderer's per-frame cost at batch 1
against batch 4, for one instance with every core (intra-op threads = cores) and for one instance per core
(1 intra-op thread each, all running at once, as Triton runs its instances). Interleaved round by round.

    PYTHONPATH=. python benchmarks/triton_cpu_instances.py [--graphs EXPORT] --frames 4 --rounds 2

The renderer is the batched graph the Triton repository serves (``triton-repo``), synthetic weights at 256
unless ``--graphs`` names an export. Prints one line per measurement and a JSON summary (``--json``). Every
layout runs without onnxruntime's memory arena, so only the layout being measured holds a batch's memory.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sadtalker_rt.stages import STAGES  # noqa: E402


def _feeds(size: int, batch: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    stage = STAGES["renderer"]
    return {t.name: (rng.standard_normal(t.resolve(size, batch=batch, frames=batch)) *
                     (0.3 if t.kind == "keypoints" else 1.0)).astype(t.dtype) for t in stage.inputs}


def _worker(graph: str, size: int, threads: int, batches: tuple, commands, answers) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False    # idle layouts hold no batch's working memory (a shared machine)
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    feeds = {b: _feeds(size, b) for b in batches}
    for b in batches:                      # first call at each shape is not timed
        session.run(None, feeds[b])
    answers.put("ready")
    while (command := commands.get()) is not None:
        batch, frames = command
        start = time.perf_counter()
        for _ in range(max(1, frames // batch)):
            session.run(None, feeds[batch])
        answers.put(time.perf_counter() - start)


class Layout:
    """``instances`` worker processes with ``threads`` intra-op threads each, run together."""

    def __init__(self, graph: Path, size: int, instances: int, threads: int, batches: tuple):
        ctx = mp.get_context("spawn")
        self.name = f"{instances} instance(s) x {threads} thread(s)"
        self.instances, self.threads = instances, threads
        self.links = [(ctx.Queue(), ctx.Queue()) for _ in range(instances)]
        self.procs = [ctx.Process(target=_worker, args=(str(graph), size, threads, batches, c, a), daemon=True)
                      for c, a in self.links]
        for p in self.procs:
            p.start()
        for _, answers in self.links:
            assert answers.get(timeout=3600) == "ready"

    def run(self, batch: int, frames: int) -> float:
        """Frames per second of every instance rendering ``frames`` frames at ``batch`` at once."""
        start = time.perf_counter()
        for commands, _ in self.links:
            commands.put((batch, frames))
        for _, answers in self.links:
            answers.get(timeout=3600)
        return self.instances * frames / (time.perf_counter() - start)

    def close(self) -> None:
        for commands, _ in self.links:
            commands.put(None)
        for p in self.procs:
            p.join(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graphs", type=Path, help="an export folder (default: synthetic weights, 256, cached)")
    parser.add_argument("--frames", type=int, default=4, help="frames per instance per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from sadtalker_rt.build import cache
    from sadtalker_rt.models.checkpoints import WeightSource
    from sadtalker_rt.runtime.manifest import load_manifest
    from sadtalker_rt.triton.repository import batched_graph

    graphs = args.graphs or cache.graphs_for(WeightSource(synthetic_seed=0), 256, "fp32")
    size = int(load_manifest(graphs)["size"])
    batches = tuple(int(b) for b in args.batches.split(","))
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        graph = Path(tmp) / "renderer.onnx"
        batched_graph(graphs / "renderer.onnx", STAGES["renderer"], graph)
        layouts = [Layout(graph, size, 1, cores, batches)] + ([Layout(graph, size, cores, 1, batches)] if cores > 1
                                                              else [])
        results = {(lay.name, b): [] for lay in layouts for b in batches}
        loads = [os.getloadavg()[0]]
        try:
            for r in range(args.rounds):
                order = [(lay, b) for lay in layouts for b in batches]
                order = order[r % len(order):] + order[:r % len(order)]     # rotate: no layout always first
                for lay, b in order:
                    fps = lay.run(b, args.frames)
                    results[(lay.name, b)].append(fps)
                    loads.append(os.getloadavg()[0])
                    print(f"round {r + 1}: {lay.name}, batch {b}: {fps:.3f} frames/s "
                          f"({1 / fps * lay.instances:.2f} s per frame per instance), load {loads[-1]:.1f}",
                          flush=True)
        finally:
            for lay in layouts:
                lay.close()
    summary = {"command": "python " + shlex.join(sys.argv), "cores": cores, "size": size,
               "load_average": [min(loads), max(loads)],
               "frames_per_s": {f"{name}, batch {b}": {"median": statistics.median(v), "min": min(v), "max": max(v)}
                                for (name, b), v in results.items()}}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
