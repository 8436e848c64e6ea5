"""Rendered S x S frames -> video frames: as they are (crop), aspect restored (resize), or pasted back
into the photo (full) through a feathered mask, so no rectangle seam shows.

The official code pastes with cv2.seamlessClone over the whole rectangle; a precomputed feathered
alpha is cheaper per frame and leaves no hard edge. Everything per avatar is computed once.
"""
from __future__ import annotations

import cv2
import numpy as np

from ..stages import is_full


def feather_mask(width: int, height: int, margin: int) -> np.ndarray:
    """(H, W, 1) float32 alpha: 1 inside, a smooth ramp to 0 over ``margin`` pixels at every edge."""
    ramp_x = np.clip((np.minimum(np.arange(width), width - 1 - np.arange(width)) + 0.5) / margin, 0.0, 1.0)
    ramp_y = np.clip((np.minimum(np.arange(height), height - 1 - np.arange(height)) + 0.5) / margin, 0.0, 1.0)
    alpha = np.outer(ramp_y, ramp_x)
    return (alpha * alpha * (3 - 2 * alpha)).astype(np.float32)[..., None]     # smoothstep


class Compositor:
    def __init__(self, avatar):
        self.mode = avatar.preprocess
        self.size = avatar.size
        self.output_size = avatar.output_size
        if not is_full(self.mode):
            return
        info = avatar.crop_info
        photo = avatar.original
        h0, w0 = photo.shape[:2]
        # Boxes are in rsize pixels (they differ only when a huge face was shrunk); map them to the photo.
        sx, sy = w0 / info.rsize[0], h0 / info.rsize[1]
        x1, y1, x2, y2 = info.paste_box
        self.box = (int(round(x1 * sx)), int(round(y1 * sy)), int(round(x2 * sx)), int(round(y2 * sy)))
        bw, bh = max(1, self.box[2] - self.box[0]), max(1, self.box[3] - self.box[1])
        self.alpha = feather_mask(bw, bh, max(2, int(0.06 * min(bw, bh))))
        # The tight box can overhang the photo (the official y bound is clamped by the width): clip once here.
        cx1, cy1 = max(0, self.box[0]), max(0, self.box[1])
        cx2, cy2 = min(w0, self.box[0] + bw), min(h0, self.box[1] + bh)
        self.clip = (cx1, cy1, cx2, cy2)
        self.inner = (slice(cy1 - self.box[1], cy2 - self.box[1]), slice(cx1 - self.box[0], cx2 - self.box[0]))
        self.alpha = self.alpha[self.inner]
        self.background = photo.astype(np.float32)
        self.out = photo.copy()
        self.paste_size = (bw, bh)

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) pixel positions in the rendered S x S frame -> positions in the video frame."""
        points = np.asarray(points, dtype=np.float64)
        if is_full(self.mode):
            (bw, bh), (x1, y1) = self.paste_size, self.box[:2]
            return points * [bw / self.size, bh / self.size] + [x1, y1]
        width, height = self.output_size
        return points * [width / self.size, height / self.size]

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if is_full(self.mode):
            patch = cv2.resize(frame, self.paste_size, interpolation=cv2.INTER_LINEAR)[self.inner].astype(np.float32)
            x1, y1, x2, y2 = self.clip
            region = self.background[y1:y2, x1:x2]
            out = self.out.copy()
            out[y1:y2, x1:x2] = np.rint(region + self.alpha * (patch - region)).astype(np.uint8)
            return out
        if self.output_size != (self.size, self.size):
            return cv2.resize(frame, self.output_size, interpolation=cv2.INTER_LINEAR)
        return frame
