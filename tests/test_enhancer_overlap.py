"""The enhancer overlapped with the renderer: batch k is enhanced while batch k + 1 renders (a worker thread on
host backends, the renderer's streams on GPU backends), with the frames of the sequential path, in order, errors
raised and no thread left behind. The renderer is the stand-in (every other stage real); the enhancer's networks
are cheap numpy stand-ins behind the real alignment, tracking and paste-back."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import CheapRendererBackend
from sadtalker_rt import media
from sadtalker_rt.runtime.enhancer import FaceEnhancer
from sadtalker_rt.runtime.pipeline import Options, TalkingHead
from sadtalker_rt.runtime.scheduler import SerialExecutor, one_batch_ahead

WORKER = "sadtalker-rt-ahead"
OPTIONS = Options(enhancer="gfpgan", enhancer_noise="seeded", seed=3, batch_size=2, duration=0.2)   # 5 frames


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(WORKER)]


class Networks:
    """Stand-ins for GFPGAN and the parsing network: cheap functions of every input (the noise included), so
    a face, noise map or batch fed out of order changes the pixels; ``log`` records each call."""

    def __init__(self, log: list, fail_on_call: int | None = None, on_call=None):
        self.log, self.fail_on_call, self.on_call, self.calls = log, fail_on_call, on_call, 0

    def runner(self, stage: str):
        networks = self

        class Runner:
            @staticmethod
            def infer(feeds):
                face = feeds["face"]
                if stage == "face_parse":
                    return {"parse": (face[:, 0] > face[:, 2]).astype(np.int64) * 5}
                networks.calls += 1
                networks.log.append(("enhance", networks.calls - 1))
                if networks.on_call is not None:
                    networks.on_call(networks.calls - 1)
                if networks.calls - 1 == networks.fail_on_call:
                    raise RuntimeError("enhancer failed on purpose")
                shift = np.stack([feeds[f"noise{i}"].mean(axis=(1, 2, 3)) for i in (0, 5, 9)], 1)[:, :, None, None]
                return {"image": np.tanh(-0.8 * face[:, ::-1] + 0.1 * shift)}

        return Runner()


class LoggingBackend(CheapRendererBackend):
    """The stand-in renderer, logging each renderer call; ``in_worker`` is its executor's choice."""

    def __init__(self, backend, log: list, in_worker: bool, on_render=None, fail_on_render: int | None = None):
        super().__init__(backend)
        self.log, self.in_worker, self.on_render, self.fail_on_render, self.renders = (
            log, in_worker, on_render, fail_on_render, 0)

    def runner(self, stage: str):
        inner = super().runner(stage)
        if stage != "renderer":
            return inner
        backend = self

        class Runner:
            @staticmethod
            def infer(feeds):
                backend.log.append(("render", backend.renders))
                backend.renders += 1
                if backend.on_render is not None:
                    backend.on_render(backend.renders - 1)
                if backend.renders - 1 == backend.fail_on_render:
                    raise RuntimeError("renderer failed on purpose")
                return inner.infer(feeds)

        return Runner()

    def executor(self):
        executor = SerialExecutor(self.runner)
        executor.enhance_in_worker = self.in_worker
        return executor


@pytest.fixture(scope="module")
def motion(real_head, avatar, assets_dir):
    return real_head.motion(avatar, media.load_audio(assets_dir / "RD_Radio31_000.wav"), OPTIONS)


def head_for(real_head, log, in_worker, networks=None, **backend_options) -> TalkingHead:
    head = TalkingHead(LoggingBackend(real_head.backend, log, in_worker, **backend_options), real_head.size)
    head.enhancer = FaceEnhancer(networks or Networks(log), parse=True)
    return head


@pytest.fixture(scope="module")
def sequential(real_head, avatar, motion):
    log: list = []
    return list(head_for(real_head, log, in_worker=False).render(avatar, motion, OPTIONS)), log


