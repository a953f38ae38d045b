"""Static check of an ONNX graph against the TensorRT operator limits the project relies on.

TensorRT cannot be installed on the machines that export (docs/tensorrt.md), so
an op it rejects would only show up on the GPU machine, after the export was
declared good. This check reads the graph for the limits listed in
docs/tensorrt.md section 5 ("Operator limits met by this model") and returns one
line per offending node; ``cvig-export`` records the lines in report.json and
prints them.

What is checked (sources: onnx-tensorrt ``docs/operators.md`` at ``10.1-GA``,
``NvInfer.h`` of TensorRT 10.3 and 11.1, the plugins' own argument checks):

* TopK: K <= 3840, with K folded from constants and ``Shape -> Gather -> ...``
  chains over the static shapes; a K that stays unknown is bounded by the
  reduced axis' static length. Value types FP32/FP16/BF16/INT32/INT64,
  ``sorted`` = 1, reduced axis among the last four. ArgMin/ArgMax: the same
  value types.
* CumSum: input FP32/FP16/BF16 (the 10.x importer lowers it to a loop and does
  not check the type), axis an initializer.
* Axes that the parser reads as weights: Reduce*, Unsqueeze, Squeeze and Slice
  axes given as tensors must be initializers / Constant outputs.
* Q/DQ: scales build-time constants (a Constant, or a Constant through a Cast)
  and > 0; zero points absent or constant zeros.
* ScatterElements / ScatterND with a reduction.
* Tensor volume: no tensor may hold more than 2**31 - 1 elements (TensorRT's limit: the maintainers'
  answers in NVIDIA/TensorRT#1948 and #2704, the parser's "tensor volume exceeds (2^31)-1" of #3324 for a
  MatMul output, and convolutions still in 10.4 per #4123). The batch dimension is taken at the
  largest batch the export records (``clustervig.batch``: B, or MIN:OPT:MAX).
* Plugin nodes (by op_type, in any domain): ``CvigPartitionedKNN`` k in 1..64,
  ``CvigKMeans`` / ``CvigKMeansCentroids`` / ``CvigSegmentMean`` clusters >= 1 (and <= N),
  iters >= 0, ``CvigKMeansCentroids`` empty_zero 0 or 1,
  and the k-means shared-memory working set for the node's N, C, kappa against
  the opt-in limits of the target GPUs (:data:`SMEM_OPTIN_LIMITS`).

:func:`tensorrt_op_issues` returns what TensorRT (or our plugins) would refuse;
:func:`tensorrt_op_warnings` what builds but needs attention (a k-means working
set above the 48 KiB default that some targets cannot give).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

TOPK_MAX_K = 3840  # ITopKLayer::setK / addTopK documentation, TensorRT 10.3 and 11.1
# onnx-tensorrt docs/operators.md (10.1-GA): TopK, ArgMax and ArgMin take FP32, FP16, BF16, INT32, INT64
TOPK_VALUE_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32,
                    TensorProto.INT64}
ARG_VALUE_TYPES = TOPK_VALUE_TYPES
CUMSUM_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}  # operators.md: CumSum
REDUCE_OPS = ("ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum")

# Plugins (plugins/common/cvig_kernels.h, cvig_args.h, the creators' valid())
KNN_MAX_K = 64  # CVIG_MAX_K
SMEM_DEFAULT_BYTES = 48 * 1024  # above this a kernel must opt in (cudaFuncSetAttribute), as the k-means launcher does
# Largest dynamic shared memory one block may opt in to, per target. Values from NVIDIA CUTLASS: the CuTe DSL's
# SMEM_CAPACITY_MAP (sm_80 (164-1) KiB, sm_86/sm_89/sm_120 (100-1) KiB, sm_90/sm_100 (228-1) KiB) and
# sm90_smem_capacity_bytes = 232448 in include/cutlass/gemm/collective/builders/sm90_common.inl.
# sm_75 and sm_87 (Orin) could not be checked against an NVIDIA source here and are left out.
SMEM_OPTIN_LIMITS: Dict[str, int] = {
    "sm_80": 163 * 1024,
    "sm_86": 99 * 1024,
    "sm_89": 99 * 1024,
    "sm_90": 227 * 1024,
    "sm_100": 227 * 1024,
    "sm_120": 99 * 1024,
}


TENSOR_MAX_ELEMENTS = 2**31 - 1  # per tensor (module docstring: NVIDIA/TensorRT#1948, #2704, #3324, #4123)


def export_max_batch(model: onnx.ModelProto) -> Optional[int]:
    """The largest batch an exported graph is built for: its ``clustervig.batch`` metadata (B, or MIN:OPT:MAX),
    else a static batch dimension of its first input; None when neither says."""
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        parts = [int(v) for v in meta.get("clustervig.batch", "").split(":") if v]
    except ValueError:
        parts = []
    if parts:
        return max(parts)
    if model.graph.input:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            return int(dims[0].dim_value)
    return None


def _at_batch(shape: Optional[List[Optional[int]]], batch: Optional[int]) -> Optional[List[int]]:
    """A static shape with an unknown leading (batch) dimension set to ``batch``; None if anything else is
    unknown."""
    if not shape:
        return None
    shape = list(shape)
    if shape[0] is None and batch is not None:
        shape[0] = batch
    return shape if all(d is not None for d in shape) else None


def kmeans_smem_bytes(n: int, c: int, clusters: int) -> int:
    """The k-means kernel's shared-memory working set (plugins/common/cvig_args.h ``kmeans_smem_bytes``)."""
    return (clusters * c + clusters) * 4 + (2 * clusters + 2 * n) * 4


