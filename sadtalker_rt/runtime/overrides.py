"""The official motion overrides, numpy only: free-view head angles and reference-video coefficients.

- Free view (``--input-yaw/pitch/roll``, spec 6 ``gen_camera_pose``): a list of degrees becomes one angle per
  frame; the mapping stage uses it instead of the angle MappingNet predicts.
- ``--ref-eyeblink`` (spec 3.3): ExpNet's reference expression is the video's, all 64 columns, looped to the
  utterance, and the blink ratio is zero.
- ``--ref-pose`` (spec 5.4): after smoothing, ``pose[t] += ref[t] - ref[0]`` with the video's pose looped.

The pipeline and the conformance runner both call these functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import UsageError
from ..stages import COEFFS, EXPRESSION, POSE

ANGLE_NAMES = ("yaw", "pitch", "roll")
MAX_DEGREES = 90            # |angle| a free-view list may ask for; MappingNet's own range is [-99, 96]


def parse_degrees(values, option: str) -> Optional[list[int]]:
    """A degree list as users give it (ints, or strings like ``"0,30,-20"`` / ``"0 30 -20"``, repeatable)
    -> a list of ints in [-90, 90]; None or empty -> None."""
    if values is None:
        return None
    if isinstance(values, (str, int, np.integer)):
        values = [values]
    degrees = []
    for value in values:
        tokens = value.replace(",", " ").split() if isinstance(value, str) else [value]
        for token in tokens:
            degrees.append(_integer_degree(token, option))
    if not degrees:
        return None
    for degree in degrees:
        if abs(degree) > MAX_DEGREES:
            raise UsageError(f"{option} takes degrees in -{MAX_DEGREES}..{MAX_DEGREES}, not {degree}.")
    return degrees


def _integer_degree(token, option: str) -> int:
    if isinstance(token, (bool, np.bool_)):
        raise UsageError(f"{option} takes integer degrees, not {token!r}.")
    if isinstance(token, (int, np.integer)):
        return int(token)
    if isinstance(token, (float, np.floating)) and float(token).is_integer():
        return int(token)
    try:
        return int(str(token).strip())
    except ValueError:
        raise UsageError(f"{option} takes integer degrees (e.g. {option} 0,30,-20), not '{token}'.") from None


def free_view_sequence(degrees: Sequence[int], frame_num: int) -> np.ndarray:
    """One angle per frame from a list of degrees, as ``gen_camera_pose`` before its batch layout.

    One value: constant (int64, as officially). Several: the path sum|a[k+1] - a[k]| is spread evenly over
    frame_num - 1 steps and each segment is ``arange(a[k], a[k+1], +-step)`` (end excluded, float64), then
    cut or padded with its last value to frame_num. Quirks kept: the last listed value is reached only by
    padding, and accumulated steps may overshoot it.

    Where the official code divides by zero, this returns what its formula tends to: a segment between
    equal values gets no frames (frames are shared out by degrees travelled, and it travels none), so a
    list whose values are all equal, or a single frame, gives the first value.
    """
    degrees = [int(d) for d in degrees]
    if not degrees:
        raise ValueError("a free-view list needs at least one value")
    if frame_num < 1:
        raise ValueError(f"frame_num must be at least 1, not {frame_num}")
    if len(degrees) == 1:
        return np.full(frame_num, degrees[0], dtype=np.int64)
    path = 0.0
    for last, degree in zip(degrees[:-1], degrees[1:]):
        path += abs(degree - last)
    if path == 0 or frame_num == 1:
        return np.full(frame_num, degrees[0], dtype=np.float64)
    per_frame = path / (frame_num - 1)
    values: list = []
    for last, degree in zip(degrees[:-1], degrees[1:]):
        if degree == last:
            continue
        step = per_frame * abs(degree - last) / (degree - last)
        values.extend(np.arange(last, degree, step))
    values = values[:frame_num]
    values.extend([values[-1]] * (frame_num - len(values)))
    return np.array(values, dtype=np.float64)


def gen_camera_pose(degrees: Sequence[int], frame_num: int, batch_size: int) -> np.ndarray:
    """The official lane layout: the sequence padded with its last value to a multiple of batch_size and
    reshaped to (batch_size, steps); lane b holds frames b * steps ... (b + 1) * steps - 1."""
    seq = free_view_sequence(degrees, frame_num)
    pad = -frame_num % batch_size
    seq = np.concatenate([seq, np.repeat(seq[-1:], pad)])
    return seq.reshape(batch_size, -1)


@dataclass(frozen=True)
class FreeView:
    """Given head angles, any of the three (None: predicted by MappingNet)."""

    yaw: Optional[Sequence[int]] = None
    pitch: Optional[Sequence[int]] = None
    roll: Optional[Sequence[int]] = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.yaw, self.pitch, self.roll))

    @property
    def moving(self) -> bool:
        """A list of different degrees: spread over the whole video, so every angle but the first depends on
        the number of frames (a stream knows it only at the end of the audio)."""
        return any(v is not None and len(set(int(d) for d in v)) > 1 for v in (self.yaw, self.pitch, self.roll))

    def final_frames(self, known: int, total: Optional[int]) -> int:
        """Frames whose angles are final when ``known`` frames are sure and ``total`` is known (or None):
        all of them for fixed angles; for a moving list only frame 0 (the first value whatever the length)
        until the end."""
        if total is not None:
            return total
        return min(known, 1) if self.moving else known

    def angles_between(self, start: int, stop: int, total: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
        """``angles`` rows start..stop-1 of a ``total``-frame video and ``angle_given``; before the end
        (``total`` None) only for frames ``final_frames`` allows."""
        angles, given = self.angles(total if total is not None else stop)
        return angles[start:stop], given

    def angles(self, frame_num: int) -> tuple[np.ndarray, np.ndarray]:
        """The mapping stage's free-view inputs: ``angles`` (T, 3) float32 degrees (yaw, pitch, roll) and
        ``angle_given`` (1, 3) float32, 1 where the angle is given. Float32 as ``get_facerender_data`` makes it."""
        angles = np.zeros((frame_num, 3), np.float32)
        given = np.zeros((1, 3), np.float32)
        for i, values in enumerate((self.yaw, self.pitch, self.roll)):
            if values is not None:
                angles[:, i] = free_view_sequence(values, frame_num).astype(np.float32)
                given[0, i] = 1.0
        return angles, given


def loop_frames(rows: np.ndarray, frame_num: int) -> np.ndarray:
    """A reference video's rows looped (tiled) to frame_num, cut when longer, as the official code does."""
    rows = np.asarray(rows)
    if len(rows) == 0:
        raise ValueError("a reference sequence needs at least one frame")
    return rows[np.arange(frame_num) % len(rows)]


