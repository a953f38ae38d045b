"""Validation of exported artifacts against the PyTorch static form.

For each artifact: max |Δlogits|, cosine of logits, top-1 agreement, and the
graph decisions inside every DEGC: k-means label agreement and k-NN
neighbour agreement (fraction of (token, neighbour) pairs shared), read from
the graph by the stable names of docs/design.md section 4. A backbone
(``features_only``) is compared output map by output map instead of by
logits: per map the largest |Δ| and the per-image cosine of the flattened
map; the comparison's ``max_abs_diff`` / ``cosine_min`` are the worst over
its maps, and there is no top-1.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import onnx
import torch
from onnx import helper

from clustervig.graph import kmeans_labels
from clustervig.model import ClusterViG

from .fp16_emulate import emulate_fp16
from .onnx_export import INPUT


def degc_boundary_tensors(model: onnx.ModelProto) -> Dict[str, Tuple[str, str]]:
    """Per DEGC prefix: (k-means labels tensor, k-NN index tensor).

    The labels are the int64 tensor produced inside ``.../degc/kmeans/`` and
    used outside it; the neighbour indices the rank-3 int64 tensor produced
    inside ``.../degc/knn/`` and used outside it.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    info = {vi.name: vi.type.tensor_type for vi in inferred.graph.value_info}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    out: Dict[str, Tuple[str, str]] = {}
    # only the stable scopes blocks.<i>.grapher.degc (docs/design.md section 4); anything else that
    # mentions a degc (a helper node named after a tensor) is not a block
    prefixes = sorted({n.name.split("/")[0] for n in model.graph.node
                       if re.fullmatch(r"blocks\.\d+\.grapher\.degc", n.name.split("/")[0])},
                      key=lambda p: int(p.split(".")[1]))
    for pre in prefixes:
        found = {}
        for piece, rank in (("kmeans", 2), ("knn", 3)):
            scope = f"{pre}/{piece}/"
            for n in model.graph.node:
                if n.name.startswith(scope):
                    continue
                for x in n.input:
                    src = producer.get(x, "")
                    t = info.get(x)
                    if src.startswith(scope) and t is not None and t.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) \
                            and len(t.shape.dim) == rank:
                        found.setdefault(piece, x)
        # plugin graph: shape inference knows nothing of the Cvig* outputs, so the boundaries are found
        # by the names the surgery gives: the int64 cast of a plugin output, else the plugin's own int32
        # output (G-MRGCN's gather-max-rel reads the k-NN's int32 indices directly)
        names = {n.name: n for n in model.graph.node}
        for piece, cast, plugin in (("kmeans", "labels_to_int64", "CvigKMeans"),
                                    ("knn", "idx_to_int64", "CvigPartitionedKNN")):
            node = names.get(f"{pre}/{piece}/{cast}") or names.get(f"{pre}/{piece}/{plugin}")
            if piece not in found and node is not None:
                found[piece] = node.output[0]
        if "kmeans" in found and "knn" in found:
            out[pre] = (found["kmeans"], found["knn"])
    return out


def with_debug_outputs(model: onnx.ModelProto, names: List[str]) -> onnx.ModelProto:
    dbg = onnx.ModelProto()
    dbg.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    plugin_outputs = {o for n in model.graph.node if n.op_type.startswith("Cvig") for o in n.output}
    for name in names:  # untyped: a plugin output (int32) or the int64 cast of one
        default = onnx.TensorProto.INT32 if name in plugin_outputs else onnx.TensorProto.INT64
        dbg.graph.output.append(helper.make_tensor_value_info(name, types.get(name, default), None))
    return dbg


