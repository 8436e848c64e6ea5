"""FP16 graphs with FP32 islands (sadtalker_rt.build.export.mixed_precision) and the parity statistics (sadtalker_rt.parity).

The graph tests export a tiny torch module with the operations the renderer relies on: conv, instance
norm, a hand-written normalisation, nearest resize, softmax over a 1024-element axis and a 5-D grid sample
whose grid is computed from an input. onnxruntime on x86 CPUs runs most float16 nodes in float32 (it inserts
Casts and drops the pairs between nodes), so float16 numerics are checked with ``emulate_fp16_storage`` and
with onnx's reference evaluator, which computes float16 nodes in float16.
"""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from sadtalker_rt.parity import format_table, judge_outputs, psnr, region_psnr, ssim
from sadtalker_rt.stages import Tolerance

OUTPUTS = ["warped", "prob", "normed"]
LOUD_SCALE = 3e5          # conv weights stay below float16's 65504, its outputs (~2.5e5) do not


# --- graph fixtures ----------------------------------------------------------------------------------------

def _tiny_module(loud: bool):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.InstanceNorm2d(8, affine=True)
            self.to_volume = nn.Conv2d(8, 16, 1)
            self.heat = nn.Conv3d(4, 2, 3, padding=1)

        def forward(self, image, kp):
            x = F.relu(self.norm(self.conv(image)))
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            mean = x.mean(dim=(2, 3), keepdim=True)
            var = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True)
            normed = (x - mean) / torch.sqrt(var + 1e-5)
            volume = self.to_volume(x).view(x.shape[0], 4, 4, 16, 16)
            prob = F.softmax(self.heat(volume).flatten(2), dim=2).view(x.shape[0], 2, 4, 16, 16)
            d, hw = torch.linspace(-1, 1, 4), torch.linspace(-1, 1, 16)
            z, y, x_ = torch.meshgrid(d, hw, hw, indexing="ij")
            grid = torch.stack([x_, y, z], -1).unsqueeze(0) + kp.view(-1, 1, 1, 1, 3) * 0.1
            return F.grid_sample(prob, grid, align_corners=False), prob, normed

    torch.manual_seed(0)
    module = Tiny().eval()
    if loud:
        with torch.no_grad():
            module.conv.weight.mul_(LOUD_SCALE)
    return module


def _export(module):
    import onnx
    import torch

    buffer = io.BytesIO()
    args = (torch.rand(2, 3, 8, 8), torch.rand(2, 3))
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, input_names=["image", "kp"], output_names=OUTPUTS,
                          dynamic_axes={"image": {0: "batch"}, "kp": {0: "batch"}}, opset_version=20, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def _feeds(seed: int, batch: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.random((batch, 3, 8, 8), dtype=np.float32), "kp": rng.random((batch, 3), dtype=np.float32)}


def _run_ort(model, feeds: dict) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUTS, session.run(OUTPUTS, feeds)))


def _run_emulated(mixed, feeds: dict) -> dict:
    import onnxruntime as ort

    from sadtalker_rt.build.export.mixed_precision import emulate_fp16_storage

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(emulate_fp16_storage(mixed).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUTS, session.run(OUTPUTS, feeds)))


def _run_reference(model, feeds: dict) -> dict:
    from onnx.reference import ReferenceEvaluator

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(zip(OUTPUTS, ReferenceEvaluator(model).run(OUTPUTS, feeds)))


@pytest.fixture(scope="module")
def exported():
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from sadtalker_rt.build.export import mixed_precision as mp

    model = _export(_tiny_module(loud=True))
    ranges = mp.measure_activation_ranges(model, [_feeds(1), _feeds(2, batch=3)])
    islands = mp.choose_fp32_islands(model, ranges)
    return model, ranges, islands, mp.convert_to_mixed_precision(model, set(islands))


def _types(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*graph.input, *graph.value_info, *graph.output)}
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


def _within(rtol: float) -> Tolerance:
    return Tolerance("max_rel", rtol, "test bound")


def _nodes(model, op_type: str) -> list:
    return [node for node in model.graph.node if node.op_type == op_type]


# --- mixed precision ---------------------------------------------------------------------------------------

def test_converted_graph_passes_checker_runs_and_matches_fp32(exported):
    import onnx

    model, _, _, mixed = exported
    onnx.checker.check_model(mixed, full_check=True)
    feeds = _feeds(3, batch=4)                      # another batch than calibration: the axis stays dynamic
    ref = _run_ort(model, feeds)
    results = judge_outputs(_run_ort(mixed, feeds), ref, _within(1e-2))
    print("\nonnxruntime CPU\n" + format_table(results))
    assert all(results), format_table(results)
    for label, run in (("onnx reference evaluator (float16 arithmetic)", _run_reference),
                       ("onnxruntime on emulate_fp16_storage", _run_emulated)):
        faithful = judge_outputs(run(mixed, feeds), ref, _within(2e-2))
        print(label + "\n" + format_table(faithful))
        assert all(faithful), format_table(faithful)
        assert min(r.psnr_db for r in faithful if r.psnr_db is not None) > 40.0
        assert max(r.max_rel for r in faithful) > 1e-4               # float16 rounding is really there


