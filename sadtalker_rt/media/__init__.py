"""Media input and output for the lean runtime: photos, speech and the finished mp4.

Images are read with Pillow, WAV/FLAC/OGG with soundfile and everything else with PyAV; video is
written with PyAV (libx264 + AAC). Every user-facing failure is a typed error from ``errors``
carrying one sentence that names the file. Nothing here imports torch.
"""
from __future__ import annotations

import itertools
import os
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Union

import numpy as np

from ..errors import EnvironmentProblem, InputError, OutputError
from ..stages import FPS, SAMPLE_RATE

PathLike = Union[str, os.PathLike]

MIN_IMAGE_SIDE = 64
MAX_IMAGE_PIXELS = 100_000_000

_ASSETS = Path(__file__).resolve().parents[1] / "assets"


def demo_image() -> Path:
    """The bundled public-domain astronaut portrait (512x512 JPEG)."""
    return _ASSETS / "astronaut.jpg"


def demo_audio() -> Path:
    """The bundled 2.9 s espeak-ng speech clip (16 kHz mono WAV)."""
    return _ASSETS / "speech.wav"


# ---------------------------------------------------------------------------------------- files


def _require_readable_file(path: Path, kind: str) -> None:
    if not path.exists():
        raise InputError(f"{kind} file '{path}' does not exist.")
    if not path.is_file():
        raise InputError(f"{kind} file '{path}' is not a regular file.")
    if not os.access(path, os.R_OK):
        raise InputError(f"{kind} file '{path}' cannot be read (permission denied).")
    if path.stat().st_size == 0:
        raise InputError(f"{kind} file '{path}' is empty (0 bytes).")


def check_output_path(path: PathLike, overwrite: bool = False) -> None:
    """OutputError where a video could not be written to ``path``; creates nothing.

    Catches what is knowable before any work: a directory in the way, an existing file without
    ``overwrite``, a regular file where a parent directory should be, a directory that is not writable.
    A full disk can still only show while writing; ``VideoWriter`` then leaves nothing behind.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"Output path '{path}' is a directory, not a video file name.")
    if path.exists() and not overwrite:
        raise OutputError(f"Output file '{path}' already exists; pass overwrite=True (--overwrite) to replace it.")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent      # missing directories are created when writing
    if not ancestor.is_dir():
        raise OutputError(f"Cannot write video file '{path}': '{ancestor}' is a file, not a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write video file '{path}': directory '{ancestor}' is not writable.")


def _one_line(err: BaseException) -> str:
    """The reason inside an exception, without errno numbers or a repeated file name."""
    text = getattr(err, "strerror", None) or str(err)
    return " ".join(text.split()).rstrip(".") or type(err).__name__


# ---------------------------------------------------------------------------------------- images


def load_image(path: PathLike) -> np.ndarray:
    """Read a photo as (H, W, 3) uint8 RGB, upright per EXIF, transparency composited on white."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    _require_readable_file(path, "Image")
    try:
        with warnings.catch_warnings():
            # Our own 100-megapixel limit below replaces Pillow's warning; Pillow still raises
            # DecompressionBombError past twice its limit, which is reported the same way.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # format is detected from content, not the extension
                _check_image_size(path, image.size)
                image.seek(0)  # first frame of animated GIF/WebP/APNG
                image.load()
                # In place: a copy of a 100-megapixel photo costs 400 MB; only a real rotation makes one.
                ImageOps.exif_transpose(image, in_place=True)
                return _to_rgb_array(path, image)
    except Image.DecompressionBombError:
        raise InputError(f"Image file '{path}' is larger than the {MAX_IMAGE_PIXELS // 1_000_000}-megapixel limit.") from None
    except UnidentifiedImageError:      # not an image format Pillow knows: perhaps a video
        pass
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # Pillow reports truncated and damaged data as OSError, SyntaxError or ValueError.
        raise InputError(f"Image file '{path}' is truncated or corrupt ({_one_line(err)}).") from None
    return _video_as_photo(path)


