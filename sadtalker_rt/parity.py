"""Parity between our outputs and a reference: the statistics every export, engine, benchmark and conformance
case reports, and the one decision of pass or fail.

``judge`` takes plain arrays (wherever they came from: onnxruntime, TensorRT, Polygraphy's comparator, a
conformance case) and a ``Tolerance`` of the stage table (``sadtalker_rt.stages``), and returns a ``Verdict``:
the statistics, the statistic the tolerance names, the bound, its reason and source, pass or fail, and why it
failed. ``judge_outputs`` does the same for a whole set of named outputs at once: names (missing and extra
outputs fail), shapes and values, one ``Verdict`` per output so that every failure is reported. Statistics
measured elsewhere (Polygraphy's ``max_absdiff``) can stand in for the computed ones (``measured``).

``max_rel`` is ``max|ours - ref| / max(1, max|ref|)``: the scale is the output's magnitude, not element by
element, so values near zero do not inflate the error. Image quality measures (``psnr``, ``ssim``,
``region_psnr``) treat the last two axes as the image plane (channels-first, as the renderer's ``frames``
(N, 3, H, W) output) with values in [0, peak]. ``check`` judges one scalar measure (a frame PSNR, a keypoint
distance) against a ``Tolerance``. Only numpy is imported.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Union

import numpy as np

from .stages import Tolerance

SSIM_WINDOW = 11          # Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


@dataclass
class Verdict:
    """One output judged against one ``Tolerance``: its statistics, the value compared, the bound and its source.
    ``problem`` says why it failed ("" when it passed)."""

    name: str
    shape: tuple
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float            # max|ours - ref| / max(1, max|ref|)
    mean_rel: float           # mean|ours - ref| / max(1, max|ref|)
    psnr_db: float | None     # image-like references only (float, values in [0, 1]); inf when equal
    metric: str               # the statistic judged: max_rel, max_abs, psnr_db, face_psnr_db or agreement
    value: float              # the statistic named by ``metric``
    limit: float
    op: str                   # "<=" or ">="
    passed: bool
    reason: str               # why this bound
    source: str               # where the bound is declared
    problem: str = ""

    def __bool__(self) -> bool:
        return self.passed

    def as_dict(self) -> dict:
        row = asdict(self)
        row["shape"] = list(self.shape)
        return row

    @classmethod
    def from_dict(cls, row: dict) -> "Verdict":
        """The verdict ``as_dict`` recorded (e.g. in engines.json)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in row.items() if k in known}
        return cls(**{**values, "shape": tuple(values["shape"])})


@dataclass
class Check:
    """One scalar measure against one ``Tolerance`` (``value`` None: not measured, a failure)."""

    metric: str
    scope: str
    value: float | None
    limit: float
    op: str
    passed: bool
    source: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def passes(value: float | None, limit: float, op: str) -> bool:
    """``value op limit``; None and NaN never pass."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return value <= limit if op == "<=" else value >= limit


def check(scope: str, value: float | None, tolerance: Tolerance) -> Check:
    return Check(tolerance.metric, scope, value, tolerance.limit, tolerance.op,
                 passes(value, tolerance.limit, tolerance.op), tolerance.source)


def judge(name: str, ours, ref, tolerance: Tolerance, ignore: np.ndarray | None = None,
          measured: dict | None = None) -> Verdict:
    """``ours`` against ``ref`` by ``tolerance``. ``ignore``: a boolean mask of elements not counted (e.g. values
    within rounding of a threshold that may land on either side of it). ``measured``: ``max_abs`` and
    ``mean_abs`` computed elsewhere (None entries are computed here). Non-finite differences fail."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape:
        return _failed_verdict(name, ref.shape, tolerance, f"shape {ours.shape} != reference {ref.shape}")
    stats = _statistics(ours, ref, ignore, measured)
    if tolerance.metric in EXTRA_MEASURES:
        stats[tolerance.metric] = EXTRA_MEASURES[tolerance.metric](ours, ref)
    value = stats.get(tolerance.metric)
    if value is None:
        raise ValueError(f"{name}: tolerance metric {tolerance.metric} does not apply to this output")
    finite = math.isfinite(stats["max_abs"])
    passed = finite and passes(value, tolerance.limit, tolerance.op)
    problem = ""
    if not finite:
        problem = "non-finite values where the reference has none (or other ones)"
    elif not passed:
        problem = _failure_reason(tolerance, value)
    return Verdict(name, tuple(ref.shape), stats["max_abs"], stats["mean_abs"], stats["p99_abs"], stats["max_rel"],
                   stats["mean_rel"], stats["psnr_db"], tolerance.metric, float(value), tolerance.limit, tolerance.op,
                   bool(passed), tolerance.reason, tolerance.source, problem)


