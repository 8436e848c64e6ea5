"""Two choices of --enhancer gfpgan, measured: decoder noise (flicker) and where alignment points come from.

Flicker: one still frame (a photo's crop-mode 256 frame) enhanced as FRAMES consecutive video frames under each
noise mode; the frame-to-frame difference of the enhanced face (mean and max |difference| in 8-bit levels,
and PSNR between consecutive frames over the box the face is pasted into).

Alignment points on the hot path, for speed (ms per frame, median of REPEATS) and agreement with the truth on
frames whose head motion is known (the frame warped by small rotations, shifts and scalings, as a head moves
in the renderer's output): per-frame dlib detection (detector + 68-point predictor), tracking (the predictor
alone, on the box of the previous frame's landmarks), the points fixed once per avatar (today's default), and
the similarity fitted from the renderer's source keypoints to its driving keypoints (cost only: its agreement
needs the official renderer, whose keypoints follow a real head).

    python benchmarks/enhancer_choices.py --json benchmarks/results/cpu-enhancer-choices.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sadtalker_rt.bench.enhancer import _face_box, _frame_and_points  # noqa: E402
from sadtalker_rt.runtime import face_restore as fr  # noqa: E402
from sadtalker_rt.runtime import landmarks  # noqa: E402

MOTIONS = [(0, 0, 0, 1.0), (2, 3, -2, 1.0), (-3, -4, 2, 1.02), (4, 6, 3, 0.98), (-5, -2, -5, 1.03),
           (6, 8, 4, 0.97), (-2, 5, -6, 1.0), (3, -6, 6, 1.02)]     # degrees, dx, dy (pixels), scale


def _shared(name: str) -> Path:
    return Path(os.environ.get("SADTALKER_RT_SHARED", ROOT.parent / "shared")) / "assets" / name


def flicker(photo: Path, frames: int, seed: int) -> dict:
    from sadtalker_rt.models.enhancer_weights import EnhancerWeights
    from sadtalker_rt.runtime.backends import open_backend
    from sadtalker_rt.runtime.enhancer import FaceEnhancer

    frame, points = _frame_and_points(photo)
    backend = open_backend("torch", weights=EnhancerWeights(synthetic_seed=seed))
    stored = [n.numpy() for n in backend.subnetwork("gfpgan").stylegan_decoder.stored_noise()]
    enhancer = FaceEnhancer(backend, stored)
    enhancer.set_points(points)
    y1, y2, x1, x2 = _face_box(enhancer, frame.shape)
    rows = {}
    for mode in ("fixed", "seeded", "fresh"):
        start = time.perf_counter()
        out = [o[y1:y2, x1:x2].astype(np.float64) for o in enhancer([frame] * frames, list(range(frames)), mode, seed)]
        diffs = [np.abs(b - a) for a, b in zip(out, out[1:])]
        mse = [float(np.mean(d ** 2)) for d in diffs]
        rows[mode] = {"mean_abs_diff_8bit": statistics.mean(float(d.mean()) for d in diffs),
                      "max_abs_diff_8bit": max(float(d.max()) for d in diffs),
                      "psnr_consecutive_db": [None if m == 0 else 10 * np.log10(255.0 ** 2 / m) for m in mse],
                      "seconds": round(time.perf_counter() - start, 1)}
        print(mode, rows[mode], flush=True)
    return {"photo": photo.name, "frames": frames, "face_box_yyxx": [y1, y2, x1, x2], "modes": rows}


def _moved(frame: np.ndarray, motion) -> tuple[np.ndarray, np.ndarray]:
    angle, dx, dy, scale = motion
    h, w = frame.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += (dx, dy)
    return cv2.warpAffine(frame, m, (w, h), borderMode=cv2.BORDER_REFLECT), m


def _timed(fn, repeats: int) -> float:
    spent = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        spent.append(time.perf_counter() - start)
    return 1000 * statistics.median(spent)


def _track(image: np.ndarray, previous: np.ndarray) -> np.ndarray:
    dlib, _, predictor = landmarks._dlib_models()
    x1, y1 = previous.min(0)
    x2, y2 = previous.max(0)
    pad = 0.15 * (x2 - x1)          # the predictor's boxes are looser than the landmarks' hull
    box = dlib.rectangle(int(x1 - pad), int(y1 - 2 * pad), int(x2 + pad), int(y2 + pad))
    shape = predictor(image, box)
    return np.array([[p.x, p.y] for p in shape.parts()], np.float32)


def _similarity_points(kp_source: np.ndarray, kp_driving: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Least-squares similarity from the source keypoints' (x, y) to the driving ones', applied to ``points``."""
    m, _ = cv2.estimateAffinePartial2D(np.ascontiguousarray(kp_source[:, :2]), np.ascontiguousarray(kp_driving[:, :2]),
                                       method=cv2.LMEDS)
    return points @ m[:, :2].T + m[:, 2]


def alignment(photo: Path, full_photo: Path, repeats: int) -> dict:
    from sadtalker_rt import media

    frame, _ = _frame_and_points(photo)
    full = media.load_image(full_photo)
    source = landmarks.detect(frame).landmarks
    source5 = fr.points_from_landmarks68(source)
    speed = {
        "detect_per_frame_256_ms": _timed(lambda: landmarks.detect(frame), repeats),
        f"detect_per_frame_full_{full.shape[1]}x{full.shape[0]}_ms": _timed(lambda: landmarks.detect(full), repeats),
        "track_from_previous_256_ms": _timed(lambda: _track(frame, source), repeats),
    }
    rng = np.random.default_rng(0)
    kp_s = rng.uniform(-0.6, 0.6, (15, 3)).astype(np.float32)
    kp_d = kp_s + rng.normal(0, 0.02, kp_s.shape).astype(np.float32)
    speed["kp_similarity_fit_ms"] = _timed(lambda: _similarity_points(kp_s, kp_d, source5), max(repeats, 50))
    errors = {"fixed_once_per_avatar": [], "detect_per_frame": [], "track_from_previous": []}
    previous = source
    for motion in MOTIONS:
        moved, m = _moved(frame, motion)
        truth = source5 @ m[:, :2].T + m[:, 2]
        detected = landmarks.detect(moved).landmarks
        tracked = _track(moved, previous)
        previous = tracked
        for key, found in (("fixed_once_per_avatar", source5), ("detect_per_frame", fr.points_from_landmarks68(detected)),
                           ("track_from_previous", fr.points_from_landmarks68(tracked))):
            errors[key].append(float(np.linalg.norm(found - truth, axis=1).mean()))
    agreement = {k: {"mean_px": statistics.mean(v), "max_px": max(v)} for k, v in errors.items()}
    print(speed, agreement, flush=True)
    return {"photo": photo.name, "frame": list(frame.shape), "motions_deg_dx_dy_scale": MOTIONS,
            "speed_ms": speed, "point_error_vs_truth_px_of_256_frame": agreement}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", default="art_0.png")
    parser.add_argument("--full-photo", default="full_body_1.png")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-flicker", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = {"command": "python benchmarks/enhancer_choices.py " + " ".join(sys.argv[1:]),
              "weights": "synthetic enhancer weights (seed 0)", "cpu_count": os.cpu_count(),
              "load_average_before": list(os.getloadavg())}
    report["alignment"] = alignment(_shared(args.photo), _shared(args.full_photo), args.repeats)
    if not args.skip_flicker:
        report["flicker"] = flicker(_shared(args.photo), args.frames, 0)
    report["load_average_after"] = list(os.getloadavg())
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