@dataclass
class Finding:
    node: str
    op: str
    message: str
    severity: str  # "error": TensorRT or our plugin refuses it; "warning": builds, needs attention

    def line(self) -> str:
        return f"{self.node} ({self.op}): {self.message}"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# --------------------------------------------------------------------------
# Static values: initializers, Constant nodes, and what folds from them and
# from static shapes (Shape -> Gather -> ... chains).
# --------------------------------------------------------------------------

_MAX_FOLD = 1 << 16  # elements; shape arithmetic is tiny, anything larger is not what K or axes are made of


def _np_type(elem: int):
    return onnx.helper.tensor_dtype_to_np_dtype(elem)


class _Values:
    """Known tensors: ``full`` numpy arrays, ``partial`` 1-D int vectors with unknown (None) entries."""

    def __init__(self, g: onnx.GraphProto, dims: Dict[str, List[Optional[int]]]):
        self.raw: Dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:  # Constant nodes count as initializers for the parser
            if n.op_type == "Constant":
                v = self._constant(n)
                if v is not None:
                    self.raw[n.output[0]] = v
        self.full: Dict[str, np.ndarray] = dict(self.raw)
        self.partial: Dict[str, List[Optional[int]]] = {}
        self.dims = dims
        for n in g.node:
            try:
                self._fold(n)
            except Exception:  # an op we cannot evaluate leaves its outputs unknown
                pass

    @staticmethod
    def _constant(n: onnx.NodeProto) -> Optional[np.ndarray]:
        for a in n.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name in ("value_int", "value_float"):
                return np.array(onnx.helper.get_attribute_value(a))
            if a.name in ("value_ints", "value_floats"):
                return np.array(onnx.helper.get_attribute_value(a))
        return None

    def vec(self, name: str) -> Optional[List[Optional[int]]]:
        """A 1-D integer vector, possibly partial."""
        if name in self.partial:
            return self.partial[name]
        v = self.full.get(name)
        if v is not None and v.ndim == 1 and v.dtype.kind in "iu":
            return [int(x) for x in v]
        return None

    def _set_vec(self, name: str, vec: List[Optional[int]]) -> None:
        if all(x is not None for x in vec):
            self.full[name] = np.array(vec, dtype=np.int64)
        else:
            self.partial[name] = vec

    def _fold(self, n: onnx.NodeProto) -> None:
        op, ins, out = n.op_type, list(n.input), n.output[0] if n.output else ""
        if not out or out in self.full:
            return
        if op == "Shape":
            d = self.dims.get(ins[0])
            if d is None:
                return
            start, end = _attr(n, "start", 0), _attr(n, "end", None)
            self._set_vec(out, list(d)[slice(start, end)])
            return
        # partial vectors through shape-style ops
        if any(i in self.partial for i in ins if i):
            if op in ("Cast", "Identity"):
                self.partial[out] = self.partial[ins[0]]
            elif op == "Gather" and _attr(n, "axis", 0) == 0 and ins[1] in self.full:
                src, idx = self.partial[ins[0]], self.full[ins[1]]
                picked = [src[int(i)] for i in idx.reshape(-1)]
                if idx.ndim == 0:
                    if picked[0] is not None:
                        self.full[out] = np.array(picked[0], dtype=np.int64)
                else:
                    self._set_vec(out, picked)
            elif op == "Slice" and all(i in self.full for i in ins[1:3]):
                src = self.partial[ins[0]]
                st = int(self.full[ins[1]][0]); en = int(self.full[ins[2]][0])
                step = int(self.full[ins[4]][0]) if len(ins) > 4 and ins[4] in self.full else 1
                self._set_vec(out, src[slice(st, en, step)])
            elif op == "Concat":
                parts = [self.vec(i) for i in ins]
                if all(p is not None for p in parts):
                    self._set_vec(out, [x for p in parts for x in p])
            return
        if not all((i in self.full) for i in ins if i):
            return
        v = [self.full[i] if i else None for i in ins]
        if any(x is not None and x.size > _MAX_FOLD for x in v):
            return
        r = self._eval(n, op, v)
        if r is not None and np.asarray(r).size <= _MAX_FOLD:
            self.full[out] = np.asarray(r)

    def _eval(self, n: onnx.NodeProto, op: str, v: List[Optional[np.ndarray]]):
        a = v[0] if v else None
        if op == "Identity":
            return a
        if op == "Cast":
            return a.astype(_np_type(_attr(n, "to")))
        if op in ("Add", "Sub", "Mul", "Div", "Min", "Max", "Equal", "Less", "Greater", "LessOrEqual",
                  "GreaterOrEqual", "And", "Or", "Mod"):
            b = v[1]
            if op == "Div":
                return (np.trunc(a / b).astype(a.dtype) if a.dtype.kind in "iu" else a / b)
            fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Min": np.minimum, "Max": np.maximum,
                  "Equal": np.equal, "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
                  "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or, "Mod": np.mod}[op]
            return fn(a, b)
        if op in ("Neg", "Abs", "Not", "Floor", "Ceil", "Sqrt"):
            return {"Neg": np.negative, "Abs": np.abs, "Not": np.logical_not, "Floor": np.floor, "Ceil": np.ceil,
                    "Sqrt": np.sqrt}[op](a)
        if op == "Where":
            return np.where(v[0], v[1], v[2])
        if op == "Gather":
            return np.take(a, v[1], axis=_attr(n, "axis", 0))
        if op == "Concat":
            return np.concatenate([x for x in v if x is not None], axis=_attr(n, "axis", 0))
        if op == "Unsqueeze":
            axes = list(v[1]) if len(v) > 1 and v[1] is not None else list(_attr(n, "axes"))
            out = a
            rank = a.ndim + len(axes)
            for ax in sorted(x % rank for x in axes):
                out = np.expand_dims(out, ax)
            return out
        if op == "Squeeze":
            axes = list(v[1]) if len(v) > 1 and v[1] is not None else _attr(n, "axes")
            return np.squeeze(a, axis=tuple(int(x) for x in axes) if axes is not None else None)
        if op == "Reshape":
            shape = [int(s) for s in v[1]]
            shape = [a.shape[i] if s == 0 and not _attr(n, "allowzero", 0) else s for i, s in enumerate(shape)]
            return a.reshape(shape)
        if op == "Slice":
            starts, ends = v[1], v[2]
            axes = v[3] if len(v) > 3 and v[3] is not None else np.arange(len(starts))
            steps = v[4] if len(v) > 4 and v[4] is not None else np.ones(len(starts), dtype=np.int64)
            sl = [slice(None)] * a.ndim
            for s, e, ax, st in zip(starts, ends, axes, steps):
                sl[int(ax)] = slice(int(s), int(e), int(st))
            return a[tuple(sl)]
        if op == "ConstantOfShape":
            t = _attr(n, "value")
            fill = numpy_helper.to_array(t).reshape(-1)[0] if t is not None else np.float32(0)
            return np.full([int(s) for s in a], fill, dtype=np.asarray(fill).dtype)
        if op == "Range":
            return np.arange(a, v[1], v[2])
        if op == "Size":
            return np.array(a.size, dtype=np.int64)
        if op in ("ReduceProd", "ReduceSum", "ReduceMin", "ReduceMax"):
            axes = v[1] if len(v) > 1 and v[1] is not None else _attr(n, "axes")
            keep = bool(_attr(n, "keepdims", 1))
            fn = {"ReduceProd": np.prod, "ReduceSum": np.sum, "ReduceMin": np.min, "ReduceMax": np.max}[op]
            return fn(a, axis=tuple(int(x) for x in axes) if axes is not None and len(axes) else None, keepdims=keep)
        return None


