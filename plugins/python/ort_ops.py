"""The plugin ops as ONNX Runtime custom ops (onnxruntime-extensions), so the plugin graph runs on a CPU.

These mirror the FP32 arithmetic of the pure ONNX graph (one-hot matmuls,
``||c||^2 - 2 x.c`` distances, masked similarity + stable ordering) so that
the plugin graph can be compared with the pure graph bit for bit where no
near-tie decides; the loop-based ``reference`` module stays the independent
judge of semantics.
"""
from __future__ import annotations

import numpy as np

ORT_DOMAIN = "ai.onnx.contrib"
_REGISTERED = False


def kmeans_f32(xn: np.ndarray, k: int, iters: int):
    b, n, _ = xn.shape
    x = xn.astype(np.float32)
    init = [(2 * i + 1) * n // (2 * k) for i in range(k)]
    cent = x[:, init, :].copy()
    eye = np.eye(k, dtype=np.float32)
    for t in range(iters + 1):
        d = (cent * cent).sum(-1)[:, None, :] - np.float32(2.0) * np.matmul(x, cent.transpose(0, 2, 1))
        lab = d.argmin(-1)
        if t == iters:
            break
        onehot = eye[lab]  # [B, N, k]
        counts = onehot.sum(1)[..., None]
        sums = np.matmul(onehot.transpose(0, 2, 1), x)
        cent = np.where(counts > 0, sums / np.maximum(counts, 1), cent).astype(np.float32)
    counts = np.stack([np.bincount(l, minlength=k) for l in lab]).astype(np.int32)
    return lab.astype(np.int32), counts


def knn_f32(xn: np.ndarray, labels: np.ndarray, k: int):
    b, n, _ = xn.shape
    x = xn.astype(np.float32)
    sim = np.matmul(x, x.transpose(0, 2, 1))
    same = labels[:, :, None] == labels[:, None, :]
    sim = np.where(same, sim, np.float32(-1e4))
    sim[:, np.arange(n), np.arange(n)] = np.float32(1e2)
    order = np.argsort(-sim, axis=-1, kind="stable")[..., :k]
    vals = np.take_along_axis(sim, order, -1)
    valid = vals > -5e3
    self_idx = np.broadcast_to(np.arange(n)[None, :, None], order.shape)
    return np.where(valid, order, self_idx).astype(np.int32), valid.astype(np.int32)


def segment_mean_f32(x: np.ndarray, labels: np.ndarray, k: int):
    onehot = np.eye(k, dtype=x.dtype)[labels]
    counts = onehot.sum(1)
    z = np.matmul(onehot.transpose(0, 2, 1), x) / np.maximum(counts, 1)[..., None]
    return z.astype(x.dtype), counts.astype(np.int32)


def register() -> str:
    """Register the Cvig* ops with onnxruntime-extensions; returns the library path for SessionOptions."""
    global _REGISTERED
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    if not _REGISTERED:
        f, i32, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_int64

        @onnx_op(op_type="CvigKMeans", inputs=[f], outputs=[i32, i32], attrs={"clusters": i64, "iters": i64})
        def _kmeans(xn, **a):
            return kmeans_f32(xn, int(a["clusters"]), int(a["iters"]))

        @onnx_op(op_type="CvigPartitionedKNN", inputs=[f, i32], outputs=[i32, i32], attrs={"k": i64})
        def _knn(xn, labels, **a):
            return knn_f32(xn, labels, int(a["k"]))

        @onnx_op(op_type="CvigSegmentMean", inputs=[f, i32], outputs=[f, i32], attrs={"clusters": i64})
        def _segment_mean(x, labels, **a):
            return segment_mean_f32(x, labels, int(a["clusters"]))

        @onnx_op(op_type="CvigGatherMaxRel", inputs=[f, i32], outputs=[f])
        def _gather_max_rel(x, idx):
            return np.stack([x[i][idx[i]].max(axis=1) - x[i] for i in range(x.shape[0])])

        _REGISTERED = True
    return get_library_path()
