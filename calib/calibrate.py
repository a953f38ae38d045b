"""INT8 post-training quantization of ClusterViG ONNX graphs: calibration and Q/DQ insertion.

TensorRT-compatible Q/DQ (docs/tensorrt.md section 2): symmetric (zero point 0), INT8 in
[-128, 127] (scales from amax / 127), per-channel weight scales (axis 0 of
each Conv weight), per-tensor activation scales. Only convolutions are
quantized: normalisation, k-means, k-NN, GATv2 and the graph aggregations
stay in floating point (docs/design.md section 5).

Activation ranges come from the FP32 graph run in ONNX Runtime on
calibration images, with one of three methods: ``max`` (largest |x|),
``percentile`` (99.99th percentile of |x|), ``entropy`` (the threshold that
minimises the KL divergence between the clipped FP32 histogram and its INT8
quantization, TensorRT's classic method). A JSON cache keyed by the graph
hash, the method and the images used (count and contents) makes a second run free.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from clustervig.utils import write_json_atomic

METHODS = ("max", "entropy", "percentile")
BINS = 2048


def conv_activations(model: onnx.ModelProto) -> List[str]:
    """The activation tensors feeding Conv nodes (the quantized ones)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "Conv" and n.input[0] not in inits and n.input[0] not in out:
            out.append(n.input[0])
    return out


def graph_hash(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()[:16]


def _entropy_amax(hist: np.ndarray, edges: np.ndarray, levels: int = 128) -> float:
    """Threshold minimising KL(P || Q) between the clipped histogram and its INT8 version.

    For each candidate i (every 16th bin from ``levels``): P = the first i bins with the tail clipped into
    bin i-1; Q = those i bins merged into ``levels`` buckets (as ``np.array_split`` cuts them) and each
    bucket's mass spread evenly over its non-empty bins. Bucket sums are one ``np.add.reduceat`` per
    candidate (a per-bucket Python loop made the entropy method the slowest export stage).
    """
    hist = np.asarray(hist)
    if hist.sum() == 0:
        return float(edges[-1])
    h = hist.astype(np.float64)
    nonempty = hist > 0
    tail = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])  # tail[i] = sum of bins i..end
    best, best_i = np.inf, len(hist)
    for i in range(levels, len(hist) + 1, 16):
        p = h[:i].copy()
        p[i - 1] += tail[i]  # clip the tail into the last bin
        nz = p > 0
        base, extra = divmod(i, levels)
        sizes = np.full(levels, base, dtype=np.int64)
        sizes[:extra] += 1  # np.array_split's bucket sizes
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        mass = np.add.reduceat(h[:i], starts)
        count = np.add.reduceat(nonempty[:i].astype(np.int64), starts)
        q = np.where(nonempty[:i], np.repeat(np.where(count > 0, mass / np.maximum(count, 1), 0.0), sizes), 0.0)
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-30)
        mask = nz & (qs > 0)
        kl = np.sum(ps[mask] * np.log(ps[mask] / qs[mask])) + np.sum(ps[nz & ~(qs > 0)]) * 30.0
        if kl < best:
            best, best_i = kl, i
    return float(edges[best_i - 1])  # upper edge of the last kept bin


