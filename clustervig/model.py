"""ClusterViG, isotropic variants (docs/design.md sections 2 and 3).

One ``nn.Module`` tree, two forms of DEGC that share every parameter:

* ``form="reference"``: uneven partitions, per-partition k-NN and updates, as
  the paper's Algorithm 2; clear and obviously right, not exported;
* ``form="static"``: fixed shapes only (masked top-k or padded partitions),
  the form that is exported to ONNX and TensorRT.

The form can be switched on a built model with :meth:`ClusterViG.set_form`;
the ``state_dict`` is identical.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .gcn import GATv2, make_local_update, GCN_ALIASES
from .graph import KMeans, Normalize, PartitionedKNN, SegmentMean, knn_reference

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMS = ("static", "reference")
KNN_MODES = ("masked", "padded")
# "paper": DEGC as docs/design.md section 2; "authors": as the authors' public code computes it
# (docs/design.md, numerics="authors"): tokens centred per DEGC, k-means on the centred tokens
# without L2 normalisation, GATv2 on the k-means centroids. Needed for checkpoints trained with it.
NUMERICS = ("paper", "authors")


@dataclass(frozen=True)
class ClusterViGConfig:
    """Everything that defines a variant; recorded in exports and checkpoints."""

    name: str
    dim: int
    depth: int
    grid: int = 14
    clusters: int = 4
    groups: int = 4
    num_classes: int = 1000
    img_size: int = 224
    k_min: int = 9
    k_max: int = 18
    kmeans_iters: int = 20
    gcn: str = "mr"
    global_update: bool = True  # False + clusters=1: the isotropic ViG baseline (full k-NN)
    distillation: bool = True
    head_dim: int = 1024
    stem_layers: int = 5
    drop_path: float = 0.0
    dropout_head: float = 0.0
    form: str = "static"
    knn: str = "auto"  # auto: masked for N <= 1024, else padded
    capacity: Optional[int] = None  # padded partitions; None = N (exact)
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    numerics: str = "paper"
    class_names: Optional[Tuple[str, ...]] = field(default=None, compare=False)

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def neighbors(self) -> List[int]:
        """K per block: int() of a float32 linspace from k_min to k_max (authors' rule)."""
        return [int(v) for v in torch.linspace(self.k_min, self.k_max, self.depth, device="cpu").tolist()]

    @property
    def knn_mode(self) -> str:
        if self.knn == "auto":
            return "masked" if self.tokens <= 1024 else "padded"
        return self.knn

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.class_names is not None:
            d["class_names"] = list(self.class_names)
        return d

    def validate(self) -> None:
        ratio = math.log2(self.img_size / self.grid)
        if not ratio.is_integer() or ratio < 1:
            raise ValueError(f"img_size {self.img_size} / grid {self.grid} must be a power of two >= 2")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.knn not in KNN_MODES + ("auto",):
            raise ValueError(f"knn must be 'masked', 'padded' or 'auto', got {self.knn!r}")
        if self.gcn.lower() not in GCN_ALIASES:
            raise ValueError(f"unknown gcn {self.gcn!r}; choose one of mr, edge, sage, gin")
        if not 1 <= self.clusters <= self.tokens:
            raise ValueError(f"clusters must be in 1..{self.tokens}, got {self.clusters}")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {self.numerics!r}")
        if self.kmeans_iters < 0:
            raise ValueError("kmeans_iters must be >= 0")


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = False):
        layers: List[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.GELU())
        super().__init__(*layers)


