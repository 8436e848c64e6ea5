"""Parity statistics between our outputs and a reference: the numbers every export, engine and benchmark reports.

``compare`` checks a whole set of named outputs at once: names (missing and extra outputs fail), shapes and
values, and returns one ``Comparison`` per output so that every failure is reported, not just the first.
An output passes when ``max|ours - ref| <= atol + rtol * max(1, max|ref|)``: the tolerance scales with the
output's magnitude, not element by element, so values near zero do not inflate the error.

Image quality measures (``psnr``, ``ssim``, ``region_psnr``) treat the last two axes as the image plane
(channels-first, as the renderer's ``frames`` (N, 3, H, W) output) with values in [0, peak].

``judge`` / ``judge_outputs`` decide pass or fail for export validation, the bench and conformance alike: they
take plain arrays (wherever they came from: onnxruntime, TensorRT, Polygraphy's comparator, a conformance
case) and a ``Tolerance`` of the stage table (``sadtalker_rt.stages``), and return ``Verdict`` objects carrying
the statistics, the threshold used and its source. ``check`` does the same for one scalar measure (a frame
PSNR, a keypoint distance) against a ``Tolerance``. Only numpy is imported.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .stages import Tolerance

SSIM_WINDOW = 11          # Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


@dataclass
class Comparison:
    """One output's verdict and the evidence for it. ``problem`` says why it failed ("" when it passed)."""

    name: str
    shape: tuple
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float            # max|ours - ref| / max(1, max|ref|)
    psnr_db: float | None     # image-like references only (float, values in [0, 1]); inf when equal
    passed: bool
    atol: float
    rtol: float
    problem: str = ""

    def __bool__(self) -> bool:
        return self.passed

    def as_dict(self) -> dict:
        row = asdict(self)
        row["shape"] = list(self.shape)
        return row


@dataclass
class Verdict:
    """One output judged against one ``Tolerance``: its statistics, the value compared, the bound and its source."""

    name: str
    shape: tuple
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float            # max|ours - ref| / max(1, max|ref|)
    mean_rel: float           # mean|ours - ref| / max(1, max|ref|)
    psnr_db: float | None     # image-like references only
    metric: str               # max_rel, max_abs or psnr_db
    value: float              # the statistic named by ``metric``
    limit: float
    op: str                   # "<=" or ">="
    passed: bool
    reason: str               # why this bound
    source: str               # where the bound is declared
    problem: str = ""         # why it failed ("" when it passed)

    def __bool__(self) -> bool:
        return self.passed

    def as_dict(self) -> dict:
        row = asdict(self)
        row["shape"] = list(self.shape)
        return row


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


