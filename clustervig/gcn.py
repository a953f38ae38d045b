"""Global (GATv2) and local (G-GCN) updates of DEGC.

Implements docs/design.md sections 2.5 and 2.6. Each local update has two
code paths over the same parameters:

* ``forward_static(x, idx, valid, zt)``: fixed shapes, neighbours given as a
  self-filled ``[B, N, K]`` index tensor with a validity mask;
* ``forward_reference(x, parts, zt)``: uneven partitions, each given as
  ``(image, members, neighbours[|p|, K_p])``, exactly as the paper's
  Algorithm 2 arranges them.

Tokens are ``[B, N, C]``; MLPs are 1x1 convolutions over ``[B, C, N, 1]`` so
that checkpoints keep the conv layout of the authors' code. Every
concatenation keeps the channel order written in Table II.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .graph import MASK_VALUE, GatherMaxRel, gather_max, gather_neighbors

Part = Tuple[int, Tensor, Tensor]  # (image index, members [P], neighbours [P, K_p])


def with_global(parts: List[Tensor], zt: Optional[Tensor]) -> List[Tensor]:
    """Append z' to a concatenation unless the global update is disabled (ViG baseline)."""
    return parts + [zt] if zt is not None else parts


def conv_mlp(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
    """Grouped 1x1 conv + BN + GELU (the MLP of every G-GCN)."""
    if cin % groups or cout % groups:
        raise ValueError(f"MLP {cin}->{cout} channels is not divisible into {groups} groups")
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, groups=groups, bias=True),
        nn.BatchNorm2d(cout),
        nn.GELU(),
    )


def tokens_to_conv(t: Tensor) -> Tensor:
    """[B, N, C] -> [B, C, N, 1]."""
    return t.transpose(1, 2).unsqueeze(-1)


def conv_to_tokens(x: Tensor) -> Tensor:
    """[B, C, N, 1] -> [B, N, C]."""
    return x.squeeze(-1).transpose(1, 2)


def scatter_parts(values: Sequence[Tensor], parts: Sequence[Part], b: int, n: int) -> Tensor:
    """Put per-partition rows back into token order: -> [B, N, C]."""
    c = values[0].shape[-1]
    out = values[0].new_zeros(b, n, c)
    for val, (bi, members, _) in zip(values, parts):
        out[bi, members] = val
    return out


class GATv2(nn.Module):
    """Single-head GATv2 over the complete graph of non-empty partitions (Eq. 2-3).

    z'_i = sum_j alpha_ji W_L z_j + b,
    alpha_ji = softmax_j(a^T LeakyReLU(W_R z_i + W_L z_j)).
    """

    def __init__(self, channels: int, out_channels: int | None = None, negative_slope: float = 0.2) -> None:
        super().__init__()
        out = out_channels or channels
        self.lin_l = nn.Linear(channels, out, bias=True)
        self.lin_r = nn.Linear(channels, out, bias=True)
        self.att = nn.Parameter(torch.empty(out))
        self.bias = nn.Parameter(torch.zeros(out))
        self.negative_slope = negative_slope
        nn.init.normal_(self.att, std=out**-0.5)

    def forward(self, z: Tensor, nonempty: Optional[Tensor]) -> Tensor:
        """z [B, k, C], nonempty [B, k] bool (None: every node takes part) -> z' [B, k, C'] (static form)."""
        xl = self.lin_l(z)
        xr = self.lin_r(z)
        pair = F.leaky_relu(xr.unsqueeze(2) + xl.unsqueeze(1), self.negative_slope)  # [B, i, j, C']
        score = torch.matmul(pair, self.att)  # [B, i, j]
        if nonempty is not None:
            score = torch.where(nonempty.unsqueeze(1), score, torch.full_like(score, -MASK_VALUE))
        alpha = torch.softmax(score, dim=-1)
        return torch.matmul(alpha, xl) + self.bias

    def forward_reference(self, z: Tensor) -> Tensor:
        """z [k', C] of the non-empty partitions of one image -> z' [k', C']."""
        xl = self.lin_l(z)
        xr = self.lin_r(z)
        out = []
        for i in range(z.shape[0]):
            e = F.leaky_relu(xr[i] + xl, self.negative_slope) @ self.att  # over j
            alpha = torch.softmax(e, dim=0)
            out.append((alpha.unsqueeze(1) * xl).sum(0) + self.bias)
        return torch.stack(out)


