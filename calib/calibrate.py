"""INT8 post-training quantization of ClusterViG ONNX graphs: calibration and Q/DQ insertion.

TensorRT-compatible Q/DQ (docs/tensorrt.md section 2): symmetric (zero point 0), INT8 in
[-128, 127] (scales from amax / 127), per-channel weight scales (axis 0 of
each Conv weight), per-tensor activation scales. Placement (docs/design.md,
"INT8 placement"): the activation input of every Conv, and the skip input of
every residual Add whose other input is a quantized Conv's output, so that
TensorRT fuses the Add into that convolution with an INT8 residual.
Normalisation, k-means, k-NN, GATv2 and the graph aggregations stay in
floating point (docs/design.md section 5).

Activation ranges come from ONNX Runtime's calibrators
(``onnxruntime.quantization.calibrate``) running the FP32 graph on calibration
images, restricted to the tensors above: ``max`` (MinMax, largest |x|),
``percentile`` (99.99th percentile of |x|, 2048 bins), ``entropy`` (the
threshold minimising the KL divergence between the FP32 histogram, 512 bins
over [-amax, amax], and its quantization to the 255 levels of symmetric INT8:
TensorRT's classic method; ONNX Runtime's search is quadratic in the bins, and
512 scores as 1024 and 2048 do on the digits model). All symmetric. A JSON
cache keyed by the graph hash, the method and the images used (count and
contents) makes a second run free.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tempfile
from pathlib import Path
from typing import Collection, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from clustervig.utils import write_json_atomic

METHODS = ("max", "entropy", "percentile")
PERCENTILE = 99.99
PERCENTILE_BINS = 2048  # histogram of |x|
ENTROPY_BINS = 512  # histogram over [-amax, amax]
ENTROPY_LEVELS = 255  # quantized bins of the KL search: the levels -127..127 of symmetric INT8


def conv_activations(model: onnx.ModelProto) -> List[str]:
    """The activation tensors feeding Conv nodes with constant weights (the quantized convolutions)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "Conv" and n.input[1] in inits and n.input[0] not in inits and n.input[0] not in out:
            out.append(n.input[0])
    return out


def residual_adds(model: onnx.ModelProto) -> List[Tuple[onnx.NodeProto, int]]:
    """``(Add node, index of its skip input)`` for every residual Add: one input is the output of a
    quantized Conv, the other a computed activation (not a constant such as the position embedding)."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    constants = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    conv_out = {n.output[0] for n in g.node if n.op_type == "Conv" and n.input[1] in inits}
    found = []
    for n in g.node:
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        a, b = n.input
        for conv_side, skip in ((0, 1), (1, 0)):
            x, y = (a, b)[conv_side], (a, b)[skip]
            if x in conv_out and y not in conv_out and y not in inits and y not in constants:
                found.append((n, skip))
                break
    return found


def quantized_activations(model: onnx.ModelProto) -> List[str]:
    """Every activation tensor that gets a Q/DQ pair: Conv inputs, then residual skip inputs."""
    out = conv_activations(model)
    for n, i in residual_adds(model):
        if n.input[i] not in out:
            out.append(n.input[i])
    return out


def graph_hash(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()[:16]


def _calibrator(method: str, model_path: Path, augmented: Path, names: Sequence[str]):
    """ONNX Runtime's calibrator for ``method``, restricted to the tensors ``names``."""
    from onnxruntime.quantization import calibrate as oc

    if method == "max":
        cls, kw = oc.MinMaxCalibrater, {"symmetric": True}
    elif method == "entropy":
        cls, kw = oc.EntropyCalibrater, {"symmetric": True, "num_bins": ENTROPY_BINS,
                                         "num_quantized_bins": ENTROPY_LEVELS}
    elif method == "percentile":
        cls, kw = oc.PercentileCalibrater, {"symmetric": True, "num_bins": PERCENTILE_BINS, "percentile": PERCENTILE}
    else:
        raise ValueError(f"calibration method {method!r}: choose one of {METHODS}")
    wanted = set(names)

    class Selected(cls):  # the per-node selection: only the tensors that get Q/DQ
        def select_tensors_to_calibrate(self, model):
            tensors, value_infos = super().select_tensors_to_calibrate(model)
            missing = wanted - set(tensors)
            if missing:
                raise ValueError(f"ONNX Runtime's calibrator cannot see {sorted(missing)[:4]} (no inferred float type)")
            return set(tensors) & wanted, value_infos

    cal = Selected(str(model_path), None, str(augmented), **kw)
    cal.augment_graph()
    cal.create_inference_session()
    return cal


