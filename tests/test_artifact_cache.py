"""Artifacts keyed by content, and backend options checked together (nothing silently ignored)."""
from __future__ import annotations

import json

import pytest

from sadtalker_rt.backend_choice import BackendChoice
from sadtalker_rt.build import cache
from sadtalker_rt.errors import UsageError
from sadtalker_rt.models.checkpoints import SUBNETWORKS, WeightSource, safetensors_name
from sadtalker_rt.runtime.manifest import MANIFEST


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SADTALKER_RT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def exports(monkeypatch):
    """Records export calls; writes a manifest like a finished export, or fails halfway when told to."""
    calls = []

    def fake_export(weights, size, out_dir, precision="fp32", grid_sample="native", progress=None, **_):
        calls.append((weights.identity(), size, precision, grid_sample))
        (out_dir / "renderer.onnx").write_bytes(b"graph")
        if fake_export.fail:
            raise KeyboardInterrupt
        (out_dir / MANIFEST).write_text(json.dumps({"size": size, "precision": precision}))

    fake_export.fail = False
    monkeypatch.setattr("sadtalker_rt.build.export.onnx_export.export_graphs", fake_export)
    return fake_export, calls


def test_graphs_are_made_once_per_key_and_reused(cache_dir, exports):
    _, calls = exports
    weights = WeightSource(synthetic_seed=0)
    first = cache.graphs_for(weights, 256, "fp32")
    assert cache.graphs_for(weights, 256, "fp32") == first and len(calls) == 1
    assert json.loads((first / "cache-key.json").read_text())["weights"] == "synthetic-0"
    others = {cache.graphs_for(weights, 256, "fp16"), cache.graphs_for(weights, 512, "fp32"),
              cache.graphs_for(weights, 256, "fp32", "decomposed"), cache.graphs_for(WeightSource(synthetic_seed=1), 256, "fp32")}
    assert first not in others and len(others) == 4 and len(calls) == 5


def test_an_interrupted_export_leaves_nothing_that_looks_finished(cache_dir, exports):
    fake, calls = exports
    fake.fail = True
    with pytest.raises(KeyboardInterrupt):
        cache.graphs_for(WeightSource(synthetic_seed=0), 256, "fp32")
    assert not list((cache_dir / "graphs").iterdir())
    fake.fail = False
    assert (cache.graphs_for(WeightSource(synthetic_seed=0), 256, "fp32") / MANIFEST).is_file() and len(calls) == 2


def test_official_weights_are_keyed_by_their_bytes(tmp_path, cache_dir):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in (safetensors_name(256), SUBNETWORKS["mapping"].legacy_file, SUBNETWORKS["mapping_full"].legacy_file):
        (folder / name).write_bytes(b"a" * 10)
    weights = WeightSource(folder, size=256)
    assert len(weights.files()) == 3
    before = cache.weights_digest(weights)
    assert cache.weights_digest(weights) == before
    path = weights.files()[0]
    path.write_bytes(b"b" * 10)            # same size; the digest follows the content
    assert cache.weights_digest(weights) != before


@pytest.mark.parametrize("choice, message", [
    (dict(backend="onnxruntime", cuda_graphs=True), "--cuda-graphs is for"),
    (dict(backend="torch", graphs="g"), "--graphs is for --backend onnxruntime"),
    (dict(backend="torch", engines="e"), "--engines is for --backend tensorrt"),
    (dict(backend="torch", precision="fp16"), "cuda only"),
    (dict(backend="torch", cuda_graphs=True), "needs --device cuda"),
    (dict(backend="tensorrt", graphs="g"), "--graphs is for --backend onnxruntime"),
    (dict(backend="tensorrt", device="cpu"), "runs on cuda"),
    (dict(backend="onnxruntime", graphs="g", engines="e"), "--engines is for --backend tensorrt"),
    (dict(backend="tvm"), "--backend must be one of"),
    (dict(precision="int4"), "--precision must be"),
])
def test_options_a_backend_would_ignore_are_refused(choice, message):
    with pytest.raises(UsageError, match=message):
        BackendChoice(**choice).check()


def test_engines_for_onnxruntime_is_an_alias_of_graphs_for_one_release():
    choice = BackendChoice(backend="onnxruntime", engines="exported")
    choice.check()
    assert choice.graphs == "exported" and choice.engines is None
    assert "deprecated" in choice.notes_for_user[0]


def test_cached_engines_that_failed_parity_are_refused(cache_dir, monkeypatch, tmp_path):
    from sadtalker_rt.build.export.onnx_export import ExportValidationError
    from sadtalker_rt.build.tensorrt import BuildResult

    records = {"stages": {"mapping": {"parity_passed": True}, "renderer": {"parity_passed": False}}}
    monkeypatch.setattr("sadtalker_rt.build.tensorrt.build_engines",
                        lambda graphs, folder, **_: BuildResult(records, {}, ["mapping", "renderer"]))
    with pytest.raises(ExportValidationError, match="renderer engine"):
        cache.engines_for(tmp_path / "graphs-key")
    records["stages"]["renderer"]["parity_passed"] = True
    assert cache.engines_for(tmp_path / "graphs-key") == cache_dir / "engines" / "graphs-key"


@pytest.mark.parametrize("precision, expected", [(None, "the default: no reduced-precision CPU path passes"),
                                                 ("fp32", "(--precision fp32)")])
def test_run_on_cpu_says_which_path_renders(precision, expected):
    from sadtalker_rt.backend_choice import CPU_DEFAULT_PRECISION

    class Head:
        @classmethod
        def from_weights(cls, weights, size, device, precision, cuda_graphs):
            head = cls()
            head.backend = type("Backend", (), {"notes": [], "precision": precision})()
            return head

    choice = BackendChoice("torch", None, precision)
    choice.check()
    head = choice.open(Head, None, 0, 256, False)
    cpu_line = [n for n in head.backend.notes if n.startswith("rendering on cpu")]
    assert len(cpu_line) == 1 and expected in cpu_line[0]
    assert head.backend.precision == (precision or CPU_DEFAULT_PRECISION) == "fp32"
