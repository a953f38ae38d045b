"""Graph surgery: replace every DEGC's k-means, k-NN and centroid subgraphs by TensorRT plugin nodes.

Subgraphs are found by their stable names (``blocks.<i>.grapher.degc/<piece>/``,
docs/design.md section 4), never by pattern guesses. Each becomes one node whose
op_type is the plugin name, with ``plugin_version`` / ``plugin_namespace``
attributes as the TensorRT ONNX parser expects; label and index tensors are
int32 at the plugin boundary and cast back to what the rest of the graph
uses. A missing subgraph is an error: never a silently partial plugin graph.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import onnx
from onnx import TensorProto, helper

from clustervig.registry import get_config

PLUGIN_DOMAIN = "cvig"  # custom domain: onnx.checker accepts it; TensorRT looks plugins up by op_type
PIECES = {"kmeans": "CvigKMeans", "knn": "CvigPartitionedKNN", "centroids": "CvigSegmentMean",
          "local/gather_max_rel": "CvigGatherMaxRel"}
AUTHORS_KMEANS = "CvigKMeansCentroids"  # the k-means piece of numerics="authors" graphs


class SurgeryError(RuntimeError):
    pass


@dataclass
class SurgeryReport:
    nodes_before: int = 0
    nodes_after: int = 0
    replaced: Dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        parts = ", ".join(f"{v} x {k}" for k, v in self.replaced.items())
        return f"replaced {parts}; nodes {self.nodes_before} -> {self.nodes_after} ({self.nodes_before / max(1, self.nodes_after):.1f}x fewer)"


def _types(model: onnx.ModelProto) -> Dict[str, Tuple[int, int]]:
    inf = onnx.shape_inference.infer_shapes(model)
    out = {}
    for vi in list(inf.graph.value_info) + list(inf.graph.input) + list(inf.graph.output):
        t = vi.type.tensor_type
        out[vi.name] = (t.elem_type, len(t.shape.dim) if t.HasField("shape") else -1)
    return out


def _pick(tensors: List[str], types, elem: int, rank: int, what: str) -> str:
    hits = [t for t in tensors if types.get(t, (None, None)) == (elem, rank)]
    if len(hits) != 1:
        raise SurgeryError(f"{what}: expected one {TensorProto.DataType.Name(elem)} rank-{rank} tensor, found {hits}")
    return hits[0]


# The centroid mean stays an ONNX one-hot MatMul by default (TensorRT runs it well, and
# it keeps the CPU plugin graph bit-identical); pieces=ALL_PIECES substitutes CvigSegmentMean too.
DEFAULT_PIECES = ("kmeans", "knn", "local/gather_max_rel")
ALL_PIECES = ("kmeans", "knn", "centroids", "local/gather_max_rel")


def to_plugin_graph(model: onnx.ModelProto, pieces=DEFAULT_PIECES) -> Tuple[onnx.ModelProto, SurgeryReport]:
    """Return a copy of ``model`` with every DEGC piece in ``pieces`` replaced by its plugin node."""
    meta = {p.key: p.value for p in model.metadata_props}
    if "clustervig.config" not in meta:
        raise SurgeryError("the ONNX file has no clustervig.config metadata: export it with cvig-export first")
    cfgd = json.loads(meta["clustervig.config"])
    cfg = get_config(cfgd["name"], **{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfgd.items()
                                      if k not in ("name",)})
    authors = cfg.numerics == "authors"
    if authors:
        # numerics="authors": GATv2 reads the k-means centroids (CvigKMeansCentroids outputs them,
        # empty clusters as 0); there is no partition mean to replace
        pieces = tuple(p for p in pieces if p != "centroids")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    types = _types(out)
    report = SurgeryReport(nodes_before=len(g.node))
    float_ranks = {TensorProto.FLOAT, TensorProto.FLOAT16}
    for i, k in enumerate(cfg.neighbors):
        prefix = f"blocks.{i}.grapher.degc"
        labels_i32 = None
        idx_i32 = None
        for piece in ("kmeans", "knn", "centroids", "local/gather_max_rel"):
            if piece not in pieces:
                continue
            if piece == "local/gather_max_rel" and cfg.gcn != "mr":
                continue  # only G-MRGCN aggregates max-relative features
            scope = f"{prefix}/{piece}/"
            inside_all = [n for n in g.node if n.name.startswith(scope)]
            if not inside_all:
                raise SurgeryError(f"subgraph {scope} not found; was the ONNX exported by cvig-export from the static "
                                   f"form with stable names? (block {i} of {cfg.depth})")
            # The exporter's common-subexpression pass may share a node of this scope
            # with other code (a Constant, an Unsqueeze of the labels). Such a node is
            # kept when it depends only on values from outside the scope.
            outside_inputs = {x for n in g.node if not n.name.startswith(scope) for x in n.input}
            inside_outputs = {o for n in inside_all for o in n.output}
            shared, shared_out = [], set()
            for n in inside_all:
                feeds_outside = any(o in outside_inputs for o in n.output)
                self_contained = all(x not in inside_outputs or x in shared_out for x in n.input)
                if feeds_outside and self_contained:
                    shared.append(n)
                    shared_out.update(n.output)
            inside = [n for n in inside_all if n not in shared]
            removed = {id(n) for n in inside}
            produced = {o for n in inside for o in n.output}
            inits = {t.name for t in g.initializer}
            ext_in = []
            for n in inside:
                for x in n.input:
                    if x and x not in produced and x not in inits and x not in ext_in:
                        ext_in.append(x)
            used_outside = {x for n in g.node if not n.name.startswith(scope) for x in n.input} | {o.name for o in g.output}
            ext_out = [o for o in produced if o in used_outside]
            xf = [t for t in ext_in if types.get(t, (0, 0))[0] in float_ranks and types[t][1] == 3]
            if len(xf) != 1:
                raise SurgeryError(f"{scope}: expected one float [B,N,C] input, found {xf}")
            new: List[onnx.NodeProto] = []
            attrs = {"plugin_version": "1", "plugin_namespace": ""}
            if piece == "local/gather_max_rel":
                rel = [t for t in ext_out if types.get(t, (0, 0))[1] == 3]
                idx_in = _pick(ext_in, types, TensorProto.INT64, 3, scope)
                if len(rel) != 1:
                    raise SurgeryError(f"{scope}: expected one [B,N,C] output, found {ext_out}")
                if idx_i32 is None:
                    idx_i32 = f"{scope}idx_i32"
                    new.append(helper.make_node("Cast", [idx_in], [idx_i32], name=f"{scope}idx_to_int32", to=TensorProto.INT32))
                new.append(helper.make_node("CvigGatherMaxRel", [xf[0], idx_i32], [rel[0]], name=f"{scope}CvigGatherMaxRel",
                                            domain=PLUGIN_DOMAIN, **attrs))
            elif piece == "kmeans" and authors:
                lab = _pick(ext_out, types, TensorProto.INT64, 2, scope)
                cent = [t for t in ext_out if types.get(t, (0, 0))[0] in float_ranks and types[t][1] == 3]
                if len(cent) != 1:
                    raise SurgeryError(f"{scope}: expected one float centroid output [B,k,C], found {ext_out}")
                # the plugin writes the centroids in the tokens' type; a cast where the graph wants another
                x_type, c_type = types[xf[0]][0], types[cent[0]][0]
                c_out = cent[0] if c_type == x_type else f"{scope}centroids"
                new.append(helper.make_node("CvigKMeansCentroids", [xf[0]], [f"{scope}labels", f"{scope}counts", c_out],
                                            name=f"{scope}CvigKMeansCentroids", domain=PLUGIN_DOMAIN,
                                            clusters=cfg.clusters, iters=cfg.kmeans_iters, empty_zero=1, **attrs))
                if c_out != cent[0]:
                    new.append(helper.make_node("Cast", [c_out], [cent[0]], name=f"{scope}centroids_cast", to=c_type))
                new.append(helper.make_node("Cast", [f"{scope}labels"], [lab], name=f"{scope}labels_to_int64", to=TensorProto.INT64))
                labels_i32 = f"{scope}labels"
            elif piece == "kmeans":
                lab = _pick(ext_out, types, TensorProto.INT64, 2, scope)
                new.append(helper.make_node("CvigKMeans", [xf[0]], [f"{scope}labels", f"{scope}counts"],
                                            name=f"{scope}CvigKMeans", domain=PLUGIN_DOMAIN,
                                            clusters=cfg.clusters, iters=cfg.kmeans_iters, **attrs))
                new.append(helper.make_node("Cast", [f"{scope}labels"], [lab], name=f"{scope}labels_to_int64", to=TensorProto.INT64))
                labels_i32 = f"{scope}labels"
            else:
                if labels_i32 is None:  # k-means left as ONNX: cast its labels
                    lab_in = _pick(ext_in, types, TensorProto.INT64, 2, scope)
                    labels_i32 = f"{scope}labels_i32"
                    new.append(helper.make_node("Cast", [lab_in], [labels_i32], name=f"{scope}labels_to_int32", to=TensorProto.INT32))
                if piece == "knn":
                    idx = _pick(ext_out, types, TensorProto.INT64, 3, scope)
                    new.append(helper.make_node("CvigPartitionedKNN", [xf[0], labels_i32], [f"{scope}idx", f"{scope}valid"],
                                                name=f"{scope}CvigPartitionedKNN", domain=PLUGIN_DOMAIN, k=k, **attrs))
                    new.append(helper.make_node("Cast", [f"{scope}idx"], [idx], name=f"{scope}idx_to_int64", to=TensorProto.INT64))
                    idx_i32 = f"{scope}idx"
                    valid = [t for t in ext_out if types.get(t) == (TensorProto.BOOL, 3)]
                    if valid:  # only G-GIN reads the validity mask
                        new.append(helper.make_node("Cast", [f"{scope}valid"], [valid[0]], name=f"{scope}valid_to_bool",
                                                    to=TensorProto.BOOL))
                else:
                    z = [t for t in ext_out if types.get(t, (0, 0))[1] == 3]
                    cnt = [t for t in ext_out if types.get(t, (0, 0))[1] == 2]
                    if len(z) != 1 or len(cnt) != 1:
                        raise SurgeryError(f"{scope}: expected outputs z [B,k,C] and counts [B,k], found {ext_out}")
                    new.append(helper.make_node("CvigSegmentMean", [xf[0], labels_i32], [z[0], f"{scope}counts"],
                                                name=f"{scope}CvigSegmentMean", domain=PLUGIN_DOMAIN,
                                                clusters=cfg.clusters, **attrs))
                    new.append(helper.make_node("Cast", [f"{scope}counts"], [cnt[0]], name=f"{scope}counts_to_float",
                                                to=types[cnt[0]][0]))
            pos = min(idx_ for idx_, n in enumerate(g.node) if id(n) in removed)
            keep = [n for n in g.node if id(n) not in removed]
            pos -= sum(1 for n in g.node[:pos] if id(n) in removed)
            del g.node[:]
            g.node.extend(keep[:pos] + new + keep[pos:])
            op = AUTHORS_KMEANS if piece == "kmeans" and authors else PIECES[piece]
            report.replaced[op] = report.replaced.get(op, 0) + 1
    if not any(o.domain == PLUGIN_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
    _cleanup(out)
    report.nodes_after = len(out.graph.node)
    p = out.metadata_props.add()
    p.key, p.value = "clustervig.plugins", json.dumps(report.replaced)
    return out, report


def _cleanup(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers whose outputs nobody uses (the replaced subgraphs' constants)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    needed = set()
    stack = [o.name for o in g.output]
    live = set()
    while stack:  # walk back from the outputs, whatever the current node order
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        n = producer.get(t)
        if n is not None and id(n) not in live:
            live.add(id(n))
            stack.extend(x for x in n.input if x)
    keep = [n for n in g.node if id(n) in live]
    del g.node[:]
    g.node.extend(_toposort(keep, {i.name for i in g.input} | {t.name for t in g.initializer}))
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]


def _toposort(nodes: List[onnx.NodeProto], available: set) -> List[onnx.NodeProto]:
    """Stable topological order: each node as early as its inputs allow, original order otherwise."""
    avail = set(available) | {""}
    pending = list(nodes)
    out: List[onnx.NodeProto] = []
    while pending:
        rest = []
        for n in pending:
            if all(x in avail for x in n.input):
                out.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise SurgeryError(f"plugin graph has a cycle or a dangling input at {rest[0].name}")
        pending = rest
    return out


def for_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose plugin nodes live in onnxruntime-extensions' domain (CPU reference ops)."""
    from clustervig.plugins.ort_ops import ORT_DOMAIN

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in out.graph.node:
        if n.domain == PLUGIN_DOMAIN:
            n.domain = ORT_DOMAIN
            # the extension declares only the math attributes
            keep = [a for a in n.attribute if a.name not in ("plugin_version", "plugin_namespace")]
            del n.attribute[:]
            n.attribute.extend(keep)
    for o in out.opset_import:
        if o.domain == PLUGIN_DOMAIN:
            o.domain = ORT_DOMAIN
    return out


def ort_session(model: onnx.ModelProto):
    import onnxruntime as ort

    from clustervig.plugins.ort_ops import register
    from clustervig.utils import ort_session_options

    so = ort_session_options()
    so.register_custom_ops_library(register())
    return ort.InferenceSession(for_onnxruntime(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