ToleranceOf = Union[Tolerance, Callable[[str], Tolerance]]


def judge_outputs(ours: dict, ref: dict, tolerance_of: ToleranceOf, ignore: dict | None = None,
                  measured: dict | None = None) -> list[Verdict]:
    """Every output of ``ref`` judged by ``tolerance_of`` (one ``Tolerance`` for all, or name -> ``Tolerance``);
    missing outputs and outputs only in ``ours`` fail. ``ignore`` and ``measured``: per output name."""
    bound = (lambda _: tolerance_of) if isinstance(tolerance_of, Tolerance) else tolerance_of
    ignore, measured = ignore or {}, measured or {}
    verdicts = []
    for name, expected in ref.items():
        if name not in ours:
            verdicts.append(_failed_verdict(name, np.shape(expected), bound(name), "missing from our outputs"))
        else:
            verdicts.append(judge(name, ours[name], expected, bound(name), ignore.get(name), measured.get(name)))
    for name in ours:
        if name not in ref:
            verdicts.append(_failed_verdict(name, np.shape(ours[name]), bound(name), "not a reference output"))
    return verdicts


def _failed_verdict(name: str, shape: tuple, tolerance: Tolerance, problem: str) -> Verdict:
    inf = math.inf
    return Verdict(name, tuple(shape), inf, inf, inf, inf, inf, None, tolerance.metric, inf, tolerance.limit,
                   tolerance.op, False, tolerance.reason, tolerance.source, problem)


def _failure_reason(tolerance: Tolerance, value: float) -> str:
    metric, limit = tolerance.metric, tolerance.limit
    if metric == "max_rel":
        return f"relative error {value:.2e} > {limit:.0e}"
    if metric in ("psnr_db", "face_psnr_db"):
        return f"PSNR {value:.1f} dB < {limit:.0f} dB ({tolerance.source})"
    if metric == "agreement":
        return f"{(1 - value):.2%} of classes differ (> {1 - limit:.2%})"
    return f"{metric} {value:.3g} not {tolerance.op} {limit:g}"


def _statistics(ours: np.ndarray, ref: np.ndarray, ignore: np.ndarray | None = None,
                measured: dict | None = None) -> dict:
    a, b = ours.astype(np.float64), ref.astype(np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))      # equal infinities and shared NaNs are not errors
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), math.inf, diff)
    if ignore is not None:
        diff = np.where(ignore, 0.0, diff)
    finite_ref = b[np.isfinite(b)]
    scale = max(1.0, float(np.abs(finite_ref).max()) if finite_ref.size else 1.0)
    max_abs = float(diff.max()) if diff.size else 0.0
    mean_abs = float(diff.mean()) if diff.size else 0.0
    measured = {k: v for k, v in (measured or {}).items() if v is not None}
    max_abs = _not_nan(float(measured.get("max_abs", max_abs)))
    mean_abs = _not_nan(float(measured.get("mean_abs", mean_abs)))
    return {"max_abs": max_abs, "mean_abs": mean_abs,
            "p99_abs": float(np.percentile(diff, 99, method="higher")) if diff.size else 0.0,   # no inf - inf
            "max_rel": max_abs / scale, "mean_rel": mean_abs / scale,
            "psnr_db": psnr(a, b) if _image_like(ref) else None}


def _not_nan(value: float) -> float:
    return math.inf if math.isnan(value) else value


def face_psnr(ours, ref) -> float:
    """PSNR of faces in [-1, 1] as users see them: clipped and mapped to [0, 1]."""
    shown = [(np.clip(np.asarray(x, np.float64), -1, 1) + 1) / 2 for x in (ours, ref)]
    return psnr(*shown)


