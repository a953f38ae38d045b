"""Partitioned k-NN (docs/design.md section 2.3) against a numpy brute force."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clustervig.graph import knn_masked, knn_padded, knn_reference, l2_normalize, parts_to_dense, partition_layout


def brute_force(xn: np.ndarray, labels: np.ndarray, k: int, allowed=None):
    """Per token: self, then same-partition tokens by decreasing xn.xn, ties to lower index.

    Returns (idx [N, K] self-filled, valid [N, K]). ``allowed`` restricts the
    candidate neighbours (used for the padded overflow rule).
    """
    n = xn.shape[0]
    idx = np.tile(np.arange(n)[:, None], (1, k))
    valid = np.zeros((n, k), dtype=bool)
    for v in range(n):
        if allowed is not None and not allowed[v]:
            valid[v, 0] = True  # only itself
            continue
        cand = [u for u in range(n) if labels[u] == labels[v] and u != v and (allowed is None or allowed[u])]
        cand.sort(key=lambda u: (-float(xn[v] @ xn[u]), u))
        nb = [v] + cand[: k - 1]
        idx[v, : len(nb)] = nb
        valid[v, : len(nb)] = True
    return idx, valid


def make_labels(sizes, seed):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(s, j) for j, s in enumerate(sizes)])
    rng.shuffle(labels)
    return labels


CASES = {
    "balanced": [49, 49, 49, 49],
    "uneven": [120, 50, 20, 6],  # one partition smaller than K
    "single_token": [150, 40, 5, 1],  # a single-token partition and one < K
    "one_partition": [196, 0, 0, 0],  # all tokens in one partition, others empty
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("k", [9, 18])
def test_knn_forms_equal_brute_force(case, k):
    sizes = CASES[case]
    b = 2
    torch.manual_seed(k)
    xn = l2_normalize(torch.randn(b, sum(sizes), 16, dtype=torch.float64))
    labels = torch.tensor(np.stack([make_labels(sizes, s) for s in range(b)]))
    ref = [brute_force(xn[i].numpy(), labels[i].numpy(), k) for i in range(b)]
    ref_idx = np.stack([r[0] for r in ref])
    ref_valid = np.stack([r[1] for r in ref])

    idx, valid = knn_masked(xn, labels, k)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_array_equal(valid.numpy(), ref_valid)

    n = xn.shape[1]
    for cap in (n, max(sizes)):  # P = N (always exact) and the tightest exact capacity
        idx, valid, overflow = knn_padded(xn, labels, k, 4, cap)
        assert not overflow.any()
        np.testing.assert_array_equal(idx.numpy(), ref_idx, err_msg=f"padded P={cap}")
        np.testing.assert_array_equal(valid.numpy(), ref_valid, err_msg=f"padded P={cap}")

    parts = knn_reference(xn, labels, k)
    for bi, members, nb in parts:
        assert nb.shape[1] == min(k, members.numel())  # K_v = min(K, |partition|)
    idx, valid = parts_to_dense(parts, b, n, k)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_array_equal(valid.numpy(), ref_valid)


def test_knn_ties_go_to_lower_index_and_self_first():
    # tokens 0, 2, 4 are exact duplicates of each other: similarity ties with self
    base = torch.tensor([[1.0, 0.0], [0.8, 0.6], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0]], dtype=torch.float64)
    xn = l2_normalize(base).unsqueeze(0)
    labels = torch.zeros(1, 5, dtype=torch.long)
    idx, valid = knn_masked(xn, labels, 3)
    assert idx[0, 2].tolist() == [2, 0, 4]  # self first, then equal similarities by index
    assert idx[0, 4].tolist() == [4, 0, 2]
    assert idx[0, 0].tolist() == [0, 2, 4]
    parts = knn_reference(xn, labels, 3)
    assert parts[0][2][2].tolist() == [2, 0, 4]
    idx_p, _, _ = knn_padded(xn, labels, 3, 1, 5)
    assert torch.equal(idx_p, idx)


def test_padded_overflow_rule():
    # capacity 30 < partition 0's 120 members: the 30 lowest-index members of
    # each partition are laid out, the rest are overflow tokens that keep only
    # themselves as neighbour and are nobody's neighbour.
    sizes = [120, 50, 20, 6]
    labels_np = make_labels(sizes, 5)
    labels = torch.tensor(labels_np).unsqueeze(0)
    torch.manual_seed(0)
    xn = l2_normalize(torch.randn(1, 196, 16, dtype=torch.float64))
    cap = 30
    idx, valid, overflow = knn_padded(xn, labels, 9, 4, cap)
    allowed = np.zeros(196, dtype=bool)
    for j in range(4):
        members = np.flatnonzero(labels_np == j)
        allowed[members[:cap]] = True
    np.testing.assert_array_equal(overflow[0].numpy(), ~allowed)
    assert int(overflow.sum()) == (120 - 30) + (50 - 30)
    ref_idx, ref_valid = brute_force(xn[0].numpy(), labels_np, 9, allowed=allowed)
    np.testing.assert_array_equal(idx[0].numpy(), ref_idx)
    np.testing.assert_array_equal(valid[0].numpy(), ref_valid)


def test_padded_capacity_below_k_pads_with_self():
    labels = torch.zeros(1, 12, dtype=torch.long)
    xn = l2_normalize(torch.randn(1, 12, 4, dtype=torch.float64))
    idx, valid, overflow = knn_padded(xn, labels, 9, 1, 4)
    assert idx.shape == (1, 12, 9)
    assert int(valid.sum(-1).max()) == 4
    ref_idx, ref_valid = brute_force(xn[0].numpy(), labels[0].numpy(), 9, allowed=np.arange(12) < 4)
    np.testing.assert_array_equal(idx[0].numpy(), ref_idx)
    np.testing.assert_array_equal(valid[0].numpy(), ref_valid)


def test_partition_layout_slots():
    labels = torch.tensor([[2, 0, 2, 1, 0, 2]])
    slot_token, slot_valid, token_slot, overflow = partition_layout(labels, 3, 3)
    # partition 0: tokens 1, 4; partition 1: token 3; partition 2: tokens 0, 2, 5
    assert slot_valid[0].tolist() == [True, True, False, True, False, False, True, True, True]
    assert slot_token[0][slot_valid[0]].tolist() == [1, 4, 3, 0, 2, 5]
    assert token_slot[0].tolist() == [6, 0, 7, 3, 1, 8]
    assert not overflow.any()


def test_topk_desc_orders_ties_by_lower_index_like_a_stable_sort():
    # eager topk_desc takes torch.topk's set and repairs tie order (rows with a tie across the cut take a full
    # sort): against numpy's stable argsort of the negated values, on rows full of ties
    import numpy as np

    from clustervig.graph import topk_desc

    rng = np.random.default_rng(3)
    for trial in range(150):
        n = int(rng.integers(1, 200))
        k = int(rng.integers(1, n + 1))
        x = rng.integers(-3, 3, size=(2, 4, n)).astype(np.float32) if trial % 2 else \
            rng.standard_normal((2, 4, n)).astype(np.float32)
        if trial % 5 == 0:
            x[..., ::3] = -1e4  # the masked layout's sentinel: many equal values at the cut
        if trial % 7 == 0:
            x[1, 2, :] = 0.25  # a row of identical tokens
        v, i = topk_desc(torch.from_numpy(x), k)
        order = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        np.testing.assert_array_equal(i.numpy(), order)
        np.testing.assert_array_equal(v.numpy(), np.take_along_axis(x, order, -1))
