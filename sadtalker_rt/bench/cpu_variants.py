"""Reduced-precision CPU variants of the renderer: real renderer inputs, interleaved timing, and the gates.

Timing on a shared machine only means something interleaved: every round runs each variant once on the
same inputs (A B A B ...), the ratio against the baseline is taken per round, and the median ratio with its
min-max spread and the load average are reported. The gates decide whether a variant may be a default:

    frame PSNR >= 40 dB and mouth-region PSNR >= 38 dB on every case (a photo with a speech file) against
    FP32, and keypoint and head-pose deltas within the bench's limits.

Only numpy and the stdlib at import; the runtime is imported inside the functions.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..stages import Tolerance
from .metrics import END_TO_END_TOLERANCES

FRAME_PSNR_DB = 40.0
MOUTH_PSNR_DB = 38.0       # the mouth gate for reduced-precision CPU paths
KP_MAX_ABS = END_TO_END_TOLERANCES["kp_max_abs"].limit
HEAD_POSE_DEG = END_TO_END_TOLERANCES["head_pose_deg"].limit

# CaseParity field -> (its name in failures, the gate); judged by sadtalker_rt.parity.check
GATES = {
    "frame_psnr_db": ("frame PSNR dB", Tolerance("psnr_db", FRAME_PSNR_DB, "every frame against FP32",
                                                 "bench.cpu_variants")),
    "mouth_psnr_db": ("mouth PSNR dB", Tolerance("psnr_db", MOUTH_PSNR_DB, "the mouth box against FP32: the "
                                                 "issue's gate for reduced-precision CPU paths", "bench.cpu_variants")),
    "kp_max_abs": ("keypoint delta", END_TO_END_TOLERANCES["kp_max_abs"]),
    "head_pose_deg": ("head pose delta deg", END_TO_END_TOLERANCES["head_pose_deg"]),
}


@dataclass
class CaseParity:
    case: str
    frame_psnr_db: float
    mouth_psnr_db: float
    kp_max_abs: float = 0.0
    head_pose_deg: float = 0.0


@dataclass
class GateResult:
    passed: bool
    failures: list[str] = field(default_factory=list)
    worst: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def gate(cases: Sequence[CaseParity]) -> GateResult:
    """Pass only when every case clears every gate; each miss is named with its case and value."""
    from ..parity import check

    if not cases:
        return GateResult(False, ["no cases measured"])
    failures = []
    for c in cases:
        for name, (what, tolerance) in GATES.items():
            value = getattr(c, name)
            if not check(c.case, value, tolerance).passed:
                failures.append(f"{c.case}: {what} {value:.4g} {'<' if tolerance.op == '>=' else '>'} "
                                f"{tolerance.limit:g}")
    worst = {name: (min if tolerance.op == ">=" else max)(getattr(c, name) for c in cases)
             for name, (_, tolerance) in GATES.items()}
    return GateResult(not failures, failures, worst)


# ------------------------------------------------------------------------------------------- inputs

@dataclass
class RendererCase:
    name: str
    feeds: dict                     # renderer inputs, batch 1
    mouth_box: list                 # (x1, y1, x2, y2) in the S x S frame
    kp_driving: np.ndarray          # (1, K, 3)
    kp_canonical: np.ndarray


def renderer_cases(head, photos: Sequence[Path], speeches: Sequence[Path], frame: int = 5,
                   preprocess: str = "crop", seed: int = 0) -> list[RendererCase]:
    """One renderer input per (photo, speech) pair: the avatar of the photo driven by frame ``frame`` of the speech
    (mid-utterance, mouth open or moving), made by ``head``'s own FP32 stages."""
    from .metrics import mouth_box
    from ..runtime.coeffs import target_windows
    from ..runtime.pipeline import Options
    from ..stages import FPS, is_full, mapping_stage

    cases = []
    for photo in photos:
        avatar = head.prepare_avatar(str(photo), preprocess=preprocess)
        box = mouth_box(avatar.source_frame, head.size)["box"]
        for speech in speeches:
            motion = head.motion(avatar, str(speech), Options(seed=seed, duration=(frame + 3) / FPS))
            targets = target_windows(motion.coeffs, avatar.source_coeffs, full=is_full(preprocess), still=False,
                                     expression_scale=1.0)
            index = min(frame, len(targets) - 1)
            kp = head.infer(mapping_stage(preprocess), kp_canonical=avatar.features["kp_canonical"],
                            semantics=targets[index:index + 1])["kp"]
            feeds = {"feature_3d": avatar.features["feature_3d"],
                     "source_compressed": avatar.features["source_compressed"],
                     "kp_source": avatar.features["kp_source"], "kp_driving": kp}
            cases.append(RendererCase(f"{Path(photo).stem}+{Path(speech).stem}", feeds, box, kp,
                                      avatar.features["kp_canonical"]))
    return cases


def case_parity(case: RendererCase, frames: np.ndarray, reference: np.ndarray,
                kp_driving: np.ndarray | None = None) -> CaseParity:
    """A renderer variant's frame against the FP32 one; keypoints compared when the variant made its own."""
    from ..parity import psnr, region_psnr
    from .metrics import head_pose_delta

    kp_delta, pose_delta = 0.0, 0.0
    if kp_driving is not None:
        kp_delta = float(np.abs(kp_driving.astype(np.float64) - case.kp_driving).max())
        pose_delta = head_pose_delta(case.kp_canonical, kp_driving, case.kp_driving)["max"]
    return CaseParity(case.name, psnr(frames, reference), region_psnr(frames, reference, tuple(case.mouth_box)),
                      kp_delta, pose_delta)


# ------------------------------------------------------------------------------------------- timing

def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def interleaved(runs: Mapping[str, Callable[[], object]], rounds: int, baseline: str,
                clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time each run once per round, in turn; ratios are baseline time / run time within each round."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    loads = [load_average()]
    for _ in range(rounds):
        for name, run in runs.items():
            start = clock()
            run()
            seconds[name].append(clock() - start)
        loads.append(load_average())
    result = {"rounds": rounds, "baseline": baseline, "load_average_per_round": loads, "runs": {}}
    for name, values in seconds.items():
        ratios = [b / v for b, v in zip(seconds[baseline], values)]
        result["runs"][name] = {"seconds": [round(v, 3) for v in values],
                                "median_s": round(statistics.median(values), 3),
                                "speedup_median": round(statistics.median(ratios), 3),
                                "speedup_min": round(min(ratios), 3), "speedup_max": round(max(ratios), 3)}
    return result