def agreement(ours, ref) -> float:
    """The share of equal elements: class maps (argmax outputs), where near-ties may flip."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    return float(np.mean(ours == ref)) if ref.size else 1.0


# Statistics computed only when a tolerance names them.
EXTRA_MEASURES = {"face_psnr_db": face_psnr, "agreement": agreement}


def _image_like(ref: np.ndarray) -> bool:
    if not np.issubdtype(ref.dtype, np.floating) or ref.ndim < 2 or ref.size == 0:
        return False
    return bool(np.isfinite(ref).all() and ref.min() >= 0.0 and ref.max() <= 1.0)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements; inf when equal, -inf when either is non-finite."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr of arrays of different shapes {a.shape} and {b.shape}")
    with np.errstate(invalid="ignore", over="ignore"):
        mse = float(np.mean((a - b) ** 2))
    if not math.isfinite(mse):
        return -math.inf
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def region_psnr(a: np.ndarray, b: np.ndarray, box: tuple[int, int, int, int], peak: float = 1.0) -> float:
    """PSNR inside ``box = (x1, y1, x2, y2)`` (pixels, end exclusive) of the last two axes, e.g. the mouth."""
    x1, y1, x2, y2 = (int(v) for v in box)
    if not (0 <= x1 < x2 and 0 <= y1 < y2):
        raise ValueError(f"empty or negative box {box}; expected (x1, y1, x2, y2) with x1 < x2 and y1 < y2")
    return psnr(np.asarray(a)[..., y1:y2, x1:x2], np.asarray(b)[..., y1:y2, x1:x2], peak)


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    window = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return window / window.sum()


def _filter_valid(images: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of (N, H, W) images with a 1-D window along H and then W."""
    rows = np.lib.stride_tricks.sliding_window_view(images, window.size, axis=1) @ window
    return np.lib.stride_tricks.sliding_window_view(rows, window.size, axis=2) @ window


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    """Mean structural similarity (Wang, Bovik, Sheikh and Simoncelli 2004), in plain numpy.

    Each grey image or channel (the last two axes; leading axes such as batch and channel are separate
    images) is filtered with an 11x11 Gaussian window of sigma 1.5 ('valid' region only, as the authors'
    reference code), with C1 = (0.01 * peak)^2 and C2 = (0.03 * peak)^2. The result is the mean of the
    SSIM map over all pixels and images: 1.0 for identical images. Images must be at least 11x11.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"ssim needs two images of one shape (..., H, W); got {a.shape} and {b.shape}")
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}; got {a.shape[-2:]}")
    a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    window = _gaussian_window()
    c1, c2 = (SSIM_K1 * peak) ** 2, (SSIM_K2 * peak) ** 2
    mu_a, mu_b = _filter_valid(a, window), _filter_valid(b, window)
    var_a = _filter_valid(a * a, window) - mu_a * mu_a
    var_b = _filter_valid(b * b, window) - mu_b * mu_b
    cov = _filter_valid(a * b, window) - mu_a * mu_b
    numerator = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
    denominator = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return float(np.mean(numerator / denominator))


def format_table(verdicts: list[Verdict]) -> str:
    """One ✓/✗ line per output with its statistics, and the reason of each failure."""
    if not verdicts:
        return "(no outputs)"
    width = max(len(v.name) for v in verdicts)
    return "\n".join(_format_line(v, width) for v in verdicts)


def _format_line(v: Verdict, width: int) -> str:
    mark = "✓" if v.passed else "✗"
    head = f"{mark} {v.name:<{width}}  {str(tuple(v.shape)):<20}"
    if not math.isfinite(v.max_abs) and v.problem:
        return f"{head}  {v.problem}"
    line = (f"{head}  max_abs {v.max_abs:.2e}  mean_abs {v.mean_abs:.2e}  p99_abs {v.p99_abs:.2e}"
            f"  max_rel {v.max_rel:.2e}")
    if v.psnr_db is not None:
        line += f"  PSNR {v.psnr_db:.1f} dB"
    line += f"  ({v.metric} {v.op} {v.limit:g})"
    return line if v.passed else f"{line}  {v.problem}"
