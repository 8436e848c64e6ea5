"""Bad input, faults and long jobs: one clear error, nothing partial, nothing lost.

Every failure case runs the real command line in-process (``sadtalker-rt run IMAGE AUDIO -o OUT``) and
checks the contract of ``sadtalker_rt.errors``: the exit code of the class of problem, exactly one
``error:`` line on stderr (``note:`` lines may precede it) that names the file and the problem, no
traceback, no Python warning, and nothing (no video, no temporary file) left in the output directory.

To keep the file fast on a CPU, the synthetic-weights model is built once per module and the command
line is handed that instance (``TalkingHead.from_weights`` is patched for synthetic seed 0 only), and
the avatar of the one known-good photo is prepared once. Tests about failures mid-render swap the
mapping and renderer stages for numpy stand-ins with the stage table's names. Real checkpoints
directories, ONNX directories and every other photo take the unpatched path.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sadtalker_rt.runtime import audio_features
from sadtalker_rt import media
from sadtalker_rt.runtime.backends import SerialBackend, check_feeds
from sadtalker_rt.models.checkpoints import SUBNETWORKS, WeightSource, official_template, safetensors_name
from sadtalker_rt.cli import main
from sadtalker_rt.runtime.coeffs import semantic_windows
from sadtalker_rt.stages import POSE_CHUNK as POSE_SEQ_LEN
from sadtalker_rt.stages import pose_chunks
from sadtalker_rt.runtime.compose import Compositor
from sadtalker_rt.runtime.scheduler import FramePipeline, SerialExecutor
from sadtalker_rt.errors import InputError, WeightsError
from sadtalker_rt.runtime.pipeline import FPS, SAMPLE_RATE, Avatar, Options, TalkingHead
from sadtalker_rt.stages import STAGES

SAMPLES_PER_FRAME = SAMPLE_RATE // FPS
GOOD_PHOTO = "happy.png"


# ---------------------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakRSS:
    """Peak resident memory growth of this process over a block, in bytes.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``) where allowed, else samples VmRSS
    from a thread every 2 ms (which can miss a short spike, so it only under-reports).
    """

    def __enter__(self) -> "PeakRSS":
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._sampler = None
        except OSError:
            self._stop = threading.Event()
            self._peak = 0
            self._sampler = threading.Thread(target=self._sample, daemon=True)
        self.base = _status_kib("VmRSS") * 1024
        if self._sampler is not None:
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _status_kib("VmRSS") * 1024)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self._sampler is None:
            peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._sampler.join()
            peak = max(self._peak, _status_kib("VmRSS") * 1024)
        self.growth = peak - self.base


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status (Linux)")


# ---------------------------------------------------------------------------------------- stand-ins


class StubRunner:
    """A cheap numpy stage with the stage table's input and output names; counts its calls."""

    def __init__(self, stage: str, fn):
        self.stage = STAGES[stage]
        self.fn = fn
        self.calls: list[dict[str, tuple]] = []

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.stage, feeds)
        self.calls.append({k: np.shape(v) for k, v in feeds.items()})
        out = self.fn(**feeds)
        assert set(out) == {t.name for t in self.stage.outputs}
        return out