def test_worker_thread_gives_the_sequential_frames_in_order(real_head, avatar, motion, sequential):
    expected, _ = sequential
    assert [f.index for f in expected] == list(range(5)) and expected[0].image.shape == (512, 512, 3)
    assert not np.array_equal(expected[0].image, expected[1].image)
    log: list = []
    got = list(head_for(real_head, log, in_worker=True).render(avatar, motion, OPTIONS))
    assert [(f.index, f.timestamp) for f in got] == [(f.index, f.timestamp) for f in expected]
    for g, e in zip(got, expected):
        assert np.array_equal(g.image, e.image), f"frame {g.index} differs from the sequential path"
    assert not workers()


@pytest.mark.parametrize("in_worker, ahead", [(True, None), (False, True)])
def test_worker_enhances_batch_k_while_batch_k_plus_1_renders(real_head, avatar, motion, in_worker, ahead):
    """The enhancement of batch 0 waits until batch 1's renderer call has started: sequentially this would wait
    forever (here: fail after the timeout); with the worker it returns at once. The executor chooses, unless
    ``TalkingHead.enhance_ahead`` says otherwise (CPU backends default to sequential: measured slower)."""
    rendering = threading.Event()
    waited = []

    def on_render(k):
        if k == 1:
            rendering.set()

    def on_call(k):
        if k == 0:
            waited.append(rendering.wait(timeout=20))

    log: list = []
    head = head_for(real_head, log, in_worker, networks=Networks(log, on_call=on_call), on_render=on_render)
    head.enhance_ahead = ahead
    frames = list(head.render(avatar, motion, OPTIONS))
    assert len(frames) == 5 and waited == [True], "batch 0 was not enhanced while batch 1 rendered"


def test_stream_executors_issue_the_next_render_before_enhancing(sequential):
    """On a GPU backend (enhancement on the calling thread) the overlap comes from the order: the renderer call of
    batch k + 1 is issued to its stream before batch k is enhanced."""
    _, log = sequential
    assert [e for e in log if e[0] == "render"] == [("render", k) for k in range(3)]
    for k in range(2):
        assert log.index(("render", k + 1)) < log.index(("enhance", k)), log


@pytest.mark.parametrize("in_worker", [True, False])
@pytest.mark.parametrize("fail", ["enhancer", "renderer"])
def test_errors_in_either_thread_reach_the_caller_and_no_thread_is_left(real_head, avatar, motion, fail, in_worker):
    """Either way the frames before the failing batch come out first, then the error."""
    log: list = []
    if fail == "enhancer":
        head = head_for(real_head, log, in_worker, networks=Networks(log, fail_on_call=1))
    else:
        head = head_for(real_head, log, in_worker, fail_on_render=2)
    got = []
    with pytest.raises(RuntimeError, match=f"{fail} failed on purpose"):
        for frame in head.render(avatar, motion, OPTIONS):
            got.append(frame.index)
    assert got == [0, 1] and not workers()


def test_a_consumer_that_stops_early_leaves_no_thread(real_head, avatar, motion):
    log: list = []
    frames = head_for(real_head, log, in_worker=True).render(avatar, motion, OPTIONS)
    assert next(frames).index == 0
    frames.close()
    assert not workers()


def test_host_backends_enhance_in_sequence_by_default():
    assert SerialExecutor(lambda stage: None).enhance_in_worker is False


def test_one_batch_ahead_keeps_order_and_bounds_the_work_in_flight():
    produced, started = [], []

    def batches():
        for k in range(6):
            produced.append(k)
            assert len(started) >= k - 1, "the producer ran more than one batch ahead of the work"
            yield k

    def work(k):
        started.append(k)
        assert produced[-1] <= k + 1
        return k * k

    assert list(one_batch_ahead(batches(), work)) == [k * k for k in range(6)]
    assert list(one_batch_ahead(iter(()), work)) == [] and not workers()
