"""Named ClusterViG variants and ``create_model`` (timm-style registry)."""
from __future__ import annotations

import difflib
from dataclasses import fields, replace
from pathlib import Path
from typing import Dict, List, Optional, Union

from .model import ClusterViG, ClusterViGConfig, grid_for

# Table III of the paper (and docs/design.md section 2). cvig_nano is ours: small
# enough for tests and demos on a 2-core CPU, same structure otherwise.
_VARIANTS: Dict[str, ClusterViGConfig] = {
    "cvig_ti": ClusterViGConfig(name="cvig_ti", dim=192, depth=12, grid=14, clusters=4, groups=1),
    "cvig_s": ClusterViGConfig(name="cvig_s", dim=320, depth=16, grid=14, clusters=4, groups=4),
    "cvig_b": ClusterViGConfig(name="cvig_b", dim=640, depth=16, grid=14, clusters=4, groups=4),
    "cvig_b_hr": ClusterViGConfig(name="cvig_b_hr", dim=640, depth=16, grid=28, clusters=6, groups=4),
    "cvig_nano": ClusterViGConfig(
        name="cvig_nano", dim=32, depth=3, grid=14, clusters=4, groups=1, head_dim=64, k_min=9, k_max=18
    ),
    # A trained model at the paper's resolution and depth (224 px, 14x14 tokens, 12 blocks, kappa 4,
    # K 9..18, G-MRGCN + GATv2), narrow enough to train on a 2-core CPU: the 16 classes of the
    # photo-patches data set (clustervig.photo_data; `cvig train-photos`). A 224-px crop saved as PNG
    # goes through the deployment preprocessing to exactly the tensor it was trained or tested on.
    "cvig_photos": ClusterViGConfig(
        name="cvig_photos", dim=48, depth=12, grid=14, clusters=4, groups=1, head_dim=128, num_classes=16,
        crop_pct=1.0, interpolation="bilinear",  # its crops are 224-px images already: read as trained, uncropped
        class_names=("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
                     "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "retina", "rocket"),
    ),
    # A real trained model for CPU-sized work (INT8 calibration, measured accuracy):
    # scikit-learn's 8x8 handwritten digits upsampled to 32x32 (PIL bilinear).
    "cvig_digits": ClusterViGConfig(
        name="cvig_digits", dim=64, depth=4, grid=8, img_size=32, clusters=4, groups=1, head_dim=128,
        stem_layers=3, num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0,
        interpolation="bilinear", class_names=tuple(str(i) for i in range(10)),
    ),
}

# Figures the paper reports (Table III): params in M, GMACs without the G-GCN MLP.
PAPER_TABLE3 = {
    "cvig_ti": {"params_m": 11.5, "gmacs": 1.3},
    "cvig_s": {"params_m": 28.2, "gmacs": 4.2},
    "cvig_b": {"params_m": 104.8, "gmacs": 16.2},
    "cvig_b_hr": {"params_m": 105.2, "gmacs": 62.3},
}


def list_models() -> List[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_VARIANTS)


class UnknownModelError(ValueError):
    """A variant name that is not registered; the message suggests the nearest registered names."""


def resolve_model_name(name: str) -> str:
    """``name`` if it is a registered variant, else :class:`UnknownModelError` naming the nearest ones.

    The one place variant names are checked: :func:`create_model`, :func:`get_config` and every ``cvig``
    subcommand's ``--model`` (``clustervig.cliutil.MODEL_NAME``) go through it."""
    if name in _VARIANTS:
        return name
    key = str(name).strip().lower().replace("-", "_")
    close = [key] if key in _VARIANTS else difflib.get_close_matches(key, list_models(), n=2, cutoff=0.75)
    if not close and f"cvig_{key}" in _VARIANTS:  # "ti", "b_hr": the name without its prefix
        close = [f"cvig_{key}"]
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UnknownModelError(f"unknown model {name!r}: {hint}registered variants: {', '.join(list_models())}")


def get_config(name: str, **overrides) -> ClusterViGConfig:
    """The variant's config with ``overrides`` applied (unknown keys are errors)."""
    resolve_model_name(name)
    known = {f.name for f in fields(ClusterViGConfig)} - {"name"}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown option(s) {bad} for {name}; valid: {sorted(known)}")
    if overrides.get("class_names") is not None:
        overrides["class_names"] = tuple(overrides["class_names"])
    base = _VARIANTS[name]
    if "img_size" in overrides and "grid" not in overrides:
        # another input size keeps the variant's stride: the token grid follows (H/s, W/s)
        overrides["grid"] = grid_for(overrides["img_size"], base.stride, name)
    if overrides.get("features_only"):
        overrides["class_names"] = None  # a backbone has no classes
    cfg = replace(base, **overrides)
    if cfg.class_names is not None and len(cfg.class_names) != cfg.num_classes:
        raise ValueError(f"{len(cfg.class_names)} class names given for {cfg.num_classes} classes")
    cfg.validate()
    return cfg


def create_model(
    name: str,
    pretrained: Optional[Union[str, Path, bool]] = None,
    num_classes: Optional[int] = None,
    gcn: str = "mr",
    form: str = "static",
    kernels: bool = False,
    **overrides,
) -> ClusterViG:
    """Build a ClusterViG variant.

    Args:
        name: one of :func:`list_models` (``cvig_ti``, ``cvig_s``, ``cvig_b``,
            ``cvig_b_hr``, ``cvig_nano``, ``cvig_digits``, ``cvig_photos``); another name raises
            :class:`UnknownModelError` (a ``ValueError``) suggesting the nearest.
        pretrained: path to a checkpoint to load (plain state_dict,
            ``{"model": ...}`` or ``{"state_dict": ...}``, DDP ``module.``
            prefixes, with or without the distillation head). No weights are
            downloaded: pass a local file.
        num_classes: classifier outputs (default: the variant's, 1000 for the
            ImageNet variants, 10 for ``cvig_digits``).
        gcn: local update: ``mr`` (G-MRGCN, default), ``edge``, ``sage``, ``gin``.
        form: ``static`` (exportable, fixed shapes) or ``reference``.
        kernels: run k-means, k-NN, centroid means and G-MRGCN's gather-max on
            the plugin kernels (``torch.ops.cvig``; host build on CPU, CUDA
            build on GPU): inference only, static form (:meth:`ClusterViG.set_kernels`).
        **overrides: any :class:`ClusterViGConfig` field, e.g. ``knn="padded"``,
            ``capacity=64``, ``kmeans_iters=10``, ``drop_path=0.1``. Among them:
            ``img_size=(H, W)`` (or one int): the input size; the token grid is (H/s, W/s) at the
            variant's stride s (16 for the paper's variants), and a checkpoint trained at another
            size loads with its position embedding resampled bicubically to that grid.
            ``features_only=True`` (timm's convention): a backbone whose forward returns the maps
            ``[B, C, H/s, W/s]`` after the blocks ``out_indices`` (default ``(-1,)``, the last; negative
            counts from the end) instead of logits; ``feature_pyramid=True`` turns that one map into
            strides s/2, s, 2s, 4s (:class:`~clustervig.model.SimpleFeaturePyramid`, its transposed
            convolution untrained). ``model.feature_info`` names the outputs.

    Example:
        >>> model = create_model("cvig_ti", num_classes=10).eval()
        >>> backbone = create_model("cvig_s", img_size=(800, 1344), features_only=True, out_indices=(3, 7, 11, 15))
        >>> [f["name"] for f in backbone.feature_info]
        ['block3', 'block7', 'block11', 'block15']
    """
    if pretrained is True:
        raise ValueError(
            "pretrained=True: no ClusterViG weights can be downloaded by this package; "
            "pass the path of a local checkpoint instead"
        )
    if num_classes is not None:
        overrides["num_classes"] = num_classes
        base = _VARIANTS.get(name)
        if base is not None and base.class_names is not None and num_classes != base.num_classes:
            overrides.setdefault("class_names", None)  # the variant's names no longer apply
    cfg = get_config(name, gcn=gcn, form=form, **overrides)
    model = ClusterViG(cfg)
    if pretrained:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, pretrained)
    if kernels:
        model.set_kernels(True)
    return model
