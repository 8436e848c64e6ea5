"""3DMM coefficients of a reference video (``--ref-eyeblink``, ``--ref-pose``), frame by frame as the source.

As ``CropAndExtract.generate`` does for a video: one crop box for the whole video, from the landmarks of its
first frame, then per frame the landmarks on the S x S crop, the 5-point alignment and the face3d_recon
stage of whichever backend runs. Only the frames the utterance uses are decoded.

Where the official code meets a frame without a face it aligns the 3DMM template instead, which yields a
made-up expression and pose. Here such a frame takes the coefficients of the nearest frame with a face
(the earlier one on a tie), and the user is told in one line; a video without any face is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np

from ..errors import InputError


@dataclass
class ReferenceCoeffs:
    coeffs: np.ndarray                  # (N, 73) per decoded frame, as the source's coeff_3dmm
    notes: list = field(default_factory=list)


def reference_coeffs(frames: Iterable[np.ndarray], preprocess: str, size: int,
                     regress: Callable[[np.ndarray], np.ndarray], name: str) -> ReferenceCoeffs:
    """``regress`` maps a (1, 3, 224, 224) float32 aligned crop to the (1, 257) face3d_recon output."""
    from . import landmarks
    from . import preprocess as prep

    crop_landmarks: Optional[np.ndarray] = None
    coeffs: list[Optional[np.ndarray]] = []
    pending: list[np.ndarray] = []          # frames before the first face: cropped once the box is known
    notes: list[str] = []
    first_face_at = None

    def face_landmarks(image: np.ndarray) -> Optional[np.ndarray]:
        try:
            return landmarks.detect(image, name).landmarks
        except InputError:          # no face in this frame
            return None

    def extract(photo: np.ndarray) -> Optional[np.ndarray]:
        frame, _ = prep.crop_source(photo, crop_landmarks, preprocess, size, name=name)
        points = face_landmarks(frame)
        if points is None:
            return None
        trans_params, aligned = prep.align_for_3dmm(frame, points)
        aligned_chw = (aligned.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()
        return prep.first_frame_coeffs(regress(aligned_chw), trans_params)[0]

    for index, photo in enumerate(frames):
        if preprocess != "resize" and crop_landmarks is None:
            crop_landmarks = face_landmarks(photo)
            if crop_landmarks is None:
                pending.append(photo)
                coeffs.append(None)
                continue
            first_face_at = index
            for earlier, held in enumerate(pending):     # cropped with the box of the first face
                coeffs[earlier] = extract(held)
            pending.clear()
        coeffs.append(extract(photo))

    missing = [i for i, c in enumerate(coeffs) if c is None]
    if len(missing) == len(coeffs):
        raise InputError(f"No face was found in any of the {len(coeffs)} frames of {name}; use a video with a "
                         "clearly visible, roughly frontal face.")
    if first_face_at:
        notes.append(f"{name}: no face in the first {first_face_at} frames; the crop follows frame {first_face_at}.")
    if missing:
        found = np.array([i for i, c in enumerate(coeffs) if c is not None])
        for i in missing:
            coeffs[i] = coeffs[int(found[np.argmin(np.abs(found - i))])]
        shown = ", ".join(str(i) for i in missing[:8]) + (", ..." if len(missing) > 8 else "")
        notes.append(f"{name}: no face in {len(missing)} of {len(coeffs)} frames ({shown}); they take the "
                     "coefficients of the nearest frame with a face.")
    return ReferenceCoeffs(np.stack(coeffs).astype(np.float32), notes)