class _OneBatch:
    """A CalibrationDataReader over one feed (ONNX Runtime's interface: get_next until None)."""

    def __init__(self, feed: Dict[str, np.ndarray]) -> None:
        self.feed: Optional[Dict[str, np.ndarray]] = feed

    def get_next(self):
        feed, self.feed = self.feed, None
        return feed

    def rewind(self):  # part of the reader interface; one pass is all the calibrators take
        pass


def collect_ranges(model: onnx.ModelProto, batches: Iterable[np.ndarray], method: str = "entropy") -> Dict[str, float]:
    """Symmetric amax of every quantized activation (:func:`quantized_activations`) over the calibration
    batches, computed by ONNX Runtime's calibrator for ``method``. One batch at a time: histograms
    and extrema are merged as they come, so memory does not grow with the number of images."""
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: choose one of {METHODS}")
    names = quantized_activations(model)
    inp = model.graph.input[0].name
    static_b = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value  # 0 when dynamic

    def chunks(x):  # a static-batch graph takes exactly its batch: split, repeat the last image to fill
        if not static_b or len(x) == static_b:
            yield x
            return
        for i in range(0, len(x), static_b):
            c = x[i : i + static_b]
            yield c if len(c) == static_b else np.concatenate([c, np.repeat(c[-1:], static_b - len(c), axis=0)])

    seen = 0
    with tempfile.TemporaryDirectory(prefix="cvig-calib-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, str(path))
        cal = _calibrator(method, path, Path(tmp) / "augmented.onnx", names)
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print progress lines
            for xb in batches:
                seen += len(xb)
                for x in chunks(np.ascontiguousarray(xb, np.float32)):
                    cal.collect_data(_OneBatch({inp: x}))
            if seen == 0:
                raise ValueError("no calibration samples were given")
            data = cal.compute_data()
    out = {}
    for n in names:
        lo, hi = (float(np.max(np.abs(v))) for v in data[n].range_value)  # arrays of shape () or (1,)
        out[n] = max(lo, hi, 1e-8)
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


def _qdq(x: str, amax: float) -> Tuple[List[onnx.NodeProto], List[onnx.TensorProto], str]:
    """A symmetric per-tensor Q/DQ pair on ``x``: its nodes, initializers and the dequantized name."""
    s_name, z_name = f"{x}:scale", f"{x}:zero"
    inits = [numpy_helper.from_array(np.array(amax / 127.0, np.float32), s_name),
             numpy_helper.from_array(np.array(0, np.int8), z_name)]
    nodes = [helper.make_node("QuantizeLinear", [x, s_name, z_name], [f"{x}:q"], name=f"{x}/QuantizeLinear"),
             helper.make_node("DequantizeLinear", [f"{x}:q", s_name, z_name], [f"{x}:dq"], name=f"{x}/DequantizeLinear")]
    return nodes, inits, f"{x}:dq"


def quantize_qdq(model: onnx.ModelProto, ranges: Dict[str, float], residual: bool = True,
                 convs: Optional[Collection[str]] = None) -> onnx.ModelProto:
    """Insert symmetric Q/DQ: per-tensor on every Conv's activation input and (``residual``) on the skip input
    of every residual Add (sharing one pair per tensor), per-channel INT8 weights (axis 0) on every Conv.
    ``residual=False`` is the Conv-only placement (kept for comparisons); ``convs`` (node names) limits the
    quantized convolutions, and the residual Adds to theirs (per-block studies, ``bench.int8_blocks``)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n.name for n in g.node for o in n.output}
    chosen = (lambda name: True) if convs is None else (lambda name: name in convs)  # noqa: E731
    skip_of = {n.output[0]: i for n, i in residual_adds(out) if chosen(producer.get(n.input[1 - i], ""))} if residual else {}  # by output name (SSA): protobuf wrappers have no stable id
    new_nodes, new_inits = [], []
    act_done: Dict[str, str] = {}

    def dequantized(x: str) -> str:
        if x not in act_done:
            nodes, tensors, dq = _qdq(x, ranges[x])
            new_nodes.extend(nodes)
            new_inits.extend(tensors)
            act_done[x] = dq
        return act_done[x]

    for n in g.node:
        if n.op_type == "Conv" and n.input[1] in inits and chosen(n.name):
            if n.input[0] in ranges:
                n.input[0] = dequantized(n.input[0])
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
        elif n.op_type == "Add" and n.output[0] in skip_of and n.input[skip_of[n.output[0]]] in ranges:
            i = skip_of[n.output[0]]
            n.input[i] = dequantized(n.input[i])
        new_nodes.append(n)
    used = {x for nd in new_nodes for x in nd.input}
    keep = [t for t in g.initializer if t.name in used] + new_inits
    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend(keep)
    return out
