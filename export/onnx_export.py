"""PyTorch static form -> ONNX (docs/design.md section 4).

``export_onnx`` traces the static form with the TorchScript exporter (its
module-scoped names are what makes stable names possible), renames nodes,
records the preprocessing and model config as metadata, runs
``onnx.checker`` with full shape inference, and writes atomically.
"""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import onnx
import torch
from torch import nn

from clustervig.model import ClusterViG, as_hw
from clustervig.preprocess import transform_spec
from clustervig.utils import atomic_path

from .naming import rename_graph

MIN_OPSET = 17
INPUT, OUTPUT = "images", "logits"


class ExportError(RuntimeError):
    """Export failed for a reason the user can act on."""


@dataclass
class BatchSpec:
    """Static batch (min == opt == max) or a dynamic range min:opt:max."""

    min: int = 1
    opt: int = 1
    max: int = 1

    @property
    def dynamic(self) -> bool:
        return not (self.min == self.opt == self.max)

    @classmethod
    def parse(cls, text: str) -> "BatchSpec":
        try:
            parts = [int(p) for p in text.split(":")]
        except ValueError:
            raise ValueError(f"batch range {text!r} must be MIN:OPT:MAX integers, e.g. 1:8:32") from None
        if len(parts) != 3 or not (1 <= parts[0] <= parts[1] <= parts[2]):
            raise ValueError(f"batch range {text!r} must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}" if self.dynamic else str(self.opt)


class _Normalizing(nn.Module):
    """Puts (x - mean) / std inside the graph: the input is then RGB in [0, 1]."""

    def __init__(self, model: ClusterViG) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(model.cfg.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.cfg.std).view(1, 3, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def atomic_save(model: onnx.ModelProto, path: Path) -> None:
    """Serialise to a temp file beside ``path`` and rename: no partial artifact on failure."""
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def check_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx.checker (full) + strict shape inference; returns the shape-inferred model."""
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # checker raises several types
        raise ExportError(f"the exported graph fails onnx.checker: {exc}") from None


def export_onnx(
    model: ClusterViG,
    path: Path,
    batch: BatchSpec = BatchSpec(),
    opset: int = MIN_OPSET,
    normalize_in_graph: bool = False,
    extra_metadata: Optional[dict] = None,
    simplify: bool = True,
) -> onnx.ModelProto:
    """Export the static form of ``model`` to ``path`` and return the checked ONNX model."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too low: ClusterViG needs opset >= {MIN_OPSET} (use --opset {MIN_OPSET})")
    if model.form != "static":
        model.set_form("static")
    model = model.eval()
    cfg = model.cfg
    net: nn.Module = (_Normalizing(model) if normalize_in_graph else model).eval()
    x = torch.zeros(batch.opt, 3, *cfg.img_hw)
    buf = io.BytesIO()
    names = output_names(cfg)
    dynamic_axes = {name: {0: "batch"} for name in [INPUT] + names} if batch.dynamic else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings on shape arithmetic are expected here
        torch.onnx.export(
            net, (x,), buf, dynamo=False, opset_version=opset, input_names=[INPUT], output_names=names,
            dynamic_axes=dynamic_axes, do_constant_folding=True,
        )
    onx = onnx.load_from_string(buf.getvalue())
    set_output_shapes(onx, cfg, batch)
    prefix = "model." if normalize_in_graph else ""
    rename_graph(onx, [prefix + n for n, _ in model.named_modules()] + (["model"] if normalize_in_graph else []))
    if normalize_in_graph:  # drop the wrapper's "model." prefix so names are the same in both variants
        for node in onx.graph.node:
            if node.name.startswith("model."):
                node.name = node.name[len("model."):]
    if simplify:
        onx = simplify_graph(onx)
    meta = {
        "clustervig.config": json.dumps(cfg.to_dict()),
        "clustervig.preprocess": json.dumps({**transform_spec(cfg), "normalize_in_graph": normalize_in_graph}),
        "clustervig.batch": str(batch),
        "clustervig.precision": "fp32",
        **(extra_metadata or {}),
    }
    if cfg.features_only:  # a backbone: its maps in output order (name, channels, stride, [C, h, w])
        meta["clustervig.outputs"] = json.dumps(cfg.feature_outputs())
    set_metadata(onx, meta)
    onx.producer_name = "clustervig-trt"
    checked = check_model(onx)
    atomic_save(onx, path)
    return checked


def simplify_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants and drop dead nodes (onnx-graphsurgeon); node names are kept.

    The unrolled k-means leaves many shape/constant subgraphs; folding removes
    ~25% of the nodes without changing a single output bit.
    """
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup().toposort()
    out = gs.export_onnx(graph)
    out.producer_name = model.producer_name
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    return out


def set_metadata(model: onnx.ModelProto, meta: dict) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for k, v in meta.items():
        if k in existing:
            existing[k].value = v
        else:
            p = model.metadata_props.add()
            p.key, p.value = k, v


def get_metadata(model: onnx.ModelProto) -> dict:
    return {p.key: p.value for p in model.metadata_props}


def set_output_shapes(model: onnx.ModelProto, cfg, batch: BatchSpec) -> None:
    """Declare every output's shape: ``batch`` (a dynamic axis) or the static batch, then [classes] or a map's
    [C, h, w]. The exporter leaves a backbone's map sizes symbolic (``Addblock0_dim_2``) with a dynamic batch."""
    outs = cfg.feature_outputs()
    shapes = [[cfg.num_classes]] if outs is None else [o["shape"] for o in outs]
    for o, shape in zip(model.graph.output, shapes):
        dims = o.type.tensor_type.shape.dim
        del dims[:]
        first = dims.add()
        if batch.dynamic:
            first.dim_param = "batch"
        else:
            first.dim_value = batch.opt
        for v in shape:
            dims.add().dim_value = int(v)


def output_names(cfg) -> List[str]:
    """The graph's outputs: ``logits`` for a classifier, a backbone's maps by name (``block15``; ``p3``..``p6``
    of the feature pyramid) in the order :meth:`~clustervig.ClusterViGConfig.feature_outputs` gives."""
    outs = cfg.feature_outputs()
    return [OUTPUT] if outs is None else [o["name"] for o in outs]


def io_shape(batch: BatchSpec, img_size) -> Tuple:
    """The input shape ``[B, 3, H, W]`` (``img_size``: S for S x S, or (H, W))."""
    h, w = as_hw(img_size)
    return (batch.opt, 3, h, w)
