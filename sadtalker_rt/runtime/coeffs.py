"""Coefficient sequences around the audio-to-coefficient models (numpy and scipy only).

Blink ratios (spec 3.2), pose smoothing (5.4) and the renderer's
27-frame coefficient windows (6). Randomness is explicit: callers pass a ``numpy.random.Generator``.
"""
from __future__ import annotations

import numpy as np

from ..stages import COEFFS, EXPRESSION, FULL_COEFFS, SEMANTIC_RADIUS

BLINK_PROFILE = np.array([0.5, 0.9, 1.0, 0.9, 0.5], dtype=np.float32)
SMOOTH_WINDOW = 13
SMOOTH_ORDER = 2


def blink_sequence(T: int, rng: np.random.Generator) -> np.ndarray:
    """(T, 1) float32 eye-blink ratios: 5-frame blinks at random gaps, none for T <= 20.

    The official procedure draws each gap from range(min(10, T), min(T // 2, 70)); where that range
    is empty (T = 21, where the official code crashes) there are no blinks.
    """
    ratio = np.zeros((T, 1), dtype=np.float32)
    if T <= 20:
        return ratio
    low, high = min(10, T), min(T // 2, 70)
    frame_id = 0
    while low < high and frame_id < T:
        start = int(rng.integers(low, high))
        first = frame_id + start
        if first + len(BLINK_PROFILE) > T - 1:
            break
        ratio[first:first + len(BLINK_PROFILE), 0] = BLINK_PROFILE
        frame_id = first + len(BLINK_PROFILE)
    return ratio


def smoothing_window(T: int) -> int:
    """13, or the largest odd window <= T for shorter sequences (1 or 0 below 3 frames)."""
    return SMOOTH_WINDOW if T >= SMOOTH_WINDOW else (T - 1) // 2 * 2 + 1


def smooth_pose(pose: np.ndarray) -> np.ndarray:
    """Savitzky-Golay along time (order 2, mode 'interp') of (T, 6) or (1, T, 6) poses.

    Sequences shorter than 3 frames have no window a quadratic fits; they are returned unchanged
    (the official code raises there).
    """
    from scipy.signal import savgol_filter

    pose = np.asarray(pose)
    T = pose.shape[-2]
    window = smoothing_window(T)
    if window <= SMOOTH_ORDER:
        return pose.copy()
    return savgol_filter(pose, window, SMOOTH_ORDER, axis=-2, mode="interp")


def semantic_windows(coeffs: np.ndarray, source_coeffs: np.ndarray, *, full: bool, still: bool,
                     expression_scale: float, radius: int = SEMANTIC_RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """The renderer's coefficient windows.

    Args:
        coeffs: (T, 70) generated coefficients (expression, pose).
        source_coeffs: (1, 70) or (1, 73) coefficients of the source image; "full" modes need 73.
        full: a "full"/"extfull" preprocess mode: the crop params (cols 70:73) join every window.
        still: replace the generated pose (and crop params) by the source's.
        expression_scale: multiplies the 64 generated expression coefficients.
        radius: half window; 13 gives 27 frames.

    Returns:
        source_semantics (1, C, 2r+1) and target_semantics (T, C, 2r+1), C = 73 if full else 70;
        windows past either end replicate the edge frame.
    """
    source, target = _source_and_target(coeffs, source_coeffs, full=full, still=still,
                                        expression_scale=expression_scale)
    source_semantics = np.repeat(source[:, :, None], 2 * radius + 1, axis=2)
    return source_semantics, TargetWindows(target, radius)[:]


def _source_and_target(coeffs: np.ndarray, source_coeffs: np.ndarray, *, full: bool, still: bool,
                       expression_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(1, C) source and (T, C) per-frame target coefficients before windowing."""
    channels = FULL_COEFFS if full else COEFFS
    source = np.asarray(source_coeffs).reshape(1, -1)
    if source.shape[1] < channels:
        raise ValueError(f"source coefficients have {source.shape[1]} values; {channels} are needed"
                         + (" in a full preprocess mode" if full else ""))
    target = np.array(np.asarray(coeffs)[:, :COEFFS])
    source = source[:, :channels].astype(target.dtype, copy=False)
    target[:, EXPRESSION] = target[:, EXPRESSION] * expression_scale
    if full:
        target = np.concatenate([target, np.repeat(source[:, COEFFS:], len(target), axis=0)], axis=1)
    if still:
        target[:, EXPRESSION.stop:] = source[:, EXPRESSION.stop:]
    return source, target


class TargetWindows:
    """The (T, C, 2r+1) target windows, built per slice so a long utterance never holds them all."""

    def __init__(self, target: np.ndarray, radius: int = SEMANTIC_RADIUS):
        self.target = target
        self.offsets = np.arange(-radius, radius + 1)

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, frames: slice) -> np.ndarray:
        rows = np.arange(len(self.target))[frames]
        index = np.clip(rows[:, None] + self.offsets[None, :], 0, max(len(self.target) - 1, 0))
        return np.ascontiguousarray(self.target[index].transpose(0, 2, 1))


def target_windows(coeffs: np.ndarray, source_coeffs: np.ndarray, *, full: bool, still: bool,
                   expression_scale: float, radius: int = SEMANTIC_RADIUS) -> TargetWindows:
    """``semantic_windows``' targets as a sequence sliced lazily, batch by batch."""
    _, target = _source_and_target(coeffs, source_coeffs, full=full, still=still, expression_scale=expression_scale)
    return TargetWindows(target, radius)
