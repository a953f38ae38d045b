"""The CUDA kernels on a GPU (marked gpu; skipped, with the reason, where there is none).

What is checked:

* bit identity: every output of ``libcvig_kernels.so`` equals the host build's
  (``libcvig_kernels_host.so``) on the same tensor, FP32 and FP16 inputs, on
  random and adversarial cases (K = 1, K >= partition size, one-token
  partitions, identical tokens, empty clusters, kappa up to 8, N from 37 to
  3136, C up to 640, batches on both sides of the k-means block-width switch
  at B = SM count). The host build is what the CPU test suite checks in
  depth, so identity here carries those checks over to the GPU;
* the numpy references (``clustervig.plugins.reference``), written
  independently of both builds: labels, indices and valid flags exactly,
  floats within 1e-5, on inputs whose decisions cannot depend on float
  rounding (a data property asserted before the comparison);
* the status codes of the C ABI;
* the whole model: ``cvig_ti`` with ``kernels=True`` on CUDA against the pure
  static form on CUDA and against the kernel path on the CPU, and CUDA-graph
  capture of the kernel path.
"""
from __future__ import annotations

import copy
import ctypes
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pytest
import torch

from clustervig.graph import kmeans_init_indices, l2_normalize
from clustervig.plugins.kernels import (
    FP16,
    FP32,
    MAX_K,
    KernelLibrary,
    KernelLibraryError,
    Kernels,
    cuda_library,
    find_library,
    host_library,
)
from clustervig.plugins.reference import gather_max_rel_ref, kmeans_ref, partitioned_knn_ref, segment_mean_ref


def _skip_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    try:
        find_library()
    except KernelLibraryError as exc:
        return f"CUDA kernel library not found: {exc}"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

DTYPES = [torch.float32, torch.float16]
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16}


@dataclass
class Device:
    """Where the tests run: the CUDA device, both libraries, the SM count."""

    dev: torch.device
    kern: Kernels  # CPU tensors -> host library, CUDA tensors -> CUDA library
    lib: KernelLibrary  # the CUDA library's raw C ABI (status codes)
    host: KernelLibrary
    sms: int
    sync: Callable[[], None]


@pytest.fixture(scope="module")
def gpu() -> Device:
    # Found (the skip above) but failing to load or to run is a failure, not a skip:
    # on a GPU machine that is exactly what this file exists to catch.
    lib = cuda_library()
    host = host_library()
    props = torch.cuda.get_device_properties(0)
    return Device(torch.device("cuda"), Kernels(), lib, host, props.multi_processor_count, torch.cuda.synchronize)


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------


