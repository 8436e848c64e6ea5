"""bench-enhancer's FP16 row: timed on the graphs as onnxruntime runs them, judged on the same graphs with
float16 storage emulated (onnxruntime's CPU provider computes float16 nodes in float32 and would hide the
rounding), as export validation judges them. Tiny graphs with the stage table's names stand in for GFPGAN."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_enhancer_engines import HostNetworks, _graph, _noise_maps
from sadtalker_rt.runtime.enhancer import FIXED_NOISE_FILE, FaceEnhancer
from sadtalker_rt.runtime.manifest import FORMAT, MANIFEST, sha256_of


def fp16_enhancer_graphs(directory: Path) -> Path:
    """A graph folder whose enhancer graph computes in float16 (the parsing graph stays float32)."""
    import onnx

    from sadtalker_rt.build.export.mixed_precision import convert_to_mixed_precision

    directory.mkdir()
    fp32 = onnx.load(str(_graph("enhancer", directory / "fp32.onnx", lift=64.0)))     # float16 steps of 1/16 there
    onnx.save(convert_to_mixed_precision(fp32, set()), str(directory / "enhancer.onnx"))
    _graph("face_parse", directory / "face_parse.onnx")
    np.savez(directory / FIXED_NOISE_FILE, **_noise_maps())
    stages = {name: {"file": f"{name}.onnx", "sha256": sha256_of(directory / f"{name}.onnx"), "precision": precision}
              for name, precision in (("enhancer", "fp16"), ("face_parse", "fp32"))}
    stages["enhancer"]["fixed_noise"] = {"file": FIXED_NOISE_FILE, "sha256": sha256_of(directory / FIXED_NOISE_FILE)}
    (directory / MANIFEST).write_text(json.dumps({"format": FORMAT, "size": 256, "precision": "fp16",
                                                  "stages": stages}))
    return directory


def test_the_fp16_row_is_judged_with_fp16_storage_emulated(tmp_path, assets_dir, monkeypatch):
    from sadtalker_rt.bench import enhancer as bench
    from sadtalker_rt.runtime.backends import open_backend
    from sadtalker_rt.runtime.enhancer import enhancer_on_graphs

    folder = fp16_enhancer_graphs(tmp_path / "graphs")
    candidates = {bench.OFFICIAL: FaceEnhancer(HostNetworks(), list(_noise_maps().values())),
                  "onnxruntime-fp16": enhancer_on_graphs(open_backend("onnxruntime", engines=folder))}
    monkeypatch.setattr(bench, "_candidates", lambda config: candidates)
    weights = type("Weights", (), {"describe": lambda self: "stand-in networks"})()
    config = bench.EnhancerBenchConfig(enhancer_weights=weights, photo=assets_dir / "art_0.png", rounds=1)
    report = bench.run_enhancer_bench(config, log=lambda line: None)
    official, fp16 = report["rows"]
    assert official["precision"] == "fp32" and official["face_psnr_db_vs_official"] is None
    assert fp16["precision"] == "fp16" and fp16["parity_method"].startswith("FP16 storage emulated")
    emulated, as_run = fp16["face_psnr_db_vs_official"], fp16["face_psnr_db_as_run_on_cpu"]
    assert np.isfinite(emulated) and np.isfinite(as_run) and emulated != pytest.approx(as_run, abs=1e-9)
    assert "(FP16 storage emulated)" in bench.to_markdown(report)
