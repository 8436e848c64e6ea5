"""Engines and the frame scheduler: profiles, cache keys, rebuild-or-refuse, build bookkeeping, building and
checking through Polygraphy, name binding, stream ordering and buffer reuse. On CPU through fakes of TensorRT and CUDA; the real thing behind the
``gpu`` and ``tensorrt`` markers."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sadtalker_rt.runtime.manifest import FORMAT as ONNX_FORMAT
from sadtalker_rt.runtime.manifest import MANIFEST
from sadtalker_rt.runtime import engine_plan as plan
from sadtalker_rt.build import polygraphy_check
from sadtalker_rt.build.tensorrt import PolygraphyEngineBuilder, polygraphy_loader, run_builds
from sadtalker_rt.errors import SadTalkerError
from sadtalker_rt.parity import judge_outputs
from sadtalker_rt.runtime.engine_plan import (EngineKey, builder_settings, cache_key, check_engine, engine_action,
                                              profile_shapes)
from sadtalker_rt.runtime.scheduler import FramePipeline, SerialExecutor
from sadtalker_rt.errors import EnvironmentProblem, UsageError, WeightsError
from sadtalker_rt.stages import BATCH, FRAMES, STAGES, Tolerance

SIZE = 16                        # tiny render size: frames (B, 3, 16, 16), features (1, C, 16, 4, 4)
INSTALL_HINT = "pip install 'sadtalker-rt[tensorrt]' on a machine with an NVIDIA GPU"
PLATFORM = {"trt_version": "10.8.0.43", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


# -- tiny stand-ins for mapping and renderer: the stage table's names, a few lines of math ----------------------
def mapping_math(kp_canonical, semantics):
    return {"kp": (kp_canonical + semantics[:, :15, :3]).astype(np.float32)}


def renderer_math(feature_3d, source_compressed, kp_source, kp_driving):
    motion = (kp_driving - kp_source).sum(axis=(1, 2)).reshape(-1, 1, 1, 1)       # order matters: a swap shows
    base = source_compressed.reshape(1, 4, 16, SIZE)[:, :3]
    return {"frames": (base + motion + feature_3d.mean()).astype(np.float32)}


MATH = {"mapping": mapping_math, "renderer": renderer_math}


def avatar_features(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda name: rng.standard_normal(STAGES["renderer"].input(name).resolve(SIZE)).astype(np.float32)  # noqa: E731
    return {"kp_canonical": rng.standard_normal((1, 15, 3)).astype(np.float32), "kp_source": f("kp_source"),
            "feature_3d": f("feature_3d"), "source_compressed": f("source_compressed")}


def targets(frames, seed=1):
    return np.random.default_rng(seed).standard_normal((frames, 70, 27)).astype(np.float32)


def plain_loop(infer, features, semantics, batch_size):
    """What pipeline.render did before the scheduler: mapping then renderer, batch after batch."""
    frames = []
    for start in range(0, len(semantics), batch_size):
        kp = infer("mapping", kp_canonical=features["kp_canonical"], semantics=semantics[start:start + batch_size])
        out = infer("renderer", feature_3d=features["feature_3d"], source_compressed=features["source_compressed"],
                    kp_source=features["kp_source"], kp_driving=kp["kp"])
        frames.extend(out["frames"])
    return np.stack(frames) if frames else np.zeros((0, 3, SIZE, SIZE), np.float32)


def collect(pipeline, semantics, expected=None):
    """Run the pipeline; check each frame when it is yielded (a reused buffer would show there) and keep copies."""
    out = []
    for index, frame in pipeline.frames(semantics):
        assert index == len(out), "frames out of order"
        if expected is not None:
            np.testing.assert_allclose(frame, expected[index], rtol=1e-5, atol=1e-5)
        out.append(np.array(frame))
    return np.stack(out) if out else np.zeros((0, 3, SIZE, SIZE), np.float32)


def numpy_infer(stage, **feeds):
    return MATH[stage](**feeds)


# -- plan: profiles, keys, checks -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n, s in STAGES.items() if s.dynamic])
def test_profile_shapes_of_dynamic_stages(name):
    stage = STAGES[name]
    shapes = profile_shapes(stage, 256, max_batch=8, opt_batch=4)
    assert set(shapes) == {t.name for t in stage.inputs}
    for tensor in stage.inputs:
        low, opt, high = shapes[tensor.name]
        axes = tensor.dynamic_axes()
        if not axes:
            assert low == opt == high == tensor.resolve(256)
            continue
        (axis, axis_name), = axes.items()
        expected = (1, 4, 8) if axis_name == BATCH else stage.profile
        assert (low[axis], opt[axis], high[axis]) == expected
        assert low[:axis] + low[axis + 1:] == high[:axis] + high[axis + 1:], "only the dynamic axis varies"
    assert any(FRAMES in t.dynamic_axes().values() or BATCH in t.dynamic_axes().values() for t in stage.inputs)


@pytest.mark.parametrize("name", [n for n, s in STAGES.items() if not s.dynamic])
def test_profile_shapes_of_static_stages_are_fixed(name):
    for low, opt, high in profile_shapes(STAGES[name], 512, max_batch=16, opt_batch=2).values():
        assert low == opt == high


def test_profile_shapes_refuse_opt_above_max():
    with pytest.raises(UsageError, match="opt"):
        profile_shapes(STAGES["renderer"], 256, max_batch=2, opt_batch=4)


def _key(**change):
    fields = dict(graph_sha256="a" * 64, stage="renderer", precision="fp16",
                  profile=profile_shapes(STAGES["renderer"], 256, 8, 4), **PLATFORM)
    fields.update(change)
    return EngineKey(**fields)


CHANGES = {
    "graph_sha256": "b" * 64, "stage": "mapping", "precision": "fp32",
    "profile": profile_shapes(STAGES["renderer"], 256, 16, 4), "trt_version": "10.9.0.34",
    "gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "builder": builder_settings(8.0),
}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_cache_key_changes_with_each_field(name):
    assert _key().digest() != _key(**{name: CHANGES[name]}).digest()


def test_cache_key_is_stable_and_canonical():
    shapes = profile_shapes(STAGES["renderer"], 256, 8, 4)
    shuffled = {name: [list(s) for s in shapes[name]] for name in reversed(list(shapes))}   # other order, lists
    assert _key().digest() == _key().digest() == _key(profile=shuffled).digest()
    assert _key().digest() == cache_key("a" * 64, "renderer", "fp16", shapes, **PLATFORM)
    record = plan.engine_record(_key(), "renderer.engine", "0" * 64)
    assert json.loads(json.dumps(record)) == record and record["key"] == _key().digest()


REASONS = {
    "graph_sha256": "ONNX graph changed", "stage": "engine of stage renderer, not mapping",
    "precision": "fp16 graph and the graph now is fp32", "profile": "kp_driving max (8, 15, 3) then, (16, 15, 3) now",
    "trt_version": "built with TensorRT 10.8.0.43 and this is TensorRT 10.9.0.34",
    "gpu_name": "built for NVIDIA H100 80GB HBM3 (compute capability 9.0) and this GPU is NVIDIA A100",
    "compute_capability": "compute capability 9.0) and this GPU is NVIDIA H100 80GB HBM3 (8.0)",
    "builder": "builder settings differ (workspace_gib 4.0 then, 8.0 now)",
}


@pytest.mark.parametrize("name", sorted(REASONS))
def test_check_engine_says_why(name):
    record = plan.engine_record(_key(), "renderer.engine", "0" * 64)
    assert check_engine(record, _key()) is None
    assert REASONS[name] in check_engine(record, _key(**{name: CHANGES[name]}))


def test_runtime_checks_only_the_platform():
    record = plan.engine_record(_key(), "renderer.engine", "0" * 64)
    assert check_engine(record, PLATFORM) is None
    assert "TensorRT 11.4.0" in check_engine(record, {**PLATFORM, "trt_version": "11.4.0"})


def test_build_rebuilds_what_the_runtime_refuses(tmp_path):
    data = b"engine bytes"
    (tmp_path / "renderer.engine").write_bytes(data)
    record = plan.engine_record(_key(), "renderer.engine", hashlib.sha256(data).hexdigest())
    assert engine_action(record, _key(), tmp_path, building=False) == ("reuse", None)
    other = {**PLATFORM, "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}
    build = engine_action(record, other, tmp_path, building=True)
    refuse = engine_action(record, other, tmp_path, building=False)
    assert build[0] == "build" and refuse[0] == "refuse" and build[1] == refuse[1]
    sentence = plan.refusal("renderer", "engines", refuse[1])
    assert sentence.startswith("The renderer engine in engines cannot run here: it was built for NVIDIA H100")
    assert "NVIDIA L4" in sentence and sentence.endswith("`sadtalker-rt build ONNX_DIR -o engines`.")
    (tmp_path / "renderer.engine").write_bytes(b"damaged")
    assert "does not match the sha256" in engine_action(record, _key(), tmp_path, building=False)[1]
    (tmp_path / "renderer.engine").unlink()
    assert "missing" in engine_action(record, _key(), tmp_path, building=True)[1]
    assert engine_action(None, _key(), tmp_path, building=False) == ("refuse", "there is no engine for it yet")


@pytest.mark.parametrize("version, choice", [("10.8.0.43", "decomposed"), ("10.13.3", "decomposed"),
                                             ("11.1.0", "decomposed"), ("11.2.0", "native"), ("11.4.0.106", "native"),
                                             ("12.0", "native")])
def test_grid_sample_choice(version, choice):
    assert plan.grid_sample_choice(version) == choice
    plan.check_grid_sample("decomposed", version)           # decomposed builds everywhere


@pytest.mark.parametrize("version", ["10.8.0", "11.1.2"])
def test_native_export_refused_before_11_2(version):
    with pytest.raises(WeightsError) as err:
        plan.check_grid_sample("native", version, "export")
    message = str(err.value)
    assert f"TensorRT {version}" in message
    assert "re-export with `sadtalker-rt export --grid-sample decomposed`" in message
    assert message.count(". ") == 0 and message.endswith(".")
    plan.check_grid_sample("native", "11.2.0", "export")


def test_shape_problem_names_the_input_and_the_fix():
    record = plan.engine_record(_key(), "renderer.engine", "0" * 64)
    assert plan.shape_problem("renderer", record, "kp_driving", (8, 15, 3)) is None
    problem = plan.shape_problem("renderer", record, "kp_driving", (12, 15, 3))
    assert "kp_driving" in problem and "(1, 15, 3)..(8, 15, 3)" in problem and "--max-batch" in problem


def test_engine_modules_import_no_heavy_libraries():
    code = ("import sys; import sadtalker_rt.runtime.engine_plan, sadtalker_rt.runtime.scheduler, sadtalker_rt.build.tensorrt, "
            "sadtalker_rt.runtime.cuda, sadtalker_rt.runtime.backends.tensorrt_backend; "
            "print([m for m in ('torch', 'tensorrt', 'onnxruntime', 'cuda', 'onnx') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- the recording executor: deferred, adversarial execution with a happens-before check ----------------------
@dataclass
class Op:
    index: int
    kind: str                   # "mapping", "renderer" or "copy"
    seq: int                    # which batch, in issue order per kind
    stream: int
    waits: list                 # events this op's stream waited on before it was issued
    reads: set
    writes: set
    run: object
    host_seen: set = field(default_factory=set)     # ops the host had synchronized on when this one was issued
    before: set = field(default_factory=set)        # every op that happens before this one


@dataclass(frozen=True)
class Ref:
    buffer: tuple               # (stage, output, slot, shape): what a GPU runner would allocate once


class RecordingExecutor:
    """Issues nothing at once: ops run only when the host synchronizes, the ready op of the stream first in
    ``priority`` first (a GPU that runs one stream far ahead), so a missing wait shows up as wrong frames under
    some priority; ``hazards()`` also checks every buffer access statically."""

    def __init__(self, priority=(1, 2, 3), drop_wait=lambda stream, event_op: False):
        self.priority = priority
        self.ops: list[Op] = []
        self.log: list[tuple] = []
        self.memory: dict = {}
        self.streams = 0
        self.pending_waits: dict[int, list] = {}
        self.done: set[int] = set()
        self.host_synced: set[int] = set()
        self.host_buffers: list[np.ndarray] = []
        self.drop_wait = drop_wait
        self.counts = {"mapping": 0, "renderer": 0, "copy": 0}

    def make_stream(self):
        self.streams += 1
        self.pending_waits[self.streams] = []
        return self.streams

    def _issue(self, kind, stream, reads, writes, run):
        op = Op(len(self.ops), kind, self.counts[kind], stream, self.pending_waits[stream], reads, writes, run,
                host_seen=set(self.host_synced))
        self.counts[kind] += 1
        self.pending_waits[stream] = []
        previous = [o for o in self.ops if o.stream == stream]
        for dep in ([previous[-1]] if previous else []) + [self.ops[i] for i in op.waits if i is not None] + \
                [self.ops[i] for i in op.host_seen]:
            op.before |= dep.before | {dep.index}
        self.ops.append(op)
        self.log.append(("issue", kind, op.seq, stream))
        return op

    def launch(self, stage, feeds, stream, slot):
        reads = {v.buffer for v in feeds.values() if isinstance(v, Ref)}
        uploaded = {k: np.array(v) for k, v in feeds.items() if not isinstance(v, Ref)}    # copied at issue
        shapes = {k: v.shape for k, v in uploaded.items()}
        shapes.update({k: v.buffer[3] for k, v in feeds.items() if isinstance(v, Ref)})
        out_name = "kp" if stage == "mapping" else "frames"
        batch = shapes["semantics" if stage == "mapping" else "kp_driving"][0]
        out_shape = (batch, 15, 3) if stage == "mapping" else (batch, 3, SIZE, SIZE)
        target = (stage, out_name, slot, out_shape)

        def run():
            values = {k: (self.memory[v.buffer] if isinstance(v, Ref) else uploaded[k]) for k, v in feeds.items()}
            self.memory[target] = MATH[stage](**values)[out_name]

        self._issue(stage, stream, reads, {target}, run)
        return {out_name: Ref(target)}

    def record(self, stream):
        previous = [o.index for o in self.ops if o.stream == stream]
        event = previous[-1] if previous else None
        self.log.append(("record", stream, event))
        return event

    def wait(self, stream, event):
        self.log.append(("wait", stream, event))
        if not self.drop_wait(stream, self.ops[event] if event is not None else None):
            self.pending_waits[stream].append(event)

    def synchronize(self, event):
        self.log.append(("synchronize", event))
        if event is None:
            return
        while event not in self.done:
            ready = [o for o in self.ops if o.index not in self.done and self._ready(o)]
            chosen = min(ready, key=lambda o: (self.priority.index(o.stream), o.index))
            chosen.run()
            self.done.add(chosen.index)
        self.host_synced |= {event} | self.ops[event].before

    def _ready(self, op):
        previous = [o for o in self.ops[:op.index] if o.stream == op.stream]
        waits = [e for e in op.waits if e is not None]
        return (not previous or previous[-1].index in self.done) and all(e in self.done for e in waits)

    def host_buffer(self, shape, dtype):
        buffer = np.full(shape, np.nan, dtype)
        self.host_buffers.append(buffer)
        return buffer

    def copy_to_host(self, src, dst, stream):
        slot = next(i for i, b in enumerate(self.host_buffers) if np.shares_memory(b, dst))
        host = ("host", slot)

        def run():
            np.copyto(dst, self.memory[src.buffer])

        self._issue("copy", stream, {src.buffer}, {host}, run)

    def hazards(self):
        """Pairs of accesses to one buffer, at least one a write, with no happens-before between them."""
        found = []
        for b in self.ops:
            for a in self.ops[:b.index]:
                if (a.writes & (b.reads | b.writes) or a.reads & b.writes) and a.index not in b.before:
                    found.append((a.kind, a.seq, b.kind, b.seq))
        return found


@pytest.mark.parametrize("frames, batch, slots", [(1, 4, 2), (4, 4, 2), (9, 4, 2), (10, 3, 3), (13, 2, 2), (0, 4, 2)])
def test_scheduler_overlaps_in_a_safe_order(frames, batch, slots):
    features, semantics = avatar_features(), targets(frames)
    expected = plain_loop(numpy_infer, features, semantics, batch)
    for priority in itertools.permutations((1, 2, 3)):
        ex = RecordingExecutor(priority)
        got = collect(FramePipeline(ex, features, SIZE, batch, host_slots=slots), semantics, expected)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert len(got) == frames
    assert ex.hazards() == []
    issued = [(kind, seq) for what, kind, seq, _ in (e for e in ex.log if e[0] == "issue")]
    batches = -(-frames // batch)
    for k in range(batches - 1):      # mapping(k+1) is issued before renderer(k), and before the host waits for k
        assert issued.index(("mapping", k + 1)) < issued.index(("renderer", k))
    ops = {(o.kind, o.seq): o for o in ex.ops}
    for k in range(batches):
        copy = ops[("copy", k)]
        assert ops[("renderer", k)].index in copy.waits, "copy(k) waits on the render event of k"
        assert ops[("mapping", k)].index in ops[("renderer", k)].waits
        assert copy.stream != ops[("renderer", k)].stream != ops[("mapping", k)].stream
        if k >= slots:                # the host slot is rewritten only after the host has seen its last copy
            assert ops[("copy", k - slots)].index in copy.host_seen
    syncs = [i for i, e in enumerate(ex.log) if e[0] == "synchronize"]
    for k in range(batches - 1):      # the host first waits for batch k after mapping(k+1) and renderer(k+1) are out
        first_wait = next(i for i in syncs if ex.log[i][1] == ops[("copy", k)].index)
        assert ex.log.index(("issue", "renderer", k + 1, ops[("renderer", k + 1)].stream)) < first_wait


@pytest.mark.parametrize("dropped", ["mapping->renderer", "renderer->mapping slot", "renderer->copy"])
def test_recording_executor_catches_a_missing_wait(dropped):
    """The fake is only worth its asserts if it fails a pipeline that forgets a dependency."""
    def drop(stream, event_op):
        kinds = {"mapping->renderer": ("mapping", 2), "renderer->mapping slot": ("renderer", 1),
                 "renderer->copy": ("renderer", 3)}
        kind, on_stream = kinds[dropped]
        return event_op is not None and event_op.kind == kind and stream == on_stream

    features, semantics = avatar_features(), targets(12)
    expected = plain_loop(numpy_infer, features, semantics, 2)
    wrong = []
    for priority in itertools.permutations((1, 2, 3)):
        ex = RecordingExecutor(priority, drop_wait=drop)
        try:
            got = collect(FramePipeline(ex, features, SIZE, 2), semantics)
            wrong.append(not np.allclose(got, expected, rtol=1e-5, atol=1e-5))
        except KeyError:              # read a buffer nothing had written yet
            wrong.append(True)
        assert ex.hazards(), f"dropping {dropped} went unnoticed by the hazard check"
    assert any(wrong), f"dropping {dropped} gave right frames under every stream priority"


def test_scheduler_stopped_early_drains_the_streams():
    features, semantics = avatar_features(), targets(12)
    ex = RecordingExecutor()
    frames = FramePipeline(ex, features, SIZE, 2).frames(semantics)
    next(frames)
    frames.close()
    assert {o.index for o in ex.ops if o.kind == "copy"} <= ex.done


def test_scheduler_names_missing_avatar_features():
    features = avatar_features()
    del features["kp_source"]
    with pytest.raises(KeyError, match="kp_source"):
        FramePipeline(SerialExecutor(lambda stage: None), features, SIZE, 2)


# -- the scheduler on onnxruntime sessions of tiny graphs ---------------------------------------------------
def tiny_graphs(directory: Path) -> dict[str, Path]:
    """ONNX graphs with the stage table's input and output names and the math of MATH."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    def io(tensor, batch="batch"):
        shape = [batch if d == BATCH else d for d in tensor.resolve(SIZE, batch=BATCH)]
        return helper.make_tensor_value_info(tensor.name, TensorProto.FLOAT, shape)

    def const(name, values):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                                 [len(values)], values))

    mapping, renderer = STAGES["mapping"], STAGES["renderer"]
    graphs = {
        "mapping": helper.make_graph(
            [const("starts", [0, 0]), const("ends", [15, 3]), const("axes", [1, 2]),
             helper.make_node("Slice", ["semantics", "starts", "ends", "axes"], ["head"]),
             helper.make_node("Add", ["kp_canonical", "head"], ["kp"])],
            "mapping", [io(t) for t in mapping.inputs], [io(t) for t in mapping.outputs]),
        "renderer": helper.make_graph(
            [const("sum_axes", [1, 2]), const("unsq", [3]), const("flat", [1, 4, 16, SIZE]),
             const("c0", [0]), const("c3", [3]), const("c1", [1]), const("one", [1, 1, 1, 1]),
             helper.make_node("Sub", ["kp_driving", "kp_source"], ["d"]),
             helper.make_node("ReduceSum", ["d", "sum_axes"], ["motion3"], keepdims=1),
             helper.make_node("Unsqueeze", ["motion3", "unsq"], ["motion"]),
             helper.make_node("Reshape", ["source_compressed", "flat"], ["src4"]),
             helper.make_node("Slice", ["src4", "c0", "c3", "c1"], ["base"]),
             helper.make_node("ReduceMean", ["feature_3d"], ["mean5"], keepdims=1),
             helper.make_node("Reshape", ["mean5", "one"], ["mean"]),
             helper.make_node("Add", ["base", "motion"], ["moved"]),
             helper.make_node("Add", ["moved", "mean"], ["frames"])],
            "renderer", [io(t) for t in renderer.inputs], [io(t) for t in renderer.outputs]),
    }
    paths = {}
    for name, graph in graphs.items():
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        paths[name] = directory / f"{name}.onnx"
        onnx.save(model, str(paths[name]))
    return paths


