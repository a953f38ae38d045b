"""numpy reference implementations of the plugin ops (docs/design.md section 2).

Plain loops over images and partitions: slow, obvious, and independent of
the PyTorch model code, so they can judge both the model and the kernels.
Labels and indices are int32, as in the plugin graph.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


def kmeans_ref(xn: np.ndarray, k: int, iters: int) -> Tuple[np.ndarray, np.ndarray]:
    """xn [B, N, C] -> (labels [B, N] int32, counts [B, k] int32)."""
    labels, counts, _ = kmeans_centroids_ref(xn, k, iters, empty_zero=False)
    return labels, counts


def kmeans_centroids_ref(tokens: np.ndarray, k: int, iters: int,
                         empty_zero: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens [B, N, C] -> (labels, counts, centroids [B, k, C] float64 after the last update).

    ``empty_zero``: a cluster without members gets the zero vector (and competes
    with it in the next assignment); otherwise it keeps its centroid.
    """
    b, n, c = tokens.shape
    labels = np.zeros((b, n), np.int32)
    counts = np.zeros((b, k), np.int32)
    cents = np.zeros((b, k, c), np.float64)
    for i in range(b):
        x = tokens[i].astype(np.float64)
        cent = np.stack([x[(2 * j + 1) * n // (2 * k)] for j in range(k)])
        for t in range(iters + 1):
            d = (cent**2).sum(1)[None, :] - 2.0 * x @ cent.T
            lab = d.argmin(1)  # first minimum: ties to the lower cluster
            if t == iters:
                break
            for j in range(k):
                m = lab == j
                if m.any():
                    cent[j] = x[m].mean(0)
                elif empty_zero:
                    cent[j] = 0.0
        labels[i] = lab
        counts[i] = np.bincount(lab, minlength=k)
        cents[i] = cent
    return labels, counts, cents


def partitioned_knn_ref(xn: np.ndarray, labels: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """-> (idx [B, N, K] int32 self-filled, valid [B, N, K] int32)."""
    b, n, _ = xn.shape
    idx = np.tile(np.arange(n, dtype=np.int32)[None, :, None], (b, 1, k))
    valid = np.zeros((b, n, k), np.int32)
    for i in range(b):
        x = xn[i].astype(np.float64)
        for v in range(n):
            others = [u for u in np.flatnonzero(labels[i] == labels[i, v]) if u != v]
            sims = x[others] @ x[v]
            order = sorted(range(len(others)), key=lambda q: (-sims[q], others[q]))
            nb = [v] + [int(others[q]) for q in order[: k - 1]]
            idx[i, v, : len(nb)] = nb
            valid[i, v, : len(nb)] = 1
    return idx, valid


def segment_mean_ref(x: np.ndarray, labels: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """-> (z [B, k, C] with 0 for empty partitions, counts [B, k] int32)."""
    b, _, c = x.shape
    z = np.zeros((b, k, c), np.float64)
    counts = np.zeros((b, k), np.int32)
    for i in range(b):
        for j in range(k):
            m = labels[i] == j
            counts[i, j] = m.sum()
            if m.any():
                z[i, j] = x[i][m].astype(np.float64).mean(0)
    return z.astype(x.dtype), counts


def gather_max_rel_ref(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """out[b, v] = max_k x[b, idx[b, v, k]] - x[b, v]."""
    b = x.shape[0]
    return np.stack([x[i][idx[i]].max(axis=1) - x[i] for i in range(b)])
