"""TalkingHead.stream with the options generate takes (reference videos, free view, the enhancer): the same
frames as offline, for any chunking, each held back only as long as what it depends on is unknown."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import CheapRendererBackend, cheap_face_enhancer
from sadtalker_rt import media
from sadtalker_rt.errors import InputError
from sadtalker_rt.runtime import overrides
from sadtalker_rt.runtime.pipeline import Options, TalkingHead
from sadtalker_rt.runtime.reference_video import ReferenceTrack
from sadtalker_rt.runtime.streaming import FrameStream
from test_streaming import assert_same_frames, speech, streamed

CHUNKS = (20, None)          # ms; None: the whole audio as one chunk


# ------------------------------------------------------------------------------ reference rows, no models

class CodedTrack(ReferenceTrack):
    """A reference video of coded frames: (code, index) with code 0 no face, 1 a face, 2 a face that only the
    crop shows (the whole frame's detection misses it). Coefficients: the frame index in every column."""

    def _landmarks(self, image):
        return np.zeros((68, 2)) if image[0] == 1 else None

    def _extract(self, photo):
        return np.full(73, photo[1], np.float32) if photo[0] in (1, 2) else None


def coded_frames(codes, broken_at=None):
    """The frames; decoding frame ``broken_at`` (up to len(codes)) fails."""
    for index, code in enumerate(codes[:broken_at]):
        yield np.array([code, index])
    if broken_at is not None:
        raise InputError("the video breaks off")


def offline_rows(codes, T, preprocess, broken_at=None):
    """What the offline path uses, computed directly: the first min(N, T) frames (decoding one more, as the
    decoder does, so a break right there is an error), the crop box from the first face, the nearest face
    (earlier on a tie) for a frame without one, looped to T. None when the offline path refuses."""
    if broken_at is not None and T >= broken_at:
        return None
    used = codes[:T]
    if preprocess != "resize" and 1 not in used:
        return None
    faces = [i for i, c in enumerate(used) if c in (1, 2)]
    if not faces:
        return None
    source = [i if c in (1, 2) else min(faces, key=lambda f: (abs(f - i), f)) for i, c in enumerate(used)]
    return np.array([source[t % len(used)] for t in range(T)], np.float32)


@pytest.mark.parametrize("preprocess", ["crop", "resize"])
def test_reference_rows_are_final_only_when_decided(preprocess):
    rng = np.random.default_rng(0)
    cases = 0
    for _ in range(400):
        N = int(rng.integers(1, 9))
        codes = [int(c) for c in rng.choice(3, N, p=[0.5, 0.35, 0.15])]
        broken_at = int(rng.integers(0, N + 1)) if rng.random() < 0.2 else None
        T = int(rng.integers(1, 14))
        expected = offline_rows(codes, T, preprocess, broken_at)
        track = CodedTrack(coded_frames(codes, broken_at), preprocess, 256, None, "ref")
        try:
            for known in range(T + 1):
                ready = track.ready(known, None)
                assert ready <= known
                if ready and not (broken_at is not None and T >= broken_at):   # a break: found when reached
                    assert expected is not None, (codes, T, known, "rows final although offline refuses")
                    np.testing.assert_array_equal(track.rows(0, ready)[:, 0], expected[:ready])
            assert track.ready(T, T) == T
            got = track.rows(0, T)[:, 0]
        except InputError:
            assert expected is None, (codes, T, broken_at, "refused although offline is not")
            continue
        assert expected is not None, (codes, T, broken_at, "offline refuses")
        np.testing.assert_array_equal(got, expected)
        cases += 1
    assert cases > 100


def test_reference_row_waits_for_its_nearest_face():
    # frame 2 has no face; frame 3 (nearer than frame 0) is in the utterance only if it has 4 frames or more
    track = CodedTrack(coded_frames([1, 0, 0, 1]), "crop", 256, None, "ref")
    assert track.ready(3, None) == 2
    assert track.ready(4, None) == 4 and track.rows(0, 4)[:, 0].tolist() == [0, 0, 3, 3]
    short = CodedTrack(coded_frames([1, 0, 0, 1]), "crop", 256, None, "ref")
    assert short.ready(3, None) == 2 and short.ready(3, 3) == 3 and short.rows(0, 3)[:, 0].tolist() == [0, 0, 0]


def test_free_view_first_angle_and_fixed_lists():
    rng = np.random.default_rng(1)
    for _ in range(200):
        degrees = [int(d) for d in rng.integers(-90, 91, int(rng.integers(1, 5)))]
        view = overrides.FreeView(yaw=degrees)
        for T in (1, 2, 7, 40):
            assert overrides.free_view_sequence(degrees, T)[0] == degrees[0]
        assert view.final_frames(30, None) == (1 if len(set(degrees)) > 1 else 30)
        assert view.final_frames(30, 45) == 45
    fixed = overrides.FreeView(yaw=[20], pitch=[5, 5])
    assert not fixed.moving
    assert np.array_equal(fixed.angles_between(3, 9, None)[0], fixed.angles(50)[0][3:9])


# ------------------------------------------------------------------------------ end to end, stand-in renderer

def frames_before_the_end(heard) -> int:
    return sum(h is not None for h in heard)


def check_streams(head, avatar, wav, options, chunks=CHUNKS) -> list:
    """Streams ``wav`` in each chunk size, checks the frames against generate; per chunk size, how many came
    out before the audio ended."""
    expected = list(head.generate(avatar, wav, options))
    early = []
    for ms in chunks:
        got, heard = streamed(head, avatar, wav, ms, options)
        assert_same_frames(got, expected)
        early.append(frames_before_the_end(heard))
    return early


def test_free_view_fixed_angles_stream_without_waiting(head, avatar, assets_dir):
    wav = speech(assets_dir, "bus_chinese.wav", 1.8)
    early = check_streams(head, avatar, wav, Options(seed=3, batch_size=2, input_yaw=[25], input_roll="-10"))
    assert early[0] >= 4        # 45 frames: the first come out after about 40 frames of audio, as without it


def test_free_view_list_waits_for_the_end_of_the_audio(head, avatar, assets_dir):
    wav = speech(assets_dir, "bus_chinese.wav", 1.8)
    early = check_streams(head, avatar, wav, Options(seed=3, batch_size=1, input_yaw=[-20, 20], input_pitch=[10]),
                          chunks=(20,))
    assert early == [1]         # frame 0 (its angle is the first value whatever the length), then the end


def write_reference_video(photo: np.ndarray, path, layout: str) -> None:
    """A video of the photo moved a little per frame; 'x' frames are the photo, '.' frames a grey frame."""
    from PIL import Image

    height, width = photo.shape[:2]
    with media.VideoWriter(path, width, height) as writer:
        for k, kind in enumerate(layout):
            if kind == ".":
                writer.write(np.full_like(photo, 120))
                continue
            scale = 1 + 0.04 * k
            moved = Image.fromarray(photo).transform((width, height), Image.AFFINE,
                                                      (1 / scale, 0, -5 * k, 0, 1 / scale, 3 * k), Image.BILINEAR)
            writer.write(np.asarray(moved))


@pytest.fixture(scope="module")
def reference_video(assets_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "reference.mp4"
    write_reference_video(media.load_image(assets_dir / "happy.png"), path, ".x.x")    # shorter than the audio
    return path


def test_reference_videos_stream_like_offline(head, avatar, assets_dir, reference_video):
    wav = speech(assets_dir, "chinese_poem1.wav", 1.8)
    early = check_streams(head, avatar, wav, Options(seed=1, batch_size=2, ref_eyeblink=reference_video,
                                                      ref_pose=reference_video))
    assert early[0] >= 4
    session = FrameStream(head, avatar, Options(ref_pose=reference_video))
    list(session.push(wav[:3200]))
    list(session.close())
    assert any("no face in the first 1 frames" in line for line in session.notes), session.notes


def test_reference_video_without_a_face_is_refused_before_any_audio(head, avatar, tmp_path):
    blank = tmp_path / "blank.mp4"
    write_reference_video(np.zeros((256, 256, 3), np.uint8), blank, "..")
    with pytest.raises(InputError, match="No face"):
        FrameStream(head, avatar, Options(ref_eyeblink=blank))


@pytest.fixture(scope="module")
def enhanced_head(head) -> TalkingHead:
    return TalkingHead(head.backend, head.size, enhancer=cheap_face_enhancer())


@pytest.mark.parametrize("noise, points", [("fixed", "track"), ("seeded", "track"), ("seeded", "fixed")])
def test_enhancer_streams_like_offline(enhanced_head, avatar, assets_dir, noise, points):
    wav = speech(assets_dir, "RD_Radio31_000.wav", 0.2)
    options = Options(seed=2, batch_size=2, enhancer="gfpgan", enhancer_noise=noise, enhancer_points=points)
    check_streams(enhanced_head, avatar, wav, options)
    assert list(enhanced_head.stream(avatar, [wav], options))[0].image.shape == (512, 512, 3)


def test_enhancer_tracking_is_per_session(enhanced_head, avatar, assets_dir):
    """Two sessions interleaved on one enhancer: each tracks its own frames."""
    wav = speech(assets_dir, "RD_Radio31_000.wav", 0.2)
    options = Options(seed=2, batch_size=1, enhancer="gfpgan")
    expected = list(enhanced_head.generate(avatar, wav, options))
    sessions = []
    for _ in range(2):
        session = FrameStream(enhanced_head, avatar, options)
        session.push(wav)
        sessions.append(session.close())
    got = [[], []]
    for _ in expected:                  # one frame of each in turn
        for frames, session in zip(got, sessions):
            frames.append(next(session))
    for frames in got:
        assert_same_frames(frames, expected)


def test_fresh_enhancer_noise_streams(enhanced_head, avatar, assets_dir):
    wav = speech(assets_dir, "RD_Radio31_000.wav", 0.08)
    frames = list(enhanced_head.stream(avatar, [wav], Options(enhancer="gfpgan", enhancer_noise="fresh")))
    assert [f.image.shape for f in frames] == [(512, 512, 3)] * 2


# ------------------------------------------------------------------------------ the real networks (slow on a CPU)

@pytest.mark.heavy
def test_real_enhancer_streams_the_offline_frames(real_head, avatar, assets_dir):
    from sadtalker_rt.models.enhancer_weights import EnhancerWeights

    head = TalkingHead(CheapRendererBackend(real_head.backend), real_head.size)
    head.enable_enhancer(EnhancerWeights(synthetic_seed=0))
    wav = speech(assets_dir, "RD_Radio31_000.wav", 0.05)        # one frame: 512 x 512 GFPGAN takes seconds
    check_streams(head, avatar, wav, Options(seed=1, batch_size=1, enhancer="gfpgan", enhancer_noise="seeded"))


@pytest.mark.heavy
def test_real_renderer_free_view_and_reference_pose(real_head, avatar, assets_dir, tmp_path):
    reference = tmp_path / "reference.mp4"
    write_reference_video(media.load_image(assets_dir / "happy.png"), reference, "xx")
    wav = speech(assets_dir, "RD_Radio31_000.wav", 0.05)
    check_streams(real_head, avatar, wav, Options(seed=1, batch_size=1, input_yaw=[15], ref_pose=reference))
