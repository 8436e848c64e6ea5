"""Parity measures of a bench run: per-stage outputs judged by the stage table's tolerances, frames, mouth box,
keypoints and head pose recovered from them. Every verdict is sadtalker_rt.parity's."""
from __future__ import annotations

import math

import numpy as np

from ..errors import SadTalkerError
from ..stages import STAGES, Tolerance

# the official crop puts the mouth (x 30-70 %, y 62-90 % of the side).
FIXED_MOUTH_BOX = (0.30, 0.62, 0.70, 0.90)
MOUTH_MARGIN = 0.35                       # landmark box grown by this share of its size on each side (head motion)
MOUTH_POINTS = slice(48, 68)              # iBUG 68-point layout: outer and inner lips


def _tolerance(metric: str, limit: float, reason: str) -> Tolerance:
    return Tolerance(metric, limit, reason, "bench.END_TO_END_TOLERANCES")


# End-to-end bounds of the bench (per-stage bounds are the stage table's, ``Stage.tolerance``).
END_TO_END_TOLERANCES: dict[str, Tolerance] = {
    "frame_psnr_db": _tolerance(
        "psnr_db", 40.0, "worst frame of the end-to-end run against the reference; ~1 % RMS error, invisible at a glance"),
    "frame_ssim": _tolerance(
        "ssim", 0.98, "worst frame; structure rather than energy: blur, ringing or a shifted face lower it"),
    "mouth_psnr_db": _tolerance(
        "psnr_db", 40.0, "worst frame inside the mouth box; the box is ~10 % of the frame, so an error there costs "
                         "~10 dB less whole-frame PSNR than it costs here: a frozen or wrong mouth fails here first"),
    "kp_max_abs": _tolerance(
        "max_abs", 5e-3, "keypoints span [-1, 1] across the frame: 5e-3 is ~0.6 px at 256 and a sixth of a voxel of "
                         "the 64-wide motion volume; FP32 mapping graphs differ by ~1e-6"),
    "head_pose_deg": _tolerance(
        "max_abs", 0.5, "largest yaw, pitch or roll difference, in degrees; below what a viewer notices, far above "
                        "FP32 noise (~1e-4 deg)"),
}


def thresholds_for_report(stages: tuple[str, ...], precisions: set[str]) -> dict:
    """Every bound a run can apply, with its reason and source: per stage output and precision, and end to end."""
    out = {}
    for stage in stages:
        for precision in sorted(precisions):
            for tensor in STAGES[stage].outputs:
                t = STAGES[stage].tolerance(precision, tensor.name)
                out[f"{stage}.{tensor.name}.{precision}"] = _threshold_row(t)
    for key, t in END_TO_END_TOLERANCES.items():
        out[key] = _threshold_row(t)
    return out


def _threshold_row(t: Tolerance) -> dict:
    return {"metric": t.metric, "limit": t.limit, "op": t.op, "reason": t.reason, "source": t.source}


HEAD_POSE_METHOD = ("rotation fitted by least squares (Kabsch) from the reference kp_canonical to each frame's "
                    "kp_driving, decomposed as R = Rx(pitch) Ry(yaw) Rz(roll) like the mapping stage; the expression "
                    "offsets are part of the residual and are the same for matching backends")