class LocalUpdate(nn.Module):
    """Base class: a G-GCN mapping C -> C_out with the partition's z'."""

    def forward(self, x: Tensor, zt: Optional[Tensor], idx: Optional[Tensor] = None,
                valid: Optional[Tensor] = None, parts: Optional[List[Part]] = None) -> Tensor:
        """Static form with ``idx``/``valid``, reference form with ``parts``.

        Going through ``__call__`` gives the ONNX export its ``degc/local/`` scope.
        """
        if parts is not None:
            return self.forward_reference(x, parts, zt)
        return self.forward_static(x, idx, valid, zt)

    def forward_static(self, x: Tensor, idx: Tensor, valid: Tensor, zt: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_reference(self, x: Tensor, parts: List[Part], zt: Tensor) -> Tensor:
        raise NotImplementedError


class GMRGCN(LocalUpdate):
    """G-MRGCN: MLP([x_v, max_u (x_u - x_v), z'])."""

    def __init__(self, cin: int, cout: int, groups: int = 1, use_global: bool = True) -> None:
        super().__init__()
        self.nn = conv_mlp((3 if use_global else 2) * cin, cout, groups)
        self.gather_max_rel = GatherMaxRel()

    def _update(self, x: Tensor, rel: Tensor, zt: Optional[Tensor]) -> Tensor:
        return conv_to_tokens(self.nn(tokens_to_conv(torch.cat(with_global([x, rel], zt), dim=-1))))

    def forward_static(self, x, idx, valid, zt):
        # subtracting after the max saves a [B, N, K, C] subtraction; self-filled
        # slots repeat x_v itself, which is already a neighbour
        return self._update(x, self.gather_max_rel(x, idx), zt)

    def forward_reference(self, x, parts, zt):
        rel = [(x[bi, nb] - x[bi, m].unsqueeze(1)).amax(dim=1) for bi, m, nb in parts]
        return self._update(x, scatter_parts(rel, parts, *x.shape[:2]), zt)


class GEdgeConv(LocalUpdate):
    """G-EdgeConv: max_u MLP([x_v, x_u - x_v, z']).

    The MLP's convolution is linear, so it is evaluated per token, not per
    edge: W [x_v | x_u - x_v | z'] = (W_x - W_r) x_v + W_z z' + W_r x_u.
    Only BN + GELU + max run per edge. This is the same function with
    K times fewer multiply-adds, and it makes the per-edge numbers identical
    in every layout (dense, padded, per partition), which keeps the static and
    reference forms bit-for-bit equal in eval mode.
    """

    def __init__(self, cin: int, cout: int, groups: int = 1, use_global: bool = True) -> None:
        super().__init__()
        self.nn = conv_mlp((3 if use_global else 2) * cin, cout, groups)
        self.cin = cin

    def _projections(self, x: Tensor, zt: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Per-token parts of the edge pre-activation: (self part a_v, neighbour part r_u)."""
        conv = self.nn[0]
        g = conv.groups
        w = conv.weight.flatten(1)  # [C_out, 3C/g] grouped
        blocks = w.reshape(g, w.shape[0] // g, w.shape[1])
        # block-diagonal [C_out, 3C] (an outer product with I_g: ONNX has no block_diag)
        eye = torch.eye(g, dtype=w.dtype, device=w.device).view(g, 1, g, 1)
        dense = (blocks.unsqueeze(2) * eye).reshape(w.shape[0], g * w.shape[1])
        c = self.cin
        w_x, w_r = dense[:, :c], dense[:, c : 2 * c]
        a = torch.matmul(x, (w_x - w_r).t()) + conv.bias
        if zt is not None:
            a = a + torch.matmul(zt, dense[:, 2 * c :].t())
        r = torch.matmul(x, w_r.t())
        return a, r

    def _edge_act(self, pre: Tensor) -> Tensor:
        """BN + GELU of edge pre-activations [..., C_out] (channels last)."""
        bn, act = self.nn[1], self.nn[2]
        shape = pre.shape
        # as [1, C_out, E, 1] so that BatchNorm2d (and its train-mode statistics) sees every edge
        h = bn(pre.reshape(1, -1, shape[-1]).permute(0, 2, 1).unsqueeze(-1))
        return act(h).squeeze(-1).permute(0, 2, 1).reshape(shape)

    def forward_static(self, x, idx, valid, zt):
        a, r = self._projections(x, zt)
        pre = a.unsqueeze(2) + gather_neighbors(r, idx)  # [B, N, K, C_out]
        # a self-filled slot repeats the self edge, so the max is unchanged
        return self._edge_act(pre).amax(dim=2)

    def forward_reference(self, x, parts, zt):
        a, r = self._projections(x, zt)
        pre = [a[bi, m].unsqueeze(1) + r[bi, nb] for bi, m, nb in parts]  # [P, K_p, C_out] each
        # one BN over every edge of every partition (unrolled, as Algorithm 2)
        flat = self._edge_act(torch.cat([p.reshape(-1, p.shape[-1]) for p in pre]))
        out, start = [], 0
        for p in pre:
            n_edges = p.shape[0] * p.shape[1]
            out.append(flat[start : start + n_edges].reshape(p.shape).amax(dim=1))
            start += n_edges
        return scatter_parts(out, parts, *x.shape[:2])


class GGraphSAGE(LocalUpdate):
    """G-GraphSAGE: MLP_Psi([x_v, max_u MLP_Phi(x_u), z'])."""

    def __init__(self, cin: int, cout: int, groups: int = 1, use_global: bool = True) -> None:
        super().__init__()
        self.nn1 = conv_mlp(cin, cin, groups)  # Phi
        self.nn2 = conv_mlp((3 if use_global else 2) * cin, cout, groups)  # Psi

    def _update(self, x: Tensor, agg: Tensor, zt: Optional[Tensor]) -> Tensor:
        return conv_to_tokens(self.nn2(tokens_to_conv(torch.cat(with_global([x, agg], zt), dim=-1))))

    def forward_static(self, x, idx, valid, zt):
        phi = conv_to_tokens(self.nn1(tokens_to_conv(x)))
        return self._update(x, gather_max(phi, idx), zt)

    def forward_reference(self, x, parts, zt):
        phi = conv_to_tokens(self.nn1(tokens_to_conv(x)))
        agg = [phi[bi, nb].amax(dim=1) for bi, _, nb in parts]
        return self._update(x, scatter_parts(agg, parts, *x.shape[:2]), zt)


class GGIN(LocalUpdate):
    """G-GIN: MLP((1+eps) x_v + sum_u x_u + (1+delta) z'); the sum skips padding."""

    def __init__(self, cin: int, cout: int, groups: int = 1, use_global: bool = True) -> None:
        super().__init__()
        self.nn = conv_mlp(cin, cout, groups)
        self.eps = nn.Parameter(torch.zeros(1))
        self.delta = nn.Parameter(torch.zeros(1)) if use_global else None

    def _update(self, x: Tensor, agg: Tensor, zt: Optional[Tensor]) -> Tensor:
        h = (1 + self.eps) * x + agg
        if zt is not None:
            h = h + (1 + self.delta) * zt
        return conv_to_tokens(self.nn(tokens_to_conv(h)))

    def forward_static(self, x, idx, valid, zt):
        xu = gather_neighbors(x, idx) * valid.unsqueeze(-1).to(x.dtype)
        return self._update(x, xu.sum(dim=2), zt)

    def forward_reference(self, x, parts, zt):
        agg = [x[bi, nb].sum(dim=1) for bi, _, nb in parts]
        return self._update(x, scatter_parts(agg, parts, *x.shape[:2]), zt)


LOCAL_UPDATES = {"mr": GMRGCN, "edge": GEdgeConv, "sage": GGraphSAGE, "gin": GGIN}
GCN_ALIASES = {
    "mr": "mr", "mrgcn": "mr", "g-mrgcn": "mr",
    "edge": "edge", "edgeconv": "edge", "g-edgeconv": "edge",
    "sage": "sage", "graphsage": "sage", "g-graphsage": "sage",
    "gin": "gin", "g-gin": "gin",
}


def make_local_update(gcn: str, cin: int, cout: int, groups: int, use_global: bool = True) -> LocalUpdate:
    key = GCN_ALIASES.get(gcn.lower())
    if key is None:
        raise ValueError(f"unknown local update {gcn!r}; choose one of {sorted(LOCAL_UPDATES)}")
    return LOCAL_UPDATES[key](cin, cout, groups, use_global)
