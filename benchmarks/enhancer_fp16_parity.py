"""FP16 enhancer graph against float32 PyTorch on each example photo's aligned face (batch 1, seeded noise),
FP16 storage emulated on CPU as the export validates it. For a graph already exported with
``sadtalker-rt export --synthetic-weights --precision fp16 --enhancer gfpgan`` (its own validation uses the
calibration faces; this one goes over every example photo):

    python benchmarks/enhancer_fp16_parity.py GRAPHS_DIR/enhancer.onnx --json results/cpu-enhancer-fp16-parity.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sadtalker_rt.build.export.enhancer_inputs import aligned_faces  # noqa: E402
from sadtalker_rt.build.export.onnx_export import run_onnx, run_torch  # noqa: E402
from sadtalker_rt.models.enhancer_weights import EnhancerWeights  # noqa: E402
from sadtalker_rt.models.stage_modules import stage_module  # noqa: E402
from sadtalker_rt.parity import judge  # noqa: E402
from sadtalker_rt.stages import ENHANCER_NOISE_SIDES, STAGES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graph", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    stage = STAGES["enhancer"]
    module = stage_module("enhancer", EnhancerWeights(synthetic_seed=0).build)
    model = args.graph.read_bytes()
    shared = Path(os.environ.get("SADTALKER_RT_SHARED", ROOT.parent / "shared")) / "assets"
    photos = sorted(shared.glob("*.png"))
    faces = aligned_faces(photos)
    rng = np.random.default_rng(0)
    rows = []
    for i, photo in enumerate(photos):
        start = time.perf_counter()
        feeds = {"face": faces[i:i + 1], **{f"noise{k}": rng.standard_normal((1, 1, s, s)).astype(np.float32)
                                            for k, s in enumerate(ENHANCER_NOISE_SIDES)}}
        ref = run_torch(module, stage, feeds)
        ours = run_onnx(model, stage, feeds, emulate_fp16=True)
        verdict = judge("image", ours["image"], ref["image"], stage.tolerance("fp16", "image"))
        row = {"method": "fp16 storage emulated on CPU", "psnr_db": verdict.value, "passed": verdict.passed,
               "photo": photo.name, "max_abs": verdict.max_abs, "seconds": round(time.perf_counter() - start, 1)}
        print(row, flush=True)
        rows.append(row)
    report = {"command": "python benchmarks/enhancer_fp16_parity.py " + " ".join(sys.argv[1:]),
              "weights": "synthetic enhancer weights (seed 0)", "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