def _dims(g: onnx.GraphProto) -> Dict[str, List[Optional[int]]]:
    out: Dict[str, List[Optional[int]]] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    for t in g.initializer:
        out[t.name] = list(t.dims)
    return out


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes and types of every tensor: ONNX Runtime's symbolic shape inference (it follows Range,
    TopK and shape arithmetic, which onnx's own inference leaves unknown), else onnx's."""
    import contextlib
    import io
    import os
    import tempfile

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        SymbolicShapeInference = None
    # plugin ops (custom domains) stop the plain run; guessing their outputs' rank lets it go on to the
    # tensors after them (the plugins' own checks need only their inputs' shapes)
    for kw in ({}, {"guess_output_rank": True}) if SymbolicShapeInference is not None else ():
        # when it cannot finish, ONNX Runtime's inference saves "sym_shape_infer_temp.onnx" and its weights
        # into the working directory: run it in a scratch directory so nothing lands in the user's
        cwd = os.getcwd()
        with tempfile.TemporaryDirectory(prefix="cvig-shapes-") as scratch:
            try:
                os.chdir(scratch)
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    out = SymbolicShapeInference.infer_shapes(model, auto_merge=True, **kw)
                if out is not None:
                    return out
            except Exception:
                continue
            finally:
                os.chdir(cwd)
    for kw in ({"data_prop": True}, {}):
        try:
            return onnx.shape_inference.infer_shapes(model, **kw)
        except Exception:
            continue
    return model


def check_tensorrt_ops(model: onnx.ModelProto, targets: Optional[Sequence[str]] = None) -> List[Finding]:
    """Every finding of the checks above, errors and warnings, in graph order.

    ``targets`` restricts the shared-memory comparison to some of :data:`SMEM_OPTIN_LIMITS` (default: all).
    """
    g = _infer(model).graph
    types: Dict[str, int] = {vi.name: vi.type.tensor_type.elem_type
                             for vi in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:  # plugin outputs: a guessed type (input's) is no type
        if n.domain not in ("", "ai.onnx"):
            for o in n.output:
                types.pop(o, None)
    dims = _dims(g)
    vals = _Values(g, dims)
    producer = {o: n for n in g.node for o in n.output}
    limits = {k: v for k, v in SMEM_OPTIN_LIMITS.items() if targets is None or k in targets}

    def raw(name: str) -> Optional[np.ndarray]:
        return vals.raw.get(name) if name else None

    def build_time_const(name: str) -> Optional[np.ndarray]:
        """A Constant / initializer, or one through a Cast (tensorrt.md section 2, Q/DQ scales)."""
        v = raw(name)
        if v is None and name in producer and producer[name].op_type == "Cast":
            v = raw(producer[name].input[0])
        return v

    def tname(t: Optional[int]) -> str:
        return TensorProto.DataType.Name(t) if t else "unknown"

    found: List[Finding] = []
    batch = export_max_batch(model)
    for n in g.node:
        where = n.name or "<unnamed>"

        def flag(msg: str, severity: str = "error") -> None:
            found.append(Finding(where, n.op_type, msg, severity))

        op = n.op_type
        if n.domain not in ("", "ai.onnx"):
            _check_plugin(n, dims, flag, limits)
            continue
        for out in n.output:
            shape = _at_batch(dims.get(out), batch)
            volume = int(np.prod(shape, dtype=np.int64)) if shape is not None else 0
            if volume > TENSOR_MAX_ELEMENTS:
                per_image = volume // shape[0] if shape[0] else volume
                fits = TENSOR_MAX_ELEMENTS // per_image if per_image else 0
                flag(f"output {out} {shape} has {volume} elements, above TensorRT's limit of 2**31-1 per tensor"
                     + (f" at batch {shape[0]}: a batch of at most {fits} fits" if fits and shape[0] > 1 else "")
                     + ("; the padded k-NN layout with a capacity below N, or the plugin graph, keeps N x N "
                        "similarities out of the graph" if op == "MatMul" else ""))
        if op == "ScatterElements" and _attr(n, "reduction", b"none") not in (b"none", "none"):
            flag("ScatterElements with a reduction needs NVIDIA's plugin library")
        elif op == "ScatterND" and _attr(n, "reduction", b"none") not in (b"none", "none"):
            flag("ScatterND with a reduction is not supported")
        elif op in REDUCE_OPS and len(n.input) > 1 and n.input[1] and raw(n.input[1]) is None:
            flag("reduction axes must be an initializer")
        elif op in ("Unsqueeze", "Squeeze") and len(n.input) > 1 and n.input[1] and raw(n.input[1]) is None:
            flag(f"{op} axes must be a constant (initializer or Constant), not a computed tensor")
        elif op == "Slice" and len(n.input) > 3 and n.input[3] and raw(n.input[3]) is None:
            flag("Slice axes must be an initializer, not a computed tensor")
        elif op == "TopK":
            t = types.get(n.input[0])
            if t and t not in TOPK_VALUE_TYPES:
                flag(f"TopK values of type {tname(t)} (TensorRT takes FP32/FP16/BF16/INT32/INT64)")
            if _attr(n, "sorted", 1) != 1:
                flag("TopK with sorted=0 (TensorRT's parser needs sorted=1)")
            shape = dims.get(n.input[0])
            rank = len(shape) if shape is not None else None
            axis = _attr(n, "axis", -1)
            if rank is not None and (axis if axis >= 0 else axis + rank) < rank - 4:
                flag(f"TopK axis {axis} is not among the last four")
            k = vals.full.get(n.input[1])
            if k is not None:
                kv = int(np.asarray(k).reshape(-1)[0])
                if kv > TOPK_MAX_K:
                    flag(f"K = {kv} > {TOPK_MAX_K}")
            elif rank:  # K unknown: ONNX needs K <= the axis length, so a static length <= 3840 bounds it
                length = shape[axis % rank]
                if length is not None and length > TOPK_MAX_K:
                    flag(f"K is not known statically and the reduced axis has {length} > {TOPK_MAX_K} elements "
                         "(a K above 3840 is a runtime error)", "warning")
        elif op in ("ArgMin", "ArgMax"):
            t = types.get(n.input[0])
            if t and t not in ARG_VALUE_TYPES:
                flag(f"{op} on {tname(t)} (TensorRT takes FP32/FP16/BF16/INT32/INT64)")
        elif op == "CumSum":
            if raw(n.input[1]) is None:
                flag("CumSum axis must be an initializer")
            t = types.get(n.input[0])
            if t and t not in CUMSUM_TYPES:
                flag(f"CumSum on {tname(t)} (TensorRT takes FP32/FP16/BF16; cast around it, e.g. FP32 counts "
                     "are exact below 2**24)")
        elif op in ("QuantizeLinear", "DequantizeLinear"):
            scale = build_time_const(n.input[1]) if len(n.input) > 1 else None
            if scale is None:
                flag("Q/DQ scale must be a build-time constant (a Constant or initializer, optionally through a Cast)")
            elif not (np.all(np.isfinite(scale)) and np.all(np.asarray(scale, dtype=np.float64) > 0)):
                flag(f"Q/DQ scale must be > 0 (min {float(np.min(scale)):.3g})")
            if len(n.input) > 2 and n.input[2]:
                zp = build_time_const(n.input[2])
                if zp is None:
                    flag("Q/DQ zero point must be a constant zero")
                elif np.any(np.asarray(zp) != 0):
                    flag("Q/DQ zero point must be 0 (TensorRT quantization is symmetric)")
    return found


def _check_plugin(n: onnx.NodeProto, dims, flag, limits: Dict[str, int]) -> None:
    """The project's plugin nodes against the limits their creators and kernels apply."""
    op = n.op_type
    if op == "CvigPartitionedKNN":
        k = _attr(n, "k", 9)  # the creator's default
        if not 1 <= k <= KNN_MAX_K:
            flag(f"k = {k} outside 1..{KNN_MAX_K} (CvigPartitionedKNN keeps at most {KNN_MAX_K} neighbours)")
    elif op in ("CvigKMeans", "CvigKMeansCentroids", "CvigSegmentMean"):
        clusters = _attr(n, "clusters", 4)
        shape = dims.get(n.input[0])
        n_tok = shape[1] if shape is not None and len(shape) == 3 else None
        c = shape[2] if shape is not None and len(shape) == 3 else None
        if clusters < 1:
            flag(f"clusters = {clusters} < 1")
            return
        if n_tok is not None and clusters > n_tok:
            flag(f"clusters = {clusters} > N = {n_tok} tokens")
        if op == "CvigSegmentMean":
            return
        if _attr(n, "iters", 20) < 0:
            flag(f"iters = {_attr(n, 'iters', 20)} < 0")
        if op == "CvigKMeansCentroids" and _attr(n, "empty_zero", 1) not in (0, 1):
            flag(f"empty_zero = {_attr(n, 'empty_zero', 1)} is not 0 or 1")
        if n_tok is None or c is None:
            return
        need = kmeans_smem_bytes(n_tok, c, clusters)
        if need <= SMEM_DEFAULT_BYTES:
            return
        fits = sorted(t for t, lim in limits.items() if need <= lim)
        short = sorted(t for t, lim in limits.items() if need > lim)
        what = f"k-means working set {need} B ({need / 1024:.1f} KiB) for N={n_tok}, C={c}, clusters={clusters}"
        if limits and not fits:
            flag(f"{what} exceeds every target's opt-in shared memory (largest {max(limits.values()) // 1024} KiB)")
        else:
            flag(f"{what} is above the 48 KiB default: the kernel opts in (cudaFuncSetAttribute)"
                 + (f"; too large for {', '.join(short)}" if short else ""), "warning")