def normal_tokens(b: int, n: int, c: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Normalised Gaussian tokens (normalised in FP32, then cast: FP16 tokens are then only nearly unit)."""
    g = torch.Generator().manual_seed(seed)
    return l2_normalize(torch.randn(b, n, c, generator=g)).to(dtype)


def dyadic_tokens(b: int, n: int, c: int, seed: int, dtype=torch.float32, levels: int = 8) -> torch.Tensor:
    """Tokens whose entries are multiples of 1/8 in [-1, 1].

    Every product is a multiple of 1/64 and every partial sum stays below
    2^24 / 64 for C <= 640, so dot products and squared norms are exact in
    FP32 (any summation order), in FP16 storage and in the references' FP64:
    all backends see the same numbers, ties included, and must resolve the
    ties by the same rule.
    """
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(-levels, levels + 1, (b, n, c), generator=g)
    return (m.float() / 8).to(dtype)


def planted_tokens(b: int, n: int, c: int, k: int, seed: int, dtype=torch.float32, noise: float = 0.05) -> torch.Tensor:
    """k well-separated groups of noisy copies of a direction each, interleaved in token order.

    A member of group j sits at k-means' j-th initial index, so Lloyd starts
    with one centroid per group and every assignment has a wide margin.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((b, n, c), np.float32)
    init = kmeans_init_indices(n, k)
    for i in range(b):
        dirs = rng.standard_normal((k, c))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        group = rng.integers(0, k, n)
        group[init] = np.arange(k)
        out[i] = dirs[group] + noise * rng.standard_normal((n, c))
    return l2_normalize(torch.from_numpy(out)).to(dtype)


def grouped_labels(b: int, sizes, seed: int) -> torch.Tensor:
    """[B, N] int32 labels with partitions of the given sizes (label j: sizes[j] tokens), shuffled per image."""
    rng = np.random.default_rng(seed)
    base = np.concatenate([np.full(s, j) for j, s in enumerate(sizes)]).astype(np.int32)
    return torch.from_numpy(np.stack([rng.permutation(base) for _ in range(b)]))


def kmeans_margin(x: np.ndarray, k: int, iters: int) -> float:
    """Smallest gap, over tokens and all T + 1 assignments, between the best and second-best
    centroid distance of FP64 Lloyd k-means (the reference's trajectory).

    FP32 arithmetic moves a distance by ~1e-6 here; a gap far above that
    means no backend can decide differently, so exact equality is a fair test.
    """
    if k == 1:
        return np.inf
    gap = np.inf
    for img in x.astype(np.float64):
        cent = img[kmeans_init_indices(img.shape[0], k)].copy()
        for t in range(iters + 1):
            d = (cent**2).sum(1)[None, :] - 2.0 * img @ cent.T
            part = np.sort(d, axis=1)
            gap = min(gap, float((part[:, 1] - part[:, 0]).min()))
            lab = d.argmin(1)
            if t == iters:
                break
            for j in range(k):
                if (lab == j).any():
                    cent[j] = img[lab == j].mean(0)
    return gap


# ----------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------


def assert_identical(host: torch.Tensor, cuda: torch.Tensor, what: str) -> None:
    """Same dtype, shape and bits (floats: also no -0.0 vs 0.0 and no differing NaN payloads)."""
    cuda = cuda.cpu()
    assert host.dtype == cuda.dtype and host.shape == cuda.shape, (what, host.dtype, cuda.dtype, host.shape, cuda.shape)
    a, b = (host.view(_BITS[host.dtype]), cuda.view(_BITS[host.dtype])) if host.is_floating_point() else (host, cuda)
    if not torch.equal(a, b):
        diff = (a != b).nonzero()
        first = tuple(diff[0].tolist())
        raise AssertionError(f"{what}: {diff.shape[0]} of {a.numel()} elements differ between the host and CUDA "
                             f"builds; first at {first}: host {host[first].item()!r}, cuda {cuda[first].item()!r}")


def on_both(g: Device, op: str, tensors, *args, names=None):
    """Run ``Kernels.<op>`` on CPU copies (host build) and CUDA copies (CUDA build); assert identical outputs.

    Returns the host outputs (CPU tensors, a tuple even for one output).
    """
    fn = getattr(g.kern, op)
    host = fn(*(t.cpu() for t in tensors), *args)
    cuda = fn(*(t.to(g.dev) for t in tensors), *args)
    g.sync()
    host = host if isinstance(host, tuple) else (host,)
    cuda = cuda if isinstance(cuda, tuple) else (cuda,)
    names = names or [f"output {i}" for i in range(len(host))]
    for name, h, c in zip(names, host, cuda):
        assert_identical(h, c, f"{op} {name}")
    return host


def kmeans_both(g, x, k, iters=20):
    return on_both(g, "kmeans", [x], k, iters, names=["labels", "counts"])


def knn_both(g, x, labels, k):
    return on_both(g, "partitioned_knn", [x, labels], k, names=["idx", "valid"])


def check_counts(labels: torch.Tensor, counts: torch.Tensor, k: int) -> None:
    want = np.stack([np.bincount(row, minlength=k) for row in labels.numpy()])
    np.testing.assert_array_equal(counts.numpy(), want)


def check_knn_structure(x: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, k: int) -> None:
    """Contract of the k-NN output, independent of the similarities: self first, min(K, |partition|)
    valid slots, every valid neighbour distinct and in the token's partition, missing slots self/0."""
    b, n = labels.shape
    lab, ix, va = labels.numpy(), idx.numpy(), valid.numpy()
    for i in range(b):
        size = np.bincount(lab[i] - lab[i].min())[lab[i] - lab[i].min()]  # partition size of each token
        assert (ix[i, :, 0] == np.arange(n)).all() and (va[i, :, 0] == 1).all()
        np.testing.assert_array_equal(va[i].sum(1), np.minimum(k, size))
        for v in range(n):
            nv = int(va[i, v].sum())
            assert (va[i, v, :nv] == 1).all() and (va[i, v, nv:] == 0).all() and (ix[i, v, nv:] == v).all()
            nb = ix[i, v, :nv]
            assert len(set(nb.tolist())) == nv and (lab[i, nb] == lab[i, v]).all()


# ----------------------------------------------------------------------------
# Bit identity: k-means
# ----------------------------------------------------------------------------

# (B, N, C, k, iters): the model's shapes (cvig_ti/s 196 x 192/320, cvig_b_hr 784 x 640 kappa 6,
# a 56 x 56 grid), sizes off every block/warp multiple, kappa up to 8, T = 0
KMEANS_SHAPES = [
    (3, 37, 24, 3, 20),
    (2, 97, 33, 6, 20),
    (4, 196, 192, 4, 20),
    (2, 196, 320, 8, 20),
    (1, 784, 640, 6, 20),
    (1, 3136, 96, 8, 20),
    (2, 97, 65, 5, 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", KMEANS_SHAPES, ids=lambda s: "B{}-N{}-C{}-k{}-T{}".format(*s))
def test_kmeans_identical_random(gpu, dtype, shape):
    b, n, c, k, iters = shape
    labels, counts = kmeans_both(gpu, normal_tokens(b, n, c, seed=n + c, dtype=dtype), k, iters)
    check_counts(labels, counts, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kmeans_identical_adversarial(gpu, dtype):
    # one cluster (the ViG baseline's kappa = 1): everything in it
    labels, counts = kmeans_both(gpu, normal_tokens(2, 97, 40, 1, dtype), 1)
    assert (labels == 0).all() and (counts == 97).all()
    # every token its own cluster (k = N): the initial indices are 0..N-1
    labels, counts = kmeans_both(gpu, normal_tokens(2, 37, 16, 2, dtype), 37)
    assert (labels == torch.arange(37)).all() and (counts == 1).all()
    # all tokens identical: every distance ties, the lowest cluster wins, the others stay empty
    same = l2_normalize(torch.ones(3, 196, 64)).to(dtype)
    labels, counts = kmeans_both(gpu, same, 8)
    assert (labels == 0).all() and counts[:, 0].eq(196).all() and counts[:, 1:].eq(0).all()
    # two distinct tokens only, repeated: most initial centroids coincide, clusters empty out
    two = normal_tokens(2, 2, 32, 3, dtype).repeat_interleave(49, dim=1)  # [2, 98, 32]
    labels, counts = kmeans_both(gpu, two, 6)
    check_counts(labels, counts, 6)
    assert ((counts > 0).sum(1) == 2).all()
    # exact ties between distinct centroids (dyadic entries: distances are exact)
    labels, counts = kmeans_both(gpu, dyadic_tokens(2, 97, 8, 4, dtype, levels=1), 7)
    check_counts(labels, counts, 7)
    # not normalised and large: the kernels do not rely on unit norms
    big = (torch.randn(2, 196, 48, generator=torch.Generator().manual_seed(5)) * 30).to(dtype)
    labels, counts = kmeans_both(gpu, big, 4)
    check_counts(labels, counts, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("empty_zero", [True, False])
def test_kmeans_centroids_identical(gpu, dtype, empty_zero):
    """numerics="authors"' k-means (centred, un-normalised tokens; centroids out; empty clusters 0 or kept):
    labels, counts and centroid bits equal the host build's, on both sides of the block-width switch."""
    def centred(b, n, c, seed, scale):
        x = torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed)) * scale + 0.5
        return (x - x.mean(1, keepdim=True)).to(dtype)

    big, _ = _sm_batches(gpu.sms)
    for b, n, c, k, iters, seed in [(3, 196, 192, 4, 20, 0), (1, 784, 640, 6, 20, 1), (2, 97, 33, 6, 0, 2),
                                    (2, 50, 16, 1, 20, 3), (big, 64, 48, 4, 20, 4)]:
        labels, counts, _ = on_both(gpu, "kmeans_centroids", [centred(b, n, c, seed, 3.0)], k, iters, empty_zero,
                                    names=["labels", "counts", "centroids"])
        check_counts(labels, counts, k)
    # clusters that empty out: two distinct tokens and one near the origin, repeated
    rows = torch.tensor([[3.0, 0, 0, 0], [0, 2.0, 0, 0], [0.1, 0.1, 0, 0]])
    x = rows[torch.arange(40) % 3].unsqueeze(0).repeat(2, 1, 1).to(dtype)
    labels, counts, cent = on_both(gpu, "kmeans_centroids", [x], 5, 20, empty_zero,
                                   names=["labels", "counts", "centroids"])
    assert (counts == 0).any()
    if empty_zero:
        assert (cent[counts == 0] == 0).all()


def _sm_batches(sms: int):
    # The k-means launch uses 1024-thread blocks below B = SM count and 256-thread
    # blocks from B = SM count on: images on both sides and at the edge.
    big = max(200, sms + 8)
    return big, sorted({1, 2, sms - 1, sms, sms + 1, big})


@pytest.mark.parametrize("dtype", DTYPES)
def test_kmeans_block_width_switch(gpu, dtype):
    """An image's labels do not depend on the batch it came in, on either side of B = SM count."""
    big, batches = _sm_batches(gpu.sms)
    x = normal_tokens(big, 64, 48, 6, dtype)
    full_l, full_c = kmeans_both(gpu, x, 4)  # B >= SM count on the GPU
    check_counts(full_l, full_c, 4)
    xd = x.to(gpu.dev)
    for b in batches:
        for lo in sorted({0, big - b}):
            lab, cnt = gpu.kern.kmeans(xd[lo:lo + b], 4, 20)
            gpu.sync()
            assert_identical(full_l[lo:lo + b], lab, f"k-means labels, B = {b} at {lo} vs B = {big}")
            assert_identical(full_c[lo:lo + b], cnt, f"k-means counts, B = {b} at {lo} vs B = {big}")
    # and the wide-block side against the host build directly
    kmeans_both(gpu, x[: gpu.sms - 1], 4)
    kmeans_both(gpu, x[:1], 4)


# ----------------------------------------------------------------------------
# Bit identity: partitioned k-NN
# ----------------------------------------------------------------------------

# (B, N, C, kappa, K): labels from the k-means kernel on the same tokens, as in DEGC
KNN_SHAPES = [
    (3, 37, 24, 3, 9),
    (2, 97, 33, 6, 18),
    (4, 196, 192, 4, 9),
    (2, 196, 320, 8, 18),
    (1, 784, 640, 6, 16),
    (1, 3136, 96, 8, 9),
    (2, 97, 40, 2, MAX_K),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", KNN_SHAPES, ids=lambda s: "B{}-N{}-C{}-kappa{}-K{}".format(*s))
def test_knn_identical_random(gpu, dtype, shape):
    b, n, c, kappa, k = shape
    x = normal_tokens(b, n, c, seed=3 * n + c, dtype=dtype)
    labels, _ = kmeans_both(gpu, x, kappa)
    idx, valid = knn_both(gpu, x, labels, k)
    if n <= 196:  # the structural check loops in Python
        check_knn_structure(x, labels, idx, valid, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_knn_identical_adversarial(gpu, dtype):
    x = normal_tokens(2, 97, 40, 7, dtype)
    # K = 1: self only
    idx, valid = knn_both(gpu, x, grouped_labels(2, [50, 47], 0), 1)
    assert (idx[..., 0] == torch.arange(97)).all() and (valid == 1).all()
    # K >= every partition's size, and one-token partitions (K = 9 > sizes 1..8)
    sizes = [1, 1, 2, 3, 5, 8, 1, 76]
    for k in (9, 18, MAX_K):
        lab = grouped_labels(2, sizes, k)
        idx, valid = knn_both(gpu, x, lab, k)
        check_knn_structure(x, lab, idx, valid, k)
    # every token its own partition
    lab = torch.arange(97, dtype=torch.int32).repeat(2, 1)
    idx, valid = knn_both(gpu, x, lab, 9)
    assert (idx == torch.arange(97)[None, :, None]).all() and valid[..., 0].eq(1).all() and valid[..., 1:].eq(0).all()
    # one partition (kappa = 1) and labels that are not 0..k-1 (any int32 names a partition)
    lab = torch.full((2, 97), -5, dtype=torch.int32)
    lab[:, ::3] = 1 << 20
    knn_both(gpu, x, lab, 18)
    # all tokens identical: every similarity ties, the lowest indices win after self
    same = l2_normalize(torch.ones(2, 97, 40)).to(dtype)
    idx, valid = knn_both(gpu, same, grouped_labels(2, [97], 1), 9)
    for v in (0, 5, 96):
        want = [v] + [u for u in range(97) if u != v][:8]
        assert idx[0, v].tolist() == want and idx[1, v].tolist() == want
    # exact ties among distinct tokens (dyadic: similarities are exact)
    xd = dyadic_tokens(2, 196, 6, 8, dtype, levels=1)
    knn_both(gpu, xd, grouped_labels(2, [100, 60, 36], 2), 18)


# ----------------------------------------------------------------------------
# Bit identity: segment mean and gather-max-rel
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37, 24, 3), (2, 97, 33, 6), (4, 196, 192, 4), (1, 784, 640, 6), (1, 3136, 96, 8)],
                         ids=lambda s: "B{}-N{}-C{}-k{}".format(*s))
def test_segment_mean_identical(gpu, dtype, shape):
    b, n, c, k = shape
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(b, n, c, generator=g).to(dtype)
    labels = torch.randint(0, k, (b, n), generator=g, dtype=torch.int32)
    labels[-1] = labels[-1].clamp(max=max(0, k - 3))  # empty partitions in the last image
    z, counts = on_both(gpu, "segment_mean", [x, labels], k, names=["z", "counts"])
    check_counts(labels, counts, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_mean_identical_adversarial(gpu, dtype):
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(2, 97, 40, generator=g) * 100).to(dtype)
    # one partition; every token its own partition (z = x); labels outside 0..k-1 belong to none
    on_both(gpu, "segment_mean", [x, torch.zeros(2, 97, dtype=torch.int32)], 1)
    z, counts = on_both(gpu, "segment_mean", [x, torch.arange(97, dtype=torch.int32).repeat(2, 1)], 97)
    assert torch.equal(z, x) and (counts == 1).all()
    lab = torch.randint(-2, 6, (2, 97), generator=g, dtype=torch.int32)
    z, counts = on_both(gpu, "segment_mean", [x, lab], 4)
    np.testing.assert_array_equal(counts.numpy(), np.stack([[(row == j).sum() for j in range(4)] for row in lab.numpy()]))
    # a mean of identical tokens is exactly that token (FP64 sums)
    same = x[:, :1].expand(2, 97, 40).contiguous()
    z, _ = on_both(gpu, "segment_mean", [same, grouped_labels(2, [90, 7], 3)], 3)
    assert torch.equal(z[:, 0], same[:, 0]) and torch.equal(z[:, 1], same[:, 0]) and (z[:, 2] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37, 24, 1), (2, 97, 33, 9), (4, 196, 192, 18), (1, 784, 640, 16),
                                   (1, 3136, 96, 9), (2, 97, 40, MAX_K)],
                         ids=lambda s: "B{}-N{}-C{}-K{}".format(*s))
