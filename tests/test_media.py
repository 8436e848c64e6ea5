"""Media input/output: every image mode, every audio container, and the atomic mp4 writer."""
from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sadtalker_rt import media
from sadtalker_rt.errors import InputError, OutputError

RATE = media.SAMPLE_RATE


# ---------------------------------------------------------------------------------------- helpers


def gradient_rgb(width: int = 96, height: int = 80) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 // (width - 1), ys * 255 // (height - 1), (xs + ys) % 256], axis=-1).astype(np.uint8)


def sine(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


def encode_with_pyav(path: Path, samples: np.ndarray, rate: int, codec: str, container_format: str) -> Path:
    """Encode mono float samples with PyAV's own encoders (mp3, aac, flac, opus)."""
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1).astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        frame.time_base = Fraction(1, rate)
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height; Pillow reads the header without decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


def write_video(path: Path, frames: int, size=(64, 48), audio=None, **options) -> Path:
    width, height = size
    base = gradient_rgb(width, height)
    with media.VideoWriter(path, audio=audio, **options) as writer:
        for index in range(frames):
            writer.write(np.roll(base, index, axis=1))
    return path


# ---------------------------------------------------------------------------------------- images


def test_rgb_formats_round_trip_exactly(tmp_path):
    rgb = gradient_rgb()
    for name, options in [("a.png", {}), ("a.bmp", {}), ("a.tiff", {}), ("a.webp", {"lossless": True})]:
        Image.fromarray(rgb).save(tmp_path / name, **options)
        loaded = media.load_image(tmp_path / name)
        assert loaded.dtype == np.uint8 and loaded.shape == rgb.shape, name
        np.testing.assert_array_equal(loaded, rgb, err_msg=name)


def test_jpeg_is_read_by_content_whatever_its_extension(tmp_path):
    rgb = gradient_rgb()
    Image.fromarray(rgb).save(tmp_path / "photo.png", format="JPEG", quality=95)
    loaded = media.load_image(tmp_path / "photo.png")
    assert loaded.shape == rgb.shape
    assert np.abs(loaded.astype(int) - rgb).mean() < 3


def test_greyscale_and_bilevel_become_three_equal_channels(tmp_path):
    grey = gradient_rgb()[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    Image.fromarray(grey > 127).save(tmp_path / "bilevel.png")
    loaded = media.load_image(tmp_path / "grey.png")
    np.testing.assert_array_equal(loaded, np.repeat(grey[..., None], 3, axis=2))
    bilevel = media.load_image(tmp_path / "bilevel.png")
    assert set(np.unique(bilevel)) <= {0, 255} and bilevel.shape == (80, 96, 3)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    grey16 = np.tile(np.array([0, 257 * 100, 32768, 65535], np.uint16), (64, 16))
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    loaded = media.load_image(tmp_path / "grey16.png")
    np.testing.assert_array_equal(loaded[0, :4, 0], [0, 100, 128, 255])

    import cv2

    rgb16 = (gradient_rgb().astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])
    np.testing.assert_array_equal(media.load_image(tmp_path / "rgb16.png"), gradient_rgb())


def test_transparency_is_composited_on_white(tmp_path):
    rgb = gradient_rgb()
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, 48:] = 255
    alpha[:40, :48] = 128
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    loaded = media.load_image(tmp_path / "rgba.png").astype(int)
    np.testing.assert_array_equal(loaded[:, 48:], rgb[:, 48:])
    assert (loaded[40:, :48] == 255).all()
    half = (rgb[:40, :48].astype(int) * 128 + 255 * 127 + 127) // 255
    assert np.abs(loaded[:40, :48] - half).max() <= 1

    Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA").save(tmp_path / "la.png")
    loaded_la = media.load_image(tmp_path / "la.png")
    assert (loaded_la[40:, :48] == 255).all()
    np.testing.assert_array_equal(loaded_la[:, 48:, 1], rgb[:, 48:, 0])


