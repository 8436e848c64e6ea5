"""Free view and reference videos: official numerics (conformance-options), the degree lists, and end to end on
the example photos with a reference video made from them."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, assert_conformance, shared_path
from sadtalker_rt import media
from sadtalker_rt.errors import UsageError
from sadtalker_rt.runtime import overrides
from sadtalker_rt.stages import POSE

OPTION_STAGES = ["free_view_pose", "free_view_keypoints", "free_view_animation", "ref_eyeblink", "ref_pose"]


@pytest.mark.parametrize("stage", OPTION_STAGES)
def test_options_conformance(stage, recording_kernels):
    pytest.importorskip("torch")
    from sadtalker_rt.conformance import run_directory

    assert_conformance(run_directory(shared_path("conformance-options"), stages={stage}), stage, recording_kernels)


def test_free_view_sequence_official_shape():
    seq = overrides.free_view_sequence([0, 30, -20], 25)
    assert seq.dtype == np.float64 and len(seq) == 25
    assert seq[0] == 0 and seq.max() == 30 and seq[-1] > -20       # the last value is only approached
    assert overrides.free_view_sequence([7], 4).tolist() == [7, 7, 7, 7]
    assert overrides.gen_camera_pose([7], 5, 2).shape == (2, 3)


def test_free_view_equal_neighbours_are_no_segment():
    # The official code divides by zero here; a segment that travels no degrees gets no frames.
    assert np.array_equal(overrides.free_view_sequence([0, 10, 10, 20], 9), overrides.free_view_sequence([0, 10, 20], 9))
    assert overrides.free_view_sequence([15, 15], 4).tolist() == [15, 15, 15, 15]
    assert overrides.free_view_sequence([-5, 30], 1).tolist() == [-5]


@pytest.mark.parametrize("values, message", [
    (["0,abc"], "integer degrees"), (["91"], "-90..90"), ([1.5], "integer degrees"), (["-120 0"], "-90..90")])
def test_degree_lists_refused(values, message):
    with pytest.raises(UsageError, match=message):
        overrides.parse_degrees(values, "--input-yaw")


def test_degree_lists_parsed():
    assert overrides.parse_degrees(["0,30", "-20"], "--input-yaw") == [0, 30, -20]
    assert overrides.parse_degrees(["0 30 -20"], "--input-yaw") == [0, 30, -20]
    assert overrides.parse_degrees(None, "--input-yaw") is None


def test_reference_rows_loop_like_the_official_code():
    ref = np.arange(3 * 73, dtype=np.float32).reshape(3, 73)
    source = np.full((1, 73), -1, np.float32)
    out = overrides.eyeblink_reference(source, ref, 7)
    assert np.array_equal(out[:, :64], ref[[0, 1, 2, 0, 1, 2, 0], :64]) and (out[:, 64:] == -1).all()
    coeffs = np.zeros((2, 70), np.float32)
    assert np.array_equal(overrides.apply_ref_pose(coeffs, ref)[:, POSE], ref[:2, POSE] - ref[:1, POSE])


# ---------------------------------------------------------------------------------------- end to end

def _rotation_degrees(rotation: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) of R = Rx(pitch) Ry(yaw) Rz(roll), in the mapping stage's degrees (pi taken as 3.14)."""
    yaw = math.asin(float(np.clip(rotation[0, 2], -1, 1)))
    roll = math.atan2(-rotation[0, 1], rotation[0, 0])
    pitch = math.atan2(-rotation[1, 2], rotation[2, 2])
    return tuple(a * 180 / 3.14 for a in (yaw, pitch, roll))


def write_reference_video(photo: np.ndarray, path, frames: int = 3) -> None:
    """A short video of the photo shifted and scaled a little per frame."""
    from PIL import Image

    height, width = photo.shape[:2]
    with media.VideoWriter(path, width, height) as writer:
        for k in range(frames):
            scale = 1 + 0.04 * k
            moved = Image.fromarray(photo).transform((width, height), Image.AFFINE,
                                                      (1 / scale, 0, -5 * k, 0, 1 / scale, 3 * k), Image.BILINEAR)
            writer.write(np.asarray(moved))


class RecordingBackend:
    """A backend whose runners keep every feed and output of the stages named."""

    def __init__(self, backend, stages):
        self.backend, self.stages, self.calls = backend, set(stages), []
        self.notes = getattr(backend, "notes", [])

    def runner(self, stage):
        inner = self.backend.runner(stage)
        if stage not in self.stages:
            return inner
        calls = self.calls

        class Recording:
            def infer(self, feeds):
                out = inner.infer(feeds)
                calls.append(({k: np.array(v) for k, v in feeds.items()}, {k: np.array(v) for k, v in out.items()}))
                return out

        return Recording()

    def executor(self):
        from sadtalker_rt.runtime.scheduler import SerialExecutor

        return SerialExecutor(self.runner)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    pytest.importorskip("torch")
    from sadtalker_rt.models.checkpoints import WeightSource
    from sadtalker_rt.runtime.pipeline import TalkingHead

    assets = shared_path("assets")
    photo = media.load_image(assets / "happy.png")
    video = tmp_path_factory.mktemp("reference") / "reference.mp4"
    write_reference_video(photo, video)
    head = TalkingHead.from_weights(WeightSource(synthetic_seed=0), size=256)
    avatar = head.prepare_avatar(photo, "crop")
    wav = media.load_audio(assets / "bus_chinese.wav")[: int(0.12 * 16000)]     # 3 frames
    return head, avatar, video, wav