def test_gather_max_rel_identical(gpu, dtype, shape):
    b, n, c, k = shape
    g = torch.Generator().manual_seed(n * k)
    x = torch.randn(b, n, c, generator=g).to(dtype)
    idx = torch.randint(0, n, (b, n, k), generator=g, dtype=torch.int32)
    idx[..., 0] = torch.arange(n, dtype=torch.int32)  # self first, as the k-NN gives
    (out,) = on_both(gpu, "gather_max_rel", [x, idx])
    assert (out >= 0).all()  # self is among the neighbours: max_u x_u - x_v >= 0
    # repeated indices and all-self rows (missing neighbours) give exactly 0
    (out,) = on_both(gpu, "gather_max_rel", [x, torch.arange(n, dtype=torch.int32).view(1, n, 1).expand(b, n, k)])
    assert (out == 0).all()


# ----------------------------------------------------------------------------
# Against the numpy references
# ----------------------------------------------------------------------------


def _cuda(g: Device, op: str, *args):
    out = getattr(g.kern, op)(*(a.to(g.dev) if isinstance(a, torch.Tensor) else a for a in args))
    g.sync()
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 37, 24, 3), (2, 97, 64, 6), (2, 196, 192, 4), (1, 784, 640, 6),
                                   (1, 3136, 96, 8), (1, 196, 320, 1)],
                         ids=lambda s: "B{}-N{}-C{}-k{}".format(*s))
