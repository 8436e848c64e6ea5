"""Face restoration geometry and paste-back, numpy and OpenCV only (the runtime side of the enhancer).

Reproduces facexlib's ``FaceRestoreHelper`` as GFPGANer drives it: 5 points -> similarity to the 512x512
FFHQ template (OpenCV LMEDS), warp with a grey border, restore, warp back at ``upscale`` over a
Lanczos-upscaled background, blended through the parsing mask (or, without a parsing network, the
helper's eroded and blurred square mask). Images are BGR uint8, as the official helper holds them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np

FACE_SIZE = 512
# Eyes, nose tip, mouth corners of an FFHQ face at 512 x 512 (facexlib's template).
FFHQ_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]])
BORDER_VALUE = (135, 133, 132)
EYE_DIST_THRESHOLD = 5            # GFPGANer skips faces whose eyes are closer than this (pixels)
# Parsing classes kept in the paste mask: all but background (0), neck (14), cloth (16), hair (17), hat (18).
MASK_COLORMAP = np.array([0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 255, 0, 0, 0],
                         dtype=np.float64)
MASK_BORDER = 10


def points_from_detections(detections: np.ndarray, eye_dist_threshold: float = EYE_DIST_THRESHOLD) -> list:
    """RetinaFace rows (x1, y1, x2, y2, score, 5 x (x, y)) -> one (5, 2) array per kept face, in row dtype."""
    kept = []
    for row in np.asarray(detections):
        if np.linalg.norm([row[5] - row[7], row[6] - row[8]]) < eye_dist_threshold:
            continue
        kept.append(np.array([[row[i], row[i + 1]] for i in range(5, 15, 2)]))
    return kept


def points_from_landmarks68(landmarks: np.ndarray) -> np.ndarray:
    """dlib's 68 points -> the detector's 5: eye centres (image left first), nose tip, mouth corners."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]]).astype(np.float32)


def align_affine(points: np.ndarray) -> np.ndarray:
    """(2, 3) float64 similarity taking the face's 5 points onto the FFHQ template."""
    affine = cv2.estimateAffinePartial2D(np.asarray(points), FFHQ_TEMPLATE, method=cv2.LMEDS)[0]
    if affine is None:
        raise ValueError("the five face points are degenerate; no alignment exists")
    return affine


def warp_face(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return cv2.warpAffine(image, affine, (FACE_SIZE, FACE_SIZE), borderMode=cv2.BORDER_CONSTANT,
                          borderValue=BORDER_VALUE)


def inverse_affine(affine: np.ndarray, upscale: int) -> np.ndarray:
    """Output-to-face map at ``upscale``, before the paste's half-pixel offset."""
    return cv2.invertAffineTransform(affine) * upscale


def network_input(faces_bgr: np.ndarray, float64_division: bool = True) -> np.ndarray:
    """uint8 BGR (..., 512, 512, 3) -> float32 RGB (..., 3, 512, 512) in [-1, 1].

    GFPGANer divides by 255 in float64 and then casts; the parsing input is divided in float32.
    """
    faces = np.asarray(faces_bgr)
    scaled = (faces / 255.0).astype(np.float32) if float64_division else faces.astype(np.float32) / np.float32(255)
    rgb = np.moveaxis(scaled[..., ::-1], -1, -3)
    return np.ascontiguousarray((rgb - np.float32(0.5)) / np.float32(0.5))


def restored_image(image: np.ndarray) -> np.ndarray:
    """float (..., 3, 512, 512) RGB, nominally [-1, 1] -> uint8 BGR (..., 512, 512, 3), rounded half to even."""
    scaled = (np.clip(np.asarray(image, dtype=np.float32), -1, 1) + np.float32(1)) / np.float32(2)
    hwc = np.moveaxis(scaled, -3, -1)[..., ::-1]
    return np.round(hwc * np.float32(255.0)).astype(np.uint8)


def parse_mask(parse: np.ndarray) -> np.ndarray:
    """Class map (512, 512) -> float64 paste mask in [0, 1]: kept classes, blurred twice, border cleared."""
    mask = MASK_COLORMAP[np.asarray(parse)]
    mask = cv2.GaussianBlur(mask, (101, 101), 11)
    mask = cv2.GaussianBlur(mask, (101, 101), 11)
    mask[:MASK_BORDER, :] = 0
    mask[-MASK_BORDER:, :] = 0
    mask[:, :MASK_BORDER] = 0
    mask[:, -MASK_BORDER:] = 0
    return mask / 255.0


def upscale_background(image: np.ndarray, upscale: int) -> np.ndarray:
    h, w = image.shape[:2]
    return cv2.resize(image, (int(w * upscale), int(h * upscale)), interpolation=cv2.INTER_LANCZOS4)


def paste_faces(image: np.ndarray, restored: Sequence[np.ndarray], inverse_affines: Sequence[np.ndarray],
                upscale: int, masks: Optional[Sequence[Optional[np.ndarray]]] = None,
                background: Optional[np.ndarray] = None) -> np.ndarray:
    """Blend each restored face into the upscaled image (truncated to uint8, as the official helper does).

    ``masks[i]`` is a 512 x 512 parse mask (``parse_mask``) or None for the square mask.
    """
    h, w = image.shape[:2]
    size = (int(w * upscale), int(h * upscale))
    out = upscale_background(image, upscale) if background is None else background
    for k, (face, inverse) in enumerate(zip(restored, inverse_affines)):
        inverse = np.array(inverse, dtype=np.float64)
        if upscale > 1:
            inverse[:, 2] += 0.5 * upscale
        inv_restored = cv2.warpAffine(face, inverse, size)
        mask = None if masks is None else masks[k]
        if mask is not None:
            mask = cv2.resize(mask, face.shape[:2])
            soft = cv2.warpAffine(mask, inverse, size, flags=cv2.INTER_AREA)[:, :, None]
            pasted = inv_restored
        else:
            square = cv2.warpAffine(np.ones((FACE_SIZE, FACE_SIZE), np.float32), inverse, size)
            eroded = cv2.erode(square, np.ones((int(2 * upscale), int(2 * upscale)), np.uint8))
            pasted = eroded[:, :, None] * inv_restored
            edge = int(np.sum(eroded) ** 0.5) // 20
            center = cv2.erode(eroded, np.ones((edge * 2, edge * 2), np.uint8))
            soft = cv2.GaussianBlur(center, (edge * 2 + 1, edge * 2 + 1), 0)[:, :, None]
        out = soft * pasted + (1 - soft) * out
    return np.asarray(out).astype(np.uint8)