def judge(name: str, ours, ref, tolerance: Tolerance, ignore: np.ndarray | None = None) -> Verdict:
    """``ours`` against ``ref`` by ``tolerance``. ``ignore``: a boolean mask of elements not counted (e.g. values
    within rounding of a threshold that may land on either side of it). Non-finite differences fail."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape:
        return _failed_verdict(name, ref.shape, tolerance, f"shape {ours.shape} != reference {ref.shape}")
    stats = _statistics(ours, ref, ignore)
    value = stats[tolerance.metric] if tolerance.metric in stats else None
    if value is None:
        raise ValueError(f"{name}: tolerance metric {tolerance.metric} does not apply to this output")
    passed = math.isfinite(stats["max_abs"]) and passes(value, tolerance.limit, tolerance.op)
    problem = ""
    if not math.isfinite(stats["max_abs"]):
        problem = "non-finite values where the reference has none (or other ones)"
    elif not passed:
        problem = f"{tolerance.metric} {value:.3g} not {tolerance.op} {tolerance.limit:g}"
    return Verdict(name, tuple(ref.shape), stats["max_abs"], stats["mean_abs"], stats["p99_abs"], stats["max_rel"],
                   stats["mean_rel"], stats["psnr_db"], tolerance.metric, float(value), tolerance.limit, tolerance.op,
                   bool(passed), tolerance.reason, tolerance.source, problem)


def judge_outputs(ours: dict, ref: dict, tolerance_of, ignore: dict | None = None) -> list[Verdict]:
    """Every output of ``ref`` judged by ``tolerance_of(name)``; missing outputs and outputs only in ``ours`` fail."""
    ignore = ignore or {}
    verdicts = []
    for name, expected in ref.items():
        if name not in ours:
            verdicts.append(_failed_verdict(name, np.shape(expected), tolerance_of(name), "missing from our outputs"))
        else:
            verdicts.append(judge(name, ours[name], expected, tolerance_of(name), ignore.get(name)))
    for name in ours:
        if name not in ref:
            verdicts.append(_failed_verdict(name, np.shape(ours[name]), tolerance_of(name), "not a reference output"))
    return verdicts


def _failed_verdict(name: str, shape: tuple, tolerance: Tolerance, problem: str) -> Verdict:
    inf = math.inf
    return Verdict(name, tuple(shape), inf, inf, inf, inf, inf, None, tolerance.metric, inf, tolerance.limit,
                   tolerance.op, False, tolerance.reason, tolerance.source, problem)


def _statistics(ours: np.ndarray, ref: np.ndarray, ignore: np.ndarray | None = None) -> dict:
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
    return {"max_abs": max_abs, "mean_abs": mean_abs,
            "p99_abs": float(np.percentile(diff, 99, method="higher")) if diff.size else 0.0,   # no inf - inf
            "max_rel": max_abs / scale, "mean_rel": mean_abs / scale,
            "psnr_db": psnr(a, b) if _image_like(ref) else None}


def compare(ours: dict, ref: dict, atol: float = 0.0, rtol: float = 1e-4,
            per_output_tolerances: dict[str, tuple[float, float]] | None = None) -> list[Comparison]:
    """Compare every output of ``ref`` with ``ours``; outputs only in ``ours`` are failures too.

    Args:
        ours: name -> array produced by the graph under test.
        ref: name -> reference array.
        atol, rtol: default bound ``atol + rtol * max(1, max|ref|)`` on the largest absolute difference.
        per_output_tolerances: name -> (atol, rtol) for outputs that need their own bound.
    """
    per_output_tolerances = per_output_tolerances or {}
    results = []
    for name, expected in ref.items():
        tol_atol, tol_rtol = per_output_tolerances.get(name, (atol, rtol))
        if name not in ours:
            results.append(_failure(name, np.shape(expected), tol_atol, tol_rtol, "missing from our outputs"))
            continue
        results.append(_compare_one(name, np.asarray(ours[name]), np.asarray(expected), tol_atol, tol_rtol))
    for name in ours:
        if name not in ref:
            tol_atol, tol_rtol = per_output_tolerances.get(name, (atol, rtol))
            results.append(_failure(name, np.shape(ours[name]), tol_atol, tol_rtol, "not a reference output"))
    return results


def _failure(name: str, shape: tuple, atol: float, rtol: float, problem: str) -> Comparison:
    inf = math.inf
    return Comparison(name, tuple(shape), inf, inf, inf, inf, None, False, atol, rtol, problem)


def _compare_one(name: str, ours: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> Comparison:
    if ours.shape != ref.shape:
        return _failure(name, ref.shape, atol, rtol, f"shape {ours.shape} != reference {ref.shape}")
    stats = _statistics(ours, ref)
    scale = max(1.0, float(np.abs(ref[np.isfinite(ref)]).max()) if np.isfinite(ref).any() else 1.0)
    max_abs = stats["max_abs"]
    bound = atol + rtol * scale
    passed = max_abs <= bound
    if passed:
        problem = ""
    elif not math.isfinite(max_abs):
        problem = "non-finite values where the reference has none (or other ones)"
    else:
        problem = f"max |diff| {max_abs:.3e} > {bound:.3e} (atol {atol:g} + rtol {rtol:g} * {scale:.3g})"
    return Comparison(name=name, shape=tuple(ref.shape), max_abs=max_abs, mean_abs=stats["mean_abs"],
                      p99_abs=stats["p99_abs"], max_rel=stats["max_rel"], psnr_db=stats["psnr_db"],
                      passed=passed, atol=atol, rtol=rtol, problem=problem)


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


def format_table(comparisons: list[Comparison]) -> str:
    """One ✓/✗ line per output with its statistics, and the reason of each failure."""
    if not comparisons:
        return "(no outputs)"
    width = max(len(c.name) for c in comparisons)
    return "\n".join(_format_line(c, width) for c in comparisons)


def _format_line(c: Comparison, width: int) -> str:
    mark = "✓" if c.passed else "✗"
    head = f"{mark} {c.name:<{width}}  {str(tuple(c.shape)):<20}"
    if not math.isfinite(c.max_abs) and c.problem:
        return f"{head}  {c.problem}"
    line = (f"{head}  max_abs {c.max_abs:.2e}  mean_abs {c.mean_abs:.2e}  p99_abs {c.p99_abs:.2e}"
            f"  max_rel {c.max_rel:.2e}")
    if c.psnr_db is not None:
        line += f"  PSNR {c.psnr_db:.1f} dB"
    line += f"  (atol {c.atol:g}, rtol {c.rtol:g})"
    return line if c.passed else f"{line}  {c.problem}"


def from_polygraphy(stats, ours: dict, ref: dict, atol: float = 0.0, rtol: float = 1e-4,
                    per_output_tolerances: dict[str, tuple[float, float]] | None = None) -> list[Comparison]:
    """Polygraphy's per-output results of one iteration (name -> ``OutputCompareResult``, from
    ``Comparator.compare_accuracy``) as ``Comparison`` rows judged by this module's rule.

    Polygraphy's ``max_absdiff`` and ``mean_absdiff`` are taken as they are; the bound
    ``atol + rtol * max(1, max|ref|)``, the 99th percentile and PSNR are computed here from the arrays.
    Outputs Polygraphy did not compare (missing, extra, other shape) fail as ``compare`` says why.
    """
    per_output_tolerances = per_output_tolerances or {}
    results = []
    for result in compare(ours, ref, atol, rtol, per_output_tolerances):
        stat = stats.get(result.name) if hasattr(stats, "get") else None
        if result.problem.startswith(("missing", "not a", "shape")) or not hasattr(stat, "max_absdiff"):
            results.append(result)
            continue
        tol_atol, tol_rtol = per_output_tolerances.get(result.name, (atol, rtol))
        expected = np.asarray(ref[result.name], dtype=np.float64)
        finite_ref = expected[np.isfinite(expected)]
        scale = max(1.0, float(np.abs(finite_ref).max()) if finite_ref.size else 1.0)
        max_abs = float(stat.max_absdiff)
        max_abs = math.inf if math.isnan(max_abs) else max_abs
        bound = tol_atol + tol_rtol * scale
        passed = max_abs <= bound
        if passed:
            problem = ""
        elif not math.isfinite(max_abs):
            problem = "non-finite values where the reference has none (or other ones)"
        else:
            problem = f"max |diff| {max_abs:.3e} > {bound:.3e} (atol {tol_atol:g} + rtol {tol_rtol:g} * {scale:.3g})"
        mean_abs = float(stat.mean_absdiff) if stat.mean_absdiff is not None else result.mean_abs
        results.append(Comparison(result.name, result.shape, max_abs, mean_abs, result.p99_abs, max_abs / scale,
                                  result.psnr_db, passed, tol_atol, tol_rtol, problem))
    return results