class Stem(nn.Module):
    """log2(img/grid) stride-2 and the rest stride-1 3x3 Conv+BN+GELU, then Conv+BN."""

    def __init__(self, dim: int, img_size: int, grid: int, layers: int = 5) -> None:
        super().__init__()
        halvings = int(math.log2(img_size / grid))
        growth = max(halvings + 1, layers) - 1  # conv layers before the last one
        convs: List[nn.Module] = []
        cin = 3
        for i in range(growth):
            cout = max(dim // 2 ** (growth - 1 - i), 64)
            convs.append(ConvBN(cin, cout, 3, stride=2 if i < halvings else 1, act=True))
            cin = cout
        convs.append(ConvBN(cin, dim, 3))
        self.convs = nn.Sequential(*convs)

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at inference)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class DEGC(nn.Module):
    """Dynamic Efficient Graph Convolution: [B, C, H, W] -> [B, 2C, H, W]."""

    def __init__(self, cfg: ClusterViGConfig, k: int) -> None:
        super().__init__()
        c = cfg.dim
        self.clusters = cfg.clusters
        self.k = k
        self.form = cfg.form
        self.numerics = cfg.numerics
        authors = cfg.numerics == "authors"
        self.norm = Normalize(centre=authors)
        self.kmeans = KMeans(cfg.clusters, cfg.kmeans_iters, centroids=authors)
        self.knn = PartitionedKNN(k, cfg.clusters, cfg.knn_mode, cfg.capacity)
        self.centroids = SegmentMean(cfg.clusters)
        self.gat = GATv2(c, c) if cfg.global_update else None
        self.local = make_local_update(cfg.gcn, c, 2 * c, cfg.groups, cfg.global_update)
        self.kernels = False  # ClusterViG.set_kernels: the static form on the plugin kernels

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # [B, N, C]
        if self.numerics == "authors":
            # the centred tokens replace X everywhere in this DEGC; k-means runs on them
            # (not on Xn), and GATv2 takes its centroids
            t, xn = self.norm(t)
            kin = t
        else:
            xn = self.norm(t)
            kin = xn
        if self.kernels and self.form == "static" and not _tracing():
            out = self._forward_kernels(t, xn)
        else:
            if self.numerics == "authors":
                labels, centres = self.kmeans(kin.detach())
            else:
                labels, centres = self.kmeans(kin.detach()), None
            if self.form == "reference":
                out = self._forward_reference(t, xn, labels, centres)
            else:
                out = self._forward_static(t, xn, labels, centres)
        return out.transpose(1, 2).reshape(b, -1, h, w)

    def _global_update(self, t: Tensor, labels: Tensor, centres: Optional[Tensor]) -> Tensor:
        """z' [B, k, C] of the partitions: GATv2 over the partition means (paper) or over all k
        k-means centroids (authors: their complete graph of centres includes empty clusters)."""
        if centres is not None:
            return self.gat(centres, None)
        z, counts = self.centroids(t, labels)
        return self.gat(z, counts > 0)

    def _forward_kernels(self, t: Tensor, xn: Tensor) -> Tensor:
        # The static form with k-means, k-NN and the centroid mean on the plugin
        # kernels (torch.ops.cvig.*: host build on CPU tensors, CUDA build on CUDA
        # tensors). The k-NN is exact, as the padded layout with P = N.
        from clustervig.plugins import torch_ops as ops

        xd = xn.detach()
        centres = None
        if self.numerics == "authors":  # k-means on the centred tokens, with its centroids (empty -> 0)
            labels, _, centres = ops.kmeans_centroids(t.detach(), self.clusters, self.kmeans.iters, True)
        else:
            labels, _ = ops.kmeans(xd, self.clusters, self.kmeans.iters)
        idx, valid = ops.partitioned_knn(xd, labels, min(self.k, xd.shape[1]))
        zt = None
        if self.gat is not None:
            if centres is not None:
                zp = self.gat(centres, None)
            else:
                z, counts = ops.segment_mean(t, labels, self.clusters)
                zp = self.gat(z, counts > 0)
            zt = torch.gather(zp, 1, labels.long().unsqueeze(-1).expand(-1, -1, zp.shape[-1]))
        return self.local(t, zt, idx=idx.long(), valid=valid.bool())

    def _forward_static(self, t: Tensor, xn: Tensor, labels: Tensor, centres: Optional[Tensor] = None) -> Tensor:
        idx, valid = self.knn(xn, labels)
        zt = None
        if self.gat is not None:
            zp = self._global_update(t, labels, centres)
            # z'_{label(v)}: a row gather (own one-hot-free subgraph, so the centroid
            # scope stays self-contained for the segment-mean plugin)
            zt = torch.gather(zp, 1, labels.unsqueeze(-1).expand(-1, -1, zp.shape[-1]))
        return self.local(t, zt, idx=idx, valid=valid)

    def _forward_reference(self, t: Tensor, xn: Tensor, labels: Tensor, centres: Optional[Tensor] = None) -> Tensor:
        # Partition-wise graph construction and local update, as Algorithm 2.
        # Centroids and the global update share the static code: k-means is
        # chaotic in its input, so the two forms must hand identical numbers to
        # the next block's clustering; the GATv2-over-non-empty-partitions
        # semantics are checked separately (GATv2.forward_reference).
        parts = knn_reference(xn, labels, self.k)
        zt = None
        if self.gat is not None:
            zp = self._global_update(t, labels, centres)
            zt = torch.zeros_like(t)
            for bi, members, _ in parts:
                zt[bi, members] = zp[bi, labels[bi, members[0]]]
        return self.local(t, zt, parts=parts)


def _tracing() -> bool:
    # ONNX export and tracing record the pure static graph (the plugin graph comes from surgery)
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


class Grapher(nn.Module):
    """y = x + fc2(DEGC(fc1(x + DWConv7x7(x))))  (Eq. 5)."""

    def __init__(self, cfg: ClusterViGConfig, k: int, drop_path: float) -> None:
        super().__init__()
        c = cfg.dim
        self.cpe = nn.Conv2d(c, c, 7, padding=3, groups=c, bias=True)
        self.fc1 = ConvBN(c, c)
        self.degc = DEGC(cfg, k)
        self.fc2 = ConvBN(2 * c, c)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        y = x + self.cpe(x)
        y = self.fc2(self.degc(self.fc1(y)))
        return x + self.drop_path(y)