@pytest.fixture(scope="module")
def ort_runners(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from sadtalker_rt.runtime.backends.onnxruntime_backend import OnnxRuntimeRunner

    paths = tiny_graphs(tmp_path_factory.mktemp("graphs"))
    return {name: OnnxRuntimeRunner(name, path, ["CPUExecutionProvider"]) for name, path in paths.items()}


def test_tiny_graphs_compute_the_reference_math(ort_runners):
    features, semantics = avatar_features(), targets(3)
    kp = ort_runners["mapping"].infer({"semantics": semantics, "kp_canonical": features["kp_canonical"]})["kp"]
    np.testing.assert_allclose(kp, mapping_math(features["kp_canonical"], semantics)["kp"], rtol=1e-6)
    feeds = {k: features[k] for k in ("feature_3d", "source_compressed", "kp_source")}
    frames = ort_runners["renderer"].infer({"kp_driving": kp, **feeds})["frames"]
    np.testing.assert_allclose(frames, renderer_math(kp_driving=kp, **feeds)["frames"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frames, batch", [(7, 3), (8, 4), (1, 2)])
def test_scheduler_on_onnxruntime_equals_a_plain_loop(ort_runners, frames, batch):
    features, semantics = avatar_features(), targets(frames)
    expected = plain_loop(lambda stage, **feeds: ort_runners[stage].infer(feeds), features, semantics, batch)
    got = collect(FramePipeline(SerialExecutor(ort_runners.__getitem__), features, SIZE, batch), semantics)
    np.testing.assert_array_equal(got, expected)


# -- TensorRTRunner, CudaExecutor and TensorRTBackend on fakes of CUDA and TensorRT -------------------------
class FakeCuda:
    """Host memory addressed by pointer, work done at once, graphs as lists of recorded closures."""

    def __init__(self):
        self.memory: dict[int, np.ndarray] = {}
        self.uploads: list[int] = []
        self.mallocs = 0
        self.capture: list | None = None
        self.graph_launches = 0
        self.errors_cleared = 0

    def clear_error(self):
        self.errors_cleared += 1

    def malloc(self, nbytes):
        block = np.zeros(max(nbytes, 1), np.uint8)
        self.memory[block.ctypes.data] = block
        self.mallocs += 1
        return SimpleNamespace(ptr=block.ctypes.data, nbytes=nbytes, block=block)

    def view(self, ptr, shape, dtype):
        count = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return self.memory[ptr][:count].view(dtype).reshape(shape)

    def pinned(self, shape, dtype):
        return np.zeros(shape, dtype)

    def upload(self, ptr, array, stream):
        self.uploads.append(ptr)
        self.view(ptr, array.shape, array.dtype)[...] = array

    def download(self, array, ptr, stream):
        array[...] = self.view(ptr, array.shape, array.dtype)

    def stream(self):
        return 7

    def event(self):
        return object()

    def record(self, event, stream):
        pass

    def wait(self, stream, event):
        pass

    def synchronize_event(self, event):
        pass

    def synchronize_stream(self, stream):
        pass

    def begin_capture(self, stream):
        self.capture = []

    def end_capture(self, stream):
        graph, self.capture = self.capture, None
        return graph

    def launch_graph(self, graph, stream):
        self.graph_launches += 1
        for work in graph:
            work()

    def properties(self):
        return PLATFORM["gpu_name"], PLATFORM["compute_capability"]


class FakeEngine:
    """Answers the name-based engine API; its I/O is listed in an order unlike the stage table's."""

    def __init__(self, stage, cuda, rename=None):
        self.stage, self.cuda = STAGES[stage], cuda
        names = [t.name for t in self.stage.inputs][::-1] + [t.name for t in self.stage.outputs]
        self.names = [(rename or {}).get(n, n) for n in names]
        self.inputs = {(rename or {}).get(t.name, t.name) for t in self.stage.inputs}

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name):
        return "float32"

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.runs = engine, {}, {}, 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        batch = self.shapes["semantics" if self.engine.stage.name == "mapping" else "kp_driving"][0]
        return (batch, 15, 3) if name == "kp" else (batch, 3, SIZE, SIZE)

    def execute_async_v3(self, stream):
        cuda, shapes, addresses = self.engine.cuda, dict(self.shapes), dict(self.addresses)
        out = self.engine.stage.outputs[0].name

        def work():
            self.runs += 1
            values = {n: cuda.view(addresses[n], s, np.float32).copy() for n, s in shapes.items()}
            result = MATH[self.engine.stage.name](**values)[out]
            cuda.view(addresses[out], result.shape, np.float32)[...] = result

        cuda.capture.append(work) if cuda.capture is not None else work()
        return True


FAKE_TRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"), nptype=np.dtype)


def fake_runner(stage, cuda, record=None, cuda_graphs=False, rename=None):
    from sadtalker_rt.runtime.backends.tensorrt_backend import TensorRTRunner, engine_io

    engine = FakeEngine(stage, cuda, rename)
    return TensorRTRunner(STAGES[stage], engine, engine_io(FAKE_TRT, engine), cuda, record, cuda_graphs)


def test_runner_binds_by_name_whatever_the_order():
    cuda = FakeCuda()
    runner = fake_runner("renderer", cuda)
    assert [t.name for t in runner.inputs][0] == "kp_driving", "the fake engine lists inputs in another order"
    features = avatar_features()
    kp = mapping_math(features["kp_canonical"], targets(3))["kp"]
    feeds = {"kp_source": features["kp_source"], "kp_driving": kp, "source_compressed": features["source_compressed"],
             "feature_3d": features["feature_3d"]}
    expected = renderer_math(**feeds)["frames"]
    np.testing.assert_allclose(runner.infer(feeds)["frames"], expected, rtol=1e-6)
    np.testing.assert_allclose(runner.infer(dict(reversed(list(feeds.items()))))["frames"], expected, rtol=1e-6)


def test_runner_names_a_misnamed_input():
    runner = fake_runner("mapping", FakeCuda())
    with pytest.raises(KeyError, match="kp_canonicl"):
        runner.infer({"kp_canonicl": np.zeros((1, 15, 3), np.float32), "semantics": targets(2)})


def test_runner_refuses_an_engine_with_other_names():
    with pytest.raises(WeightsError, match=r"inputs \[.*'kp_driving_0'.*stage table names"):
        fake_runner("renderer", FakeCuda(), rename={"kp_driving": "kp_driving_0"})


def test_runner_keeps_avatar_inputs_resident_and_allocates_once_per_shape():
    cuda, features = FakeCuda(), avatar_features()
    runner = fake_runner("renderer", cuda)
    fixed = {k: features[k] for k in ("feature_3d", "source_compressed", "kp_source")}
    for batch in (4, 4, 4, 2, 4):
        runner.infer({**fixed, "kp_driving": np.ones((batch, 15, 3), np.float32)})
    assert len(cuda.uploads) == 3 + 5, "three avatar inputs once, kp_driving every call"
    assert cuda.mallocs == 3 + 2 * 2, "avatar inputs, then kp_driving and frames once per batch size"
    new_source = features["kp_source"] + 1         # another avatar: another array object, uploaded again
    out = runner.infer({**fixed, "kp_source": new_source, "kp_driving": np.ones((4, 15, 3), np.float32)})
    expected = renderer_math(**{**fixed, "kp_source": new_source, "kp_driving": np.ones((4, 15, 3), np.float32)})
    np.testing.assert_allclose(out["frames"], expected["frames"], rtol=1e-6)


def test_runner_checks_shapes_against_the_engine_profile():
    record = {"profile": {k: [list(s) for s in v]
                          for k, v in profile_shapes(STAGES["mapping"], SIZE, 4, 2).items()}}
    runner = fake_runner("mapping", FakeCuda(), record)
    with pytest.raises(UsageError, match=r"semantics of shape \(6, 70, 27\).*--max-batch"):
        runner.infer({"kp_canonical": np.zeros((1, 15, 3), np.float32), "semantics": targets(6)})


def test_runner_replays_a_captured_graph_with_new_inputs():
    cuda = FakeCuda()
    runner = fake_runner("mapping", cuda, cuda_graphs=True)
    kp_canonical = np.zeros((1, 15, 3), np.float32)
    for seed in range(4):
        semantics = targets(2, seed)
        out = runner.infer({"kp_canonical": kp_canonical, "semantics": semantics})["kp"]
        np.testing.assert_allclose(out, mapping_math(kp_canonical, semantics)["kp"], rtol=1e-6)
    assert cuda.graph_launches == 3 and runner.context.runs == 4, "run once, capture, then replay"


def test_runner_falls_back_when_capture_fails(monkeypatch):
    cuda = FakeCuda()

    def invalidated(stream):
        cuda.capture = None
        raise RuntimeError("CUDA cudaStreamEndCapture failed: cudaErrorStreamCaptureInvalidated")

    monkeypatch.setattr(cuda, "end_capture", invalidated)
    runner = fake_runner("mapping", cuda, cuda_graphs=True)
    kp_canonical = np.zeros((1, 15, 3), np.float32)
    for seed in range(3):
        semantics = targets(2, seed)
        out = runner.infer({"kp_canonical": kp_canonical, "semantics": semantics})["kp"]
        np.testing.assert_allclose(out, mapping_math(kp_canonical, semantics)["kp"], rtol=1e-6)
    assert cuda.graph_launches == 0 and "Invalidated" in runner.capture_error


def test_cuda_executor_pipeline_equals_a_plain_loop():
    from sadtalker_rt.runtime.backends.tensorrt_backend import CudaExecutor

    cuda, features, semantics = FakeCuda(), avatar_features(), targets(23)     # 5 batches of 4, then 3
    runners = {name: fake_runner(name, cuda, cuda_graphs=True) for name in ("mapping", "renderer")}
    expected = plain_loop(numpy_infer, features, semantics, 4)
    got = collect(FramePipeline(CudaExecutor(runners.__getitem__, cuda), features, SIZE, 4), semantics, expected)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert cuda.graph_launches > 0


# -- engines.json bookkeeping with a stand-in builder, and the backend on fakes -------------------------------
def export_dir(directory: Path, graphs: dict[str, bytes], precision="fp32", grid_sample="decomposed") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stages = {}
    for name, data in graphs.items():
        (directory / f"{name}.onnx").write_bytes(data)
        stages[name] = {"file": f"{name}.onnx", "sha256": hashlib.sha256(data).hexdigest(), "precision": precision,
                        "grid_sample": grid_sample if name == "renderer" else None}
    manifest = {"format": ONNX_FORMAT, "size": SIZE, "precision": precision, "grid_sample": grid_sample,
                "weights": {"identity": "synthetic:0"}, "stages": stages}
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


class StandInBuilder:
    def __init__(self):
        self.built = []

    def __call__(self, graph, shapes):
        self.built.append(graph.stem)
        return f"engine of {graph.name} for {sorted(shapes.items())}".encode()


def _builds(onnx_dir, out_dir, platform=PLATFORM, max_batch=4, stages=None):
    manifest = json.loads((onnx_dir / MANIFEST).read_text())
    builder = StandInBuilder()
    result = run_builds(manifest, onnx_dir, out_dir, platform, builder, max_batch, 2, stages=stages)
    assert sorted(result.built) == sorted(builder.built) and not set(result.built) & set(result.reused)
    return builder.built, result.record


def test_builds_are_reused_until_a_key_field_changes(tmp_path):
    onnx_dir = export_dir(tmp_path / "onnx", {"kp_detector": b"k", "mapping": b"m", "renderer": b"r"})
    out = tmp_path / "engines"
    built, record = _builds(onnx_dir, out)
    assert sorted(built) == ["kp_detector", "mapping", "renderer"]
    assert json.loads((out / plan.ENGINES_JSON).read_text()) == record
    entry = record["stages"]["renderer"]
    assert {"graph_sha256", "stage", "precision", "profile", "trt_version", "gpu_name", "compute_capability", "key",
            "file", "engine_sha256"} <= set(entry)
    assert entry["profile"]["kp_driving"] == [[1, 15, 3], [2, 15, 3], [4, 15, 3]]
    assert not any(str(tmp_path) in json.dumps(r) for r in record["stages"].values()), "no absolute paths"
    assert _builds(onnx_dir, out)[0] == []
    built, record = _builds(onnx_dir, out, max_batch=8)
    assert sorted(built) == ["mapping", "renderer"], "the static stage keeps its engine"
    assert "optimization profile differs" in record["stages"]["renderer"]["built_because"]
    built, record = _builds(onnx_dir, out, max_batch=8, platform={**PLATFORM, "trt_version": "10.9.0"})
    assert len(built) == 3 and "TensorRT 10.9.0" in record["stages"]["kp_detector"]["built_because"]


def test_changed_graph_or_damaged_engine_is_rebuilt(tmp_path):
    out = tmp_path / "engines"
    _builds(export_dir(tmp_path / "onnx", {"kp_detector": b"k", "renderer": b"r"}), out)
    built, record = _builds(export_dir(tmp_path / "onnx", {"kp_detector": b"k", "renderer": b"r2"}), out)
    assert built == ["renderer"] and "ONNX graph changed" in record["stages"]["renderer"]["built_because"]
    (out / "kp_detector.engine").write_bytes(b"garbage")
    built, record = _builds(tmp_path / "onnx", out)
    assert built == ["kp_detector"] and "does not match" in record["stages"]["kp_detector"]["built_because"]


def test_building_some_stages_keeps_the_others(tmp_path):
    onnx_dir = export_dir(tmp_path / "onnx", {"kp_detector": b"k", "renderer": b"r"})
    _builds(onnx_dir, tmp_path / "engines")
    built, record = _builds(onnx_dir, tmp_path / "engines", max_batch=8, stages=("renderer",))
    assert built == ["renderer"] and set(record["stages"]) == {"kp_detector", "renderer"}


def test_triton_repository_reads_engines_as_the_backend_does(tmp_path):
    from sadtalker_rt.stages import DEFAULT_PIPELINE
    from sadtalker_rt.triton.repository import write_repository

    onnx_dir = export_dir(tmp_path / "onnx", {name: name.encode() for name in DEFAULT_PIPELINE})
    out = tmp_path / "engines"
    _builds(onnx_dir, out)
    summary = write_repository(onnx_dir, tmp_path / "repo", engines=out, check=False)
    assert summary["models"]["renderer"]["how"] == "tensorrt_plan"
    (out / "renderer.engine").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="renderer engine .* does not match the sha256"):
        write_repository(onnx_dir, tmp_path / "repo2", engines=out)
    (out / plan.ENGINES_JSON).write_text("{")
    with pytest.raises(WeightsError, match="not valid JSON"):
        write_repository(onnx_dir, tmp_path / "repo2", engines=out)
    assert not (tmp_path / "repo2").exists()


def test_a_damaged_graph_is_refused_before_building(tmp_path):
    onnx_dir = export_dir(tmp_path / "onnx", {"renderer": b"r"})
    (onnx_dir / "renderer.onnx").write_bytes(b"changed")
    with pytest.raises(WeightsError, match="does not match the sha256"):
        _builds(onnx_dir, tmp_path / "engines")


@pytest.fixture
def no_gpu_libraries(monkeypatch):
    for name in ("tensorrt", "cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)       # import raises ImportError


def test_build_without_tensorrt_says_how_to_install(tmp_path, no_gpu_libraries):
    from sadtalker_rt.build.tensorrt import build_engines

    onnx_dir = export_dir(tmp_path / "onnx", {"renderer": b"r"})
    with pytest.raises(EnvironmentProblem) as err:
        build_engines(onnx_dir, tmp_path / "engines")
    assert str(err.value) == f"TensorRT is not installed; {INSTALL_HINT}." and err.value.exit_code == 5


def test_backend_without_tensorrt_says_how_to_install(tmp_path, no_gpu_libraries):
    from sadtalker_rt.runtime.backends import open_backend

    with pytest.raises(EnvironmentProblem, match=r"TensorRT is not installed; pip install 'sadtalker-rt\[tensorrt\]'"):
        open_backend("tensorrt", engines=tmp_path)


def test_cuda_without_cuda_python_says_how_to_install(no_gpu_libraries):
    from sadtalker_rt.runtime.cuda import Cuda

    with pytest.raises(EnvironmentProblem, match=r"cuda-python is not installed; pip install"):
        Cuda()


def test_no_gpu_is_one_sentence():
    from sadtalker_rt.runtime.cuda import Cuda

    cudart = SimpleNamespace(cudaError_t=SimpleNamespace(cudaSuccess=0), cudaGetDeviceCount=lambda: (100, 0),
                             cudaGetErrorName=lambda err: (0, b"cudaErrorNoDevice"))
    with pytest.raises(EnvironmentProblem) as err:
        Cuda(cudart=cudart)
    assert str(err.value).startswith("No NVIDIA GPU is visible to CUDA (cudaErrorNoDevice); ")
    assert str(err.value).count(". ") == 0 and err.value.exit_code == 5


def install_fake_tensorrt(monkeypatch, engine_class) -> FakeCuda:
    """TensorRTBackend's TensorRT and CUDA replaced by the fakes; each engine an ``engine_class(stage, cuda)``,
    the stage read from the stand-in builder's engine bytes ("engine of STAGE.onnx ...")."""
    from sadtalker_rt.runtime.backends import tensorrt_backend

    cuda = FakeCuda()

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    def runtime(logger):
        return SimpleNamespace(deserialize_cuda_engine=lambda data: engine_class(data.split()[2][:-5].decode(), cuda))

    trt = SimpleNamespace(**vars(FAKE_TRT), __version__=PLATFORM["trt_version"], Logger=Logger, Runtime=runtime)
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_backend, "Cuda", lambda: cuda)
    return cuda


@pytest.fixture
def fake_backend(tmp_path, monkeypatch):
    """A TensorRTBackend whose TensorRT and CUDA are the fakes above, over engines 'built' by the stand-in."""
    cuda = install_fake_tensorrt(monkeypatch, FakeEngine)
    onnx_dir = export_dir(tmp_path / "onnx", {"mapping": b"m", "renderer": b"r"})
    _builds(onnx_dir, tmp_path / "engines")
    return tmp_path / "engines", cuda


def test_backend_runs_the_frame_pipeline(fake_backend):
    from sadtalker_rt.runtime.backends import open_backend

    directory, cuda = fake_backend
    backend = open_backend("tensorrt", engines=directory)
    assert backend.size == SIZE and backend.describe()["gpu"] == PLATFORM["gpu_name"]
    features, semantics = avatar_features(), targets(5)
    expected = plain_loop(lambda stage, **feeds: backend.runner(stage).infer(feeds), features, semantics, 2)
    np.testing.assert_allclose(expected, plain_loop(numpy_infer, features, semantics, 2), rtol=1e-6)
    got = collect(FramePipeline(backend.executor(), features, SIZE, 2), semantics, expected)
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(WeightsError, match="no engine for it yet"):
        backend.runner("kp_detector")


def test_backend_refuses_engines_of_another_gpu_in_one_sentence(fake_backend, monkeypatch):
    from sadtalker_rt.runtime.backends.tensorrt_backend import TensorRTBackend

    directory, cuda = fake_backend
    monkeypatch.setattr(cuda, "properties", lambda: ("NVIDIA GeForce RTX 4090", "8.9"), raising=False)
    with pytest.raises(WeightsError) as err:
        TensorRTBackend(directory)
    message = str(err.value)
    assert "built for NVIDIA H100 80GB HBM3 (compute capability 9.0) and this GPU is NVIDIA GeForce RTX 4090" in message
    assert message.endswith(f"`sadtalker-rt build ONNX_DIR -o {directory}`.") and message.count("; ") == 1


# -- review fixes: TF32 in the key, profiles from the stage table, grid-sample choice, capture, --cuda-graphs ----
def test_engines_built_before_builder_settings_were_recorded_are_rebuilt():
    """Engines of the hand-written builder ran FP32 layers in TF32 (TensorRT's default) and recorded no
    builder settings: the key now holds them (TF32 off), so such an engine is rebuilt."""
    record = plan.engine_record(_key(), "renderer.engine", "0" * 64)
    del record["builder"]
    reason = check_engine(record, _key())
    assert "builder settings differ" in reason and "tf32 unrecorded then, False now" in reason
    assert builder_settings()["tf32"] is False and builder_settings()["strongly_typed"] is True
    assert check_engine(record, PLATFORM) is None, "the runtime still runs it: only a build compares settings"


def test_profiles_come_from_the_stage_table():
    for name in ("mapping", "renderer", "audio2exp"):
        stage = STAGES[name]
        shapes = profile_shapes(stage, 256)
        for tensor in stage.inputs:
            for axis in tensor.dynamic_axes():
                assert tuple(s[axis] for s in shapes[tensor.name]) == stage.profile, (name, tensor.name)
    assert profile_shapes(STAGES["mapping"], 256)["semantics"][2][0] == 32
    overridden = profile_shapes(STAGES["mapping"], 256, max_batch=2)["semantics"]
    assert [s[0] for s in overridden] == [1, 2, 2], "--max-batch overrides the max and caps the opt"
    frames = profile_shapes(STAGES["audio2exp"], 256, max_batch=2)["indiv_mels"]
    assert [s[0] for s in frames] == list(STAGES["audio2exp"].profile), "--max-batch is about batches, not frames"


def test_builds_without_max_batch_use_the_stage_table(tmp_path):
    onnx_dir = export_dir(tmp_path / "onnx", {"mapping": b"m", "renderer": b"r"})
    manifest = json.loads((onnx_dir / MANIFEST).read_text())
    result = run_builds(manifest, onnx_dir, tmp_path / "engines", PLATFORM, StandInBuilder())
    stages = result.record["stages"]
    assert [s[0] for s in stages["mapping"]["profile"]["semantics"]] == list(STAGES["mapping"].profile)
    assert [s[0] for s in stages["renderer"]["profile"]["kp_driving"]] == list(STAGES["renderer"].profile)
    assert result.record["max_batch"] is None and stages["renderer"]["builder"] == builder_settings()


def test_a_native_export_builds_its_stages_without_grid_sample_on_old_tensorrt(tmp_path):
    onnx_dir = export_dir(tmp_path / "onnx", {"mapping": b"m", "renderer": b"r"}, grid_sample="native")
    assert _builds(onnx_dir, tmp_path / "engines", stages=("mapping",))[0] == ["mapping"]
    with pytest.raises(WeightsError, match=r"TensorRT 10\.8\.0\.43 cannot build"):
        _builds(onnx_dir, tmp_path / "engines", stages=("renderer",))
    assert _builds(onnx_dir, tmp_path / "more", platform={**PLATFORM, "trt_version": "11.2.0"})[0] == [
        "mapping", "renderer"]


@pytest.mark.parametrize("installed, choice", [("10.8.0.43", "decomposed"), ("11.1.0", "decomposed"),
                                               ("11.2.0", "native"), (None, "native")])
def test_grid_sample_auto_follows_the_installed_tensorrt(monkeypatch, installed, choice):
    from sadtalker_rt.build.tensorrt import resolve_grid_sample

    monkeypatch.setitem(sys.modules, "tensorrt", None if installed is None else SimpleNamespace(__version__=installed))
    assert resolve_grid_sample() == resolve_grid_sample("auto") == choice
    assert resolve_grid_sample("native") == "native" and resolve_grid_sample("decomposed") == "decomposed"


def test_bench_exports_what_the_installed_tensorrt_builds(monkeypatch, tmp_path):
    from sadtalker_rt.bench import backends as bench_backends
    from sadtalker_rt.build.export import onnx_export

    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.13.3"))
    monkeypatch.setattr(onnx_export, "export_graphs", lambda *args, **kwargs: calls.append(kwargs))
    weights = SimpleNamespace(identity=lambda: "synthetic:0")
    ctx = SimpleNamespace(config=SimpleNamespace(weights=weights, size=SIZE, engines_dir=None), work_dir=tmp_path,
                          export_source=None, progress=lambda *a: None)
    bench_backends._graphs(ctx, "fp32")
    assert calls and calls[0]["grid_sample"] == "decomposed"


def test_capture_that_cannot_enqueue_falls_back_and_clears_the_error():
    """execute_async_v3 may return False while capturing: the runner ends the capture, clears the CUDA error
    and runs that binding with plain launches from then on."""
    cuda = FakeCuda()
    runner = fake_runner("mapping", cuda, cuda_graphs=True)
    plain = runner.context.execute_async_v3

    def refuses_while_capturing(stream):
        return False if cuda.capture is not None else plain(stream)

    runner.context.execute_async_v3 = refuses_while_capturing
    kp_canonical = np.zeros((1, 15, 3), np.float32)
    for seed in range(4):
        semantics = targets(2, seed)
        out = runner.infer({"kp_canonical": kp_canonical, "semantics": semantics})["kp"]
        np.testing.assert_allclose(out, mapping_math(kp_canonical, semantics)["kp"], rtol=1e-6)
    assert cuda.graph_launches == 0 and cuda.capture is None and cuda.errors_cleared == 1
    assert "while capturing" in runner.capture_error and runner.context.runs == 4


def test_cuda_graphs_reach_the_tensorrt_backend(fake_backend):
    from sadtalker_rt.runtime.backends import open_backend
    from sadtalker_rt.runtime.pipeline import TalkingHead

    directory, cuda = fake_backend
    backend = open_backend("tensorrt", engines=directory, cuda_graphs=True)
    assert backend.cuda_graphs and backend.runner("mapping").cuda_graphs and backend.describe()["cuda_graphs"]
    assert TalkingHead.from_engines(directory, backend="tensorrt", cuda_graphs=True).backend.cuda_graphs
    assert not open_backend("tensorrt", engines=directory).cuda_graphs
    with pytest.raises(UsageError, match="--cuda-graphs"):
        open_backend("onnxruntime", engines=directory, cuda_graphs=True)


# -- Polygraphy: the configuration its TensorRT loaders receive (TensorRT is absent here), parity through its
# onnxruntime runner and statistics, the `polygraphy run` recipe --------------------------------------------
TRT_POOLS = SimpleNamespace(__version__="10.8.0.43", MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    return tiny_graphs(tmp_path_factory.mktemp("tiny"))


def test_polygraphy_receives_the_stage_profile_strong_typing_tf32_off_and_the_timing_cache(graphs, tmp_path):
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath

    shapes = profile_shapes(STAGES["renderer"], SIZE)
    cache = tmp_path / "timing.cache"
    loader = polygraphy_loader(TRT_POOLS, graphs["renderer"], shapes, builder_settings(2.0), cache)
    assert isinstance(loader, EngineBytesFromNetwork) and loader.timing_cache_path == str(cache)
    network, config = loader._network, loader._config
    assert isinstance(network, NetworkFromOnnxPath) and network.path == str(graphs["renderer"])
    assert network.strongly_typed is True
    assert isinstance(config, CreateConfig) and config.tf32 is False and config.fp16 is False
    assert config.timing_cache_path == str(cache) and config.memory_pool_limits == {"WORKSPACE": 2 << 30}
    (profile,) = config.profiles
    assert set(profile) == {t.name for t in STAGES["renderer"].inputs}
    kp = profile["kp_driving"]
    assert [kp.min[0], kp.opt[0], kp.max[0]] == list(STAGES["renderer"].profile)
    assert tuple(profile["feature_3d"].min) == tuple(profile["feature_3d"].max) == shapes["feature_3d"][0]


def test_polygraphy_drives_a_tensorrt_shaped_module_as_intended(graphs, tmp_path):
    """Polygraphy's real build path (loaders, config, timing cache) against a recording stand-in for the
    TensorRT module, in a child process: the calls TensorRT would receive."""
    code = ("import sys, tensorrt; from pathlib import Path; "
            "from sadtalker_rt.build.tensorrt import PolygraphyEngineBuilder; "
            "from sadtalker_rt.runtime.engine_plan import builder_settings, profile_shapes; "
            "from sadtalker_rt.stages import STAGES; "
            "builder = PolygraphyEngineBuilder(tensorrt, builder_settings(2.0), Path(sys.argv[2])); "
            "print(builder.build(Path(sys.argv[1]), profile_shapes(STAGES['renderer'], 16)))")
    stand_ins = Path(__file__).parent / "stand_ins"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stand_ins), str(Path(__file__).parents[1])]),
           "FAKE_TRT_CALLS": str(tmp_path / "calls.json")}
    cache = tmp_path / "timing.cache"
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code, str(graphs["renderer"]), str(cache)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == "b'serialized engine'"
        runs.append((json.loads((tmp_path / "calls.json").read_text()), cache.read_bytes()))
    calls = {c[0]: c[1:] for c in runs[0][0]}
    assert calls["create_network"] == [1 << 1], "STRONGLY_TYPED, nothing else"
    assert calls["parse_from_file"] == ["renderer.onnx"]
    assert calls["clear_flag"] == ["BuilderFlag.TF32"] and "set_flag" not in calls
    assert calls["set_memory_pool_limit"] == ["MemoryPoolType.WORKSPACE", 2 << 30]
    shapes = profile_shapes(STAGES["renderer"], SIZE)
    assert calls["add_optimization_profile"] == [{n: [list(s) for s in v] for n, v in shapes.items()}]
    assert calls["build"] == [[], True], "built with no precision flags, TF32 cleared, strongly typed"
    assert calls["set_timing_cache"] == ["", False] and runs[0][1] == b"timings", "a new cache, written after"
    assert {c[0]: c[1:] for c in runs[1][0]}["set_timing_cache"][0] == "timings", "the next build reads it"
    assert runs[1][1] == b"timings+timings", "and merges what it measured into it"