def test_kmeans_equals_reference(gpu, dtype, shape):
    b, n, c, k = shape
    x = planted_tokens(b, n, c, k, seed=n, dtype=dtype)
    xf = x.float().numpy()  # the exact values the kernels read (FP16 widened exactly)
    margin = kmeans_margin(xf, k, 20)
    assert margin > 1e-3, f"test data: k-means decisions within {margin} of a tie"
    labels, counts = _cuda(gpu, "kmeans", x, k, 20)
    ref_l, ref_c = kmeans_ref(xf, k, 20)
    np.testing.assert_array_equal(labels.numpy(), ref_l)
    np.testing.assert_array_equal(counts.numpy(), ref_c)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kmeans_ties_equal_reference(gpu, dtype):
    # dyadic entries, T = 0: one assignment to the initial tokens, every distance exact in
    # FP32 and FP64, many exact ties: the lower cluster must win in both
    for n, c, k in ((37, 6, 3), (97, 4, 8), (196, 3, 6)):
        x = dyadic_tokens(2, n, c, n, dtype, levels=1)
        labels, counts = _cuda(gpu, "kmeans", x, k, 0)
        ref_l, ref_c = kmeans_ref(x.float().numpy(), k, 0)
        np.testing.assert_array_equal(labels.numpy(), ref_l)
        np.testing.assert_array_equal(counts.numpy(), ref_c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(2, 37, 24, [20, 10, 6, 1], 9), (2, 97, 40, [60, 30, 5, 1, 1], 18),
                                  (2, 196, 192, [49] * 4, 9), (1, 784, 640, [200, 150, 150, 120, 100, 64], 16),
                                  (1, 97, 16, [97], MAX_K), (1, 97, 16, [40, 57], 1)],
                         ids=lambda s: "B{}-N{}-C{}-K{}".format(s[0], s[1], s[2], s[4]))
