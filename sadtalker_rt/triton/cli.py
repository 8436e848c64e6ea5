"""``sadtalker-rt triton-repo`` and ``sadtalker-rt triton-bench``: registered on the main command line."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def triton_repo(
    artifacts: Path = typer.Argument(..., help="graphs and manifest.json made by `sadtalker-rt export` (or the cache)"),
    output: Path = typer.Option(..., "-o", "--output", help="folder for the model repository"),
    stage_backend: str = typer.Option("native", "--stage-backend", help="native (onnxruntime_onnx / tensorrt_plan "
                                      "models for NVIDIA's Triton container) or python (this package's runtime "
                                      "in Python-backend models)"),
    engines: Optional[Path] = typer.Option(None, "--engines", help="TensorRT engines built from ARTIFACTS "
                                           "(`sadtalker-rt build`): tensorrt_plan stage models"),
    kind: Optional[str] = typer.Option(None, "--kind", help="gpu or cpu instances of the stage models (default: gpu "
                                       "for native, cpu for python)"),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="comma-separated GPU ids, an instance group each "
                                       "(default: every GPU the server sees)"),
    instances: int = typer.Option(1, "--instances", help="instances of each stage model per GPU (or on the CPU)"),
    threads: int = typer.Option(0, "--intra-op-threads", help="CPU instances: threads per call (0: one per core; "
                                "with N instances on C cores, C/N keeps them from competing)"),
    glue_instances: int = typer.Option(1, "--glue-instances", help="instances of the avatar and talking_head "
                                      "models"),
    avatar_store: Optional[str] = typer.Option(None, "--avatar-store", help="folder (on the server) for prepared "
                                               "avatars; share it between replicas (default: a temp folder)"),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="cap the per-frame batches below the engine "
                                            "profiles (CPU instances: a 256 renderer batch of 8 needs ~5 GB)"),
    no_check: bool = typer.Option(False, "--no-check", help="skip the numeric check of the batched graphs"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing OUTPUT"),
) -> None:
    """Write a Triton model repository: a model per stage, dynamic batching on the per-frame stages, and the
    avatar and talking_head models (decoupled: frames streamed as they are final, audio in chunks)."""
    from ..errors import UsageError
    from .repository import Placement, write_repository

    default_kind = "cpu" if stage_backend == "python" else "gpu"
    if (kind or default_kind) not in ("gpu", "cpu"):
        raise UsageError(f"--kind must be gpu or cpu, not '{kind}'.")
    if max_batch is not None and max_batch < 1:
        raise UsageError("--max-batch must be at least 1.")
    if instances < 1 or glue_instances < 1 or threads < 0:
        raise UsageError("--instances and --glue-instances must be at least 1, --intra-op-threads at least 0.")
    if threads and (kind or default_kind) != "cpu":
        raise UsageError("--intra-op-threads is for CPU instances (--kind cpu or --stage-backend python).")
    try:
        ids = tuple(int(g) for g in gpus.split(",")) if gpus else ()
    except ValueError:
        raise UsageError(f"--gpus takes comma-separated GPU ids, not '{gpus}'.") from None
    placement = Placement(kind or default_kind, ids, instances, glue_instances, threads)
    summary = write_repository(artifacts, output, stage_backend, engines, placement, avatar_store,
                               check=not no_check, overwrite=overwrite, max_batch=max_batch)
    width = max(map(len, summary["models"])) + 2
    for name, model in summary["models"].items():
        batching = f"  dynamic batching, preferred {model['preferred_batch_size']}" if model.get("batched") else ""
        streaming = ("  decoupled, audio in chunks (a sequence per stream)" if model.get("chunked") else
                     "  decoupled, the whole audio per request" if model.get("decoupled") else "")
        check = summary["checks"].get(name)
        checked = f"  batched graph max rel. error {check:.1e}" if check is not None else ""
        typer.echo(f"{name:<{width}}{model['how']:<18}{batching}{streaming}{checked}")
    typer.echo(f"wrote {output} (size {summary['size']}; avatars kept in {summary['avatar_store']})")


def triton_bench(
    url: Optional[str] = typer.Argument(None, help="the server: triton://HOST:PORT (gRPC) or http://HOST:PORT; "
                                        "omit it with --repository"),
    repository: Optional[Path] = typer.Option(None, "--repository", help="start the bundled tritonserver on this "
                                              "repository (made by `triton-repo`) on loopback for the run"),
    image: Optional[Path] = typer.Option(None, "--image", help="photo (default: the bundled demo photo)"),
    audio: Optional[Path] = typer.Option(None, "--audio", help="speech (default: the bundled demo speech)"),
    frames: int = typer.Option(8, "--frames", help="video frames per stream"),
    concurrency: str = typer.Option("1,4,16", "--concurrency", help="comma-separated numbers of concurrent streams"),
    rounds: int = typer.Option(3, "--rounds", help="interleaved rounds: every level in turn, each round"),
    batch_size: int = typer.Option(1, "--batch-size", help="frames per renderer request of one stream"),
    min_free_mb: float = typer.Option(1024.0, "--min-free-mb", help="skip a run (with the reason) when this "
                                      "machine's available memory would fall below this"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="write the report as markdown"),
    label: str = typer.Option("", "--label", help="where this ran (e.g. 'CPU, 2 cores'), shown in the report"),
) -> None:
    """Throughput and latency of 1, 4 and 16 concurrent streams against a repository (levels interleaved round by
    round), and the batch sizes Triton formed."""
    run_triton_bench(url, repository, image, audio, frames, concurrency, rounds, batch_size, min_free_mb, json_out,
                     markdown_out, label)


def run_triton_bench(url, repository, image, audio, frames, concurrency, rounds, batch_size, min_free_mb,
                     json_out, markdown_out, label) -> None:
    """The Triton bench; also ``sadtalker-rt bench --triton URL``."""
    from ..errors import UsageError
    from ..reports import check_report_paths, write_reports
    from . import bench

    if (url is None) == (repository is None):
        raise UsageError("give the server's URL or --repository (to start the bundled server), one of them.")
    check_report_paths(json_out, markdown_out)
    levels = bench.parse_levels(concurrency)
    log = lambda line: typer.echo(line, err=True)  # noqa: E731
    if repository is None:
        report = bench.run(url, image, audio, frames, levels, batch_size, label, rounds, min_free_mb, log=log)
    else:
        from .server import TritonServer

        layout_of = describe_repository(repository)
        need = bench.renderer_peak_mb(layout_of) + min_free_mb
        free = bench.available_mb()
        if free is not None and free < need:
            raise UsageError(f"this machine has {free:.0f} MB available; the renderer's instances at their largest "
                             f"batch need about {need - min_free_mb:.0f} MB more than --min-free-mb "
                             f"{min_free_mb:.0f}: lower --max-batch or --instances in triton-repo.")
        with TritonServer(repository) as server:
            log(f"tritonserver ready on {server.grpc_url} ({repository})")
            report = bench.run(f"triton://{server.grpc_url}", image, audio, frames, levels, batch_size, label,
                               rounds, min_free_mb, repository=layout_of, log=log)
    write_reports(report, bench.to_markdown(report), json_out, markdown_out, bench.write_json)


def describe_repository(repository: Path) -> dict:
    """The renderer's serving configuration, as the report names it."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from .layout import INTRA_OP_THREADS

    config = text_format.Parse((Path(repository) / "renderer" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    threads = config.parameters[INTRA_OP_THREADS].string_value if INTRA_OP_THREADS in config.parameters else "0"
    frames = next(o for o in config.output if o.name == "frames")
    return {"renderer instances": sum(g.count or 1 for g in config.instance_group) or 1,
            "intra-op threads": int(threads) or "per core",
            "preferred batch sizes": list(config.dynamic_batching.preferred_batch_size),
            "max batch": config.max_batch_size or 1, "size": int(frames.dims[-1])}


def register(app: typer.Typer) -> None:
    app.command("triton-repo")(triton_repo)
    app.command("triton-bench")(triton_bench)
