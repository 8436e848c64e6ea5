"""FP16 compute with FP32 islands, decided on the ONNX graph itself.

TensorRT 11 networks are strongly typed: an engine computes in whatever precision its ONNX graph says,
so an "FP16 engine" is built from a mixed-precision graph, and that graph can be checked on CPU with
onnxruntime. Three plain functions make it:

1. ``measure_activation_ranges``: run the FP32 graph on calibration feeds with every intermediate float
   tensor reduced in the graph to its max |x| (inf where a value is not finite), and record it per tensor.
2. ``choose_fp32_islands``: the nodes that stay FP32, each with its reason: the policy below, the
   published recipe (a node whose output exceeds ``threshold`` on calibration data stays FP32), and any
   node with an input that float16 cannot represent at all (|x| > 65504).
3. ``convert_to_mixed_precision``: FP16 everywhere else, a Cast on every float edge between the two
   precisions, graph inputs and outputs kept float32, integer tensors untouched.

The policy (``FP32Policy``), applied in this order, first reason wins:

- op types (``DEFAULT_FP32_OPS``): grid sampling, normalisation ops, reduction statistics, Range and
  ConstantOfShape;
- Softmax/LogSoftmax over an axis of at least ``softmax_min_axis`` elements (0: every softmax; an axis of
  unknown size counts as large);
- normalisation math: Exp/Log/Pow/Sqrt/Reciprocal/Div that feed a statistic or a normalisation op or read
  a statistic, and the elementwise chain that carries a statistic (mean, variance + eps, a softmax-weighted
  sum) to its use;
- coordinates: ``coordinate_slice`` from every GridSample grid input (and ``coordinate_anchors``): the
  producers walked back until a Conv/ConvTranspose output, a graph input or a constant;
- shape arithmetic: the same backward slice from float tensors read by inputs that ONNX fixes to float32
  (Resize scales, ...) and from the float inputs of Range and ConstantOfShape;
- layout ops (Reshape, Transpose, ...) whose float inputs all come from FP32 nodes or graph inputs follow
  them: that moves a Cast later and often saves a Cast pair.

Which inputs of a node become float16 is read from the ONNX op schemas: only inputs bound to the same
type variable as one of the node's outputs. Control-flow nodes (If, Loop, Scan) are not supported;
traced SadTalker graphs have none. onnx and onnxruntime are imported inside the functions.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

FLOAT, FLOAT16 = 1, 10            # onnx.TensorProto.FLOAT and FLOAT16
FP16_MAX = 65504.0
DEFAULT_THRESHOLD = 1e4           # ~FP16_MAX / 6.5: headroom for inputs larger than the calibration ones

GRID_OPS = frozenset({"GridSample"})
NORMALISATION_OPS = frozenset({"InstanceNormalization", "LayerNormalization", "GroupNormalization",
                               "MeanVarianceNormalization", "LpNormalization"})
STATISTIC_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
                           "ReduceLogSumExp"})
INDEX_OPS = frozenset({"Range", "ConstantOfShape"})
DEFAULT_FP32_OPS = GRID_OPS | NORMALISATION_OPS | STATISTIC_OPS | INDEX_OPS
SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})
NORMALISATION_MATH_OPS = frozenset({"Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Div"})
STATISTIC_CARRIERS = NORMALISATION_MATH_OPS | {"Add", "Sub", "Mul", "Neg", "Abs", "Max", "Min", "Clip", "Reshape",
                                               "Unsqueeze", "Squeeze", "Expand", "Identity", "Cast"}
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand", "Slice",
                        "Gather", "Concat", "Split", "Tile"})
SLICE_STOP_OPS = frozenset({"Conv", "ConvTranspose"})
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
TYPE_AGNOSTIC_OPS = frozenset({"Shape", "Size", "Cast"})    # read a float input of either precision as it comes


def _op_reason(op: str) -> str:
    if op in GRID_OPS:
        return f"{op}: grid sampling stays FP32 (half-precision coordinates quantize positions)"
    if op in NORMALISATION_OPS:
        return f"{op}: normalisation statistics stay FP32"
    if op in STATISTIC_OPS:
        return f"{op}: a reduction statistic over many elements stays FP32"
    if op in INDEX_OPS:
        return f"{op}: index and shape generators stay FP32"
    return f"{op}: FP32 by policy"


@dataclass(frozen=True)
class FP32Policy:
    """What stays FP32 whatever the measurements say; see the module docstring for each rule."""

    fp32_ops: frozenset[str] = DEFAULT_FP32_OPS
    softmax_min_axis: int = 0                     # softmax over an axis this long or longer stays FP32
    normalisation_math: bool = True
    coordinate_anchors: tuple[str, ...] = ()      # more tensors whose producers are coordinates
    slice_stop_ops: frozenset[str] = SLICE_STOP_OPS
    layout_follows_fp32: bool = True


DEFAULT_POLICY = FP32Policy()


# --- graph index -------------------------------------------------------------------------------------------

@dataclass
class _Graph:
    nodes: list                                   # the NodeProtos of the model given (not copies)
    names: list[str]
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple | None] = field(default_factory=dict)
    constants: set[str] = field(default_factory=set)      # initializers and Constant outputs
    inputs: set[str] = field(default_factory=set)
    outputs: list[str] = field(default_factory=list)
    opset: int = 0

    def is_float(self, name: str) -> bool:
        return bool(name) and self.types.get(name) == FLOAT

    def float_inputs(self, j: int, with_constants: bool = False) -> list[str]:
        return [t for t in self.nodes[j].input
                if self.is_float(t) and (with_constants or t not in self.constants)]


def node_names(graph) -> list[str]:
    """Each node's name; unnamed or repeated names get ``<op>_<index>``, the same on every call."""
    seen, names = set(), []
    for i, node in enumerate(graph.node):
        name = node.name if node.name and node.name not in seen else f"{node.op_type}_{i}"
        seen.add(name)
        names.append(name)
    return names


