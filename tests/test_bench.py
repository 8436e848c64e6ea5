"""``sadtalker-rt bench``: report schema, ratios against the official baseline, parity verdicts, markdown, CLI.

The harness logic is generic, so most tests drive it with cheap stand-in runners (``StubBackend``) that keep
the stage table's names and shapes: the mapping turns the canonical keypoints by the pose coefficients and
moves them by the expression; the renderer paints a fixed picture whose mouth box brightens with the keypoint
motion. A backend whose mapping freezes kp_driving to kp_source (a frozen head and mouth) must fail the
keypoint, head-pose and mouth checks while its whole-frame PSNR still passes. The real models run in the
``heavy`` test at the end.
"""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from sadtalker_rt import bench
from sadtalker_rt.runtime.backends import SerialBackend, check_feeds
from sadtalker_rt.models.checkpoints import WeightSource
from sadtalker_rt.cli import main
from sadtalker_rt.stages import STAGES

SIZE = 256
MOUTH_GAIN = 0.025      # mouth patch change at full motion: ~32 dB in the box, ~41.5 dB over the frame


def _rotation(yaw, pitch, roll):
    """R = Rx(pitch) Ry(yaw) Rz(roll), angles in radians, as the mapping stage composes it."""
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rx @ ry @ rz


class StubRunner:
    def __init__(self, stage: str, fn):
        self.stage = STAGES[stage]
        self.fn = fn

    def infer(self, feeds):
        check_feeds(self.stage, feeds)
        return self.fn(**feeds)


