"""``--enhancer gfpgan`` on the hot path: video frames -> faces aligned to the FFHQ template -> GFPGAN and the
parsing network (stages ``enhancer`` and ``face_parse``, any backend) -> pasted back at twice the size.

Alignment points: the official helper runs RetinaFace on every frame; its weights cannot be shipped. The
points here come from the avatar's own 68 landmarks (on the renderer's source frame), mapped into the video
frame once per avatar: SadTalker's renderer keeps the face where the source image has it, so per-frame
detection buys little for its cost (see the README). Noise maps of the decoder: ``fixed`` (the checkpoint's
own maps every frame; least flicker, the default), ``seeded`` (fresh maps per frame drawn from the seed and
the frame index, as the official statistics, reproducible) or ``fresh`` (unseeded, as the official call).
Numpy and OpenCV only; frames are RGB in and out (converted to the BGR the official helper holds).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import face_restore as fr
from ..errors import UsageError, WeightsError
from ..stages import ENHANCER_NOISE_MODES, ENHANCER_NOISE_SIDES, ENHANCER_UPSCALE

ENHANCERS = ("gfpgan",)
# Where each frame's alignment points come from (benchmarks/results/cpu-enhancer-choices.json): ``track`` runs
# dlib's shape predictor in the box of the previous frame's landmarks (first frame: the avatar's own), ``fixed``
# maps the avatar's points once and keeps them.
ENHANCER_POINTS = ("track", "fixed")
TRACK_TOLERANCE = 0.35    # tracked points further than this x the eye distance from the avatar's: keep the last good
FIXED_NOISE_FILE = "enhancer_fixed_noise.npz"     # the checkpoint's noise maps, beside the exported graphs


def check_enhancer(name: Optional[str], noise: str, points: str = "track") -> None:
    if name is not None and name not in ENHANCERS:
        raise UsageError(f"--enhancer must be {' or '.join(ENHANCERS)}, not '{name}'.")
    if points not in ENHANCER_POINTS:
        raise UsageError(f"--enhancer-points must be {' or '.join(ENHANCER_POINTS)}, not '{points}'.")
    if noise not in ENHANCER_NOISE_MODES:
        raise UsageError(f"--enhancer-noise must be one of {', '.join(ENHANCER_NOISE_MODES)}, not '{noise}'.")


def load_fixed_noise(directory: Path, manifest: dict) -> Optional[list[np.ndarray]]:
    """The checkpoint's 15 noise maps an export keeps beside the enhancer graph (checked by sha256)."""
    from .manifest import sha256_of

    entry = manifest.get("stages", {}).get("enhancer", {}).get("fixed_noise")
    if not entry:
        return None
    path = Path(directory) / entry["file"]
    if not path.is_file() or sha256_of(path) != entry["sha256"]:
        raise WeightsError(f"{path} is missing or does not match the sha256 in its manifest; re-export the enhancer.")
    with np.load(path) as data:
        return [data[f"noise{i}"] for i in range(len(ENHANCER_NOISE_SIDES))]


def enhancer_on_graphs(backend) -> "FaceEnhancer":
    """A FaceEnhancer on a folder backend whose folder holds the enhancer stages: onnxruntime graphs or TensorRT
    engines built from them (either folder's record lists its stages); the parsing mask is used when the folder
    has ``face_parse`` too."""
    stages = backend.manifest.get("stages", {})
    if "enhancer" not in stages:
        made = "export it with `sadtalker-rt export --enhancer gfpgan`" if backend.name == "onnxruntime" else \
            "build the engines from graphs exported with `sadtalker-rt export --enhancer gfpgan`"
        raise WeightsError(f"{backend.directory} has no enhancer {'graph' if backend.name == 'onnxruntime' else 'engine'}"
                           f"; {made} (or leave out --graphs/--engines to use the cache).")
    return FaceEnhancer(backend, load_fixed_noise(backend.directory, backend.manifest), parse="face_parse" in stages)


