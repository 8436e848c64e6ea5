"""Export to ONNX, validate, and run the whole pipeline on onnxruntime without torch."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sadtalker_rt.models.checkpoints import WeightSource
from sadtalker_rt.errors import WeightsError
from sadtalker_rt.runtime.pipeline import Options, TalkingHead
from sadtalker_rt.stages import ORDER, STAGES


@pytest.fixture(scope="module")
def heads(fp32_graphs):
    return (TalkingHead.from_weights(WeightSource(synthetic_seed=0)),
            TalkingHead.from_engines(fp32_graphs, backend="onnxruntime"))


def test_manifest_describes_every_stage_with_parity(fp32_graphs):
    manifest = json.loads((fp32_graphs / "manifest.json").read_text())
    assert set(manifest["stages"]) == set(ORDER)
    assert manifest["opset"] == 20 and manifest["weights"]["synthetic"]
    for name, entry in manifest["stages"].items():
        assert [t["name"] for t in entry["inputs"]] == [t.name for t in STAGES[name].inputs]
        assert len(entry["sha256"]) == 64 and entry["weights_sha256"]
        assert entry["parity"] and all(row["max_rel"] <= 1e-4 and row["passed"] for row in entry["parity"])
        if STAGES[name].dynamic:      # validated at a second shape too
            assert {row["shape"].split("(")[0] for row in entry["parity"]} == {"trace", "check"}


def test_onnxruntime_matches_torch_end_to_end(heads, assets_dir):
    torch_head, ort_head = heads
    wav = np.random.default_rng(0).normal(0, 0.1, 3 * 640).astype(np.float32)
    a = torch_head.prepare_avatar(assets_dir / "happy.png", "crop")
    b = ort_head.prepare_avatar(assets_dir / "happy.png", "crop")
    np.testing.assert_allclose(b.source_coeffs, a.source_coeffs, rtol=0, atol=1e-4)
    for name in a.features:
        np.testing.assert_allclose(b.features[name], a.features[name], rtol=0, atol=1e-4)
    options = Options(seed=5, batch_size=2)
    motion_a, motion_b = torch_head.motion(a, wav, options), ort_head.motion(b, wav, options)
    np.testing.assert_allclose(motion_b.coeffs, motion_a.coeffs, rtol=0, atol=1e-4)
    frames_a = [f.image for f in torch_head.render(a, motion_a, options)]
    frames_b = [f.image for f in ort_head.render(b, motion_a, options)]
    assert len(frames_a) == len(frames_b) == 3
    # uint8 frames may round differently where float frames differ by ~1e-6; one grey level at most.
    assert max(np.abs(x.astype(int) - y).max() for x, y in zip(frames_a, frames_b)) <= 1
    kp = a.features["kp_source"].repeat(2, axis=0)
    feeds = {k: a.features[k] for k in ("feature_3d", "source_compressed", "kp_source")}
    float_a = torch_head.infer("renderer", kp_driving=kp, **feeds)["frames"]
    float_b = ort_head.infer("renderer", kp_driving=kp, **feeds)["frames"]
    assert np.abs(float_a - float_b).max() <= 1e-3


def test_onnxruntime_path_never_imports_torch(fp32_graphs, assets_dir):
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from sadtalker_rt.runtime.pipeline import TalkingHead
        head = TalkingHead.from_engines({str(fp32_graphs)!r}, backend="onnxruntime")
        avatar = head.prepare_avatar({str(assets_dir / "happy.png")!r}, "crop")
        frames = list(head.generate(avatar, np.zeros(2 * 640, np.float32)))
        assert len(frames) == 2, len(frames)
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_changed_graph_is_refused(fp32_graphs, tmp_path):
    import shutil

    copy = tmp_path / "graphs"
    shutil.copytree(fp32_graphs, copy)
    with open(copy / "mapping.onnx", "ab") as handle:
        handle.write(b"\0")
    head = TalkingHead.from_engines(copy, backend="onnxruntime")
    with pytest.raises(WeightsError, match="sha256"):
        head.backend.runner("mapping")


def test_foreign_directory_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="manifest.json"):
        TalkingHead.from_engines(tmp_path, backend="onnxruntime")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(WeightsError, match="format"):
        TalkingHead.from_engines(tmp_path, backend="onnxruntime")


@pytest.mark.heavy
def test_fp16_renderer_reaches_40_db_on_example_photos(tmp_path, assets_dir):
    """The FP16 graph with its FP32 islands, FP16 storage emulated, against float32 PyTorch."""
    from sadtalker_rt.command_inputs import source_image
    from sadtalker_rt.build.export.onnx_export import export_graphs

    for photo in ("happy.png", "art_0.png"):
        manifest = export_graphs(WeightSource(synthetic_seed=0), 256, tmp_path / photo, precision="fp16",
                                 stages=("kp_detector", "source_encoder", "mapping", "renderer"),
                                 source_image=source_image(assets_dir / photo, 256))
        rows = [r for r in manifest["stages"]["renderer"]["parity"] if r["output"] == "frames"]
        assert rows and min(r["psnr_db"] for r in rows) >= 40.0
        assert manifest["stages"]["renderer"]["fp32_islands"]