class FFN(nn.Module):
    """z = y + BN(Conv(GELU(BN(Conv(y)))))  (Eq. 6), hidden 4C."""

    def __init__(self, dim: int, hidden: int, drop_path: float) -> None:
        super().__init__()
        self.fc1 = ConvBN(dim, hidden, act=True)
        self.fc2 = ConvBN(hidden, dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.fc2(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ClusterViGConfig, k: int, drop_path: float) -> None:
        super().__init__()
        self.grapher = Grapher(cfg, k, drop_path)
        self.ffn = FFN(cfg.dim, 4 * cfg.dim, drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn(self.grapher(x))


class ClusterViG(nn.Module):
    """Isotropic ClusterViG classifier.

    ``forward`` returns logits ``[B, classes]``; with a distillation head the
    inference logits are the mean of both heads and training returns the
    pair ``(cls, dist)``. :meth:`forward_features` gives the backbone map
    ``[B, C, grid, grid]``.
    """

    def __init__(self, cfg: ClusterViGConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.stem = Stem(cfg.dim, cfg.img_size, cfg.grid, cfg.stem_layers)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.dim, cfg.grid, cfg.grid))
        dpr = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[Block(cfg, k, p) for k, p in zip(cfg.neighbors, dpr)])
        self.prediction = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(cfg.dim, cfg.head_dim, 1, bias=True),
            nn.BatchNorm2d(cfg.head_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout_head),
        )
        self.head = nn.Conv2d(cfg.head_dim, cfg.num_classes, 1, bias=True)
        self.dist_head: Optional[nn.Conv2d] = (
            nn.Conv2d(cfg.head_dim, cfg.num_classes, 1, bias=True) if cfg.distillation else None
        )
        self.reset_parameters()

    # -- construction helpers -------------------------------------------------
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def form(self) -> str:
        return self.cfg.form

    def set_form(self, form: str, knn: Optional[str] = None, capacity: Optional[int] = None) -> "ClusterViG":
        """Switch between the reference and static forms (and k-NN layout) in place."""
        cfg = replace(self.cfg, form=form, knn=knn or self.cfg.knn, capacity=capacity if capacity is not None else self.cfg.capacity)
        cfg.validate()
        self.cfg = cfg
        for blk in self.blocks:
            degc = blk.grapher.degc
            degc.form = cfg.form
            degc.knn.mode = cfg.knn_mode
            degc.knn.capacity = cfg.capacity
        return self

    def set_kernels(self, on: bool = True) -> "ClusterViG":
        """Run k-means, k-NN, centroid means and G-MRGCN's gather-max on the plugin kernels (inference only).

        ``torch.ops.cvig.*`` over ``libcvig_kernels_host.so`` for CPU tensors and
        ``libcvig_kernels.so`` for CUDA tensors: the code the TensorRT plugins
        run, as a fast PyTorch path. Needs ``form="static"``; the k-NN is exact
        (a padded ``capacity`` below N is not applied). ONNX export always
        records the pure graph. Backward through the kernels raises.
        """
        if on and self.cfg.form != "static":
            raise ValueError("kernels=True needs form='static' (the reference form is the loop implementation)")
        if on and self.cfg.capacity is not None and self.cfg.capacity < self.cfg.tokens:
            import warnings

            warnings.warn(f"kernels=True computes the exact partitioned k-NN: capacity={self.cfg.capacity} is not applied")
        for degc in self.degc_modules():
            degc.kernels = bool(on)
            gmr = getattr(degc.local, "gather_max_rel", None)
            if gmr is not None:
                gmr.kernels = bool(on)
        return self

    @property
    def kernels(self) -> bool:
        return any(d.kernels for d in self.degc_modules())

    def remove_distillation_head(self) -> None:
        self.dist_head = None
        self.cfg = replace(self.cfg, distillation=False)

    def degc_modules(self) -> List[DEGC]:
        return [blk.grapher.degc for blk in self.blocks]

    # -- forward ----------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x) + self.pos_embed)

    def forward_head(self, feats: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        h = self.prediction(feats)
        cls = self.head(h).flatten(1)
        if self.dist_head is None:
            return cls
        dist = self.dist_head(h).flatten(1)
        if self.training:
            return cls, dist
        return (cls + dist) / 2

    def forward(self, x: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        expected = (3, self.cfg.img_size, self.cfg.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{self.cfg.name} expects images [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got {list(x.shape)}; resize/crop to {self.cfg.img_size}x{self.cfg.img_size} first"
            )
        return self.forward_head(self.forward_features(x))