def _model_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _value_info_types(vi) -> tuple[int | None, tuple | None]:
    if not vi.type.HasField("tensor_type"):
        return None, None
    tensor = vi.type.tensor_type
    shape = None
    if tensor.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return tensor.elem_type, shape


def _index(model) -> _Graph:
    import onnx

    _reject_control_flow(model.graph)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph     # data_prop: shapes via Reshape
    g = _Graph(list(model.graph.node), node_names(model.graph), opset=_model_opset(model))
    g.inputs = {vi.name for vi in model.graph.input}
    g.outputs = [vi.name for vi in model.graph.output]
    for vi in (*inferred.input, *inferred.value_info, *inferred.output):
        elem_type, shape = _value_info_types(vi)
        if elem_type:
            g.types[vi.name], g.shapes[vi.name] = elem_type, shape
    for init in model.graph.initializer:
        g.types[init.name], g.shapes[init.name] = init.data_type, tuple(init.dims)
        g.constants.add(init.name)
    for j, node in enumerate(g.nodes):
        for slot, name in enumerate(node.input):
            if name:
                g.consumers.setdefault(name, []).append((j, slot))
        for name in node.output:
            if name:
                g.producer[name] = j
        if node.op_type == "Constant":
            g.constants.update(node.output)
    return g


def _reject_control_flow(graph) -> None:
    found = sorted({n.op_type for n in graph.node if n.op_type in CONTROL_FLOW_OPS})
    if found:
        raise ValueError(f"mixed precision does not handle control flow ({', '.join(found)}); "
                         "export a traced graph without it")


def _schema(node, opset: int):
    import onnx

    if node.domain not in ("", "ai.onnx"):
        return None
    try:
        return onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return None


def _formal_type(params, slot: int) -> str | None:
    import onnx

    if slot < len(params):
        return params[slot].type_str
    if params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return params[-1].type_str
    return None


# --- calibration -------------------------------------------------------------------------------------------

