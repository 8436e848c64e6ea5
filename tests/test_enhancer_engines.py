"""The enhancer's stages on TensorRT, on CPU through the stand-ins of test_engines (TensorRT and CUDA are absent
here): engine parity judged as export judges faces and class maps, engine folders that carry the fixed decoder
noise, the TensorRT backend running the enhancer stages by name, and ``run --backend tensorrt --enhancer``
choosing its engines."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from test_engines import PLATFORM, FakeCuda, StandInBuilder, export_dir, install_fake_tensorrt
from sadtalker_rt.build import polygraphy_check
from sadtalker_rt.build.tensorrt import run_builds
from sadtalker_rt.errors import UsageError, WeightsError
from sadtalker_rt.runtime.engine_plan import ENGINES_JSON, profile_shapes
from sadtalker_rt.runtime.enhancer import FIXED_NOISE_FILE, FaceEnhancer, enhancer_on_graphs
from sadtalker_rt.runtime.manifest import MANIFEST, sha256_of
from sadtalker_rt.stages import ENHANCER_FACE, ENHANCER_NOISE_SIDES, STAGES

FACE = ENHANCER_FACE


# -- engine parity: faces by PSNR in FP16, class maps by agreement, as export validation judges them -----------
def _graph(stage: str, path: Path, outliers: int = 0, offset: float = 0.0, flips: int = 0, lift: float = 0.0) -> Path:
    """A graph with the stage's names: ``enhancer`` scales the face (plus ``offset`` everywhere and 0.08 at
    ``outliers`` pixels: an engine's FP16 rounding; ``lift`` added and taken away again, exact in float32 and
    coarse in float16), ``face_parse`` takes the argmax of a 1x1 convolution (with ``flips`` pixels' classes
    changed: near-ties that fell the other way)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = STAGES[stage]

    def io(tensor):
        elem = TensorProto.INT64 if tensor.dtype == "int64" else TensorProto.FLOAT
        return helper.make_tensor_value_info(tensor.name, elem, ["batch" if d == "batch" else d for d in tensor.shape])

    if stage == "enhancer":
        delta = np.full((1, 3, FACE, FACE), offset, np.float32)
        delta.reshape(-1)[np.linspace(0, delta.size - 1, outliers).astype(int) if outliers else []] += 0.08
        nodes = [helper.make_node("Mul", ["face", "half"], ["scaled"]), helper.make_node("Add", ["scaled", "lift"], ["up"]),
                 helper.make_node("Sub", ["up", "lift"], ["down"]), helper.make_node("Add", ["down", "delta"], ["image"])]
        inits = [numpy_helper.from_array(np.float32(0.5).reshape(()), "half"), numpy_helper.from_array(delta, "delta"),
                 numpy_helper.from_array(np.float32(lift).reshape(()), "lift")]
    else:
        weights = np.random.default_rng(0).standard_normal((19, 3, 1, 1)).astype(np.float32)
        change = np.zeros((1, FACE, FACE), np.int64)
        change.reshape(-1)[np.linspace(0, change.size - 1, flips).astype(int) if flips else []] = 1
        nodes = [helper.make_node("Conv", ["face", "w"], ["logits"]),
                 helper.make_node("ArgMax", ["logits"], ["best"], axis=1, keepdims=0),
                 helper.make_node("Add", ["best", "change"], ["parse"])]
        inits = [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(change, "change")]
    graph = helper.make_graph(nodes, stage, [io(t) for t in table.inputs], [io(t) for t in table.outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("stage, precision, engine, passes", [
    ("face_parse", "fp32", dict(flips=20), True),       # 20 of 262k class pixels flipped in each face: 0.008 %
    ("face_parse", "fp32", dict(flips=1000), False),    # 0.38 %
    ("face_parse", "fp16", dict(flips=1000), True),     # within the FP16 class bound (0.5 %)
    ("enhancer", "fp16", dict(outliers=50), True),      # a few pixels 0.08 off: max_rel 8e-2, PSNR far above 40 dB
    ("enhancer", "fp16", dict(offset=0.1), False),      # 0.05 on [0, 1] everywhere: 26 dB
    ("enhancer", "fp32", dict(outliers=50), False),     # FP32 keeps the relative bound
])
def test_engine_parity_judges_faces_and_class_maps_as_export_does(tmp_path, stage, precision, engine, passes):
    graph = _graph(stage, tmp_path / f"{stage}.onnx")
    stand_in = polygraphy_check.onnxruntime_runner(_graph(stage, tmp_path / "engine.onnx", **engine), name="engine")
    shapes = profile_shapes(STAGES[stage], 256)
    comparisons, passed = polygraphy_check.engine_parity(stage, precision, graph, stand_in, shapes)
    assert passed is passes, [c.as_dict() for c in comparisons]


# -- engine folders: the fixed noise travels with the engines ------------------------------------------------
def _noise_maps(value: float = 0.25) -> dict[str, np.ndarray]:
    return {f"noise{i}": np.full((1, 1, s, s), value + i, np.float32) for i, s in enumerate(ENHANCER_NOISE_SIDES)}


def enhancer_exports(directory: Path) -> Path:
    """A graph folder with the enhancer stages (stand-in graph bytes) and the fixed noise beside them."""
    onnx_dir = export_dir(directory, {"enhancer": b"e", "face_parse": b"p"})
    np.savez(onnx_dir / FIXED_NOISE_FILE, **_noise_maps())
    manifest = json.loads((onnx_dir / MANIFEST).read_text())
    manifest["stages"]["enhancer"]["fixed_noise"] = {"file": FIXED_NOISE_FILE,
                                                     "sha256": sha256_of(onnx_dir / FIXED_NOISE_FILE)}
    (onnx_dir / MANIFEST).write_text(json.dumps(manifest))
    return onnx_dir


def build(onnx_dir: Path, out: Path) -> dict:
    manifest = json.loads((onnx_dir / MANIFEST).read_text())
    return run_builds(manifest, onnx_dir, out, PLATFORM, StandInBuilder()).record


def test_engine_folders_carry_the_fixed_noise(tmp_path):
    onnx_dir, out = enhancer_exports(tmp_path / "onnx"), tmp_path / "engines"
    record = build(onnx_dir, out)
    entry = record["stages"]["enhancer"]
    assert entry["fixed_noise"]["file"] == FIXED_NOISE_FILE and (out / FIXED_NOISE_FILE).is_file()
    assert sha256_of(out / FIXED_NOISE_FILE) == entry["fixed_noise"]["sha256"]
    assert [s[0] for s in entry["profile"]["noise14"]] == list(STAGES["enhancer"].profile)
    assert entry["profile"]["noise14"][2] == [STAGES["enhancer"].profile[2], 1, 512, 512]
    (out / FIXED_NOISE_FILE).unlink()
    assert "fixed_noise" in build(onnx_dir, out)["stages"]["enhancer"] and (out / FIXED_NOISE_FILE).is_file(), \
        "a reused engine gets its noise back"
    (onnx_dir / FIXED_NOISE_FILE).write_bytes(b"changed")
    with pytest.raises(WeightsError, match="does not match the sha256"):
        build(onnx_dir, tmp_path / "other")


# -- the TensorRT backend runs the enhancer stages by name ---------------------------------------------------
def enhancer_math(feeds):
    shift = np.stack([feeds[f"noise{i}"].mean(axis=(1, 2, 3)) for i in (0, 5, 14)], 1)[:, :, None, None]
    return {"image": np.tanh(-0.8 * feeds["face"][:, ::-1] + 0.1 * shift).astype(np.float32)}


def parse_math(feeds):
    face = feeds["face"]
    return {"parse": ((face[:, 0] > face[:, 2]).astype(np.int64) * 5 + (face[:, 1] > 0.3))}


MATH = {"enhancer": enhancer_math, "face_parse": parse_math}


class StageEngine:
    """The name-based engine API for any stage of the table (I/O listed in another order than the table's),
    computing MATH on the fake device's memory."""

    def __init__(self, stage: str, cuda: FakeCuda):
        self.stage, self.cuda = STAGES[stage], cuda
        self.names = [t.name for t in self.stage.inputs][::-1] + [t.name for t in self.stage.outputs]
        self.inputs = {t.name for t in self.stage.inputs}

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name):
        return next(t for t in self.stage.inputs + self.stage.outputs if t.name == name).dtype

    def create_execution_context(self):
        engine, shapes, addresses = self, {}, {}

        def execute(stream):
            dtypes = {n: np.dtype(engine.get_tensor_dtype(n)) for n in engine.names}
            values = {n: engine.cuda.view(addresses[n], s, dtypes[n]).copy() for n, s in shapes.items()}
            for name, value in MATH[engine.stage.name](values).items():
                engine.cuda.view(addresses[name], value.shape, dtypes[name])[...] = value
            return True

        batch = lambda: shapes["face"][0]       # noqa: E731
        return SimpleNamespace(
            set_input_shape=lambda name, shape: shapes.__setitem__(name, tuple(shape)) or True,
            set_tensor_address=lambda name, ptr: addresses.__setitem__(name, ptr) or True,
            get_tensor_shape=lambda name: engine.stage.output(name).resolve(256, batch=batch()),
            execute_async_v3=execute)


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """TensorRTBackend's TensorRT and CUDA replaced by the stand-ins; engines named by the stand-in builder's bytes."""
    return install_fake_tensorrt(monkeypatch, StageEngine)


class HostNetworks:
    """The same math as plain numpy runners: what the engines must reproduce."""

    def runner(self, stage):
        return SimpleNamespace(infer=MATH[stage])


def _frame_and_points():
    yy, xx = np.mgrid[0:200, 0:160]
    frame = np.stack([xx * 1.5, yy, 255 - yy], axis=-1).astype(np.uint8)
    return frame, np.array([[65, 85], [95, 85], [80, 100], [68, 118], [92, 118]], np.float32)


def test_tensorrt_backend_runs_the_enhancer_stages_by_name(tmp_path, fake_tensorrt):
    from sadtalker_rt.runtime.backends import open_backend

    out = tmp_path / "engines"
    build(enhancer_exports(tmp_path / "onnx"), out)
    backend = open_backend("tensorrt", engines=out)
    on_engines = enhancer_on_graphs(backend)
    assert on_engines.parse and on_engines.fixed_noise[14][0, 0, 0, 0] == 14.25
    on_host = FaceEnhancer(HostNetworks(), list(_noise_maps().values()), parse=True)
    frame, points = _frame_and_points()
    for enhancer in (on_engines, on_host):
        enhancer.set_points(points)
    for mode in ("fixed", "seeded"):
        got = on_engines([frame, frame[::-1].copy(), frame], [0, 1, 2], mode, 3)
        expected = on_host([frame, frame[::-1].copy(), frame], [0, 1, 2], mode, 3)
        assert len(got) == 3 and got[0].shape == (400, 320, 3)
        for g, e in zip(got, expected):
            assert np.array_equal(g, e)
    assert backend.runner("face_parse").outputs[0].dtype == np.int64


def test_tensorrt_engines_without_the_enhancer_say_how_to_get_it(tmp_path, fake_tensorrt):
    from sadtalker_rt.runtime.backends import open_backend

    out = tmp_path / "engines"
    build(export_dir(tmp_path / "onnx", {"mapping": b"m"}), out)
    with pytest.raises(WeightsError, match="has no enhancer engine; build the engines from graphs exported with"):
        enhancer_on_graphs(open_backend("tensorrt", engines=out))


# -- run --backend tensorrt --enhancer gfpgan: which engines the enhancer runs on ----------------------------
class Head:
    def __init__(self, backend):
        self.backend, self.enhancer = backend, None


def test_an_engine_folder_with_the_enhancer_serves_it(tmp_path, fake_tensorrt):
    from sadtalker_rt.backend_choice import BackendChoice
    from sadtalker_rt.runtime.backends import open_backend

    out = tmp_path / "engines"
    build(enhancer_exports(tmp_path / "onnx"), out)
    head = Head(open_backend("tensorrt", engines=out))
    choice = BackendChoice("tensorrt", engines=out)
    choice.open_enhancer(head, None)
    assert head.enhancer.backend is head.backend and head.enhancer.fixed_noise is not None
    with pytest.raises(UsageError, match="holds the enhancer's engines; leave out --enhancer-weights"):
        choice.open_enhancer(Head(head.backend), object())


def test_an_engine_folder_without_the_enhancer_needs_its_weights(tmp_path, fake_tensorrt):
    from sadtalker_rt.backend_choice import BackendChoice
    from sadtalker_rt.runtime.backends import open_backend

    out = tmp_path / "engines"
    build(export_dir(tmp_path / "onnx", {"mapping": b"m"}), out)
    with pytest.raises(UsageError, match="has no enhancer engines: give --enhancer-weights"):
        BackendChoice("tensorrt", engines=out).open_enhancer(Head(open_backend("tensorrt", engines=out)), None)


def test_cached_enhancer_engines_are_built_from_the_cached_graphs(tmp_path, fake_tensorrt, monkeypatch):
    """Without --engines: the enhancer's graphs come from the cache in the renderer's precision and their
    engines are built beside the renderer's; the enhancer runs on them with the noise carried over."""
    from sadtalker_rt.backend_choice import BackendChoice
    from sadtalker_rt.build import cache

    onnx_dir, calls = enhancer_exports(tmp_path / "onnx"), []

    def graphs_for(weights, precision, progress=None):
        calls.append(("graphs", weights, precision))
        return onnx_dir

    def engines_for(graphs, progress=None):
        calls.append(("engines", graphs))
        build(graphs, tmp_path / "engines")
        return tmp_path / "engines"

    monkeypatch.setattr(cache, "enhancer_graphs_for", graphs_for)
    monkeypatch.setattr(cache, "engines_for", engines_for)
    renderer = SimpleNamespace(precision="fp16", manifest={"stages": {"renderer": {}}})
    head = Head(renderer)
    BackendChoice("tensorrt").open_enhancer(head, "enhancer weights")
    assert calls == [("graphs", "enhancer weights", "fp16"), ("engines", onnx_dir)]
    assert head.enhancer.backend.name == "tensorrt" and head.enhancer.parse
    assert (tmp_path / "engines" / ENGINES_JSON).is_file() and head.enhancer.fixed_noise[0][0, 0, 0, 0] == 0.25