def test_polygraphy_without_tensorrt_refuses_in_one_sentence(graphs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    from polygraphy.backend.trt import loader as trt_loader

    if getattr(trt_loader.trt, "module", None) is not None:
        pytest.skip("Polygraphy already imported a TensorRT in this process")
    builder = PolygraphyEngineBuilder(TRT_POOLS, builder_settings(), tmp_path / "timing.cache")
    with pytest.raises(SadTalkerError) as err:
        builder.build(graphs["mapping"], profile_shapes(STAGES["mapping"], SIZE))
    message = str(err.value)
    assert "TensorRT 10.8.0.43 could not build an engine from mapping.onnx" in message
    assert "'tensorrt' is required" in message and "\n" not in message
    assert not (tmp_path / "timing.cache").exists()


def _perturbed(path: Path, out: Path, delta: float) -> Path:
    """The graph with ``delta`` added to its output: a stand-in engine that computes something else."""
    from onnx import TensorProto, helper

    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(path))
    graph = model.graph
    name = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{o}_exact" if o == name else o for o in node.output]
    graph.node.append(helper.make_node("Constant", [], ["delta"],
                                       value=helper.make_tensor("delta", TensorProto.FLOAT, [], [delta])))
    graph.node.append(helper.make_node("Add", [f"{name}_exact", "delta"], [name]))
    onnx.save(model, str(out))
    return out


