"""The face enhancer as a bench stage: per-frame cost of each backend next to the official way, and parity.

The official way is GFPGANer's: PyTorch FP32, one frame at a time, GFPGAN and the parsing network on the
aligned face, pasted back. Every candidate runs the same whole step (align, both networks, paste) on the same
frame with the same decoder noise, so the times compare what a user waits for and the parity is the enhanced
face as it lands in the video (PSNR over the box the restored face is pasted into, on [0, 1]).

Timing is interleaved: each round times the official step then each candidate, one call each, so a machine
whose load changes during the run slows both sides of a ratio alike. The result is the median of the per-round
ratios with their min-max spread; the load average before and after is recorded.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .fp16 import EmulatedFp16Backend

OFFICIAL = "torch-fp32 (official: per frame, PyTorch FP32)"


@dataclass
class EnhancerBenchConfig:
    enhancer_weights: object                      # models.enhancer_weights.EnhancerWeights
    photo: Path
    graphs: dict = field(default_factory=dict)    # "onnxruntime-fp32" -> folder with the enhancer graphs
    rounds: int = 3
    seed: int = 0
    command: str = ""


def _frame_and_points(photo: Path) -> tuple[np.ndarray, np.ndarray]:
    """The photo's crop-mode 256 frame as the renderer's source frame, and its 5 face points."""
    from .. import media
    from ..runtime import face_restore as fr
    from ..runtime import landmarks
    from ..runtime import preprocess as prep

    image = media.load_image(photo)
    found = landmarks.detect(image, name=str(photo))
    frame, _ = prep.crop_source(image, found.landmarks, "crop", 256)
    return frame, fr.points_from_landmarks68(landmarks.detect(frame, name=str(photo)).landmarks)


def _face_box(enhancer, frame_shape: tuple) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of the output region the 512 x 512 restored face is pasted into."""
    corners = np.array([[0, 0, 1], [512, 0, 1], [0, 512, 1], [512, 512, 1]], np.float64)
    inverse = np.array(enhancer.alignment.inverse, np.float64)
    inverse[:, 2] += 0.5 * enhancer.upscale
    mapped = corners @ inverse.T
    h, w = frame_shape[0] * enhancer.upscale, frame_shape[1] * enhancer.upscale
    x1, y1 = np.clip(np.floor(mapped.min(0)), 0, [w, h]).astype(int)
    x2, y2 = np.clip(np.ceil(mapped.max(0)), 0, [w, h]).astype(int)
    return int(y1), int(y2), int(x1), int(x2)


def _candidates(config: EnhancerBenchConfig) -> dict[str, object]:
    from ..runtime.backends import open_backend
    from ..runtime.enhancer import FaceEnhancer, enhancer_on_graphs

    torch_backend = open_backend("torch", weights=config.enhancer_weights)
    gfpgan = torch_backend.subnetwork("gfpgan")
    stored = [n.numpy() for n in gfpgan.stylegan_decoder.stored_noise()]
    found = {OFFICIAL: FaceEnhancer(torch_backend, stored, parse=config.enhancer_weights.has("parsenet"))}
    for name, folder in config.graphs.items():
        backend, _, _ = name.partition("-")
        found[name] = enhancer_on_graphs(open_backend(backend, engines=Path(folder)))
    return found


