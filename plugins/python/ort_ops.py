"""The plugin ops as ONNX Runtime custom ops (onnxruntime-extensions), so the plugin graph runs on a CPU.

Each op calls the project's own kernels, compiled for the host
(``libcvig_kernels_host.so``, the same source as the CUDA kernels behind the
TensorRT plugins): validating, running or measuring a plugin graph on a CPU
exercises the code TensorRT will run. The loop-based ``reference`` module
stays the independent judge of semantics.
"""
from __future__ import annotations

import numpy as np

from . import kernels

ORT_DOMAIN = "ai.onnx.contrib"
_REGISTERED = False


def _install_array_hook() -> bool:
    """Hand Python op outputs to onnxruntime-extensions as arrays instead of Python lists.

    Its stock hook returns every output as ``array.flatten().tolist()``, which
    the C++ side turns back into an array: ~130 ns per element, 40 ms for one
    cvig_ti batch-8 gather-max-rel output, more than the kernel itself. The
    C++ side accepts any array (it casts to ``py::array`` and copies the
    buffer), so this hook returns contiguous flat arrays; string outputs keep
    the list form the C++ side needs for them. Returns False, leaving the
    stock hook, where the package's internals are not the ones this was
    written against (0.15).
    """
    try:
        from onnxruntime_extensions import _ocos
        from onnxruntime_extensions._extensions_pydll import PyCustomOpDef
    except ImportError:
        return False
    opdefs = getattr(getattr(_ocos, "Opdef", None), "_odlist", None)
    if opdefs is None or not hasattr(PyCustomOpDef, "install_hooker"):
        return False

    def invoke(k_id, feed, attributes):
        op = opdefs[k_id]
        rv = op.body(*feed, **op.cast_attributes(attributes))
        res = []
        for r in rv if isinstance(rv, tuple) else (rv,):
            r = np.asarray(r)
            res += [r.shape, r.flatten().tolist() if r.dtype.kind in "OUS" else np.ascontiguousarray(r).reshape(-1)]
        return (k_id,) + tuple(res)

    PyCustomOpDef.install_hooker(invoke)
    return True


def register() -> str:
    """Register the Cvig* ops with onnxruntime-extensions; returns the library path for SessionOptions.

    Loads (building on first use) the host kernel library first, so a missing
    compiler or library is reported here rather than inside a session run.
    """
    global _REGISTERED
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    lib = kernels.host_library()
    if not _REGISTERED:
        f, i32, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_int64

        @onnx_op(op_type="CvigKMeans", inputs=[f], outputs=[i32, i32], attrs={"clusters": i64, "iters": i64})
        def _kmeans(xn, **a):
            return kernels.kmeans(xn, int(a["clusters"]), int(a["iters"]), lib=lib)

        @onnx_op(op_type="CvigKMeansCentroids", inputs=[f], outputs=[i32, i32, f],
                 attrs={"clusters": i64, "iters": i64, "empty_zero": i64})
        def _kmeans_centroids(x, **a):
            return kernels.kmeans_centroids(x, int(a["clusters"]), int(a["iters"]), bool(a["empty_zero"]), lib=lib)

        @onnx_op(op_type="CvigPartitionedKNN", inputs=[f, i32], outputs=[i32, i32], attrs={"k": i64})
        def _knn(xn, labels, **a):
            return kernels.partitioned_knn(xn, labels, int(a["k"]), lib=lib)

        @onnx_op(op_type="CvigSegmentMean", inputs=[f, i32], outputs=[f, i32], attrs={"clusters": i64})
        def _segment_mean(x, labels, **a):
            return kernels.segment_mean(x, labels, int(a["clusters"]), lib=lib)

        @onnx_op(op_type="CvigGatherMaxRel", inputs=[f, i32], outputs=[f])
        def _gather_max_rel(x, idx):
            return kernels.gather_max_rel(x, idx, lib=lib)

        _install_array_hook()
        _REGISTERED = True
    return get_library_path()