def test_engine_parity_through_polygraphy_runners(graphs, tmp_path):
    shapes = profile_shapes(STAGES["mapping"], SIZE)
    same = polygraphy_check.onnxruntime_runner(graphs["mapping"], name="stand-in engine")
    comparisons, passed = polygraphy_check.engine_parity("mapping", "fp32", graphs["mapping"], same, shapes)
    assert passed and [c.name for c in comparisons] == ["kp"] and comparisons[0].max_abs == 0.0
    off = polygraphy_check.onnxruntime_runner(_perturbed(graphs["mapping"], tmp_path / "off.onnx", 1e-2))
    comparisons, passed = polygraphy_check.engine_parity("mapping", "fp32", graphs["mapping"], off, shapes)
    assert not passed and comparisons[0].max_abs == pytest.approx(1e-2, rel=1e-3)
    assert comparisons[0].problem == f"relative error {comparisons[0].max_rel:.2e} > 1e-04"


def test_a_failing_engine_is_recorded_with_the_polygraphy_recipe(graphs, tmp_path):
    onnx_dir = export_dir(tmp_path / "onnx", {"mapping": graphs["mapping"].read_bytes()})
    off = _perturbed(graphs["mapping"], tmp_path / "off.onnx", 0.5)

    def check(stage, precision, graph, engine, shapes):      # the engine bytes name the graph that stands in
        runner = polygraphy_check.onnxruntime_runner(Path(engine.decode()))
        return polygraphy_check.engine_parity(stage, precision, graph, runner, shapes)

    manifest = json.loads((onnx_dir / MANIFEST).read_text())
    result = run_builds(manifest, onnx_dir, tmp_path / "engines", PLATFORM, lambda graph, shapes: str(off).encode(),
                        check=check)
    entry = result.record["stages"]["mapping"]
    assert entry["parity_passed"] is False and entry["parity"][0]["name"] == "kp"
    command = result.parity_failures["mapping"]
    assert command.startswith(f"polygraphy run {onnx_dir / 'mapping.onnx'} --onnxrt --trt --strongly-typed")
    assert "--trt-max-shapes 'semantics:[32,70,27]'" in command and "--atol 0.0001 --rtol 0.0001" in command


