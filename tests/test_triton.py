"""Triton Inference Server: the generated model repository, served by a real ``tritonserver`` (the binary bundled
in the nvidia-pytriton wheel) on loopback, against the offline pipeline."""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

from sadtalker_rt import media
from sadtalker_rt.models.checkpoints import WeightSource
from sadtalker_rt.runtime.pipeline import Options, TalkingHead
from sadtalker_rt.stages import SAMPLES_PER_FRAME, STAGES
from sadtalker_rt.triton import layout
from sadtalker_rt.triton.repository import Placement, check_batched_graph, write_repository
from sadtalker_rt.triton.server import INSTALL_HINT, TritonServer, bundled_server

pytest.importorskip("tritonclient.grpc", reason="needs tritonclient (the triton extra)")
needs_server = pytest.mark.skipif(bundled_server() is None, reason=f"no tritonserver binary ({INSTALL_HINT})")


@pytest.fixture(scope="session")
def graphs(fp32_graphs):
    return fp32_graphs


@pytest.fixture(scope="module")
def python_repo(graphs, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    write_repository(graphs, root / "repo", "python", placement=Placement(kind="cpu"),
                     avatar_store=str(root / "avatars"), check=False)
    return root / "repo"


@pytest.fixture(scope="module")
def server(python_repo):
    process = TritonServer(python_repo)
    try:
        yield process.start()
    finally:
        process.close()


@pytest.fixture(scope="module")
def offline(graphs):
    """The offline ``run`` path on the same graphs: avatar and frames of the first ``n`` frames of the demo speech."""
    head = TalkingHead.from_engines(graphs, backend="onnxruntime")
    avatar = head.prepare_avatar(media.load_image(media.demo_image()), "crop")
    wav = media.load_audio(media.demo_audio())

    def frames(n: int, options: Options) -> list[np.ndarray]:
        return [f.image for f in head.generate(avatar, wav[: n * SAMPLES_PER_FRAME], options)]

    return wav, frames


def _client(url: str, **kw):
    from sadtalker_rt.triton.client import TritonClient

    return TritonClient(url, **kw)


def test_native_repository_matches_the_stage_table_and_the_graphs(graphs, tmp_path):
    import onnxruntime as ort
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = tmp_path / "repo"
    write_repository(graphs, repo, "native", placement=Placement("gpu", (0, 1), 2), check=False)
    exported = json.loads((graphs / "manifest.json").read_text())["stages"]
    served = [name for name in STAGES if name in exported]
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted([*served, layout.AVATAR, layout.TALKING_HEAD])
    type_name = model_config_pb2.DataType.Name
    for name in served:
        stage = STAGES[name]
        config = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert [(g.kind, list(g.gpus), g.count) for g in config.instance_group] == \
            [(model_config_pb2.ModelInstanceGroup.KIND_GPU, [0], 2), (model_config_pb2.ModelInstanceGroup.KIND_GPU, [1], 2)]
        session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        graph = {t.name: t for t in session.get_inputs() + session.get_outputs()}
        batch = [config.max_batch_size > 0]
        assert batch == [stage.rate == "frame"]
        for declared, tensors in ((config.input, stage.inputs), (config.output, stage.outputs)):
            assert [t.name for t in declared] == [t.name for t in tensors]
            for entry, tensor in zip(declared, tensors):
                assert type_name(entry.data_type) == "TYPE_" + layout.TRITON_DTYPES[tensor.dtype]
                full = ([-1] if batch[0] else []) + list(entry.dims)
                table = list(tensor.resolve(256, batch=-1, frames=-1))
                assert full == ([-1] + table[1:] if batch[0] else table)
                # A dimension the graph leaves symbolic takes any value Triton declares (onnxruntime backend rule);
                # the batch axis of a batched model must be symbolic in the graph.
                exported = [d if isinstance(d, int) else -1 for d in graph[entry.name].shape]
                assert len(exported) == len(full) and all(e in (-1, f) for e, f in zip(exported, full)), \
                    (name, entry.name, exported, full)
                assert not batch[0] or exported[0] == -1
        if batch[0]:
            assert list(config.dynamic_batching.preferred_batch_size) == [stage.profile[1], stage.profile[2]]
            assert config.max_batch_size == stage.profile[2]
    for glue in (layout.AVATAR, layout.TALKING_HEAD):
        config = text_format.Parse((repo / glue / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.backend == "python" and config.model_transaction_policy.decoupled == (glue == layout.TALKING_HEAD)
    # The batched mapping graph computes each avatar's row as the exported graph does one avatar at a time.
    assert check_batched_graph(graphs / "mapping.onnx", repo / "mapping" / "1" / "model.onnx", STAGES["mapping"], 256) \
        <= 1e-5


@needs_server
def test_grpc_stream_equals_the_offline_run(server, offline):
    wav, offline_frames = offline
    client = _client(f"triton://{server.grpc_url}")
    avatar = client.prepare_avatar(media.demo_image())
    options = Options(batch_size=2)
    streamed = list(client.stream(avatar, wav[: 2 * SAMPLES_PER_FRAME], options))
    assert [f.index for f in streamed] == [0, 1]
    expected = offline_frames(2, options)
    for got, want in zip(streamed, expected):
        assert got.image.shape == want.shape
        assert np.abs(got.image.astype(int) - want).max() <= 1
    assert client.prepare_avatar(media.demo_image()) == avatar       # the same photo is prepared once


@needs_server
@pytest.mark.heavy
def test_http_stream_equals_the_offline_run(server, offline):
    wav, offline_frames = offline
    client = _client(f"http://{server.http_url}")
    avatar = client.prepare_avatar(media.demo_image())
    streamed = list(client.stream(avatar, wav[: 2 * SAMPLES_PER_FRAME], Options(batch_size=1)))
    expected = offline_frames(2, Options(batch_size=1))
    assert [f.index for f in streamed] == [0, 1]
    for got, want in zip(streamed, expected):
        assert np.abs(got.image.astype(int) - want).max() <= 1


@needs_server
@pytest.mark.heavy
def test_four_concurrent_clients_make_renderer_batches(server, offline):
    wav, offline_frames = offline
    client = _client(f"triton://{server.grpc_url}")
    avatar = client.prepare_avatar(media.demo_image())
    before = client.batch_statistics("renderer")
    results, errors = {}, []

    def one(k: int) -> None:
        try:
            results[k] = [f.image for f in _client(f"triton://{server.grpc_url}").stream(
                avatar, wav[: 2 * SAMPLES_PER_FRAME], Options(batch_size=1))]
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors and len(results) == 4
    after = client.batch_statistics("renderer")
    formed = {size: after[size] - before.get(size, 0) for size in after if after[size] - before.get(size, 0)}
    assert sum(size * count for size, count in formed.items()) == 8       # every frame rendered once
    assert max(formed) > 1, formed
    expected = offline_frames(2, Options(batch_size=1))
    for frames in results.values():
        assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(frames, expected))


@needs_server
@pytest.mark.heavy
def test_a_server_killed_mid_stream_leaves_a_clear_error_and_no_file(python_repo, offline, tmp_path):
    from sadtalker_rt.triton.client import ServingError

    wav, _ = offline
    output = tmp_path / "out.mp4"
    process = TritonServer(python_repo)
    try:
        process.start()
        client = _client(f"triton://{process.grpc_url}")
        avatar = client.prepare_avatar(media.demo_image())
        failure = []

        def write() -> None:
            try:
                client.write_video(avatar, wav[: 6 * SAMPLES_PER_FRAME], output, Options(batch_size=1))
            except ServingError as err:
                failure.append(err)

        writer = threading.Thread(target=write)
        writer.start()
        deadline = time.monotonic() + 300
        while sum(client.batch_statistics("renderer").values()) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        process.kill()
        writer.join(timeout=120)
        assert not writer.is_alive() and len(failure) == 1
        assert "stream" in str(failure[0])
        assert not output.exists() and list(tmp_path.iterdir()) == []
        process.stop()
        process.start()                           # the same repository on fresh ports serves again
        again = _client(f"triton://{process.grpc_url}")
        avatar = again.prepare_avatar(media.demo_image())
        again.write_video(avatar, wav[: SAMPLES_PER_FRAME], output, Options(batch_size=1))
        assert output.is_file() and output.stat().st_size > 0
    finally:
        process.close()