def test_reference_video_drives_pose_and_expression(example):
    from sadtalker_rt.runtime.pipeline import Options

    head, avatar, video, wav = example
    ref = head.reference(video, "crop")
    assert ref.coeffs.shape == (3, 73) and np.isfinite(ref.coeffs).all() and not ref.notes
    plain = head.motion(avatar, wav, Options(seed=1))
    posed = head.motion(avatar, wav, Options(seed=1, ref_pose=video))
    expected = ref.coeffs[:, POSE] - ref.coeffs[:1, POSE]
    np.testing.assert_allclose(posed.coeffs[:, POSE] - plain.coeffs[:, POSE], expected, atol=1e-6)
    np.testing.assert_array_equal(posed.coeffs[:, :64], plain.coeffs[:, :64])
    blinked = head.motion(avatar, wav, Options(seed=1, ref_eyeblink=ref.coeffs))
    exp = head.infer("audio2exp", indiv_mels=plain.indiv_mels[:, None], ref_exp=ref.coeffs[:3, :64],
                     blink=np.zeros((3, 1), np.float32))["exp"]
    np.testing.assert_allclose(blinked.coeffs[:, :64], exp, atol=1e-6)
    np.testing.assert_array_equal(blinked.coeffs[:, POSE], plain.coeffs[:, POSE])     # same seed, same pose


def test_free_view_head_pose_follows_the_degrees(example):
    from sadtalker_rt.runtime.pipeline import Options, TalkingHead

    head, avatar, video, wav = example
    recording = RecordingBackend(head.backend, {"mapping_free_view"})
    options = Options(input_yaw=[-20, 20], input_pitch=[10], input_roll=[0, -12], batch_size=2)
    frames = list(TalkingHead(recording, head.size).generate(avatar, wav, options))
    assert len(frames) == 3
    yaw = overrides.free_view_sequence([-20, 20], 3)
    roll = overrides.free_view_sequence([0, -12], 3)
    kp_canonical = avatar.features["kp_canonical"][0].astype(np.float64)
    index = 0
    for feeds, out in recording.calls:
        # With every angle given, kp = R kp_c + (t + exp); the same windows at angle 0 cancel (t + exp).
        zero = head.infer("mapping_free_view", kp_canonical=feeds["kp_canonical"], semantics=feeds["semantics"],
                          angles=np.zeros_like(feeds["angles"]), angle_given=np.ones((1, 3), np.float32))["kp"]
        frames = min(len(out["kp"]), 3 - index)      # a short last batch is padded with its last frame
        np.testing.assert_array_equal(out["kp"][frames:], np.repeat(out["kp"][frames - 1:frames], 2 - frames, 0))
        for kp, kp0 in zip(out["kp"][:frames], zero):
            delta = np.linalg.lstsq(kp_canonical, (kp - kp0).astype(np.float64), rcond=None)[0]
            got = _rotation_degrees(np.eye(3) + delta.T)
            np.testing.assert_allclose(got, (yaw[index], 10, roll[index]), atol=1e-2)
            index += 1
    assert index == 3


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sadtalker_rt.cli", *args], cwd=REPO, capture_output=True, text=True)


def test_cli_free_view_and_reference_video(example, tmp_path):
    _, _, video, _ = example
    assets = shared_path("assets")
    out = tmp_path / "talk.mp4"
    done = run_cli("run", str(video), str(assets / "bus_chinese.wav"), "-o", str(out), "--synthetic-weights",
                   "--duration", "0.12", "--quiet", "--input-yaw", "0", "15", "-15", "--ref-eyeblink", str(video),
                   "--ref-pose", str(video))
    assert done.returncode == 0, done.stderr
    assert media.probe_video(out)["frames"] == 3


@pytest.mark.parametrize("make, option, code, message", [
    (lambda p: p.write_bytes(b""), "--ref-pose", 3, "empty"),
    (lambda p: p.write_bytes(b"not a video at all\n" * 50), "--ref-eyeblink", 3, "cannot be read"),
    (lambda p: p.write_bytes(shared_path("assets", "bus_chinese.wav").read_bytes()), "--ref-pose", 3, "only audio"),
    (None, "--input-yaw", 2, "-90..90"),
    (None, "--input-pitch", 2, "integer degrees"),
])
def test_cli_refuses_bad_option_inputs(tmp_path, make, option, code, message):
    assets = shared_path("assets")
    out = tmp_path / "talk.mp4"
    args = ["run", str(assets / "happy.png"), str(assets / "bus_chinese.wav"), "-o", str(out), "--synthetic-weights",
            "--quiet"]
    if make is not None:
        bad = tmp_path / "reference.mp4"
        make(bad)
        args += [option, str(bad)]
    else:
        args += [option, "120" if option == "--input-yaw" else "ten"]
    done = run_cli(*args)
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], done.stderr
    assert not out.exists() and not list(tmp_path.glob("*.mp4.*"))


def test_cli_refuses_truncated_reference_video(example, tmp_path):
    _, _, video, _ = example
    assets = shared_path("assets")
    cut = tmp_path / "cut.mp4"
    data = video.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    out = tmp_path / "talk.mp4"
    done = run_cli("run", str(assets / "happy.png"), str(assets / "bus_chinese.wav"), "-o", str(out),
                   "--synthetic-weights", "--quiet", "--duration", "0.12", "--ref-pose", str(cut))
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error:") and not out.exists()