def test_policy_ops_and_coordinate_slice_stay_float32(exported):
    from onnx import TensorProto

    from sadtalker_rt.build.export.mixed_precision import coordinate_slice

    model, _, islands, mixed = exported
    grid = _nodes(model, "GridSample")[0].input[1]
    coordinates = coordinate_slice(model, [grid])
    ops = {n.name: n for n in model.graph.node}
    assert sorted(ops[n].op_type for n in coordinates) == ["Add", "Mul", "Reshape"]   # kp -> view -> * 0.1 -> + grid
    assert any(ops[n].input[0] == "kp" for n in coordinates)
    types = _types(mixed)
    by_name = {node.name: node for node in mixed.graph.node}
    checked = [n.name for op in ("GridSample", "InstanceNormalization", "Softmax") for n in _nodes(mixed, op)]
    for name in checked + sorted(coordinates):
        assert name in islands
        node = by_name[name]
        float_inputs = [t for t in node.input if t and types.get(t) in (TensorProto.FLOAT, TensorProto.FLOAT16)]
        assert float_inputs and all(types[t] == TensorProto.FLOAT for t in float_inputs), (name, float_inputs)


def test_normalisation_math_stays_float32(exported):
    model, _, islands, _ = exported
    for op in ("ReduceMean", "Sqrt", "Div"):
        assert any(islands.get(n.name) for n in _nodes(model, op)), op
    assert "statistic" in islands[_nodes(model, "Sqrt")[0].name]


def test_fp16_weights_and_float32_graph_io(exported):
    from onnx import TensorProto

    _, _, _, mixed = exported
    types = _types(mixed)
    for name in ("to_volume.weight", "heat.weight"):
        assert types[name] == TensorProto.FLOAT16
    assert types["conv.weight"] == TensorProto.FLOAT                   # its conv is an island
    assert all(vi.type.tensor_type.elem_type == TensorProto.FLOAT for vi in (*mixed.graph.input, *mixed.graph.output))
    resize = _nodes(mixed, "Resize")[0]
    assert types[resize.input[0]] == TensorProto.FLOAT16
    assert types[resize.input[2]] == TensorProto.FLOAT                 # scales: float32 by the ONNX schema


def test_large_activation_is_an_island_and_needed(exported):
    from sadtalker_rt.build.export.mixed_precision import convert_to_mixed_precision

    model, ranges, islands, mixed = exported
    assert ranges["/conv/Conv_output_0"] > 65504
    assert "reaches max |x|" in islands["/conv/Conv"]
    feeds = _feeds(4)
    ref = _run_ort(model, feeds)
    without = convert_to_mixed_precision(model, set(islands) - {"/conv/Conv"})
    assert all(judge_outputs(_run_ort(without, feeds), ref, _within(2e-2)))     # onnxruntime CPU hides the overflow
    broken = _run_emulated(without, feeds)
    assert not np.isfinite(broken["warped"]).all()                   # float16 overflow, then NaN after the norm
    assert all(judge_outputs(_run_emulated(mixed, feeds), ref, _within(2e-2)))


def test_emulation_refuses_float16_graph_io(exported):
    from sadtalker_rt.build.export.mixed_precision import convert_to_mixed_precision, emulate_fp16_storage

    model, _, islands, _ = exported
    with pytest.raises(ValueError, match="float32 graph inputs"):
        emulate_fp16_storage(convert_to_mixed_precision(model, set(islands), keep_io_types=False))


def test_quiet_model_keeps_conv_in_fp16():
    pytest.importorskip("torch")
    from sadtalker_rt.build.export.mixed_precision import choose_fp32_islands, measure_activation_ranges

    model = _export(_tiny_module(loud=False))
    islands = choose_fp32_islands(model, measure_activation_ranges(model, [_feeds(1)]))
    assert not any(n.name in islands for n in _nodes(model, "Conv"))


def test_islands_summary_is_json_in_graph_order(exported):
    from sadtalker_rt.build.export.mixed_precision import islands_summary

    model, _, islands, _ = exported
    summary = islands_summary(model, islands)
    json.dumps(summary)
    order = [n.name for n in model.graph.node]
    assert [row["node"] for row in summary] == sorted(islands, key=order.index)
    assert {row["op"] for row in summary} >= {"Conv", "GridSample", "InstanceNormalization", "Softmax"}
    assert all(row["reason"] for row in summary)


