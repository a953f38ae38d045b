"""The plugin kernels, host build (libcvig_kernels_host.so), against the numpy references.

The host library is compiled from the same sources as the CUDA kernels, so
these tests run the kernels' own code on every commit. Labels, counts,
indices and valid flags must equal the references exactly; floats within
1e-5 (FP64 references) or bit for bit where the rounding is defined.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from clustervig.plugins import kernels as K
from clustervig.plugins.reference import (gather_max_rel_ref, kmeans_centroids_ref, kmeans_ref, partitioned_knn_ref,
                                          segment_mean_ref)

from conftest import clustered_tokens

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


@pytest.fixture(scope="module")
def lib():
    lib = K.host_library()
    assert lib.backend == "host"
    return lib


def normed(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def random_tokens(b, n, c, seed, dtype=np.float32):
    return normed(np.random.default_rng(seed).standard_normal((b, n, c))).astype(dtype)


def labels_with_sizes(sizes, seed):
    lab = np.concatenate([np.full(s, j) for j, s in enumerate(sizes)]).astype(np.int32)
    np.random.default_rng(seed).shuffle(lab)
    return lab


def knn_brute(xn: np.ndarray, labels: np.ndarray, k: int):
    """Vectorised brute force (for sizes where the loop reference is slow): same contract, FP64 similarities."""
    b, n, _ = xn.shape
    x = xn.astype(np.float64)
    sim = np.einsum("bnc,bmc->bnm", x, x)
    same = labels[:, :, None] == labels[:, None, :]
    sim = np.where(same, sim, -np.inf)
    sim[:, np.arange(n), np.arange(n)] = np.inf
    order = np.argsort(-sim, axis=-1, kind="stable")[..., :k]  # stable: equal similarity -> lower index first
    valid = np.take_along_axis(same, order, -1)
    self_idx = np.broadcast_to(np.arange(n)[None, :, None], order.shape)
    return np.where(valid, order, self_idx).astype(np.int32), valid.astype(np.int32)


# ----------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------


# The case tables are shared with tests/test_kernels_simt.py, which runs them on the SIMT executor.
KMEANS_RANDOM = [
    (3, 196, 64, 4, 0), (2, 97, 33, 6, 1), (1, 37, 640, 8, 2), (2, 784, 192, 6, 3), (1, 3136, 48, 8, 4),
    (4, 50, 7, 1, 5), (2, 9, 16, 9, 6),  # one cluster; k = N
]


@pytest.mark.parametrize("b,n,c,k,seed", KMEANS_RANDOM)
def test_kmeans_random_equals_reference(lib, b, n, c, k, seed):
    x = random_tokens(b, n, c, seed)
    labels, counts = K.kmeans(x, k, 20, lib=lib)
    ref_l, ref_c = kmeans_ref(x, k, 20)
    np.testing.assert_array_equal(labels, ref_l)
    np.testing.assert_array_equal(counts, ref_c)
    assert labels.dtype == np.int32 and counts.dtype == np.int32


@pytest.mark.parametrize("seed", range(3))
def test_kmeans_clustered_tokens(lib, seed):
    x, _ = clustered_tokens([70, 50, 40, 36, 1, 3], c=24, noise=0.3, seed=seed)
    xn = normed(np.stack([x.numpy(), x.numpy()[::-1]]))
    labels, counts = K.kmeans(xn, 6, 20, lib=lib)
    ref_l, ref_c = kmeans_ref(xn, 6, 20)
    np.testing.assert_array_equal(labels, ref_l)
    np.testing.assert_array_equal(counts, ref_c)


@pytest.mark.parametrize("iters", [0, 1, 3])
def test_kmeans_iteration_count(lib, iters):
    # T updates and T + 1 assignments: iters=0 is the assignment to the initial tokens
    x = random_tokens(2, 64, 16, 7)
    np.testing.assert_array_equal(K.kmeans(x, 4, iters, lib=lib)[0], kmeans_ref(x, 4, iters)[0])
    if iters == 0:
        init = [(2 * j + 1) * 64 // 8 for j in range(4)]
        assert all(K.kmeans(x, 4, 0, lib=lib)[0][0, v] == j for j, v in enumerate(init))


def test_kmeans_identical_tokens_ties_every_step(lib):
    # every distance ties at every step: all tokens go to cluster 0, whose mean is the token itself
    # (FP64 sums), the other clusters stay empty and keep their centroid
    for c in (3, 8, 192, 640):
        x = normed(np.full((2, 97, c), 0.37))
        labels, counts = K.kmeans(x, 8, 20, lib=lib)
        assert (labels == 0).all() and counts.tolist() == [[97, 0, 0, 0, 0, 0, 0, 0]] * 2
        np.testing.assert_array_equal(labels, kmeans_ref(x, 8, 20)[0])


def test_kmeans_duplicate_groups_and_empty_clusters(lib):
    # two distinct tokens repeated; kappa = 5 leaves clusters empty after the first update
    a, b = normed([1.0, 0.0, 0.0, 0.0]), normed([0.0, 1.0, 0.0, 0.0])
    x = np.stack([a if i % 3 else b for i in range(40)])[None]
    labels, counts = K.kmeans(x, 5, 20, lib=lib)
    ref_l, ref_c = kmeans_ref(x, 5, 20)
    np.testing.assert_array_equal(labels, ref_l)
    np.testing.assert_array_equal(counts, ref_c)
    assert (counts == 0).sum() >= 1 and counts.sum() == 40


def test_kmeans_fp16_inputs(lib):
    x = random_tokens(2, 196, 192, 8, np.float16)
    labels, counts = K.kmeans(x, 4, 20, lib=lib)
    ref_l, ref_c = kmeans_ref(x.astype(np.float32), 4, 20)
    np.testing.assert_array_equal(labels, ref_l)
    np.testing.assert_array_equal(counts, ref_c)


def centred(b, n, c, seed, scale=1.0):
    """Tokens minus their mean per image and channel, not normalised (numerics="authors")."""
    x = np.random.default_rng(seed).standard_normal((b, n, c)) * scale + 0.5
    return (x - x.mean(axis=1, keepdims=True)).astype(np.float32)


def assert_centroids(x, k, iters, empty_zero, lib, atol=1e-5):
    labels, counts, cent = K.kmeans_centroids(x, k, iters, empty_zero, lib=lib)
    ref_l, ref_c, ref_z = kmeans_centroids_ref(x.astype(np.float32), k, iters, empty_zero)
    np.testing.assert_array_equal(labels, ref_l)
    np.testing.assert_array_equal(counts, ref_c)
    assert cent.dtype == x.dtype and cent.shape == (x.shape[0], k, x.shape[2])
    np.testing.assert_allclose(cent.astype(np.float64), ref_z, rtol=0, atol=atol)
    return labels, counts, cent


KMEANS_CENTROIDS = [
    (3, 196, 64, 4, 20, 0), (2, 784, 192, 6, 20, 1), (1, 37, 640, 8, 20, 2), (2, 97, 33, 6, 0, 3),
    (2, 50, 7, 1, 20, 4), (1, 50, 7, 1, 0, 5), (2, 9, 16, 9, 3, 6),  # one cluster (with and without updates); k = N
]


@pytest.mark.parametrize("b,n,c,k,iters,seed", KMEANS_CENTROIDS)
@pytest.mark.parametrize("empty_zero", [True, False])
def test_kmeans_centroids_equal_reference(lib, b, n, c, k, iters, seed, empty_zero):
    """Labels, counts and the centroids of the last update, on centred un-normalised tokens."""
    x = centred(b, n, c, seed, scale=3.0)
    labels, counts, _ = assert_centroids(x, k, iters, empty_zero, lib, atol=2e-5)
    # the labels and counts of the centroid launcher are those of the plain k-means launcher
    if not empty_zero:
        np.testing.assert_array_equal(labels, K.kmeans(x, k, iters, lib=lib)[0])


def test_kmeans_centroids_empty_cluster_rules(lib):
    # two groups of identical tokens, kappa = 5: clusters empty after the first update. With empty_zero
    # their centroid is the zero vector, which then attracts the tokens nearest to the origin;
    # keeping the centroid is the paper's rule. Both against the reference, and they differ here.
    a, b, o = np.array([3.0, 0, 0, 0]), np.array([0, 2.0, 0, 0]), np.array([0.1, 0.1, 0, 0])
    x = np.stack([(a, b, o)[i % 3] for i in range(40)]).astype(np.float32)[None]
    lz, cz, zz = assert_centroids(x, 5, 20, True, lib)
    lk, ck, zk = assert_centroids(x, 5, 20, False, lib)
    empty = cz[0] == 0
    assert empty.any() and (zz[0][empty] == 0).all()
    assert not np.array_equal(lz, lk) or not np.array_equal(zz, zk)
    # a cluster of identical tokens has exactly that token as its centroid (FP64 sums; numpy's
    # float32 mean of 13 copies of 0.1 is 0.10000002)
    for j in np.flatnonzero(~empty):
        members = x[0][lz[0] == j]
        assert (members == members[0]).all() and np.array_equal(zz[0, j], members[0])


def test_kmeans_centroids_match_the_model(lib):
    """The kernel computes numerics="authors"' k-means as the PyTorch model does (labels exact)."""
    import torch

    from clustervig.graph import kmeans_with_centroids

    x = centred(2, 196, 48, 11, scale=2.0)
    labels, _, cent = K.kmeans_centroids(x, 4, 20, True, lib=lib)
    ref_l, ref_z = kmeans_with_centroids(torch.from_numpy(x), 4, 20, empty_keeps=False)
    np.testing.assert_array_equal(labels, ref_l.numpy())
    np.testing.assert_allclose(cent, ref_z.numpy(), rtol=0, atol=1e-5)