_ELEMENT_BYTES = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.INT64: 8,
                  TensorProto.INT32: 4, TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.BOOL: 1,
                  TensorProto.DOUBLE: 8}


def memory_summary(model: onnx.ModelProto, top: Optional[int] = 8, batch: Optional[int] = None) -> Dict:
    """What a TensorRT build of this graph has to hold, from its static shapes at ``batch`` (default: the
    largest batch the export records, :func:`export_max_batch`):

    * ``largest``: the ``top`` (None: all) largest intermediate tensors (graph inputs, outputs and weights left out), one
      entry per (op, shape, type) with how many nodes produce one (``count``, e.g. once per block): ``op``,
      ``example`` (a node), ``shape``, ``dtype``, ``bytes`` each;
    * ``topk``: per distinct TopK, the reduced axis' length and K (TensorRT: K <= 3840);
    * ``kmeans_smem``: per distinct plugin k-means node, its N, C, clusters and working set in bytes;
    * ``max_elements``: the largest tensor's element count against :data:`TENSOR_MAX_ELEMENTS`.
    """
    batch = batch if batch is not None else export_max_batch(model)
    g = _infer(model).graph
    dims = _dims(g)
    types: Dict[str, int] = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info)}
    skip = {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
    rows: Dict[tuple, Dict] = {}
    topk: Dict[tuple, Dict] = {}
    smem: Dict[tuple, Dict] = {}
    max_elements = 0
    vals = None
    for n in g.node:
        if n.domain not in ("", "ai.onnx"):
            if n.op_type in ("CvigKMeans", "CvigKMeansCentroids"):
                shape = dims.get(n.input[0])
                if shape is not None and len(shape) == 3 and shape[1] and shape[2]:
                    k = _attr(n, "clusters", 4)
                    key = (shape[1], shape[2], k)
                    smem.setdefault(key, {"n": shape[1], "c": shape[2], "clusters": k,
                                          "bytes": kmeans_smem_bytes(shape[1], shape[2], k), "count": 0})["count"] += 1
            continue
        if n.op_type == "TopK":
            shape = dims.get(n.input[0])
            if vals is None:
                vals = _Values(g, dims)
            kv = vals.full.get(n.input[1])
            if shape:
                axis = _attr(n, "axis", -1) % len(shape)
                key = (shape[axis], None if kv is None else int(np.asarray(kv).reshape(-1)[0]))
                topk.setdefault(key, {"axis_length": key[0], "k": key[1], "count": 0})["count"] += 1
        for out in n.output:
            if out in skip:
                continue
            shape = _at_batch(dims.get(out), batch)
            t = types.get(out)
            if shape is None or t not in _ELEMENT_BYTES:
                continue
            elements = int(np.prod(shape, dtype=np.int64))
            max_elements = max(max_elements, elements)
            key = (n.op_type, tuple(shape), t)
            row = rows.setdefault(key, {"op": n.op_type, "example": n.name, "shape": list(shape),
                                        "dtype": TensorProto.DataType.Name(t).lower(),
                                        "bytes": elements * _ELEMENT_BYTES[t], "count": 0})
            row["count"] += 1
    largest = sorted(rows.values(), key=lambda r: -r["bytes"])[:top]
    return {"batch": batch, "largest": largest, "topk": sorted(topk.values(), key=lambda r: -r["axis_length"]),
            "kmeans_smem": list(smem.values()), "max_elements": max_elements,
            "max_elements_limit": TENSOR_MAX_ELEMENTS}


def tensorrt_op_issues(model: onnx.ModelProto) -> List[str]:
    """Lines ``"<node name> (<op>): <why>"`` for every node TensorRT would reject; empty when none."""
    return [f.line() for f in check_tensorrt_ops(model) if f.severity == "error"]


def tensorrt_op_warnings(model: onnx.ModelProto) -> List[str]:
    """Lines for nodes that build but need attention (e.g. a shared-memory opt-in some GPUs cannot give)."""
    return [f.line() for f in check_tensorrt_ops(model) if f.severity == "warning"]
