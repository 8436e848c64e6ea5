"""The orchestration of one bench run.

1. The baseline (the official loop, float32; on CUDA with TF32 off for this run) runs end to end once and
   records every stage's inputs and outputs: the reference inputs every backend is fed and the reference
   outputs parity is measured against.
2. Each backend is opened (exports or engine builds included: ``setup_s``), warmed up on the reference inputs
   at every batch it will be timed at, judged stage by stage on them, and run end to end once for frame,
   mouth, keypoint and head-pose parity (FP16 graphs on a CPU through ``EmulatedFp16Backend``).
3. Timing, interleaved: ``rounds`` rounds; in each round, stage after stage, the backends take turns
   (official, A, B, the same order every time), each a burst of at least ``repeats`` calls per batch lasting
   at least ``min_stage_s`` on the stage's reference inputs; then each runs the utterance end to end once.
   Background load therefore lands on all backends alike, even on stages of milliseconds. A backend's ratio to
   the official loop is computed within each round and reported as the median of the per-round ratios with
   their min and max.
"""
from __future__ import annotations

import contextlib
import gc
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from .. import __version__
from ..errors import SadTalkerError, UsageError
from ..stages import BATCH, DEFAULT_PIPELINE, FRAMES, STAGES, mapping_stage
from .backends import (OPENERS, BackendSkipped, BenchContext, Opened, Opener, one_line, prefixed)
from .config import (FPS, OFFICIAL_BATCH, POSE_CHUNK, RUNTIMES, SAMPLE_RATE, SAMPLES_PER_FRAME, BenchConfig,
                     default_backends, expand_backends)
from .instrument import Call, CallLog, InstrumentedBackend, call_batch, summarize
from .metrics import HEAD_POSE_METHOD, frame_parity, mouth_box, stage_parity, thresholds_for_report
from .probes import MIB, LoadMonitor, MemoryProbe, environment
from .report import SCHEMA_VERSION