def test_the_polygraphy_recipe_runs_with_polygraphys_own_command_line(graphs):
    command = polygraphy_check.polygraphy_command(graphs["mapping"], "mapping", "fp32",
                                                  profile_shapes(STAGES["mapping"], SIZE))
    args = shlex.split(command)
    args[0] = str(Path(sys.executable).parent / "polygraphy")
    if not Path(args[0]).exists():
        pytest.skip("the polygraphy command line is not installed beside this Python")
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert "unrecognized arguments" not in text and "error:" not in text.lower().split("[e]")[0]
    assert "onnxrt-runner" in text, "onnxruntime ran the graph at the given shapes"
    assert "'tensorrt' is required" in text, "then the TensorRT runner asked for TensorRT (absent here)"


def test_polygraphy_statistics_are_judged_by_the_scaled_bound_and_missing_outputs_named():
    ref = {"a": np.array([100.0, 0.0], np.float32), "b": np.ones(2, np.float32)}
    ours = {"a": ref["a"] + np.float32(5e-3), "c": np.ones(2, np.float32)}
    bound = Tolerance("max_rel", 1e-4, "test bound")
    stats = {"a": SimpleNamespace(max_absdiff=6e-3, mean_absdiff=5e-3)}
    measured = polygraphy_check.polygraphy_statistics(stats)
    rows = {c.name: c for c in judge_outputs(ours, ref, bound, measured=measured)}
    assert rows["a"].passed and rows["a"].max_rel == pytest.approx(6e-5), "6e-3 <= 1e-4 * max|ref| = 1e-2"
    assert not rows["b"].passed and "missing" in rows["b"].problem
    assert not rows["c"].passed and "not a reference output" in rows["c"].problem
    stats["a"] = SimpleNamespace(max_absdiff=float("nan"), mean_absdiff=float("nan"))
    measured = polygraphy_check.polygraphy_statistics(stats)
    assert "non-finite" in judge_outputs(ours, ref, bound, measured=measured)[0].problem