def kabsch_rotation(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The rotation R (3, 3) that best maps the centred rows of ``source`` (K, 3) onto those of ``target``
    (target ~ source R^T), by the Kabsch algorithm."""
    a = source - source.mean(axis=0)
    b = target - target.mean(axis=0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    return vt.T @ np.diag([1.0, 1.0, d]) @ u.T


def euler_degrees(rotation: np.ndarray) -> np.ndarray:
    """(yaw, pitch, roll) in degrees of R = Rx(pitch) Ry(yaw) Rz(roll), the mapping stage's convention."""
    r = rotation
    yaw = math.asin(max(-1.0, min(1.0, r[0, 2])))
    pitch = math.atan2(-r[1, 2], r[2, 2])
    roll = math.atan2(-r[0, 1], r[0, 0])
    return np.degrees([yaw, pitch, roll])


def head_pose_delta(kp_canonical: np.ndarray, kp: np.ndarray, kp_ref: np.ndarray) -> dict:
    """Largest per-frame yaw/pitch/roll difference (degrees) between two keypoint sequences (N, K, 3), and the
    largest angle of the relative rotation."""
    canonical = np.asarray(kp_canonical, np.float64).reshape(-1, 3)
    worst = np.zeros(3)
    angle = 0.0
    for ours, ref in zip(np.asarray(kp, np.float64), np.asarray(kp_ref, np.float64)):
        r_ours, r_ref = kabsch_rotation(canonical, ours), kabsch_rotation(canonical, ref)
        diff = np.abs(euler_degrees(r_ours) - euler_degrees(r_ref))
        worst = np.maximum(worst, np.minimum(diff, 360.0 - diff))
        cos = (np.trace(r_ours @ r_ref.T) - 1.0) / 2.0
        angle = max(angle, math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
    return {"yaw": float(worst[0]), "pitch": float(worst[1]), "roll": float(worst[2]), "max": float(worst.max()),
            "rotation": angle}


def fixed_mouth_box(size: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = FIXED_MOUTH_BOX
    return int(round(x1 * size)), int(round(y1 * size)), int(round(x2 * size)), int(round(y2 * size))


def mouth_box(frame: np.ndarray | None, size: int, mode: str = "landmarks") -> dict:
    """(x1, y1, x2, y2) of the mouth in the S x S renderer frame: the lip landmarks of the source frame grown by
    MOUTH_MARGIN on each side, or the fixed lower-middle box where landmarks are not used or not found."""
    fixed = {"box": list(fixed_mouth_box(size)), "source": "fixed",
             "description": "fixed lower-middle box: x {:.0%}-{:.0%}, y {:.0%}-{:.0%} of the frame".format(
                 FIXED_MOUTH_BOX[0], FIXED_MOUTH_BOX[2], FIXED_MOUTH_BOX[1], FIXED_MOUTH_BOX[3])}
    if mode == "fixed" or frame is None:
        return fixed
    from ..runtime import landmarks

    try:
        points = landmarks.detect(frame, name="the source frame").landmarks[MOUTH_POINTS]
    except SadTalkerError:
        fixed["description"] += " (no face found in the source frame)"
        return fixed
    (x1, y1), (x2, y2) = points.min(axis=0), points.max(axis=0)
    mx, my = MOUTH_MARGIN * (x2 - x1), MOUTH_MARGIN * (y2 - y1)
    box = [max(0, int(math.floor(x1 - mx))), max(0, int(math.floor(y1 - my))),
           min(size, int(math.ceil(x2 + mx))), min(size, int(math.ceil(y2 + my)))]
    if box[2] - box[0] < 4 or box[3] - box[1] < 4:
        return fixed
    return {"box": box, "source": "landmarks",
            "description": f"dlib lip landmarks (points 48-67) of the source frame, grown by {MOUTH_MARGIN:.0%} "
                           "of their extent on each side"}


def stage_parity(stage: str, precision: str, ours: dict, ref: dict, batch: int) -> tuple[dict, list[dict]]:
    """Every output of one stage call against the reference, judged by the stage table's tolerance for the
    precision the stage computes in: statistics and one check per output."""
    from ..parity import judge_outputs

    rows, checks = [], []
    spec = STAGES[stage]
    for v in judge_outputs(ours, ref, lambda name: spec.tolerance(precision, name)):
        rows.append({"name": v.name, "shape": list(v.shape), "max_abs": v.max_abs, "max_rel": v.max_rel,
                     "mean_abs": v.mean_abs, "mean_rel": v.mean_rel, "p99_abs": v.p99_abs, "psnr_db": v.psnr_db,
                     "metric": v.metric, "limit": v.limit, "op": v.op, "source": v.source, "passed": v.passed})
        checks.append({"metric": v.metric, "scope": f"{stage}.{v.name}", "value": v.value, "limit": v.limit,
                       "op": v.op, "source": v.source, "passed": v.passed})
    return {"batch": batch, "precision": precision, "outputs": rows}, checks


def _check(name: str, value) -> dict:
    from ..parity import check

    row = check("end_to_end", value, END_TO_END_TOLERANCES[name]).as_dict()
    row["metric"] = name
    return row


def frame_parity(frames: np.ndarray, ref: np.ndarray, kp: np.ndarray, kp_ref: np.ndarray, kp_canonical: np.ndarray,
                 box: list[int]) -> tuple[dict, list[dict]]:
    """End-to-end frames (N, 3, S, S) and keypoints (N, K, 3) against the reference run's."""
    from ..parity import psnr, region_psnr, ssim

    if frames.shape != ref.shape or kp.shape != kp_ref.shape:
        raise ValueError(f"end-to-end outputs {frames.shape} / {kp.shape} do not match the reference "
                         f"{ref.shape} / {kp_ref.shape}")
    frame_psnr = [psnr(a, b) for a, b in zip(frames, ref)]
    frame_ssim = [ssim(a, b) for a, b in zip(frames, ref)]
    mouth = [region_psnr(a, b, tuple(box)) for a, b in zip(frames, ref)]
    kp_max = float(np.abs(kp.astype(np.float64) - kp_ref).max())
    pose = head_pose_delta(kp_canonical, kp, kp_ref)
    result = {
        "frames": int(frames.shape[0]),
        "frame_psnr_db": {"min": float(min(frame_psnr)), "mean": _mean_db(frame_psnr)},
        "frame_ssim": {"min": float(min(frame_ssim)), "mean": float(np.mean(frame_ssim))},
        "mouth_psnr_db": {"min": float(min(mouth)), "mean": _mean_db(mouth)},
        "kp_max_abs": kp_max,
        "head_pose_deg": pose,
    }
    checks = [
        _check("frame_psnr_db", result["frame_psnr_db"]["min"]),
        _check("frame_ssim", result["frame_ssim"]["min"]),
        _check("mouth_psnr_db", result["mouth_psnr_db"]["min"]),
        _check("kp_max_abs", kp_max),
        _check("head_pose_deg", pose["max"]),
    ]
    return result, checks


def _mean_db(values: list[float]) -> float:
    """Mean of per-frame PSNR values; infinite when any frame is identical to its reference."""
    return float(np.mean(values))
