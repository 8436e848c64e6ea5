"""End to end with synthetic weights and a few frames: photo + speech -> mp4, the Python API, seeds."""
from __future__ import annotations

import numpy as np
import pytest

from sadtalker_rt import media
from sadtalker_rt.cli import main
from sadtalker_rt.runtime.pipeline import FPS, Options, TalkingHead

PHOTOS = ("happy.png", "art_0.png", "full_body_1.png")


@pytest.fixture(scope="module")
def head(real_head) -> TalkingHead:
    """The real renderer here (conftest's ``head`` has the stand-in)."""
    return real_head


@pytest.fixture(scope="module")
def crop_avatar(head, assets_dir):
    return head.prepare_avatar(assets_dir / "happy.png", "crop")


def run_cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as exit_:
        return exit_.code
    return 0


def test_cli_run_writes_playable_mp4(tmp_path, assets_dir):
    out = tmp_path / "talk.mp4"
    assert run_cli("run", str(assets_dir / "art_0.png"), str(assets_dir / "RD_Radio31_000.wav"), "-o", str(out),
                   "--synthetic-weights", "--duration", "0.16", "--quiet") == 0
    info = media.probe_video(out)
    assert info["frames"] == 4 and info["fps"] == FPS
    assert (info["width"], info["height"]) == (256, 256)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"
    assert abs(info["audio_seconds"] - 4 / FPS) < 0.07
    assert [p.name for p in tmp_path.iterdir()] == ["talk.mp4"]


def test_frame_count_follows_audio_length(head, crop_avatar, assets_dir):
    wav = media.load_audio(assets_dir / "bus_chinese.wav")[: int(0.219 * 16000)]
    motion = head.motion(crop_avatar, wav)
    assert motion.frames == int(25 * 0.219) == 5
    assert motion.coeffs.shape == (5, 70) and np.isfinite(motion.coeffs).all()


def test_same_seed_same_frames_other_seed_other_motion(head, crop_avatar):
    wav = media.load_audio(media.demo_audio())[: int(0.12 * 16000)]
    first = [f.image for f in head.generate(crop_avatar, wav, Options(seed=3))]
    again = [f.image for f in head.generate(crop_avatar, wav, Options(seed=3))]
    assert len(first) == 3 and all(np.array_equal(a, b) for a, b in zip(first, again))
    long_wav = media.load_audio(media.demo_audio())
    coeffs_a = head.motion(crop_avatar, long_wav, Options(seed=3)).coeffs
    coeffs_b = head.motion(crop_avatar, long_wav, Options(seed=4)).coeffs
    assert not np.allclose(coeffs_a[:, 64:], coeffs_b[:, 64:])     # other pose latents
    assert np.array_equal(coeffs_a, head.motion(crop_avatar, long_wav, Options(seed=3)).coeffs)


def test_coefficients_match_reference_stages(head, crop_avatar):
    """The pipeline's expression equals ExpNet run directly on the official layout (1, T, ...)."""
    import torch

    from sadtalker_rt.runtime.coeffs import smooth_pose

    wav = media.load_audio(media.demo_audio())
    motion = head.motion(crop_avatar, wav, Options(seed=1))
    exp_net = head.backend.subnetwork("audio2exp")
    ref = torch.from_numpy(np.tile(crop_avatar.source_coeffs[:, :70], (motion.frames, 1))[None])
    blink = torch.from_numpy(head_blinks(motion.frames, seed=1))
    with torch.inference_mode():
        exp = exp_net(torch.from_numpy(motion.indiv_mels[None, :, None]), ref, blink).numpy()[0]
    np.testing.assert_allclose(motion.coeffs[:, :64], exp, rtol=0, atol=1e-5)
    pose_net = head.backend.subnetwork("audio2pose")
    chunks = -(-(motion.frames - 1) // 32)
    with torch.inference_mode():
        pose = pose_net.generate(torch.from_numpy(motion.indiv_mels[None, :, None]), ref[:, :1], 0,
                                 torch.from_numpy(pose_noise(motion.frames, chunks, seed=1))).numpy()[0]
    np.testing.assert_allclose(motion.coeffs[:, 64:], smooth_pose(pose), rtol=0, atol=1e-5)


def head_blinks(frames: int, seed: int) -> np.ndarray:
    from sadtalker_rt.runtime.coeffs import blink_generator, blink_sequence

    return blink_sequence(frames, blink_generator(seed)).astype(np.float32)[None]


def pose_noise(frames: int, chunks: int, seed: int) -> np.ndarray:
    """One latent per pose chunk, each from its own stream (``coeffs.pose_latent``), whatever the blinks drew."""
    from sadtalker_rt.runtime.coeffs import pose_latent

    return np.concatenate([pose_latent(seed, k) for k in range(chunks)])[None]


@pytest.mark.parametrize("mode", ["crop", "resize", "full"])
def test_modes_prepare_on_example_photo(head, assets_dir, mode):
    avatar = head.prepare_avatar(assets_dir / "happy.png", mode)
    assert avatar.source_frame.shape == (256, 256, 3)
    assert avatar.source_coeffs.shape == (1, 73)
    assert avatar.features["feature_3d"].shape == (1, 32, 16, 64, 64)
    if mode == "full":
        photo = media.load_image(assets_dir / "happy.png")
        assert avatar.output_size == (photo.shape[1], photo.shape[0])


@pytest.mark.heavy
@pytest.mark.parametrize("photo", PHOTOS)
@pytest.mark.parametrize("mode", ["crop", "extcrop", "resize", "full", "extfull"])
def test_every_mode_on_every_photo(head, assets_dir, photo, mode):
    avatar = head.prepare_avatar(assets_dir / photo, mode)
    frames = list(head.generate(avatar, np.zeros(1280, np.float32)))
    assert len(frames) == 2
    assert frames[0].image.shape[1::-1] == avatar.output_size


def test_full_mode_pastes_into_the_photo_without_seam(head, assets_dir):
    avatar = head.prepare_avatar(assets_dir / "full_body_1.png", "full")
    photo = media.load_image(assets_dir / "full_body_1.png")
    frame = next(iter(head.generate(avatar, np.zeros(640, np.float32)))).image
    assert frame.shape == photo.shape
    x1, y1, x2, y2 = avatar.crop_info.paste_box
    outside = np.ones(photo.shape[:2], bool)
    outside[max(0, y1):y2, max(0, x1):x2] = False
    assert np.array_equal(frame[outside], photo[outside])          # only the face box changes
    inside = frame[y1 + 1:y2 - 1, x1 + 1:x2 - 1].astype(int) - photo[y1 + 1:y2 - 1, x1 + 1:x2 - 1]
    assert np.abs(inside[0]).mean() < np.abs(inside[inside.shape[0] // 2]).mean()   # feathered edge


def test_timestamps_and_still_mode(head, crop_avatar):
    wav = np.zeros(3 * 640, np.float32)
    motion = head.motion(crop_avatar, wav, Options(still=True))
    frames = list(head.render(crop_avatar, motion, Options(still=True, batch_size=2)))
    assert [f.timestamp for f in frames] == [0.0, 0.04, 0.08]
    assert [f.index for f in frames] == [0, 1, 2]
