"""Face detection and 68-point landmarks with dlib.

The official pipeline uses RetinaFace and an AWing FAN whose weights cannot be shipped; dlib's HOG
detector and 68-point shape predictor (from the ``face-recognition-models`` package) stand in for
them and give landmarks in the same 68-point (iBUG) layout. The conformance cases were recorded
with these landmarks, detected with one 2x upsampling as ``face_recognition`` does by default.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import EnvironmentProblem, InputError

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
UPSAMPLE_MAX_SIDE = 1280    # images up to this side are searched once upsampled 2x (finds faces down to ~40 px)
DETECT_MAX_SIDE = 2560      # larger images are searched on a downscaled copy; landmarks use full resolution

Box = tuple[int, int, int, int]     # (left, top, right, bottom) in image pixels


@dataclass(frozen=True)
class FaceLandmarks:
    landmarks: np.ndarray       # (68, 2) float32 (x, y) in image pixels
    box: Box                    # the face the landmarks belong to
    boxes: tuple[Box, ...]      # every face found, largest first

    @property
    def faces_found(self) -> int:
        return len(self.boxes)

    @property
    def notes(self) -> list[str]:
        """Lines worth telling the user: which face was used when there were several."""
        if self.faces_found == 1:
            return []
        return [f"{self.faces_found} faces found; using the largest, at {self.box} (left, top, right, bottom)."]


def _models_dir() -> Path:
    # NOTE: found without importing face_recognition_models, whose __init__ needs pkg_resources.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise EnvironmentProblem("The face-recognition-models package is missing; "
                                 "install it with `pip install face-recognition-models`.")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


@functools.lru_cache(maxsize=1)
def _dlib_models():
    try:
        import dlib
    except ImportError:
        raise EnvironmentProblem("dlib is missing; install it with `pip install dlib-bin`.") from None
    predictor_path = _models_dir() / PREDICTOR_FILE
    if not predictor_path.is_file():
        raise EnvironmentProblem(f"{predictor_path} is missing; reinstall face-recognition-models.")
    return dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(str(predictor_path))


def _as_rgb(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or min(image.shape[:2]) == 0:
        raise InputError(f"{name} is not an 8-bit image (got {image.dtype} {image.shape}).")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, :3])
    return np.ascontiguousarray(image)


def detect_faces(image: np.ndarray, name: str = "the image") -> list[Box]:
    """Face boxes in image pixels, largest first; an empty list when there is none."""
    _, detector, _ = _dlib_models()
    image = _as_rgb(image, name)
    height, width = image.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
    search = image
    if scale < 1.0:
        search = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    upsamples = (1,) if max(search.shape[:2]) <= UPSAMPLE_MAX_SIDE else (0, 1)
    rects = []
    for upsample in upsamples:
        rects = list(detector(search, upsample))
        if rects:
            break
    boxes = [tuple(int(round(v / scale)) for v in (r.left(), r.top(), r.right(), r.bottom())) for r in rects]
    return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)


def detect(image: np.ndarray, name: str = "the image") -> FaceLandmarks:
    """68 landmarks of the largest face in an RGB uint8 image; InputError if there is no face."""
    dlib, _, predictor = _dlib_models()
    image = _as_rgb(image, name)
    boxes = detect_faces(image, name)
    if not boxes:
        raise InputError(f"No face was found in {name}; use a photo with a clearly visible, roughly frontal face.")
    box = boxes[0]
    shape = predictor(image, dlib.rectangle(*box))
    points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
    return FaceLandmarks(points, box, tuple(boxes))


def track(image: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """68 landmarks found by the shape predictor alone, in the box around the previous frame's landmarks
    (no detector: a few ms instead of ~150 ms for a 256 frame and seconds for a full photo)."""
    dlib, _, predictor = _dlib_models()
    x1, y1 = np.min(previous, axis=0)
    x2, y2 = np.max(previous, axis=0)
    pad = 0.15 * (x2 - x1)          # the detector's boxes reach above the brows and beyond the jaw line
    box = dlib.rectangle(int(round(x1 - pad)), int(round(y1 - 2 * pad)), int(round(x2 + pad)), int(round(y2 + pad)))
    shape = predictor(_as_rgb(image, "the frame"), box)
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
