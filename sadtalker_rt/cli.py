"""The ``sadtalker-rt`` command line: a thin layer over the Python API.

Every failure the user can cause ends in one line on stderr and an exit code per class of
problem (see ``sadtalker_rt.errors``); ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .argv import normalize_argv, record, recorded_command
from .backend_choice import BackendChoice, weight_source
from .command_inputs import find_enhancer_weights, load_run_inputs, source_image
from .errors import UsageError
from .exit_codes import run_app
from .reports import check_report_paths, write_reports

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Export, optimize and run SadTalker talking-head generation.")

SYNTHETIC_HELP = "use synthetic weights (optionally from SEED, default 0) instead of official checkpoints"
CHECKPOINTS_HELP = "directory with the official SadTalker checkpoints"
DEGREES_HELP = ("free view: {} in integer degrees (-90..90), one value or a list (0,30,-20 or 0 30 -20) "
                "interpolated over the video, replacing the generated one")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    """``--debug`` is read by ``main`` before typer parses; declared here for --help."""


@app.command()
def conformance(
    cases_dir: Path = typer.Argument(..., help="directory with manifest/ and cases/ (index.json, *.npz)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON"),
    stage: Optional[list[str]] = typer.Option(None, "--stage", help="run only these stages"),
) -> None:
    """Run recorded official numerics through the project's loaders and modules."""
    import json

    from .conformance import run_directory

    shown = []

    def show(result) -> None:
        if not shown:
            typer.echo(f"{'stage':<26}{'case':<10}{'worst rel err':>14}  result")
        shown.append(result)
        verdict = "pass" if result.passed else "FAIL"
        flips = sum(o.threshold_flips for o in result.outputs)
        extra = f"  ({flips} mask threshold flips)" if flips else ""
        extra += f"  {result.error}" if result.error else ""
        failing = [o.name for o in result.outputs if not o.passed]
        extra += f"  failing: {', '.join(failing)}" if failing else ""
        typer.echo(f"{result.stage:<26}{result.case:<10}{result.worst_rel:>14.2e}  {verdict}{extra}")

    results = run_directory(cases_dir, on_result=show, stages=set(stage) if stage else None)
    failed = [r for r in results if not r.passed]
    typer.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if json_out:
        json_out.write_text(json.dumps([
            {"stage": r.stage, "case": r.case, "passed": r.passed, "worst_rel": r.worst_rel, "error": r.error,
             "seconds": round(r.seconds, 3),
             "outputs": [vars(o) for o in r.outputs]} for r in results], indent=2))
    if failed or not results:
        raise typer.Exit(1)