def test_kmeans_centroids_fp16(lib):
    x = centred(2, 196, 64, 12).astype(np.float16)
    _, _, cent = assert_centroids(x, 4, 20, True, lib, atol=2e-3)  # centroids rounded once to FP16
    ref_z = kmeans_centroids_ref(x.astype(np.float32), 4, 20, True)[2]
    np.testing.assert_array_equal(cent, ref_z.astype(np.float32).astype(np.float16))


def test_kmeans_centroids_status_codes(lib):
    f = lib.lib
    x = centred(1, 16, 8, 0)
    lab, cnt, cent = np.zeros((1, 16), np.int32), np.zeros((1, 4), np.int32), np.zeros((1, 4, 8), np.float32)
    p = lambda a: a.ctypes.data  # noqa: E731
    ok = (p(x), 0, 1, 16, 8, 4, 20)
    assert f.cvig_kmeans_centroids_launch(*ok, 1, p(lab), p(cnt), p(cent), None) == 0
    assert f.cvig_kmeans_centroids_launch(*ok, 1, p(lab), p(cnt), None, None) == 1  # no centroid buffer
    assert f.cvig_kmeans_centroids_launch(*ok, 2, p(lab), p(cnt), p(cent), None) == 1  # empty_zero not a flag
    assert f.cvig_kmeans_centroids_launch(p(x), 0, 1, 16, 8, 17, 20, 1, p(lab), p(cnt), p(cent), None) == 1  # k > N
    assert f.cvig_kmeans_centroids_launch(p(x), 0, 1, 100000, 640, 8, 20, 1, p(lab), p(cnt), p(cent), None) == 2
    with pytest.raises(ValueError, match="clusters must be in 1..N"):
        K.kmeans_centroids(x, 0, 20, lib=lib)


