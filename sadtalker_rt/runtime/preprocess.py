"""Source-image preprocessing: the official crop geometry, the five crop modes and the 3DMM alignment.

Reproduces ``Preprocesser.align_face`` / ``crop`` (``src/utils/croper.py``), the crop branch of
``CropAndExtract.generate`` (``src/utils/preprocess.py``) and ``align_img``
(``src/face3d/util/preprocess.py``) of OpenTalker/SadTalker, quirks included. numpy, Pillow and
OpenCV only; the 3DMM regressor itself lives in ``models/face3d_recon.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from ..errors import InputError, UsageError
from ..stages import PREPROCESS_MODES

ALIGN_SIZE = 512            # the official code always aligns with xsize=512, whatever the render size
RECON_SIZE = 224            # input side of the 3DMM regressor
RECON_RESCALE = 102.0       # align_img's rescale_factor

# 5-point template reduced from similarity_Lm3D_all.mat ['lm'] (float32 68x3) exactly as load_lm3d does:
# [mean(37,40), mean(43,46), 31, 49, 55] (1-based) = left eye, right eye, nose, left mouth, right mouth.
TEMPLATE_5P = np.array([
    [-0.31148657, 0.29036078, 0.13377953],
    [0.30979887, 0.28972036, 0.13179526],
    [0.0032534988, -0.046179324, 0.55244243],
    [-0.25216928, -0.38133916, 0.22405732],
    [0.2484662, -0.38128236, 0.22235769],
], dtype=np.float32)


@dataclass(frozen=True)
class AlignBox:
    """What ``align_face`` returns: the working image size, the border crop and the tight box inside it."""

    rsize: tuple[int, int]                       # (w, h) of the (possibly shrunk) image
    crop: tuple[int, int, int, int]              # (clx, cly, crx, cry) in rsize pixels
    quad: tuple[float, float, float, float]      # (lx, ly, rx, ry) relative to the crop

    @property
    def tight_box(self) -> tuple[int, int, int, int]:
        """The crop-mode region (x1, y1, x2, y2) in rsize pixels: the official ``(ox1, oy1, ox2, oy2)``."""
        lx, ly, rx, ry = (int(v) for v in self.quad)
        return self.crop[0] + lx, self.crop[1] + ly, self.crop[0] + rx, self.crop[1] + ry


@dataclass(frozen=True)
class CropInfo:
    """Everything paste-back needs to put a rendered S x S frame back into the original image.

    ``tight_size`` is the official ``crop_info[0]``: the output aspect of every mode. ``crop_box`` and
    ``quad_box`` are ``crop_info[1:]`` (None in resize mode); ``original_box`` is (ox1, oy1, ox2, oy2).
    Boxes are in ``rsize`` pixels, which differ from the original only if the shrink branch fired.
    """

    mode: str
    image_size: tuple[int, int]                              # (W0, H0)
    rsize: tuple[int, int]
    tight_size: tuple[int, int]                              # (w, h)
    crop_box: tuple[int, int, int, int] | None
    quad_box: tuple[float, float, float, float] | None
    original_box: tuple[int, int, int, int]

    @property
    def region_box(self) -> tuple[int, int, int, int]:
        """The rsize-pixel region that was resized to S x S; the tight box can overhang the crop (ry quirk)."""
        if self.crop_box is None:
            return (0, 0) + self.rsize
        clx, cly, crx, cry = self.crop_box
        if self.mode.startswith("ext"):
            return self.crop_box
        x1, y1, x2, y2 = self.original_box
        return x1, y1, min(x2, crx), min(y2, cry)

    @property
    def paste_box(self) -> tuple[int, int, int, int]:
        """Where the rendered frame goes in full/extfull mode: (x1, y1, x2, y2)."""
        if self.crop_box is None:
            return self.original_box
        return self.crop_box if self.mode.startswith("ext") else self.original_box


def align_face_box(image_shape: tuple[int, ...], landmarks: np.ndarray, xsize: int = ALIGN_SIZE) -> AlignBox:
    """The FFHQ-style box of ``Preprocesser.align_face`` for 68 (x, y) landmarks in image pixels.

    Computed in float64, as the recordings were (float32 landmarks move ``quad`` by ~1e-4 px).
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"expected 68 (x, y) landmarks, got an array of shape {lm.shape}")
    eye_left, eye_right = np.mean(lm[36:42], axis=0), np.mean(lm[42:48], axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg

    x = eye_to_eye - np.flipud(eye_to_mouth) * np.array([-1, 1])
    x = x / np.hypot(*x)
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * np.array([-1, 1])
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    qsize = np.hypot(*x) * 2

    # NOTE: official code resizes a PIL copy here (Image.ANTIALIAS, gone in Pillow 10) only to read
    # its size; the frames themselves are cv2-resized to rsize later, so only the size matters.
    shrink = int(np.floor(qsize / xsize * 0.5))
    if shrink > 1:
        width, height = int(np.rint(float(width) / shrink)), int(np.rint(float(height) / shrink))
        quad /= shrink
        qsize /= shrink
    rsize = (width, height)

    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
            int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    crop = (max(crop[0] - border, 0), max(crop[1] - border, 0), min(crop[2] + border, width),
            min(crop[3] + border, height))
    if crop[2] - crop[0] < width or crop[3] - crop[1] < height:
        quad -= crop[0:2]
    # The official "pad" values are computed here and never used.

    q = (quad + 0.5).flatten()
    lx = max(min(q[0], q[2]), 0)
    ly = max(min(q[1], q[7]), 0)
    rx = min(max(q[4], q[6]), width)
    ry = min(max(q[3], q[5]), width)    # NOTE: official quirk, y clamped by the width
    return AlignBox(rsize, crop, (float(lx), float(ly), float(rx), float(ry)))


def crop_regions(image: np.ndarray, box: AlignBox) -> tuple[np.ndarray, np.ndarray]:
    """(tight, ext): the crop-mode and extcrop-mode regions of ``Preprocesser.crop``."""
    if (image.shape[1], image.shape[0]) != box.rsize:
        image = cv2.resize(image, box.rsize)
    clx, cly, crx, cry = box.crop
    ext = image[cly:cry, clx:crx]
    lx, ly, rx, ry = (int(v) for v in box.quad)
    return ext[ly:ry, lx:rx], ext


def crop_source(image: np.ndarray, landmarks: np.ndarray | None, mode: str, size: int,
                name: str = "the source image") -> tuple[np.ndarray, CropInfo]:
    """The S x S renderer source frame of one preprocess mode and the geometry to paste it back.

    ``landmarks`` (68, 2) in image pixels are needed by every mode except ``resize``. The region is
    resized with cv2 bilinear to ``size`` x ``size`` without keeping its aspect, as officially.
    """
    if mode not in PREPROCESS_MODES:
        raise UsageError(f"unknown preprocess mode '{mode}'; choose one of {', '.join(PREPROCESS_MODES)}.")
    height, width = image.shape[:2]
    if mode == "resize":
        info = CropInfo(mode, (width, height), (width, height), (width, height), None, None, (0, 0, width, height))
        return cv2.resize(image, (size, size)), info
    if landmarks is None:
        raise UsageError(f"preprocess mode '{mode}' needs face landmarks.")
    box = align_face_box(image.shape, landmarks)
    tight, ext = crop_regions(image, box)
    region = ext if mode.startswith("ext") else tight
    if region.shape[0] == 0 or region.shape[1] == 0:
        raise InputError(f"The face crop of {name} is empty; the face may lie outside the image.")
    x1, y1, x2, y2 = box.tight_box
    info = CropInfo(mode, (width, height), box.rsize, (x2 - x1, y2 - y1), box.crop, box.quad, box.tight_box)
    return cv2.resize(np.ascontiguousarray(region), (size, size)), info


def points_in_frame(points: np.ndarray, info: CropInfo, size: int) -> np.ndarray:
    """Map (x, y) points of the original image into the S x S frame of ``crop_source``.

    A fallback for the second landmark pass, which can miss a face that the resize squashed.
    Uses cv2's pixel-centre convention: dst = (src + 0.5) * scale - 0.5.
    """
    pts = np.asarray(points, dtype=np.float64)
    shrink = np.array(info.rsize, dtype=np.float64) / np.array(info.image_size, dtype=np.float64)
    pts = (pts + 0.5) * shrink - 0.5
    x1, y1, x2, y2 = info.region_box
    scale = np.array([size / (x2 - x1), size / (y2 - y1)])
    return ((pts - [x1, y1] + 0.5) * scale - 0.5).astype(np.float32)


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """68 landmarks -> [left eye, right eye, nose, left mouth, right mouth], as ``extract_5p``."""
    lm = np.asarray(landmarks)
    return np.stack([np.mean(lm[[36, 39]], 0), np.mean(lm[[42, 45]], 0), lm[30], lm[48], lm[54]])


def pos_fit(points_2d: np.ndarray, template_3d: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares weak-perspective fit (``POS``): returns the translation (tx, ty) and the scale."""
    n = points_2d.shape[0]
    a = np.zeros((2 * n, 8))
    a[0::2, 0:3] = template_3d
    a[0::2, 3] = 1
    a[1::2, 4:7] = template_3d
    a[1::2, 7] = 1
    b = np.asarray(points_2d, dtype=np.float64).reshape(2 * n)
    k = np.linalg.lstsq(a, b, rcond=None)[0]
    scale = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    return np.array([k[3], k[7]]), float(scale)


def align_for_3dmm(frame: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(trans_params [W, H, s, tx, ty] float32, the 224 x 224 uint8 regressor crop) of one frame.

    ``landmarks`` are 68 (x, y) points in frame pixels with y down, or all -1 for "no face", in which
    case the template itself is used, as officially.
    """
    height, width = frame.shape[:2]
    lm = np.array(landmarks, dtype=np.float32).reshape(-1, 2)
    if np.mean(lm) == -1:
        lm5 = (TEMPLATE_5P[:, :2] + 1) / 2.0 * np.array([width, height], dtype=np.float32)
    else:
        lm[:, 1] = height - 1 - lm[:, 1]
        lm5 = five_points(lm)
    t, s_pos = pos_fit(lm5, TEMPLATE_5P)
    s = RECON_RESCALE / s_pos

    w, h = int(width * s), int(height * s)
    left = int(w / 2 - RECON_SIZE / 2 + float((t[0] - width / 2) * s))
    up = int(h / 2 - RECON_SIZE / 2 + float((height / 2 - t[1]) * s))
    resized = Image.fromarray(np.ascontiguousarray(frame)).resize((w, h), resample=Image.BICUBIC)
    aligned = resized.crop((left, up, left + RECON_SIZE, up + RECON_SIZE))   # zero fill outside
    trans_params = np.array([width, height, s, t[0], t[1]], dtype=np.float32)
    return trans_params, np.asarray(aligned.convert("RGB"))


def regressor_input(aligned: np.ndarray) -> np.ndarray:
    """(224, 224, 3) uint8 -> (1, 3, 224, 224) float32 in [0, 1]; no mean/std normalisation."""
    return (aligned.astype(np.float64) / 255.0).astype(np.float32).transpose(2, 0, 1)[None].copy()


def first_frame_coeffs(regressor_output: np.ndarray, trans_params: np.ndarray) -> np.ndarray:
    """(1, 257) regressor output -> (1, 73): exp(64) | angle(3) | trans(3) | s, tx, ty."""
    out = np.asarray(regressor_output, dtype=np.float32).reshape(1, 257)
    crop = np.asarray(trans_params, dtype=np.float32)[2:][None]
    return np.concatenate([out[:, 80:144], out[:, 224:227], out[:, 254:257], crop], axis=1)