def measure_activation_ranges(model, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Max |x| of every float graph input and node output over the calibration feeds, in FP32.

    The graph is run in onnxruntime (CPU) once per feed on a copy that reduces each intermediate tensor in the
    graph to two scalars, max |x| and sum(x * 0) (NaN when any value is infinite or NaN), and outputs only
    those: memory stays that of one inference, however large the activations (exposing the enhancer's
    512 x 512 activations as outputs held gigabytes). A tensor with non-finite values gets ``inf`` and a
    warning names it.
    """
    import onnxruntime as ort

    g = _index(model)
    ranges: dict[str, float] = {}
    for feed in feeds:
        for name, value in feed.items():
            if g.is_float(name):
                _record(ranges, name, value)
    names = [t for node in g.nodes if node.op_type != "Constant" for t in node.output if g.is_float(t)]
    probe, outputs = _reduction_probe(model, names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # onnxruntime's default order runs the reductions after the whole graph, keeping every activation alive
    # (measured: a 40-layer chain of 16 MiB activations peaked 1.3 GiB higher); by priority each runs as soon as
    # its tensor exists (15 MiB).
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del probe
    for feed in feeds:
        values = dict(zip(outputs, session.run(outputs, feed)))
        for name in names:
            peak, poison = float(values[f"{name}__peak"]), float(values[f"{name}__finite"])
            ranges[name] = max(ranges.get(name, 0.0), peak if math.isfinite(poison) else math.inf)
    bad = sorted(t for t, v in ranges.items() if not math.isfinite(v))
    if bad:
        warnings.warn(f"{len(bad)} tensors are not finite in FP32 on the calibration feeds: {', '.join(bad[:8])}",
                      stacklevel=2)
    return ranges


def _reduction_probe(model, names: list[str]):
    """A copy of ``model`` whose outputs are ``NAME__peak`` (max |x|) and ``NAME__finite`` (sum(x * 0)) for each
    tensor NAME, the reductions placed right after their producers so each activation can be freed early."""
    import onnx
    from onnx import helper

    probe = _copy(model)
    graph = probe.graph
    wanted = set(names)
    zero = "calibration__zero"
    graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), zero))
    nodes, outputs = [], []
    for node in graph.node:
        nodes.append(node)
        for t in node.output:
            if t not in wanted:
                continue
            nodes += [helper.make_node("Abs", [t], [f"{t}__abs"]),
                      helper.make_node("ReduceMax", [f"{t}__abs"], [f"{t}__peak"], keepdims=0),
                      helper.make_node("Mul", [t, zero], [f"{t}__zeroed"]),
                      helper.make_node("ReduceSum", [f"{t}__zeroed"], [f"{t}__finite"], keepdims=0)]
            outputs += [f"{t}__peak", f"{t}__finite"]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(t, FLOAT, None) for t in outputs)
    return probe, outputs


def _record(ranges: dict[str, float], name: str, value: np.ndarray) -> None:
    value = np.asarray(value)
    if value.size == 0:
        peak = 0.0
    elif not np.isfinite(value).all():
        peak = math.inf
    else:
        peak = float(np.abs(value).max())
    ranges[name] = max(ranges.get(name, 0.0), peak)


def _copy(model):
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _clone(node):
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


# --- choosing the islands ----------------------------------------------------------------------------------

def coordinate_slice(model, anchors: Iterable[str], stop_ops: Iterable[str] = SLICE_STOP_OPS) -> set[str]:
    """Names of the nodes that compute the float tensors ``anchors``, walked back through their producers
    until a ``stop_ops`` output (a Conv's features), a graph input or a constant. Constant nodes are not
    included: constants take the precision of their consumers."""
    g = _index(model)
    return {g.names[j] for j in _backward_slice(g, anchors, frozenset(stop_ops))}


def _backward_slice(g: _Graph, anchors: Iterable[str], stop_ops: frozenset[str]) -> list[int]:
    seen, marked, stack = set(), [], list(anchors)
    while stack:
        tensor = stack.pop()
        if tensor in seen or not g.is_float(tensor):
            continue
        seen.add(tensor)
        j = g.producer.get(tensor)
        if j is None or g.nodes[j].op_type in stop_ops or g.nodes[j].op_type == "Constant":
            continue
        marked.append(j)
        stack.extend(g.nodes[j].input)
    return sorted(set(marked))


def choose_fp32_islands(model, ranges: Mapping[str, float], threshold: float = DEFAULT_THRESHOLD,
                        policy: FP32Policy = DEFAULT_POLICY) -> dict[str, str]:
    """Node name -> reason, for every node that stays FP32. ``ranges`` come from ``measure_activation_ranges``.

    Layout ops following FP32 nodes assume graph inputs stay float32 (``keep_io_types=True``).
    """
    g = _index(model)
    islands: dict[int, str] = {}

    def add(found: dict[int, str]) -> None:
        for j, reason in found.items():
            islands.setdefault(j, reason)

    add(_unknown_ops(g))
    add(_policy_ops(g, policy))
    add(_large_softmax(g, policy.softmax_min_axis))
    if policy.normalisation_math:
        add(_normalisation_math(g))
    add(_coordinates(g, policy))
    add(_shape_arithmetic(g, policy.slice_stop_ops))
    add(_large_outputs(g, ranges, threshold))
    add(_unrepresentable_inputs(g, ranges, _constant_magnitudes(model)))
    if policy.layout_follows_fp32:
        add(_layout_following_fp32(g, islands))
    return {g.names[j]: islands[j] for j in sorted(islands)}


def _compute_nodes(g: _Graph) -> Iterable[int]:
    return (j for j, node in enumerate(g.nodes) if node.op_type != "Constant")


def _unknown_ops(g: _Graph) -> dict[int, str]:
    return {j: f"{g.nodes[j].op_type}: no ONNX schema (custom op), left as it is"
            for j in _compute_nodes(g) if _schema(g.nodes[j], g.opset) is None}


def _policy_ops(g: _Graph, policy: FP32Policy) -> dict[int, str]:
    return {j: _op_reason(g.nodes[j].op_type) for j in _compute_nodes(g) if g.nodes[j].op_type in policy.fp32_ops}


def _softmax_axis_size(g: _Graph, node) -> int | None:
    shape = g.shapes.get(node.input[0])
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    if not shape or not -len(shape) <= axis < len(shape):
        return None
    return shape[axis]


def _large_softmax(g: _Graph, min_axis: int) -> dict[int, str]:
    found = {}
    for j in _compute_nodes(g):
        node = g.nodes[j]
        if node.op_type in SOFTMAX_OPS:
            size = _softmax_axis_size(g, node)
            if size is None or size >= min_axis:
                length = "unknown length" if size is None else f"{size} elements"
                found[j] = f"{node.op_type} over an axis of {length} stays FP32"
    return found


def _normalisation_math(g: _Graph) -> dict[int, str]:
    """Statistic-derived tensors flow forward from reductions through elementwise ops (graph order is
    topological); math ops that read them, or feed a reduction or normalisation, stay FP32."""
    derived: set[str] = set()
    found = {}
    for j in _compute_nodes(g):
        node = g.nodes[j]
        if node.op_type in STATISTIC_OPS:
            derived.update(node.output)
            continue
        data = g.float_inputs(j)
        if node.op_type in STATISTIC_CARRIERS and data and all(t in derived for t in data):
            derived.update(node.output)
            found[j] = f"{node.op_type}: carries a reduction statistic (mean, variance, sum) to its use"
        elif node.op_type in NORMALISATION_MATH_OPS and (any(t in derived for t in data) or _feeds_statistic(g, j)):
            found[j] = f"{node.op_type}: normalisation math next to a statistic"
    return found


def _feeds_statistic(g: _Graph, j: int) -> bool:
    targets = STATISTIC_OPS | NORMALISATION_OPS
    return any(g.nodes[c].op_type in targets for t in g.nodes[j].output for c, _ in g.consumers.get(t, ()))


def _coordinates(g: _Graph, policy: FP32Policy) -> dict[int, str]:
    found = {}
    anchors = [(n.input[1], n.name or "GridSample") for n in g.nodes if n.op_type == "GridSample"]
    anchors += [(t, t) for t in policy.coordinate_anchors]
    for tensor, owner in anchors:
        for j in _backward_slice(g, [tensor], policy.slice_stop_ops):
            found.setdefault(j, f"{g.nodes[j].op_type}: coordinates on the path to '{owner}'")
    return found


def _shape_arithmetic(g: _Graph, stop_ops: frozenset[str]) -> dict[int, str]:
    """Backward slice from float inputs that ONNX fixes to float32 (Resize scales) and from index generators."""
    found = {}
    for j in _compute_nodes(g):
        node = g.nodes[j]
        schema = _schema(node, g.opset)
        if schema is None:
            continue
        fixed = [node.input[slot] for slot in _float32_only_slots(node, schema) if g.is_float(node.input[slot])]
        if node.op_type in INDEX_OPS:
            fixed = g.float_inputs(j)
        for k in _backward_slice(g, fixed, stop_ops):
            found.setdefault(k, f"{g.nodes[k].op_type}: shape arithmetic for {node.op_type} '{g.names[j]}'")
    return found


def _float32_only_slots(node, schema) -> list[int]:
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    slots = []
    for slot in range(len(node.input)):
        formal = _formal_type(schema.inputs, slot)
        admits = allowed.get(formal, {formal})
        if node.input[slot] and "tensor(float)" in admits and "tensor(float16)" not in admits:
            slots.append(slot)
    return slots


def _large_outputs(g: _Graph, ranges: Mapping[str, float], threshold: float) -> dict[int, str]:
    found = {}
    for j in _compute_nodes(g):
        for t in g.nodes[j].output:
            peak = ranges.get(t)
            if peak is None or j in found:
                continue
            if not math.isfinite(peak):
                found[j] = f"{g.nodes[j].op_type}: output '{t}' is not finite on FP32 calibration data"
            elif peak > threshold:
                found[j] = f"{g.nodes[j].op_type}: output '{t}' reaches max |x| {peak:.3g} > {threshold:.3g}"
    return found


def _unrepresentable_inputs(g: _Graph, ranges: Mapping[str, float], constants: dict[str, float]) -> dict[int, str]:
    found = {}
    for j in _compute_nodes(g):
        for t in g.float_inputs(j, with_constants=True):
            peak = constants.get(t, ranges.get(t, 0.0))
            if peak > FP16_MAX and j not in found:
                found[j] = f"{g.nodes[j].op_type}: input '{t}' reaches {peak:.3g}, beyond float16 (65504)"
    return found


def _constant_magnitudes(model) -> dict[str, float]:
    import onnx

    found = {}
    for init in model.graph.initializer:
        if init.data_type == FLOAT:
            found[init.name] = _peak(onnx.numpy_helper.to_array(init))
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = _constant_value(node)
            if value is not None and value.dtype == np.float32:
                found[node.output[0]] = _peak(value)
    return found


def _peak(array: np.ndarray) -> float:
    return float(np.abs(array).max()) if array.size else 0.0


def _layout_following_fp32(g: _Graph, islands: dict[int, str]) -> dict[int, str]:
    found: dict[int, str] = {}
    for j in _compute_nodes(g):
        node = g.nodes[j]
        if node.op_type not in LAYOUT_OPS or j in islands:
            continue
        data = g.float_inputs(j)
        if data and all(t in g.inputs or g.producer.get(t) in islands or g.producer.get(t) in found for t in data):
            found[j] = f"{node.op_type}: moves FP32 data, follows its producers (saves a Cast pair)"
    return found


def islands_summary(model, islands: Mapping[str, str] | Iterable[str]) -> list[dict]:
    """``[{node, op, reason}]`` in graph order, JSON-serialisable, for the export manifest."""
    reasons = dict(islands) if isinstance(islands, Mapping) else dict.fromkeys(islands, "")
    ops = dict(zip(node_names(model.graph), (n.op_type for n in model.graph.node)))
    order = {name: i for i, name in enumerate(ops)}
    return [{"node": name, "op": ops.get(name, "?"), "reason": reasons[name]}
            for name in sorted(reasons, key=lambda n: order.get(n, len(order)))]


# --- conversion --------------------------------------------------------------------------------------------

@dataclass
class _NodePlan:
    fp16_inputs: set[int] = field(default_factory=set)
    fp16_outputs: set[int] = field(default_factory=set)
    any_inputs: set[int] = field(default_factory=set)      # take either precision, no Cast


def _fp16_slots(node, schema, types: dict[str, int]) -> tuple[set[int], set[int]]:
    """Input and output slots bound to a type variable shared by an input and an output, that allows
    float16 and is float32 here: the slots that become float16 when the node computes in FP16."""
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    in_types = [_formal_type(schema.inputs, i) for i in range(len(node.input))]
    out_types = [_formal_type(schema.outputs, i) for i in range(len(node.output))]
    convertible = set()
    for var in set(in_types) & set(out_types):
        if var in allowed and "tensor(float16)" in allowed[var]:
            if any(types.get(node.input[i]) == FLOAT for i, t in enumerate(in_types) if t == var):
                convertible.add(var)
    inputs = {i for i, t in enumerate(in_types) if t in convertible and node.input[i]}
    outputs = {i for i, t in enumerate(out_types) if t in convertible and node.output[i]}
    return inputs, outputs


def _plan(node, schema, fp16: bool, types: dict[str, int]) -> _NodePlan:
    if node.op_type in TYPE_AGNOSTIC_OPS:
        to_float = node.op_type == "Cast" and _attribute(node, "to") == FLOAT
        return _NodePlan(any_inputs={0}, fp16_outputs={0} if fp16 and to_float else set())
    if not fp16 or schema is None:
        return _NodePlan()
    inputs, outputs = _fp16_slots(node, schema, types)
    return _NodePlan(fp16_inputs=inputs, fp16_outputs=outputs)


def _attribute(node, name: str):
    import onnx

    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _constant_value(node) -> np.ndarray | None:
    import onnx

    for attr in node.attribute:
        if attr.name == "value":
            return onnx.numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_floats"):
            return np.asarray(onnx.helper.get_attribute_value(attr), dtype=np.float32)
    return None


class _Rewriter:
    """Builds the new node list in graph order, creating Casts and float16 constants as consumers ask."""

    def __init__(self, g: _Graph, plans: list[_NodePlan], keep_io_types: bool):
        self.g, self.plans = g, plans
        self.used = set(g.types) | set(g.producer) | set(g.consumers) | set(g.names)
        self.carries16 = {t: True for j, p in enumerate(plans) for s, t in enumerate(g.nodes[j].output)
                          if s in p.fp16_outputs}
        if not keep_io_types:
            self.carries16.update({t: True for t in g.inputs if g.is_float(t) and t not in g.constants})
        self.source = {}                           # tensor -> the name its producer writes (outputs renamed)
        self.casts: dict[tuple[str, bool], str] = {}
        self.constant_names = self._plan_constants()
        self.nodes: list = []

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name

    def demands(self) -> dict[str, set[bool]]:
        wanted: dict[str, set[bool]] = {}
        for j, node in enumerate(self.g.nodes):
            for slot, t in enumerate(node.input):
                if t in self.g.constants and self.g.is_float(t) and slot not in self.plans[j].any_inputs:
                    wanted.setdefault(t, set()).add(slot in self.plans[j].fp16_inputs)
        for t in self.g.outputs:
            wanted.setdefault(t, set()).add(False)
        return wanted

    def _plan_constants(self) -> dict[tuple[str, bool], str]:
        names = {}
        for t, wanted in self.demands().items():
            if t not in self.g.constants or not self.g.is_float(t):
                continue
            names[(t, False)] = t
            if True in wanted:
                names[(t, True)] = t if wanted == {True} else self.unique(f"{t}_fp16")
        return names

    def read(self, t: str, want16: bool) -> str:
        if (t, want16) in self.constant_names:
            return self.constant_names[(t, want16)]
        carries = self.carries16.get(t, False)
        if want16 == carries or not self.g.is_float(t):
            return self.source.get(t, t)
        if (t, want16) not in self.casts:
            self.casts[(t, want16)] = self.unique(f"{t}_to_{'fp16' if want16 else 'fp32'}")
            self.nodes.append(_cast(self.source.get(t, t), self.casts[(t, want16)], want16))
        return self.casts[(t, want16)]


def _cast(src: str, dst: str, to16: bool, name: str = ""):
    import onnx

    return onnx.helper.make_node("Cast", [src], [dst], name=name or dst, to=FLOAT16 if to16 else FLOAT)


def convert_to_mixed_precision(model, fp32_nodes: set[str], keep_io_types: bool = True):
    """FP16 compute for every node not in ``fp32_nodes``; returns a checked, shape-inferred new model.

    Float initializers and Constant nodes read only by FP16 inputs become float16; those read by both
    precisions get a float16 copy. Every float edge between the precisions gets a Cast. With
    ``keep_io_types`` graph inputs and outputs stay float32 (Casts at entry and exit); without it float
    inputs become float16 and outputs carry their producer's precision. Integer tensors are untouched.
    """
    import onnx

    model = _copy(model)
    g = _index(model)
    unknown = sorted(set(fp32_nodes) - set(g.names))
    if unknown:
        raise ValueError(f"fp32_nodes names {len(unknown)} nodes that are not in the graph: "
                         f"{', '.join(unknown[:5])}")
    plans = [_plan(node, _schema(node, g.opset), _computes_fp16(node, name, fp32_nodes, g), g.types)
             for node, name in zip(g.nodes, g.names)]
    rewriter = _Rewriter(g, plans, keep_io_types)
    _convert_constants(model, g, rewriter)
    _rewrite_nodes(g, plans, rewriter, keep_io_types)
    nodes = [_clone(node) for node in rewriter.nodes]   # detach from the repeated field before clearing it
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]
    _set_io_types(model, g, rewriter, keep_io_types)
    onnx.checker.check_model(model, full_check=True)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _computes_fp16(node, name: str, fp32_nodes: set[str], g: _Graph) -> bool:
    return name not in fp32_nodes and node.op_type != "Constant" and _schema(node, g.opset) is not None


def _to_float16(name: str, array: np.ndarray, consumers: str) -> np.ndarray:
    peak = _peak(array)
    if peak > FP16_MAX:
        raise ValueError(f"constant '{name}' reaches {peak:.3g}, beyond float16; keep {consumers} in FP32")
    return array.astype(np.float16)


def _consumer_names(g: _Graph, t: str) -> str:
    return ", ".join(sorted({g.names[j] for j, _ in g.consumers.get(t, ())}))


def _convert_constants(model, g: _Graph, rewriter: _Rewriter) -> None:
    import onnx

    wanted16 = {t: name for (t, want16), name in rewriter.constant_names.items() if want16}
    initializers = {init.name: init for init in model.graph.initializer}
    for t, name in wanted16.items():
        if t not in initializers:
            continue                                  # Constant nodes are handled in graph order
        array = _to_float16(t, onnx.numpy_helper.to_array(initializers[t]), _consumer_names(g, t))
        if name == t:
            initializers[t].CopyFrom(onnx.numpy_helper.from_array(array, t))
        else:
            model.graph.initializer.append(onnx.numpy_helper.from_array(array, name))


def _constant_node16(node, g: _Graph, name: str):
    import onnx

    t = node.output[0]
    array = _to_float16(t, _constant_value(node), _consumer_names(g, t))
    return onnx.helper.make_node("Constant", [], [name], name=name if name != t else node.name,
                                 value=onnx.numpy_helper.from_array(array, name))


def _rewrite_nodes(g: _Graph, plans: list[_NodePlan], rewriter: _Rewriter, keep_io_types: bool) -> None:
    outputs = set(g.outputs)
    for j, node in enumerate(g.nodes):
        plan = plans[j]
        for slot, t in enumerate(node.input):
            if t and slot not in plan.any_inputs:
                node.input[slot] = rewriter.read(t, slot in plan.fp16_inputs)
            elif t:
                node.input[slot] = rewriter.source.get(t, t)
        if node.op_type == "Cast" and plan.fp16_outputs:
            next(a for a in node.attribute if a.name == "to").i = FLOAT16
        renamed = []
        for slot, t in enumerate(node.output):
            if keep_io_types and t in outputs and rewriter.carries16.get(t):
                rewriter.source[t] = node.output[slot] = rewriter.unique(f"{t}_fp16")
                renamed.append(t)
        if node.op_type == "Constant" and (node.output[0], True) in rewriter.constant_names:
            _emit_constant(node, g, rewriter)
        else:
            rewriter.nodes.append(node)
        for t in renamed:                             # exit Cast right away; float32 readers use it too
            rewriter.casts[(t, False)] = t
            rewriter.nodes.append(_cast(rewriter.source[t], t, to16=False, name=rewriter.unique(f"{t}_to_fp32")))


def _emit_constant(node, g: _Graph, rewriter: _Rewriter) -> None:
    t = node.output[0]
    name16 = rewriter.constant_names[(t, True)]
    if name16 != t:
        rewriter.nodes.append(node)
    rewriter.nodes.append(_constant_node16(node, g, name16))


def _set_io_types(model, g: _Graph, rewriter: _Rewriter, keep_io_types: bool) -> None:
    if keep_io_types:
        return
    for vi in (*model.graph.input, *model.graph.output):
        if rewriter.carries16.get(vi.name) and vi.type.tensor_type.elem_type == FLOAT:
            vi.type.tensor_type.elem_type = FLOAT16


# --- checking on CPU ---------------------------------------------------------------------------------------

def emulate_fp16_storage(model):
    """A float32 copy of a mixed-precision graph that rounds every float16 tensor through float16.

    onnxruntime's CPU provider runs most float16 nodes in float32: it inserts Casts around them and drops
    the Cast pairs between neighbours, so values that overflow float16 (|x| > 65504) or lose precision in
    it pass unnoticed. This copy computes in float32 but stores each FP16 node's output as float16 would
    (a Cast to float16 and back), which is what an FP16 engine does at every tensor boundary; arithmetic
    inside a node stays float32, like TensorRT's FP16 kernels with float32 accumulation. Run it with
    graph optimizations disabled so that no optimizer removes the round trips. Needs float32 graph IO.
    """
    import onnx

    model = _copy(model)
    graph = model.graph
    if any(vi.type.tensor_type.elem_type == FLOAT16 for vi in (*graph.input, *graph.output)):
        raise ValueError("emulate_fp16_storage needs float32 graph inputs and outputs (keep_io_types=True)")
    types = _index(model).types
    for init in graph.initializer:
        if init.data_type == FLOAT16:
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init).astype(np.float32), init.name))
    used = set(types) | {n.name for n in graph.node}
    nodes = []
    for node in graph.node:
        node = _clone(node)
        _widen_constant(node)
        nodes.append(node)
        for slot, t in enumerate(node.output):
            if types.get(t) == FLOAT16 and node.op_type != "Constant":
                nodes += _round_trip(node, slot, used)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return model


def _widen_constant(node) -> None:
    import onnx

    value = _constant_value(node) if node.op_type == "Constant" else None
    if value is not None and value.dtype == np.float16:
        del node.attribute[:]
        widened = onnx.numpy_helper.from_array(value.astype(np.float32))
        node.attribute.append(onnx.helper.make_attribute("value", widened))


def _round_trip(node, slot: int, used: set[str]) -> list:
    """Rename the node's float16 output and give its readers the float32 value that went through float16."""
    t = node.output[slot]
    stored = _fresh(f"{t}_stored_fp16", used)
    back = _cast(stored, t, to16=False, name=_fresh(f"{t}_widen", used))
    if node.op_type == "Cast":
        node.output[slot] = stored
        return [back]
    wide = _fresh(f"{t}_fp32", used)
    node.output[slot] = wide
    return [_cast(wide, stored, to16=True, name=_fresh(f"{t}_round", used)), back]


def _fresh(base: str, used: set[str]) -> str:
    name, k = base, 1
    while name in used:
        name, k = f"{base}_{k}", k + 1
    used.add(name)
    return name