def test_palette_images_with_and_without_transparency(tmp_path):
    palette_image = Image.fromarray(gradient_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette_image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(media.load_image(tmp_path / "palette.png"), np.asarray(palette_image.convert("RGB")))

    transparent_index = int(np.asarray(palette_image)[0, 0])
    palette_image.save(tmp_path / "palette_t.png", transparency=transparent_index)
    loaded = media.load_image(tmp_path / "palette_t.png")
    assert (loaded[np.asarray(palette_image) == transparent_index] == 255).all()


def test_cmyk_jpeg_and_tiff(tmp_path):
    rgb = gradient_rgb()
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.jpg", quality=95)
    cmyk.save(tmp_path / "cmyk.tif")
    for name in ("cmyk.jpg", "cmyk.tif"):
        loaded = media.load_image(tmp_path / name)
        assert loaded.shape == rgb.shape
        assert np.abs(loaded.astype(int) - rgb).mean() < 4, name


def test_exif_orientation_is_applied(tmp_path):
    stored = np.full((70, 100, 3), 200, np.uint8)
    stored[:10, :10] = (255, 0, 0)  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = media.load_image(tmp_path / "rotated.jpg")
    assert loaded.shape == (100, 70, 3)
    top_right = loaded[:8, -8:].astype(int).mean(axis=(0, 1))
    assert top_right[0] > 200 and top_right[1] < 60


def test_animated_images_give_their_first_frame(tmp_path):
    frames = [Image.new("RGB", (80, 80), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    for name in ("anim.gif", "anim.webp"):
        loaded = media.load_image(tmp_path / name)
        np.testing.assert_array_equal(loaded[40, 40], (255, 0, 0), err_msg=name)


def _corrupt_image_files(tmp_path: Path) -> list[Path]:
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(gradient_rgb(200, 200)).save(jpeg, format="JPEG")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(png, format="PNG")
    files = {
        "empty.png": b"",
        "noise.jpg": np.random.default_rng(1).bytes(5000),
        "text.png": b"this is not an image\n" * 10,
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "truncated.png": png.getvalue()[: len(png.getvalue()) // 2],
        "header_only.jpg": jpeg.getvalue()[:200],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [tmp_path / name for name in files] + [tmp_path / "missing.png", tmp_path]


def test_unreadable_images_raise_input_error_naming_the_file(tmp_path):
    for path in _corrupt_image_files(tmp_path):
        with pytest.raises(InputError) as caught:
            media.load_image(path)
        message = str(caught.value)
        assert path.name in message and "\n" not in message, message
        assert caught.value.exit_code == 3


@pytest.mark.parametrize("size", [(32, 200), (200, 63), (12000, 10000), (20000, 20000)])
def test_too_small_and_too_large_images_are_refused(tmp_path, size):
    path = png_header_only(tmp_path / f"{size[0]}x{size[1]}.png", *size)
    with pytest.raises(InputError, match="pixel") as caught:
        media.load_image(path)
    assert path.name in str(caught.value)


def test_smallest_accepted_image(tmp_path):
    Image.fromarray(gradient_rgb(64, 64)).save(tmp_path / "small.png")
    assert media.load_image(tmp_path / "small.png").shape == (64, 64, 3)


# ---------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_wav_sample_formats_load_unchanged_at_16k(tmp_path, subtype):
    samples = sine(0.5, RATE)[:, 0]
    soundfile.write(tmp_path / "a.wav", samples, RATE, subtype=subtype)
    loaded = media.load_audio(tmp_path / "a.wav")
    assert loaded.dtype == np.float32 and loaded.ndim == 1 and len(loaded) == len(samples)
    np.testing.assert_allclose(loaded, samples, atol=1e-4)


def test_stereo_is_averaged(tmp_path):
    left, right = sine(0.25, RATE, 440)[:, 0], sine(0.25, RATE, 1000)[:, 0]
    soundfile.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), RATE, subtype="FLOAT")
    np.testing.assert_allclose(media.load_audio(tmp_path / "stereo.wav"), (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("rate", [8000, 24000, 44100])
def test_other_rates_are_resampled_keeping_length_and_pitch(tmp_path, rate):
    samples = sine(1.0, rate, freq=440.0, channels=2)
    soundfile.write(tmp_path / "a.wav", samples, rate, subtype="PCM_16")
    loaded = media.load_audio(tmp_path / "a.wav")
    assert abs(len(loaded) - RATE) <= 1
    assert abs(dominant_frequency(loaded, RATE) - 440.0) < 2.0
    assert 0.45 < np.abs(loaded[2000:-2000]).max() < 0.55


@pytest.mark.parametrize(
    "codec, container_format, name, rate",
    [
        ("flac", "flac", "a.flac", 16000),
        ("libmp3lame", "mp3", "a.mp3", 22050),
        ("aac", "mp4", "a.m4a", 44100),
        ("aac", "adts", "a.aac", 24000),
        ("libopus", "ogg", "a.ogg", 48000),
        ("aac", "mp4", "m4a_named.wav", 16000),
    ],
)
def test_compressed_formats_decode_through_pyav(tmp_path, codec, container_format, name, rate):
    seconds = 1.0
    path = encode_with_pyav(tmp_path / name, sine(seconds, rate)[:, 0], rate, codec, container_format)
    loaded = media.load_audio(path)
    assert loaded.dtype == np.float32 and loaded.ndim == 1
    assert abs(len(loaded) - seconds * RATE) <= 0.08 * RATE  # encoder delay and frame padding
    assert abs(dominant_frequency(loaded[:8000], RATE) - 440.0) < 4.0
    assert abs(media.audio_duration(path) - seconds) < 0.08


def test_audio_duration_of_wav(tmp_path):
    soundfile.write(tmp_path / "a.wav", sine(1.25, 22050), 22050)
    assert media.audio_duration(tmp_path / "a.wav") == pytest.approx(1.25, abs=1e-4)


def test_unreadable_audio_raises_input_error_naming_the_file(tmp_path):
    wav = io.BytesIO()
    soundfile.write(wav, sine(0.5, RATE), RATE, format="WAV", subtype="PCM_16")
    header_only = wav.getvalue()[:44]
    files = {
        "empty.wav": b"",
        "noise.wav": np.random.default_rng(2).bytes(4000),
        "text.mp3": b"not audio at all\n" * 20,
        "header_only.wav": header_only,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    silent_video = write_video(tmp_path / "silent.mp4", frames=3)
    paths = [tmp_path / name for name in files] + [tmp_path / "missing.wav", silent_video, tmp_path]
    for path in paths:
        with pytest.raises(InputError) as caught:
            media.load_audio(path)
        assert path.name in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_truncated_audio_never_raises_anything_but_input_error(tmp_path):
    sources = [
        encode_with_pyav(tmp_path / "a.mp3", sine(0.5, RATE)[:, 0], RATE, "libmp3lame", "mp3"),
        encode_with_pyav(tmp_path / "a.m4a", sine(0.5, RATE)[:, 0], RATE, "aac", "mp4"),
    ]
    soundfile.write(tmp_path / "a.wav", sine(0.5, RATE), RATE)
    soundfile.write(tmp_path / "a.flac", sine(0.5, RATE), RATE)
    sources += [tmp_path / "a.wav", tmp_path / "a.flac"]
    for source in sources:
        data = source.read_bytes()
        for fraction in (0.1, 0.5, 0.9):
            cut = tmp_path / f"cut_{fraction}_{source.name}"
            cut.write_bytes(data[: int(len(data) * fraction)])
            try:
                loaded = media.load_audio(cut)
            except InputError as err:
                assert cut.name in str(err)
            else:
                assert loaded.dtype == np.float32 and np.isfinite(loaded).all()


@settings(max_examples=12, deadline=None)
@given(
    rate=st.sampled_from([8000, 11025, 16000, 22050, 32000, 44100, 48000]),
    seconds=st.floats(min_value=0.02, max_value=1.5),
    channels=st.integers(min_value=1, max_value=2),
    subtype=st.sampled_from(["PCM_16", "FLOAT"]),
)
def test_load_audio_length_property(tmp_path_factory, rate, seconds, channels, subtype):
    path = tmp_path_factory.mktemp("prop") / "a.wav"
    samples = sine(seconds, rate, channels=channels)
    soundfile.write(path, samples, rate, subtype=subtype)
    loaded = media.load_audio(path)
    expected = len(samples) * RATE / rate
    assert loaded.dtype == np.float32 and loaded.ndim == 1
    assert abs(len(loaded) - expected) <= max(1.0, len(samples) / rate)
    assert np.isfinite(loaded).all() and np.abs(loaded).max() < 0.6


# ---------------------------------------------------------------------------------------- video


def test_video_has_every_frame_at_25_fps_and_audio_cut_to_match(tmp_path):
    frames = 30
    audio = sine(1.5, RATE)[:, 0]  # longer than the 1.2 s of video
    path = write_video(tmp_path / "out.mp4", frames, audio=audio)
    info = media.probe_video(path)
    assert info["frames"] == frames and info["fps"] == 25.0
    assert (info["width"], info["height"]) == (64, 48)
    assert (info["video_codec"], info["audio_codec"]) == ("h264", "aac")
    assert abs(info["audio_seconds"] - frames / 25) < 0.064
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"]


def test_short_audio_is_padded_to_the_video_length(tmp_path):
    path = write_video(tmp_path / "out.mp4", 25, audio=sine(0.3, RATE)[:, 0])
    assert abs(media.probe_video(path)["audio_seconds"] - 1.0) < 0.064


def test_frame_timestamps_are_frame_indices(tmp_path):
    path = write_video(tmp_path / "out.mp4", 20, audio=sine(1.0, RATE)[:, 0])
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        times = sorted(packet.pts * stream.time_base for packet in container.demux(stream) if packet.pts is not None)
        pixel_format = stream.codec_context.format.name
    assert times == [Fraction(index, 25) for index in range(20)]
    assert pixel_format == "yuv420p"


def test_frames_decode_close_to_what_was_written(tmp_path):
    path = write_video(tmp_path / "out.mp4", 5, size=(96, 80))
    with av.open(str(path)) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.abs(first.astype(int) - gradient_rgb(96, 80)).mean() < 4


@pytest.mark.parametrize("size", [(65, 48), (64, 47), (97, 81)])
def test_odd_sizes_are_padded_by_one_pixel(tmp_path, size):
    path = write_video(tmp_path / "odd.mp4", 4, size=size, audio=sine(0.2, RATE)[:, 0])
    info = media.probe_video(path)
    assert (info["width"], info["height"]) == (size[0] + size[0] % 2, size[1] + size[1] % 2)
    assert info["frames"] == 4


def test_video_without_audio(tmp_path):
    info = media.probe_video(write_video(tmp_path / "silent.mp4", 6))
    assert info["frames"] == 6 and info["audio_codec"] is None and info["audio_seconds"] == 0.0


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_stream_leaves_no_file_behind(tmp_path, interruption):
    with pytest.raises(interruption):
        with media.VideoWriter(tmp_path / "out.mp4", audio=sine(1.0, RATE)[:, 0]) as writer:
            for _ in range(5):
                writer.write(gradient_rgb(64, 48))
            raise interruption()
    assert os.listdir(tmp_path) == []


def test_failure_while_overwriting_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous result")
    with pytest.raises(RuntimeError):
        with media.VideoWriter(target, overwrite=True) as writer:
            writer.write(gradient_rgb(64, 48))
            raise RuntimeError("renderer failed")
    assert target.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_frames_of_changing_size_are_rejected_and_cleaned_up(tmp_path):
    with pytest.raises(ValueError):
        with media.VideoWriter(tmp_path / "out.mp4") as writer:
            writer.write(gradient_rgb(64, 48))
            writer.write(gradient_rgb(64, 50))
    with pytest.raises(ValueError):
        with media.VideoWriter(tmp_path / "out.mp4") as writer:
            writer.write(gradient_rgb(64, 48).astype(np.float32))
    with pytest.raises(ValueError, match="64x48"):
        with media.VideoWriter(tmp_path / "out.mp4", 64, 48) as writer:
            writer.write(gradient_rgb(48, 64))
    assert os.listdir(tmp_path) == []


def test_declared_size_matches_frames(tmp_path):
    with media.VideoWriter(tmp_path / "out.mp4", 65, 49, audio=sine(0.2, RATE)[:, 0]) as writer:
        for _ in range(3):
            writer.write(gradient_rgb(65, 49))
    info = media.probe_video(tmp_path / "out.mp4")
    assert (info["width"], info["height"], info["frames"]) == (66, 50, 3)


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"keep me")
    with pytest.raises(OutputError) as caught:
        write_video(target, 3)
    assert "out.mp4" in str(caught.value) and caught.value.exit_code == 6
    assert target.read_bytes() == b"keep me" and os.listdir(tmp_path) == ["out.mp4"]
    write_video(target, 3, overwrite=True)
    assert media.probe_video(target)["frames"] == 3


def test_unwritable_locations_raise_output_error(tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_bytes(b"")
    for target in (blocker / "out.mp4", tmp_path):
        with pytest.raises(OutputError) as caught:
            write_video(target, 2)
        assert target.name in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_raises_output_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="out.mp4"):
            write_video(locked / "out.mp4", 2)
    finally:
        locked.chmod(0o700)


def test_output_gets_normal_file_permissions(tmp_path):
    path = write_video(tmp_path / "out.mp4", 2)
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_missing_parent_directories_are_created(tmp_path):
    path = write_video(tmp_path / "results" / "run1" / "out.mp4", 2)
    assert media.probe_video(path)["frames"] == 2


def test_probe_of_unreadable_video_raises_input_error(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\0" * 100)
    for path in (tmp_path / "broken.mp4", tmp_path / "missing.mp4"):
        with pytest.raises(InputError, match=path.name):
            media.probe_video(path)


# ---------------------------------------------------------------------------------------- bundled and shared inputs


def test_demo_assets_load():
    assert media.load_image(media.demo_image()).shape == (512, 512, 3)
    speech = media.load_audio(media.demo_audio())
    assert 1.5 < len(speech) / RATE < 4.0 and np.abs(speech).max() > 0.1
    assert (media.demo_image().parent / "README.md").is_file()


def test_shared_wavs_load_as_16k_mono_float(assets_dir):
    wavs = sorted(assets_dir.glob("*.wav"))
    assert wavs
    for wav in wavs:
        loaded = media.load_audio(wav)
        assert loaded.dtype == np.float32 and loaded.ndim == 1, wav.name
        assert abs(len(loaded) - media.audio_duration(wav) * RATE) <= 1 + media.audio_duration(wav), wav.name
        assert np.isfinite(loaded).all() and np.abs(loaded).max() > 0.01, wav.name


def test_shared_photos_load_as_rgb(assets_dir):
    photos = sorted(p for p in assets_dir.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
    assert photos
    for photo in photos:
        loaded = media.load_image(photo)
        assert loaded.dtype == np.uint8 and loaded.ndim == 3 and loaded.shape[2] == 3, photo.name


def test_stereo_audio_is_refused_by_the_writer(tmp_path):
    with pytest.raises(ValueError, match="mono"):
        media.VideoWriter(tmp_path / "out.mp4", audio=sine(0.2, RATE, channels=2))
    media.VideoWriter(tmp_path / "out.mp4", audio=sine(0.2, RATE, channels=1))  # (n, 1) is accepted


def test_importing_media_does_not_import_torch():
    import subprocess

    code = "import sys, sadtalker_rt.media; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