def _video_as_photo(path: Path) -> np.ndarray:
    """A source that is a video: its first frame is the photo (as officially)."""
    from .video_input import first_video_frame

    try:
        return first_video_frame(path, kind="Image")
    except InputError:
        raise InputError(f"Image file '{path}' is not an image format that can be read (nor a video), "
                         "or is corrupt.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # Pillow reports truncated and damaged data as OSError, SyntaxError or ValueError.
        raise InputError(f"Image file '{path}' is truncated or corrupt ({_one_line(err)}).") from None


def _check_image_size(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"Image file '{path}' is {width}x{height} pixels, larger than the "
            f"{MAX_IMAGE_PIXELS // 1_000_000}-megapixel limit."
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise InputError(
            f"Image file '{path}' is {width}x{height} pixels; at least {MIN_IMAGE_SIDE} pixels on each side is needed."
        )


STRIP_BYTES = 16 << 20      # large photos are converted in horizontal strips of about this many RGB bytes


def _to_rgb_array(path: Path, image) -> np.ndarray:
    """(H, W, 3) uint8, converted strip by strip: peak memory is the decoded image plus the result.

    Converting the whole image at once (``convert`` copies, ``np.asarray`` goes through ``tobytes``)
    held four to five copies of a large photo at the same time. Every conversion here is per pixel,
    so strips give exactly the whole-image result.
    """
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = Image.fromarray(_high_depth_grey_to_uint8(np.asarray(image)))
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    width, height = image.size
    out = np.empty((height, width, 3), np.uint8)
    rows = max(1, STRIP_BYTES // (3 * width))
    try:
        for top in range(0, height, rows):
            strip = image.crop((0, top, width, min(height, top + rows))) if rows < height else image
            if has_alpha:
                rgba = strip.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                strip = Image.alpha_composite(white, rgba)
            if strip.mode != "RGB":
                strip = strip.convert("RGB")  # also covers L, 1, P, CMYK (Adobe-inverted JPEGs included) and YCbCr
            out[top:top + strip.size[1]] = np.asarray(strip, dtype=np.uint8)
    except ValueError:
        raise InputError(f"Image file '{path}' uses colour mode {image.mode}, which cannot be converted to RGB.") from None
    return out


def _high_depth_grey_to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit and float greyscale to 8 bits; Pillow's own conversion clips instead of scaling."""
    values = values.astype(np.float64)
    peak = float(np.nanmax(values)) if values.size else 0.0
    if peak <= 1.0:  # float images in [0, 1]
        scale = 255.0
    elif peak <= 255.0:  # 8-bit data stored in a 32-bit mode
        scale = 1.0
    else:
        scale = 255.0 / 65535.0
    return np.clip(np.nan_to_num(values) * scale + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------- audio


def load_audio(path: PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read speech as mono float32 at ``sample_rate``: channels averaged, resampled with soxr (HQ)."""
    path = Path(path)
    _require_readable_file(path, "Audio")
    samples, native_rate = _decode_audio(path)
    if samples.shape[0] == 0:
        raise InputError(f"Audio file '{path}' contains no audio samples.")
    if not np.isfinite(samples).all():
        raise InputError(f"Audio file '{path}' contains NaN or infinite samples.")
    mono = samples.mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(_resample(mono, native_rate, sample_rate), dtype=np.float32)


def audio_duration(path: PathLike) -> float:
    """Length of the audio in seconds at its native rate."""
    path = Path(path)
    _require_readable_file(path, "Audio")
    info = _soundfile_info(path)
    if info is not None and info.frames > 0:
        return info.frames / info.samplerate
    samples, native_rate = _decode_audio(path)
    return samples.shape[0] / native_rate


def _decode_audio(path: Path) -> tuple[np.ndarray, int]:
    """(samples, channels) float32 and the native rate; soundfile first, PyAV for what it cannot read."""
    decoded = _decode_with_soundfile(path)
    if decoded is not None:
        return decoded
    return _decode_with_pyav(path)


def _soundfile_info(path: Path):
    import soundfile

    try:
        return soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        return None


def _decode_with_soundfile(path: Path) -> tuple[np.ndarray, int] | None:
    import soundfile

    info = _soundfile_info(path)
    # libsndfile's MP3 support varies between builds and ignores encoder delay; leave MP3 to FFmpeg.
    if info is None or info.format == "MP3":
        return None
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError):
        return None
    return samples, int(rate)


def _decode_with_pyav(path: Path) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise InputError(f"Audio file '{path}' has no audio stream.")
            return _decode_audio_stream(container, container.streams.audio[0])
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as err:
        raise InputError(f"Audio file '{path}' is not audio that can be decoded, or is corrupt ({_one_line(err)}).") from None


def _decode_audio_stream(container, stream) -> tuple[np.ndarray, int]:
    """Decode to (samples, channels) float32; only the sample format is converted here."""
    import av

    to_planar_float = av.AudioResampler(format="fltp")  # keeps the layout and rate
    chunks, rate = [], None
    for frame in container.decode(stream):
        rate = rate or frame.sample_rate
        for converted in to_planar_float.resample(frame):
            chunks.append(converted.to_ndarray())
    for converted in to_planar_float.resample(None):
        chunks.append(converted.to_ndarray())
    if not chunks:
        return np.zeros((0, 1), np.float32), rate or stream.rate or SAMPLE_RATE
    return np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False), rate


def _resample(mono: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    if source_rate == target_rate:
        return mono
    try:
        import soxr
    except ImportError:
        raise EnvironmentProblem("Resampling audio needs the 'soxr' package; install it with 'pip install soxr'.") from None
    return soxr.resample(mono, source_rate, target_rate, quality="HQ")


# ---------------------------------------------------------------------------------------- video


class VideoWriter:
    """Stream RGB frames into an H.264 + AAC mp4, written atomically.

    Frames are encoded as they arrive, and the audio is encoded alongside them (a video frame's
    worth at a time), so memory stays bounded and the file is interleaved. The audio track ends
    exactly where the video does: it is cut, or padded with silence, to ``frames / fps`` seconds.
    The mp4 is built in a hidden temporary file beside ``path`` and renamed over it only after a
    clean finish; any exception, KeyboardInterrupt included, removes the temporary file instead.

        with VideoWriter("out.mp4", 256, 256, audio=load_audio("speech.wav")) as writer:
            for frame in frames:
                writer.write(frame)
    """

    def __init__(
        self,
        path: PathLike,
        width: int | None = None,
        height: int | None = None,
        *,
        audio: np.ndarray | None = None,
        fps: int = FPS,
        sample_rate: int = SAMPLE_RATE,
        crf: int = 18,
        preset: str = "medium",
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self.fps = int(fps)
        self.sample_rate = int(sample_rate)
        self.crf = crf
        self.preset = preset
        self.overwrite = overwrite
        self.audio = None if audio is None else _mono_float32(audio)
        self.frames_written = 0
        self._audio_samples_fed = 0
        # Without width and height the first frame fixes the size.
        self._frame_shape: tuple[int, int] | None = _expected_shape(width, height)
        self._container = None
        self._video_stream = None
        self._audio_stream = None
        self._temp_path: Path | None = None
        self._created_dirs: list[Path] = []  # made for this file, deepest first; removed again on abort

    # -- lifecycle

    def __enter__(self) -> "VideoWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self) -> None:
        import av

        self._check_target()
        self._temp_path = self._make_temp_file()
        try:
            self._container = av.open(str(self._temp_path), mode="w", format="mp4")
        except (av.FFmpegError, OSError) as err:
            self.abort()
            raise OutputError(f"Cannot write video file '{self.path}' ({_one_line(err)}).") from None

    def write(self, frame: np.ndarray) -> None:
        """Encode one (H, W, 3) uint8 RGB frame; every frame must have the first frame's size."""
        if self._container is None:
            raise RuntimeError("VideoWriter.write() called before open() or after close().")
        frame = self._validated(frame)
        if self._video_stream is None:
            self._add_streams(frame.shape[1], frame.shape[0])
        self._encode_video_frame(frame)
        self.frames_written += 1
        self._encode_audio_until(self._audio_samples_for(self.frames_written))

    def close(self) -> Path:
        """Flush the encoders, finish the mp4 and move it into place; returns the final path."""
        if self._container is None:
            return self.path
        try:
            if self.frames_written == 0:
                raise ValueError(f"No frames were written to video file '{self.path}'.")
            self._flush_encoders()
            self._container.close()
            self._container = None
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; the target path is left as it was."""
        container, self._container = self._container, None
        if container is not None:
            try:
                container.close()
            except Exception:  # the file is discarded anyway; the original error matters more
                pass
        if self._temp_path is not None:
            self._temp_path.unlink(missing_ok=True)
            self._temp_path = None
        for directory in self._created_dirs:  # nothing partial: directories made for the video go too
            try:
                directory.rmdir()
            except OSError:  # not empty (someone else wrote there) or already gone
                break
        self._created_dirs = []

    # -- target and temporary file

    def _check_target(self) -> None:
        check_output_path(self.path, self.overwrite)

    def _make_temp_file(self) -> Path:
        directory = self.path.parent
        try:
            self._created_dirs = list(itertools.takewhile(lambda d: not d.exists(), (directory, *directory.parents)))
            directory.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".part.mp4", dir=directory)
        except (FileExistsError, NotADirectoryError):
            self.abort()
            raise OutputError(f"Cannot write video file '{self.path}': part of the directory path is a file, not a directory.") from None
        except OSError as err:
            self.abort()
            raise OutputError(f"Cannot write video file '{self.path}' in directory '{directory}' ({_one_line(err)}).") from None
        os.close(handle)
        os.chmod(name, 0o666 & ~_current_umask())  # mkstemp makes it 0600; give the usual mode instead
        return Path(name)

    def _move_into_place(self) -> None:
        if self.path.exists() and not self.overwrite:  # it may have appeared while we were encoding
            raise OutputError(f"Output file '{self.path}' already exists; pass overwrite=True (--overwrite) to replace it.")
        try:
            os.replace(self._temp_path, self.path)
        except OSError as err:
            raise OutputError(f"Cannot move the finished video to '{self.path}' ({_one_line(err)}).") from None
        self._temp_path = None
        self._created_dirs = []

    # -- streams

    def _add_streams(self, width: int, height: int) -> None:
        import av

        try:
            video = self._container.add_stream("libx264", rate=self.fps)
        except (av.FFmpegError, ValueError) as err:
            raise EnvironmentProblem(
                f"This PyAV build has no libx264 H.264 encoder ({_one_line(err)}); install the PyAV wheel from PyPI."
            ) from None
        video.width, video.height = _even(width), _even(height)
        video.pix_fmt = "yuv420p"
        video.codec_context.time_base = Fraction(1, self.fps)
        video.options = {"crf": str(self.crf), "preset": self.preset}
        # RGB -> YUV uses BT.601 limited range; say so in the stream so players do not guess.
        video.codec_context.colorspace = 6  # AVCOL_SPC_SMPTE170M
        video.codec_context.color_primaries = 6  # AVCOL_PRI_SMPTE170M
        video.codec_context.color_trc = 6  # AVCOL_TRC_SMPTE170M
        video.codec_context.color_range = 1  # AVCOL_RANGE_MPEG
        self._video_stream = video
        if self.audio is not None:
            audio = self._container.add_stream("aac", rate=self.sample_rate, layout="mono")
            audio.bit_rate = 64_000
            audio.codec_context.time_base = Fraction(1, self.sample_rate)
            self._audio_stream = audio

    def _validated(self, frame: np.ndarray) -> np.ndarray:
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"Video frames must be (H, W, 3) uint8 RGB arrays, got {frame.dtype} {frame.shape}.")
        if self._frame_shape is None:
            self._frame_shape = frame.shape[:2]
        elif frame.shape[:2] != self._frame_shape:
            raise ValueError(
                f"Video frame {self.frames_written} is {frame.shape[1]}x{frame.shape[0]}, "
                f"expected {self._frame_shape[1]}x{self._frame_shape[0]}."
            )
        return frame

    def _encode_video_frame(self, frame: np.ndarray) -> None:
        import av

        av_frame = av.VideoFrame.from_ndarray(_pad_to_even(frame), format="rgb24")
        av_frame.pts = self.frames_written
        av_frame.time_base = Fraction(1, self.fps)
        self._mux(self._video_stream.encode(av_frame))

    def _audio_samples_for(self, frame_count: int) -> int:
        return frame_count * self.sample_rate // self.fps

    def _encode_audio_until(self, end_sample: int) -> None:
        import av

        if self._audio_stream is None or end_sample <= self._audio_samples_fed:
            return
        chunk = _slice_padded(self.audio, self._audio_samples_fed, end_sample)
        av_frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
        av_frame.sample_rate = self.sample_rate
        av_frame.pts = self._audio_samples_fed
        av_frame.time_base = Fraction(1, self.sample_rate)
        self._audio_samples_fed = end_sample
        self._mux(self._audio_stream.encode(av_frame))

    def _flush_encoders(self) -> None:
        self._mux(self._video_stream.encode(None))
        if self._audio_stream is not None:
            self._mux(self._audio_stream.encode(None))

    def _mux(self, packets) -> None:
        import av

        try:
            self._container.mux(packets)
        except (av.FFmpegError, OSError) as err:
            raise OutputError(f"Cannot write video file '{self.path}' ({_one_line(err)}).") from None


def _expected_shape(width: int | None, height: int | None) -> tuple[int, int] | None:
    if width is None and height is None:
        return None
    if width is None or height is None or int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"VideoWriter needs both width and height as positive integers, got {width}x{height}.")
    return int(height), int(width)


def _mono_float32(audio: np.ndarray) -> np.ndarray:
    samples = np.asarray(audio, dtype=np.float32)
    if samples.ndim == 2 and 1 in samples.shape:
        samples = samples.reshape(-1)
    if samples.ndim != 1:
        raise ValueError(f"VideoWriter audio must be mono (a 1-D array), got shape {samples.shape}.")
    return np.ascontiguousarray(samples)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _even(size: int) -> int:
    return size + (size % 2)


def _pad_to_even(frame: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: an odd side gains one pixel by repeating the last row or column.

    Padding (rather than scaling by one pixel) leaves every original pixel untouched and keeps the
    frame geometry exact; the extra edge line is invisible in practice.
    """
    height, width = frame.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return frame
    return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _slice_padded(samples: np.ndarray, start: int, end: int) -> np.ndarray:
    """samples[start:end], padded with silence where the audio is shorter than the video."""
    chunk = samples[start:end]
    if chunk.shape[0] < end - start:
        chunk = np.concatenate([chunk, np.zeros(end - start - chunk.shape[0], np.float32)])
    return np.ascontiguousarray(chunk, dtype=np.float32)


# ---------------------------------------------------------------------------------------- probing


def probe_video(path: PathLike) -> dict:
    """Frames, frame rate, size, audio length in seconds and codec names of a video file.

    Both counts come from demuxed packets, without decoding: frames is the number of video packets,
    and the audio length runs from time zero to the end of the last audio packet, so the AAC encoder
    delay (negative timestamps trimmed by the mp4 edit list) and the short last frame are handled.
    """
    import av

    path = Path(path)
    _require_readable_file(path, "Video")
    try:
        with av.open(str(path)) as container:
            return _probe_container(container)
    except (av.FFmpegError, OSError, ValueError, EOFError) as err:
        raise InputError(f"Video file '{path}' cannot be read ({_one_line(err)}).") from None


def _probe_container(container) -> dict:
    video = container.streams.video[0] if container.streams.video else None
    audio = container.streams.audio[0] if container.streams.audio else None
    streams = [stream for stream in (video, audio) if stream is not None]
    frames, audio_end = 0, 0
    for packet in container.demux(*streams):
        if packet.size == 0 or packet.pts is None:
            continue  # end-of-stream markers
        if packet.stream is video:
            frames += 1
        else:
            audio_end = max(audio_end, packet.pts + (packet.duration or 0))
    return {
        "frames": frames,
        "fps": float(video.average_rate or video.guessed_rate or 0) if video else 0.0,
        "width": video.codec_context.width if video else 0,
        "height": video.codec_context.height if video else 0,
        "audio_seconds": float(audio_end * audio.time_base) if audio else 0.0,
        "video_codec": video.codec_context.name if video else None,
        "audio_codec": audio.codec_context.name if audio else None,
    }
