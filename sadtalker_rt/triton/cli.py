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
    glue_instances: int = typer.Option(1, "--glue-instances", help="instances of the avatar and talking_head models"),
    avatar_store: Optional[str] = typer.Option(None, "--avatar-store", help="folder (on the server) for prepared "
                                               "avatars; share it between replicas (default: a temp folder)"),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="cap the per-frame batches below the engine "
                                            "profiles (CPU instances: a 256 renderer batch of 8 needs ~5 GB)"),
    no_check: bool = typer.Option(False, "--no-check", help="skip the numeric check of the batched graphs"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing OUTPUT"),
) -> None:
    """Write a Triton model repository: a model per stage, dynamic batching on the per-frame stages, and the
    avatar and (decoupled, streaming) talking_head models."""
    from ..errors import UsageError
    from .repository import Placement, write_repository

    default_kind = "cpu" if stage_backend == "python" else "gpu"
    if (kind or default_kind) not in ("gpu", "cpu"):
        raise UsageError(f"--kind must be gpu or cpu, not '{kind}'.")
    if max_batch is not None and max_batch < 1:
        raise UsageError("--max-batch must be at least 1.")
    if instances < 1 or glue_instances < 1:
        raise UsageError("--instances and --glue-instances must be at least 1.")
    try:
        ids = tuple(int(g) for g in gpus.split(",")) if gpus else ()
    except ValueError:
        raise UsageError(f"--gpus takes comma-separated GPU ids, not '{gpus}'.") from None
    placement = Placement(kind or default_kind, ids, instances, glue_instances)
    summary = write_repository(artifacts, output, stage_backend, engines, placement, avatar_store,
                               check=not no_check, overwrite=overwrite, max_batch=max_batch)
    for name, model in summary["models"].items():
        batching = f"  dynamic batching, preferred {model['preferred_batch_size']}" if model.get("batched") else ""
        streaming = "  decoupled (streams frames)" if model.get("decoupled") else ""
        check = summary["checks"].get(name)
        checked = f"  batched graph max diff {check:.1e}" if check is not None else ""
        typer.echo(f"{name:<16}{model['how']:<18}{batching}{streaming}{checked}")
    typer.echo(f"wrote {output} (size {summary['size']}; avatars kept in {summary['avatar_store']})")


def triton_bench(
    url: str = typer.Argument(..., help="the server: triton://HOST:PORT (gRPC) or http://HOST:PORT"),
    image: Optional[Path] = typer.Option(None, "--image", help="photo (default: the bundled demo photo)"),
    audio: Optional[Path] = typer.Option(None, "--audio", help="speech (default: the bundled demo speech)"),
    frames: int = typer.Option(8, "--frames", help="video frames per stream"),
    concurrency: str = typer.Option("1,4,16", "--concurrency", help="comma-separated numbers of concurrent streams"),
    batch_size: int = typer.Option(1, "--batch-size", help="frames per renderer request of one stream"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="write the report as markdown"),
    label: str = typer.Option("", "--label", help="where this ran (e.g. 'CPU, 2 cores'), shown in the report"),
) -> None:
    """Throughput and latency of 1, 4 and 16 concurrent streams against a running repository, and the batch sizes
    Triton formed."""
    from ..reports import check_report_paths, write_reports
    from . import bench

    check_report_paths(json_out, markdown_out)
    report = bench.run(url, image, audio, frames, bench.parse_levels(concurrency), batch_size, label,
                       log=lambda line: typer.echo(line, err=True))
    write_reports(report, bench.to_markdown(report), json_out, markdown_out, bench.write_json)


def register(app: typer.Typer) -> None:
    app.command("triton-repo")(triton_repo)
    app.command("triton-bench")(triton_bench)
