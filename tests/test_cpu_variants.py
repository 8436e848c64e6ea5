"""The gates that decide whether a reduced-precision CPU variant may become a default, the interleaved timer,
and the INT8 quantizer on a small conv graph (does it quantize, does it keep the islands it is told to)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sadtalker_rt.bench import cpu_variants as cv
from sadtalker_rt.build.export import int8


def case(name="p+s", frame=45.0, mouth=42.0, kp=0.0, pose=0.0):
    return cv.CaseParity(name, frame, mouth, kp, pose)


def test_every_case_must_clear_every_gate():
    assert cv.gate([case(), case("q+s", frame=40.0, mouth=38.0, kp=5e-3, pose=0.5)]).passed
    verdict = cv.gate([case(), case("q+s", frame=39.9)])
    assert not verdict.passed and verdict.failures == ["q+s: frame PSNR dB 39.9 < 40"]
    assert verdict.worst["frame_psnr_db"] == 39.9


@pytest.mark.parametrize("bad, what", [(dict(mouth=37.9), "mouth PSNR"), (dict(kp=6e-3), "keypoint"),
                                       (dict(pose=0.6), "head pose"), (dict(frame=math.nan), "frame PSNR")])
def test_each_gate_fails_on_its_own(bad, what):
    verdict = cv.gate([case(**bad)])
    assert not verdict.passed and len(verdict.failures) == 1 and what in verdict.failures[0]


def test_no_cases_is_not_a_pass():
    assert not cv.gate([]).passed


def test_mouth_gate_catches_a_wrong_mouth_that_whole_frame_psnr_hides():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 1, (1, 3, 64, 64))
    ours = ref.copy()
    ours[..., 40:56, 20:44] = np.clip(ours[..., 40:56, 20:44] + 0.05, 0, 1)     # a changed mouth only
    c = cv.RendererCase("p+s", {}, [20, 40, 44, 56], np.zeros((1, 15, 3)), np.zeros((1, 15, 3)))
    parity = cv.case_parity(c, ours, ref)
    assert parity.frame_psnr_db > 35.0 and parity.mouth_psnr_db < 27.0
    assert not cv.gate([parity]).passed


def test_interleaved_reports_per_round_ratios_against_the_baseline():
    now = [0.0]
    cost = {"slow": [4.0, 6.0], "fast": [2.0, 1.0]}            # seconds per round; the load changes between rounds
    calls = {"slow": 0, "fast": 0}

    def runner(name):
        def run():
            now[0] += cost[name][calls[name]]
            calls[name] += 1
        return run

    result = cv.interleaved({"slow": runner("slow"), "fast": runner("fast")}, 2, "slow", clock=lambda: now[0])
    fast = result["runs"]["fast"]
    assert result["runs"]["slow"]["speedup_median"] == 1.0
    assert (fast["speedup_min"], fast["speedup_max"], fast["speedup_median"]) == (2.0, 6.0, 4.0)
    assert fast["seconds"] == [2.0, 1.0] and len(result["load_average_per_round"]) == 3


def test_int8_quantizes_convs_and_keeps_the_islands(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 8, 3, padding=1)).eval()
    x = torch.rand(1, 8, 16, 16)
    fp32 = tmp_path / "net.onnx"
    torch.onnx.export(net, (x,), str(fp32), input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
    convs = int8.conv_nodes(onnx.load(str(fp32)))
    assert len(convs) == 2
    info = int8.quantize_renderer(fp32, tmp_path / "q.onnx", [{"x": x.numpy()}], fp32_convs=[convs[1]])
    assert info["fp32_convs"] == [convs[1]] and info["convs"] == 2
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    # the first conv reads a dequantized int8 weight, the kept one its float weight directly
    weight_inputs = {n.name: n.input[1] for n in quantized.graph.node if n.op_type == "Conv"}
    producers = {out: n.op_type for n in quantized.graph.node for out in n.output}
    assert producers.get(weight_inputs[convs[0]]) == "DequantizeLinear"
    assert producers.get(weight_inputs[convs[1]]) != "DequantizeLinear"
    y = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    with torch.inference_mode():
        ref = net(x).numpy()
    assert np.abs(y[0] - ref).max() < 0.1 * np.abs(ref).max()


def test_conv_groups_follow_the_generator_modules():
    assert int8.conv_group("/renderer/generator/decoder/G_middle_3/norm_0/mlp_gamma/Conv") == "decoder.G_middle_3"
    assert int8.conv_group("/renderer/generator/decoder/fc/Conv") == "decoder.fc"
    assert int8.conv_group("/renderer/generator/dense_motion_network/hourglass/x/Conv") == "dense_motion"
    assert int8.conv_group("/renderer/generator/third/conv/Conv") == "encoder"

