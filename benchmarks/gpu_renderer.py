"""The renderer on a CUDA GPU, every torch path side by side in one run, with parity against float32.

    python benchmarks/gpu_renderer.py --sizes 256 512 --batches 1 8 --json out.json --markdown out.md

Paths:
  official     the official loop's way: float32 eager, the whole generator (source re-encoded) per call
  cached-fp32  float32 eager, source features computed once per avatar
  cached-fp16  autocast FP16; grid sampling, normalisation statistics and softmax stay FP32 (autocast's policy)
  fp16-graph   cached-fp16 replayed from a CUDA graph (fixed shapes)
Parity is measured on the same keypoints against float32 with TF32 disabled.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from sadtalker_rt.models.checkpoints import WeightSource
from sadtalker_rt.models.stage_modules import stage_module
from sadtalker_rt.parity import psnr


def source_image(size: int, device) -> torch.Tensor:
    from PIL import Image

    from sadtalker_rt import media

    photo = Image.fromarray(media.load_image(media.demo_image())).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(photo, np.float32) / 255.0).permute(2, 0, 1)[None].to(device)


def time_cuda(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true", help="also try NHWC weights for the FP16 path")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for size in args.sizes:
        weights = WeightSource(synthetic_seed=0, size=size)
        nets = {}

        def subnetwork(name):
            if name not in nets:
                nets[name] = weights.build(name).to(device)
            return nets[name]

        generator = subnetwork("generator")
        kp_stage = stage_module("kp_detector", subnetwork).to(device)
        mapping = stage_module("mapping", subnetwork).to(device)
        renderer = stage_module("renderer", subnetwork).to(device)
        image = source_image(size, device)
        rng = np.random.default_rng(0)
        with torch.inference_mode():
            kp_canonical = kp_stage(image)
            base = rng.normal(0, 0.3, size=(1, 70, 27))
            for batch in args.batches:
                semantics = torch.from_numpy((base + rng.normal(0, 0.05, size=(batch + 1, 70, 27))).astype(np.float32))
                kp_all = mapping(kp_canonical, semantics.to(device))
                kp_source, kp_driving = kp_all[:1], kp_all[1:]
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
                feature_3d, compressed = generator.encode_source(image)
                reference = renderer(feature_3d, compressed, kp_source, kp_driving).float().cpu().numpy()
                torch.backends.cudnn.allow_tf32 = True   # PyTorch's default for convolutions

                def official():
                    images = image.expand(batch, -1, -1, -1)
                    return generator(images, kp_source.expand(batch, -1, -1), kp_driving)["prediction"]

                def cached_fp32():
                    return renderer(feature_3d, compressed, kp_source, kp_driving)

                def cached_fp16():
                    with torch.autocast("cuda", dtype=torch.float16):
                        return renderer(feature_3d, compressed, kp_source, kp_driving)

                paths = {"official": official, "cached-fp32": cached_fp32, "cached-fp16": cached_fp16}
                if args.channels_last:
                    renderer_nhwc = copy.deepcopy(renderer)
                    for module in renderer_nhwc.modules():     # 2-D convolutions only; 3-D ones keep NCDHW
                        if isinstance(module, torch.nn.Conv2d):
                            module.weight.data = module.weight.data.to(memory_format=torch.channels_last)

                    def cached_fp16_nhwc():
                        with torch.autocast("cuda", dtype=torch.float16):
                            return renderer_nhwc(feature_3d, compressed, kp_source, kp_driving)

                    paths["fp16-channels-last"] = cached_fp16_nhwc
                graph_out = None
                try:
                    static = cached_fp16()
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        graph_out = cached_fp16()
                    paths["fp16-graph"] = lambda: (graph.replay(), graph_out)[1]
                except Exception as err:  # report, keep measuring the other paths
                    print(f"CUDA graph capture failed at {size}/{batch}: {err}")
                for name, fn in paths.items():
                    torch.cuda.reset_peak_memory_stats()
                    times = time_cuda(fn, args.warmup, args.iters)
                    out = fn().float().cpu().numpy()
                    err = np.abs(out - reference)
                    row = {
                        "size": size, "batch": batch, "path": name,
                        "ms_per_call_median": float(np.median(times)), "ms_per_call_p95": float(np.percentile(times, 95)),
                        "ms_per_call_min": float(np.min(times)),
                        "ms_per_frame": float(np.median(times)) / batch,
                        "fps": 1000.0 * batch / float(np.median(times)),
                        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
                        "max_abs_err": float(err.max()), "psnr_db": float(psnr(out, reference)),
                    }
                    rows.append(row)
                    print(json.dumps(row))
        nets.clear()
        torch.cuda.empty_cache()
    env = {
        "gpu": torch.cuda.get_device_name(0), "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(), "driver": _driver(), "weights": "synthetic (seed 0)",
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(env, rows))
    print(markdown(env, rows))


def _driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"Renderer on {env['gpu']} (driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}), "
             f"{env['weights']}, {env['date']}.", "",
             "| size | batch | path | ms/frame | fps | vs official | peak GPU MiB | max abs err | PSNR dB |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        base = next(r for r in rows if r["size"] == row["size"] and r["batch"] == row["batch"] and r["path"] == "official")
        lines.append(f"| {row['size']} | {row['batch']} | {row['path']} | {row['ms_per_frame']:.2f} | {row['fps']:.1f} | "
                     f"{base['ms_per_frame'] / row['ms_per_frame']:.2f}x | {row['peak_gpu_mib']:.0f} | "
                     f"{row['max_abs_err']:.2e} | {row['psnr_db']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