def test_knn_equals_reference(gpu, dtype, case):
    # dyadic tokens: similarities exact in every backend; entries in {-1/8, 0, 1/8} make exact ties common
    b, n, c, sizes, k = case
    labels = grouped_labels(b, sizes, n)
    for levels in (8, 1):
        x = dyadic_tokens(b, n, c, n + c, dtype, levels=levels)
        idx, valid = _cuda(gpu, "partitioned_knn", x, labels, k)
        ref_i, ref_v = partitioned_knn_ref(x.float().numpy(), labels.numpy(), k)
        np.testing.assert_array_equal(valid.numpy(), ref_v)
        np.testing.assert_array_equal(idx.numpy(), ref_i, err_msg=f"entries in +-{levels}/8")


def _float_tol(dtype, ref: np.ndarray) -> np.ndarray:
    # FP32: 1e-5. FP16: the reference rounds its FP64 mean to FP16 once, the kernel
    # through FP32: one FP16 unit in the last place apart at most.
    return 1e-5 if dtype == torch.float32 else 1e-5 + np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37, 24, 3), (2, 196, 192, 4), (1, 784, 640, 6), (1, 3136, 96, 8)],
                         ids=lambda s: "B{}-N{}-C{}-k{}".format(*s))
def test_segment_ops_equal_reference(gpu, dtype, shape):
    b, n, c, k = shape
    g = torch.Generator().manual_seed(11 + n)
    x = torch.randn(b, n, c, generator=g).to(dtype)
    labels = torch.randint(0, k, (b, n), generator=g, dtype=torch.int32)
    labels[0, : n // 2] = 0  # uneven partitions
    if k > 1:
        labels[-1] = labels[-1].clamp(max=k - 2)  # an empty partition
    z, counts = _cuda(gpu, "segment_mean", x, labels, k)
    xnp = x.numpy()
    rz, rc = segment_mean_ref(xnp, labels.numpy(), k)
    np.testing.assert_array_equal(counts.numpy(), rc)
    err = np.abs(z.numpy().astype(np.float64) - rz.astype(np.float64))
    assert (err <= _float_tol(dtype, rz)).all(), float(err.max())
    kk = 18
    idx = torch.randint(0, n, (b, n, kk), generator=g, dtype=torch.int32)
    out = _cuda(gpu, "gather_max_rel", x, idx)
    ref = gather_max_rel_ref(xnp, idx.numpy())
    assert out.dtype == x.dtype
    assert np.abs(out.numpy().astype(np.float64) - ref.astype(np.float64)).max() <= 1e-5


def test_degc_pipeline_equals_reference(gpu):
    # the kernels chained as DEGC chains them (labels -> k-NN -> centroids), cvig_ti's block shape
    x = planted_tokens(2, 196, 192, 4, seed=21)
    labels, _ = _cuda(gpu, "kmeans", x, 4, 20)
    np.testing.assert_array_equal(labels.numpy(), kmeans_ref(x.numpy(), 4, 20)[0])
    xd = dyadic_tokens(2, 196, 192, 22)
    idx, valid = _cuda(gpu, "partitioned_knn", xd, labels, 9)
    ri, rv = partitioned_knn_ref(xd.numpy(), labels.numpy(), 9)
    np.testing.assert_array_equal(idx.numpy(), ri)
    np.testing.assert_array_equal(valid.numpy(), rv)
    out = _cuda(gpu, "gather_max_rel", xd, idx)
    np.testing.assert_array_equal(out.numpy(), gather_max_rel_ref(xd.numpy(), ri))  # dyadic: exact


# ----------------------------------------------------------------------------
# Status codes of the C ABI
# ----------------------------------------------------------------------------


def _codes(lib: KernelLibrary, dev: torch.device):
    """Status of each kind of bad call, made through the raw C ABI (no Python-side checks)."""
    b, n, c = 2, 37, 16
    x = torch.zeros(b, n, c, device=dev)
    lab = torch.zeros(b, n, dtype=torch.int32, device=dev)
    big = torch.zeros(b, n, 128, dtype=torch.int32, device=dev)  # room for any k, K used below
    zout = torch.zeros(b, n + 1, c, device=dev)
    p = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    km, nn_, sm, gm = (lib.lib.cvig_kmeans_launch, lib.lib.cvig_partitioned_knn_launch,
                       lib.lib.cvig_segment_mean_launch, lib.lib.cvig_gather_max_rel_launch)
    codes = {
        "kmeans null xn": km(None, FP32, b, n, c, 4, 20, p(lab), p(big), None),
        "kmeans null labels": km(p(x), FP32, b, n, c, 4, 20, None, p(big), None),
        "kmeans null counts": km(p(x), FP32, b, n, c, 4, 20, p(lab), None, None),
        "kmeans k > N": km(p(x), FP32, b, n, c, n + 1, 20, p(lab), p(big), None),
        "kmeans k = 0": km(p(x), FP32, b, n, c, 0, 20, p(lab), p(big), None),
        "kmeans iters < 0": km(p(x), FP32, b, n, c, 4, -1, p(lab), p(big), None),
        "kmeans B = 0": km(p(x), FP32, 0, n, c, 4, 20, p(lab), p(big), None),
        "kmeans dtype 2": km(p(x), 2, b, n, c, 4, 20, p(lab), p(big), None),
        "kmeans dtype -1": km(p(x), -1, b, n, c, 4, 20, p(lab), p(big), None),
        "knn null xn": nn_(None, p(lab), FP32, b, n, c, 9, p(big), p(big), None),
        "knn null labels": nn_(p(x), None, FP32, b, n, c, 9, p(big), p(big), None),
        "knn null valid": nn_(p(x), p(lab), FP32, b, n, c, 9, p(big), None, None),
        "knn K > 64": nn_(p(x), p(lab), FP32, b, n, c, MAX_K + 1, p(big), p(big), None),
        "knn K = 0": nn_(p(x), p(lab), FP32, b, n, c, 0, p(big), p(big), None),
        "knn dtype 2": nn_(p(x), p(lab), 2, b, n, c, 9, p(big), p(big), None),
        "segment_mean null z": sm(p(x), p(lab), FP32, b, n, c, 4, None, p(big), None),
        "segment_mean k = 0": sm(p(x), p(lab), FP32, b, n, c, 0, p(zout), p(big), None),
        "segment_mean dtype 5": sm(p(x), p(lab), 5, b, n, c, 4, p(zout), p(big), None),
        "gather_max_rel null idx": gm(p(x), None, FP32, b, n, c, 9, p(zout), None),
        "gather_max_rel K = 0": gm(p(x), p(big), FP32, b, n, c, 0, p(zout), None),
        "gather_max_rel dtype 3": gm(p(x), p(big), 3, b, n, c, 9, p(zout), None),
    }
    # a k-means working set above one block's shared memory (227 KiB at most on any GPU): N = 40000
    nbig = 40000
    xb = torch.zeros(1, nbig, 8, dtype=torch.float16, device=dev)
    lb = torch.zeros(1, nbig, dtype=torch.int32, device=dev)
    codes["kmeans working set > shared memory"] = km(p(xb), FP16, 1, nbig, 8, 4, 20, p(lb), p(big), None)
    return codes


EXPECTED_CODES = {
    "kmeans null xn": 1, "kmeans null labels": 1, "kmeans null counts": 1, "kmeans k > N": 1, "kmeans k = 0": 1,
    "kmeans iters < 0": 1, "kmeans B = 0": 1, "kmeans dtype 2": 1, "kmeans dtype -1": 1,
    "knn null xn": 1, "knn null labels": 1, "knn null valid": 1, "knn K > 64": 2, "knn K = 0": 1, "knn dtype 2": 1,
    "segment_mean null z": 1, "segment_mean k = 0": 1, "segment_mean dtype 5": 1,
    "gather_max_rel null idx": 1, "gather_max_rel K = 0": 1, "gather_max_rel dtype 3": 1,
    "kmeans working set > shared memory": 2,
}


def test_status_codes(gpu):
    cuda = _codes(gpu.lib, gpu.dev)
    gpu.sync()  # none of these launched anything: no error may be pending either
    host = _codes(gpu.host, torch.device("cpu"))
    assert cuda == EXPECTED_CODES
    assert host == cuda  # both builds refuse the same calls the same way


def test_errors_raise_through_the_python_front_end(gpu):
    x = normal_tokens(1, 37, 16, 0).to(gpu.dev)
    with pytest.raises(KernelLibraryError, match="unsupported size"):
        gpu.lib.call("k-NN", "cvig_partitioned_knn_launch", x.data_ptr(), x.data_ptr(), FP32, 1, 37, 16, MAX_K + 1,
                     x.data_ptr(), x.data_ptr(), None)
    with pytest.raises(ValueError):  # the Python front end checks before the C ABI
        gpu.kern.kmeans(x, 38, 20)
    labels, _ = gpu.kern.kmeans(x, 4, 20)
    gpu.sync()
    assert labels.device.type == "cuda" and labels.dtype == torch.int32


# ----------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------


@pytest.fixture
def no_tf32():
    # TF32 convolutions/matmuls (PyTorch's CUDA default for cuDNN) round to 10-bit
    # mantissas: logits would move by ~1e-3 and k-means labels could flip. The
    # comparisons below are about the kernels, so CUDA computes in full FP32.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _have(*modules: str) -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except (ImportError, ValueError):
        return False


def _images(cfg):
    if _have("skimage", "PIL"):
        from clustervig.preprocess import sample_photographs, transform_spec

        return sample_photographs(transform_spec(cfg))
    # scikit-image/Pillow absent (a bare GPU machine): synthetic images that differ in
    # global statistics, so the calibrated BatchNorms stay well scaled
    from conftest import varied_images

    return varied_images(4, cfg.img_size, seed=0)


@pytest.fixture(scope="module")
def ti_model():
    """cvig_ti, random weights, BatchNorm calibrated on the test images (as conftest.make_model), on the CPU.

    Seed 1 on the sample photographs: the draw tests/test_export_onnx.py uses,
    with no decision within ORT-vs-PyTorch rounding of a tie.
    """
    import clustervig
    from clustervig.utils import calibrate_batchnorm

    torch.manual_seed(1)
    model = clustervig.create_model("cvig_ti")
    images = _images(model.cfg)
    calibrate_batchnorm(model, [images])
    return model.eval(), images


def _logits(model, x):
    with torch.inference_mode():
        out = model(x)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out.float().cpu()


def _diff(a, b) -> str:
    d = (a - b).abs()
    top1 = (a.argmax(1) == b.argmax(1)).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1).min().item()
    return (f"max |diff| {d.max().item():.3g} (logits up to {a.abs().max().item():.3g}), min cosine {cos:.7f}, "
            f"top-1 agreement {top1:.2f}")


