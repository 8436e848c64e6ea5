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


BLINK_GAP = (10, 70)                # gap before each blink, drawn from range(10, 70)
LATENT_SIZE = 64


def blink_generator(seed: int) -> np.random.Generator:
    """The blinks' own random stream: they never shift the pose latents, whatever the audio length."""
    return np.random.default_rng([int(seed), 0])


def pose_latent(seed: int, chunk: int) -> np.ndarray:
    """(1, 64) float32 latent of pose chunk ``chunk``, a stream of its own so any chunk is known at once."""
    return np.random.default_rng([int(seed), 1, int(chunk)]).standard_normal((1, LATENT_SIZE)).astype(np.float32)


class BlinkTrack:
    """Blink starts drawn lazily from ``rng``; ``values`` gives the ratios for an utterance of T frames.

    Each gap comes from range(10, 70), the official range for T >= 140 frames; the official code narrows it
    to range(10, T // 2) for shorter audio, which would make every blink depend on the total length and so
    on audio not yet heard. The only length dependence kept is the official one at the end: a blink must end
    at least one frame before the last frame, and T <= 21 has none. So the ratio of frame f is final once
    the utterance is known to have more than max(21, f + 6) frames.
    """

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.starts: list[int] = []

    def _extend(self, frame: int) -> None:
        while not self.starts or self.starts[-1] <= frame:
            after = self.starts[-1] + len(BLINK_PROFILE) if self.starts else 0
            self.starts.append(after + int(self.rng.integers(*BLINK_GAP)))

    def values(self, T: int, start: int, stop: int) -> np.ndarray:
        """(stop - start, 1) float32 ratios of frames start..stop-1 for an utterance of T frames."""
        ratio = np.zeros((stop - start, 1), dtype=np.float32)
        if T <= 21 or stop <= start:
            return ratio
        self._extend(stop)
        for first in self.starts:
            if first + len(BLINK_PROFILE) > T - 1 or first >= stop:
                break
            lo, hi = max(first, start), min(first + len(BLINK_PROFILE), stop)
            if lo < hi:
                ratio[lo - start:hi - start, 0] = BLINK_PROFILE[lo - first:hi - first]
        return ratio


def blink_sequence(T: int, rng: np.random.Generator) -> np.ndarray:
    """(T, 1) float32 eye-blink ratios: 5-frame blinks at random gaps, none for T <= 21 (``BlinkTrack``)."""
    return BlinkTrack(rng).values(T, 0, T)


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


def smooth_pose_rows(pose: np.ndarray, start: int, stop: int, total: int) -> np.ndarray:
    """Rows start..stop-1 of ``smooth_pose(full)``, from the rows of ``pose`` known so far.

    ``pose`` holds the first rows of a (total, 6) sequence (all of them when ``total`` is known, else
    ``total`` is None). Each output depends on its 13-frame neighbourhood only (or on the first / last 13
    frames near either end), so a segment around the rows gives the same bits as the whole sequence; the
    caller asks only for rows whose neighbourhood is known: stop + 6 <= len(pose) before the end.
    """
    end = len(pose) if total is None else total
    first = max(0, start - SMOOTH_WINDOW // 2)
    first = min(first, max(0, end - SMOOTH_WINDOW))
    return smooth_pose(pose[first:end])[start - first:stop - first]


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


def target_rows(coeffs: np.ndarray, source_coeffs: np.ndarray, *, full: bool, still: bool,
                expression_scale: float) -> np.ndarray:
    """(T, C) per-frame renderer targets before windowing; each row depends on its own frame only."""
    return _source_and_target(coeffs, source_coeffs, full=full, still=still, expression_scale=expression_scale)[1]


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