class Alignment:
    """Where the face is in each frame of one video: points fixed for the avatar, or 68 landmarks tracked from
    frame to frame (each frame from the previous one's), so one per utterance, frames given in order."""

    def __init__(self, upscale: int, points: Optional[np.ndarray] = None, landmarks68: Optional[np.ndarray] = None):
        self.upscale = upscale
        self.landmarks = None
        if landmarks68 is not None:
            points = fr.points_from_landmarks68(landmarks68)
            self._start = self.landmarks = np.asarray(landmarks68, np.float32)
            self._start5 = fr.points_from_landmarks68(self._start)
        self._set(np.asarray(points, np.float32))

    def _set(self, points: np.ndarray) -> None:
        self.affine = fr.align_affine(points)
        self.inverse = fr.inverse_affine(self.affine, self.upscale)

    def __call__(self, frame_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(affine, inverse) of the next frame."""
        if self.landmarks is None:
            return self.affine, self.inverse
        from .landmarks import track

        found = track(frame_rgb, self.landmarks)
        points = fr.points_from_landmarks68(found)
        eyes = np.linalg.norm(self._start5[1] - self._start5[0])
        if np.linalg.norm(points - self._start5, axis=1).max() <= TRACK_TOLERANCE * eyes:
            self.landmarks = found      # else keep the last good landmarks: the tracker lost the face
            self._set(points)
        return self.affine, self.inverse


class FaceEnhancer:
    """``backend.runner("enhancer")`` and, when ``parse`` is True, ``backend.runner("face_parse")``.

    ``fixed_noise``: the checkpoint's 15 noise maps (1, 1, r, r), needed by the ``fixed`` mode. The enhancer
    holds no per-video state: each video has its own ``Alignment`` (``fixed`` or ``tracking``), so sessions
    can share one enhancer.
    """

    def __init__(self, backend, fixed_noise: Optional[Sequence[np.ndarray]] = None, parse: bool = True,
                 upscale: int = ENHANCER_UPSCALE):
        self.backend = backend
        self.fixed_noise = None if fixed_noise is None else [np.ascontiguousarray(n, np.float32) for n in fixed_noise]
        self.parse = parse
        self.upscale = upscale
        self.alignment: Optional[Alignment] = None      # the default of __call__ (set_points, track_from)

    def on_backend(self, backend) -> "FaceEnhancer":
        """The same enhancer running through ``backend`` (e.g. one whose calls take turns)."""
        return FaceEnhancer(backend, self.fixed_noise, self.parse, self.upscale)

    def fixed(self, points: np.ndarray) -> Alignment:
        """The face's 5 points (eyes, nose tip, mouth corners) in video-frame pixels, fixed for the avatar."""
        return Alignment(self.upscale, points=points)

    def tracking(self, landmarks68: np.ndarray) -> Alignment:
        """The 68 landmarks tracked from frame to frame, starting from the avatar's (in video-frame pixels)."""
        return Alignment(self.upscale, landmarks68=landmarks68)

    def set_points(self, points: np.ndarray) -> None:
        self.alignment = self.fixed(points)

    def track_from(self, landmarks68: np.ndarray) -> None:
        self.alignment = self.tracking(landmarks68)

    def noise(self, indices: Sequence[int], mode: str, seed: int) -> dict[str, np.ndarray]:
        batch = len(indices)
        if mode == "fixed":
            if self.fixed_noise is None:
                raise UsageError("--enhancer-noise fixed needs the checkpoint's noise maps; this backend has none.")
            return {f"noise{i}": np.broadcast_to(n, (batch, *n.shape[1:])) for i, n in enumerate(self.fixed_noise)}
        maps = {f"noise{i}": np.empty((batch, 1, s, s), np.float32) for i, s in enumerate(ENHANCER_NOISE_SIDES)}
        for b, index in enumerate(indices):
            rng = np.random.default_rng([seed, index] if mode == "seeded" else None)
            for i, side in enumerate(ENHANCER_NOISE_SIDES):
                maps[f"noise{i}"][b, 0] = rng.standard_normal((side, side), dtype=np.float32)
        return maps

    def __call__(self, frames_rgb: Sequence[np.ndarray], indices: Sequence[int], mode: str = "fixed",
                 seed: int = 0, alignment: Optional[Alignment] = None) -> list[np.ndarray]:
        """RGB uint8 frames (H, W, 3) -> RGB uint8 frames (2H, 2W, 3); ``alignment``: the video's (default:
        the one ``set_points`` or ``track_from`` made)."""
        alignment = alignment or self.alignment
        if alignment is None:
            raise RuntimeError("set_points() first, or give an alignment")
        bgr = [np.ascontiguousarray(f[..., ::-1]) for f in frames_rgb]
        geometry = [alignment(f) for f in frames_rgb]
        cropped = np.stack([fr.warp_face(f, affine) for f, (affine, _) in zip(bgr, geometry)])
        image = self.backend.runner("enhancer").infer({"face": fr.network_input(cropped),
                                                       **self.noise(indices, mode, seed)})["image"]
        restored = fr.restored_image(image)
        masks = [None] * len(bgr)
        if self.parse:
            parse = self.backend.runner("face_parse").infer(
                {"face": fr.network_input(restored, float64_division=False)})["parse"]
            masks = [fr.parse_mask(p) for p in parse]
        return [np.ascontiguousarray(fr.paste_faces(f, [r], [inverse], self.upscale, [m])[..., ::-1])
                for f, r, m, (_, inverse) in zip(bgr, restored, masks, geometry)]