def _blockwise(a, b, x, dev_b):
    """Each stage of model ``b`` (on ``dev_b``) fed exactly the input the same stage of ``a`` got.

    Returns [(stage, max |diff|, max |output of a|)]. Feeding both the same
    input stops a rounding difference in one block from reaching the next
    block's k-means: this compares the blocks' arithmetic, not the chaos of a
    chain of discrete decisions.
    """
    rows = []
    with torch.inference_mode():
        h = a.stem(x) + a.pos_embed
        hb = b.stem(x.to(dev_b)) + b.pos_embed
        rows.append(("stem", (h.cpu() - hb.cpu()).abs().max().item(), h.abs().max().item()))
        for i, (blk_a, blk_b) in enumerate(zip(a.blocks, b.blocks)):
            ya, yb = blk_a(h), blk_b(h.to(dev_b))
            rows.append((f"block {i}", (ya.cpu() - yb.cpu()).abs().max().item(), ya.abs().max().item()))
            h = ya
        la, lb = a.forward_head(h), b.forward_head(h.to(dev_b))
        rows.append(("head", (la.cpu() - lb.cpu()).abs().max().item(), la.abs().max().item()))
    return rows


def _compare_models(a, b, x, dev_b, what, end_to_end: bool):
    """Block by block within 1e-4 (relative to each stage's scale); with ``end_to_end``, the logits within 1e-4.

    k-means and k-NN are discrete: two backends whose arithmetic differs by
    rounding alone (cuDNN vs oneDNN convolutions) can put a token on the other
    side of a near-tie, and every later block then differs (on the CPU, 1e-6
    relative weight noise flips decisions of cvig_ti on these images). So
    across devices only the block-by-block comparison is a property of the
    kernels; on one device, where the two models share every other op, the
    logits must agree end to end as well (as they do on the CPU:
    tests/test_kernels_model.py).
    """
    bad = [f"{name}: {d:.3g} (scale {s:.3g})" for name, d, s in _blockwise(a, b, x, dev_b) if d > 1e-4 * max(1.0, s)]
    assert not bad, f"{what}, each stage given the same input: " + "; ".join(bad)
    la, lb = _logits(a, x), _logits(b, x.to(dev_b))
    assert torch.isfinite(la).all() and torch.isfinite(lb).all()
    if end_to_end:
        assert (la - lb).abs().max().item() <= 1e-4, f"{what}, end to end: {_diff(la, lb)}"