def run_enhancer_bench(config: EnhancerBenchConfig, log: Callable[[str], None] = print) -> dict:
    from ..parity import region_psnr

    frame, points = _frame_and_points(config.photo)
    enhancers = _candidates(config)
    for enhancer in enhancers.values():
        enhancer.set_points(points)
    official = enhancers[OFFICIAL]
    # The official call draws fresh noise; here every path gets the same seeded draw so outputs compare.
    step = {name: (lambda e=e: e([frame], [0], "seeded", config.seed)) for name, e in enhancers.items()}
    load_before = os.getloadavg()
    outputs = {name: run() for name, run in step.items()}          # warm-up, and the parity outputs
    # FP16 graphs: onnxruntime's CPU provider computes float16 nodes in float32, so parity is measured on the
    # same graphs with float16 storage emulated, as export validation measures it; the time is the real run's.
    emulated = {name: _emulated_output(e, frame, points, config.seed) for name, e in enhancers.items()
                if _precision(e) == "fp16"}
    log(f"warm-up done ({len(step)} paths)")
    times: dict[str, list[float]] = {name: [] for name in step}
    for r in range(config.rounds):
        for name, run in step.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
        log(f"round {r + 1}/{config.rounds}: " + ", ".join(f"{n.split(' ')[0]} {t[-1]:.2f} s" for n, t in times.items()))
    load_after = os.getloadavg()
    box = _face_box(official, frame.shape)
    reference = outputs[OFFICIAL][0].transpose(2, 0, 1) / 255.0
    rows = []

    def face_psnr(output: np.ndarray) -> float:
        return region_psnr(output.transpose(2, 0, 1) / 255.0, reference, (box[2], box[0], box[3], box[1]))

    for name, spent in times.items():
        ratios = [o / c for o, c in zip(times[OFFICIAL], spent)]
        row = {
            "path": name, "batch": 1, "precision": _precision(enhancers[name]),
            "ms_per_frame_median": 1000 * statistics.median(spent),
            "ms_per_frame_all": [round(1000 * t, 1) for t in spent],
            "speedup_vs_official_median": statistics.median(ratios),
            "speedup_vs_official_min_max": [min(ratios), max(ratios)],
            "face_psnr_db_vs_official": None if name == OFFICIAL else face_psnr(emulated.get(name, outputs[name])[0]),
            "parity_method": "reference" if name == OFFICIAL else "as run",
        }
        if name in emulated:
            row["parity_method"] = EmulatedFp16Backend.METHOD
            row["face_psnr_db_as_run_on_cpu"] = face_psnr(outputs[name][0])
        rows.append(row)
    return {
        "what": "face enhancer step per frame (align, GFPGAN v1.4, parsing network, paste back at 2x)",
        "command": config.command, "photo": Path(config.photo).name, "frame": list(frame.shape),
        "weights": config.enhancer_weights.describe(), "rounds": config.rounds, "timing": "interleaved A B A B; "
        "speedup = official time / path time per round, median and min-max over rounds",
        "face_box_yyxx": list(box),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "load_average_before": list(load_before),
                    "load_average_after": list(load_after)},
        "rows": rows,
    }


def _precision(enhancer) -> str:
    """The enhancer graph's precision (fp32 for the torch modules)."""
    manifest = getattr(enhancer.backend, "manifest", None)
    return manifest["stages"]["enhancer"].get("precision", "fp32") if manifest else "fp32"


def _emulated_output(enhancer, frame: np.ndarray, points: np.ndarray, seed: int) -> list[np.ndarray]:
    """The enhancer step on the same graphs with float16 storage emulated (``bench.fp16``)."""
    from ..runtime.enhancer import enhancer_on_graphs

    twin = enhancer_on_graphs(EmulatedFp16Backend(enhancer.backend.directory))
    twin.set_points(points)
    return twin([frame], [0], "seeded", seed)


def to_markdown(report: dict) -> str:
    lines = [f"Face enhancer per frame, {report['weights']}, {report['photo']} ({report['rounds']} interleaved rounds; "
             f"load {report['machine']['load_average_before'][0]:.1f} -> {report['machine']['load_average_after'][0]:.1f} "
             f"on {report['machine']['cpu_count']} CPUs)", "",
             "| path | ms/frame (median) | vs official (median, min-max) | face PSNR dB |", "|---|---:|---:|---:|"]
    for row in report["rows"]:
        low, high = row["speedup_vs_official_min_max"]
        psnr = row["face_psnr_db_vs_official"]
        shown = "reference" if psnr is None else f"{psnr:.1f}"
        if row.get("parity_method", "").startswith("FP16 storage emulated"):
            shown += " (FP16 storage emulated)"
        lines.append(f"| {row['path']} | {row['ms_per_frame_median']:.0f} | {row['speedup_vs_official_median']:.2f}x "
                     f"({low:.2f}-{high:.2f}) | {shown} |")
    return "\n".join(lines) + "\n"


def default_graphs(enhancer_weights, precisions: Optional[list[str]] = None, progress=None) -> dict:
    """The cached onnxruntime enhancer graphs for each precision (exported once)."""
    from ..build import cache

    return {f"onnxruntime-{p}": cache.enhancer_graphs_for(enhancer_weights, p, progress)
            for p in (precisions or ["fp32", "fp16"])}
