"""Reading video files (any container and codec PyAV decodes): reference videos and video sources."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..errors import InputError
from . import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, PathLike, _one_line, _require_readable_file


def iter_video_frames(path: PathLike, max_frames: Optional[int] = None, kind: str = "Video") -> Iterator[np.ndarray]:
    """Decoded frames as (H, W, 3) uint8 RGB, in order, every frame whatever the frame rate (as the
    official code reads them), at most ``max_frames``. A file that cannot be opened, has no video
    stream, decodes to no frame or breaks off with an error is refused with one line naming it."""
    import av

    path = Path(path)
    _require_readable_file(path, kind)
    count = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                what = "only audio" if container.streams.audio else "no video stream"
                raise InputError(f"{kind} file '{path}' has {what}; a video with a face is needed.")
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if max_frames is not None and count >= max_frames:
                    return
                _check_frame_size(path, kind, frame.width, frame.height)
                count += 1
                yield frame.to_ndarray(format="rgb24")
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as err:
        state = f"breaks off after {count} frames" if count else "cannot be read"
        raise InputError(f"{kind} file '{path}' {state}: it is not a video that can be decoded, or is truncated "
                         f"or corrupt ({_one_line(err)}).") from None
    if count == 0:
        raise InputError(f"{kind} file '{path}' contains no video frames that can be decoded (empty or truncated).")


def first_video_frame(path: PathLike, kind: str = "Video") -> np.ndarray:
    """The first frame of a video, the photo when the source is a video (as officially)."""
    return next(iter_video_frames(path, max_frames=1, kind=kind))


def _check_frame_size(path: Path, kind: str, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS or min(width, height) < MIN_IMAGE_SIDE:
        raise InputError(f"{kind} file '{path}' has {width}x{height} frames; between {MIN_IMAGE_SIDE} pixels a side "
                         f"and {MAX_IMAGE_PIXELS // 1_000_000} megapixels are needed.")


def require_video_file(path: PathLike, option: str) -> None:
    """The cheap checks before any decoding: the file exists, is a regular readable file, is not empty."""
    _require_readable_file(Path(path), f"{option} video")
