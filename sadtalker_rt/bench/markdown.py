"""The report as markdown: setting, per-stage ratios with their spread, end to end, parity."""
from __future__ import annotations

import math


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if value == 0:
        return "0"
    if abs(value) < 1e-2 or abs(value) >= 1e5:
        return f"{value:.1e}"
    return f"{value:.{digits}g}" if abs(value) < 100 else f"{value:.0f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else (f"{value:.1f}" if value < 1000 else f"{value:.0f}")


def _ratio(value: dict | None) -> str:
    """A ratio's median over rounds with its spread: ``1.23x (1.10-1.31)``."""
    if value is None:
        return "-"
    if value["min"] == value["max"]:
        return f"{value['median']:.2f}x"
    return f"{value['median']:.2f}x ({value['min']:.2f}-{value['max']:.2f})"


def _db(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str) or not math.isfinite(value):
        return "inf" if value in ("inf", math.inf) else str(value)
    return f"{value:.1f}"


def _mark(passed: bool) -> str:
    return "pass" if passed else "**FAIL**"


def to_markdown(report: dict) -> str:
    """The report for a terminal and for GitHub: setting, a latency table, an end-to-end table, a parity table."""
    env, cfg, load = report["environment"], report["config"], report["machine_load"]
    cpu = env["cpu"]
    gpu = env["gpu"]
    lines = [f"# sadtalker-rt bench: {cfg['size']}x{cfg['size']}, {cfg['weights']['description'].split(';')[0]}", ""]
    hardware = f"{cpu['model']} ({cpu['usable_cores']} usable cores"
    hardware += f", torch threads {cpu['torch_threads']}" if cpu["torch_threads"] else ""
    hardware += ")"
    if gpu:
        hardware += (f"; {gpu['name']} (driver {gpu['driver'] or '?'}, CUDA {gpu['cuda'] or '?'}, "
                     f"cuDNN {gpu['cudnn'] or '?'})")
    else:
        hardware += "; no GPU"
    lines += [
        f"- command: `{report['command'] or '(not recorded: made through the Python API)'}`",
        f"- machine: {hardware}",
        f"- load: {_load_line(load)}",
        f"- software: torch {env['torch'] or '-'}, onnxruntime {env['onnxruntime'] or '-'}, "
        f"TensorRT {env['tensorrt'] or '- (' + (env['tensorrt_problem'] or '') + ')'}, Python {env['python']}",
        f"- run: {cfg['frames']} frames ({cfg['audio_seconds']:.2f} s of {cfg['audio']}), photo {cfg['image']}, "
        f"{cfg['preprocess']} mode, device {cfg['device']}",
        f"- timing: perf_counter around each call{' with CUDA synchronisation' if cfg['device'] == 'cuda' else ''}; "
        f"{cfg['rounds']} rounds; in each, stage after stage, the backends take turns ({', '.join(cfg['order'])}), "
        f"each a burst of {_turns(cfg)} per batch on the same reference inputs"
        f"{' and one end-to-end run' if cfg['end_to_end_rounds'] else ' (stages only: no end-to-end rounds)'}; "
        f"warm-up {cfg['warmup']}; end-to-end batch {cfg['end_to_end_batch']}, official batch {cfg['official_batch']}"
        f"{_threads(cfg)}",
        f"- weights: {cfg['weights']['identity']}; {report['created_utc']}",
        "",
        "## Latency per stage",
        "",
        "Median over the timed calls of all rounds; `vs official` is the official loop's time divided by this one "
        "within each round (above 1: faster), per frame for per-frame and per-utterance stages, per call for "
        "per-photo stages: the median of the per-round ratios, with their min-max. The official renderer is the "
        "whole generator with the source re-encoded every call.",
        "",
        "| backend | stage | precision | batch | ms/call | p95 | min | ms/frame | frames/s | vs official | "
        "peak RSS MiB (+ during call) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    entries = [report["baseline"]] + report["backends"]
    for entry in entries:
        if entry["status"] != "ok":
            continue
        for stage, info in entry["stages"].items():
            for run in info["runs"]:
                per_frame = run["ms_per_frame"]["median"] if run["ms_per_frame"] else None
                memory = run["peak_rss_mib"]
                gpu_mem = f" +{run['peak_rss_delta_mib']:.0f}" if run["peak_rss_delta_mib"] is not None else ""
                gpu_mem += f", GPU {run['gpu_memory_mib']:.0f}" if run["gpu_memory_mib"] is not None else ""
                lines.append(
                    f"| {entry['name']} | {stage} | {info['precision']} | {run['batch']} | "
                    f"{_ms(run['ms_per_call']['median'])} | {_ms(run['ms_per_call']['p95'])} | "
                    f"{_ms(run['ms_per_call']['min'])} | {_ms(per_frame)} | "
                    f"{'-' if run['fps'] is None else fmt(run['fps'])} | {_ratio(run['speedup_vs_official'])} | "
                    f"{'-' if memory is None else f'{memory:.0f}'}{gpu_mem} |")
    lines += [
        "",
        "## End to end",
        "",
        "Photo prepared beforehand (`prepare`, not in the wall time); then motion, render and paste-back of every "
        "frame through `TalkingHead.generate`, no video encoding, once per round: the median wall time of the "
        "rounds, ratios as above. Shares are of the median wall time.",
        "",
        "| backend | batch | s per audio s | first frame s | frames/s | vs official | first frame vs official | "
        "prepare s | renderer | mapping | audio | other |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in entries:
        e2e = entry["end_to_end"]
        if entry["status"] != "ok" or not e2e:
            continue
        share = e2e["stage_share"]
        mapping = sum(v for k, v in share.items() if k.startswith("mapping"))
        audio = share.get("audio2exp", 0.0) + share.get("audio2pose", 0.0)
        lines.append(
            f"| {entry['name']} | {e2e['batch']} | {e2e['wall_per_audio_second_s']:.2f} | {e2e['first_frame_s']:.2f} | "
            f"{fmt(e2e['fps'])} | {_ratio(e2e['speedup_vs_official'])} | "
            f"{_ratio(e2e['first_frame_speedup_vs_official'])} | {fmt(e2e['prepare_avatar_s'])} | "
            f"{share.get('renderer', 0.0):.0%} | {mapping:.0%} | {audio:.0%} | {share.get('other', 0.0):.0%} |")
    t = cfg["thresholds"]
    lines += [
        "",
        "## Parity against float32 PyTorch (the official baseline)",
        "",
        "Stage outputs on the baseline's own inputs; frames, mouth box "
        f"({cfg['mouth_box']['source']}, {cfg['mouth_box']['box']}), keypoints and head pose over the end-to-end run. "
        "Worst value over outputs or frames.",
        "",
        "| backend | worst stage error | frame PSNR dB | SSIM | mouth PSNR dB | kp delta | head pose delta deg | "
        "verdict |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        f"| *limit* | stage table (`config.thresholds`) | >= {_db(t['frame_psnr_db']['limit'])} | "
        f">= {t['frame_ssim']['limit']} | >= {_db(t['mouth_psnr_db']['limit'])} | "
        f"<= {fmt(t['kp_max_abs']['limit'])} | <= {t['head_pose_deg']['limit']} | |",
    ]
    notes = []
    for entry in report["backends"]:
        if entry["status"] != "ok":
            lines.append(f"| {entry['name']} | {entry['status']} | - | - | - | - | - | {entry['status']} |")
            notes.append(f"- {entry['name']} {entry['status']}: {entry['reason']}")
            continue
        parity = entry["parity"]
        worst = _worst_stage(parity)
        e2e = parity["end_to_end"]
        lines.append(
            f"| {entry['name']} | {worst} | {_db(e2e['frame_psnr_db']['min'])} | {fmt(e2e['frame_ssim']['min'], 4)} | "
            f"{_db(e2e['mouth_psnr_db']['min'])} | {fmt(e2e['kp_max_abs'])} | {fmt(e2e['head_pose_deg']['max'])} | "
            f"{_mark(parity['passed'])} |")
        notes += [f"- {entry['name']} failed: {f}" for f in parity["failures"]]
        if parity["method"] != "the backend as timed":
            notes.append(f"- {entry['name']} parity measured with {parity['method']}")
    for entry in entries:
        notes += [f"- {entry['name']}: {n}" for n in entry["notes"]]
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(lines) + "\n"


def _worst_stage(parity: dict) -> str:
    """The stage output with the largest relative error, as 'value (stage.output)', and the lowest image PSNR."""
    worst, label, image = None, "-", ""
    for stage, info in parity["stages"].items():
        for row in info["outputs"]:
            value = row["max_rel"]
            if not isinstance(value, (int, float)):
                return f"{value} ({stage}.{row['name']})"
            if worst is None or value > worst:
                worst, label = value, f"rel {fmt(value)} ({stage}.{row['name']})"
            if row["metric"] == "psnr_db":
                image = f", {_db(row['psnr_db'])} dB ({stage}.{row['name']})"
    return ("0" if worst == 0 else label) + image


def _load_line(load: dict) -> str:
    """Load averages of the whole machine against its cores: above the cores, other work shared the CPU."""
    def one(values):
        return "?" if not values else f"{values[0]:.2f}"

    rounds = ", ".join(one(v) for v in load["load_average_rounds"])
    return (f"1-minute load average {one(load['load_average_start'])} at the start, {rounds or '-'} after each "
            f"round, {one(load['load_average_end'])} at the end; {load['usable_cores']} usable of "
            f"{load['cpu_count']} cores")


def _threads(cfg: dict) -> str:
    if not cfg.get("threads"):
        return ""
    return f"; {cfg['threads']} thread(s) per call in every backend (torch and onnxruntime intra-op threads)"


def _turns(cfg: dict) -> str:
    """How many calls a round made per stage; reports before call-by-call turns made exactly ``repeats``."""
    least = f"{cfg['repeats']} call(s)"
    if cfg.get("min_stage_s"):
        return f"at least {least} lasting at least {cfg['min_stage_s'] * 1000:g} ms"
    return least
