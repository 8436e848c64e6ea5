"""Real faces for the enhancer stages' calibration and validation: photos, their dlib landmarks, the 5 points
aligned to the FFHQ template as the runtime aligns them, in the networks' input layout."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np

from ... import media
from ...runtime import face_restore as fr
from ...runtime import landmarks


def aligned_faces(photos: Sequence[Union[str, Path, np.ndarray]]) -> np.ndarray:
    """(N, 3, 512, 512) float32 RGB in [-1, 1], one FFHQ-aligned face per photo (its largest face)."""
    faces = []
    for photo in photos:
        rgb = media.load_image(photo) if not isinstance(photo, np.ndarray) else photo
        points = fr.points_from_landmarks68(landmarks.detect(rgb, name=str(photo)[:80]).landmarks)
        faces.append(fr.warp_face(np.ascontiguousarray(rgb[..., ::-1]), fr.align_affine(points)))
    return fr.network_input(np.stack(faces))
