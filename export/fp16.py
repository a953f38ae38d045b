"""FP16 ONNX graphs for strongly typed TensorRT (docs/design.md section 5).

TensorRT 11 has no FP16 builder flag: precision comes from the tensor types
in the ONNX graph. This pass gives every node FP16 compute except the FP32
"islands" named by their stable scope (default: the DEGC normalisation,
k-means and k-NN, whose argmin/TopK decisions FP16 rounding would flip), and
inserts Cast nodes exactly at precision boundaries.

Range analysis (:func:`float_tensor_ranges`, :func:`overflow_nodes`): the
FP32 graph is run in ONNX Runtime on the validation (and calibration) images
with the max |value| of every float tensor exposed; every node that reads or
writes a tensor above ``FP16_SAFE_BOUND`` (65504 / 16) is kept in FP32 as
well, so weights that make activations grow past FP16's range give an FP16
graph that is FP16 where it can be and FP32 where it must be, instead of inf
and NaN (docs/design.md section 5).

Why our own pass and not onnxconverter-common or ModelOpt AutoCast:
onnxconverter-common (1.16) mis-types the exporter's Cast(to=FLOAT) nodes
inside k-means (ORT refuses the graph: "Type (tensor(float16)) of output arg
... does not match expected type"), and ModelOpt pulls in a large CUDA-centric
stack for what is here a 150-line, fully tested rewrite keyed on our stable
node names.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_FP32_ISLANDS = ("norm", "kmeans", "knn")
# every DEGC piece an island can name (node scopes `.../degc/<piece>/...` of the exported graph)
ISLAND_PIECES = ("norm", "kmeans", "knn", "centroids", "gat", "local")
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = 65504.0
# 4 binades of headroom: a tensor may reach 16x the largest |value| seen on the few analysed
# images (inputs unlike the validation/calibration images) before FP16 overflows. Constants
# cannot grow: they are only held to FP16_MAX. Below 4094 (just under 2**12) FP16's spacing is
# at most 2 (4 from 4096, 32 near 65504).
FP16_HEADROOM = 16.0
FP16_SAFE_BOUND = FP16_MAX / FP16_HEADROOM


def is_island(node_name: str, islands: Sequence[str]) -> bool:
    return any(f"degc/{piece}/" in node_name for piece in islands)


def _elem_types(model: onnx.ModelProto) -> Dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def convert_fp16(model: onnx.ModelProto, islands: Iterable[str] = DEFAULT_FP32_ISLANDS,
                 fp16_io: bool = False, keep_fp32: Iterable[str] = ()) -> onnx.ModelProto:
    """Return an FP16 copy of an FP32 ClusterViG graph with FP32 islands.

    ``keep_fp32``: names of further nodes computed in FP32 (the range analysis'
    :func:`overflow_nodes`); Casts are inserted at their boundaries as at the islands'.
    """
    islands = tuple(islands)
    keep = set(keep_fp32)
    src = onnx.ModelProto()
    src.CopyFrom(model)
    g = src.graph
    types = _elem_types(src)
    inits = {t.name: t for t in g.initializer}
    cur: Dict[str, int] = {}  # current element type of each float tensor
    for t in g.initializer:
        if t.data_type == F32:
            cur[t.name] = F32
    for i in g.input:
        if i.type.tensor_type.elem_type == F32:
            if fp16_io:
                i.type.tensor_type.elem_type = F16
                cur[i.name] = F16
            else:
                cur[i.name] = F32
    casts: Dict[Tuple[str, int], str] = {}
    new_inits = []
    new_nodes = []
    # a Cast is named after the node output it converts ("<node>:<i>:fp16/Cast"), which is its tensor's
    # name in an export, but not always (--normalize-in-graph leaves the wrapper's "model." on tensors)
    source = {o: f"{n.name}:{i}" for n in g.node if n.name for i, o in enumerate(n.output)}

    def as_type(name: str, want: int) -> str:
        if cur.get(name) in (None, want):
            return name
        key = (name, want)
        if key not in casts:
            if name in inits and inits[name].data_type == F32 and want == F16:
                arr = numpy_helper.to_array(inits[name]).astype(np.float16)
                new = f"{name}:fp16"
                new_inits.append(numpy_helper.from_array(arr, new))
            else:
                new = f"{name}:{'fp16' if want == F16 else 'fp32'}"
                label = f"{source.get(name, name)}:{'fp16' if want == F16 else 'fp32'}"
                new_nodes.append(helper.make_node("Cast", [name], [new], name=f"{label}/Cast", to=want))
            casts[key] = new
            cur[new] = want
        return casts[key]

    for node in g.node:
        want = F32 if is_island(node.name, islands) or node.name in keep else F16
        if node.op_type == "Cast":
            to = next(a for a in node.attribute if a.name == "to")
            if to.i == F32:
                to.i = want
        if want == F16 and node.op_type in ("Constant", "ConstantOfShape"):
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == F32:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        node.input[:] = [as_type(x, want) if x and types.get(x) == F32 else x for x in node.input]
        new_nodes.append(node)
        for out in node.output:
            if types.get(out) == F32:
                cur[out] = want
    # graph outputs keep their names; cast back to FP32 unless FP16 I/O was asked for
    for o in g.output:
        if types.get(o.name) != F32:
            continue
        want = F16 if fp16_io else F32
        if cur.get(o.name) != want:
            inner = f"{o.name}:{'fp16' if want == F32 else 'fp32'}"
            for n in new_nodes:
                n.output[:] = [inner if x == o.name else x for x in n.output]
                n.input[:] = [inner if x == o.name else x for x in n.input]
            new_nodes.append(helper.make_node("Cast", [inner], [o.name], name=f"{o.name}/Cast", to=want))
        o.type.tensor_type.elem_type = want
    used = {x for n in new_nodes for x in n.input}
    keep_inits = [t for t in g.initializer if t.name in used] + [t for t in new_inits if t.name in used]
    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    del g.value_info[:]
    return src


def float_tensor_ranges(model: onnx.ModelProto, batches: Iterable[np.ndarray]) -> Dict[str, float]:
    """Max |value| of every FP32 tensor of ``model`` over ``batches`` (fed to its first input).

    Graph inputs and node outputs are measured in ONNX Runtime through an
    Abs + ReduceMax probe per tensor (scalars come back, so the session keeps
    its memory planning; exposing the tensors themselves would hold all of them
    at once), FP32 initializers directly. A static-batch graph gets its batch
    at a time (the last chunk padded with its last image). NaN counts as inf.
    """
    import onnxruntime as ort
    from clustervig.utils import ort_session_options

    types = _elem_types(model)
    inits = {t.name for t in model.graph.initializer}
    tensors = [i.name for i in model.graph.input if types.get(i.name) == F32 and i.name not in inits]
    tensors += [o for n in model.graph.node for o in n.output if o and types.get(o) == F32]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    g = probe.graph
    del g.output[:]
    outs = []
    probes: Dict[str, List[onnx.NodeProto]] = {}
    for i, t in enumerate(tensors):
        a, m = f"range_probe/{i}/abs", f"range_probe/{i}/amax"
        probes[t] = [helper.make_node("Abs", [t], [a], name=f"range_probe/{i}/Abs"),
                     helper.make_node("ReduceMax", [a], [m], name=f"range_probe/{i}/ReduceMax", keepdims=0)]
        g.output.append(helper.make_tensor_value_info(m, F32, []))
        outs.append(m)
    # each probe right after the node that makes its tensor, and ONNX Runtime's priority-based order (ready
    # nodes by graph position) runs it there, so a tensor is freed once its consumers and probe have run; the
    # default order ran every probe after the whole graph, keeping all its tensors alive at once (cvig_s at
    # 800 x 1344, one image: 13.7 GB peak, 1.8 GB this way)
    nodes = [pn for t in tensors if t not in {o for n in g.node for o in n.output} for pn in probes[t]]
    for n in g.node:
        nodes.append(n)
        nodes += [pn for o in n.output if o in probes for pn in probes[o]]
    del g.node[:]
    g.node.extend(nodes)
    opts = ort_session_options()
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = model.graph.input[0].name
    static_b = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value  # 0: dynamic
    amax = np.zeros(len(tensors), np.float64)
    seen = 0
    for xb in batches:
        xb = np.ascontiguousarray(xb, dtype=np.float32)
        seen += len(xb)
        step = static_b or len(xb)
        for s in range(0, len(xb), step):
            x = xb[s:s + step]
            if static_b and len(x) < static_b:
                x = np.concatenate([x, np.repeat(x[-1:], static_b - len(x), axis=0)])
            got = np.array([float(v) for v in sess.run(outs, {inp: x})], np.float64)
            amax = np.maximum(amax, np.where(np.isnan(got), np.inf, got))
    if seen == 0:
        raise ValueError("range analysis needs at least one input image")
    ranges = dict(zip(tensors, amax.tolist()))
    for t in model.graph.initializer:
        if t.data_type == F32:
            arr = numpy_helper.to_array(t)
            ranges[t.name] = float(np.abs(arr).max()) if arr.size else 0.0
    return ranges


# ops whose float outputs only copy, select or shrink values of their float inputs: when those
# inputs are safe in FP16, so are the outputs, however large (the masked k-NN's -1e4 sentinel,
# chosen to be representable in FP16, passes through Where, the self-similarity ScatterElements and TopK this way)
COPY_OPS = frozenset({
    "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Expand", "Tile", "Concat", "Split",
    "Slice", "Gather", "GatherElements", "GatherND", "Where", "TopK", "Max", "Min", "ReduceMax", "ReduceMin",
    "MaxPool", "Relu", "Abs", "Neg", "Cast", "Pad", "ScatterElements",  # the exports scatter without a reduction
})


def _constant_outputs(model: onnx.ModelProto) -> set:
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type in ("Constant", "ConstantOfShape") for o in n.output}
    return consts


def unsafe_tensors(model: onnx.ModelProto, ranges: Dict[str, float], bound: float = FP16_SAFE_BOUND) -> set:
    """Float tensors that FP16 cannot be trusted to hold, from their measured max |value| (``ranges``).

    A tensor computed from the input must stay below ``bound`` (the headroom
    covers inputs unlike the analysed ones); a constant cannot grow and only
    has to fit FP16 (``FP16_MAX``); the output of a :data:`COPY_OPS` node
    whose float inputs are all safe only has to fit FP16 too, since its values
    are values of those inputs.
    """
    consts = _constant_outputs(model)
    unsafe = {t for t, v in ranges.items() if (v > FP16_MAX if t in consts else v > bound)}
    for n in model.graph.node:  # graph order is topological
        if n.op_type not in COPY_OPS or any(x in unsafe for x in n.input if x):
            continue
        for o in n.output:
            if o in unsafe and ranges[o] <= FP16_MAX:
                unsafe.discard(o)
    return unsafe


def overflow_nodes(model: onnx.ModelProto, ranges: Dict[str, float], islands: Iterable[str] = DEFAULT_FP32_ISLANDS,
                   bound: float = FP16_SAFE_BOUND) -> List[Dict]:
    """Nodes outside the islands that must stay FP32: they read or write an :func:`unsafe_tensors` tensor.

    An input counts as much as an output: the Cast into an FP16 node would
    overflow. Returns, in graph order, ``{"node", "op", "max_abs", "tensor"}``
    with the node's largest unsafe tensor.
    """
    islands = tuple(islands)
    unsafe = unsafe_tensors(model, ranges, bound)
    kept = []
    for n in model.graph.node:
        if is_island(n.name, islands):
            continue
        bad = [(ranges[t], t) for t in list(n.input) + list(n.output) if t in unsafe]
        if bad:
            v, t = max(bad)
            kept.append({"node": n.name, "op": n.op_type, "max_abs": v, "tensor": t})
    return kept


def count_precision(model: onnx.ModelProto, ops: Sequence[str] = ("Conv", "MatMul", "Gemm")) -> Dict[str, Dict[str, int]]:
    """For each op type, how many nodes compute in FP16 vs FP32 (by their first input's type)."""
    types = _elem_types(model)
    out: Dict[str, Dict[str, int]] = {op: {"fp16": 0, "fp32": 0} for op in ops}
    for n in model.graph.node:
        if n.op_type in out:
            t = types.get(n.input[0])
            out[n.op_type]["fp16" if t == F16 else "fp32" if t == F32 else "other"] = (
                out[n.op_type].get("fp16" if t == F16 else "fp32" if t == F32 else "other", 0) + 1
            )
    return out