def eyeblink_reference(source_coeffs: np.ndarray, ref_coeffs: np.ndarray, frame_num: int) -> np.ndarray:
    """ExpNet's ``ref`` (T, 70) for ``--ref-eyeblink``: the video's 64 expression columns looped to T, the
    source's pose columns. (The blink ratio is zero; the caller still draws the random one first.)"""
    ref = np.repeat(np.asarray(source_coeffs, dtype=np.float32).reshape(1, -1)[:, :COEFFS], frame_num, axis=0)
    ref[:, EXPRESSION] = loop_frames(np.asarray(ref_coeffs, dtype=np.float32)[:, EXPRESSION], frame_num)
    return ref


def apply_ref_pose(coeffs: np.ndarray, ref_coeffs: np.ndarray) -> np.ndarray:
    """``--ref-pose`` on the (T, 70) smoothed coefficients: pose[t] += ref[t] - ref[0], float32."""
    ref = np.asarray(ref_coeffs, dtype=np.float32)
    return add_ref_pose(coeffs, loop_frames(ref, len(coeffs)), ref[0])


def add_ref_pose(coeffs: np.ndarray, looped_ref: np.ndarray, first_ref: np.ndarray) -> np.ndarray:
    """``apply_ref_pose`` on any run of rows: ``looped_ref`` holds the reference rows of the same frames
    (already looped), ``first_ref`` the reference's row 0; each row depends on its own frame only."""
    out = np.array(coeffs, dtype=np.float32)
    ref = np.asarray(looped_ref, dtype=np.float32)[:, POSE]
    out[:, POSE] = out[:, POSE] + (ref - np.asarray(first_ref, dtype=np.float32)[None, POSE])
    return out


def expression_inputs(source_coeffs: np.ndarray, blink: np.ndarray,
                      ref_eyeblink_coeffs: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """ExpNet's per-frame ``ref`` (T, 70) and blink ratio (T, 1) for the T rows of ``blink``.

    Without a reference video: the source's coefficients on every frame and the (random) blinks. With one:
    ``eyeblink_reference`` and no random blinks; the caller draws them anyway, as officially, so a seed
    gives the same head motion with or without ``--ref-eyeblink``.
    """
    blink = np.asarray(blink, dtype=np.float32)
    frames = len(blink)
    if ref_eyeblink_coeffs is None:
        source = np.asarray(source_coeffs, dtype=np.float32).reshape(1, -1)[:, :COEFFS]
        return np.repeat(source, frames, axis=0), blink
    return eyeblink_reference(source_coeffs, ref_eyeblink_coeffs, frames), np.zeros_like(blink)


def motion_coeffs(exp: np.ndarray, smoothed_pose: np.ndarray,
                  ref_pose_coeffs: Optional[np.ndarray] = None) -> np.ndarray:
    """The (T, 70) float32 coefficients ``Audio2Coeff.generate`` saves: expression, smoothed pose, then
    ``--ref-pose`` if a reference video's coefficients are given."""
    out = np.concatenate([np.asarray(exp)[:, EXPRESSION], np.asarray(smoothed_pose)], axis=1).astype(np.float32)
    return out if ref_pose_coeffs is None else apply_ref_pose(out, ref_pose_coeffs)
