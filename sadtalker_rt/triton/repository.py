"""``sadtalker-rt triton-repo``: a Triton model repository from an export (and engines where built).

One model per stage, named after it, inputs and outputs named, typed and shaped from the stage table
(``layout``), plus Python-backend glue models: ``avatar`` (photo -> avatar id; the avatar's features are
cached on the server), ``talking_head`` (decoupled, a sequence per stream: avatar id + audio in chunks -> frames
as they are final, calling the stage models through BLS) and ``talking_head_whole`` (the same for the whole
audio in one request, for HTTP ``generate_stream``).

``stage_backend="native"``: stage models for NVIDIA's Triton container, ``platform: onnxruntime_onnx`` (the
graphs) or ``tensorrt_plan`` (the engines). ``stage_backend="python"``: the same models as Python-backend models
running this package's onnxruntime runner, for servers that have only the Python backend.

Per-frame stages are batched across requests (see ``layout``): their graphs are rewritten so that the per-avatar
inputs take a row per frame (``batched_graph``); the first axis of those inputs becomes the batch axis and
nothing else changes, which ``check_batched_graph`` confirms numerically. Engines keep their build-time shapes,
so per-frame ``tensorrt_plan`` models are not batched across requests (one request carries a batch of frames).
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import parity
from ..errors import UsageError, WeightsError
from ..runtime.manifest import load_manifest, verified_path
from ..stages import DEFAULT_PIPELINE, STAGES, Stage
from . import layout
from .layout import AVATAR, TALKING_HEAD, TALKING_HEAD_WHOLE, Field

STAGE_BACKENDS = ("native", "python")
QUEUE_DELAY_US = 2000          # how long a per-frame request may wait for others to form a batch
MAX_STREAMS = 64               # streams one talking_head instance serves at once (threads waiting on BLS)
STREAM_IDLE_S = 60             # a chunked stream silent this long is dropped (by Triton and by the model)
GLUE_MODELS = ((AVATAR, "AvatarModel"), (TALKING_HEAD, "TalkingHeadModel"), (TALKING_HEAD_WHOLE, "TalkingHeadModel"))
MODEL_FILE = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}


@dataclass
class Placement:
    """Where instances run: ``gpus`` (ids) with ``count`` instances of each stage model per GPU, or the CPU."""

    kind: str = "gpu"                       # gpu | cpu
    gpus: tuple[int, ...] = ()              # empty: every GPU the server sees
    count: int = 1
    glue_count: int = 1                     # instances of the glue models (their work is mostly waiting)
    threads: int = 0                        # intra-op threads per CPU stage instance (0: one per core)

    def stage_parameters(self) -> dict[str, str]:
        return {layout.INTRA_OP_THREADS: str(self.threads)} if self.kind == "cpu" and self.threads else {}

    def instance_group(self, glue: bool = False) -> str:
        count = self.glue_count if glue else self.count
        if glue or self.kind == "cpu":
            return f"instance_group [ {{ kind: KIND_CPU count: {count} }} ]"
        if not self.gpus:
            return f"instance_group [ {{ kind: KIND_GPU count: {count} }} ]"
        groups = ", ".join(f"{{ kind: KIND_GPU count: {count} gpus: [ {g} ] }}" for g in self.gpus)
        return f"instance_group [ {groups} ]"


def _field_text(field: Field) -> str:
    optional = " optional: true" if field.optional else ""
    return (f'{{ name: "{field.name}" data_type: TYPE_{field.triton_dtype} '
            f'dims: [ {", ".join(map(str, field.dims))} ]{optional} }}')


def _io_text(inputs, outputs) -> str:
    ins = ",\n  ".join(_field_text(f) for f in inputs)
    outs = ",\n  ".join(_field_text(f) for f in outputs)
    return f"input [\n  {ins}\n]\noutput [\n  {outs}\n]\n"


def _parameters(values: dict[str, str]) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in values.items())


def stage_config(stage: Stage, size: int, how: str, placement: Placement, batched: bool,
                 preferred: tuple[int, ...], parameters: Optional[dict] = None) -> str:
    """``max_batch_size`` is the largest preferred batch size (the profile's maximum unless capped)."""
    """config.pbtxt of one stage model; ``how`` is a platform or ``python``."""
    inputs, outputs = layout.stage_fields(stage, size)
    if not batched:           # one request = one call with the stage table's own shapes
        inputs = tuple(Field(t.name, t.dtype, tuple(t.resolve(size, batch=-1, frames=-1))) for t in stage.inputs)
        outputs = tuple(Field(t.name, t.dtype, tuple(t.resolve(size, batch=-1, frames=-1))) for t in stage.outputs)
    head = f'backend: "python"' if how == "python" else f'platform: "{how}"'
    text = f'name: "{stage.name}"\n{head}\nmax_batch_size: {max(preferred) if batched else 0}\n'
    text += _io_text(inputs, outputs)
    if batched:
        sizes = ", ".join(map(str, preferred))
        text += (f"dynamic_batching {{ preferred_batch_size: [ {sizes} ] "
                 f"max_queue_delay_microseconds: {QUEUE_DELAY_US} }}\n")
    text += placement.instance_group() + "\n"
    return text + _parameters(parameters or {})


def _sequence_batching() -> str:
    """Chunks of one stream are a Triton sequence: the batcher keeps them in order on one instance and tells the
    model which stream (CORRID) a chunk belongs to and whether it starts or ends it. The ``oldest`` strategy lets
    one instance hold many streams at once (``direct`` would hold one per instance without batching)."""
    controls = ((layout.SEQUENCE_START, "CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ]"),
                (layout.SEQUENCE_END, "CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ]"),
                (layout.SEQUENCE_ID, "CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64"))
    inputs = ",\n".join(f'    {{ name: "{name}" control [ {{ kind: {kind} }} ] }}' for name, kind in controls)
    return (f"sequence_batching {{\n  max_sequence_idle_microseconds: {STREAM_IDLE_S * 1_000_000}\n"
            f"  control_input [\n{inputs}\n  ]\n  oldest {{ max_candidate_sequences: {MAX_STREAMS} }}\n}}\n")


def glue_config(name: str, placement: Placement, parameters: dict) -> str:
    if name == AVATAR:
        inputs, outputs, extra = layout.AVATAR_INPUTS, layout.AVATAR_OUTPUTS, ""
    else:
        chunked = name == TALKING_HEAD
        inputs = layout.TALKING_HEAD_INPUTS if chunked else layout.TALKING_HEAD_WHOLE_INPUTS
        outputs = layout.TALKING_HEAD_OUTPUTS
        extra = "model_transaction_policy { decoupled: true }\n" + (_sequence_batching() if chunked else "")
        parameters = {**parameters, "chunked": str(int(chunked)), "max_streams": str(MAX_STREAMS),
                      "stream_idle_s": str(STREAM_IDLE_S)}
    text = f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n{extra}' + _io_text(inputs, outputs)
    return text + placement.instance_group(glue=True) + "\n" + _parameters(parameters)


def _python_model(entry: str) -> str:
    return ("# Generated by sadtalker-rt triton-repo: the model is this package's; see sadtalker_rt.triton.models.\n"
            "import os\nimport sys\n\n"
            "# The backend's stub embeds Python in isolated mode, which ignores PYTHONPATH: honour it as python3 does.\n"
            "sys.path[:0] = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p and p not in sys.path]\n"
            f"from sadtalker_rt.triton.models import {entry} as TritonPythonModel  # noqa: E402,F401\n")


def batched_graph(source: Path, stage: Stage, target: Path) -> None:
    """Copy a per-frame stage's graph with its per-avatar inputs batched (first axis named ``batch``)."""
    import onnx

    model = onnx.load(str(source))
    names = set(layout.batched_inputs(stage))
    for graph_input in model.graph.input:
        if graph_input.name in names:
            graph_input.type.tensor_type.shape.dim[0].dim_param = "batch"
    del model.graph.value_info[:]        # intermediate shapes recorded at export assumed one avatar row
    onnx.save(model, str(target))


def check_batched_graph(original: Path, batched: Path, stage: Stage, size: int) -> float:
    """Run two different per-avatar rows through the batched graph in one call and each alone through the
    original: each row must agree within the stage's FP32 tolerance (``parity.judge``). Returns the worst
    judged value; WeightsError names the output that does not agree."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    rows = []
    for _ in range(2):
        feeds = {}
        for t in stage.inputs:
            shape = t.resolve(size, batch=1, frames=1)
            feeds[t.name] = (rng.standard_normal(shape) * (0.3 if t.kind == "keypoints" else 1.0)).astype(t.dtype)
        rows.append(feeds)
    providers = ["CPUExecutionProvider"]
    names = [t.name for t in stage.outputs]
    alone = [ort.InferenceSession(str(original), providers=providers).run(names, r) for r in rows]
    together = ort.InferenceSession(str(batched), providers=providers).run(
        names, {n: np.concatenate([r[n] for r in rows]) for n in rows[0]})
    worst = 0.0
    for i, name in enumerate(names):
        for k in range(2):
            verdict = parity.judge(f"{stage.name}.{name}[{k}]", together[i][k:k + 1], alone[k][i],
                                   stage.tolerance("fp32", name))
            if not verdict:
                raise WeightsError(f"the batched {stage.name} graph differs from one avatar at a time: "
                                   f"{verdict.name} {verdict.problem}.")
            worst = max(worst, verdict.value)
    return worst


def write_repository(artifacts: Path, output: Path, stage_backend: str = "native", engines: Optional[Path] = None,
                     placement: Optional[Placement] = None, avatar_store: Optional[str] = None,
                     check: bool = True, overwrite: bool = False, max_batch: Optional[int] = None) -> dict:
    """Write the repository into ``output`` (made beside it and renamed when complete); returns a summary."""
    if stage_backend not in STAGE_BACKENDS:
        raise UsageError(f"--stage-backend must be native or python, not '{stage_backend}'.")
    if engines is not None and stage_backend != "native":
        raise UsageError("--engines are served by the native (tensorrt_plan) stage models; "
                         "leave out --stage-backend python.")
    artifacts, output = Path(artifacts), Path(output)
    manifest = load_manifest(artifacts)
    size = int(manifest["size"])
    missing = [name for name in DEFAULT_PIPELINE if name not in manifest["stages"]]
    if missing:
        raise WeightsError(f"{artifacts} lacks the stages {', '.join(missing)}; export them for a repository.")
    served = [name for name in STAGES if name in manifest["stages"]]
    engine_record = _engines_record(engines) if engines is not None else None
    placement = placement or Placement(kind="cpu" if stage_backend == "python" else "gpu")
    if output.exists() and not overwrite:
        raise UsageError(f"{output} exists; choose another folder or pass --overwrite.")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    summary = {"size": size, "stage_backend": stage_backend, "models": {}, "checks": {}}
    batched_stages = []
    try:
        for name in served:
            stage = STAGES[name]
            folder = staging / name / "1"
            folder.mkdir(parents=True)
            graph = verified_path(artifacts, manifest, name)
            platform = "tensorrt_plan" if engine_record is not None else "onnxruntime_onnx"
            batched = layout.batched(stage) and platform == "onnxruntime_onnx"
            preferred = layout.preferred_batch_sizes(stage)
            if engine_record is not None:
                shutil.copyfile(Path(engines) / engine_record["stages"][name]["file"], folder / MODEL_FILE[platform])
                preferred = tuple(sorted({engine_record["opt_batch"], engine_record["max_batch"]}))
            elif batched:
                batched_graph(graph, stage, folder / "model.onnx")
                if check:
                    summary["checks"][name] = check_batched_graph(graph, folder / "model.onnx", stage, size)
            else:
                shutil.copyfile(graph, folder / "model.onnx")
            if batched:
                batched_stages.append(name)
                if max_batch is not None:       # a cap below the profile (host memory of CPU instances)
                    preferred = tuple(sorted({min(p, max_batch) for p in preferred}))
            if stage_backend == "python":
                (folder / "model.py").write_text(_python_model("StageModel"))
                config = stage_config(stage, size, "python", placement, batched, preferred,
                                      {"stage": name, "graph": "model.onnx", "size": str(size),
                                       **placement.stage_parameters()})
            else:
                config = stage_config(stage, size, platform, placement, batched, preferred,
                                      placement.stage_parameters())
            (staging / name / "config.pbtxt").write_text(config)
            summary["models"][name] = {"how": "python" if stage_backend == "python" else platform,
                                       "batched": batched, "preferred_batch_size": list(preferred) if batched else []}
        store = avatar_store or _default_store(output)
        glue = {"size": str(size), "avatar_store": store, "batched_stages": ",".join(batched_stages),
                "stages": ",".join(served)}
        for name, entry in GLUE_MODELS:
            (staging / name / "1").mkdir(parents=True)
            (staging / name / "1" / "model.py").write_text(_python_model(entry))
            (staging / name / "config.pbtxt").write_text(glue_config(name, placement, glue))
            summary["models"][name] = {"how": "python", "decoupled": name != AVATAR, "chunked": name == TALKING_HEAD}
        (staging / "README.txt").write_text(_readme(artifacts, manifest, stage_backend, engines))
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary["avatar_store"] = store
    return summary


def _default_store(output: Path) -> str:
    """Avatar features live outside the repository (Triton reads every folder there as a model)."""
    key = hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:12]
    return str(Path(tempfile.gettempdir()) / f"sadtalker-rt-avatars-{key}")


def _engines_record(engines: Path) -> dict:
    """The engines' record, read and checked as the TensorRT backend reads it: every stage of the pipeline has an
    engine file that matches its recorded sha256."""
    from ..runtime.engine_plan import engine_file_problem, load_engines_record

    record = load_engines_record(Path(engines))
    missing = [name for name in DEFAULT_PIPELINE if name not in record["stages"]]
    if missing:
        raise WeightsError(f"{engines} lacks engines for {', '.join(missing)}.")
    for name, entry in record["stages"].items():
        problem = engine_file_problem(engines, entry)
        if problem is not None:
            raise WeightsError(f"The {name} engine in {engines} cannot be served: {problem}.")
    return record


def _readme(artifacts: Path, manifest: dict, stage_backend: str, engines: Optional[Path]) -> str:
    weights = manifest.get("weights", {}).get("description", "unknown weights")
    source = f"engines {engines.name}" if engines is not None else f"graphs {artifacts.name}"
    return (f"Triton model repository made by `sadtalker-rt triton-repo` from {source} ({weights}, size "
            f"{manifest['size']}, {manifest.get('precision')}); stage models: {stage_backend}.\n"
            "The Python models import the sadtalker_rt package: install it in the server's Python.\n")