@dataclass
class Reference:
    """What the baseline's parity run recorded: stage inputs and outputs, frames and keypoints."""

    log: CallLog
    frames: np.ndarray
    kp_driving: np.ndarray
    kp_canonical: np.ndarray
    mouth: dict

    def feeds(self, stage: str) -> tuple[dict, dict]:
        """The first call's (feeds, outputs) of ``stage``: from the end-to-end run, else avatar preparation."""
        for phase in ("parity-generate", "parity-prepare"):
            if (phase, stage) in self.log.first:
                return self.log.first[(phase, stage)]
        raise KeyError(stage)

    def has(self, stage: str) -> bool:
        return any((phase, stage) in self.log.first for phase in ("parity-generate", "parity-prepare"))

    def batch_feeds(self, stage: str, batch: int) -> dict:
        """The stage's inputs with the dynamic batch axis filled to ``batch`` from the run's own values."""
        feeds, _ = self.feeds(stage)
        out = dict(feeds)
        for tensor in STAGES[stage].inputs:
            if BATCH not in tensor.shape:
                continue
            pool = self.log.stacked("parity-generate", stage, tensor.name)
            pool = np.asarray(feeds[tensor.name]) if pool is None else pool
            reps = -(-batch // pool.shape[0])
            out[tensor.name] = np.ascontiguousarray(np.concatenate([pool] * reps)[:batch])
        return out

    def timing_feeds(self, stage: str, batch: int | None) -> dict:
        return self.batch_feeds(stage, batch) if batch is not None else self.feeds(stage)[0]


@dataclass
class Contender:
    """One backend through the run: its report entry, its instrumented backend, its per-round end-to-end runs."""

    name: str
    entry: dict
    opened: Opened | None = None
    instrumented: InstrumentedBackend | None = None
    avatar: object = None
    prepare_s: float | None = None                # photo preparation of its parity run (not in the wall time)
    e2e_rounds: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.entry["status"] == "ok"


def resolve_device(device: str) -> str:
    if device != "auto":
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--device cuda, but torch sees no CUDA device.")
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def timing_plan(stages: tuple[str, ...], batch_sizes: tuple[int, ...], official: bool) -> list[tuple[str, int | None]]:
    """(stage, batch) pairs timed in every round: per-frame stages at each batch (the baseline: the official
    batch), the others once (batch None: their reference call as recorded)."""
    plan = []
    for stage in stages:
        if STAGES[stage].rate == "frame":
            plan += [(stage, b) for b in ((OFFICIAL_BATCH,) if official else batch_sizes)]
        else:
            plan.append((stage, None))
    return plan


@contextlib.contextmanager
def _torch_threads(threads: int):
    """torch's intra-op threads for the run (the official loop and the torch backends), restored after."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_bench(config: BenchConfig, progress: Callable[[str, int, int], None] | None = None,
              openers: Mapping[str, Opener] | None = None, log: Callable[[str], None] | None = None,
              command: str | None = None) -> dict:
    """Measure the official baseline and every backend, interleaved; return the report (see ``SCHEMA``).

    ``openers`` adds or replaces backend openers by name (``"official"`` is the baseline); tests use it for
    stand-ins. ``command`` is the command line that made the report, recorded in it.
    """
    from .. import media

    config.validate()
    progress = progress or (lambda stage, done, total: None)
    say = log or (lambda line: None)
    table = {**OPENERS, **(openers or {})}
    device = resolve_device(config.device)
    known = tuple(n for n in table if n != "official")
    names = expand_backends(config.backends, known) if config.backends else default_backends(device, config.engines_dir)
    image = Path(config.image) if config.image is not None else media.demo_image()
    audio = Path(config.audio) if config.audio is not None else media.demo_audio()
    samples_per_frame = SAMPLES_PER_FRAME
    wav = media.load_audio(audio)[: config.frames * samples_per_frame]
    if len(wav) < samples_per_frame:
        raise UsageError(f"{audio} is shorter than one video frame.")
    wav = wav[: (len(wav) // samples_per_frame) * samples_per_frame]
    unused_mapping = {"mapping", "mapping_full"} - {mapping_stage(config.preprocess)}
    stages = tuple(s for s in DEFAULT_PIPELINE if s not in unused_mapping)
    memory = MemoryProbe()
    load = LoadMonitor()
    with tempfile.TemporaryDirectory(prefix="sadtalker-rt-bench-") as tmp, _torch_threads(config.threads):
        ctx = BenchContext(config, device, Path(tmp), stages, progress, config.export_source)
        say(f"official baseline: float32 eager PyTorch, whole generator per call, batch {OFFICIAL_BATCH}")
        official, reference = _open_baseline(ctx, table["official"], image, wav, memory)
        stages = ctx.stages
        if ctx.export_source is None:       # exports validate on the avatar's own source frame
            ctx.export_source = np.asarray(reference.feeds("source_encoder")[0]["source_image"])
        contenders = [official]
        for name in names:
            say(f"{name}: setup and parity ...")
            contenders.append(_open_and_judge(ctx, name, table[name], image, wav, reference, memory))
            say(f"{name}: {_status_line(contenders[-1].entry)}")
            gc.collect()
        for round_ in range(config.rounds):
            say(f"timing round {round_ + 1}/{config.rounds}: " + " ".join(c.name for c in contenders if c.ok))
            _time_round(ctx, [c for c in contenders if c.ok], reference, wav, round_)
            load.mark_round()
        for contender in contenders:
            if contender.ok:
                contender.entry["stages"] = _stage_timings(ctx, contender, reference)
                contender.entry["end_to_end"] = _e2e_summary(contender, wav)
        ctx.torch_backends.clear()
        measured_on = environment(device)
    baseline, runs = official.entry, [c.entry for c in contenders[1:]]
    add_ratios(baseline, runs)
    precisions = {p for c in contenders if c.ok for p in c.entry["stage_precision"].values()} | {"fp32"}
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "sadtalker-rt bench", "version": __version__},
        "command": command,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": measured_on,
        "machine_load": load.as_dict(),
        "config": {
            "size": config.size, "frames": int(reference.frames.shape[0]),
            "audio_seconds": len(wav) / float(SAMPLE_RATE), "fps": FPS, "preprocess": config.preprocess,
            "device": device, "batch_sizes": list(config.batch_sizes), "end_to_end_batch": config.e2e_batch,
            "official_batch": OFFICIAL_BATCH, "warmup": config.warmup, "repeats": config.repeats,
            "min_stage_s": config.min_stage_s, "threads": config.threads,
            "rounds": config.rounds, "end_to_end_rounds": config.end_to_end_rounds, "order": ["official"] + [c.name for c in contenders[1:] if c.ok],
            "backends_requested": list(names),
            "image": _display_path(config.image, media.demo_image()),
            "audio": _display_path(config.audio, media.demo_audio()),
            "engines_dir": None if config.engines_dir is None else str(config.engines_dir),
            "weights": {"identity": config.weights.identity(), "description": config.weights.describe(),
                        "synthetic": bool(config.weights.synthetic)},
            "memory_method": memory.method,
            "gpu_memory_method": None if device != "cuda" else (
                "torch backends: the largest torch.cuda.max_memory_allocated since the stage's first call (a CUDA "
                "graph's private pool, set aside when it is captured, included); others: device memory in use "
                "after the call (torch.cuda.mem_get_info: total - free)"),
            "mouth_box": reference.mouth,
            "head_pose_method": HEAD_POSE_METHOD,
            "thresholds": thresholds_for_report(stages, precisions),
        },
        "baseline": baseline,
        "backends": runs,
    }


# ---------------------------------------------------------------------------------------------- setup and parity

def _open_baseline(ctx: BenchContext, opener: Opener, image, wav: np.ndarray, memory: MemoryProbe):
    begin = time.perf_counter()
    opened = opener(ctx)
    instrumented = InstrumentedBackend(opened.backend, opened.device, opened.runtime, memory)
    for stage in ctx.stages:
        instrumented.runner(stage)
    entry = _entry("official", opened, "ok", None, time.perf_counter() - begin)
    contender = Contender("official", entry, opened, instrumented)
    with _float32_reference(ctx.device):
        contender.avatar, contender.prepare_s, _ = _generate(ctx, instrumented, image, wav, OFFICIAL_BATCH, "parity")
    log = instrumented.log
    reference = Reference(log, log.stacked("parity-generate", "renderer", "frames"),
                          log.stacked("parity-generate", "renderer", "kp_driving"),
                          log.first[("parity-prepare", "kp_detector")][1]["kp_canonical"],
                          mouth_box(contender.avatar.source_frame, ctx.config.size, ctx.config.mouth_box))
    unused = [s for s in ctx.stages if not reference.has(s)]
    if unused:      # e.g. audio2pose for a single frame: nothing to feed it the same inputs
        ctx.stages = tuple(s for s in ctx.stages if s not in unused)
        entry["notes"].append(f"not measured: {', '.join(unused)} (not called for {ctx.config.frames} frame(s))")
        entry["stage_precision"] = {s: entry["stage_precision"][s] for s in ctx.stages}
    _warm_up_plan(ctx, contender, reference)
    entry["notes"].append("the reference of every parity figure" + (" (its parity run with TF32 disabled)"
                                                                      if ctx.device == "cuda" else ""))
    return contender, reference


def _open_and_judge(ctx: BenchContext, name: str, opener: Opener, image, wav: np.ndarray, reference: Reference,
                    memory: MemoryProbe) -> Contender:
    begin = time.perf_counter()
    try:
        opened = opener(ctx)
        instrumented = InstrumentedBackend(opened.backend, opened.device, opened.runtime, memory)
        for stage in ctx.stages:
            instrumented.runner(stage)
    except (BackendSkipped, SadTalkerError, ImportError) as err:      # cannot run here: say why
        return Contender(name, _entry(name, None, "skipped", one_line(err), None))
    except Exception as err:  # a bug in opening one backend must not cost the others' measurements
        return Contender(name, _entry(name, None, "failed", f"{type(err).__name__}: {one_line(err)}", None))
    contender = Contender(name, _entry(name, opened, "ok", None, time.perf_counter() - begin), opened, instrumented)
    try:
        contender.entry["parity"] = _parity(ctx, contender, image, wav, reference, memory)
        _warm_up_plan(ctx, contender, reference)
        contender.avatar, contender.prepare_s, _ = _prepare(ctx, instrumented, image, "warmup")
    except Exception as err:  # one backend's crash must not cost the others' measurements; the reason is reported
        contender.entry["status"] = "failed"
        contender.entry["reason"] = f"{type(err).__name__}: {one_line(err)}"
    return contender


def _parity(ctx: BenchContext, contender: Contender, image, wav: np.ndarray, reference: Reference,
            memory: MemoryProbe) -> dict:
    """Stage outputs on the reference inputs, then one end-to-end run, against the reference."""
    opened = contender.opened
    judged = contender.instrumented
    if opened.parity_backend is not None:
        judged = InstrumentedBackend(opened.parity_backend, opened.device, opened.runtime, memory)
    stage_rows, checks = {}, []
    with judged.phase("parity-stages"):
        for stage in ctx.stages:
            feeds, ref_outputs = reference.feeds(stage)
            outputs = judged.runner(stage).infer(feeds)
            precision = opened.stage_precision.get(stage, opened.precision)
            stage_rows[stage], stage_checks = stage_parity(stage, precision, outputs, ref_outputs,
                                                           call_batch(stage, feeds))
            checks += stage_checks
    _generate(ctx, judged, image, wav, ctx.config.e2e_batch, "parity")
    log = judged.log
    end_to_end, e2e_checks = frame_parity(log.stacked("parity-generate", "renderer", "frames"), reference.frames,
                                          log.stacked("parity-generate", "renderer", "kp_driving"),
                                          reference.kp_driving, reference.kp_canonical, reference.mouth["box"])
    checks += e2e_checks
    failures = [f"{c['scope']} {c['metric']} {_fmt(c['value'])} (limit {c['op']} {_fmt(c['limit'])})"
                for c in checks if not c["passed"]]
    return {"reference": "official (float32 PyTorch)", "method": opened.parity_method or "the backend as timed",
            "passed": not failures, "failures": failures, "stages": stage_rows, "end_to_end": end_to_end,
            "checks": checks}


def _warm_up_plan(ctx: BenchContext, contender: Contender, reference: Reference) -> None:
    """``warmup`` calls of every (stage, batch) the rounds will time, so that no round pays a first call."""
    instrumented = contender.instrumented
    with instrumented.phase("warmup"):
        for stage, batch in timing_plan(ctx.stages, ctx.config.batch_sizes, contender.name == "official"):
            feeds = reference.timing_feeds(stage, batch)
            for _ in range(ctx.config.warmup):
                instrumented.runner(stage).infer(feeds)


def _prepare(ctx: BenchContext, instrumented: InstrumentedBackend, image, phase: str):
    from ..runtime.pipeline import TalkingHead

    head = TalkingHead(instrumented, ctx.config.size)
    with instrumented.phase(f"{phase}-prepare"):
        begin = time.perf_counter()
        avatar = head.prepare_avatar(image, ctx.config.preprocess)
        return avatar, time.perf_counter() - begin, head


def _generate(ctx: BenchContext, instrumented: InstrumentedBackend, image, wav: np.ndarray, batch: int, phase: str,
              avatar=None) -> tuple[object, float | None, dict]:
    """Prepare the avatar (unless given) and generate every frame; returns (avatar, prepare seconds, figures)."""
    from ..runtime.pipeline import Options, TalkingHead

    prepare_s = None
    if avatar is None:
        avatar, prepare_s, head = _prepare(ctx, instrumented, image, phase)
    else:
        head = TalkingHead(instrumented, ctx.config.size)
    first_call = len(instrumented.log.calls)
    with instrumented.phase(f"{phase}-generate"):
        started = instrumented.memory.start()
        begin = time.perf_counter()
        frames = head.generate(avatar, wav, Options(batch_size=batch, seed=0))
        next(frames)
        first_s = time.perf_counter() - begin
        count = 1 + sum(1 for _ in frames)
        wall = time.perf_counter() - begin
        peak, _ = instrumented.memory.peak(started)
    calls = instrumented.log.calls[first_call:]
    peak = max([peak] + [c.peak_rss for c in calls])      # each call resets the mark: take the calls' peaks too
    stage_seconds: dict[str, float] = {}
    stage_calls: dict[str, int] = {}
    for c in calls:
        stage_seconds[c.stage] = stage_seconds.get(c.stage, 0.0) + c.seconds
        stage_calls[c.stage] = stage_calls.get(c.stage, 0) + 1
    return avatar, prepare_s, {"wall_s": wall, "first_frame_s": first_s, "frames": count,
                               "stage_seconds": stage_seconds, "calls": stage_calls, "peak_rss": peak}


# ---------------------------------------------------------------------------------------------- timing rounds

def _time_round(ctx: BenchContext, contenders: list[Contender], reference: Reference, wav: np.ndarray,
                round_: int) -> None:
    """One round: stage after stage, the backends take turns (A B C), each turn a burst of calls on the
    stage's reference inputs: at least ``repeats`` calls per batch and more until the burst has lasted
    ``min_stage_s``. Then one end-to-end run each. A stage of milliseconds is timed as a loop calls it, on
    warm thread pools, and its backends' bursts lie within a second of each other, so load lands alike."""
    config = ctx.config
    for contender in contenders:
        contender.instrumented.log.round = round_
    try:
        for stage in ctx.stages:
            for contender in contenders:
                if contender.ok:
                    feeds = [reference.timing_feeds(stage, batch) for _, batch in
                             timing_plan((stage,), config.batch_sizes, contender.name == "official")]
                    _guarded(contender, round_, _burst, contender, stage, feeds, config)
        if config.end_to_end_rounds:
            for contender in contenders:
                if contender.ok:
                    _guarded(contender, round_, _timed_end_to_end, ctx, contender, wav)
    finally:
        for contender in contenders:
            contender.instrumented.log.round = -1


MAX_CALLS = 200         # a bound on one burst, whatever min_stage_s asks


def _guarded(contender: Contender, round_: int, work: Callable, *args) -> None:
    try:
        work(*args)
    except Exception as err:  # one backend's crash must not cost the others' measurements
        contender.entry["status"] = "failed"
        contender.entry["reason"] = f"round {round_ + 1}: {type(err).__name__}: {one_line(err)}"


def _burst(contender: Contender, stage: str, feeds_per_batch: list[dict], config: BenchConfig) -> None:
    with contender.instrumented.phase("timing"):
        runner = contender.instrumented.runner(stage)
        start, calls = time.perf_counter(), 0
        while calls < MAX_CALLS and (calls < config.repeats or time.perf_counter() - start < config.min_stage_s):
            for feeds in feeds_per_batch:
                runner.infer(feeds)
            calls += 1


def _timed_end_to_end(ctx: BenchContext, contender: Contender, wav: np.ndarray) -> None:
    batch = OFFICIAL_BATCH if contender.name == "official" else ctx.config.e2e_batch
    _, _, figures = _generate(ctx, contender.instrumented, None, wav, batch, "timed", avatar=contender.avatar)
    figures["batch"] = batch
    contender.e2e_rounds.append(figures)


def _rate_frames(stage: str, batch: int) -> int | None:
    rate = STAGES[stage].rate
    if rate == "frame":
        return batch
    if stage == "audio2pose":
        return POSE_CHUNK
    if rate == "audio":
        return batch
    return None


def _stage_timings(ctx: BenchContext, contender: Contender, reference: Reference) -> dict:
    out = {}
    log = contender.instrumented.log
    opened = contender.opened
    for stage in ctx.stages:
        runs = []
        for _, batch in [p for p in timing_plan(ctx.stages, ctx.config.batch_sizes, contender.name == "official")
                         if p[0] == stage]:
            feeds = reference.timing_feeds(stage, batch)
            n = call_batch(stage, feeds)
            calls = [c for c in log.of(stage, "timing", n) if c.round >= 0]
            runs.append(_timing(calls, stage, n, ctx.config.rounds))
            runs[-1]["copies_ms_per_call"] = _copies_ms(stage, feeds, ctx.config.size, opened.device)
        out[stage] = {"rate": STAGES[stage].rate, "precision": opened.stage_precision.get(stage, opened.precision),
                      "runs": runs}
    return out


def _timing(calls: list[Call], stage: str, batch: int, rounds: int) -> dict:
    ms = [c.seconds * 1000.0 for c in calls]
    per_call = summarize(ms)
    frames = _rate_frames(stage, batch)
    per_round = [float(np.median([c.seconds * 1000.0 for c in calls if c.round == r])) for r in range(rounds)
                 if any(c.round == r for c in calls)]
    gpu = [c.gpu_mib for c in calls if c.gpu_mib is not None]
    return {
        "batch": batch, "frames_per_call": frames, "calls": len(calls), "ms_per_call": per_call,
        "ms_per_call_rounds": per_round,
        "ms_per_frame": None if frames is None else {k: per_call[k] / frames for k in ("median", "p95", "min")},
        "fps": None if frames is None else 1000.0 * frames / per_call["median"],
        "speedup_vs_official": None,
        "peak_rss_mib": max(c.peak_rss for c in calls) / MIB,
        "peak_rss_delta_mib": max(c.rss_delta for c in calls) / MIB,
        "gpu_memory_mib": max(gpu) if gpu else None,
        "copies_ms_per_call": None,
    }


def _e2e_summary(contender: Contender, wav: np.ndarray) -> dict | None:
    rounds = contender.e2e_rounds
    if not rounds:
        return None
    audio_s = len(wav) / float(SAMPLE_RATE)
    walls = [r["wall_s"] for r in rounds]
    wall = float(np.median(walls))
    stage_seconds = {s: float(np.median([r["stage_seconds"].get(s, 0.0) for r in rounds]))
                     for s in rounds[0]["stage_seconds"]}
    share = {s: v / wall for s, v in stage_seconds.items()}
    share["other"] = max(0.0, 1.0 - sum(share.values()))
    first = float(np.median([r["first_frame_s"] for r in rounds]))
    return {
        "batch": rounds[0]["batch"], "prepare_avatar_s": contender.prepare_s,
        "frames": rounds[0]["frames"], "audio_seconds": audio_s, "rounds": len(rounds),
        "wall_s": wall, "wall_s_rounds": walls, "wall_per_audio_second_s": wall / audio_s,
        "realtime_factor": audio_s / wall, "first_frame_s": first,
        "first_frame_s_rounds": [r["first_frame_s"] for r in rounds], "fps": rounds[0]["frames"] / wall,
        "speedup_vs_official": None, "first_frame_speedup_vs_official": None, "stage_seconds": stage_seconds,
        "stage_share": share, "calls": rounds[0]["calls"],
        "peak_rss_mib": max(r["peak_rss"] for r in rounds) / MIB,
    }


def _copies_ms(stage: str, feeds: dict, size: int, device: str) -> float | None:
    """On a GPU: the host-to-device copies of the per-call inputs (those with a dynamic axis; per-avatar inputs stay
    on the device) and the device-to-host copies of the outputs, timed on their own with torch (pageable memory).
    They are part of ms_per_call, which is what the pipeline pays."""
    if device != "cuda":
        return None
    import torch

    spec = STAGES[stage]
    dynamic = [np.ascontiguousarray(feeds[t.name]) for t in spec.inputs if t.dynamic_axes()]
    n = call_batch(stage, feeds)
    on_device = [torch.zeros(t.resolve(size, **{BATCH: n, FRAMES: n}), device="cuda") for t in spec.outputs]
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        for array in dynamic:
            torch.from_numpy(array).cuda()
        for tensor in on_device:
            tensor.cpu()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - begin) * 1000.0)
    return float(np.median(times[1:]))


