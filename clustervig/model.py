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
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
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

Size = Union[int, Tuple[int, int]]


def as_hw(size) -> Tuple[int, int]:
    """``224`` -> ``(224, 224)``; ``(800, 1344)`` or ``[800, 1344]`` -> ``(800, 1344)``."""
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise ValueError(f"a size is one integer or two (H, W), got {list(size)}")
        return int(size[0]), int(size[1])
    return int(size), int(size)


def _compact(size):
    """The stored form of a size: one int when square (as every variant records it), else an (H, W) tuple."""
    h, w = as_hw(size)
    return h if h == w else (h, w)


def fmt_hw(size) -> str:
    h, w = as_hw(size)
    return f"{h}x{w}"


def grid_for(img_size, stride: int, what: str = "the model") -> Size:
    """The token grid of an image of ``img_size`` at the stem's ``stride``; a ValueError naming the fix when the
    stride does not divide H and W. (H, W) images give an (H/s, W/s) grid, square ones one int."""
    h, w = as_hw(img_size)
    if h < 1 or w < 1 or h % stride or w % stride:
        def near(v: int) -> int:
            return max(stride, (2 * v + stride) // (2 * stride) * stride)
        raise ValueError(
            f"img_size {fmt_hw(img_size)} is not a multiple of {what}'s stride {stride} (its stem halves the image "
            f"{int(math.log2(stride))} times): give H and W divisible by {stride}, the nearest being "
            f"{fmt_hw((near(h), near(w)))}")
    return _compact((h // stride, w // stride))


@dataclass(frozen=True)
class ClusterViGConfig:
    """Everything that defines a variant; recorded in exports and checkpoints."""

    name: str
    dim: int
    depth: int
    grid: Size = 14  # token grid: one int (square) or (H/s, W/s)
    clusters: int = 4
    groups: int = 4
    num_classes: int = 1000
    img_size: Size = 224  # input: one int (square) or (H, W); the stem's stride s = img_size / grid
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
    # backbone (timm's features_only convention): forward returns the maps after the blocks in out_indices
    # (default: the last), [B, C, H/s, W/s] each, instead of logits; feature_pyramid turns the one map of
    # out_indices into strides s/2, s, 2s, 4s (SimpleFeaturePyramid). The head is not built.
    features_only: bool = False
    out_indices: Optional[Tuple[int, ...]] = None
    feature_pyramid: bool = False

    def __post_init__(self) -> None:
        # JSON records give lists; a square (H, W) is stored as the one int every variant records
        for key in ("img_size", "grid"):
            v = getattr(self, key)
            if isinstance(v, (tuple, list)) and len(v) == 2:
                object.__setattr__(self, key, _compact(v))
        if isinstance(self.out_indices, int) and not isinstance(self.out_indices, bool):
            object.__setattr__(self, "out_indices", (self.out_indices,))
        elif self.out_indices is not None:
            object.__setattr__(self, "out_indices", tuple(int(i) for i in self.out_indices))

    @property
    def img_hw(self) -> Tuple[int, int]:
        """Input (H, W)."""
        return as_hw(self.img_size)

    @property
    def grid_hw(self) -> Tuple[int, int]:
        """Token grid (H/s, W/s); tokens are ordered row by row."""
        return as_hw(self.grid)

    @property
    def stride(self) -> int:
        """Pixels per token side: the stem halves the image log2(stride) times."""
        return self.img_hw[0] // self.grid_hw[0]

    @property
    def tokens(self) -> int:
        gh, gw = self.grid_hw
        return gh * gw

    @property
    def feature_blocks(self) -> Tuple[int, ...]:
        """Blocks whose outputs a backbone returns (``out_indices``, negative ones counted from the end)."""
        idx = self.out_indices if self.out_indices is not None else (-1,)
        return tuple(i + self.depth if i < 0 else i for i in idx)

    def feature_outputs(self) -> Optional[List[Dict]]:
        """A backbone's outputs in order: ``name``, ``channels``, ``stride`` (pixels per output cell) and
        ``shape`` ``[C, h, w]`` of one image; None for a classifier. The exported graph's output names."""
        if not self.features_only:
            return None
        gh, gw = self.grid_hw
        if not self.feature_pyramid:
            return [{"name": f"block{i}", "channels": self.dim, "stride": self.stride, "shape": [self.dim, gh, gw]}
                    for i in self.feature_blocks]
        out = []
        for scale, ch, (h, w) in zip((2, 1, 0.5, 0.25), (self.dim // 2, self.dim, self.dim, self.dim),
                                     SimpleFeaturePyramid.sizes(gh, gw)):
            stride = int(self.stride / scale)
            out.append({"name": f"p{int(math.log2(stride))}", "channels": ch, "stride": stride, "shape": [ch, h, w]})
        return out

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
        (h, w), (gh, gw) = self.img_hw, self.grid_hw
        if min(h, w, gh, gw) < 1 or h % gh or w % gw or not math.log2(h // gh).is_integer() or h // gh < 2:
            raise ValueError(f"img_size {fmt_hw(self.img_size)} / grid {fmt_hw(self.grid)} must be a power of two >= 2 "
                             "(the stem's stride): give img_size alone, its grid follows from the variant's stride")
        if h // gh != w // gw:
            raise ValueError(f"img_size {fmt_hw(self.img_size)} and grid {fmt_hw(self.grid)} give no single stride "
                             f"({h // gh} and {w // gw}): give img_size alone, its grid follows from the variant's stride")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.knn not in KNN_MODES + ("auto",):
            raise ValueError(f"knn must be 'masked', 'padded' or 'auto', got {self.knn!r}")
        if self.gcn.lower() not in GCN_ALIASES:
            raise ValueError(f"unknown gcn {self.gcn!r}; choose one of mr, edge, sage, gin")
        if self.clusters < 1:
            raise ValueError(f"clusters must be >= 1, got {self.clusters}")
        if self.clusters > self.tokens:
            raise ValueError(
                f"img_size {fmt_hw(self.img_size)} gives a {gh}x{gw} token grid at stride {self.stride}: {self.tokens} "
                f"tokens, fewer than the {self.clusters} clusters (k-means partitions) of {self.name}; give a larger "
                f"image (at least {self.clusters} tokens, e.g. {fmt_hw(self.stride * math.ceil(math.sqrt(self.clusters)))}) "
                "or fewer clusters")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {self.numerics!r}")
        if self.kmeans_iters < 0:
            raise ValueError("kmeans_iters must be >= 0")
        if not self.features_only:
            if self.out_indices is not None or self.feature_pyramid:
                raise ValueError("out_indices and feature_pyramid describe a backbone's outputs: add features_only=True")
            return
        idx = self.out_indices if self.out_indices is not None else (-1,)
        bad = [i for i in idx if not -self.depth <= i < self.depth]
        if not idx or bad:
            raise ValueError(f"out_indices {list(idx)}: {self.name} has blocks 0..{self.depth - 1} (or -1..-{self.depth} "
                             f"from the end); {'none given' if not idx else f'{bad} out of range'}")
        blocks = self.feature_blocks
        if list(blocks) != sorted(set(blocks)):
            raise ValueError(f"out_indices {list(idx)} must name distinct blocks in increasing order, e.g. "
                             f"{sorted(set(blocks))}")
        if self.feature_pyramid:
            if len(blocks) != 1:
                raise ValueError(f"feature_pyramid turns one block's map into four scales, got out_indices {list(idx)}: "
                                 "give one block (default: the last)")
            if min(gh, gw) < 2:
                raise ValueError(f"feature_pyramid needs a token grid of at least 2x2 (its stride-{2 * self.stride} "
                                 f"level halves it), got {gh}x{gw}: give a larger img_size")


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
    """log2(stride) stride-2 and the rest stride-1 3x3 Conv+BN+GELU, then Conv+BN."""

    def __init__(self, dim: int, stride: int, layers: int = 5) -> None:
        super().__init__()
        halvings = int(math.log2(stride))
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


def resample_pos_embed(pos_embed: Tensor, grid) -> Tensor:
    """A learned position embedding ``[1, C, h, w]`` resampled to the token grid ``grid`` (int or (H, W)).

    Bicubic with antialiasing (``F.interpolate(..., mode="bicubic", antialias=True)``, the resampling of
    timm's ``resample_abs_pos_embed``; it equals PIL's BICUBIC resize of each channel), computed once when
    a checkpoint trained at another size is loaded, so the exported graph holds a constant of the new
    grid. At the same grid the embedding is returned unchanged.
    """
    size = as_hw(grid)
    if tuple(pos_embed.shape[-2:]) == size:
        return pos_embed
    out = F.interpolate(pos_embed.detach().float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.to(pos_embed.dtype)


class SimpleFeaturePyramid(nn.Module):
    """One stride-s map of an isotropic backbone -> four maps at strides s/2, s, 2s, 4s (ViTDet's simple
    feature pyramid, without its output convolutions: an FPN-style neck attaches to these).

    s/2: a 2x2 transposed convolution with stride 2 to C/2 channels; s: the map itself; 2s: 2x2 max pooling
    with stride 2; 4s: the 2s map subsampled by a max pooling of kernel 1 and stride 2 (detectron2's
    ``LastLevelMaxPool``: ceil(h/2) rows). The transposed convolution is the only layer with weights and is
    NOT trained by any ClusterViG checkpoint: it keeps its initialisation (PyTorch's default for
    ``ConvTranspose2d``, seeded like the rest of the model) until a detector trains it.
    """

    UNTRAINED = ("pyramid.up.weight", "pyramid.up.bias")

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)
        self.down = nn.MaxPool2d(kernel_size=2, stride=2)
        self.subsample = nn.MaxPool2d(kernel_size=1, stride=2)

    @staticmethod
    def sizes(h: int, w: int) -> List[Tuple[int, int]]:
        """Output (h, w) per level for an input map of h x w."""
        h2, w2 = h // 2, w // 2
        return [(2 * h, 2 * w), (h, w), (h2, w2), ((h2 + 1) // 2, (w2 + 1) // 2)]

    def forward(self, x: Tensor) -> List[Tensor]:
        down = self.down(x)
        return [self.up(x), x, down, self.subsample(down)]


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
    """Isotropic ClusterViG: a classifier, or with ``features_only`` a backbone.

    Classifier: ``forward`` returns logits ``[B, classes]``; with a distillation head the
    inference logits are the mean of both heads and training returns the
    pair ``(cls, dist)``. :meth:`forward_features` gives the last block's map
    ``[B, C, H/s, W/s]``.

    Backbone (``features_only=True``, timm's convention): ``forward`` returns a list of maps, one per
    block of ``out_indices`` (``[B, C, H/s, W/s]``), or the four levels of :class:`SimpleFeaturePyramid`
    (``feature_pyramid=True``); :attr:`feature_info` names them. No head is built, and blocks after the
    last one returned are not built either.

    Inputs are ``[B, 3, H, W]`` with ``(H, W) = cfg.img_hw``, any size the stem's stride divides. A
    checkpoint trained at another size loads with its position embedding resampled to this grid
    (:func:`resample_pos_embed`).
    """

    def __init__(self, cfg: ClusterViGConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.stem = Stem(cfg.dim, cfg.stride, cfg.stem_layers)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.dim, *cfg.grid_hw))
        dpr = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()
        blocks = [Block(cfg, k, p) for k, p in zip(cfg.neighbors, dpr)]  # K and drop rates of the full depth
        # registered in this order (stem, pos_embed, blocks, head...): module order is the initialisation order
        # of reset_parameters, so a seed gives the weights it always gave
        self.blocks = nn.Sequential(*(blocks[: max(cfg.feature_blocks) + 1] if cfg.features_only else blocks))
        self.prediction: Optional[nn.Sequential] = None
        self.head: Optional[nn.Conv2d] = None
        self.dist_head: Optional[nn.Conv2d] = None
        self.pyramid: Optional[SimpleFeaturePyramid] = None
        if cfg.features_only:
            if cfg.feature_pyramid:
                self.pyramid = SimpleFeaturePyramid(cfg.dim)
        else:
            self.prediction = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(cfg.dim, cfg.head_dim, 1, bias=True),
                nn.BatchNorm2d(cfg.head_dim),
                nn.GELU(),
                nn.Dropout(cfg.dropout_head),
            )
            self.head = nn.Conv2d(cfg.head_dim, cfg.num_classes, 1, bias=True)
            if cfg.distillation:
                self.dist_head = nn.Conv2d(cfg.head_dim, cfg.num_classes, 1, bias=True)
        self.reset_parameters()
        # what loading a checkpoint changed or could not fill (checkpoint.load_state_dict; the export report)
        self.load_notes: Dict[str, object] = {}

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

    @property
    def feature_info(self) -> List[Dict]:
        """A backbone's outputs in order, timm-style: ``num_chs``, ``reduction`` (stride), ``module`` and the
        output ``name`` (also the exported graph's output name); empty for a classifier."""
        outs = self.cfg.feature_outputs() or []
        modules = ([f"blocks.{i}" for i in self.cfg.feature_blocks] if not self.cfg.feature_pyramid
                   else ["pyramid.up", f"blocks.{self.cfg.feature_blocks[0]}", "pyramid.down", "pyramid.subsample"])
        return [{"name": o["name"], "num_chs": o["channels"], "reduction": o["stride"], "module": m}
                for o, m in zip(outs, modules)]

    # -- forward ----------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """The map after the last built block, ``[B, C, H/s, W/s]``."""
        return self.blocks(self.stem(x) + self.pos_embed)

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> List[Tensor]:
        """The maps after the blocks ``indices`` (increasing), ``[B, C, H/s, W/s]`` each."""
        want = set(indices)
        x = self.stem(x) + self.pos_embed
        outs: List[Tensor] = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in want:
                outs.append(x)
        return outs

    def forward_head(self, feats: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        h = self.prediction(feats)
        cls = self.head(h).flatten(1)
        if self.dist_head is None:
            return cls
        dist = self.dist_head(h).flatten(1)
        if self.training:
            return cls, dist
        return (cls + dist) / 2

    def forward(self, x: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor], List[Tensor]]:
        h, w = self.cfg.img_hw
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, h, w):
            raise ValueError(
                f"{self.cfg.name} expects images [B, 3, {h}, {w}], got {list(x.shape)}; resize/crop to {h}x{w} "
                "(H x W) first, or build the model for that size (img_size=(H, W))"
            )
        if self.cfg.features_only:
            feats = self.forward_intermediates(x, self.cfg.feature_blocks)
            return self.pyramid(feats[-1]) if self.pyramid is not None else feats
        return self.forward_head(self.forward_features(x))
