"""3DMM coefficients of a reference video (``--ref-eyeblink``, ``--ref-pose``), frame by frame as the source.

As ``CropAndExtract.generate`` does for a video: one crop box for the whole video, from the landmarks of its
first frame, then per frame the landmarks on the S x S crop, the 5-point alignment and the face3d_recon
stage of whichever backend runs. Only the frames the utterance uses are decoded.

Where the official code meets a frame without a face it aligns the 3DMM template instead, which yields a
made-up expression and pose. Here such a frame takes the coefficients of the nearest frame with a face
(the earlier one on a tie) among the frames the utterance uses, and the user is told in one line; a video
without any face is refused.

Row t of an utterance of T frames is video frame t, looped (t % N) past the video's N frames; the offline
path decodes min(N, T) frames. ``ReferenceTrack`` decodes as the audio arrives and says which rows are final:
a frame with a face at once, a frame without one when its nearest face is decided (it may wait for more audio
when the nearest later face could lie past the end of the utterance).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np

from ..errors import InputError

_PENDING = "pending"        # a frame before the first face: cropped once the first face gives the box


@dataclass
class ReferenceCoeffs:
    coeffs: np.ndarray                  # (N, 73) per decoded frame, as the source's coeff_3dmm
    notes: list = field(default_factory=list)


def reference_coeffs(frames: Iterable[np.ndarray], preprocess: str, size: int,
                     regress: Callable[[np.ndarray], np.ndarray], name: str) -> ReferenceCoeffs:
    """Every frame of ``frames``. ``regress`` maps a (1, 3, 224, 224) float32 aligned crop to the (1, 257)
    face3d_recon output."""
    track = ReferenceTrack(frames, preprocess, size, regress, name)
    track.decode_all()
    return track.complete(track.decoded)


class ReferenceTrack:
    """A reference video decoded lazily as an utterance grows; ``ready`` and ``rows`` as for ``LoopedRows``."""

    def __init__(self, frames: Iterable[np.ndarray], preprocess: str, size: int,
                 regress: Callable[[np.ndarray], np.ndarray], name: str):
        self._frames = iter(frames)
        self.preprocess, self.size, self.regress, self.name = preprocess, size, regress, name
        self.coeffs: list = []              # per decoded frame: (73,) float32, None (no face) or _PENDING
        self.faces: list[int] = []          # indices of frames with a face, ascending
        self._pending: list[np.ndarray] = []
        self.box: Optional[np.ndarray] = None       # landmarks of the first face: the crop box of every frame
        self.first_face: Optional[int] = None
        self.length: Optional[int] = None           # N, once decoding has stopped
        self.error: Optional[InputError] = None     # why decoding stopped early (after ``length`` frames)
        self._source: dict[int, int] = {}           # frame -> the frame whose coefficients it takes
        self._peeked: Optional[np.ndarray] = None
        self._ready = 0

    @property
    def decoded(self) -> int:
        return len(self.coeffs)

    # -- decoding -----------------------------------------------------------------------------------
    def _landmarks(self, image: np.ndarray) -> Optional[np.ndarray]:
        from . import landmarks

        try:
            return landmarks.detect(image, self.name).landmarks
        except InputError:          # no face in this frame
            return None

    def _extract(self, photo: np.ndarray) -> Optional[np.ndarray]:
        from . import preprocess as prep

        frame, _ = prep.crop_source(photo, self.box, self.preprocess, self.size, name=self.name)
        points = self._landmarks(frame)
        if points is None:
            return None
        trans_params, aligned = prep.align_for_3dmm(frame, points)
        aligned_chw = (aligned.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()
        return prep.first_frame_coeffs(self.regress(aligned_chw), trans_params)[0].astype(np.float32)

    def _store(self, index: int, coeffs: Optional[np.ndarray]) -> None:
        self.coeffs[index] = coeffs
        if coeffs is not None:
            self.faces.append(index)

    def _next_photo(self) -> Optional[np.ndarray]:
        if self._peeked is not None:
            photo, self._peeked = self._peeked, None
            return photo
        if self.length is not None:
            return None
        try:
            return next(self._frames)
        except StopIteration:
            self.length = self.decoded
        except InputError as err:       # truncated or unreadable: refused once the utterance reaches it
            self.error, self.length = err, self.decoded
        return None

    def _probe(self) -> None:
        """Read (not extract) the frame after the decoded ones: the offline decoder reads one frame past the
        utterance too, so a video that breaks off right there is refused in both."""
        if self._peeked is None:
            self._peeked = self._next_photo()

    def _decode_one(self) -> bool:
        photo = self._next_photo()
        if photo is None:
            return False
        index = self.decoded
        self.coeffs.append(_PENDING)
        if self.preprocess != "resize" and self.box is None:
            self.box = self._landmarks(photo)
            if self.box is None:
                self._pending.append(photo)
                return True
            self.first_face = index
            for earlier, held in enumerate(self._pending):     # cropped with the box of the first face
                self._store(earlier, self._extract(held))
            self._pending.clear()
        self._store(index, self._extract(photo))
        return True

    def _decode_to(self, frames: int) -> None:
        while self.decoded < frames and self._decode_one():
            pass
        while self.preprocess != "resize" and self.box is None and self._decode_one():
            pass            # frames before the first face wait for its crop box
        if self.length is not None and not self.faces:
            self._no_face(self.length)

    def _no_face(self, frames: int) -> None:
        raise InputError(f"No face was found in any of the {frames} frames of {self.name}; use a video with a "
                         "clearly visible, roughly frontal face.")

    def decode_all(self) -> None:
        while self._decode_one():
            pass
        if self.error is not None:
            raise self.error
        self._decode_to(0)

    def close(self) -> None:
        close = getattr(self._frames, "close", None)
        if close is not None:
            close()

    # -- rows ---------------------------------------------------------------------------------------
    def _nearest(self, j: int, known: int, total: Optional[int]) -> Optional[int]:
        """The frame whose coefficients frame j (without a face) takes, or None while undecided."""
        import bisect

        at = bisect.bisect_right(self.faces, j)
        earlier = self.faces[at - 1] if at else None
        later = self.faces[at] if at < len(self.faces) else None
        if total is not None:               # the offline set: faces among the first min(N, T) frames
            if later is not None and later >= total:
                later = None
        elif later is None or later >= known:
            # the nearest later face, if it belongs to the utterance at all, is at ``bound`` or beyond
            bound = later if later is not None else (self.decoded if self.length is None else None)
            if bound is not None:
                if earlier is None or bound - j < j - earlier:
                    return None
            later = None
        if earlier is None:
            return later
        if later is None or j - earlier <= later - j:
            return earlier
        return later

    def _video_frame(self, t: int) -> int:
        return t if self.length is None or t < self.length else t % self.length

    def ready(self, known: int, total: Optional[int]) -> int:
        """Rows 0..ready-1 are final, with ``known`` frames sure to be in the utterance (``total``: all of
        them, once it has ended); decodes what that takes. Raises the refusals the offline path would."""
        limit = total if total is not None else known
        self._decode_to(limit)
        if total is not None and self.decoded == total:
            self._probe()
        if self.error is not None and limit >= self.length:
            raise self.error
        if total is not None and (not self.faces or self.faces[0] >= min(total, self.decoded)):
            self._no_face(min(total, self.decoded))
        if self.first_face is not None and self.first_face >= limit:
            if total is not None:          # the offline path decodes no frame with a face: refused
                self._no_face(min(total, self.decoded))
            return self._ready             # frames before it wait: the utterance may end before the box
        while self._ready < limit:
            j = self._video_frame(self._ready)
            if j >= self.decoded:
                break
            if self.coeffs[j] is _PENDING:
                break
            if self.coeffs[j] is None and j not in self._source:
                source = self._nearest(j, known, total)
                if source is None:
                    break
                self._source[j] = source
            self._ready += 1
        return self._ready

    def rows(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, 73) float32 rows of utterance frames start..stop-1 (final ones: see ``ready``)."""
        if stop > self._ready:
            raise RuntimeError(f"reference rows up to {stop} asked for; {self._ready} are final")
        out = []
        for t in range(start, stop):
            j = self._video_frame(t)
            out.append(self.coeffs[self._source.get(j, j)])
        return np.stack(out).astype(np.float32)

    def complete(self, frames: int) -> ReferenceCoeffs:
        """The coefficients of the first ``frames`` video frames (those an utterance of as many frames uses)
        with the frames without a face filled, and the lines to tell the user."""
        frames = min(frames, self.decoded)
        if self.first_face is not None and self.first_face >= frames or not any(i < frames for i in self.faces):
            self._no_face(frames)
        rows = [self.coeffs[self._nearest(i, frames, frames) if self.coeffs[i] is None else i] for i in range(frames)]
        missing = [i for i in range(frames) if self.coeffs[i] is None]
        notes = []
        if self.first_face:
            notes.append(f"{self.name}: no face in the first {self.first_face} frames; the crop follows frame "
                         f"{self.first_face}.")
        if missing:
            shown = ", ".join(str(i) for i in missing[:8]) + (", ..." if len(missing) > 8 else "")
            notes.append(f"{self.name}: no face in {len(missing)} of {frames} frames ({shown}); they take the "
                         "coefficients of the nearest frame with a face.")
        return ReferenceCoeffs(np.stack(rows).astype(np.float32), notes)


class LoopedRows:
    """Given coefficients (N, 73) looped to the utterance: every row is final at once."""

    def __init__(self, coeffs: np.ndarray):
        self.coeffs = np.asarray(coeffs, dtype=np.float32)

    def ready(self, known: int, total: Optional[int]) -> int:
        return total if total is not None else known

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.coeffs[np.arange(start, stop) % len(self.coeffs)]
