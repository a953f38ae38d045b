"""CUDA kernels against the numpy references, on a GPU (marked gpu; skipped without one)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clustervig.graph import l2_normalize
from clustervig.plugins.reference import gather_max_rel_ref, kmeans_ref, partitioned_knn_ref, segment_mean_ref

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def kernels():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    from clustervig.plugins.kernels import KernelLibraryError, Kernels

    try:
        return Kernels()
    except KernelLibraryError as exc:
        pytest.skip(str(exc))


def tokens(b, n, c, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = l2_normalize(torch.randn(b, n, c, generator=g))
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 196, 64, 4), (2, 97, 33, 6), (1, 784, 192, 6)])
def test_kmeans_kernel(kernels, dtype, shape):
    b, n, c, k = shape
    x = tokens(b, n, c, 0, dtype)
    labels, counts = kernels.kmeans(x.cuda(), k, 20)
    ref_l, ref_c = kmeans_ref(x.float().numpy(), k, 20)
    agree = (labels.cpu().numpy() == ref_l).mean()
    # FP32: float summation order differs from numpy's float64 only near ties
    assert agree >= (0.99 if dtype == torch.float32 else 0.95)
    np.testing.assert_array_equal(counts.cpu().numpy(), np.stack([np.bincount(l, minlength=k) for l in labels.cpu().numpy()]))


def test_kmeans_kernel_empty_clusters(kernels):
    x = l2_normalize(torch.ones(2, 50, 8)).cuda()
    labels, counts = kernels.kmeans(x, 4, 20)
    assert (labels == 0).all() and counts.cpu().tolist() == [[50, 0, 0, 0]] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sizes,k", [([49, 49, 49, 49], 9), ([150, 40, 5, 1], 18), ([13, 7, 1, 0], 9)])
def test_knn_kernel(kernels, dtype, sizes, k):
    rng = np.random.default_rng(1)
    labels = np.concatenate([np.full(s, j) for j, s in enumerate(sizes)]).astype(np.int32)
    rng.shuffle(labels)
    x = tokens(2, len(labels), 32, 1, dtype)
    lab = torch.tensor(np.stack([labels, labels[::-1].copy()]))
    idx, valid = kernels.partitioned_knn(x.cuda(), lab.cuda(), k)
    ref_i, ref_v = partitioned_knn_ref(x.float().numpy(), lab.numpy(), k)
    np.testing.assert_array_equal(valid.cpu().numpy(), ref_v)
    agree = (idx.cpu().numpy() == ref_i).mean()
    assert agree >= (0.999 if dtype == torch.float32 else 0.97)


def test_knn_kernel_ties_and_duplicates(kernels):
    x = l2_normalize(torch.tensor([[[1.0, 0.0], [0.8, 0.6], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0]]]))
    idx, valid = kernels.partitioned_knn(x.cuda(), torch.zeros(1, 5, dtype=torch.int32).cuda(), 3)
    assert idx[0, 2].tolist() == [2, 0, 4] and idx[0, 0].tolist() == [0, 2, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_segment_kernels(kernels, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 257, 48, generator=g).to(dtype)  # B*N not a multiple of the block size
    labels = torch.randint(0, 5, (3, 257), generator=g, dtype=torch.int32)
    labels[2] = labels[2].clamp(max=2)  # empty partitions 3 and 4
    z, counts = kernels.segment_mean(x.cuda(), labels.cuda(), 5)
    rz, rc = segment_mean_ref(x.float().numpy(), labels.numpy(), 5)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    np.testing.assert_allclose(z.float().cpu().numpy(), rz, atol=tol)
    np.testing.assert_array_equal(counts.cpu().numpy(), rc)
    idx = torch.randint(0, 257, (3, 257, 11), generator=g, dtype=torch.int32)
    out = kernels.gather_max_rel(x.cuda(), idx.cuda())
    ref = gather_max_rel_ref(x.float().numpy(), idx.numpy())
    np.testing.assert_allclose(out.float().cpu().numpy(), ref, atol=0 if dtype == torch.float32 else 2e-3)