@app.command()
def run(
    image: Path = typer.Argument(..., help="photo with one face (PNG, JPEG, WebP, ...)"),
    audio: Path = typer.Argument(..., help="speech (WAV, MP3, FLAC, M4A, ...)"),
    output: Path = typer.Option(Path("out.mp4"), "-o", "--output", help="mp4 to write"),
    checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help=CHECKPOINTS_HELP),
    synthetic_weights: Optional[int] = typer.Option(None, "--synthetic-weights", metavar="[SEED]", help=SYNTHETIC_HELP),
    graphs: Optional[Path] = typer.Option(None, "--graphs", help="onnxruntime: exported ONNX graphs (default: made "
                                          "from the weights once and cached)"),
    engines: Optional[Path] = typer.Option(None, "--engines", help="tensorrt: built engines (default: built from "
                                           "the weights once and cached)"),
    backend: str = typer.Option("torch", "--backend", help="torch, onnxruntime or tensorrt"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu (default) or cuda; tensorrt runs on cuda; "
                                         "--backend onnxruntime also takes tensorrt (its TensorRT provider)"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 (default) or fp16: torch autocast on "
                                            "cuda, or the graphs made for onnxruntime and tensorrt"),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="torch on cuda and tensorrt: replay per-frame "
                                     "stages from CUDA graphs"),
    size: Optional[int] = typer.Option(None, "--size", help="render size: 256 (default) or 512; engines fix it"),
    preprocess: str = typer.Option("crop", "--preprocess", help="crop, extcrop, resize, full or extfull"),
    still: bool = typer.Option(False, "--still", help="keep the head pose of the photo"),
    pose_style: int = typer.Option(0, "--pose-style", help="head-motion style, 0..45"),
    expression_scale: float = typer.Option(1.0, "--expression-scale", help="scale of the expression motion"),
    seed: int = typer.Option(0, "--seed", help="seed of blinks and head-motion latents"),
    batch_size: int = typer.Option(2, "--batch-size", help="frames per renderer call"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output"),
    old_version: bool = typer.Option(False, "--old-version", help="load the legacy .pth checkpoints"),
    duration: Optional[float] = typer.Option(None, "--duration", help="use only the first SECONDS of the audio"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    enhancer: Optional[str] = typer.Option(None, "--enhancer", help="gfpgan: restore the face (GFPGAN v1.4), "
                                           "video at twice the size"),
    enhancer_noise: str = typer.Option("fixed", "--enhancer-noise", help="GFPGAN decoder noise: fixed (default), "
                                       "seeded or fresh (the official call)"),
    enhancer_weights: Optional[Path] = typer.Option(None, "--enhancer-weights", help="GFPGANv1.4.pth, or the folder "
                                                    "with it and parsing_parsenet.pth (default: gfpgan/weights "
                                                    "beside --checkpoints)"),
    input_yaw: Optional[list[str]] = typer.Option(None, "--input-yaw", help=DEGREES_HELP.format("yaw")),
    input_pitch: Optional[list[str]] = typer.Option(None, "--input-pitch", help=DEGREES_HELP.format("pitch")),
    input_roll: Optional[list[str]] = typer.Option(None, "--input-roll", help=DEGREES_HELP.format("roll")),
    ref_eyeblink: Optional[Path] = typer.Option(None, "--ref-eyeblink", help="video whose expression (blinks "
                                                "included) replaces the photo's as the expression reference"),
    ref_pose: Optional[Path] = typer.Option(None, "--ref-pose", help="video whose head motion is added to the "
                                            "generated head pose"),
    enhancer_points: str = typer.Option("track", "--enhancer-points", help="alignment points per frame: track "
                                        "(default; landmarks followed from frame to frame) or fixed (the photo's)"),
) -> None:
    """Animate IMAGE (a photo, or a video: its first frame) with AUDIO into an mp4 (H.264 + AAC, 25 fps)."""
    import time

    from .runtime.pipeline import Options, TalkingHead
    from .progress import StageBars

    options = Options(pose_style=pose_style, expression_scale=expression_scale, still=still, seed=seed,
                      batch_size=batch_size, duration=duration, enhancer=enhancer, enhancer_noise=enhancer_noise,
                      input_yaw=input_yaw, input_pitch=input_pitch, input_roll=input_roll, ref_eyeblink=ref_eyeblink,
                      ref_pose=ref_pose, enhancer_points=enhancer_points)
    options.validate()
    photo, wav = load_run_inputs(image, audio, output, overwrite, (ref_eyeblink, ref_pose))
    choice = BackendChoice(backend, device, precision, cuda_graphs, graphs, engines)
    choice.check()
    bars = StageBars(None if not quiet else False)
    head = choice.open(TalkingHead, checkpoints, synthetic_weights, size, old_version, bars)
    if enhancer is not None:
        from_folder = (graphs or engines) is not None and enhancer_weights is None and checkpoints is None
        extra = None if from_folder else find_enhancer_weights(enhancer, enhancer_weights, checkpoints,
                                                               synthetic_weights)
        choice.open_enhancer(head, extra, bars)
    elif enhancer_weights is not None:
        raise UsageError("--enhancer-weights is for --enhancer gfpgan.")
    for line in head.backend.notes:
        typer.echo(f"note: {line}", err=True)
    start = time.perf_counter()
    avatar = head.prepare_avatar(photo, preprocess, name=str(image))
    for line in avatar.notes:
        typer.echo(f"note: {line}", err=True)
    head.write_video(avatar, wav, output, options, overwrite=overwrite, progress=bars, audio_name=str(audio),
                     on_note=lambda line: typer.echo(f"note: {line}", err=True))
    bars.close()
    typer.echo(f"wrote {output} in {time.perf_counter() - start:.1f} s")


@app.command()
def export(
    output: Path = typer.Option(..., "-o", "--output", help="directory for the graphs and manifest.json"),
    checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help=CHECKPOINTS_HELP),
    synthetic_weights: Optional[int] = typer.Option(None, "--synthetic-weights", metavar="[SEED]", help=SYNTHETIC_HELP),
    size: int = typer.Option(256, "--size", help="render size: 256 or 512"),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or fp16 with FP32 islands"),
    grid_sample: str = typer.Option("auto", "--grid-sample", help="auto (what the installed TensorRT builds: "
                                    "native from 11.2, else decomposed; native without TensorRT), native "
                                    "(GridSample, opset 20) or decomposed"),
    stage: Optional[list[str]] = typer.Option(None, "--stage", help="export only these stages"),
    enhancer: Optional[str] = typer.Option(None, "--enhancer", help="gfpgan: export the enhancer stages too "
                                           "(enhancer, face_parse)"),
    enhancer_weights: Optional[Path] = typer.Option(None, "--enhancer-weights", help="GFPGANv1.4.pth, or the folder "
                                                    "with it and parsing_parsenet.pth (default: gfpgan/weights "
                                                    "beside --checkpoints)"),
    image: Optional[Path] = typer.Option(None, "--image", help="photo to validate on (default: the demo photo)"),
    old_version: bool = typer.Option(False, "--old-version", help="load the legacy .pth checkpoints"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Export one ONNX graph per stage, validated against PyTorch, with a manifest."""
    from .build.export.onnx_export import export_graphs
    from .stages import ORDER
    from .progress import StageBars

    from .runtime.enhancer import check_enhancer
    from .stages import ENHANCER_STAGES

    weights = weight_source(checkpoints, synthetic_weights, size, old_version)
    source = source_image(image, size)
    stages = tuple(stage) if stage else ORDER
    wanted = enhancer is not None or any(s in ENHANCER_STAGES for s in stages)
    extra = find_enhancer_weights(enhancer or "gfpgan", enhancer_weights, checkpoints, synthetic_weights) if wanted \
        else None
    faces = None
    if extra is not None:
        check_enhancer(enhancer, "fixed")
        from . import media
        from .build.export.enhancer_inputs import aligned_faces

        if enhancer is not None and not stage:
            stages += tuple(s for s in ENHANCER_STAGES if s != "face_parse" or extra.has("parsenet"))
        photo = media.load_image(image if image is not None else media.demo_image())
        faces = aligned_faces([photo, photo[:, ::-1]])      # the photo's face and its mirror image
    elif enhancer_weights is not None:
        raise UsageError("--enhancer-weights is for --enhancer gfpgan.")
    bars = StageBars(None if not quiet else False)
    manifest = export_graphs(weights, size, output, precision=precision, grid_sample=grid_sample,
                             stages=stages, source_image=source, progress=bars, enhancer_weights=extra, faces=faces)
    bars.close()
    for name, entry in manifest["stages"].items():
        worst = max((r["max_rel"] for r in entry["parity"] if "agreement" not in r), default=float("nan"))
        psnr = min((r["psnr_db"] for r in entry["parity"] if "psnr_db" in r), default=None)
        extra = f"  PSNR {psnr:.1f} dB" if psnr is not None else ""
        islands = f"  {len(entry['fp32_islands'])} FP32 islands" if entry["fp32_islands"] else ""
        typer.echo(f"{name:<24}{entry['precision']:<6}max rel err {worst:.2e}{extra}{islands}")
    typer.echo(f"wrote {len(manifest['stages'])} graphs and manifest.json to {output} ({weights.describe()})")


@app.command()
def build(
    onnx_dir: Path = typer.Argument(..., help="graphs and manifest.json made by `sadtalker-rt export`"),
    output: Path = typer.Option(..., "-o", "--output", help="directory for the engines and engines.json"),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="largest --batch-size the engines take "
                                            "(default: each stage's profile in the stage table)"),
    workspace: float = typer.Option(4.0, "--workspace", help="TensorRT builder workspace, GiB"),
    stage: Optional[list[str]] = typer.Option(None, "--stage", help="build only these stages"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Build a TensorRT engine per exported stage for this GPU; engines whose key still matches are reused."""
    from .build.tensorrt import build_engines
    from .progress import StageBars

    bars = StageBars(None if not quiet else False)
    result = build_engines(onnx_dir, output, max_batch=max_batch, workspace_gib=workspace, progress=bars,
                           stages=tuple(stage) if stage else None)
    bars.close()
    for name, entry in result.record["stages"].items():
        how = f"built in {entry['build_seconds']:.0f} s: {result.built[name]}" if name in result.built else "reused"
        typer.echo(f"{name:<16}{entry['precision']:<6}{how}")
    typer.echo(f"{len(result.built)} built, {len(result.reused)} reused: {output} "
               f"(TensorRT {result.record['trt_version']}, {result.record['gpu_name']})")
    if result.parity_failures:
        from .build.export.onnx_export import ExportValidationError
        from .parity import Verdict, format_table

        for name, command in result.parity_failures.items():
            rows = result.record["stages"][name].get("parity", [])
            typer.echo(f"{name}: the engine does not match its ONNX graph in onnxruntime", err=True)
            typer.echo(format_table([Verdict.from_dict(r) for r in rows]), err=True)
            typer.echo(f"check it with Polygraphy:\n  {command}", err=True)
        raise ExportValidationError(f"parity failed for the {', '.join(result.parity_failures)} engine(s) in "
                                    f"{output} (recorded in engines.json; Polygraphy commands above).")


@app.command()
def bench(
    checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help=CHECKPOINTS_HELP),
    synthetic_weights: Optional[int] = typer.Option(None, "--synthetic-weights", metavar="[SEED]", help=SYNTHETIC_HELP),
    size: int = typer.Option(256, "--size", help="render size: 256 or 512"),
    backends: Optional[str] = typer.Option(
        None, "--backends", help="comma-separated: torch, torch-fp16, onnxruntime-fp32, onnxruntime-fp16, "
                                 "torch-fp16-graphs (CUDA graphs), tensorrt-fp32, tensorrt-fp16 (onnxruntime, "
                                 "tensorrt: both precisions); default: torch and onnxruntime FP32/FP16 on CPU"),
    batch_sizes: str = typer.Option("2", "--batch-sizes", help="comma-separated frames per call for the per-frame "
                                                               "stage timings; the first is the end-to-end batch"),
    frames: int = typer.Option(8, "--frames", help="video frames (25 per second of audio) of the end-to-end run"),
    image: Optional[Path] = typer.Option(None, "--image", help="photo (default: the bundled demo photo)"),
    audio: Optional[Path] = typer.Option(None, "--audio", help="speech (default: the bundled demo speech)"),
    engines_dir: Optional[Path] = typer.Option(None, "--engines-dir", help="keep exported graphs and TensorRT engines "
                                                                           "here and reuse them (default: a temp dir)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON "
                                                                 "(schema: sadtalker_rt/bench/report.schema.json)"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="write the report as markdown"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    warmup: int = typer.Option(1, "--warmup", help="warm-up calls per stage and batch before timing"),
    rounds: int = typer.Option(3, "--rounds", help="interleaved timing rounds: every backend in turn, each round; "
                                                   "ratios are the median of the per-round ratios"),
    end_to_end_rounds: bool = typer.Option(True, "--end-to-end-rounds/--stages-only", help="each round also runs "
                                           "the utterance end to end (default), or times the stages only"),
    repeats: int = typer.Option(1, "--repeats", help="timed calls per stage and batch in each round (before 0.2: "
                                                     "timed calls per stage in all; now multiplied by --rounds)"),
    min_stage_ms: float = typer.Option(200.0, "--min-stage-ms", help="each backend's burst of calls per stage "
                                       "and round lasts at least this long (stages of milliseconds)"),
    threads: int = typer.Option(0, "--threads", help="CPU threads of one call in every backend, the official loop "
                                "included (0: each library's own choice, one per core)"),
    soak: Optional[int] = typer.Option(None, "--soak", metavar="N", help="instead of latency: N short jobs through "
                                       "one torch pipeline, watching resident memory and open descriptors"),
    old_version: bool = typer.Option(False, "--old-version", help="load the legacy .pth checkpoints"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    streaming: bool = typer.Option(False, "--streaming", help="time streaming sessions instead (torch backend): "
                                   "first frame, real-time factor, jitter, for 1 and --sessions N at once"),
    sessions: int = typer.Option(4, "--sessions", help="--streaming: concurrent sessions of the second run"),
    chunk_ms: float = typer.Option(20.0, "--chunk-ms", help="--streaming: audio chunk length"),
    seconds: float = typer.Option(4.0, "--seconds", help="--streaming: seconds of the audio to use"),
    triton: Optional[str] = typer.Option(None, "--triton", metavar="URL", help="streams against a Triton server "
                                         "instead (as `sadtalker-rt triton-bench URL`): --concurrency levels "
                                         "interleaved for --rounds, --frames per stream"),
    concurrency: str = typer.Option("1,4,16", "--concurrency", help="--triton: concurrent streams per level"),
) -> None:
    """Latency and parity of every backend side by side, against the official PyTorch loop.

    Exits 1 when a backend fails a parity check or crashes (the reports are written first).

    Backends that cannot run here (no TensorRT, no GPU) are skipped and listed with the reason.
    """
    from . import bench as bench_mod
    from .progress import StageBars

    if triton is not None:
        given = [name for name, on in (("--checkpoints", checkpoints), ("--synthetic-weights", synthetic_weights),
                                       ("--backends", backends), ("--streaming", streaming), ("--soak", soak))
                 if on not in (None, False)]
        if given:
            raise UsageError(f"{', '.join(given)} would be ignored with --triton: the server's repository fixes them.")
        from .triton.cli import run_triton_bench

        run_triton_bench(triton, None, image, audio, frames, concurrency, rounds, 1, 1024.0, json_out,
                         markdown_out, "")
        return
    weights = weight_source(checkpoints, synthetic_weights, size, old_version)
    check_report_paths(json_out, markdown_out)
    if streaming:
        _bench_streaming(weights, size, device, image, audio, sessions, chunk_ms, seconds, json_out, markdown_out)
        return
    command = recorded_command()
    if soak is not None:
        from .bench.soak import soak_markdown, run_soak

        result = run_soak(weights, size, jobs=soak, frames=frames, image=image, audio=audio, device=device,
                          command=command, log=lambda line: typer.echo(line, err=True))
        write_reports(result, soak_markdown(result), json_out, markdown_out, bench_mod.write_json)
        return
    config = bench_mod.BenchConfig(
        weights=weights, size=size, backends=bench_mod.parse_list(backends),
        batch_sizes=bench_mod.parse_list(batch_sizes, int), frames=frames, warmup=warmup, repeats=repeats,
        min_stage_s=min_stage_ms / 1000.0, rounds=rounds, threads=threads, end_to_end_rounds=end_to_end_rounds,
        image=image, audio=audio, engines_dir=engines_dir, device=device,
        export_source=source_image(image, size))
    config.validate()
    if weights.synthetic:
        typer.echo(f"note: {weights.describe()}.", err=True)
    bars = StageBars(None if not quiet else False)
    report = bench_mod.run_bench(config, progress=bars, log=lambda line: typer.echo(line, err=True), command=command)
    bars.close()
    write_reports(report, bench_mod.to_markdown(report), json_out, markdown_out, bench_mod.write_json)
    bad = [b["name"] for b in report["backends"]
           if b["status"] == "failed" or (b["status"] == "ok" and not b["parity"]["passed"])]
    if bad:
        raise bench_mod.ParityFailure(f"parity failed or the run crashed for {', '.join(bad)} (reports written).")


@app.command("bench-enhancer")
def bench_enhancer(
    checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help=CHECKPOINTS_HELP),
    synthetic_weights: Optional[int] = typer.Option(None, "--synthetic-weights", metavar="[SEED]", help=SYNTHETIC_HELP),
    enhancer_weights: Optional[Path] = typer.Option(None, "--enhancer-weights", help="GFPGANv1.4.pth, or the folder "
                                                    "with it and parsing_parsenet.pth"),
    image: Optional[Path] = typer.Option(None, "--image", help="photo (default: the bundled demo photo)"),
    graphs: Optional[list[str]] = typer.Option(None, "--graphs", help="NAME=DIR, e.g. onnxruntime-fp16=DIR "
                                               "(default: onnxruntime fp32 and fp16 from the cache)"),
    rounds: int = typer.Option(3, "--rounds", help="interleaved timing rounds"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON"),
) -> None:
    """Per-frame cost and parity of the face enhancer on each backend against the official PyTorch way."""
    from .bench import enhancer as mod
    from . import media

    if rounds < 1:
        raise UsageError(f"--rounds must be at least 1, not {rounds}.")
    check_report_paths(json_out)
    extra = find_enhancer_weights("gfpgan", enhancer_weights, checkpoints, synthetic_weights)
    named = dict(item.split("=", 1) for item in graphs) if graphs else mod.default_graphs(extra)
    config = mod.EnhancerBenchConfig(extra, image or media.demo_image(), named, rounds, command=recorded_command())
    report = mod.run_enhancer_bench(config, log=lambda line: typer.echo(line, err=True))
    write_reports(report, mod.to_markdown(report), json_out)


def _register_triton() -> None:
    from .triton.cli import register

    register(app)


_register_triton()


@app.command()
def serve(
    checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help=CHECKPOINTS_HELP),
    synthetic_weights: Optional[int] = typer.Option(None, "--synthetic-weights", metavar="[SEED]", help=SYNTHETIC_HELP),
    size: int = typer.Option(256, "--size", help="render size: 256 or 512"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (beyond loopback needs --token)"),
    port: int = typer.Option(8000, "--port"),
    token: Optional[str] = typer.Option(None, "--token", envvar="SADTALKER_RT_TOKEN", help="bearer token clients send"),
    max_sessions: int = typer.Option(4, "--max-sessions", help="streaming sessions and video jobs at once"),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="largest upload (photo, audio, request)"),
    max_audio_seconds: float = typer.Option(120.0, "--max-audio-seconds", help="longest audio per session or job"),
    batch_size: int = typer.Option(1, "--batch-size", help="frames per renderer call"),
    engine: str = typer.Option("local", "--engine", help="local (the runtime in this process) or "
                               "triton://HOST:PORT (a Triton server's gRPC endpoint serving a `triton-repo` "
                               "repository; the weights and size are the repository's)"),
    enhancer: Optional[str] = typer.Option(None, "--enhancer", help="gfpgan: load the face enhancer so sessions "
                                           "and jobs may ask for it (enhancer=gfpgan)"),
    enhancer_weights: Optional[Path] = typer.Option(None, "--enhancer-weights", help="GFPGANv1.4.pth, or the folder "
                                                    "with it and parsing_parsenet.pth"),
) -> None:
    """Serve the web page, streaming websocket sessions and whole-file jobs (needs the 'serve' extra)."""
    try:
        from .serving.limits import ServeConfig
        from .serving.server import make_server
    except ImportError as err:
        raise UsageError(f"serve needs the 'serve' extra (pip install 'sadtalker-rt[serve]'): {err}") from None

    if min(max_sessions, batch_size) < 1 or min(max_upload_mb, max_audio_seconds) <= 0:
        raise UsageError("--max-sessions, --batch-size, --max-upload-mb and --max-audio-seconds must be positive.")
    config = ServeConfig(token=token, max_sessions=max_sessions, max_upload_bytes=int(max_upload_mb * 2**20),
                         max_audio_seconds=max_audio_seconds, batch_size=batch_size)
    if engine != "local":
        from .serving.engines import engine_from

        ignored = [name for name, given in (("--checkpoints", checkpoints is not None), ("--synthetic-weights",
                   synthetic_weights is not None), ("--size", size != 256), ("--device", device != "cpu"),
                   ("--enhancer", enhancer is not None), ("--enhancer-weights", enhancer_weights is not None)) if given]
        if ignored:
            raise UsageError(f"{', '.join(ignored)} would be ignored with --engine {engine}: the Triton server's "
                             "repository fixes the weights, size and devices.")
        source = engine_from(engine)
        typer.echo(f"frames from the Triton server at {engine}", err=True)
    else:
        from .runtime.enhancer import check_enhancer
        from .runtime.pipeline import TalkingHead

        check_enhancer(enhancer, "fixed")
        weights = weight_source(checkpoints, synthetic_weights, size)
        extra = find_enhancer_weights(enhancer, enhancer_weights, checkpoints, synthetic_weights)
        if weights.synthetic:
            typer.echo(f"note: {weights.describe()}.", err=True)
        source = TalkingHead.from_weights(weights, size=size, device=device, enhancer_weights=extra)
    server = make_server(source, host, port, config)
    typer.echo(f"serving on http://{host}:{port}/", err=True)
    server.run()


def _bench_streaming(weights, size, device, image, audio, sessions, chunk_ms, seconds, json_out, markdown_out):
    from . import media
    from .bench.probes import environment
    from .serving import bench as bench_streaming
    from .runtime.pipeline import SAMPLE_RATE, TalkingHead

    if sessions < 1 or chunk_ms <= 0 or seconds <= 0:
        raise UsageError("--sessions, --chunk-ms and --seconds must be positive.")
    device = "cpu" if device == "auto" else device
    image, audio = image or media.demo_image(), audio or media.demo_audio()
    head = TalkingHead.from_weights(weights, size=size, device=device)
    avatar = head.prepare_avatar(image, "crop")
    wav = media.load_audio(audio, SAMPLE_RATE)[:int(seconds * SAMPLE_RATE)]
    report = {"command": recorded_command(), "environment": environment(device),
              "inputs": f"{len(wav) / SAMPLE_RATE:.2f} s of {_shown_path(audio)}, photo {_shown_path(image)} (crop), "
                        f"{size}x{size}, {weights.describe()}, device {device}"}
    report.update(bench_streaming.run(head, avatar, wav, tuple(sorted({1, sessions})), chunk_ms,
                                      log=lambda line: typer.echo(line, err=True)))
    write_reports(report, bench_streaming.to_markdown(report), json_out, markdown_out)


def _shown_path(path) -> str:
    """A bundled input by its name in the package, anything else as given."""
    path = Path(path)
    package = Path(__file__).parent
    return f"{path.relative_to(package.parent)} (bundled)" if path.is_relative_to(package) else str(path)


def main(argv: Optional[list[str]] = None) -> None:
    args = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    record(args)
    run_app(app, args, debug="--debug" in args)


if __name__ == "__main__":
    main()
