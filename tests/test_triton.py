"""Triton Inference Server: the generated model repository, served by a real ``tritonserver`` (the binary bundled
in the nvidia-pytriton wheel) on loopback, against the offline pipeline."""
from __future__ import annotations

import itertools
import json
import os
import threading
import time
from typing import Optional

import numpy as np
import pytest

from sadtalker_rt import media
from sadtalker_rt.models.checkpoints import WeightSource
from sadtalker_rt.runtime.pipeline import Options, TalkingHead
from sadtalker_rt.stages import FPS, SAMPLES_PER_FRAME, STAGES
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
    """The offline ``run`` path on the same graphs: the demo speech, and the frames of ``audio`` (only the first
    ``first`` of them rendered, when given)."""
    head = TalkingHead.from_engines(graphs, backend="onnxruntime")
    avatar = head.prepare_avatar(media.load_image(media.demo_image()), "crop")
    wav = media.load_audio(media.demo_audio())

    def frames(audio: np.ndarray, options: Options, first: Optional[int] = None) -> list[np.ndarray]:
        motion = head.motion(avatar, audio, options)
        return [f.image for f in itertools.islice(head.render(avatar, motion, options), first)]

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
    glue = [layout.AVATAR, layout.TALKING_HEAD, layout.TALKING_HEAD_WHOLE]
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted([*served, *glue])
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
    for name in glue:
        config = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.backend == "python" and config.model_transaction_policy.decoupled == (name != layout.AVATAR)
        assert config.HasField("sequence_batching") == (name == layout.TALKING_HEAD)
    controls = {c.name: [k.kind for k in c.control] for c in text_format.Parse(
        (repo / layout.TALKING_HEAD / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    ).sequence_batching.control_input}
    kinds = model_config_pb2.ModelSequenceBatching.Control
    assert controls == {layout.SEQUENCE_START: [kinds.CONTROL_SEQUENCE_START],
                        layout.SEQUENCE_END: [kinds.CONTROL_SEQUENCE_END],
                        layout.SEQUENCE_ID: [kinds.CONTROL_SEQUENCE_CORRID]}
    # The batched mapping graph computes each avatar's row as the exported graph does one avatar at a time.
    assert check_batched_graph(graphs / "mapping.onnx", repo / "mapping" / "1" / "model.onnx", STAGES["mapping"], 256) \
        <= STAGES["mapping"].rtol_fp32


def _pcm16(wav: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(wav * 32768), -32768, 32767).astype("<i2")


@needs_server
def test_audio_in_chunks_over_one_grpc_stream_gives_the_offline_frames(server, offline):
    wav, offline_frames = offline
    client = _client(f"triton://{server.grpc_url}")
    avatar = client.prepare_avatar(media.demo_image())
    assert client.prepare_avatar(media.demo_image()) == avatar       # the same photo is prepared once
    options = Options(batch_size=1, seed=3)
    # A short clip in uneven chunks (PCM16 bytes, as a microphone sends them): every frame equals the offline run.
    pcm = _pcm16(wav[: 2 * SAMPLES_PER_FRAME])
    cuts = [0, 1, 333, 334, 1100, len(pcm)]
    streamed = list(client.stream_chunks(avatar, (pcm[a:b].tobytes() for a, b in zip(cuts, cuts[1:])), options))
    assert [f.index for f in streamed] == [0, 1]
    for got, want in zip(streamed, offline_frames(pcm / np.float32(32768), options)):
        assert got.image.shape == want.shape
        assert np.abs(got.image.astype(int) - want).max() <= 1


@needs_server
@pytest.mark.heavy
def test_a_frame_arrives_as_soon_as_final_while_the_stream_is_open(server, offline):
    """The first frame of an open utterance arrives once final (its inputs need about 36 frames of audio), before
    the end is sent, and equals the offline first frame of the same audio. Closing cancels the rest."""
    wav, offline_frames = offline
    client = _client(f"triton://{server.grpc_url}")
    avatar = client.prepare_avatar(media.demo_image())
    options = Options(batch_size=1, seed=3)
    long = _pcm16(wav[: 40 * SAMPLES_PER_FRAME])
    session = client.open_stream(avatar, options)
    try:
        for start in range(0, len(long), 4000):
            session.send(long[start:start + 4000].tobytes())
        first = next(iter(session))
        assert not session.ended and first.index == 0
    finally:
        session.close()
    expected = offline_frames(long / np.float32(32768), options, first=1)[0]
    assert np.abs(first.image.astype(int) - expected).max() <= 1


@needs_server
@pytest.mark.heavy
def test_grpc_whole_audio_equals_the_offline_run(server, offline):
    wav, offline_frames = offline
    client = _client(f"triton://{server.grpc_url}")
    avatar = client.prepare_avatar(media.demo_image())
    options = Options(batch_size=2)
    streamed = list(client.stream(avatar, wav[: 2 * SAMPLES_PER_FRAME], options))
    assert [f.index for f in streamed] == [0, 1]
    for got, want in zip(streamed, offline_frames(wav[: 2 * SAMPLES_PER_FRAME], options)):
        assert np.abs(got.image.astype(int) - want).max() <= 1


@needs_server
@pytest.mark.heavy
def test_http_stream_equals_the_offline_run(server, offline):
    wav, offline_frames = offline
    client = _client(f"http://{server.http_url}")
    avatar = client.prepare_avatar(media.demo_image())
    streamed = list(client.stream(avatar, wav[: 2 * SAMPLES_PER_FRAME], Options(batch_size=1)))
    expected = offline_frames(wav[: 2 * SAMPLES_PER_FRAME], Options(batch_size=1))
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
    expected = offline_frames(wav[: 2 * SAMPLES_PER_FRAME], Options(batch_size=1))
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


@needs_server
@pytest.mark.heavy
def test_serve_with_a_triton_engine_streams_the_offline_frames(server, offline, tmp_path):
    """``sadtalker-rt serve --engine triton://``: the browser-facing app gets avatars and frames from Triton."""
    pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
    httpx = pytest.importorskip("httpx")
    import io

    from PIL import Image
    from websockets.sync.client import connect

    from sadtalker_rt.runtime.frames import Frame
    from sadtalker_rt.serving.app import FRAME_HEADER
    from sadtalker_rt.serving.engines import engine_from
    from sadtalker_rt.serving.limits import ServeConfig
    from sadtalker_rt.serving.server import make_server

    wav, offline_frames = offline
    pcm = _pcm16(wav[: 2 * SAMPLES_PER_FRAME])
    app_server = make_server(engine_from(f"triton://{server.grpc_url}"), "127.0.0.1", 0, ServeConfig(batch_size=1))
    thread = threading.Thread(target=app_server.run, name="uvicorn-triton-test")
    thread.start()
    try:
        while not app_server.started:
            assert thread.is_alive(), "the app did not start"
            time.sleep(0.05)
        port = app_server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            reply = http.post("/avatars", files={"photo": media.demo_image().read_bytes()})
            assert reply.status_code == 200, reply.text
            avatar = reply.json()["avatar"]
        frames = []
        with connect(f"ws://127.0.0.1:{port}/stream?avatar={avatar}&seed=1") as ws:
            for start in range(0, len(pcm), 500):          # 31 ms chunks, forwarded to Triton as they come
                ws.send(pcm[start:start + 500].tobytes())
            ws.send("end")
            while isinstance(message := ws.recv(timeout=1800), bytes):
                frames.append(message)
            assert json.loads(message) == {"type": "end", "frames": 2}
    finally:
        app_server.should_exit = True
        thread.join(30)
    expected = offline_frames(pcm / np.float32(32768), Options(seed=1, batch_size=1))
    service = app_server.config.app.state.service
    for k, (got, want) in enumerate(zip(frames, expected)):
        assert FRAME_HEADER.unpack(got[:12]) == (k, k / FPS)
        # JPEG of the offline frame (the stream's frames are within 1 of it: other processes, batched graphs)
        decoded = np.asarray(Image.open(io.BytesIO(got[12:])), int)
        reference = np.asarray(Image.open(io.BytesIO(service.encode(Frame(k, k / FPS, want))[12:])), int)
        assert np.abs(decoded - reference).max() <= 2, k


@pytest.mark.parametrize("engine, code, words", [("triton://127.0.0.1:9", 8, "does not answer"),
                                                   ("http://127.0.0.1:9", 2, "triton://HOST:PORT")])
def test_serve_with_a_bad_triton_endpoint_is_one_line_and_a_nonzero_exit(engine, code, words, capsys):
    pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
    from sadtalker_rt.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--engine", engine, "--port", "0"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == code and len(err.splitlines()) == 1 and words in err, err


@needs_server
@pytest.mark.heavy
def test_triton_bench_interleaves_the_levels_and_counts_the_batches_triton_formed(server):
    from sadtalker_rt.triton import bench

    lines: list[str] = []
    report = bench.run(f"triton://{server.grpc_url}", None, None, 1, [1, 2], rounds=2, log=lines.append)
    assert [line.split(":")[0] + ":" + line.split(":")[1][:2] for line in lines if line.startswith("round")] == \
        ["round 1/2: 1", "round 1/2: 2", "round 2/2: 1", "round 2/2: 2"]
    for result in report["results"]:
        assert result["rounds"] == 2 and not result["errors"] and not result["skipped"]
        renderer = result["batches"]["renderer"]
        assert sum(int(size) * count for size, count in renderer.items()) == 2 * result["streams"]
    assert report["load_average"][0] <= report["load_average"][1]
    # Not enough memory for a run: skipped with the reason, nothing crashes.
    starved = bench.run(f"triton://{server.grpc_url}", None, None, 1, [4], min_free_mb=1e9)
    assert starved["results"][0]["rounds"] == 0 and "available" in starved["results"][0]["skipped"][0]
    assert "skipped" in bench.to_markdown(starved)