def test_export_validation_goes_through_polygraphy(graphs):
    """The export's validation (Polygraphy's onnxruntime runner against reference outputs) on an exported
    graph: right references pass, wrong ones fail with the output and the shape named."""
    from sadtalker_rt.build.export.onnx_export import validate_graph

    stage = STAGES["renderer"]
    features = avatar_features()
    feeds = {"kp_driving": np.ones((2, 15, 3), np.float32),
             **{k: features[k] for k in ("feature_3d", "source_compressed", "kp_source")}}

    reference = renderer_math(**feeds)
    model = graphs["renderer"].read_bytes()
    rows, failures = validate_graph(model, stage, [("trace", feeds, reference)], "fp32")
    assert failures == [] and rows[0]["output"] == "frames" and rows[0]["passed"]
    assert rows[0]["method"].endswith("polygraphy") and rows[0]["max_rel"] <= 1e-5
    wrong = {"frames": reference["frames"] + 0.1}
    rows, failures = validate_graph(model, stage, [("trace", feeds, wrong)], "fp32")
    assert not rows[0]["passed"] and failures == [f"renderer.frames at trace: relative error {rows[0]['max_rel']:.2e} "
                                                  f"> 1e-04"]


# -- on a GPU ------------------------------------------------------------------------------------------------
def _real_cuda():
    try:
        from sadtalker_rt.runtime.cuda import Cuda

        return Cuda()
    except EnvironmentProblem as err:
        pytest.skip(str(err))