def collect_ranges(model: onnx.ModelProto, batches: Iterable[np.ndarray], method: str = "entropy",
                   percentile: float = 99.99) -> Dict[str, float]:
    """Per-tensor amax of every Conv input activation over the calibration batches."""
    import onnxruntime as ort

    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: choose one of {METHODS}")
    names = conv_activations(model)
    dbg = onnx.ModelProto()
    dbg.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    types.update({i.name: i.type.tensor_type.elem_type for i in model.graph.input})
    for n in names:
        if n not in {o.name for o in dbg.graph.output}:
            dbg.graph.output.append(helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(dbg.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    amax = {n: 0.0 for n in names}
    samples: Dict[str, List[np.ndarray]] = {n: [] for n in names}
    seen = 0
    static_b = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value  # 0 when dynamic

    def chunks(x):  # a static-batch graph takes exactly its batch: split, repeat the last image to fill
        if not static_b or len(x) == static_b:
            yield x
            return
        for i in range(0, len(x), static_b):
            c = x[i : i + static_b]
            yield c if len(c) == static_b else np.concatenate([c, np.repeat(c[-1:], static_b - len(c), axis=0)])

    for xb in batches:
        seen += len(xb)
        for x in chunks(xb):
            res = dict(zip(out_names, sess.run(None, {model.graph.input[0].name: x})))
            _accumulate(res, names, amax, samples, method)
    if seen == 0:
        raise ValueError("no calibration samples were given")
    return _finish(names, amax, samples, method, percentile)


def _accumulate(res, names, amax, samples, method) -> None:
    for n in names:
            a = np.abs(res[n]).astype(np.float32).ravel()
            amax[n] = max(amax[n], float(a.max()))
            if method != "max":  # a bounded random subsample keeps memory flat
                rng = np.random.default_rng(len(samples[n]))
                samples[n].append(a if a.size <= 200_000 else rng.choice(a, 200_000, replace=False))


def _finish(names, amax, samples, method, percentile) -> Dict[str, float]:
    if method == "max":
        return amax
    out = {}
    for n in names:
        a = np.concatenate(samples[n])
        if method == "percentile":
            out[n] = float(np.percentile(a, percentile))
        else:
            hist, edges = np.histogram(a, bins=BINS, range=(0.0, max(amax[n], 1e-12)))
            out[n] = _entropy_amax(hist, edges[1:])
        out[n] = max(out[n], 1e-8)
    return out


def images_fingerprint(files: Sequence[Path]) -> str:
    """SHA-256 over the ordered contents of the calibration images (a changed, added, removed or
    reordered image changes it; renaming or touching a file does not)."""
    h = hashlib.sha256()
    for f in files:
        h.update(hashlib.sha256(Path(f).read_bytes()).digest())
    return h.hexdigest()[:32]


def cache_key(model: onnx.ModelProto, method: str, files: Sequence[Path]) -> Dict:
    """What calibrated ranges depend on: the graph (its preprocessing metadata included), the
    method, and the images actually used (their number and contents)."""
    return {"graph": graph_hash(model), "method": method, "samples": len(files), "images": images_fingerprint(files)}


def load_or_collect(model: onnx.ModelProto, batches_fn, method: str, files: Sequence[Path], cache: Optional[Path],
                    write_to: Optional[Path] = None) -> Dict:
    """Ranges from ``cache`` when its key (:func:`cache_key`: graph, method, the images ``files``) matches,
    else calibrate on ``batches_fn()`` (the preprocessed ``files``). The result is written to ``write_to``
    (default: ``cache``); ``cvig export`` writes into its staging folder so an interrupted export never
    replaces the cache of the earlier complete one."""
    key = cache_key(model, method, files)
    ranges, cached = None, False
    if cache is not None and Path(cache).is_file():
        try:
            data = json.loads(Path(cache).read_text())
            if data.get("key") == key:
                ranges, cached = {k: float(v) for k, v in data["ranges"].items()}, True
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError, ValueError):
            pass  # a broken cache is recomputed
    if ranges is None:
        ranges = collect_ranges(model, batches_fn(), method)
    dest = write_to if write_to is not None else cache
    if dest is not None:
        write_json_atomic(dest, {"key": key, "ranges": ranges}, indent=1)
    return {"ranges": ranges, "cached": cached, "key": key}


def quantize_qdq(model: onnx.ModelProto, ranges: Dict[str, float]) -> onnx.ModelProto:
    """Insert symmetric Q/DQ before every Conv: per-tensor activations, per-channel INT8 weights."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    new_nodes, new_inits = [], []
    act_done: Dict[str, str] = {}
    for n in g.node:
        if n.op_type == "Conv" and n.input[1] in inits:
            x = n.input[0]
            if x in ranges:
                if x not in act_done:
                    s_name, z_name = f"{x}:scale", f"{x}:zero"
                    new_inits += [numpy_helper.from_array(np.array(ranges[x] / 127.0, np.float32), s_name),
                                  numpy_helper.from_array(np.array(0, np.int8), z_name)]
                    new_nodes += [helper.make_node("QuantizeLinear", [x, s_name, z_name], [f"{x}:q"], name=f"{x}/QuantizeLinear"),
                                  helper.make_node("DequantizeLinear", [f"{x}:q", s_name, z_name], [f"{x}:dq"],
                                                   name=f"{x}/DequantizeLinear")]
                    act_done[x] = f"{x}:dq"
                n.input[0] = act_done[x]
            w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
            scale = np.maximum(amax, 1e-12) / 127.0
            q = np.clip(np.rint(w / scale.reshape(-1, *([1] * (w.ndim - 1)))), -127, 127).astype(np.int8)
            wn = n.input[1]
            new_inits += [numpy_helper.from_array(q, f"{wn}:int8"),
                          numpy_helper.from_array(scale.astype(np.float32), f"{wn}:scale"),
                          numpy_helper.from_array(np.zeros(w.shape[0], np.int8), f"{wn}:zero")]
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{wn}:int8", f"{wn}:scale", f"{wn}:zero"], [f"{wn}:dq"],
                                              name=f"{n.name}/weight/DequantizeLinear", axis=0))
            n.input[1] = f"{wn}:dq"
        new_nodes.append(n)
    used = {x for nd in new_nodes for x in nd.input}
    keep = [t for t in g.initializer if t.name in used] + new_inits
    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend(keep)
    return out
