"""Graph construction of DEGC: k-means partitioning and partitioned k-NN.

Implements docs/design.md sections 2.1-2.4 and section 3 (the two forms).
Every function here is a plain tensor function; the small ``nn.Module``
wrappers at the bottom exist only so that an ONNX export gives each piece a
stable, readable scope (``blocks.3.grapher.degc/kmeans/...``) that graph
surgery can find by name.

Conventions shared with the ONNX graph and the plugins:

* tokens are ``[B, N, C]``; labels and neighbour indices are integer tensors
  (int64 in PyTorch, int32 in the plugin graph);
* neighbour slot 0 is always the token itself; a partition smaller than K
  fills the missing slots with the token's own index and marks them invalid;
* ties in similarity go to the lower token index, ties in k-means distance to
  the lower cluster index.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

# Cross-partition similarities are replaced by -MASK_VALUE before TopK; self
# similarity by +SELF_VALUE so that self is always the first neighbour even
# when another token is an exact duplicate. Both are representable in FP16
# (max 65504) and far outside the cosine range [-1, 1].
MASK_VALUE = 1.0e4
SELF_VALUE = 1.0e2
NORM_EPS = 1e-12


def l2_normalize(x: Tensor) -> Tensor:
    """Xn = X / max(||X||_2, 1e-12) per token (last axis)."""
    return x / x.norm(p=2, dim=-1, keepdim=True).clamp_min(NORM_EPS)


def kmeans_init_indices(n: int, k: int) -> List[int]:
    """Deterministic initial centroid indices ``(2i+1)*N // (2k)``."""
    return [(2 * i + 1) * n // (2 * k) for i in range(k)]


def kmeans_assign(xn: Tensor, centroids: Tensor) -> Tensor:
    """label(v) = argmin_j ||c_j||^2 - 2 xn_v . c_j (first minimum wins)."""
    c_sq = (centroids * centroids).sum(-1).unsqueeze(1)  # [B, 1, k]
    dist = c_sq - 2.0 * torch.matmul(xn, centroids.transpose(1, 2))  # [B, N, k]
    return dist.argmin(dim=-1)


def one_hot(labels: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """[B, N] integer labels -> [B, N, k] one-hot in ``dtype`` (Equal + Cast in ONNX)."""
    classes = torch.arange(k, device=labels.device, dtype=labels.dtype)
    return (labels.unsqueeze(-1) == classes).to(dtype)


def kmeans(xn: Tensor, k: int, iters: int) -> Tensor:
    """Batched Lloyd k-means on normalised tokens, exactly T iterations.

    Returns the labels ``[B, N]`` of the assignment after the last update
    (T updates, T+1 assignments). Empty clusters keep their centroid.
    """
    return kmeans_with_centroids(xn, k, iters)[0]


def kmeans_with_centroids(x: Tensor, k: int, iters: int, empty_keeps: bool = True) -> Tuple[Tensor, Tensor]:
    """:func:`kmeans` that also returns the centroids ``[B, k, C]`` after the last update.

    The labels are the assignment to exactly these centroids. ``numerics="authors"``
    feeds the centroids to the global update (the authors' code hands GATv2 its
    k-means centres); the paper's numerics use only the labels.
    ``empty_keeps=False``: a cluster with no member gets the zero vector as its
    centroid (``torch_kmeans``' mean over no member, which the authors' code uses)
    instead of keeping its previous centroid.
    """
    b, n = x.shape[:2]
    if k == 1:  # one partition: nothing to cluster (the ViG baseline)
        labels = torch.zeros(b, n, dtype=torch.long, device=x.device)
        centre = x.mean(dim=1, keepdim=True) if iters > 0 else x[:, n // 2 : n // 2 + 1]
        return labels, centre
    if x.is_cuda:  # computed on the device: a host-to-device copy cannot be captured in a CUDA graph
        idx = (2 * torch.arange(k, device=x.device) + 1) * n // (2 * k)
    else:  # CPU (and every ONNX export): a constant of the graph
        idx = torch.tensor(kmeans_init_indices(n, k), device=x.device)
    centroids = x.index_select(1, idx)
    for _ in range(iters):
        labels = kmeans_assign(x, centroids)
        onehot = one_hot(labels, k, x.dtype)  # [B, N, k]
        counts = onehot.sum(dim=1).unsqueeze(-1)  # [B, k, 1]
        sums = torch.matmul(onehot.transpose(1, 2), x)  # [B, k, C]
        if empty_keeps:
            centroids = torch.where(counts > 0, sums / counts.clamp_min(1.0), centroids)
        else:
            centroids = sums / counts.clamp_min(1.0)
    return kmeans_assign(x, centroids), centroids


def centre_tokens(x: Tensor) -> Tensor:
    """X - mean of X over the tokens, per image and channel (``numerics="authors"``)."""
    return x - x.mean(dim=1, keepdim=True)


def segment_mean(x: Tensor, labels: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Per-partition mean of ``x`` [B, N, C] as a one-hot matmul.

    Returns ``(z [B, k, C], counts [B, k])``; an empty partition has z = 0.
    """
    onehot = one_hot(labels, k, x.dtype)
    counts = onehot.sum(dim=1)
    sums = torch.matmul(onehot.transpose(1, 2), x)
    return sums / counts.clamp_min(1.0).unsqueeze(-1), counts


def topk_desc(values: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Largest ``k`` along the last axis, equal values ordered by lower index.

    ONNX TopK defines exactly this tie rule, so the exported graph uses TopK;
    ``torch.topk`` on CPU does not promise it, so eager mode makes it so: the
    set ``torch.topk`` picks is the right one unless its k-th value is shared
    with an element it left out (a tie across the cut: such rows take a full
    stable sort), and inside the set a sort by index, then a stable sort by
    value, orders ties by lower index. Bit-identical to a full stable sort,
    about 4x faster on rows of N = 4200 (a 800 x 1344 input).
    """
    if torch.onnx.is_in_onnx_export() or values.is_meta:  # a meta tensor (cvig profile) has shapes, no values
        return torch.topk(values, k, dim=-1, largest=True, sorted=True)
    v, i = torch.topk(values, k, dim=-1, largest=True, sorted=True)
    if bool(torch.isnan(v).any()):  # NaN order is the full sort's to decide
        return _stable_topk(values, k)
    exact = (values >= v[..., -1:]).sum(-1) == k
    i = torch.sort(i, dim=-1).values
    v, order = torch.sort(torch.gather(values, -1, i), dim=-1, descending=True, stable=True)
    i = torch.gather(i, -1, order)
    if not bool(exact.all()):
        rows = ~exact
        v[rows], i[rows] = _stable_topk(values[rows], k)
    return v, i


def _stable_topk(values: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    v, i = torch.sort(values, dim=-1, descending=True, stable=True)
    return v[..., :k], i[..., :k]


# --------------------------------------------------------------------------
# Partitioned k-NN, three implementations of one contract:
#   returns (idx [B, N, K] int64, valid [B, N, K] bool)
# --------------------------------------------------------------------------


def _set_diagonal(sim: Tensor, value: float) -> Tensor:
    """``sim`` with ``sim[..., i, i] = value`` on its last two (square) axes.

    A scatter of ``value`` to column i of row i (ScatterElements in ONNX, no reduction: every element written
    once), not a Where over an [N, N] identity mask: that mask depends on nothing but N, so the export folds
    it into a constant of N^2 bytes per block (17.6 MB per block at N = 4200 tokens, an 800 x 1344 input).
    The index is [.., N, 1]."""
    n = int(sim.shape[-1])
    idx = torch.arange(n, device=sim.device).view(*([1] * (sim.ndim - 2)), n, 1)
    return sim.scatter(-1, idx.expand_as(sim[..., :1]), value)


def knn_masked(xn: Tensor, labels: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Static form: full similarity, cross-partition entries masked, TopK(K).

    Slots whose value is the mask sentinel (partition smaller than K) are
    replaced by the token's own index and marked invalid.
    """
    b, n, _ = xn.shape
    k = min(k, n)
    sim = torch.matmul(xn, xn.transpose(1, 2))  # [B, N, N]
    same = labels.unsqueeze(2) == labels.unsqueeze(1)
    # 0-d fill values broadcast: full_like would be traced into [B, N, N] constants
    # (2 x 1.8 MB per block per image in a static-batch ONNX file)
    sim = torch.where(same, sim, sim.new_full((), -MASK_VALUE))
    sim = _set_diagonal(sim, SELF_VALUE)
    values, idx = topk_desc(sim, k)
    valid = values > -0.5 * MASK_VALUE
    self_idx = torch.arange(n, device=xn.device).view(1, n, 1).expand(b, n, k)
    idx = torch.where(valid, idx, self_idx)
    return idx, valid


def _row_length(n: int) -> int:
    """Row length S = ceil(sqrt(N)) of the [R, S] token grid :func:`partition_layout` counts on."""
    s = math.isqrt(n)
    return s if s * s == n else s + 1


def partition_layout(labels: Tensor, k: int, capacity: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Place tokens into a padded ``[B, k, P]`` layout, in token order.

    Returns ``(slot_token [B, k*P], slot_valid [B, k*P], token_slot [B, N],
    overflow [B, N])``: the token index held by each slot (0 for padding),
    whether the slot holds a token, the slot of each token (0 for overflow
    tokens), and which tokens did not fit because their partition has more
    than ``capacity`` members. Overflow rule (deterministic): a partition keeps
    its ``capacity`` lowest-index members; the rest are overflow tokens.

    No sort and no running sum (docs/design.md section 3): the rank of a token
    in its partition (how many lower-index tokens share its label) is counted
    on the tokens seen as R rows of S = ceil(sqrt(N)): members earlier in the
    token's own row (a [B, R, S, S] comparison) plus members in earlier rows (a
    [B, R, R, k] masked sum of per-row counts), all in integers. Its slot is
    ``label * P + rank``, and ``slot_token`` is the scatter of token indices to
    those slots. O(N * sqrt(N)) small integer work; exported, it is Equal /
    And / ReduceSum / GatherElements / ScatterElements, with no TopK over N
    (TensorRT's K <= 3840) and no CumSum (a loop of N steps in TensorRT 10.x,
    float types only).
    """
    n = int(labels.shape[1])  # static (a Python int in an export: no shape arithmetic)
    dev = labels.device
    p = capacity
    s = _row_length(n)
    r = -(-n // s)
    # padding tokens (label 0) go after the last token: they precede no real token, so no real rank changes
    # (reshapes by -1 and *_as / *_like shapes keep a dynamic batch free of shape arithmetic in ONNX)
    lab = labels if r * s == n else torch.cat([labels, labels[:, : r * s - n] * 0], dim=1)
    lab = lab.reshape(-1, r, s)
    col = torch.arange(s, device=dev)
    earlier_in_row = col.unsqueeze(1) > col.unsqueeze(0)  # [S, S]: column u comes before token v
    same = lab.unsqueeze(3) == lab.unsqueeze(2)  # [B, R, S, S]
    rank_in_row = (same & earlier_in_row).sum(-1)  # [B, R, S] int64
    row_counts = one_hot(lab, k, torch.int64).sum(2)  # [B, R, k]: members of each partition per row
    row = torch.arange(r, device=dev)
    earlier_row = (row.unsqueeze(1) > row.unsqueeze(0)).to(torch.int64).view(1, r, r, 1)  # [1, R, R', 1]
    rows_before = (row_counts.unsqueeze(1) * earlier_row).sum(2)  # [B, R, k]: members in rows < R
    rank = (rank_in_row + torch.gather(rows_before, 2, lab)).reshape(-1, r * s)
    if r * s != n:
        rank = rank[:, :n]
    overflow = rank >= p
    ar = torch.arange(n, device=dev)
    slot_of_token = labels * p + rank
    token_slot = torch.where(overflow, torch.zeros_like(rank), slot_of_token)
    # slot -> token: every kept token writes its index to its own slot; each overflow token writes to a
    # private spill slot past the end, so all scatter indices are distinct (deterministic in any order)
    dest = torch.where(overflow, (k * p + ar).unsqueeze(0), slot_of_token)
    spill = torch.zeros_like(labels[:, :1]).expand(-1, k * p + n)
    slot_token = spill.scatter(1, dest, ar.expand_as(labels))[:, : k * p]
    counts = row_counts.sum(1)  # [B, k] partition sizes
    if r * s != n:  # less the padding tokens counted in partition 0
        counts = counts - (torch.arange(k, device=dev) == 0).to(counts.dtype) * (r * s - n)  # no host copy
    slot_valid = torch.arange(p, device=dev) < counts.unsqueeze(-1)  # [B, k, P]
    return slot_token, slot_valid.reshape(-1, k * p), token_slot, overflow


def knn_padded(
    xn: Tensor, labels: Tensor, k: int, clusters: int, capacity: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """Static form for large N: k-NN inside padded partitions of capacity P.

    Cost is O(kappa * P^2 * C) instead of O(N^2 * C). Returns
    ``(idx, valid, overflow)``; an overflow token (see :func:`partition_layout`)
    has only itself as neighbour and is nobody's neighbour.
    """
    # N and C are static (docs/design.md section 3): Python ints, and -1 for the batch, so that a
    # dynamic-batch export carries no Shape/Gather/Concat arithmetic for them
    n, c = int(xn.shape[1]), int(xn.shape[2])
    p = capacity
    kk = min(k, p)
    slot_token, slot_valid, tok_slot, overflow = partition_layout(labels, clusters, p)
    xp = torch.gather(xn, 1, slot_token.unsqueeze(-1).expand(-1, -1, c))
    xp = xp.reshape(-1, clusters, p, c)
    sim = torch.matmul(xp, xp.transpose(2, 3))  # [B, k, P, P]
    col_valid = slot_valid.reshape(-1, clusters, 1, p)
    sim = torch.where(col_valid, sim, sim.new_full((), -MASK_VALUE))  # 0-d fills, as in knn_masked
    sim = _set_diagonal(sim, SELF_VALUE)
    values, local = topk_desc(sim, kk)  # [B, k, P, kk]
    valid_slot = values > -0.5 * MASK_VALUE
    # slot-local neighbour -> global token index
    base = (torch.arange(clusters, device=xn.device) * p).view(1, clusters, 1, 1)
    glob = torch.gather(slot_token, 1, (local + base).reshape(-1, clusters * p * kk)).reshape(-1, clusters * p, kk)
    valid_slot = valid_slot.reshape(-1, clusters * p, kk)
    # back to token order: token -> its slot (overflow tokens read slot 0, then self-fill)
    tok = tok_slot.unsqueeze(-1).expand(-1, -1, kk)
    idx = torch.gather(glob, 1, tok)
    valid = torch.gather(valid_slot, 1, tok)
    self_idx = torch.arange(n, device=xn.device).view(1, n, 1)  # broadcast over the batch and the slots
    idx = torch.where(valid & ~overflow.unsqueeze(-1), idx, self_idx)
    # an overflow token keeps exactly one valid neighbour: itself in slot 0
    # (And/Or, not a Where on booleans: ONNX Runtime's CPU provider has no bool Where, and G-GIN reads `valid`)
    first = torch.arange(kk, device=xn.device).view(1, 1, kk) == 0
    over = overflow.unsqueeze(-1)
    valid = (over & first) | (~over & valid)
    if kk < k:  # capacity below K: pad the remaining slots with self, invalid
        pad = k - kk
        self_pad = (idx[..., :1] * 0 + self_idx).expand(-1, -1, pad)
        idx = torch.cat([idx, self_pad], dim=-1)
        valid = torch.cat([valid, torch.zeros_like(valid[..., :1]).expand(-1, -1, pad)], dim=-1)
    return idx, valid, overflow


def knn_reference(xn: Tensor, labels: Tensor, k: int) -> List[Tuple[int, Tensor, Tensor]]:
    """Reference form (paper Algorithm 2): per image, per partition k-NN.

    Returns one ``(image, members, neighbours)`` triple per non-empty
    partition: ``members`` [P] ascending token indices, ``neighbours``
    [P, K_p] with K_p = min(K, P): self first, then decreasing similarity,
    ties to the lower token index.
    """
    parts = []
    for bi in range(xn.shape[0]):
        for members in partitions_of(labels[bi]):
            xp = xn[bi, members]
            sim = xp @ xp.t()
            sim.fill_diagonal_(math.inf)
            kv = min(k, members.numel())
            # stable sort on descending similarity: equal values keep index order
            order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :kv]
            parts.append((bi, members, members[order]))
    return parts


def parts_to_dense(parts: List[Tuple[int, Tensor, Tensor]], b: int, n: int, k: int) -> Tuple[Tensor, Tensor]:
    """Reference neighbour lists -> the static ``(idx, valid)`` contract."""
    idx = torch.arange(n).view(1, n, 1).repeat(b, 1, k)
    valid = torch.zeros(b, n, k, dtype=torch.bool)
    for bi, members, nb in parts:
        kv = nb.shape[1]
        idx[bi, members, :kv] = nb.to(idx.device)
        valid[bi, members, :kv] = True
    return idx, valid


def partitions_of(labels_1d: Tensor) -> List[Tensor]:
    """Member indices (ascending) of every non-empty partition of one image."""
    return [torch.nonzero(labels_1d == j).flatten() for j in torch.unique(labels_1d).tolist()]


# --------------------------------------------------------------------------
# Scoped modules (no parameters): stable ONNX names for graph surgery.
# --------------------------------------------------------------------------


class Normalize(nn.Module):
    """Xn for k-means and k-NN (the ``degc/norm`` scope, an FP32 island).

    ``centre=True`` (``numerics="authors"``): the tokens are first centred,
    Xc = X - mean over the tokens, and ``forward`` returns ``(Xc, l2(Xc))``:
    the authors' code centres its features in place, so Xc (not X) feeds that
    DEGC's k-means, k-NN and local update.
    """

    def __init__(self, centre: bool = False) -> None:
        super().__init__()
        self.centre = centre

    def forward(self, x: Tensor):
        if self.centre:
            xc = centre_tokens(x)
            return xc, l2_normalize(xc)
        return l2_normalize(x)

    def extra_repr(self) -> str:
        return "centre=True" if self.centre else ""


def kmeans_labels(output) -> Tensor:
    """The labels of a :class:`KMeans` output (``labels``, or ``(labels, centroids)`` with ``centroids=True``)."""
    return output[0] if isinstance(output, tuple) else output


class KMeans(nn.Module):
    """k-means partitioning (docs/design.md section 2.2). No parameters.

    ``centroids=True`` (``numerics="authors"``): returns ``(labels, centroids)``.
    """

    def __init__(self, clusters: int, iters: int, centroids: bool = False) -> None:
        super().__init__()
        self.clusters = clusters
        self.iters = iters
        self.centroids = centroids

    def forward(self, xn: Tensor):
        if self.centroids:  # numerics="authors": torch_kmeans' rule for empty clusters too
            return kmeans_with_centroids(xn, self.clusters, self.iters, empty_keeps=False)
        return kmeans(xn, self.clusters, self.iters)

    def extra_repr(self) -> str:
        return f"clusters={self.clusters}, iters={self.iters}" + (", centroids=True" if self.centroids else "")


class PartitionedKNN(nn.Module):
    """Partitioned k-NN (docs/design.md section 2.3) in the static masked or padded layout."""

    def __init__(self, k: int, clusters: int, mode: str = "masked", capacity: Optional[int] = None) -> None:
        super().__init__()
        if mode not in ("masked", "padded"):
            raise ValueError(f"knn mode must be 'masked' or 'padded', got {mode!r}")
        self.k = k
        self.clusters = clusters
        self.mode = mode
        self.capacity = capacity
        # number of overflow tokens seen in the last forward (padded mode only)
        self.last_overflow = 0

    def forward(self, xn: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        if self.mode == "masked":
            return knn_masked(xn, labels, self.k)
        cap = self.capacity or int(xn.shape[1])  # a Python int: no shape arithmetic in an export
        idx, valid, overflow = knn_padded(xn, labels, self.k, self.clusters, cap)
        if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            self.last_overflow = int(overflow.sum())
        return idx, valid

    def extra_repr(self) -> str:
        cap = f", capacity={self.capacity}" if self.mode == "padded" else ""
        return f"k={self.k}, mode={self.mode}{cap}"


class GatherMaxRel(nn.Module):
    """max_u (x_u - x_v) of G-MRGCN as its own scope (``degc/local/gather_max_rel``) for graph surgery."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = False  # ClusterViG.set_kernels: the fused plugin kernel

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        if self.kernels and not (torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()):
            from clustervig.plugins import torch_ops

            return torch_ops.gather_max_rel(x, idx)
        # max_u (x_u - x_v) == max_u(x_u) - x_v bit for bit: rounding is monotonic
        return gather_max(x, idx) - x


class SegmentMean(nn.Module):
    """Centroid features z_j = mean of X over partition j (docs/design.md section 2.4)."""

    def __init__(self, clusters: int) -> None:
        super().__init__()
        self.clusters = clusters

    def forward(self, x: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        return segment_mean(x, labels, self.clusters)


def gather_neighbors(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, N, C], idx [B, N, K] -> x_u [B, N, K, C]."""
    b, n, c = x.shape
    k = idx.shape[-1]
    # row gather on the flattened batch: copies whole C-vectors (index_select,
    # Gather axis 0 in ONNX), several times faster on CPU than an element-wise
    # gather with a broadcast [B, N*K, C] index
    offset = (torch.arange(b, device=idx.device) * n).view(b, 1, 1)
    rows = (idx + offset).reshape(-1)
    return x.reshape(b * n, c).index_select(0, rows).reshape(b, n, k, c)


def gather_max(x: Tensor, idx: Tensor) -> Tensor:
    """max_k x[b, idx[b, v, k]] -> [B, N, C], without a [B, N, K, C] tensor.

    A running maximum over the K neighbour slots: K row gathers of [B*N, C]
    (2.5x faster than gather-then-reduce on CPU, O(N*C) memory, and the
    shape of the fused plugin that replaces it). Max is exact, so the result
    equals the reduction of :func:`gather_neighbors` bit for bit.
    """
    b, n, c = x.shape
    k = idx.shape[-1]
    offset = (torch.arange(b, device=idx.device) * n).view(b, 1, 1)
    rows = (idx + offset).reshape(b * n, k)
    flat = x.reshape(b * n, c)
    out = flat.index_select(0, rows[:, 0])
    for j in range(1, k):
        out = torch.maximum(out, flat.index_select(0, rows[:, j]))
    return out.reshape(b, n, c)


__all__ = [
    "gather_max",
    "MASK_VALUE",
    "SELF_VALUE",
    "l2_normalize",
    "kmeans",
    "kmeans_with_centroids",
    "kmeans_labels",
    "centre_tokens",
    "kmeans_assign",
    "kmeans_init_indices",
    "one_hot",
    "segment_mean",
    "knn_masked",
    "knn_padded",
    "knn_reference",
    "parts_to_dense",
    "partition_layout",
    "partitions_of",
    "gather_neighbors",
    "topk_desc",
    "KMeans",
    "PartitionedKNN",
    "SegmentMean",
    "GatherMaxRel",
    "Normalize",
]
