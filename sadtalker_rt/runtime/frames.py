"""What the pipeline hands out: motion coefficients per utterance and video frames, shared by the offline and
streaming paths."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Frame:
    index: int
    timestamp: float                   # seconds from the start of the audio
    image: np.ndarray                  # (H, W, 3) uint8 RGB


@dataclass
class Motion:
    """Per-utterance motion coefficients, before rendering."""

    coeffs: np.ndarray                 # (T, 70): expression 64, pose 6
    wav: np.ndarray                    # 16 kHz mono float32, cut to T frames
    windows: object                    # audio.MelWindows: (T, 80, 16) mel windows, sliced lazily
    notes: list = field(default_factory=list)   # lines for the user about the reference videos

    @property
    def frames(self) -> int:
        return self.coeffs.shape[0]

    @property
    def indiv_mels(self) -> np.ndarray:
        return self.windows[:].astype(np.float32)


def to_uint8(chw: np.ndarray) -> np.ndarray:
    """float (3, H, W) in [0, 1] -> uint8 HWC, rounding as skimage's img_as_ubyte."""
    return np.rint(np.clip(chw.transpose(1, 2, 0), 0.0, 1.0) * 255.0).astype(np.uint8)