# ----------------------------------------------------------------------------
# partitioned k-NN
# ----------------------------------------------------------------------------


KNN_SIZES = [
    ([49, 49, 49, 49], 9), ([150, 40, 5, 1], 18), ([13, 7, 1, 0], 9), ([97], 64), ([1] * 37, 9),
    ([20, 17], 1), ([3, 3, 3], 3), ([3, 3, 3], 4),
]


def knn_case(sizes, dtype):
    lab = labels_with_sizes(sizes, 1)
    return random_tokens(2, lab.size, 40, 2, dtype), np.stack([lab, lab[::-1].copy()])


@pytest.mark.parametrize("sizes,k", KNN_SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_knn_equals_reference(lib, sizes, k, dtype):
    x, labels = knn_case(sizes, dtype)
    idx, valid = K.partitioned_knn(x, labels, k, lib=lib)
    ref_i, ref_v = partitioned_knn_ref(x.astype(np.float32), labels, k)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(valid, ref_v)


def test_knn_k1_is_the_token_itself(lib):
    # regression: K = 1 compared against an uninitialised slot and replaced the token by another
    x = random_tokens(2, 97, 16, 3)
    labels = np.zeros((2, 97), np.int32)
    idx, valid = K.partitioned_knn(x, labels, 1, lib=lib)
    np.testing.assert_array_equal(idx[..., 0], np.broadcast_to(np.arange(97), (2, 97)))
    assert (valid == 1).all()


def test_knn_k_at_least_partition_size(lib):
    lab = labels_with_sizes([5, 2, 1], 4)
    x = random_tokens(1, 8, 12, 5)
    idx, valid = K.partitioned_knn(x, lab[None], 7, lib=lib)
    sizes = np.bincount(lab)
    for v in range(8):
        m = sizes[lab[v]]
        assert valid[0, v].tolist() == [1] * m + [0] * (7 - m)
        assert idx[0, v, 0] == v and (idx[0, v, m:] == v).all()
        assert sorted(idx[0, v, :m].tolist()) == np.flatnonzero(lab == lab[v]).tolist()


def test_knn_ties_go_to_lower_index(lib):
    # tokens 0, 2, 4 identical: each sees the other two at equal similarity, lower index first
    x = normed([[1.0, 0.0], [0.8, 0.6], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])[None]
    idx, _ = K.partitioned_knn(x, np.zeros((1, 5), np.int32), 3, lib=lib)
    assert idx[0, 2].tolist() == [2, 0, 4] and idx[0, 0].tolist() == [0, 2, 4] and idx[0, 4].tolist() == [4, 0, 2]
    same = normed(np.ones((1, 40, 6)))
    idx, _ = K.partitioned_knn(same, np.zeros((1, 40), np.int32), 5, lib=lib)
    for v in range(40):
        assert idx[0, v].tolist() == [v] + [u for u in range(40) if u != v][:4]


@pytest.mark.parametrize("n,c", [(3136, 32), (784, 640)])
def test_knn_large_against_brute_force(lib, n, c):
    x = random_tokens(1, n, c, 6)
    labels, _ = K.kmeans(x, 8 if n > 1000 else 6, 5, lib=lib)
    idx, valid = K.partitioned_knn(x, labels, 18, lib=lib)
    ref_i, ref_v = knn_brute(x, labels, 18)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(valid, ref_v)


# ----------------------------------------------------------------------------
# segment mean, gather-max-rel
# ----------------------------------------------------------------------------


SEGMENT_SHAPES = [(3, 257, 48, 5), (1, 3136, 64, 8), (2, 37, 640, 8)]
GATHER_SHAPES = [(3, 257, 48, 11), (1, 97, 640, 1), (2, 3136, 8, 18)]


def segment_case(b, n, c, k, dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((b, n, c)).astype(dtype)
    labels = rng.integers(0, k, (b, n)).astype(np.int32)
    labels[-1] = np.minimum(labels[-1], 2)  # last image: partitions 3.. empty
    return x, labels


def gather_case(b, n, c, k, dtype):
    rng = np.random.default_rng(3)
    return rng.standard_normal((b, n, c)).astype(dtype), rng.integers(0, n, (b, n, k)).astype(np.int32)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float16, 0)])
