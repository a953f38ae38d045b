"""Per-op FP16 rounding on a CPU: how an FP16 graph behaves on a GPU (docs/design.md section 5).

ONNX Runtime's CPU provider has FP16 kernels for few ops. For the rest it
inserts Casts to FP32 around each node and then drops the Cast pairs between
neighbouring upcast nodes, so long chains (all of k-means, the k-NN, most of
the local update) silently run in FP32. Measured on the FP16 graph of
cvig_ti: ORT adds ~1,400 Casts and runs every Conv in FP32 (NCHWc). FP16
results from ORT CPU therefore understate the FP16 error a TensorRT engine
sees, and cannot tell whether an FP32 island is needed.

:func:`emulate_fp16` turns an FP16 graph into an FP32 graph that rounds the
output of every formerly-FP16 node to FP16 (a Cast to FLOAT16 and back; ORT
keeps such narrowing pairs) and uses the FP16 weight values. That is the
model of TensorRT FP16 kernels: FP16 tensors between layers, FP32
accumulation inside a layer. TensorRT fuses layers and so rounds less often,
which makes the emulation a slightly pessimistic bound.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _types(model: onnx.ModelProto) -> Dict[str, int]:
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def emulate_fp16(model16: onnx.ModelProto) -> onnx.ModelProto:
    """FP32 copy of an FP16 graph that rounds every FP16 tensor to FP16 values.

    Graph inputs and outputs become FP32 (an FP16 input is rounded on entry),
    so the result runs with FP32 feeds like the FP32 graph.
    """
    types = _types(model16)
    m = onnx.ModelProto()
    m.CopyFrom(model16)
    g = m.graph
    for t in g.initializer:
        if t.data_type == F16:  # the FP16 weight values, stored as FP32
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes = []
    rename: Dict[str, str] = {}
    for i in g.input:
        if i.type.tensor_type.elem_type == F16:
            i.type.tensor_type.elem_type = F32
            rename[i.name] = f"{i.name}:rounded"
            nodes += _round(i.name, rename[i.name], f"input:{i.name}")
    for node in g.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
        for a in node.attribute:
            if node.op_type in ("Constant", "ConstantOfShape") and a.name == "value" and a.t.data_type == F16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        outs16 = [o for o in node.output if o and types.get(o) == F16]
        if not outs16:
            nodes.append(node)
            continue
        # the node computes in FP32 into a raw tensor; the old name carries the value rounded to FP16
        raw = {o: f"{o}:raw" for o in outs16}
        node.output[:] = [raw.get(o, o) for o in node.output]
        nodes.append(node)
        for j, o in enumerate(outs16):
            # named after the producing node (its stable scope), not the tensor: tensor names may carry
            # a module prefix (normalize-in-graph exports) that would look like another scope
            base = f"{node.name}/out{j}"
            if node.op_type == "Cast":  # Cast(to=FLOAT16) already rounds: only widen after it
                nodes.append(helper.make_node("Cast", [raw[o]], [o], name=f"{base}/Cast32", to=F32))
            else:
                nodes += _round(raw[o], o, base)
    for o in g.output:
        if o.type.tensor_type.elem_type == F16:
            o.type.tensor_type.elem_type = F32
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return m


def _round(src: str, dst: str, base: str):
    """Nodes computing dst = float32(float16(src)), named base/Cast16 and base/Cast32."""
    mid = f"{dst}:fp16"
    return [helper.make_node("Cast", [src], [mid], name=f"{base}/Cast16", to=F16),
            helper.make_node("Cast", [mid], [dst], name=f"{base}/Cast32", to=F32)]