@pytest.mark.gpu
def test_cuda_streams_events_pinned_copies_and_graphs():
    cuda = _real_cuda()
    name, capability = cuda.properties()
    assert name and capability.count(".") == 1
    host_in = cuda.pinned((4, 1000), np.float32)
    host_in[...] = np.arange(4000, dtype=np.float32).reshape(4, 1000)
    host_out = cuda.pinned((4, 1000), np.float32)
    a, b = cuda.malloc(host_in.nbytes), cuda.malloc(host_in.nbytes)
    upload, copy = cuda.stream(), cuda.stream()
    cuda.upload(a.ptr, host_in, upload)
    uploaded = cuda.event()
    cuda.record(uploaded, upload)
    cuda.wait(copy, uploaded)
    cuda.begin_capture(copy)
    cuda.call(cuda.rt.cudaMemcpyAsync, b.ptr, a.ptr, host_in.nbytes,
              cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, copy.raw)
    graph = cuda.end_capture(copy)
    cuda.launch_graph(graph, copy)
    cuda.download(host_out, b.ptr, copy)
    done = cuda.event()
    cuda.record(done, copy)
    cuda.synchronize_event(done)
    np.testing.assert_array_equal(host_out, host_in)


class CupyEngine(FakeEngine):
    """The fake engine's math as CuPy kernels on the caller's stream, so real streams, events and graphs run."""

    def create_execution_context(self):
        return CupyContext(self)


