"""k-means of DEGC (docs/design.md section 2.2) against independent implementations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans as SkKMeans

from clustervig.graph import kmeans, kmeans_init_indices, l2_normalize, segment_mean

from conftest import clustered_tokens


def lloyd_numpy(xn: np.ndarray, k: int, iters: int) -> np.ndarray:
    """Plain-loop Lloyd with the rules of docs/design.md section 2.2, written independently of clustervig."""
    n = xn.shape[0]
    cent = np.stack([xn[(2 * i + 1) * n // (2 * k)] for i in range(k)]).astype(np.float64)

    def assign(c):
        labels = np.empty(n, dtype=np.int64)
        for v in range(n):
            best, best_j = None, -1
            for j in range(k):
                d = float(np.sum((xn[v] - c[j]) ** 2))  # full distance; ||x||^2 is a constant
                if best is None or d < best:  # strict: ties keep the lower j
                    best, best_j = d, j
            labels[v] = best_j
        return labels

    for _ in range(iters):
        labels = assign(cent)
        for j in range(k):
            members = xn[labels == j]
            if len(members):
                cent[j] = members.mean(axis=0)
    return assign(cent)


def test_init_indices():
    assert kmeans_init_indices(196, 4) == [24, 73, 122, 171]
    assert kmeans_init_indices(784, 6) == [65, 196, 326, 457, 588, 718]
    assert kmeans_init_indices(5, 5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k,iters", [(4, 20), (6, 20), (3, 5)])
def test_kmeans_matches_numpy_and_sklearn(seed, k, iters):
    # clustered data of uneven group sizes: no empty clusters, no near-ties
    sizes = [60, 50, 40, 30, 16][: k] if k <= 5 else [50, 40, 36, 30, 24, 16]
    x, _ = clustered_tokens(sizes, c=24, noise=0.35, seed=seed)
    xn = l2_normalize(x)
    ours = kmeans(xn.unsqueeze(0), k, iters)[0].numpy()
    ref = lloyd_numpy(xn.numpy(), k, iters)
    np.testing.assert_array_equal(ours, ref)
    # every cluster non-empty, so scikit-learn's empty-cluster relocation never runs
    assert len(np.unique(ours)) == k
    init = xn.numpy()[kmeans_init_indices(xn.shape[0], k)]
    sk = SkKMeans(n_clusters=k, init=init, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd").fit(xn.numpy())
    np.testing.assert_array_equal(ours, sk.labels_)


def test_kmeans_random_gaussian_batch_matches_numpy():
    torch.manual_seed(3)
    xn = l2_normalize(torch.randn(3, 196, 32, dtype=torch.float64))
    ours = kmeans(xn, 4, 20)
    for b in range(3):
        np.testing.assert_array_equal(ours[b].numpy(), lloyd_numpy(xn[b].numpy(), 4, 20))


def test_kmeans_float32_equals_float64_on_separated_data():
    x, group = clustered_tokens([80, 60, 40, 16], c=32, noise=0.1, seed=7)
    xn = l2_normalize(x)
    l64 = kmeans(xn.unsqueeze(0), 4, 20)
    l32 = kmeans(xn.float().unsqueeze(0), 4, 20)
    assert torch.equal(l64, l32)
    # and it recovers the planted groups (up to a relabelling)
    mapping = {int(g): int(l) for g, l in zip(group, l64[0])}
    assert len(set(mapping.values())) == 4
    assert all(mapping[int(g)] == int(l) for g, l in zip(group, l64[0]))


def test_empty_cluster_keeps_its_centroid():
    # All tokens identical: every centroid equals the token, every distance ties,
    # so everything goes to cluster 0 and clusters 1..3 stay empty forever.
    xn = l2_normalize(torch.ones(1, 50, 8, dtype=torch.float64))
    labels = kmeans(xn, 4, 20)
    assert torch.equal(labels, torch.zeros(1, 50, dtype=torch.long))


def test_empty_cluster_rule_constructed():
    # N=6, k=2: initial centroids are tokens 1 and 4, both equal to a. The first
    # assignment ties everywhere -> all tokens to cluster 0, cluster 1 is empty.
    # Keeping its centroid (= a) makes the a-tokens move to cluster 1 in the
    # next assignment: [1, 1, 0, 0, 1, 0]. A zeroed centroid (distance 1 from
    # every unit token) would instead leave everything in cluster 0, and a NaN
    # centroid would make argmin undefined.
    a = [1.0, 0.0]
    b = [0.0, 1.0]
    x = torch.tensor([[a, a, b, b, a, [0.6, 0.8]]], dtype=torch.float64)
    xn = l2_normalize(x)
    labels = kmeans(xn, 2, 3)
    ref = lloyd_numpy(xn[0].numpy(), 2, 3)
    np.testing.assert_array_equal(labels[0].numpy(), ref)
    assert labels[0].tolist() == [1, 1, 0, 0, 1, 0]


def test_tie_goes_to_lower_cluster():
    # Token 2 is exactly equidistant from both initial centroids (indices 0 and 3
    # for N=4, k=2 -> (2i+1)*4//4 = 1, 3); with T=0 it must get label 0.
    x = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    xn = l2_normalize(x)
    labels = kmeans(xn, 2, 0)
    # token 1 is centroid 0, token 3 centroid 1; token 0 (0,1) is equidistant: tie -> 0
    assert labels[0].tolist() == [0, 0, 0, 1]


def test_segment_mean_empty_partition_is_zero():
    x = torch.arange(12, dtype=torch.float64).reshape(1, 4, 3)
    labels = torch.tensor([[0, 2, 0, 2]])
    z, counts = segment_mean(x, labels, 3)
    assert counts.tolist() == [[2.0, 0.0, 2.0]]
    np.testing.assert_allclose(z[0, 0].numpy(), x[0, [0, 2]].mean(0).numpy())
    np.testing.assert_allclose(z[0, 2].numpy(), x[0, [1, 3]].mean(0).numpy())
    assert torch.all(z[0, 1] == 0)


def test_device_side_init_indices_equal_the_rule():
    # kmeans() computes the initial indices with arange on CUDA tensors (capturable in a CUDA graph);
    # the formula must give exactly (2i+1)*N // (2k)
    from clustervig.graph import kmeans_init_indices

    for n in (1, 2, 7, 37, 64, 196, 784, 3136):
        for k in range(1, min(n, 9) + 1):
            assert ((2 * torch.arange(k) + 1) * n // (2 * k)).tolist() == kmeans_init_indices(n, k)
