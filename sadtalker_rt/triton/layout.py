"""How the stage table becomes Triton models: one model per stage, named after it, with the stage's tensors.

Per-frame stages are batched by Triton across requests (``max_batch_size`` > 0): Triton concatenates requests
along the first axis, so every input needs one there. Their per-avatar inputs (a leading 1 in the stage table,
broadcast over the frames of one call) therefore carry one row per frame in Triton, and the repository's graphs
for these stages take them batched (``batched_inputs``). Other stages run one request at a time with the stage
table's shapes, dynamic axes as -1. The glue models (``AVATAR``, ``TALKING_HEAD``) are declared here too, so the
repository writer, the Python models and the clients read one description.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..stages import BATCH, FRAMES, Stage, Tensor

# The model parameter that sets a CPU instance's threads per call: the name Triton's onnxruntime backend reads,
# and the Python stage models read it too.
INTRA_OP_THREADS = "intra_op_thread_count"
TRITON_DTYPES = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8"}

AVATAR = "avatar"                # photo -> avatar id (features cached on the server)
TALKING_HEAD = "talking_head"    # avatar id + audio in chunks (a Triton sequence) -> frames, streamed (decoupled)
TALKING_HEAD_WHOLE = "talking_head_whole"   # the same for the whole audio in one request: HTTP generate_stream
                                            # carries no correlation id, so it cannot drive a sequence


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str                   # numpy name
    dims: tuple[int, ...]        # without the batch axis of batched models; -1 for variable
    optional: bool = False

    @property
    def triton_dtype(self) -> str:
        return TRITON_DTYPES[self.dtype]


def batched(stage: Stage) -> bool:
    """Per-frame stages take Triton's dynamic batching."""
    return stage.rate == "frame"


def batched_inputs(stage: Stage) -> tuple[str, ...]:
    """Inputs of a per-frame stage that the stage table gives one row for all frames (made one row per frame)."""
    return tuple(t.name for t in stage.inputs if batched(stage) and BATCH not in t.shape)


def max_batch_size(stage: Stage) -> int:
    return stage.profile[2] if batched(stage) else 0


def preferred_batch_sizes(stage: Stage) -> tuple[int, ...]:
    """The engine profile's optimum and maximum: the batches the engines run best and the most they take."""
    return tuple(sorted({stage.profile[1], stage.profile[2]})) if batched(stage) else ()


def _dims(tensor: Tensor, size: int, drop_batch: bool) -> tuple[int, ...]:
    shape = tensor.resolve(size, **{BATCH: -1, FRAMES: -1})
    return shape[1:] if drop_batch else shape


def stage_fields(stage: Stage, size: int) -> tuple[tuple[Field, ...], tuple[Field, ...]]:
    """(inputs, outputs) of the stage's Triton model at render size ``size``."""
    drop = batched(stage)
    inputs = tuple(Field(t.name, t.dtype, _dims(t, size, drop)) for t in stage.inputs)
    outputs = tuple(Field(t.name, t.dtype, _dims(t, size, drop)) for t in stage.outputs)
    return inputs, outputs


# The glue. Strings travel as UINT8 (UTF-8 bytes): the Python backend's stub exchanges tensors through DLPack,
# which has no string type.
AVATAR_INPUTS = (Field("image", "uint8", (-1,)), Field("preprocess", "uint8", (-1,), optional=True))
AVATAR_OUTPUTS = (Field("avatar_id", "uint8", (-1,)), Field("width", "int32", (1,)), Field("height", "int32", (1,)))

# Options of ``runtime.pipeline.Options`` a request may set; absent ones take their defaults.
OPTION_FIELDS = (Field("pose_style", "int32", (1,), True), Field("seed", "int32", (1,), True),
                 Field("expression_scale", "float32", (1,), True), Field("still", "int32", (1,), True),
                 Field("batch_size", "int32", (1,), True))
TALKING_HEAD_WHOLE_INPUTS = (Field("avatar_id", "uint8", (-1,)), Field("audio", "float32", (-1,))) + OPTION_FIELDS
# In a sequence the avatar and the options come with the first chunk (the one that starts the sequence).
TALKING_HEAD_INPUTS = (Field("avatar_id", "uint8", (-1,), optional=True), Field("audio", "float32", (-1,))) \
    + OPTION_FIELDS
# The sequence batcher's control inputs: Triton fills them from the request's sequence flags and id.
SEQUENCE_START, SEQUENCE_END, SEQUENCE_ID = "START", "END", "CORRID"
TALKING_HEAD_OUTPUTS = (Field("frame", "uint8", (-1, -1, 3)), Field("index", "int32", (1,)))
