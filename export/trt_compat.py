"""Static check of an ONNX graph against the TensorRT operator limits the project relies on.

TensorRT cannot be installed on the machines that export (docs/tensorrt.md), so
an op it rejects would only show up on the GPU machine, after the export was
declared good. This check reads the graph for the limits listed in
docs/tensorrt.md section 5 ("Operator limits met by this model") and returns one line per
offending node; ``cvig-export`` records the lines in report.json and prints
them. Plugin nodes (custom domains) are TensorRT's plugin registry's business
and are skipped.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

TOPK_MAX_K = 3840
TOPK_VALUE_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32}
ARG_VALUE_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32}
REDUCE_OPS = ("ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum")


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def tensorrt_op_issues(model: onnx.ModelProto) -> List[str]:
    """Lines ``"<node name> (<op>): <why>"`` for every node TensorRT would reject; empty when none."""
    g = onnx.shape_inference.infer_shapes(model).graph
    types: Dict[str, int] = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input)}
    ranks: Dict[str, int] = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in list(g.value_info) + list(g.input)
                             if vi.type.tensor_type.HasField("shape")}
    consts: Dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:  # Constant nodes count as initializers for the parser
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def const(name: str) -> Optional[np.ndarray]:
        return consts.get(name) if name else None

    issues: List[str] = []
    for n in g.node:
        if n.domain not in ("", "ai.onnx"):
            continue
        where = f"{n.name or '<unnamed>'} ({n.op_type})"
        if n.op_type == "ScatterElements" and _attr(n, "reduction", b"none") not in (b"none", "none"):
            issues.append(f"{where}: ScatterElements with a reduction needs NVIDIA's plugin library")
        elif n.op_type == "ScatterND" and _attr(n, "reduction", b"none") not in (b"none", "none"):
            issues.append(f"{where}: ScatterND with a reduction is not supported")
        elif n.op_type in REDUCE_OPS and len(n.input) > 1 and n.input[1] and const(n.input[1]) is None:
            issues.append(f"{where}: reduction axes must be an initializer")
        elif n.op_type == "TopK":
            t = types.get(n.input[0])
            if t not in TOPK_VALUE_TYPES:
                issues.append(f"{where}: TopK values of type {TensorProto.DataType.Name(t or 0)} "
                              "(TensorRT takes FP32/FP16/BF16/INT32)")
            k = const(n.input[1])
            if k is not None and int(np.asarray(k).reshape(-1)[0]) > TOPK_MAX_K:
                issues.append(f"{where}: K = {int(np.asarray(k).reshape(-1)[0])} > {TOPK_MAX_K}")
            rank = ranks.get(n.input[0])
            axis = _attr(n, "axis", -1)
            if rank is not None and (axis if axis >= 0 else axis + rank) < rank - 4:
                issues.append(f"{where}: TopK axis {axis} is not among the last four")
        elif n.op_type in ("ArgMin", "ArgMax"):
            t = types.get(n.input[0])
            if t not in ARG_VALUE_TYPES:  # lowered to TopK(k=1)
                issues.append(f"{where}: {n.op_type} on {TensorProto.DataType.Name(t or 0)} "
                              "(becomes TopK: FP32/FP16/BF16/INT32 only)")
        elif n.op_type == "CumSum" and const(n.input[1]) is None:
            issues.append(f"{where}: CumSum axis must be an initializer")
    return issues
