"""Stable, readable ONNX node and tensor names (docs/design.md section 4).

The TorchScript exporter names nodes by module scope, e.g.
``/blocks/blocks.3/grapher/degc/kmeans/MatMul_2``. We rewrite them to the
module's qualified name, dotted up to the DEGC module and slash-separated
inside it: ``blocks.3.grapher.degc/kmeans/MatMul_2``; outside DEGC:
``blocks.3.grapher.fc1.0/Conv``. Intermediate tensors become
``<node name>:<output index>``. Graph inputs/outputs and initializers keep
their names. Graph surgery finds every DEGC piece by the prefix
``blocks.<i>.grapher.degc/<piece>/`` (piece: norm, kmeans, knn, centroids,
gat, local).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Set

import onnx

DEGC_PIECES = ("norm", "kmeans", "knn", "centroids", "gat", "local")


def _split_scope(name: str, modules: Set[str]) -> tuple:
    """('/blocks/blocks.3/grapher/degc/kmeans/MatMul') -> ('blocks.3.grapher.degc.kmeans', 'MatMul')."""
    segs = [s for s in name.split("/") if s]
    qual, prev = "", ""
    i = 0
    while i < len(segs):
        s = segs[i]
        cand = f"{qual}.{s}" if qual else s
        if cand in modules:
            qual, prev = cand, s
        elif prev and s.startswith(prev + ".") and f"{qual}.{s[len(prev) + 1:]}" in modules:
            # Sequential children are scoped as "<parent>.<index>"
            qual, prev = f"{qual}.{s[len(prev) + 1:]}", s
        else:
            break
        i += 1
    return qual, "/".join(segs[i:]) or "op"


def stable_name(qual: str, op: str) -> str:
    parts = qual.split(".")
    if "degc" in parts:
        k = parts.index("degc")
        head, inside = ".".join(parts[: k + 1]), parts[k + 1 :]
        return "/".join([head] + inside + [op])
    return f"{qual}/{op}" if qual else op


def rename_graph(model: onnx.ModelProto, module_names: Iterable[str]) -> onnx.ModelProto:
    """Rename nodes and intermediate tensors in place; returns the model."""
    modules = {m for m in module_names if m}
    graph = model.graph
    keep = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    used: Set[str] = set()
    tensor_map: Dict[str, str] = {}
    for node in graph.node:
        qual, op = _split_scope(node.name, modules) if node.name.startswith("/") else ("", node.name or node.op_type)
        new = stable_name(qual, op)
        base, n = new, 1
        while new in used:
            n += 1
            new = f"{base}_{n}"
        used.add(new)
        node.name = new
        for i, out in enumerate(node.output):
            if out and out not in keep:
                tensor_map[out] = f"{new}:{i}"
    for node in graph.node:
        node.input[:] = [tensor_map.get(x, x) for x in node.input]
        node.output[:] = [tensor_map.get(x, x) for x in node.output]
    for vi in graph.value_info:
        vi.name = tensor_map.get(vi.name, vi.name)
    return model


def nodes_in(model: onnx.ModelProto, prefix: str) -> List[onnx.NodeProto]:
    return [n for n in model.graph.node if n.name.startswith(prefix)]
