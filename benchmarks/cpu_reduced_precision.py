"""Reduced-precision CPU variants of the 256 renderer: speed (interleaved with the official loop) and the gates.

    PYTHONPATH=. python benchmarks/cpu_reduced_precision.py --work $WORK \
        --json benchmarks/results/cpu-reduced-precision.json

Variants: onnxruntime FP32; onnxruntime INT8 (QDQ, per-channel weights, calibrated on the bundled photo and
speech) with no measured islands and with the islands given by --fp32-groups; a BF16 probe (one conv in
torch autocast against FP32: whether this processor computes BF16 natively at all). Parity is measured on
every photo x speech file of the shared assets against the FP32 torch renderer, with synthetic weights.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sadtalker_rt.bench import cpu_variants as cv  # noqa: E402
from sadtalker_rt.stages import STAGES  # noqa: E402


def bf16_probe(rounds: int) -> dict:
    """One 64-channel 3x3 conv at 64x64, FP32 against BF16 autocast, interleaved."""
    import torch

    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval()
    x = torch.randn(1, 64, 64, 64)

    def fp32():
        with torch.inference_mode():
            conv(x)

    def bf16():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            conv(x)

    fp32(), bf16()
    timing = cv.interleaved({"fp32": fp32, "bf16_autocast": bf16}, rounds, "fp32")
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "timing": timing}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True, help="folder for the graphs")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--assets", type=Path, default=ROOT.parent / "shared" / "assets")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoints", type=Path, help="official weights (default: synthetic, seed 0)")
    parser.add_argument("--islands", action="append", default=[], metavar="NAME=GROUP+GROUP",
                        help="an INT8 variant that keeps these conv groups (int8.conv_group) FP32; repeatable")
    parser.add_argument("--variants", default="ort_fp32,int8_all,bf16_probe")
    parser.add_argument("--calibration-frames", default="9,2")
    parser.add_argument("--time", default="official,torch_fp32_cached_source,ort_fp32,int8_all",
                        help="the runs timed against each other")
    parser.add_argument("--cases", type=int, default=0, help="limit the number of parity cases (0: all)")
    args = parser.parse_args()
    variants = args.variants.split(",")

    import onnx
    import onnxruntime as ort
    import torch

    from sadtalker_rt.build.export import int8
    from sadtalker_rt.build.export.onnx_export import trace_to_onnx
    from sadtalker_rt.models.checkpoints import WeightSource
    from sadtalker_rt.runtime.pipeline import TalkingHead

    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"command": shlex.join(["python", "benchmarks/cpu_reduced_precision.py"] + sys.argv[1:]),
              "weights": "synthetic (seed 0): deterministic random weights with the official shapes",
              "torch": torch.__version__, "onnxruntime": ort.__version__, "threads": 2,
              "load_average_start": cv.load_average(), "variants": {}}
    started = time.perf_counter()

    if "bf16_probe" in variants:
        report["bf16_probe"] = bf16_probe(args.rounds)
        print("bf16 probe", json.dumps(report["bf16_probe"]["timing"]["runs"]), flush=True)

    weights = WeightSource(args.checkpoints, None if args.checkpoints else 0, size=256)
    report["weights"] = report["weights"] if weights.synthetic else weights.describe()
    head = TalkingHead.from_weights(weights, size=256)
    renderer = head.backend.runner("renderer").module
    generator = renderer.renderer.generator

    photos = sorted(p for p in args.assets.iterdir() if p.suffix in (".png", ".jpg"))
    speeches = sorted(p for p in args.assets.iterdir() if p.suffix == ".wav")
    cases = cv.renderer_cases(head, photos, speeches)
    if args.cases:              # spread over the photos and speech files
        cases = [cases[round(i * (len(cases) - 1) / max(args.cases - 1, 1))] for i in range(args.cases)]
    bundled = ROOT / "sadtalker_rt" / "assets"
    frames = [int(f) for f in args.calibration_frames.split(",")]
    calibration = [c.feeds for f in frames
                   for c in cv.renderer_cases(head, [bundled / "astronaut.jpg"], [bundled / "speech.wav"], frame=f)]
    report["cases"] = [c.name for c in cases]
    report["calibration"] = (f"bundled astronaut.jpg with speech.wav, frames {args.calibration_frames} "
                             "(not among the parity cases)")
    print(f"{len(cases)} cases, {len(calibration)} calibration inputs", flush=True)

    def torch_render(feeds):
        with torch.inference_mode():
            return renderer(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()

    references = [torch_render(c.feeds) for c in cases]
    print("fp32 references done", round(time.perf_counter() - started), "s", flush=True)

    stage = STAGES["renderer"]
    fp32_path = args.work / "renderer-fp32.onnx"
    if not fp32_path.is_file():
        fp32_path.write_bytes(trace_to_onnx(renderer, stage, calibration[0], "native"))

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    sessions = {}
    if "ort_fp32" in variants:
        sessions["ort_fp32"] = (ort.InferenceSession(str(fp32_path), options, providers=["CPUExecutionProvider"]), {})
    all_convs = int8.conv_nodes(onnx.load(str(fp32_path)))
    configs = [("int8_all", [])] if "int8_all" in variants else []
    configs += [(f"int8_{spec.split('=')[0]}", spec.split("=", 1)[1]) for spec in args.islands]
    for name, kept in configs:
        path = args.work / f"renderer-{name}.onnx"
        if isinstance(kept, str) and kept.startswith("~"):     # quantize only the convs matching this regex
            islands = [n for n in all_convs if not re.search(kept[1:], n)]
            kept = [f"every conv not matching {kept[1:]}"]
        else:
            kept = kept.split("+") if isinstance(kept, str) else kept
            islands = [n for n in all_convs if int8.conv_group(n) in kept]
        info = int8.quantize_renderer(fp32_path, path, calibration, islands)
        info["fp32_groups"] = kept
        sessions[name] = (ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), info)

    for name, (session, info) in sessions.items():
        rows = [cv.case_parity(c, session.run(["frames"], c.feeds)[0], ref)
                for c, ref in zip(cases, references)]
        verdict = cv.gate(rows)
        report["variants"][name] = {"quantization": info, "parity": [r.__dict__ for r in rows],
                                    "verdict": verdict.as_dict()}
        print(name, json.dumps(verdict.worst), "PASS" if verdict.passed else "FAIL", flush=True)

    if args.rounds == 0:
        args.json.write_text(json.dumps(report, indent=2))
        return
    # Speed: the official loop (whole generator, source re-encoded) against each variant, batch 1, interleaved.
    case = cases[0]
    image = torch.from_numpy(np.ascontiguousarray(_source_image(head, photos[0])))
    kp_s, kp_d = torch.from_numpy(case.feeds["kp_source"]), torch.from_numpy(case.feeds["kp_driving"])

    def official():
        with torch.inference_mode():
            generator(image, kp_s, kp_d)

    runs = {"official": official, "torch_fp32_cached_source": lambda: torch_render(case.feeds)}
    for name, (session, _) in sessions.items():
        runs[name] = (lambda s: lambda: s.run(["frames"], case.feeds))(session)
    runs = {name: run for name, run in runs.items() if name in args.time.split(",")}
    for run in runs.values():
        run()
    report["renderer_timing"] = cv.interleaved(runs, args.rounds, "official")
    report["renderer_timing"]["what"] = "one 256 frame per call (batch 1); official = whole generator per frame"
    for name, row in report["renderer_timing"]["runs"].items():
        print(name, row, flush=True)
    report["load_average_end"] = cv.load_average()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    args.json.with_suffix(".md").write_text(markdown(report))


def markdown(report: dict) -> str:
    """The JSON report as tables: parity per variant against the gates, then the interleaved renderer timing."""
    lines = ["# Reduced-precision CPU renderer variants (256, 2 threads)", "",
             f"Command: `{report['command']}`", "",
             f"Weights: {report['weights']}; torch {report['torch']}, onnxruntime {report['onnxruntime']}. "
             f"Load average (1, 5, 15 min) at the start {report['load_average_start']}, at the end "
             f"{report.get('load_average_end')}. Calibration: {report.get('calibration', '-')}.", "",
             "Gates on every case (photo + speech of the shared assets) against the FP32 torch renderer: frame PSNR "
             f">= {cv.FRAME_PSNR_DB:g} dB, mouth PSNR >= {cv.MOUTH_PSNR_DB:g} dB, keypoints <= {cv.KP_MAX_ABS:g}, "
             f"head pose <= {cv.HEAD_POSE_DEG:g} deg.", "",
             "| variant | FP32 convs kept | worst frame PSNR dB | worst mouth PSNR dB | verdict |", "|---|---|---:|---:|---|"]
    for name, row in report["variants"].items():
        worst, verdict = row["verdict"]["worst"], row["verdict"]
        kept = row["quantization"].get("fp32_groups", "-") if row["quantization"] else "-"
        convs = row["quantization"].get("fp32_convs") if row["quantization"] else None
        kept = (f"{len(convs)} of {row['quantization']['convs']}: " if convs is not None else "") + (
            ", ".join(kept) if isinstance(kept, list) and kept else "-")
        lines.append(f"| {name} | {kept} | "
                     f"{worst.get('frame_psnr_db', float('nan')):.1f} | {worst.get('mouth_psnr_db', float('nan')):.1f} | "
                     f"{'pass' if verdict['passed'] else 'FAIL: ' + '; '.join(verdict['failures'][:3])} |")
    timing = report.get("renderer_timing")
    if timing:
        lines += ["", f"Renderer speed, {timing['what']}; {timing['rounds']} interleaved rounds; speed-up = official "
                      "time / variant time within each round: median (min-max). Load average per round: "
                      f"{timing['load_average_per_round']}.", "",
                  "| run | median s/frame | speed-up vs official | min | max |", "|---|---:|---:|---:|---:|"]
        for name, row in timing["runs"].items():
            lines.append(f"| {name} | {row['median_s']:.2f} | {row['speedup_median']:.2f}x | {row['speedup_min']:.2f}x "
                         f"| {row['speedup_max']:.2f}x |")
    probe = report.get("bf16_probe")
    if probe:
        runs = probe["timing"]["runs"]
        lines += ["", f"BF16 probe (one 64-channel 3x3 conv at 64x64, torch autocast; CPU capability "
                      f"{probe['cpu_capability']}): FP32 {runs['fp32']['median_s'] * 1e3:.0f} ms, BF16 "
                      f"{runs['bf16_autocast']['median_s'] * 1e3:.0f} ms ({runs['bf16_autocast']['speedup_median']:.3f}x)."]
    return "\n".join(lines) + "\n"


def _source_image(head, photo: Path) -> np.ndarray:
    from sadtalker_rt.runtime.pipeline import _chw

    return _chw(head.prepare_avatar(str(photo)).source_frame)


if __name__ == "__main__":
    main()