@pytest.mark.parametrize("b,n,c,k", SEGMENT_SHAPES)
def test_segment_mean_equals_reference(lib, dtype, tol, b, n, c, k):
    x, labels = segment_case(b, n, c, k, dtype)
    z, counts = K.segment_mean(x, labels, k, lib=lib)
    ref_z, ref_c = segment_mean_ref(x.astype(np.float64), labels, k)
    np.testing.assert_array_equal(counts, ref_c)
    assert z.dtype == dtype and (z[-1, 3:] == 0).all()
    if dtype == np.float16:  # FP64 mean rounded once to float, then to half: what numpy gives for the same path
        np.testing.assert_array_equal(z, ref_z.astype(np.float32).astype(np.float16))
    else:
        np.testing.assert_allclose(z, ref_z, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("b,n,c,k", GATHER_SHAPES)
def test_gather_max_rel_exact(lib, dtype, b, n, c, k):
    x, idx = gather_case(b, n, c, k, dtype)
    out = K.gather_max_rel(x, idx, lib=lib)
    ref = gather_max_rel_ref(x.astype(np.float32), idx).astype(dtype)  # max exact, one rounding of the difference
    np.testing.assert_array_equal(out, ref)


def test_half_conversion_every_value(lib):
    # one token per image: the mean is the token, so this round-trips every binary16 value through
    # the host build's half->float and float->half conversions
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.isfinite(h)
    x = h[finite].reshape(-1, 1, 1)
    z, _ = K.segment_mean(x, np.zeros((x.shape[0], 1), np.int32), 1, lib=lib)
    nz = x != 0  # a sum starts at +0.0, so -0.0 comes back as +0.0 (equal values)
    np.testing.assert_array_equal(z[nz].view(np.uint16), x[nz].view(np.uint16))  # subnormals kept bit for bit
    assert (z[~nz] == 0).all()


def test_half_rounding_is_nearest_even(lib):
    # the mean of two halves needs rounding: subnormal, normal, near-overflow and tie cases
    rng = np.random.default_rng(4)
    bits = rng.integers(0, 0x7c00, (20000, 2)).astype(np.uint16)
    bits[:2000] = rng.integers(0, 0x0400, (2000, 2))  # subnormals
    bits[2000:2100] = [[0x7bff, 0x7bfe]] * 100         # largest halves
    signs = rng.integers(0, 2, bits.shape).astype(np.uint16) << 15
    x = (bits | signs).view(np.float16).reshape(-1, 2, 1)
    z, _ = K.segment_mean(x, np.zeros((x.shape[0], 2), np.int32), 1, lib=lib)
    mean = (x.astype(np.float64).sum(1) / 2).astype(np.float32).astype(np.float16)
    np.testing.assert_array_equal(z[:, 0].view(np.uint16), mean.view(np.uint16))
    # ties to even in the subnormal range: mean(2^-24, 0) = 2^-25 -> 0; mean(3*2^-24, 0) = 1.5*2^-24 -> 2^-23
    ties = np.array([[[2.0**-24], [0.0]], [[3 * 2.0**-24], [0.0]], [[-(2.0**-24)], [0.0]]], np.float16)
    z, _ = K.segment_mean(ties, np.zeros((3, 2), np.int32), 1, lib=lib)
    assert z[:, 0, 0].astype(np.float64).tolist() == [0.0, 2.0**-23, 0.0]


def test_results_do_not_depend_on_thread_count(lib, monkeypatch):
    x = random_tokens(6, 196, 32, 9)
    outs = []
    for t in ("1", "4"):
        monkeypatch.setenv("CVIG_HOST_THREADS", t)
        labels, counts = K.kmeans(x, 4, 20, lib=lib)
        idx, valid = K.partitioned_knn(x, labels, 9, lib=lib)
        z, _ = K.segment_mean(x, labels, 4, lib=lib)
        outs.append((labels, counts, idx, valid, z))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------
# status codes of the C ABI
# ----------------------------------------------------------------------------


def test_status_codes(lib):
    f = lib.lib
    x = random_tokens(1, 16, 8, 0)
    lab = np.zeros((1, 16), np.int32)
    o1, o2 = np.zeros((1, 16, 64), np.int32), np.zeros((1, 16, 64), np.int32)
    p = lambda a: a.ctypes.data  # noqa: E731
    # k-means: null pointers, k > N, k <= 0, bad sizes, unknown dtype, negative iterations
    assert f.cvig_kmeans_launch(None, 0, 1, 16, 8, 4, 20, p(o1), p(o2), None) == 1
    assert f.cvig_kmeans_launch(p(x), 0, 1, 16, 8, 4, 20, None, p(o2), None) == 1
    assert f.cvig_kmeans_launch(p(x), 0, 1, 16, 8, 17, 20, p(o1), p(o2), None) == 1
    assert f.cvig_kmeans_launch(p(x), 0, 1, 16, 8, 0, 20, p(o1), p(o2), None) == 1
    assert f.cvig_kmeans_launch(p(x), 0, 0, 16, 8, 4, 20, p(o1), p(o2), None) == 1
    assert f.cvig_kmeans_launch(p(x), 7, 1, 16, 8, 4, 20, p(o1), p(o2), None) == 1
    assert f.cvig_kmeans_launch(p(x), 0, 1, 16, 8, 4, -1, p(o1), p(o2), None) == 1
    assert f.cvig_kmeans_launch(p(x), 0, 1, 16, 8, 4, 20, p(o1), p(o2), None) == 0
    # k-means working set above the shared-memory limit (checked before touching the data)
    n, c, k = 100000, 640, 8
    assert lib.kmeans_smem_bytes(n, c, k) > K.HOST_SMEM_LIMIT
    assert f.cvig_kmeans_launch(p(x), 0, 1, n, c, k, 20, p(o1), p(o2), None) == 2
    assert lib.kmeans_smem_bytes(784, 640, 6) == (6 * 640 + 6) * 4 + (2 * 6 + 2 * 784) * 4  # B-dagger: 21.7 KB
    # k-NN: null pointers, K > 64 (unsupported size), K <= 0, unknown dtype
    assert f.cvig_partitioned_knn_launch(p(x), None, 0, 1, 16, 8, 9, p(o1), p(o2), None) == 1
    assert f.cvig_partitioned_knn_launch(p(x), p(lab), 0, 1, 16, 8, 65, p(o1), p(o2), None) == 2
    assert f.cvig_partitioned_knn_launch(p(x), p(lab), 0, 1, 16, 8, 0, p(o1), p(o2), None) == 1
    assert f.cvig_partitioned_knn_launch(p(x), p(lab), 2, 1, 16, 8, 9, p(o1), p(o2), None) == 1
    assert f.cvig_partitioned_knn_launch(p(x), p(lab), 0, 1, 16, 8, 64, p(o1), p(o2), None) == 0
    # segment ops
    z = np.zeros((1, 4, 8), np.float32)
    assert f.cvig_segment_mean_launch(p(x), p(lab), 0, 1, 16, 8, 0, p(z), p(o1), None) == 1
    assert f.cvig_segment_mean_launch(p(x), p(lab), -1, 1, 16, 8, 4, p(z), p(o1), None) == 1
    assert f.cvig_segment_mean_launch(None, p(lab), 0, 1, 16, 8, 4, p(z), p(o1), None) == 1
    assert f.cvig_gather_max_rel_launch(p(x), None, 0, 1, 16, 8, 1, p(x.copy()), None) == 1
    assert f.cvig_gather_max_rel_launch(p(x), p(lab), 0, 1, 16, 8, 0, p(x.copy()), None) == 1


def test_python_front_end_errors(lib):
    x = random_tokens(1, 16, 8, 0)
    with pytest.raises(ValueError, match="clusters must be in 1..N = 16"):
        K.kmeans(x, 17, 20, lib=lib)
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        K.kmeans(x[0], 4, 20, lib=lib)
    with pytest.raises(TypeError, match="float32 or float16"):
        K.kmeans(x.astype(np.float64), 4, 20, lib=lib)
    with pytest.raises(ValueError, match="K must be in 1..64"):
        K.partitioned_knn(x, np.zeros((1, 16), np.int32), 65, lib=lib)
    with pytest.raises(ValueError, match=r"labels must have shape \[1, 16\]"):
        K.partitioned_knn(x, np.zeros((1, 15), np.int32), 9, lib=lib)
    with pytest.raises(ValueError, match="outside 0..15"):
        K.gather_max_rel(x, np.full((1, 16, 3), 16, np.int32), lib=lib)
    with pytest.raises(K.KernelLibraryError, match="unsupported size"):
        K.kmeans(np.zeros((1, 60000, 1024), np.float32), 8, 1, lib=lib)


def test_wrong_library_is_named(tmp_path, lib):
    with pytest.raises(K.KernelLibraryError, match="does not exist"):
        K.find_host_library(str(tmp_path / "missing.so"))
    bad = tmp_path / "libnot.so"
    bad.write_bytes(b"\x7fELF garbage")
    with pytest.raises(K.KernelLibraryError, match="cannot load"):
        K.KernelLibrary(bad, "host")
    with pytest.raises(K.KernelLibraryError, match="holds the 'host' kernels, expected 'cuda'"):
        K.KernelLibrary(lib.path, "cuda")


# ----------------------------------------------------------------------------
# the CMake build: host library without nvcc, identical to the Python-built one
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cmake_host_build(tmp_path_factory):
    assert shutil.which("cmake") and shutil.which("c++"), "cmake and a C++ compiler are required (CI installs them)"
    # a PATH without nvcc: the configure must find no CUDA compiler and still build the host library
    tools = tmp_path_factory.mktemp("tools")
    for t in ("cmake", "c++", "g++", "gcc", "cc", "make", "gmake", "ld", "as", "ar", "ranlib", "nm", "strip"):
        if shutil.which(t):
            (tools / t).symlink_to(shutil.which(t))
    env = {"HOME": os.environ.get("HOME", "/tmp"), "PATH": str(tools)}
    build = tmp_path_factory.mktemp("host-build")
    cfg = subprocess.run(["cmake", "-S", str(PLUGINS), "-B", str(build)], capture_output=True, text=True, env=env)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    b = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, env=env)
    assert b.returncode == 0, b.stdout + b.stderr
    return build, cfg.stdout