# ---------------------------------------------------------------------------------------------- ratios

def spread(values: list[float]) -> dict | None:
    """Median, min and max of per-round values (None when there are none)."""
    if not values:
        return None
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)),
            "rounds": [float(v) for v in values]}


def add_ratios(baseline: dict, runs: list[dict]) -> None:
    """speedup_vs_official: per round, the official figure divided by this one (above 1: faster than the official
    loop), per frame where both have frames; reported as the median of the rounds with min and max."""
    def base_run(stage: str) -> dict | None:
        runs_ = baseline["stages"].get(stage, {}).get("runs", [])
        return runs_[0] if runs_ else None

    for entry in [baseline] + runs:
        for stage, info in entry["stages"].items():
            ref = base_run(stage)
            for run in info["runs"]:
                if ref is None:
                    continue
                ref_per = ref["frames_per_call"] if ref["frames_per_call"] and run["frames_per_call"] else 1
                run_per = run["frames_per_call"] if ref["frames_per_call"] and run["frames_per_call"] else 1
                pairs = zip(ref["ms_per_call_rounds"], run["ms_per_call_rounds"])
                run["speedup_vs_official"] = spread([(a / ref_per) / (b / run_per) for a, b in pairs])
        e2e, ref = entry["end_to_end"], baseline["end_to_end"]
        if e2e and ref:
            e2e["speedup_vs_official"] = spread([a / b for a, b in zip(ref["wall_s_rounds"], e2e["wall_s_rounds"])])
            e2e["first_frame_speedup_vs_official"] = spread(
                [a / b for a, b in zip(ref["first_frame_s_rounds"], e2e["first_frame_s_rounds"])])