class StubBackend(SerialBackend):
    """Every stage of the crop pipeline in a few lines of numpy (see the module docstring)."""

    name = "stub"

    def __init__(self, size: int = SIZE):
        self.size = size
        self.box = bench.fixed_mouth_box(size)
        y = np.linspace(0.3, 0.7, size, dtype=np.float32)
        self.background = np.broadcast_to(y[None, :, None] * np.ones((3, 1, size), np.float32), (3, size, size))

    def runner(self, stage: str):
        return StubRunner(stage, getattr(self, stage))

    def face3d_recon(self, aligned_image):
        return {"coeffs": np.full((1, 257), 0.01 * float(aligned_image.mean()), np.float32)}

    def kp_detector(self, source_image):
        kp = np.random.default_rng(0).uniform(-0.5, 0.5, (1, 15, 3)) + 0.01 * float(source_image.mean())
        return {"kp_canonical": kp.astype(np.float32)}

    def source_encoder(self, source_image):
        f = self.size // 4
        return {"feature_3d": np.zeros((1, 32, 16, f, f), np.float32),
                "source_compressed": np.zeros((1, 4, 16, f, f), np.float32)}

    def mapping(self, kp_canonical, semantics):
        centre = semantics[:, :, semantics.shape[2] // 2].astype(np.float64)
        out = []
        for coeffs in centre:
            rotation = _rotation(coeffs[65], coeffs[64], coeffs[66])
            out.append(kp_canonical[0] @ rotation.T + 0.02 * coeffs[:45].reshape(15, 3))
        return {"kp": np.stack(out).astype(np.float32)}

    def renderer(self, feature_3d, source_compressed, kp_source, kp_driving):
        x1, y1, x2, y2 = self.box
        frames = np.repeat(self.background[None], kp_driving.shape[0], axis=0).copy()
        for b, kp in enumerate(kp_driving):
            motion = min(1.0, 100.0 * float(np.abs(kp - kp_source[0]).mean()))
            frames[b, :, y1:y2, x1:x2] += MOUTH_GAIN * motion
        return {"frames": frames}

    def audio2exp(self, indiv_mels, ref_exp, blink):
        t = np.arange(ref_exp.shape[0])[:, None] + np.arange(64)[None]
        return {"exp": (ref_exp + 0.5 * np.sin(t)).astype(np.float32)}

    def audio2pose(self, indiv_mels, ref_pose, pose_style, noise):
        t = 0.3 * np.arange(32)[:, None] + np.arange(6)[None]
        return {"motion": (0.05 * np.sin(t)).astype(np.float32)}


class FrozenMapping(StubBackend):
    """A broken backend: the mapping ignores the motion coefficients, so every frame gets the source keypoints
    (kp_driving = kp_source): the head and the mouth never move."""

    name = "frozen"

    def mapping(self, kp_canonical, semantics):
        return {"kp": np.repeat(kp_canonical, semantics.shape[0], axis=0)}


def _stub_opener(cls):
    def opener(ctx):
        return bench.Opened(cls(ctx.config.size), "stub", "cpu", "fp32", {s: "fp32" for s in ctx.stages})
    return opener


STUB_OPENERS = {"official": _stub_opener(StubBackend), "stub": _stub_opener(StubBackend),
                "frozen": _stub_opener(FrozenMapping)}


@pytest.fixture(scope="module")
def report() -> dict:
    config = bench.BenchConfig(weights=WeightSource(synthetic_seed=0, size=SIZE), size=SIZE,
                               backends=("stub", "frozen", "torch-fp16"), batch_sizes=(2, 1), frames=4, warmup=1,
                               repeats=2, rounds=3, device="cpu", mouth_box="fixed")
    return bench.run_bench(config, openers=STUB_OPENERS, command="sadtalker-rt bench (test)")


def _by_name(report: dict) -> dict:
    return {b["name"]: b for b in report["backends"]}


def test_report_validates_against_the_documented_schema(report):
    import jsonschema

    schema = json.loads(bench.SCHEMA_FILE.read_text())      # the file shipped as package data
    jsonschema.Draft202012Validator.check_schema(schema)
    text = json.dumps(bench.to_json_ready(report), allow_nan=False)
    jsonschema.validate(json.loads(text), schema)
    assert report["schema_version"] == bench.SCHEMA_VERSION and report["command"] == "sadtalker-rt bench (test)"
    cfg = report["config"]
    assert cfg["thresholds"]["kp_max_abs"]["limit"] == bench.END_TO_END_TOLERANCES["kp_max_abs"].limit
    renderer_fp32 = cfg["thresholds"]["renderer.frames.fp32"]
    assert renderer_fp32["limit"] == STAGES["renderer"].rtol_fp32 and renderer_fp32["source"] == "stages.renderer.fp32"
    load = report["machine_load"]
    assert load["cpu_count"] >= 1 and len(load["load_average_rounds"]) == 3 and load["load_average_start"]
    broken = json.loads(text)
    del broken["backends"][0]["stages"]["renderer"]["runs"][0]["ms_per_call_rounds"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    assert cfg["weights"] == {"identity": "synthetic-0", "description": WeightSource(synthetic_seed=0).describe(),
                              "synthetic": True}
    assert cfg["frames"] == 4 and cfg["end_to_end_batch"] == 2 and cfg["mouth_box"]["source"] == "fixed"
    assert cfg["image"].startswith("sadtalker_rt/assets/")      # the bundled inputs, by their place in the package


def test_ratios_are_medians_of_per_round_ratios_against_the_official_baseline(report):
    baseline = report["baseline"]
    assert baseline["name"] == "official" and baseline["end_to_end"]["speedup_vs_official"]["median"] == pytest.approx(1)
    stub = _by_name(report)["stub"]
    for stage, info in stub["stages"].items():
        ref = baseline["stages"][stage]["runs"][0]
        for run in info["runs"]:
            assert len(run["ms_per_call_rounds"]) == 3 and run["calls"] == 3 * 2     # rounds x repeats
            per = (ref["frames_per_call"], run["frames_per_call"]) if run["frames_per_call"] else (1, 1)
            ratios = [(a / per[0]) / (b / per[1]) for a, b in zip(ref["ms_per_call_rounds"], run["ms_per_call_rounds"])]
            ratio = run["speedup_vs_official"]
            assert ratio["rounds"] == pytest.approx(ratios)
            assert ratio["median"] == pytest.approx(float(np.median(ratios)))
            assert ratio["min"] == pytest.approx(min(ratios)) and ratio["max"] == pytest.approx(max(ratios))
    assert [r["batch"] for r in stub["stages"]["renderer"]["runs"]] == [2, 1]
    assert baseline["stages"]["renderer"]["runs"][0]["batch"] == bench.OFFICIAL_BATCH
    e2e, ref = stub["end_to_end"], baseline["end_to_end"]
    assert e2e["rounds"] == 3 and len(e2e["wall_s_rounds"]) == 3
    walls = [a / b for a, b in zip(ref["wall_s_rounds"], e2e["wall_s_rounds"])]
    assert e2e["speedup_vs_official"]["median"] == pytest.approx(float(np.median(walls)))
    assert e2e["frames"] == 4 and e2e["calls"]["renderer"] == 2
    assert sum(e2e["stage_share"].values()) == pytest.approx(1.0, abs=1e-6)


def test_timings_cover_every_stage_and_batch(report):
    stub = _by_name(report)["stub"]
    runs = {r["batch"]: r for r in stub["stages"]["renderer"]["runs"]}
    assert set(runs) == {2, 1}
    face = stub["stages"]["face3d_recon"]["runs"][0]
    assert face["ms_per_frame"] is None and face["fps"] is None
    assert stub["stages"]["audio2pose"]["runs"][0]["frames_per_call"] == bench.POSE_CHUNK
    for run in runs.values():
        stats = run["ms_per_call"]
        assert stats["min"] <= stats["median"] <= stats["p95"]
        assert run["peak_rss_mib"] > 0


def test_spread_is_median_min_max():
    assert bench.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "rounds": [3.0, 1.0, 2.0]}
    assert bench.spread([]) is None


class Recorder(SerialBackend):
    """A fake backend that writes every call, with the backend's name, into one shared list."""

    def __init__(self, name: str, calls: list, size: int = SIZE, seconds_per_call: float = 0.0):
        self.inner = StubBackend(size)
        self.name, self.calls, self.size, self.seconds_per_call = name, calls, size, seconds_per_call

    def runner(self, stage: str):
        inner, name, calls, seconds = self.inner.runner(stage), self.name, self.calls, self.seconds_per_call

        class _Runner:
            def __init__(self):
                self.stage = inner.stage

            def infer(self, feeds):
                calls.append((name, stage, {k: np.asarray(v).tobytes() for k, v in feeds.items()}))
                time.sleep(seconds)
                return inner.infer(feeds)
        return _Runner()


def test_backends_are_timed_interleaved_round_by_round_on_the_same_inputs():
    calls: list = []

    def opener(name):
        return lambda ctx: bench.Opened(Recorder(name, calls, ctx.config.size), "stub", "cpu", "fp32",
                                        {s: "fp32" for s in ctx.stages})

    openers = {"official": opener("official"), "a": opener("a"), "b": opener("b")}
    config = bench.BenchConfig(weights=WeightSource(synthetic_seed=0, size=SIZE), size=SIZE, backends=("a", "b"),
                               frames=2, warmup=0, repeats=1, rounds=3, device="cpu", mouth_box="fixed")
    marks: list = []
    report = bench.run_bench(config, openers=openers, log=lambda line: marks.append((line, len(calls))))
    assert report["config"]["order"] == ["official", "a", "b"]
    start = next(n for line, n in marks if line.startswith("timing round 1/3"))
    timed = calls[start:]
    runs = [timed[0][0]]                    # consecutive calls of one backend collapse into one entry
    for name, _, _ in timed[1:]:
        if name != runs[-1]:
            runs.append(name)
    turns = 3 * (len(report["baseline"]["stages"]) + 1)     # each round: a turn per stage, then end to end
    assert runs == ["official", "a", "b"] * turns           # the same order every time
    a = [(stage, feeds) for n, stage, feeds in timed if n == "a"]
    b = [(stage, feeds) for n, stage, feeds in timed if n == "b"]
    assert a == b                           # the same stages, the same inputs, byte for byte
    assert len(a) % 3 == 0 and a[: len(a) // 3] * 3 == a


def test_short_stages_are_timed_in_bursts_of_the_minimum_length():
    calls: list = []

    def opener(name):
        return lambda ctx: bench.Opened(Recorder(name, calls, ctx.config.size, 0.002), "stub", "cpu", "fp32",
                                        {s: "fp32" for s in ctx.stages})

    config = bench.BenchConfig(weights=WeightSource(synthetic_seed=0, size=SIZE), size=SIZE, backends=("a",),
                               frames=2, warmup=0, repeats=1, rounds=2, device="cpu", mouth_box="fixed",
                               end_to_end_rounds=False, min_stage_s=0.02)
    marks: list = []
    report = bench.run_bench(config, openers={"official": opener("official"), "a": opener("a")},
                             log=lambda line: marks.append((line, len(calls))))
    timed = calls[next(n for line, n in marks if line.startswith("timing round 1/2")):]
    for stage, info in _by_name(report)["a"]["stages"].items():
        turns = [n for n, s, _ in timed if s == stage]
        assert turns.count("a") == info["runs"][0]["calls"] and turns.count("official") >= 2 * 5
        assert turns.count("a") >= 2 * 5                    # 2 ms calls: about 10 a round fill 20 ms
    assert report["config"]["min_stage_s"] == 0.02


def test_threads_hold_torch_to_the_given_count_during_the_run_and_restore_it():
    import torch

    seen: set = set()

    class Counting(Recorder):
        def runner(self, stage):
            inner = super().runner(stage)
            infer = inner.infer
            inner.infer = lambda feeds: (seen.add(torch.get_num_threads()), infer(feeds))[1]
            return inner

    def opener(name):
        return lambda ctx: bench.Opened(Counting(name, []), "stub", "cpu", "fp32", {s: "fp32" for s in ctx.stages})

    before = torch.get_num_threads()
    config = bench.BenchConfig(weights=WeightSource(synthetic_seed=0, size=SIZE), size=SIZE, backends=("a",),
                               frames=2, warmup=0, repeats=1, rounds=1, device="cpu", mouth_box="fixed",
                               end_to_end_rounds=False, threads=1)
    report = bench.run_bench(config, openers={"official": opener("official"), "a": opener("a")})
    assert seen == {1} and torch.get_num_threads() == before
    assert report["config"]["threads"] == 1 and report["environment"]["cpu"]["torch_threads"] == 1
    assert "1 thread(s) per call in every backend" in bench.to_markdown(report)
    with pytest.raises(bench.UsageError, match="--threads"):
        bench.BenchConfig(weights=WeightSource(synthetic_seed=0, size=SIZE), threads=-1).validate()


def test_onnxruntime_backend_gives_every_session_the_thread_count(fp32_graphs):
    from sadtalker_rt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(fp32_graphs, intra_op_threads=1)
    for stage in ("mapping", "audio2exp"):
        assert backend.runner(stage).session.get_session_options().intra_op_num_threads == 1


def test_stage_verdicts_use_the_stage_tables_tolerances():
    from sadtalker_rt.parity import judge

    ref = {"frames": np.full((1, 3, 16, 16), 0.5, np.float32)}
    noisy = {"frames": ref["frames"] + np.float32(2e-3)}           # 54 dB, rel 2e-3
    rows, checks = bench.stage_parity("renderer", "fp32", noisy, ref, 1)
    assert not checks[0]["passed"] and checks[0]["metric"] == "max_rel" and checks[0]["source"] == "stages.renderer.fp32"
    assert checks[0]["limit"] == STAGES["renderer"].rtol_fp32
    for reduced in ("fp16", "fp16-autocast", "tf32"):
        rows, checks = bench.stage_parity("renderer", reduced, noisy, ref, 1)
        assert checks[0]["passed"] and checks[0]["metric"] == "psnr_db" and checks[0]["op"] == ">="
        assert rows["outputs"][0]["psnr_db"] == pytest.approx(20 * np.log10(1 / 2e-3), abs=1e-3)
    kp = {"kp": np.zeros((1, 15, 3), np.float32)}
    rows, checks = bench.stage_parity("mapping", "fp16", {"kp": kp["kp"] + 0.06}, kp, 1)
    assert not checks[0]["passed"] and checks[0]["limit"] == pytest.approx(5e-2)
    missing = judge("x", np.zeros(3), np.zeros(4), STAGES["mapping"].tolerance("fp32", "kp"))
    assert not missing.passed and "shape" in missing.problem
    nan = judge("kp", np.array([np.nan]), np.array([0.0]), STAGES["mapping"].tolerance("fp16", "kp"))
    assert not nan.passed


def test_torch_fp32_is_labelled_fp32_and_cpu_fp16_parity_is_emulated(tmp_path):
    from sadtalker_rt.bench import backends

    ctx = bench.BenchContext(bench.BenchConfig(weights=WeightSource(synthetic_seed=0, size=SIZE)), "cpu", tmp_path,
                             ("renderer",), lambda *a: None)
    ctx.torch_backends[("fp32", False)] = object()      # no model is built
    assert backends.open_torch(ctx).precision == "fp32"
    assert backends.open_torch(ctx).stage_precision == {"renderer": "fp32"}
    with pytest.raises(bench.BackendSkipped):
        backends.open_torch_fp16(ctx)
    from sadtalker_rt.bench.fp16 import EmulatedFp16Backend
    assert "emulated" in EmulatedFp16Backend.METHOD


def test_a_matching_backend_passes_parity(report):
    parity = _by_name(report)["stub"]["parity"]
    assert parity["passed"], parity["failures"]
    assert parity["end_to_end"]["kp_max_abs"] == 0.0
    assert parity["end_to_end"]["frame_psnr_db"]["min"] == math.inf
    assert set(parity["stages"]) == {"face3d_recon", "kp_detector", "source_encoder", "mapping", "renderer",
                                     "audio2exp", "audio2pose"}


def test_a_frozen_head_fails_keypoint_pose_and_mouth_parity_while_frame_psnr_passes(report):
    parity = _by_name(report)["frozen"]["parity"]
    assert not parity["passed"]
    verdicts = {c["metric"]: c["passed"] for c in parity["checks"] if c["scope"] == "end_to_end"}
    assert verdicts == {"frame_psnr_db": True, "frame_ssim": True, "mouth_psnr_db": False, "kp_max_abs": False,
                        "head_pose_deg": False}
    e2e = parity["end_to_end"]
    assert e2e["frame_psnr_db"]["min"] >= bench.END_TO_END_TOLERANCES["frame_psnr_db"].limit
    assert e2e["mouth_psnr_db"]["min"] < e2e["frame_psnr_db"]["min"] - 5
    assert e2e["head_pose_deg"]["max"] > bench.END_TO_END_TOLERANCES["head_pose_deg"].limit
    assert any("kp_max_abs" in f for f in parity["failures"])
    mapping = {c["scope"]: c["passed"] for c in parity["checks"] if c["scope"].startswith("mapping")}
    assert mapping == {"mapping.kp": False}


def test_skipped_backend_is_reported_with_its_reason(report):
    skipped = _by_name(report)["torch-fp16"]
    assert skipped["status"] == "skipped" and "CUDA" in skipped["reason"]
    assert skipped["stages"] == {} and skipped["parity"] is None


def test_markdown_lists_every_backend(report):
    text = bench.to_markdown(report)
    for name in ("official", "stub", "frozen", "torch-fp16"):
        assert f"| {name} |" in text
    assert "vs official" in text and "mouth PSNR" in text and "**FAIL**" in text
    assert "- command: `sadtalker-rt bench (test)`" in text and "1-minute load average" in text
    assert "torch-fp16 skipped: torch FP16" in text
    # the same markdown from the JSON file (non-finite numbers written as strings)
    assert bench.to_markdown(json.loads(json.dumps(bench.to_json_ready(report)))) == text


def test_head_pose_recovery_matches_the_mapping_convention():
    torch = pytest.importorskip("torch")
    from sadtalker_rt.models.mapping import rotation_matrix

    rotation = rotation_matrix(torch.tensor([12.0]), torch.tensor([-7.0]), torch.tensor([3.5]))[0].double().numpy()
    kp = np.random.default_rng(1).uniform(-0.5, 0.5, (15, 3))
    fitted = bench.kabsch_rotation(kp, kp @ rotation.T + 0.2)
    # the mapping converts degrees with 3.14, not pi: 0.05 % off
    np.testing.assert_allclose(bench.euler_degrees(fitted), [12.0 * 3.14 / math.pi, -7.0 * 3.14 / math.pi,
                                                             3.5 * 3.14 / math.pi], atol=1e-6)
    delta = bench.head_pose_delta(kp[None], (kp @ rotation.T)[None], kp[None])
    assert delta["yaw"] == pytest.approx(12.0 * 3.14 / math.pi, abs=1e-6) and delta["max"] == delta["yaw"]


def test_backend_lists_expand_and_refuse_unknown_names():
    known = tuple(n for n in bench.OPENERS if n != "official")
    assert bench.expand_backends(("torch", "onnxruntime"), known) == ("torch", "onnxruntime-fp32", "onnxruntime-fp16")
    with pytest.raises(bench.UsageError, match="unknown backend 'tensorflow'"):
        bench.expand_backends(("tensorflow",), known)
    assert bench.parse_list("1, 2,8", int) == (1, 2, 8)
    with pytest.raises(bench.UsageError):
        bench.parse_list("1,two", int)
    assert bench.default_backends("cpu", None) == ("torch", "onnxruntime-fp32", "onnxruntime-fp16")


def test_cli_bench_exits_0_and_writes_both_files(tmp_path, monkeypatch):
    for name, opener in STUB_OPENERS.items():
        monkeypatch.setitem(bench.OPENERS, name, opener)
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["bench", "--synthetic-weights", "--size", "256", "--frames", "2", "--backends", "stub", "--warmup", "0",
            "--repeats", "1", "--min-stage-ms", "0", "--rounds", "2", "--device", "cpu", "--json", str(out_json), "--markdown", str(out_md), "--quiet"]
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    assert code == 0
    import jsonschema

    data = json.loads(out_json.read_text())
    jsonschema.validate(data, bench.schema())
    assert [b["name"] for b in data["backends"]] == ["stub"]
    assert data["command"].startswith("sadtalker-rt bench --synthetic-weights") and "--rounds 2" in data["command"]
    assert data["config"]["rounds"] == 2
    assert f"- command: `{data['command']}`" in out_md.read_text()


def test_cli_bench_exits_1_when_parity_fails(tmp_path, monkeypatch):
    for name, opener in STUB_OPENERS.items():
        monkeypatch.setitem(bench.OPENERS, name, opener)
    args = ["bench", "--synthetic-weights", "--frames", "3", "--backends", "frozen", "--warmup", "0", "--repeats", "1",
            "--min-stage-ms", "0", "--device", "cpu", "--markdown", str(tmp_path / "b.md"), "--quiet"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1 and (tmp_path / "b.md").is_file()


def test_bench_module_imports_no_heavy_dependency():
    import subprocess
    import sys

    code = "import sys, sadtalker_rt.bench; print(any(m in sys.modules for m in ('torch', 'onnxruntime', 'tensorrt')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.heavy
def test_real_models_torch_backend_matches_the_official_loop(tmp_path):
    """Synthetic weights at 256, two frames: the cached-source torch renderer equals the official loop."""
    config = bench.BenchConfig(weights=WeightSource(synthetic_seed=0, size=SIZE), size=SIZE, backends=("torch",),
                               frames=2, warmup=0, repeats=1, device="cpu")
    result = bench.run_bench(config)
    torch_run = _by_name(result)["torch"]
    assert torch_run["status"] == "ok" and torch_run["parity"]["passed"], torch_run["parity"]["failures"]
    assert torch_run["parity"]["end_to_end"]["frame_psnr_db"]["min"] > 60
