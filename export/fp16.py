"""FP16 ONNX graphs for strongly typed TensorRT (docs/design.md section 5).

TensorRT 11 has no FP16 builder flag: precision comes from the tensor types
in the ONNX graph. This pass gives every node FP16 compute except the FP32
"islands" named by their stable scope (default: the DEGC normalisation,
k-means and k-NN, whose argmin/TopK decisions FP16 rounding would flip), and
inserts Cast nodes exactly at precision boundaries.

Why our own pass and not onnxconverter-common or ModelOpt AutoCast:
onnxconverter-common (1.16) mis-types the exporter's Cast(to=FLOAT) nodes
inside k-means (ORT refuses the graph: "Type (tensor(float16)) of output arg
... does not match expected type"), and ModelOpt pulls in a large CUDA-centric
stack for what is here a 150-line, fully tested rewrite keyed on our stable
node names.
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_FP32_ISLANDS = ("norm", "kmeans", "knn")
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def is_island(node_name: str, islands: Sequence[str]) -> bool:
    return any(f"degc/{piece}/" in node_name for piece in islands)


def _elem_types(model: onnx.ModelProto) -> Dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def convert_fp16(model: onnx.ModelProto, islands: Iterable[str] = DEFAULT_FP32_ISLANDS,
                 fp16_io: bool = False) -> onnx.ModelProto:
    """Return an FP16 copy of an FP32 ClusterViG graph with FP32 islands."""
    islands = tuple(islands)
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
                new_nodes.append(helper.make_node("Cast", [name], [new], name=f"{new}/Cast", to=want))
            casts[key] = new
            cur[new] = want
        return casts[key]

    for node in g.node:
        want = F32 if is_island(node.name, islands) else F16
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