# ---------------------------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _float32_reference(device: str):
    """TF32 off on CUDA: the parity reference is true float32."""
    if device != "cuda":
        yield
        return
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _entry(name: str, opened: Opened | None, status: str, reason: str | None, setup_s: float | None) -> dict:
    return {
        "name": name, "runtime": opened.runtime if opened else _runtime_of(name),
        "device": opened.device if opened else None, "precision": opened.precision if opened else _precision_of(name),
        "status": status, "reason": reason, "notes": list(opened.notes) if opened else [], "setup_s": setup_s,
        "stage_precision": dict(opened.stage_precision) if opened else {}, "stages": {}, "end_to_end": None,
        "parity": None,
    }


def _runtime_of(name: str) -> str:
    return next((r for r in RUNTIMES if name.startswith(r)), name)


def _precision_of(name: str) -> str:
    match = re.search(r"fp(16|32)", name)
    return match.group(0) if match else "fp32"


def _status_line(entry: dict) -> str:
    if entry["status"] != "ok":
        return f"{entry['status']}: {entry['reason']}"
    parity = entry["parity"]
    return "parity passed" if parity["passed"] else f"parity FAILED ({len(parity['failures'])})"


def _fmt(value) -> str:
    from .markdown import fmt

    return fmt(value)


def _display_path(given: Path | None, default: Path) -> str:
    """The path as the user gave it; the bundled demo inputs by their place in the package."""
    if given is not None:
        return str(given)
    return f"sadtalker_rt/assets/{default.name} (bundled)"