class CupyContext(FakeContext):
    """Writes only into buffers allocated on the first (uncaptured) run, as graph capture requires."""

    scratch: dict

    def execute_async_v3(self, stream):
        import warnings

        cupy = pytest.importorskip("cupy")

        def device(name, shape):
            memory = cupy.cuda.UnownedMemory(self.addresses[name], int(np.prod(shape)) * 4, None)
            return cupy.ndarray(shape, cupy.float32, cupy.cuda.MemoryPointer(memory, 0))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)     # ExternalStream: fine for a test stand-in
            external = cupy.cuda.ExternalStream(stream)
        with external:
            values = {n: device(n, s) for n, s in self.shapes.items()}
            if self.engine.stage.name == "mapping":
                out = device("kp", self.get_tensor_shape("kp"))
                cupy.add(values["kp_canonical"], values["semantics"][:, :15, :3], out=out)
                return True
            batch = self.shapes["kp_driving"][0]
            if not hasattr(self, "scratch"):
                self.scratch = {}
            if batch not in self.scratch:
                self.scratch[batch] = (cupy.empty((batch, 15, 3), cupy.float32), cupy.empty(batch, cupy.float32),
                                       cupy.empty((), cupy.float32))
            diff, motion, mean = self.scratch[batch]
            cupy.subtract(values["kp_driving"], values["kp_source"], out=diff)
            cupy.sum(diff.reshape(batch, 45), axis=1, out=motion)
            cupy.mean(values["feature_3d"], out=mean)
            out = device("frames", self.get_tensor_shape("frames"))
            cupy.add(values["source_compressed"].reshape(1, 4, 16, SIZE)[:, :3], motion.reshape(-1, 1, 1, 1), out=out)
            cupy.add(out, mean, out=out)
        return True


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_frame_pipeline_on_cuda_streams(cuda_graphs):
    pytest.importorskip("cupy")
    from sadtalker_rt.runtime.backends.tensorrt_backend import CudaExecutor, TensorRTRunner, engine_io
    from sadtalker_rt.runtime.cuda import Handle

    cuda = _real_cuda()
    runners = {}
    for name in ("mapping", "renderer"):
        engine = CupyEngine(name, cuda)
        runners[name] = TensorRTRunner(STAGES[name], engine, engine_io(FAKE_TRT, engine), cuda, None, cuda_graphs)
    features, semantics = avatar_features(), targets(23)
    expected = plain_loop(numpy_infer, features, semantics, 4)
    np.testing.assert_allclose(plain_loop(lambda s, **f: runners[s].infer(f), features, semantics, 4), expected,
                               rtol=1e-5, atol=1e-5)
    for _ in range(2):
        got = collect(FramePipeline(CudaExecutor(runners.__getitem__, cuda), features, SIZE, 4), semantics, expected)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    if cuda_graphs:
        assert all(r.capture_error is None for r in runners.values()), [r.capture_error for r in runners.values()]
        assert any(isinstance(g, Handle) for r in runners.values() for g in r._graphs.values())


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engines_match_onnxruntime(tmp_path, ort_runners):
    pytest.importorskip("tensorrt")
    from sadtalker_rt.runtime.backends.tensorrt_backend import TensorRTBackend
    from sadtalker_rt.build.tensorrt import build_engines

    paths = tiny_graphs(tmp_path)
    onnx_dir = export_dir(tmp_path / "onnx", {name: path.read_bytes() for name, path in paths.items()})
    first = build_engines(onnx_dir, tmp_path / "engines", max_batch=4, opt_batch=2, workspace_gib=1)
    assert sorted(first.built) == ["mapping", "renderer"]
    again = build_engines(onnx_dir, tmp_path / "engines", max_batch=4, opt_batch=2)
    assert sorted(again.reused) == ["mapping", "renderer"] and again.record["stages"] == first.record["stages"]
    for cuda_graphs in (False, True):
        backend = TensorRTBackend(tmp_path / "engines", cuda_graphs=cuda_graphs)
        features, semantics = avatar_features(), targets(9)
        expected = plain_loop(lambda stage, **feeds: ort_runners[stage].infer(feeds), features, semantics, 4)
        got = collect(FramePipeline(backend.executor(), features, SIZE, 4), semantics)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