def test_cmake_builds_host_library_without_nvcc(cmake_host_build):
    build, log = cmake_host_build
    assert "no CUDA compiler found: building the host kernel library only" in log
    lib = build / "libcvig_kernels_host.so"
    assert lib.is_file() and not (build / "libcvig_kernels.so").exists()
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    assert "NEEDED" in needed and "cuda" not in needed.lower()  # no CUDA runtime linked
    syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    for s in ("cvig_kmeans_launch", "cvig_kmeans_centroids_launch", "cvig_kmeans_smem_bytes", "cvig_partitioned_knn_launch",
              "cvig_segment_mean_launch", "cvig_gather_max_rel_launch", "cvig_kernels_backend"):
        assert f" T {s}" in syms, s


def test_cmake_and_python_builds_agree_bit_for_bit(cmake_host_build, lib):
    other = K.KernelLibrary(cmake_host_build[0] / "libcvig_kernels_host.so", "host")
    x = random_tokens(2, 196, 96, 11)
    a = K.kmeans(x, 4, 20, lib=lib), K.kmeans(x, 4, 20, lib=other)
    np.testing.assert_array_equal(a[0][0], a[1][0])
    labels = a[0][0]
    for fa, fb in [(K.partitioned_knn(x, labels, 12, lib=lib), K.partitioned_knn(x, labels, 12, lib=other)),
                   (K.segment_mean(x, labels, 4, lib=lib), K.segment_mean(x, labels, 4, lib=other))]:
        for u, v in zip(fa, fb):
            np.testing.assert_array_equal(u, v)


def test_library_built_per_source_digest(tmp_path, monkeypatch):
    # a rebuilt library is named after the digest of its sources: a changed source cannot load a stale build
    monkeypatch.setenv(K.ENV_CACHE, str(tmp_path))
    monkeypatch.delenv(K.ENV_HOST, raising=False)
    monkeypatch.setattr(K, "PACKAGED_HOST", tmp_path / "none.so")  # an installed wheel's prebuilt one aside
    path = K.find_host_library()
    assert path.parent == tmp_path and path.name == f"libcvig_kernels_host-{K.source_digest()}.so"
    assert K.KernelLibrary(path, "host").backend == "host"
    assert K.find_host_library() == path  # cached: no second build
    assert not list(tmp_path.glob("tmp*"))  # no partial files left behind