def stub_mapping(kp_canonical, semantics):
    """kp[:, 0, 0] carries the centre of each frame's window (the frame's own coefficient 0)."""
    kp = np.zeros((len(semantics), 15, 3), np.float32)
    kp[:, 0, 0] = semantics[:, 0, semantics.shape[2] // 2]
    return {"kp": kp}


def stub_renderer(size: int, fail_at_call: int | None = None, error: BaseException | None = None):
    calls = {"n": 0}

    def renderer(feature_3d, source_compressed, kp_source, kp_driving):
        calls["n"] += 1
        if fail_at_call is not None and calls["n"] == fail_at_call:
            raise error
        value = np.asarray(kp_driving)[:, 0, 0].astype(np.float32)
        return {"frames": np.broadcast_to(value[:, None, None, None], (len(value), 3, size, size)).copy()}

    return renderer


def stub_audio2exp(indiv_mels, ref_exp, blink):
    return {"exp": (ref_exp + blink + indiv_mels.mean(axis=(1, 2, 3))[:, None]).astype(np.float32)}


def stub_audio2pose(indiv_mels, ref_pose, pose_style, noise):
    assert indiv_mels.shape == (POSE_SEQ_LEN, 1, 80, 16)
    return {"motion": np.tile(noise[:, :6], (POSE_SEQ_LEN, 1)).astype(np.float32)}


class StubBackend(SerialBackend):
    name = "stub"

    def __init__(self, size: int = 256):
        self.size = size
        self.runners = {
            "audio2exp": StubRunner("audio2exp", stub_audio2exp),
            "audio2pose": StubRunner("audio2pose", stub_audio2pose),
            "mapping": StubRunner("mapping", stub_mapping),
            "mapping_full": StubRunner("mapping_full", stub_mapping),
            "renderer": StubRunner("renderer", stub_renderer(size)),
        }

    def runner(self, stage: str) -> StubRunner:
        return self.runners[stage]


def stub_avatar(size: int = 16, preprocess: str = "crop") -> Avatar:
    rng = np.random.default_rng(0)
    features = {"kp_canonical": np.zeros((1, 15, 3), np.float32), "kp_source": np.zeros((1, 15, 3), np.float32),
                "feature_3d": np.zeros((1, 32, 16, size // 4, size // 4), np.float32),
                "source_compressed": np.zeros((1, 4, 16, size // 4, size // 4), np.float32)}
    return Avatar(size, preprocess, np.zeros((size, size, 3), np.uint8), rng.normal(size=(1, 73)).astype(np.float32),
                  None, None, features)


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def head(assets_dir) -> TalkingHead:
    """Synthetic seed 0 at 256, with the known-good photo's avatar prepared once per preprocess mode."""
    model = TalkingHead.from_weights(WeightSource(synthetic_seed=0), size=256)
    real_prepare = model.prepare_avatar
    good = (assets_dir / GOOD_PHOTO).resolve()
    cache: dict[tuple, Avatar] = {}

    def prepare_avatar(image, preprocess="crop", name=None):
        source = image if isinstance(image, (str, Path)) else name      # the CLI hands over the decoded photo
        if source is not None and Path(source).resolve() == good:
            key = (preprocess, good.stat().st_mtime_ns)
            if key not in cache:
                cache[key] = real_prepare(image, preprocess, name=name)
            return cache[key]
        return real_prepare(image, preprocess, name=name)

    model.prepare_avatar = prepare_avatar
    model.real_prepare_avatar = real_prepare
    return model


@pytest.fixture
def stub_frames(head, monkeypatch):
    """Replace the per-frame stages (mapping, renderer) of the shared head by numpy stand-ins.

    Returns a function that installs a renderer failing with ``error`` at its ``n``-th call.
    """
    real_runner = head.backend.runner
    stubs = {"mapping": StubRunner("mapping", stub_mapping), "renderer": StubRunner("renderer", stub_renderer(256))}
    monkeypatch.setattr(head.backend, "runner", lambda stage: stubs.get(stage) or real_runner(stage))

    def fail_at(n: int, error: BaseException) -> None:
        stubs["renderer"] = StubRunner("renderer", stub_renderer(256, n, error))

    return fail_at


@dataclass
class Result:
    code: int
    out: str
    err: str
    warnings: list


@pytest.fixture
def cli(head, monkeypatch, capfd):
    """Run ``sadtalker-rt ARGS`` in-process; the synthetic seed-0 model at 256 on CPU is the shared one."""
    original = TalkingHead.from_weights.__func__

    def from_weights(cls, weights, size=256, device="cpu", precision="fp32", **options):
        if (weights.synthetic and weights.synthetic_seed == 0 and (size, device, precision) == (256, "cpu", "fp32")
                and not any(options.values())):
            return head
        return original(cls, weights, size=size, device=device, precision=precision, **options)

    monkeypatch.setattr(TalkingHead, "from_weights", classmethod(from_weights))

    def run(*args) -> Result:
        capfd.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = capfd.readouterr()
        return Result(code, out, err, [f"{w.category.__name__}: {w.message}" for w in caught])

    return run


@pytest.fixture
def dirs(tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    return inputs, outputs


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*")) if directory.exists() else []


def assert_clean_failure(result: Result, code: int, *words: str, out_dir: Path | None = None) -> str:
    """Exit ``code``, one ``error:`` line (the last; only ``note:`` lines before it) holding ``words``."""
    lines = [line for line in result.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.code == code, result.err
    assert len(errors) == 1 and lines[-1] == errors[0], result.err
    assert all(line.startswith(("error: ", "note: ")) for line in lines), result.err
    assert "Traceback" not in result.err + result.out and "internal error" not in errors[0], result.err
    assert not result.warnings, result.warnings
    for word in words:
        assert word.lower() in errors[0].lower(), (word, errors[0])
    if out_dir is not None:
        assert leftovers(out_dir) == [], leftovers(out_dir)
    return errors[0]


def write_wav(path: Path, frames: float, *, rate: int = SAMPLE_RATE, subtype: str = "PCM_16", seed: int = 0,
              silent: bool = False) -> Path:
    n = int(round(frames * SAMPLES_PER_FRAME * rate / SAMPLE_RATE))
    samples = np.zeros(n, np.float32) if silent else np.random.default_rng(seed).normal(0, 0.1, n).astype(np.float32)
    soundfile.write(path, np.clip(samples, -1, 1), rate, subtype=subtype)
    return path


def run_args(image: Path, audio: Path, out: Path, *extra) -> list:
    return ["run", image, audio, "-o", out, "--synthetic-weights", "--quiet", *extra]


# ---------------------------------------------------------------------------------------- images


def _photo(assets_dir: Path) -> np.ndarray:
    return media.load_image(assets_dir / GOOD_PHOTO)


def _face_box(assets_dir: Path):
    from sadtalker_rt.runtime import landmarks

    return landmarks.detect(_photo(assets_dir)).box


def _half_face(assets_dir: Path, path: Path) -> None:
    left, _, right, _ = _face_box(assets_dir)
    Image.fromarray(np.ascontiguousarray(_photo(assets_dir)[:, (left + right) // 2:])).save(path)


IMAGE_CASES = {
    "missing.png": (None, "does not exist"),
    "empty.png": (lambda a, p: p.write_bytes(b""), "empty"),
    "truncated.png": (lambda a, p: p.write_bytes((a / GOOD_PHOTO).read_bytes()[: (a / GOOD_PHOTO).stat().st_size // 2]),
                      "truncated"),
    "truncated_header.png": (lambda a, p: p.write_bytes((a / GOOD_PHOTO).read_bytes()[:40]), "corrupt"),
    "corrupt.jpg": (lambda a, p: p.write_bytes(np.random.default_rng(1).bytes(6000)), "corrupt"),
    "speech_as_image.png": (lambda a, p: p.write_bytes((a / "RD_Radio31_000.wav").read_bytes()[:50000]), "corrupt"),
    "grey.png": (lambda a, p: Image.new("RGB", (256, 256), (128, 128, 128)).save(p), "no face"),
    "noise.png": (lambda a, p: Image.fromarray(np.random.default_rng(2).integers(0, 256, (256, 256, 3), np.uint8))
                  .save(p), "no face"),
    "tiny.png": (lambda a, p: Image.open(a / GOOD_PHOTO).convert("RGB").resize((32, 32)).save(p), "32x32"),
    "half_face.png": (_half_face, "no face"),
}


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_unusable_image_is_one_input_error(cli, dirs, assets_dir, name):
    inputs, outputs = dirs
    make, problem = IMAGE_CASES[name]
    image = inputs / name
    if make is not None:
        make(assets_dir, image)
    audio = write_wav(inputs / "speech.wav", 2)
    result = cli(*run_args(image, audio, outputs / "talk.mp4"))
    assert_clean_failure(result, 3, name, problem, out_dir=outputs)


def test_face_cut_by_the_border_still_works_while_it_is_found(head, assets_dir, tmp_path):
    """A face partly outside the photo (here 20% of its box) is prepared like any other: the crop box is
    clamped to the photo as officially, and paste-back covers exactly the photo. Half a face is not found
    at all, which is the clean InputError above (``half_face.png``): animating half a face is not useful."""
    photo = _photo(assets_dir)
    left, top, right, bottom = _face_box(assets_dir)
    cut = np.ascontiguousarray(photo[:, : right - (right - left) // 5])
    Image.fromarray(cut).save(tmp_path / "cut.png")
    avatar = head.prepare_avatar(tmp_path / "cut.png", "full")
    assert avatar.source_frame.shape == (256, 256, 3)
    assert np.isfinite(avatar.source_coeffs).all()
    assert avatar.output_size == (cut.shape[1], cut.shape[0])
    out = Compositor(avatar)(np.full((256, 256, 3), 7, np.uint8))
    assert out.shape == cut.shape and (out == 7).any()


@needs_proc
def test_huge_photo_is_prepared_with_bounded_memory(head, assets_dir, tmp_path):
    """8000 x 8000 (64 megapixels, 192 MB as RGB): face search on a downscaled copy, the official shrink for
    the crop, and the photo converted strip by strip. Peak growth stays under 4x the RGB bytes."""
    path = tmp_path / "huge.png"
    Image.open(assets_dir / GOOD_PHOTO).convert("RGB").resize((8000, 8000), Image.BILINEAR).save(path, compress_level=1)
    head.backend.runner("face3d_recon"), head.backend.runner("kp_detector"), head.backend.runner("source_encoder")
    with PeakRSS() as peak:
        avatar = head.prepare_avatar(path, "crop")
    assert avatar.source_frame.shape == (256, 256, 3) and np.isfinite(avatar.source_coeffs).all()
    assert avatar.crop_info.image_size == (8000, 8000) and avatar.original is None
    assert peak.growth < 4 * 8000 * 8000 * 3, f"peak RSS grew by {peak.growth / 2**20:.0f} MiB"


def test_several_faces_use_the_largest_and_say_so(cli, dirs, assets_dir, stub_frames):
    inputs, outputs = dirs
    big = Image.open(assets_dir / GOOD_PHOTO).convert("RGB")
    small = big.resize((128, 128))
    canvas = Image.new("RGB", (128 + 40 + 256, 256), (200, 200, 200))
    canvas.paste(small, (0, 64))
    canvas.paste(big, (168, 0))                      # the larger face is on the right
    canvas.save(inputs / "two.png")
    out = outputs / "talk.mp4"
    result = cli(*run_args(inputs / "two.png", write_wav(inputs / "speech.wav", 1), out))
    assert result.code == 0, result.err
    notes = [line for line in result.err.splitlines() if "faces found" in line]
    assert len(notes) == 1 and notes[0].startswith("note: 2 faces found; using the largest"), result.err
    left = int(notes[0].split("at (")[1].split(",")[0])
    assert left >= 168 - 20, notes[0]
    assert media.probe_video(out)["frames"] == 1 and leftovers(outputs) == ["talk.mp4"]


# ---------------------------------------------------------------------------------------- audio


def _wav_bytes(frames: int = 4) -> bytes:
    import io

    buffer = io.BytesIO()
    soundfile.write(buffer, np.random.default_rng(0).normal(0, 0.1, frames * 640).astype(np.float32), SAMPLE_RATE,
                    format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _patched(offset: int, value: bytes):
    def make(path: Path) -> None:
        data = bytearray(_wav_bytes())
        data[offset:offset + len(value)] = value
        path.write_bytes(bytes(data))

    return make


AUDIO_CASES = {
    "missing.wav": (None, "does not exist"),
    "empty.wav": (lambda p: p.write_bytes(b""), "empty"),
    "truncated_header.wav": (lambda p: p.write_bytes(_wav_bytes()[:30]), "corrupt"),
    "header_only.wav": (lambda p: p.write_bytes(_wav_bytes()[:44]), "no audio samples"),
    "corrupt.wav": (lambda p: p.write_bytes(b"RIFF" + np.random.default_rng(3).bytes(5000)), "corrupt"),
    "bogus_format_tag.wav": (_patched(20, struct.pack("<H", 99)), "corrupt"),
    "bogus_riff_type.wav": (_patched(8, b"XXXX"), "corrupt"),
    "zero_channels.wav": (_patched(22, struct.pack("<H", 0)), "corrupt"),
    "zero_rate.wav": (_patched(24, struct.pack("<I", 0)), "corrupt"),
    "photo_as_audio.wav": (lambda p: Image.new("RGB", (64, 64)).save(p, format="PNG"), "no audio stream"),
    "shorter_than_a_frame.wav": (lambda p: write_wav(p, 0.75), "shorter than one video frame"),
}


@pytest.mark.parametrize("name", list(AUDIO_CASES))
def test_unusable_audio_is_one_input_error(cli, dirs, assets_dir, name):
    inputs, outputs = dirs
    make, problem = AUDIO_CASES[name]
    if make is not None:
        make(inputs / name)
    result = cli(*run_args(assets_dir / GOOD_PHOTO, inputs / name, outputs / "talk.mp4"))
    assert_clean_failure(result, 3, name, problem, out_dir=outputs)


def test_shorter_than_a_frame_message_does_not_round_up(cli, dirs, assets_dir):
    inputs, outputs = dirs
    soundfile.write(inputs / "a.wav", np.full(639, 0.1, np.float32), SAMPLE_RATE)
    line = assert_clean_failure(cli(*run_args(assets_dir / GOOD_PHOTO, inputs / "a.wav", outputs / "o.mp4")), 3)
    assert "40 ms < 40 ms" not in line, line


@pytest.mark.parametrize("subtype, tolerance", [("PCM_U8", 1 / 64), ("PCM_24", 1e-6), ("DOUBLE", 1e-7),
                                                ("PCM_16", 1e-4), ("FLOAT", 1e-7)])
def test_wav_sample_formats_decode_to_the_same_samples(tmp_path, subtype, tolerance):
    samples = np.random.default_rng(4).uniform(-0.9, 0.9, 3 * SAMPLES_PER_FRAME + 17)
    soundfile.write(tmp_path / "a.wav", samples, SAMPLE_RATE, subtype=subtype)
    loaded = media.load_audio(tmp_path / "a.wav")
    assert loaded.dtype == np.float32 and loaded.shape == samples.shape
    assert np.abs(loaded - samples).max() <= tolerance
    assert audio_features.frame_count(len(loaded)) == 3


def test_truncated_wav_data_gives_exactly_the_samples_present(tmp_path):
    """A WAV cut inside its data (a partial download) is read up to the cut, never padded or invented;
    one cut inside its header is the clean InputError of ``truncated_header.wav``."""
    data = _wav_bytes(10)
    (tmp_path / "cut.wav").write_bytes(data[: 44 + 2 * 1000 + 1])
    loaded = media.load_audio(tmp_path / "cut.wav")
    full = soundfile.read(__import__("io").BytesIO(data), dtype="float32")[0]
    assert len(loaded) == 1000
    np.testing.assert_array_equal(loaded, full[:1000])


def test_silent_audio_gives_still_finite_motion(head, assets_dir, tmp_path):
    avatar = head.prepare_avatar(assets_dir / GOOD_PHOTO, "crop")
    motion = head.motion(avatar, write_wav(tmp_path / "silence.wav", 50, silent=True))
    assert motion.frames == 50 and np.isfinite(motion.coeffs).all()
    assert np.isfinite(motion.indiv_mels).all() and motion.indiv_mels.min() == -4.0


def test_sequences_the_official_code_crashes_on(head, assets_dir):
    """21 frames (empty blink range), 1-2 frames (no smoothing window), 13 and 33 (window and chunk edges)."""
    avatar = head.prepare_avatar(assets_dir / GOOD_PHOTO, "crop")
    for frames in (21, 1, 2, 13, 33):
        wav = np.random.default_rng(frames).normal(0, 0.1, frames * SAMPLES_PER_FRAME).astype(np.float32)
        motion = head.motion(avatar, wav, Options(seed=frames))
        assert motion.coeffs.shape == (frames, 70) and np.isfinite(motion.coeffs).all()
        assert motion.indiv_mels.shape == (frames, 80, 16) and len(motion.wav) == frames * SAMPLES_PER_FRAME


@pytest.mark.parametrize("frames", [1, 2])
def test_one_and_two_frame_videos(cli, dirs, assets_dir, frames):
    inputs, outputs = dirs
    out = outputs / "talk.mp4"
    result = cli(*run_args(assets_dir / GOOD_PHOTO, write_wav(inputs / "a.wav", frames + 0.5), out,
                           "--batch-size", "2"))
    assert result.code == 0, result.err
    info = media.probe_video(out)
    assert info["frames"] == frames and (info["width"], info["height"]) == (256, 256)
    assert abs(info["audio_seconds"] - frames / FPS) < 0.07
    assert leftovers(outputs) == ["talk.mp4"]


# ---------------------------------------------------------------------------------------- checkpoints


def _small_safetensors(path: Path, prefix: str = "face_3drecon.") -> None:
    from safetensors.numpy import save_file

    save_file({prefix + "conv1.weight": np.ones((64, 3, 7, 7), np.float32),
               prefix + "bn1.weight": np.ones(64, np.float32)}, str(path))


def _write_mapping(path: Path, coeff_nc: int) -> None:
    import torch

    from sadtalker_rt.models.synthetic import synthetic_state_dict

    template = official_template("mapping" if coeff_nc == 70 else "mapping_full")
    torch.save({"mapping": {k: torch.from_numpy(v) for k, v in synthetic_state_dict(template, 0).items()}}, path)


def _foreign_bf16(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(8, 4, dtype=torch.bfloat16)}, str(path))


def _foreign_float(path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"model.layers.0.mlp.weight": np.zeros((4, 4), np.float32)}, str(path))


def _truncated(path: Path) -> None:
    _small_safetensors(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CHECKPOINT_CASES = {
    "missing": (None, "is missing"),
    "truncated": (_truncated, "not a readable safetensors"),
    "photo_under_the_official_name": (lambda p: Image.new("RGB", (64, 64)).save(p, format="PNG"),
                                      "not a readable safetensors"),
    "foreign_bfloat16": (_foreign_bf16, "cannot read"),
    "foreign_float32": (_foreign_float, "not a sadtalker checkpoint"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint_directory_is_one_weights_error(cli, dirs, assets_dir, case):
    inputs, outputs = dirs
    checkpoints = inputs / "checkpoints"
    checkpoints.mkdir()
    make, problem = CHECKPOINT_CASES[case]
    if make is not None:
        make(checkpoints / safetensors_name(256))
    args = ["run", assets_dir / GOOD_PHOTO, write_wav(inputs / "a.wav", 2), "-o", outputs / "talk.mp4",
            "--checkpoints", checkpoints, "--quiet"]
    assert_clean_failure(cli(*args), 4, safetensors_name(256), problem, out_dir=outputs)


@pytest.mark.parametrize("name, holds", [("mapping", 73), ("mapping_full", 70)])
def test_mapping_file_of_the_other_preprocess_family(tmp_path, name, holds):
    _write_mapping(tmp_path / SUBNETWORKS[name].legacy_file, holds)
    with pytest.raises(WeightsError) as caught:
        WeightSource(tmp_path, size=256).build(name)
    message = str(caught.value)
    assert SUBNETWORKS[name].legacy_file in message and f"{holds} coefficients" in message and "swapped" in message
    assert caught.value.exit_code == 4 and "\n" not in message


def _evil_pickle(path: Path) -> None:
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo unpickled code ran",))

    torch.save({"mapping": Payload()}, path)


MAPPING_FILE_CASES = {
    "missing": (None, "is missing"),
    "truncated": (lambda p: (_write_mapping(p, 70), p.write_bytes(p.read_bytes()[:100000])), "truncated or damaged"),
    "code_inside": (_evil_pickle, "weights-only"),
    "not_a_checkpoint": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(500)), "not a pytorch checkpoint"),
    "list_not_state_dict": (lambda p: __import__("torch").save({"mapping": [1, 2]}, p), "not a state dict"),
    "other_entries": (lambda p: __import__("torch").save({"model": {}}, p), "no 'mapping' entry"),
}


@pytest.mark.parametrize("case", list(MAPPING_FILE_CASES))
def test_bad_mapping_file_is_one_weights_error(tmp_path, capfd, case):
    make, problem = MAPPING_FILE_CASES[case]
    path = tmp_path / SUBNETWORKS["mapping"].legacy_file
    if make is not None:
        make(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(WeightsError) as caught:
            WeightSource(tmp_path, size=256).build("mapping")
    message = str(caught.value)
    assert path.name in message and problem in message.lower() and "\n" not in message and "\x1b" not in message
    assert "unpickled code ran" not in capfd.readouterr().out


# ---------------------------------------------------------------------------------------- ONNX graph directories


def _tiny_graph(path: Path, inputs: dict[str, list[int]], output: str, out_shape: list[int]) -> None:
    """A valid ONNX graph with the given input names and shapes: output = 0 * mean(first input) + zeros."""
    import onnx
    from onnx import TensorProto, helper

    first = next(iter(inputs))
    nodes = [helper.make_node("ReduceMean", [first], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zeros"], [output])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)],
        [helper.make_tensor("zeros", TensorProto.FLOAT, out_shape, np.zeros(int(np.prod(out_shape)), np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _graph_dir(directory: Path, size: int = 256, graph_size: int | None = None, **manifest_fields) -> Path:
    """A manifest with face3d_recon and kp_detector graphs (tiny stand-ins of the right names and shapes)."""
    from sadtalker_rt.runtime.manifest import FORMAT

    directory.mkdir()
    side = graph_size or size
    _tiny_graph(directory / "face3d_recon.onnx", {"aligned_image": [1, 3, 224, 224]}, "coeffs", [1, 257])
    _tiny_graph(directory / "kp_detector.onnx", {"source_image": [1, 3, side, side]}, "kp_canonical", [1, 15, 3])
    stages = {name: {"file": f"{name}.onnx", "sha256": hashlib.sha256((directory / f"{name}.onnx").read_bytes())
                     .hexdigest()} for name in ("face3d_recon", "kp_detector")}
    manifest = {"format": FORMAT, "size": size, "precision": "fp32", "weights": {"description": "test graphs"},
                "stages": stages, **manifest_fields}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def _engines_run(assets_dir, inputs, outputs, engines, *extra):
    return ["run", assets_dir / GOOD_PHOTO, write_wav(inputs / "a.wav", 2), "-o", outputs / "talk.mp4",
            "--backend", "onnxruntime", "--graphs", engines, "--quiet", *extra]


def test_graphs_of_another_size_than_asked(cli, dirs, assets_dir):
    inputs, outputs = dirs
    engines = _graph_dir(inputs / "graphs")
    result = cli(*_engines_run(assets_dir, inputs, outputs, engines, "--size", "512"))
    assert_clean_failure(result, 2, "--size 512", "size 256", out_dir=outputs)


def test_explicit_size_256_with_graphs_of_512(cli, dirs, assets_dir):
    inputs, outputs = dirs
    engines = _graph_dir(inputs / "graphs", size=512)
    result = cli(*_engines_run(assets_dir, inputs, outputs, engines, "--size", "256"))
    assert_clean_failure(result, 2, "--size 256", "size 512", out_dir=outputs)


def test_manifest_of_another_toolkit(cli, dirs, assets_dir):
    inputs, outputs = dirs
    engines = _graph_dir(inputs / "graphs", format="onnx-exporter/2")
    result = cli(*_engines_run(assets_dir, inputs, outputs, engines))
    assert_clean_failure(result, 4, "manifest.json", "onnx-exporter/2", out_dir=outputs)


@pytest.mark.parametrize("manifest", [
    pytest.param("[1, 2, 3]", id="json_list"),
    pytest.param('{"format": "sadtalker-rt/onnx-1", "stages": {}}', id="no_size"),
    pytest.param("{not json", id="not_json"),
])
def test_malformed_manifest_is_one_weights_error(cli, dirs, assets_dir, manifest):
    inputs, outputs = dirs
    (inputs / "graphs").mkdir()
    (inputs / "graphs" / "manifest.json").write_text(manifest)
    result = cli(*_engines_run(assets_dir, inputs, outputs, inputs / "graphs"))
    assert_clean_failure(result, 4, "manifest.json", out_dir=outputs)


def test_tampered_graph_is_refused_before_loading(cli, dirs, assets_dir):
    inputs, outputs = dirs
    engines = _graph_dir(inputs / "graphs")
    data = bytearray((engines / "face3d_recon.onnx").read_bytes())
    data[-20] ^= 0xFF
    (engines / "face3d_recon.onnx").write_bytes(bytes(data))
    result = cli(*_engines_run(assets_dir, inputs, outputs, engines))
    assert_clean_failure(result, 4, "face3d_recon.onnx", "sha256", out_dir=outputs)


def test_damaged_graph_with_a_matching_hash(cli, dirs, assets_dir):
    inputs, outputs = dirs
    engines = _graph_dir(inputs / "graphs")
    (engines / "face3d_recon.onnx").write_bytes(b"not a graph" * 10)
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["stages"]["face3d_recon"]["sha256"] = hashlib.sha256(b"not a graph" * 10).hexdigest()
    (engines / "manifest.json").write_text(json.dumps(manifest))
    result = cli(*_engines_run(assets_dir, inputs, outputs, engines))
    assert_clean_failure(result, 4, "face3d_recon.onnx", "onnxruntime", out_dir=outputs)


def test_graph_exported_at_another_size_than_its_manifest(cli, dirs, assets_dir):
    inputs, outputs = dirs
    engines = _graph_dir(inputs / "graphs", size=256, graph_size=512)
    result = cli(*_engines_run(assets_dir, inputs, outputs, engines))
    assert_clean_failure(result, 4, "kp_detector.onnx", "512", out_dir=outputs)


# ---------------------------------------------------------------------------------------- output


def test_output_under_a_regular_file(cli, dirs, assets_dir):
    inputs, outputs = dirs
    (outputs / "notes.txt").write_text("keep me")
    out = outputs / "notes.txt" / "talk.mp4"
    result = cli(*run_args(assets_dir / GOOD_PHOTO, write_wav(inputs / "a.wav", 2), out))
    assert_clean_failure(result, 6, "talk.mp4", "not a directory")
    assert leftovers(outputs) == ["notes.txt"] and (outputs / "notes.txt").read_text() == "keep me"


def test_existing_output_is_untouched_without_overwrite(cli, dirs, assets_dir):
    inputs, outputs = dirs
    out = outputs / "talk.mp4"
    out.write_bytes(b"an older video")
    os.utime(out, (1_000_000, 1_000_000))
    result = cli(*run_args(assets_dir / GOOD_PHOTO, write_wav(inputs / "a.wav", 2), out))
    assert_clean_failure(result, 6, "talk.mp4", "--overwrite")
    assert out.read_bytes() == b"an older video" and out.stat().st_mtime == 1_000_000
    assert leftovers(outputs) == ["talk.mp4"]


@pytest.mark.parametrize("problem", ["missing_audio", "output_under_a_file"])
def test_bad_audio_or_output_fails_before_any_model_runs(cli, dirs, head, assets_dir, monkeypatch, problem):
    inputs, outputs = dirs
    audio, out = write_wav(inputs / "a.wav", 2), outputs / "talk.mp4"
    if problem == "missing_audio":
        audio = inputs / "missing.wav"
    else:
        (outputs / "file").write_text("")
        out = outputs / "file" / "talk.mp4"
    ran = []
    monkeypatch.setattr(head, "prepare_avatar", lambda *a, **k: ran.append("prepare_avatar"))
    result = cli(*run_args(assets_dir / GOOD_PHOTO, audio, out))
    assert result.code in (3, 6) and not ran, (result.err, ran)


def test_output_never_replaces_an_input(cli, dirs, assets_dir, stub_frames):
    inputs, outputs = dirs
    audio = write_wav(inputs / "a.wav", 2)
    before = audio.read_bytes()
    result = cli(*run_args(assets_dir / GOOD_PHOTO, audio, audio, "--overwrite"))
    assert audio.read_bytes() == before
    assert_clean_failure(result, 6, "a.wav")


# ---------------------------------------------------------------------------------------- faults mid-render


FAULTS = {
    "bug": (RuntimeError("renderer exploded"), 1, "internal error"),
    "out_of_memory": (MemoryError(), 1, "out of memory"),
    "interrupted": (KeyboardInterrupt(), 130, "interrupted"),
}




@pytest.mark.parametrize("fault", ["bug", "out_of_memory", "interrupted",
                                   "disk_full"])
def test_fault_mid_render_leaves_the_previous_video(cli, dirs, assets_dir, stub_frames, monkeypatch, fault):
    """A failure after frames were encoded: one line, the old video intact, no temporary file."""
    inputs, outputs = dirs
    out = outputs / "talk.mp4"
    out.write_bytes(b"the previous video")
    if fault == "disk_full":
        real_mux = media.VideoWriter._mux
        calls = {"n": 0}

        class FullDisk:
            def mux(self, packets):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def mux(self, packets):     # the container starts failing after a few writes, as a disk filling up
            calls["n"] += 1
            if calls["n"] <= 4:
                return real_mux(self, packets)
            container, self._container = self._container, FullDisk()
            try:
                return real_mux(self, packets)
            finally:
                self._container = container

        monkeypatch.setattr(media.VideoWriter, "_mux", mux)
        code, words = 6, ("talk.mp4", "no space left")
    else:
        error, code, word = FAULTS[fault]
        stub_frames(3, error)      # batches 0 and 1 rendered, batch 0 encoded, then the fault
        words = (word,)
    result = cli(*run_args(assets_dir / GOOD_PHOTO, write_wav(inputs / "a.wav", 6), out, "--overwrite",
                           "--batch-size", "2"))
    lines = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert result.code == code and len(lines) == 1, result.err
    assert all(w in lines[0].lower() for w in words) and "Traceback" not in result.err, result.err
    assert out.read_bytes() == b"the previous video" and leftovers(outputs) == ["talk.mp4"]


def test_failed_job_removes_the_directories_it_made(cli, dirs, assets_dir, stub_frames):
    """``-o new/deeper/talk.mp4`` creates the directories; a failure after encoding began removes them again."""
    inputs, outputs = dirs
    stub_frames(3, RuntimeError("renderer exploded"))
    out = outputs / "new" / "deeper" / "talk.mp4"
    result = cli(*run_args(assets_dir / GOOD_PHOTO, write_wav(inputs / "a.wav", 6), out))
    assert result.code == 1 and "renderer exploded" in result.err, result.err
    assert leftovers(outputs) == []


def test_error_stays_one_line_whatever_the_file_name(cli, dirs):
    inputs, outputs = dirs
    result = cli(*run_args(inputs / "two\nlines.png", write_wav(inputs / "a.wav", 2), outputs / "talk.mp4"))
    assert_clean_failure(result, 3, "two\\nlines.png", "does not exist", out_dir=outputs)


def test_a_command_that_fails_exits_nonzero(cli, tmp_path):
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "index.json").write_text("[]")
    result = cli("conformance", tmp_path)
    assert "0 passed, 0 failed" in result.out
    assert result.code == 1, result.err


# ---------------------------------------------------------------------------------------- usage


@pytest.mark.parametrize("extra, words", [
    (["--pose-style", "99"], ("--pose-style", "99")),
    (["--batch-size", "0"], ("--batch-size", "0")),
    (["--checkpoints", "{inputs}"], ("--checkpoints", "--synthetic-weights")),
    (["--preprocess", "zoom"], ("--preprocess", "zoom")),
    (["--size", "300"], ("--size", "300")),
    (["--duration", "0"], ("--duration",)),
    (["--expression-scale", "nan"], ("--expression-scale",)),
])
def test_contradictory_or_out_of_range_options(cli, dirs, assets_dir, extra, words):
    inputs, outputs = dirs
    extra = [e.format(inputs=inputs) for e in extra]
    result = cli(*run_args(assets_dir / GOOD_PHOTO, write_wav(inputs / "a.wav", 2), outputs / "talk.mp4", *extra))
    assert_clean_failure(result, 2, *words, out_dir=outputs)


# ---------------------------------------------------------------------------------------- shape properties


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=0, max_value=6 * SAMPLE_RATE), seed=st.integers(0, 3))
def test_audio_length_to_frames_through_the_pipeline(n, seed):
    """floor(n / 640) frames, every stage fed the stage table's shapes, InputError below one frame."""
    head = TalkingHead(StubBackend(16), size=16)
    wav = np.random.default_rng(seed).normal(0, 0.1, n).astype(np.float32)
    frames = n // SAMPLES_PER_FRAME
    assert audio_features.frame_count(n) == frames
    if frames < 1:
        with pytest.raises(InputError, match="shorter than one video frame"):
            head.motion(stub_avatar(), wav)
        return
    motion = head.motion(stub_avatar(), wav, Options(seed=seed))
    assert motion.coeffs.shape == (frames, 70) and np.isfinite(motion.coeffs).all()
    assert len(motion.wav) == frames * SAMPLES_PER_FRAME and motion.indiv_mels.shape == (frames, 80, 16)
    assert len(head.backend.runners["audio2pose"].calls) == len(pose_chunks(frames))
    exp_calls = head.backend.runners["audio2exp"].calls
    assert sum(c["indiv_mels"][0] for c in exp_calls) == frames
    assert all(c == {"indiv_mels": (c["blink"][0], 1, 80, 16), "ref_exp": (c["blink"][0], 64),
                     "blink": (c["blink"][0], 1)} for c in exp_calls)
    mel = audio_features.melspectrogram(motion.wav)
    assert mel.shape == (1 + len(motion.wav) // audio_features.HOP, 80)


@settings(max_examples=200, deadline=None)
@given(T=st.integers(min_value=1, max_value=5000))
def test_pose_chunks_cover_every_frame_once(T):
    chunks = pose_chunks(T)
    kept = [i for c in chunks for i in range(c.stop - c.keep, c.stop)]
    assert kept == list(range(T - 1))                  # frame 0 is the reference; 1.. map to mels[1:]
    for c in chunks:
        assert 0 <= c.start < c.stop <= T - 1 and 1 <= c.keep <= POSE_SEQ_LEN
        assert c.stop - c.start == min(POSE_SEQ_LEN, T - 1) and c.keep <= c.stop - c.start
    assert len(chunks) == -(-(T - 1) // POSE_SEQ_LEN)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(min_value=1, max_value=120), full=st.booleans(), still=st.booleans(),
       batch=st.integers(min_value=1, max_value=9), scale=st.floats(-2, 2))
def test_semantic_windows_for_any_length_and_batch(T, full, still, batch, scale):
    rng = np.random.default_rng(T)
    coeffs, source = rng.normal(size=(T, 70)), rng.normal(size=(1, 73))
    src, tgt = semantic_windows(coeffs, source, full=full, still=still, expression_scale=scale)
    channels = 73 if full else 70
    assert src.shape == (1, channels, 27) and tgt.shape == (T, channels, 27)
    expected = np.concatenate([coeffs, np.repeat(source[:, 70:], T, 0)], 1)[:, :channels] if full else coeffs.copy()
    expected[:, :64] *= scale
    if still:
        expected[:, 64:] = source[:, 64:channels]
    for j in range(27):
        np.testing.assert_allclose(tgt[:, :, j], expected[np.clip(np.arange(T) + j - 13, 0, T - 1)])
    batches = [tgt[s:s + batch] for s in range(0, T, batch)]        # how the frame pipeline slices them
    assert sum(len(b) for b in batches) == T and all(1 <= len(b) <= batch for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), tgt)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(min_value=0, max_value=40), batch=st.integers(min_value=1, max_value=9),
       slots=st.integers(min_value=2, max_value=4), stop_after=st.one_of(st.none(), st.integers(0, 40)))
def test_frame_pipeline_yields_every_frame_once_in_order(T, batch, slots, stop_after):
    size = 8
    backend = StubBackend(size)
    features = stub_avatar(size).features
    pipeline = FramePipeline(SerialExecutor(backend.runner), features, size, batch, host_slots=slots)
    targets = np.zeros((T, 70, 27), np.float32)
    targets[:, 0, 13] = np.arange(T) / 64.0            # each frame carries its own index through both stages
    seen = []
    frames = pipeline.frames(targets)
    for index, chw in frames:
        assert chw.shape == (3, size, size)
        np.testing.assert_array_equal(chw, np.float32(index / 64.0))
        seen.append(index)
        if stop_after is not None and len(seen) >= stop_after:
            frames.close()                              # a consumer that stops early
            break
    assert seen == list(range(T if stop_after is None else min(T, max(stop_after, 1))))
    mapping_batches = [call["semantics"][0] for call in backend.runners["mapping"].calls]
    assert all(b == batch for b in mapping_batches)     # a short last batch is padded, as the official pads it
    if stop_after is None:
        assert len(mapping_batches) == -(-T // batch)
        assert [c["kp_driving"][0] for c in backend.runners["renderer"].calls] == mapping_batches


def _whole_image_reference(image: Image.Image) -> np.ndarray:
    """The conversion load_image makes, on the whole image at once."""
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"))


MODES = ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "1", "CMYK", "I;16"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 260), height=st.integers(1, 260), mode=st.sampled_from(MODES),
       fmt=st.sampled_from(["PNG", "TIFF", "WEBP"]), strip_rows=st.integers(1, 9))
def test_image_sizes_and_modes_through_load_image(tmp_path_factory, width, height, mode, fmt, strip_rows):
    rng = np.random.default_rng(width * 1000 + height)
    rgba = rng.integers(0, 256, (height, width, 4), np.uint8)
    base = Image.fromarray(rgba, "RGBA")
    if mode == "P+transparency":
        image = base.convert("RGB").convert("P", palette=Image.ADAPTIVE, colors=16)
        image.info["transparency"] = 3
    elif mode == "P":
        image = base.convert("RGB").convert("P")
    elif mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), np.uint16))
    else:
        image = base.convert(mode)
    if fmt == "WEBP" and mode not in ("RGB", "RGBA"):
        fmt = "PNG"
    if mode == "CMYK":
        fmt = "TIFF"
    path = tmp_path_factory.mktemp("img") / f"a.{fmt.lower()}"
    image.save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    with mock.patch.object(media, "STRIP_BYTES", 3 * width * strip_rows):
        if min(width, height) < media.MIN_IMAGE_SIDE:
            with pytest.raises(InputError, match=f"{width}x{height} pixels"):
                media.load_image(path)
            return
        loaded = media.load_image(path)
    assert loaded.shape == (height, width, 3) and loaded.dtype == np.uint8 and loaded.flags.c_contiguous
    with Image.open(path) as reread:
        reread.load()
        if mode == "I;16":
            reference = np.repeat(media._high_depth_grey_to_uint8(np.asarray(reread))[..., None], 3, axis=2)
        else:
            reference = _whole_image_reference(reread)
    np.testing.assert_array_equal(loaded, reference)


# ---------------------------------------------------------------------------------------- long jobs


HOUR_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import numpy as np

    def kib(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])

    from sadtalker_rt.models.checkpoints import WeightSource
    from sadtalker_rt.runtime.pipeline import SAMPLE_RATE, TalkingHead
    head = TalkingHead.from_weights(WeightSource(synthetic_seed=0))
    avatar = head.prepare_avatar(sys.argv[1], "crop")
    head.motion(avatar, np.zeros(3 * 640, np.float32))                 # the audio stages are built
    wav = np.random.default_rng(0).normal(0, 0.1, int(float(sys.argv[2]) * SAMPLE_RATE)).astype(np.float32)
    limit = int(float(sys.argv[3]) * 2**30)
    # An address-space cap a little above the bound: a runaway allocation fails here, not on the machine.
    cap = kib("VmSize") * 1024 + limit + 2**30
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    Path("/proc/self/clear_refs").write_text("5")
    base = kib("VmRSS")
    motion = head.motion(avatar, wav)
    print(json.dumps({"frames": motion.frames, "growth_bytes": (kib("VmHWM") - base) * 1024}))
""")


@pytest.mark.heavy
@needs_proc
def test_an_hour_of_audio_keeps_memory_bounded(assets_dir):
    import sadtalker_rt

    minutes, bound_gib = 60, 3.0
    # The child imports the package under test, wherever the environment's installed copy points.
    here = str(Path(sadtalker_rt.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", HOUR_SCRIPT, str(assets_dir / GOOD_PHOTO), str(minutes * 60),
                           str(bound_gib)], capture_output=True, text=True, timeout=3 * 3600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["frames"] == minutes * 60 * FPS
    assert report["growth_bytes"] < bound_gib * 2**30, f"peak RSS grew by {report['growth_bytes'] / 2**30:.2f} GiB"