def test_keep_io_types_false_makes_float16_inputs(exported):
    from onnx import TensorProto

    from sadtalker_rt.build.export.mixed_precision import convert_to_mixed_precision

    model, _, islands, _ = exported
    mixed = convert_to_mixed_precision(model, set(islands), keep_io_types=False)
    assert all(vi.type.tensor_type.elem_type == TensorProto.FLOAT16 for vi in mixed.graph.input)
    feeds = {k: v.astype(np.float16) for k, v in _feeds(5).items()}
    assert all(np.isfinite(v).all() for v in _run_ort(mixed, feeds).values())


def test_unknown_node_names_are_refused(exported):
    from sadtalker_rt.build.export.mixed_precision import convert_to_mixed_precision

    with pytest.raises(ValueError, match="not in the graph"):
        convert_to_mixed_precision(exported[0], {"/no/such/node"})


def _shared_constant_model():
    """x -> Add(w) -> Mul(w) -> y, where w is both an initializer and a Constant node's value (c)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((4,), 0.5, np.float32), "w")
    c = helper.make_node("Constant", [], ["c"], name="c", value=numpy_helper.from_array(np.ones(4, np.float32)))
    nodes = [c, helper.make_node("Add", ["x", "w"], ["a"], name="add"),
             helper.make_node("Add", ["a", "c"], ["b"], name="add_c"),
             helper.make_node("Mul", ["b", "w"], ["m"], name="mul"),
             helper.make_node("Mul", ["m", "c"], ["y"], name="mul_c")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_shared_constants_get_a_float16_copy():
    pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto

    from sadtalker_rt.build.export.mixed_precision import convert_to_mixed_precision

    mixed = convert_to_mixed_precision(_shared_constant_model(), {"mul", "mul_c"})
    inits = {i.name: i.data_type for i in mixed.graph.initializer}
    assert inits["w"] == TensorProto.FLOAT and TensorProto.FLOAT16 in [t for n, t in inits.items() if n != "w"]
    constants = [n for n in mixed.graph.node if n.op_type == "Constant"]
    assert sorted(n.attribute[0].t.data_type for n in constants) == [TensorProto.FLOAT, TensorProto.FLOAT16]
    x = np.arange(4, dtype=np.float32)
    y = ort.InferenceSession(mixed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, (x + 1.5) * 0.5, rtol=1e-3)


def test_calibration_reduces_in_the_graph_to_each_tensors_max(exported):
    """The ranges equal max |x| of every intermediate tensor exposed as an output, while the calibration graph
    itself outputs only scalars (its memory is one inference's, whatever the activations' size)."""
    import onnx
    import onnxruntime as ort

    from sadtalker_rt.build.export.mixed_precision import _index, _reduction_probe

    model, ranges, _, _ = exported
    g = _index(model)
    names = [t for node in g.nodes if node.op_type != "Constant" for t in node.output if g.is_float(t)]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    exposed.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC      # as calibration runs
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    expected = {}
    for feed in (_feeds(1), _feeds(2, batch=3)):
        for name, value in zip(names, session.run(names, feed)):
            expected[name] = max(expected.get(name, 0.0), float(np.abs(value).max()))
    assert len(names) > 20 and {n: ranges[n] for n in names} == expected
    probe, outputs = _reduction_probe(model, names)
    shapes = [o.shape for o in ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
              .get_outputs()]
    assert len(outputs) == 2 * len(names) and all(shape == [] for shape in shapes)


CHAIN_PROBE = """
import resource, sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from sadtalker_rt.build.export.mixed_precision import measure_activation_ranges
nodes, weights, previous = [], [], "x"
for i in range(40):            # 80 activations of 16 MiB each: 1.25 GiB if all were kept
    weights.append(numpy_helper.from_array(np.full((16, 16, 3, 3), 0.02, np.float32), f"w{i}"))
    nodes += [helper.make_node("Conv", [previous, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
    previous = f"r{i}"
io = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 16, 512, 512])
model = helper.make_model(helper.make_graph(nodes, "chain", [io("x")], [io(previous)], weights),
                          opset_imports=[helper.make_opsetid("", 20)])
feed = {"x": np.random.default_rng(0).standard_normal((1, 16, 512, 512)).astype(np.float32)}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ranges = measure_activation_ranges(model, [feed])
assert len(ranges) == 81, len(ranges)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_calibration_memory_is_one_inferences_not_every_activations():
    """The enhancer's FP16 export ran out of memory calibrating: its activations at 512 x 512 were all alive at
    once. Calibrating a chain whose activations add up to 1.25 GiB must stay far below that."""
    out = subprocess.run([sys.executable, "-c", CHAIN_PROBE], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr[-2000:]
    growth_mib = float(out.stdout.split()[-1])
    assert growth_mib < 300, f"calibration grew the peak memory by {growth_mib:.0f} MiB"


def test_measure_flags_non_finite_tensors():
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from sadtalker_rt.build.export.mixed_precision import choose_fp32_islands, measure_activation_ranges

    graph = helper.make_graph([helper.make_node("Log", ["x"], ["l"], name="log"),
                               helper.make_node("Relu", ["l"], ["y"], name="relu")], "log",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    with pytest.warns(UserWarning, match="not finite"):
        ranges = measure_activation_ranges(model, [{"x": np.array([0.0, 1.0, 2.0], np.float32)}])
    assert ranges["l"] == math.inf and ranges["x"] == 2.0
    assert "not finite" in choose_fp32_islands(model, ranges)["log"]


def test_modules_import_without_heavy_dependencies():
    code = ("import sys, sadtalker_rt.parity, sadtalker_rt.build.export.mixed_precision; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- parity ------------------------------------------------------------------------------------------------

def test_judge_outputs_collects_every_failure():
    ref = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32), "c": np.zeros(2, np.float32)}
    ours = {"a": np.zeros((3, 2), np.float32), "b": np.ones(4, np.float32) + 0.5, "extra": np.zeros(1)}
    results = {r.name: r for r in judge_outputs(ours, ref, _within(1e-3))}
    assert set(results) == {"a", "b", "c", "extra"}
    assert not any(results.values())
    assert "shape" in results["a"].problem
    assert "missing" in results["c"].problem
    assert "not a reference output" in results["extra"].problem
    assert results["b"].max_abs == pytest.approx(0.5) and results["b"].max_rel == pytest.approx(0.5)
    table = format_table(list(results.values()))
    assert table.count("✗") == 4 and "✓" not in table


def test_judge_outputs_statistics_and_tolerances():
    ref = {"x": np.linspace(-4, 4, 100, dtype=np.float32), "y": np.zeros(10, np.float32)}
    ours = {"x": ref["x"] + 1e-3, "y": np.full(10, 0.05, np.float32)}
    per_output = {"x": _within(1e-3), "y": Tolerance("max_abs", 0.1, "test bound")}
    results = {r.name: r for r in judge_outputs(ours, ref, per_output.get)}
    x = results["x"]
    assert x.max_rel == pytest.approx(1e-3 / 4, rel=1e-3)          # scaled by max(1, max|ref|) = 4
    assert x.passed and x.metric == "max_rel" and x.limit == 1e-3 and x.value == x.max_rel
    assert x.p99_abs == pytest.approx(1e-3, rel=1e-3) and x.mean_abs == pytest.approx(1e-3, rel=1e-3)
    assert x.psnr_db is None                                        # not an image in [0, 1]
    assert results["y"].passed and results["y"].metric == "max_abs" and results["y"].limit == 0.1
    assert "✓ x" in format_table(list(results.values()))
    ours["x"] = ref["x"] + 1e-2
    (x,) = [r for r in judge_outputs(ours, ref, per_output.get) if r.name == "x"]
    assert not x.passed and x.problem == "relative error 2.50e-03 > 1e-03"


def test_judge_outputs_non_finite_and_image_psnr():
    image = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    noisy = np.where(np.arange(image.size).reshape(image.shape) == 5, np.nan, image)
    results = judge_outputs({"frames": noisy, "same": image}, {"frames": image, "same": image}, _within(1e-4))
    assert not results[0].passed and "non-finite" in results[0].problem
    assert results[1].passed and results[1].psnr_db == math.inf and results[1].max_abs == 0.0
    json.dumps([r.as_dict() for r in results])


def test_psnr_ssim_and_region():
    rng = np.random.default_rng(1)
    image = rng.random((3, 32, 32))
    assert psnr(image, image) == math.inf
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    noisy = np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1)
    assert 20 < psnr(noisy, image) < 30
    assert 0 < ssim(noisy, image) < ssim(np.clip(image + 0.01, 0, 1), image) < 1
    assert psnr(image + 0.1, image) == pytest.approx(20.0)
    mouth = image.copy()
    mouth[:, 20:28, 8:24] += 0.1                                       # (x1, y1, x2, y2) = (8, 20, 24, 28)
    assert region_psnr(mouth, image, (8, 20, 24, 28)) == pytest.approx(20.0)
    assert region_psnr(mouth, image, (0, 0, 8, 8)) == math.inf
    with pytest.raises(ValueError):
        ssim(image[:, :8, :8], image[:, :8, :8])
