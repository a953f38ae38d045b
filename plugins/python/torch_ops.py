"""PyTorch custom ops over the plugin kernels: ``torch.ops.cvig.{kmeans, kmeans_centroids, partitioned_knn,
segment_mean, gather_max_rel}``.

CPU tensors run on ``libcvig_kernels_host.so``, CUDA tensors on
``libcvig_kernels.so`` (current stream, no synchronisation), so a model on
either device runs exactly the code the TensorRT plugins run. Shapes are
registered for meta tensors (``torch.compile``, CUDA graphs capture the
launches like any other kernel). Inference only: the ops have no autograd
formula, and backward through them raises. Labels and indices are int32.

Used by the static form when asked: ``create_model(..., kernels=True)`` or
``model.set_kernels(True)`` (docs/design.md, "Kernels").
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .kernels import Kernels

_KERNELS = Kernels()


@torch.library.custom_op("cvig::kmeans", mutates_args=())
def kmeans(xn: Tensor, clusters: int, iters: int) -> Tuple[Tensor, Tensor]:
    """k-means of normalised tokens ``[B, N, C]`` -> labels ``[B, N]``, counts ``[B, clusters]`` (int32)."""
    return _KERNELS.kmeans(xn, clusters, iters)


@kmeans.register_fake
def _(xn, clusters, iters):
    b, n, _ = xn.shape
    return xn.new_empty(b, n, dtype=torch.int32), xn.new_empty(b, clusters, dtype=torch.int32)


@torch.library.custom_op("cvig::kmeans_centroids", mutates_args=())
def kmeans_centroids(x: Tensor, clusters: int, iters: int, empty_zero: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """k-means of tokens ``[B, N, C]`` with the centroids of the last update ``[B, clusters, C]`` (x's dtype);
    labels and counts int32. ``empty_zero``: an empty cluster's centroid becomes 0 (``numerics="authors"``)."""
    return _KERNELS.kmeans_centroids(x, clusters, iters, empty_zero)


@kmeans_centroids.register_fake
def _(x, clusters, iters, empty_zero):
    b, n, c = x.shape
    return (x.new_empty(b, n, dtype=torch.int32), x.new_empty(b, clusters, dtype=torch.int32),
            x.new_empty(b, clusters, c))


@torch.library.custom_op("cvig::partitioned_knn", mutates_args=())
def partitioned_knn(xn: Tensor, labels: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Partitioned k-NN -> idx, valid ``[B, N, k]`` (int32; self first, missing slots self with valid 0)."""
    return _KERNELS.partitioned_knn(xn, labels, k)


@partitioned_knn.register_fake
def _(xn, labels, k):
    b, n, _ = xn.shape
    return xn.new_empty(b, n, k, dtype=torch.int32), xn.new_empty(b, n, k, dtype=torch.int32)


@torch.library.custom_op("cvig::segment_mean", mutates_args=())
def segment_mean(x: Tensor, labels: Tensor, clusters: int) -> Tuple[Tensor, Tensor]:
    """Per-partition mean ``[B, clusters, C]`` (0 for an empty partition) and counts ``[B, clusters]`` (int32)."""
    return _KERNELS.segment_mean(x, labels, clusters)


@segment_mean.register_fake
def _(x, labels, clusters):
    b, _, c = x.shape
    return x.new_empty(b, clusters, c), x.new_empty(b, clusters, dtype=torch.int32)


@torch.library.custom_op("cvig::gather_max_rel", mutates_args=())
def gather_max_rel(x: Tensor, idx: Tensor) -> Tensor:
    """``max_k x[idx[b, v, k]] - x[b, v]`` without a ``[B, N, K, C]`` tensor."""
    return _KERNELS.gather_max_rel(x, idx)


@gather_max_rel.register_fake
def _(x, idx):
    return torch.empty_like(x)


__all__ = ["kmeans", "kmeans_centroids", "partitioned_knn", "segment_mean", "gather_max_rel"]
