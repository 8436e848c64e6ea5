"""Helpers of the streaming and serving tests: a cheap stand-in for the renderer and chunked audio."""
from __future__ import annotations

import numpy as np

CHUNK_MS = (1, 20, 333, None)          # None: the whole audio as one chunk


class CheapRenderer:
    """A deterministic function of the driving keypoints in the renderer's place (seconds per frame on CPU
    otherwise): every bit of every keypoint reaches the pixels, so any difference in what the renderer is fed
    shows in the frames."""

    def __init__(self, size: int):
        yy, xx = np.mgrid[0:size, 0:size]
        self.pick = (np.arange(3)[:, None, None] * 7 + yy[None] * 3 + xx[None]) % 45
        self.ramp = xx[None].astype(np.float32) / size

    def infer(self, feeds: dict) -> dict:
        kp = feeds["kp_driving"].reshape(len(feeds["kp_driving"]), -1)
        return {"frames": (0.5 + 0.5 * np.sin(kp[:, self.pick] * 40 + self.ramp)).astype(np.float32)}


class CheapRendererBackend:
    """The real backend for every stage but the renderer."""

    def __init__(self, backend):
        self.inner, self.size, self.cheap = backend, backend.size, CheapRenderer(backend.size)

    def runner(self, stage: str):
        return self.cheap if stage == "renderer" else self.inner.runner(stage)


def chunked(wav: np.ndarray, ms):
    n = len(wav) if ms is None else ms * 16
    return [wav[i:i + n] for i in range(0, len(wav), max(n, 1))]