def in_graph_normalization(model: onnx.ModelProto) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``(mean, std)`` as ``[1, 3, 1, 1]`` arrays when the graph normalises its input itself
    (``--normalize-in-graph``, recorded in ``clustervig.preprocess``), else None."""
    import json

    meta = {p.key: p.value for p in model.metadata_props}
    try:
        pre = json.loads(meta.get("clustervig.preprocess", "{}"))
    except json.JSONDecodeError:
        return None
    if not pre.get("normalize_in_graph"):
        return None
    shape = (1, 3, 1, 1)
    return (np.asarray(pre["mean"], np.float32).reshape(shape), np.asarray(pre["std"], np.float32).reshape(shape))


class OrtModel:
    """An ONNX file in ONNX Runtime (CPU) that also returns every DEGC's labels and neighbours.

    :meth:`run` takes images normalised as the PyTorch model takes them, whatever the graph expects.
    """

    def __init__(self, path: Union[Path, onnx.ModelProto], with_graph_outputs: bool = True) -> None:
        import onnxruntime as ort
        from clustervig.utils import ort_session_options

        if isinstance(path, onnx.ModelProto):  # an in-memory graph, e.g. the FP16 emulation
            self.path, model = None, path
        else:
            self.path, model = Path(path), onnx.load(str(path))
        dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
        self.static_batch = dim0.dim_value or None  # None: dynamic batch
        self.boundaries = degc_boundary_tensors(model) if with_graph_outputs else {}
        extra = [t for pair in self.boundaries.values() for t in pair]
        if extra:
            model = with_debug_outputs(model, extra)
        if any(n.domain == "cvig" for n in model.graph.node):  # plugin graph: CPU reference ops
            from .plugin_graph import ort_session

            self.session = ort_session(model)
        else:
            self.session = ort.InferenceSession(model.SerializeToString(), ort_session_options(), providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_type = np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32
        self.denormalize = in_graph_normalization(model)

    def feed(self, x: np.ndarray) -> np.ndarray:
        """The graph's input for images ``x`` normalised as the PyTorch model takes them."""
        if self.denormalize is not None:  # --normalize-in-graph: the graph takes RGB in [0, 1]
            mean, std = self.denormalize
            x = x * std + mean
        return x.astype(self.input_type)

    def run(self, x: np.ndarray) -> Dict[str, np.ndarray]:
        b = self.static_batch
        if b and x.shape[0] != b:  # a static-batch graph sees the inputs b at a time
            if x.shape[0] % b:
                raise ValueError(f"{x.shape[0]} inputs do not split into batches of {b}")
            parts = [self.run(x[i:i + b]) for i in range(0, x.shape[0], b)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        outs = self.session.run(None, {INPUT: self.feed(x)})
        n = len(outs) - 2 * len(self.boundaries)  # the graph's own outputs come first
        res = {name: outs[i].astype(np.float32) for i, name in enumerate(self.output_names[:n])}
        for i, pre in enumerate(self.boundaries):
            res[f"{pre}/labels"] = outs[n + 2 * i]
            res[f"{pre}/neighbors"] = outs[n + 1 + 2 * i]
        return res


def torch_outputs(model: ClusterViG, x: torch.Tensor) -> Dict[str, np.ndarray]:
    """Logits (a backbone: its maps by output name), labels and neighbour indices of the PyTorch static form
    (hooks on kmeans/knn)."""
    res: Dict[str, np.ndarray] = {}
    hooks = []
    for i, degc in enumerate(model.degc_modules()):
        pre = f"blocks.{i}.grapher.degc"
        hooks.append(degc.kmeans.register_forward_hook(
            lambda m, a, o, p=pre: res.__setitem__(f"{p}/labels", kmeans_labels(o).numpy())))
        hooks.append(degc.knn.register_forward_hook(lambda m, a, o, p=pre: res.__setitem__(f"{p}/neighbors", o[0].numpy())))
    try:
        with torch.no_grad():
            out = model.eval()(x)
        outs = model.cfg.feature_outputs()
        if outs is None:
            res["logits"] = out.numpy()
        else:
            res.update({o["name"]: t.numpy() for o, t in zip(outs, out)})
    finally:
        for h in hooks:
            h.remove()
    return res


def neighbor_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over tokens of |N_a(v) ∩ N_b(v)| / max(|N_a(v)|, |N_b(v)|) for [B, N, K] index tensors.

    Neighbour sets, not slots: a partition smaller than K repeats the token
    itself in its missing slots, so identical outputs score 1 (dividing by K
    would cap them below 1), and two outputs that only order equal
    similarities differently score 1 too.
    """
    k = a.shape[-1]
    a2, b2 = np.sort(a.reshape(-1, k), axis=1), np.sort(b.reshape(-1, k), axis=1)
    total, rows = 0.0, len(a2)
    for i in range(0, rows, 65536):  # vectorised per chunk of rows (N = 4200 tokens x 16 blocks at detection sizes)
        x, y = a2[i:i + 65536], b2[i:i + 65536]
        first_x = np.ones_like(x, dtype=bool)
        first_x[:, 1:] = x[:, 1:] != x[:, :-1]  # one entry per distinct index (sorted rows)
        first_y = np.ones_like(y, dtype=bool)
        first_y[:, 1:] = y[:, 1:] != y[:, :-1]
        common = (first_x & (x[:, :, None] == y[:, None, :]).any(-1)).sum(1)
        total += float((common / np.maximum(first_x.sum(1), first_y.sum(1))).sum())
    return total / rows


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image: the cosine of the flattened outputs (logits, or one feature map)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def output_keys(res: Dict[str, np.ndarray]) -> List[str]:
    """The model outputs in a result of :func:`torch_outputs` / :meth:`OrtModel.run` (not the DEGC taps)."""
    return [k for k in res if "/" not in k]


def compare(ref: Dict[str, np.ndarray], out: Dict[str, np.ndarray]) -> Dict:
    if output_keys(ref) != ["logits"]:
        res = compare_maps(ref, out)
    else:
        a, b = ref["logits"].astype(np.float64), out["logits"].astype(np.float64)
        cos = _cosines(a, b)
        res = {
            "images": int(len(b)),
            # images whose logits (of the compared artifact) hold a NaN or inf: FP16 overflow, a broken graph
            "nonfinite_images": int((~np.isfinite(b).all(axis=1)).sum()),
            "max_abs_diff": float(np.abs(a - b).max()),
            "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
        }
    labels = [k for k in ref if k.endswith("/labels") and k in out]
    if labels:
        per = [float((ref[k] == out[k]).mean()) for k in labels]
        nb = [neighbor_agreement(ref[k.replace("labels", "neighbors")], out[k.replace("labels", "neighbors")]) for k in labels]
        res.update(label_agreement=float(np.mean(per)), label_agreement_min_block=float(min(per)),
                   neighbor_agreement=float(np.mean(nb)), neighbor_agreement_min_block=float(min(nb)),
                   # per block, in order: where decisions first diverge says which precision caused it
                   label_agreement_per_block=per, neighbor_agreement_per_block=nb)
    return res


def compare_maps(ref: Dict[str, np.ndarray], out: Dict[str, np.ndarray]) -> Dict:
    """A backbone's outputs, map by map (``outputs``: per map its largest |Δ|, the largest |value| of the
    reference, and the min / mean over images of the cosine of the flattened map); the overall
    ``max_abs_diff`` and ``cosine_min`` are the worst of the maps (what the gates read), ``nonfinite_images``
    counts images with a NaN or inf in any map. No top-1: a backbone has no classes."""
    names = output_keys(ref)
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"the artifact has no output {missing} of the PyTorch model (outputs {output_keys(out)}): "
                         "export it again from this model")
    per: Dict[str, Dict] = {}
    bad = np.zeros(len(ref[names[0]]), dtype=bool)
    cos_all = []
    for n in names:
        a, b = ref[n].astype(np.float64), out[n].astype(np.float64)
        if a.shape != b.shape:
            raise ValueError(f"output {n}: the artifact gives {list(b.shape)}, PyTorch {list(a.shape)}")
        cos = _cosines(a, b)
        bad |= ~np.isfinite(b.reshape(len(b), -1)).all(axis=1)
        cos_all.append(cos)
        per[n] = {"shape": list(a.shape[1:]), "max_abs_diff": float(np.abs(a - b).max()),
                  "max_abs_reference": float(np.abs(a).max()), "cosine_min": float(cos.min()),
                  "cosine_mean": float(cos.mean())}
    return {
        "images": int(len(bad)),
        "nonfinite_images": int(bad.sum()),
        "max_abs_diff": float(np.max([p["max_abs_diff"] for p in per.values()])),  # NaN when a map has one
        "cosine_min": float(np.min([p["cosine_min"] for p in per.values()])),
        "cosine_mean": float(np.mean(np.concatenate(cos_all))),
        "outputs": per,
    }


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())


def _in_chunks(fn: Callable[[torch.Tensor], Dict[str, np.ndarray]], x: torch.Tensor, chunk: Optional[int],
               done: Optional[Callable[[int], None]] = None) -> Dict[str, np.ndarray]:
    if not chunk or len(x) <= chunk:
        res = fn(x)
        if done:
            done(len(x))
        return res
    parts = []
    for i in range(0, len(x), chunk):
        parts.append(fn(x[i : i + chunk]))
        if done:
            done(len(next(iter(parts[-1].values()))))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def validate(model: ClusterViG, artifacts: Dict[str, Path], inputs: Dict[str, torch.Tensor],
             batch_limit: Optional[int] = None, emulate_fp16_rounding: bool = True,
             labels: Optional[Dict[str, np.ndarray]] = None, chunk: Optional[int] = None,
             progress: Optional[Callable[[str, int, int], None]] = None) -> Dict:
    """Compare every artifact with PyTorch (and FP16 with FP32) on every named input set.

    ``labels`` (set name -> class per image) adds each model's top-1 accuracy on that set under
    ``"accuracy"``; ``chunk`` runs a set that many images at a time (a multiple of a static batch);
    ``progress(set, images done, images)`` is called after each chunk of every runner."""
    t0 = time.perf_counter()
    runners = {name: OrtModel(path) for name, path in artifacts.items()}
    if emulate_fp16_rounding and "fp16" in runners:
        # ONNX Runtime's CPU provider runs most of an FP16 graph in FP32 (see
        # fp16_emulate): the emulation shows the FP16 error a GPU would see
        runners["fp16-emulated"] = OrtModel(emulate_fp16(onnx.load(str(artifacts["fp16"]))))
    results: Dict = {}
    accuracy: Dict = {}
    for set_name, x in inputs.items():
        if batch_limit:
            x = x[:batch_limit]
        total, count = len(x) * (1 + len(runners)), [0]

        def done(n: int, set_name=set_name, total=total) -> None:
            count[0] += n
            if progress:
                progress(set_name, count[0], total)

        ref = _in_chunks(lambda c: torch_outputs(model, c), x, chunk, done)
        outs = {name: _in_chunks(lambda c, r=r: r.run(c.numpy()), x, chunk, done) for name, r in runners.items()}
        results[set_name] = {f"{name} vs pytorch": compare(ref, o) for name, o in outs.items() if name != "fp16-emulated"}
        for other in ("fp16", "fp16-emulated", "int8", "plugins"):
            if other in outs and "fp32" in outs:
                results[set_name][f"{other} vs fp32"] = compare(outs["fp32"], outs[other])
        if labels and set_name in labels:
            y = np.asarray(labels[set_name])[: len(x)]
            accuracy[set_name] = {"images": int(len(y)), "top1": {"pytorch": top1_accuracy(ref["logits"], y),
                                                                   **{n: top1_accuracy(o["logits"], y) for n, o in outs.items()}}}
    out = {"inputs": {k: list(v.shape) for k, v in inputs.items()}, "results": results}
    if accuracy:
        out["accuracy"] = accuracy
    out["validation_seconds"] = time.perf_counter() - t0
    return out