def test_model_kernels_cuda_equals_static_cuda(gpu, ti_model, no_tf32):
    model, images = ti_model
    static = copy.deepcopy(model).to(gpu.dev)  # pure static form (PyTorch ops) on CUDA
    kern = copy.deepcopy(model).to(gpu.dev).set_kernels(True)
    assert kern.kernels and not static.kernels
    x = images.to(gpu.dev)
    _compare_models(kern, static, x, gpu.dev, "CUDA kernels vs the static form on CUDA", end_to_end=True)


def test_model_kernels_cuda_equals_kernels_cpu(gpu, ti_model, no_tf32):
    model, images = ti_model
    kern = copy.deepcopy(model).to(gpu.dev).set_kernels(True)
    host = copy.deepcopy(model).set_kernels(True)  # the same path on the host build
    _compare_models(kern, host, images.to(gpu.dev), torch.device("cpu"), "CUDA kernels vs host kernels on the CPU",
                    end_to_end=False)


def _capture(model, x):
    """CUDA-graph capture of one forward at x's shape; returns (static input, static output, graph)."""
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(2):  # warm-up off the capture: library loads, cuBLAS/cuDNN workspaces
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        static_y = model(static_x)
    return static_x, static_y, graph


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_graph_capture_of_kernel_path(gpu, ti_model, no_tf32, dtype):
    model, images = ti_model
    m = copy.deepcopy(model).to(gpu.dev, dtype).set_kernels(True)
    x1 = images.to(gpu.dev, dtype)
    x2 = torch.flip(x1, dims=[3])  # other inputs: other partitions, other neighbours
    eager1, eager2 = _logits(m, x1), _logits(m, x2)
    static_x, static_y, graph = _capture(m, x1)
    graph.replay()
    torch.cuda.synchronize()
    r1 = static_y.float().cpu()
    static_x.copy_(x2)  # new data in the captured input buffer: the replay must recompute everything
    graph.replay()
    torch.cuda.synchronize()
    r2 = static_y.float().cpu()
    # same kernels on the same data: identical up to cuDNN choosing another algorithm in capture
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.isfinite(r1).all() and torch.isfinite(r2).all()
    assert (r1 - eager1).abs().max().item() <= tol, _diff(r1, eager1)
    assert (r2 - eager2).abs().max().item() <= tol, _diff(r2, eager2)
    assert (r1 - r2).abs().max().item() > 1e-3  # the second replay did not return the first result
