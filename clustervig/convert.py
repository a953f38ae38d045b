"""``cvig convert --from authors``: checkpoints trained with the authors' public ClusterViG code.

The authors' code (github dhruvashp/ClusterViG) trains the same network under other names and with
other DEGC numerics (README, "Checkpoints from the authors' code"; docs/design.md,
``numerics="authors"``). This module maps its state_dict onto this package's layout:

* names: ``backbone.{2i}`` / ``backbone.{2i+1}`` are block i's grapher / FFN, the stem is one flat
  Sequential (Conv, BN, act per layer), the G-GCN MLPs are PyG-style ``lins.0.head_list.<g>`` linear
  layers with ``norms.0.module`` BatchNorm, and GATv2 sits under ``nn_centroids.layer.layer``;
* values: the grouped linear heads become one grouped 1x1 convolution, the GATv2 attention vector
  [1, 1, C] becomes [C], and G-MRGCN's per-channel interleaved input ``[x0, r0, x1, r1, ...]``
  becomes our block-wise ``[x | r | z']`` by a fixed column permutation of the MLP weight;
* config: the variant is inferred from the weights (or checked against ``--model``), with the G-GCN
  MLP ``groups`` of the weights (their code uses 1 in every variant) and ``numerics="authors"``.

The result is a normal clustervig checkpoint with its config recorded (``save_checkpoint``).
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import click
import torch
from torch import Tensor

from .checkpoint import CheckpointError, extract_state_dict, load_state_dict, load_torch_file, save_checkpoint
from .cliutil import CTX, MODEL_NAME, check_output_file, existing_file, model_help
from .model import ClusterViG, ClusterViGConfig

# DEGC hyperparameters that the weights do not show, per published grid of the authors' variants
# (IsoClusterViG_*_n196_c4 and *_n784_c6): grid -> clusters
AUTHORS_CLUSTERS = {14: 4, 28: 6}
_STRUCTURE = ("dim", "depth", "grid", "gcn", "groups", "num_classes", "head_dim", "stem_layers", "distillation")


class ConvertError(CheckpointError):
    """An authors' checkpoint that cannot be converted (with the keys and the reason)."""


def is_authors_layout(sd: Mapping[str, Any]) -> bool:
    """True for a state_dict with the authors' key layout (``backbone.<i>....``)."""
    return any(k.startswith("backbone.") for k in sd) and not any(k.startswith("blocks.") for k in sd)


def read_authors_checkpoint(path: Path, ema: bool = False) -> Dict[str, Tensor]:
    """The model state_dict of an authors' checkpoint file.

    Their training script saves ``{"state_dict", "state_dict_ema", "optimizer", ..., "args"}`` with an
    ``argparse.Namespace``; it is read with ``weights_only=True`` and only that class allowed.
    """
    path = Path(path)
    try:
        obj = load_torch_file(path, safe_globals=[argparse.Namespace],
                              resave="re-save its state_dict with torch.save(model.state_dict(), PATH)")
    except CheckpointError as exc:
        raise ConvertError(str(exc)) from None
    if not isinstance(obj, Mapping):
        raise ConvertError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict or dict")
    if ema:
        if not isinstance(obj.get("state_dict_ema"), Mapping):
            raise ConvertError(f"--ema: checkpoint {path} has no 'state_dict_ema' entry")
        obj = obj["state_dict_ema"]
    elif "state_dict" not in obj and "model" not in obj and isinstance(obj.get("state_dict_ema"), Mapping):
        obj = obj["state_dict_ema"]
    sd = extract_state_dict(obj)
    if not is_authors_layout(sd):
        if any(k.startswith("blocks.") for k in sd):
            raise ConvertError(f"checkpoint {path} already has this package's layout (blocks.*): "
                               "use it directly (--checkpoint), no conversion needed")
        raise ConvertError(f"checkpoint {path} does not have the authors' layout (no backbone.* keys); "
                           f"first keys: {', '.join(sorted(sd)[:5])}")
    return sd


# ----------------------------------------------------------------------------------------------
# structure
# ----------------------------------------------------------------------------------------------

_LOCAL = "graphconv.layer."


def _block_ids(sd: Mapping[str, Tensor]) -> List[int]:
    return sorted({int(k.split(".")[1]) for k in sd if re.match(r"backbone\.\d+\.", k)})


def _heads(sd: Mapping[str, Tensor], prefix: str) -> List[Tensor]:
    """Weights of a LinearGrouped (``<prefix>.layer.lins.0.head_list.<g>.weight``), in group order."""
    pat = re.compile(re.escape(prefix) + r"\.layer\.lins\.0\.head_list\.(\d+)\.weight$")
    found = sorted((int(m.group(1)), v) for k, v in sd.items() if (m := pat.match(k)))
    return [v for _, v in found]


def infer_structure(sd: Mapping[str, Tensor]) -> Dict[str, Any]:
    """What the weights say: dim, depth, grid, gcn, groups, classes, head width, stem layers, distillation."""
    pe = sd.get("pos_embed")
    if pe is None or pe.ndim != 4:
        raise ConvertError("the checkpoint has no pos_embed [1, C, grid, grid]: not an isotropic ClusterViG")
    ids = _block_ids(sd)
    if not ids or ids != list(range(len(ids))) or len(ids) % 2:
        raise ConvertError(f"backbone indices {ids[:8]}... are not grapher/FFN pairs 0..2n-1")
    g0 = "backbone.0." + _LOCAL
    local = {k[len(g0):] for k in sd if k.startswith(g0)}
    if any(k.startswith("nn_centroids.") and not k.startswith("nn_centroids.layer.layer.") for k in local) or \
            not any(k.startswith("nn_centroids.layer.layer.lin_l") for k in local):
        raise ConvertError("block 0's centroid update is not GATv2 (center_conv='gat'): only GATv2 maps "
                           "onto ClusterViG's global update; keys: " + ", ".join(sorted(k for k in local if "centroid" in k)[:6]))
    if "eps" in local:
        gcn = "gin"
    elif any(k.startswith("nn_edge.") for k in local):
        gcn = "sage"
    else:
        w = _heads(sd, g0 + "nn_vertex")
        if not w:
            raise ConvertError("block 0 has no nn_vertex MLP (graphconv.layer.nn_vertex.layer.lins.0.head_list.*)")
        dim = pe.shape[1]
        cin = w[0].shape[1] * len(w)
        # mr and edge have the same weights (3C -> 2C); the checkpoint cannot tell them apart
        gcn = "mr" if cin == 3 * dim else "unknown"
    heads = _heads(sd, g0 + ("nn_edge" if gcn == "sage" else "nn_vertex"))
    n_stem = sum(1 for k, v in sd.items() if re.match(r"stem\.convs\.\d+\.weight$", k) and v.ndim == 4)
    head = sd.get("head.weight")
    pred = sd.get("prediction.1.weight")
    if head is None or pred is None:
        raise ConvertError("the checkpoint has no head.weight / prediction.1.weight (classifier)")
    return {
        "dim": int(pe.shape[1]), "grid": int(pe.shape[2]), "depth": len(ids) // 2, "gcn": gcn,
        "groups": len(heads), "num_classes": int(head.shape[0]), "head_dim": int(pred.shape[0]),
        "stem_layers": n_stem, "distillation": "dist_head.weight" in sd,
    }


# ----------------------------------------------------------------------------------------------
# key and value mapping
# ----------------------------------------------------------------------------------------------

def _mr_permutation(c: int) -> Tensor:
    """Columns of our [x | r | z'] in their interleaved [x0, r0, x1, r1, ..., z']."""
    return torch.cat([torch.arange(0, 2 * c, 2), torch.arange(1, 2 * c, 2), torch.arange(2 * c, 3 * c)])


def _grouped_conv(sd: Mapping[str, Tensor], prefix: str, used: set) -> Tuple[Tensor, Tensor]:
    """LinearGrouped heads -> one grouped 1x1 conv weight [out, in/g, 1, 1] and bias [out]."""
    ws, bs = [], []
    g = 0
    while f"{prefix}.layer.lins.0.head_list.{g}.weight" in sd:
        kw, kb = f"{prefix}.layer.lins.0.head_list.{g}.weight", f"{prefix}.layer.lins.0.head_list.{g}.bias"
        ws.append(sd[kw])
        used.add(kw)
        if kb in sd:
            bs.append(sd[kb])
            used.add(kb)
        g += 1
    w = torch.cat(ws, 0)
    b = torch.cat(bs, 0) if bs else torch.zeros(w.shape[0], dtype=w.dtype)
    return w[:, :, None, None].clone(), b.clone()


def _bn(sd: Mapping[str, Tensor], src: str, dst: str, out: Dict[str, Tensor], used: set) -> None:
    for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        k = f"{src}.{leaf}"
        if k in sd:
            out[f"{dst}.{leaf}"] = sd[k].clone()
            used.add(k)


def map_state_dict(sd: Mapping[str, Tensor], structure: Mapping[str, Any]) -> Dict[str, Tensor]:
    """The authors' state_dict in this package's names and layouts.

    Raises :class:`ConvertError` listing every key that has no counterpart, with the reason.
    """
    out: Dict[str, Tensor] = {}
    used: set = set()
    c, gcn = structure["dim"], structure["gcn"]

    def copy(src: str, dst: str) -> None:
        if src in sd:
            out[dst] = sd[src].clone()
            used.add(src)

    copy("pos_embed", "pos_embed")
    for k in sd:
        m = re.match(r"stem\.convs\.(\d+)\.(.+)$", k)
        if m:
            i, leaf = int(m.group(1)), m.group(2)
            if i % 3 in (0, 1):  # Conv, BN; index 3j+2 is the activation (no state)
                copy(k, f"stem.convs.{i // 3}.{i % 3}.{leaf}")
    for k in sd:
        if k.startswith(("prediction.", "head.", "dist_head.")):
            copy(k, k)
    for i in range(structure["depth"]):
        gsrc, fsrc = f"backbone.{2 * i}", f"backbone.{2 * i + 1}"
        gdst = f"blocks.{i}.grapher"
        for leaf in ("weight", "bias"):
            copy(f"{gsrc}.cpe.pe.{leaf}", f"{gdst}.cpe.{leaf}")
        for fc in ("fc1", "fc2"):
            copy(f"{gsrc}.{fc}.0.weight", f"{gdst}.{fc}.0.weight")
            copy(f"{gsrc}.{fc}.0.bias", f"{gdst}.{fc}.0.bias")
            _bn(sd, f"{gsrc}.{fc}.1", f"{gdst}.{fc}.1", out, used)
            copy(f"{fsrc}.{fc}.0.weight", f"blocks.{i}.ffn.{fc}.0.weight")
            copy(f"{fsrc}.{fc}.0.bias", f"blocks.{i}.ffn.{fc}.0.bias")
            _bn(sd, f"{fsrc}.{fc}.1", f"blocks.{i}.ffn.{fc}.1", out, used)
        lsrc = f"{gsrc}.{_LOCAL}"
        ldst = f"{gdst}.degc"
        gat = f"{lsrc}nn_centroids.layer.layer"
        if f"{gat}.att" in sd:
            out[f"{ldst}.gat.att"] = sd[f"{gat}.att"].reshape(-1).clone()
            used.add(f"{gat}.att")
        copy(f"{gat}.bias", f"{ldst}.gat.bias")
        for lin in ("lin_l", "lin_r"):
            copy(f"{gat}.{lin}.weight", f"{ldst}.gat.{lin}.weight")
            copy(f"{gat}.{lin}.bias", f"{ldst}.gat.{lin}.bias")
        mlps = {"nn_vertex": "nn2" if gcn == "sage" else "nn"}
        if gcn == "sage":
            mlps["nn_edge"] = "nn1"
        for src_name, dst_name in mlps.items():
            prefix = f"{lsrc}{src_name}"
            if f"{prefix}.layer.lins.0.head_list.0.weight" not in sd:
                continue
            w, b = _grouped_conv(sd, prefix, used)
            if gcn == "mr" and src_name == "nn_vertex":
                if w.shape[1] != 3 * c:
                    raise ConvertError(
                        f"block {i}: G-MRGCN MLP with {len(_heads(sd, prefix))} groups cannot be mapped: their "
                        "per-channel interleaved input [x0, r0, x1, r1, ...] crosses the group boundaries of "
                        "our block-wise [x | r | z'] (only groups=1, as in all of their variants, maps)")
                w = w[:, _mr_permutation(c)].contiguous()
            out[f"{ldst}.local.{dst_name}.0.weight"] = w
            out[f"{ldst}.local.{dst_name}.0.bias"] = b
            _bn(sd, f"{prefix}.layer.norms.0.module", f"{ldst}.local.{dst_name}.1", out, used)
        if gcn == "gin":
            copy(f"{lsrc}eps", f"{ldst}.local.eps")
            copy(f"{lsrc}delta", f"{ldst}.local.delta")
    left = sorted(set(sd) - used)
    if left:
        raise ConvertError(_unmappable(left))
    return out


def _why(key: str) -> str:
    if "nn_centroids" in key:
        return "centroid-update parameter other than GATv2's lin_l/lin_r/att/bias"
    if "relative_pos" in key or "rpe" in key:
        return "relative positional embedding (not part of ClusterViG)"
    if re.match(r"backbone\.\d+\.graphconv", key):
        return "graph-convolution parameter with no counterpart in this local update"
    if key.startswith("backbone."):
        return "block parameter with no counterpart (expected cpe.pe, fc1, fc2, graphconv)"
    return "not part of ClusterViG (stem, pos_embed, blocks, prediction, head, dist_head)"


def _unmappable(keys: List[str], limit: int = 25) -> str:
    lines = [f"{len(keys)} key(s) of the authors' checkpoint have no counterpart in ClusterViG:"]
    lines += [f"  {k}: {_why(k)}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"  ... and {len(keys) - limit} more")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------

def _registered_match(structure: Mapping[str, Any]) -> Optional[str]:
    from .registry import _VARIANTS

    for name in ("cvig_ti", "cvig_s", "cvig_b", "cvig_b_hr"):
        v = _VARIANTS[name]
        if (v.dim, v.depth, v.grid) == (structure["dim"], structure["depth"], structure["grid"]):
            return name
    return None


def _describe(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={d[k]}" for k in ("dim", "depth", "grid", "gcn", "groups", "num_classes") if k in d)


def converted_config(structure: Mapping[str, Any], model: Optional[str] = None,
                     config: Optional[Mapping[str, Any]] = None) -> Tuple[str, Dict[str, Any]]:
    """(registered base name, create_model overrides) for the converted checkpoint.

    ``model`` (``--model``) must agree with the weights on dim, depth and grid; ``config``
    (``--config``) overrides anything and is checked against the weights afterwards.
    """
    from .registry import _VARIANTS, UnknownModelError, get_config, resolve_model_name

    config = dict(config or {})
    known = {f.name for f in fields(ClusterViGConfig)} - {"name"}
    bad = sorted(set(config) - known)
    if bad:
        raise ConvertError(f"--config: unknown option(s) {bad}; valid: {sorted(known)}")
    if model is not None:
        try:
            resolve_model_name(model)
        except UnknownModelError as exc:
            raise ConvertError(f"--model: {exc}") from None
        v = _VARIANTS[model]
        want = {**{k: getattr(v, k) for k in ("dim", "depth", "grid")}, **{k: config[k] for k in ("dim", "depth", "grid") if k in config}}
        diff = [k for k in ("dim", "depth", "grid") if want[k] != structure[k]]
        if diff:
            raise ConvertError(
                f"the checkpoint is not a {model}: it has {_describe(structure)}, {model} has "
                f"{', '.join(f'{k}={want[k]}' for k in ('dim', 'depth', 'grid'))}; "
                + (f"use --model {_registered_match(structure)}" if _registered_match(structure)
                   else "give its size with --config FILE (e.g. {\"dim\": %d, \"depth\": %d, \"grid\": %d})"
                   % (structure["dim"], structure["depth"], structure["grid"])))
        base = model
    else:
        base = _registered_match(structure) or "cvig_ti"
    overrides: Dict[str, Any] = {k: structure[k] for k in _STRUCTURE if k != "gcn" or structure["gcn"] != "unknown"}
    if structure["gcn"] == "unknown" and "gcn" not in config:
        raise ConvertError("block 0's local-update MLP does not have 3C inputs: give gcn in --config")
    base_cfg = _VARIANTS[base]
    if "clusters" not in config:
        if model is not None or _registered_match(structure):
            overrides["clusters"] = base_cfg.clusters
        elif structure["grid"] in AUTHORS_CLUSTERS:
            overrides["clusters"] = AUTHORS_CLUSTERS[structure["grid"]]
        else:
            raise ConvertError(
                f"the number of clusters is not in the weights and grid {structure['grid']} is none of the "
                f"authors' variants ({', '.join(f'grid {g}: {k}' for g, k in AUTHORS_CLUSTERS.items())}): "
                'give it in --config (e.g. {"clusters": 4})')
    if base_cfg.class_names is not None and overrides["num_classes"] != base_cfg.num_classes:
        overrides["class_names"] = None
    overrides.update(config)
    overrides["numerics"] = "authors"
    if config.get("numerics", "authors") != "authors":
        raise ConvertError("--config: numerics must be 'authors' for a checkpoint of the authors' code")
    for k in ("mean", "std", "class_names"):
        if overrides.get(k) is not None:
            overrides[k] = tuple(overrides[k])
    # the image size is not in the weights: the stem must have room for its stride-2 layers
    img, grid, n_stem = overrides.get("img_size", base_cfg.img_size), overrides["grid"], structure["stem_layers"]
    ratio = math.log2(img / grid) if img > 0 and grid > 0 else 0.5
    if "img_size" not in config and (not ratio.is_integer() or ratio < 1 or ratio + 1 > n_stem):
        raise ConvertError(
            f"the image size is not in the weights and img_size {img} does not fit them (grid {grid}, a stem of "
            f"{n_stem} conv layers: log2(img_size / grid) stride-2 layers + 1 at most); give img_size in --config "
            f'(e.g. {{"img_size": {grid * 2 ** (n_stem - 1)}}} if every stem layer but the last halves the resolution)')
    try:
        get_config(base, **overrides)
    except ValueError as exc:
        raise ConvertError(f"invalid configuration: {exc}") from None
    return base, overrides


def convert_authors(sd: Mapping[str, Tensor], model: Optional[str] = None,
                    config: Optional[Mapping[str, Any]] = None) -> ClusterViG:
    """An authors' state_dict -> a loaded ClusterViG with ``numerics="authors"`` (eval mode)."""
    from .registry import create_model

    structure = infer_structure(sd)
    base, overrides = converted_config(structure, model, config)
    # G-MRGCN and G-EdgeConv have the same weights: the layout (and the column permutation) follows
    # the configured local update, mr unless --config says otherwise
    mapped = map_state_dict(sd, {**structure, "gcn": overrides["gcn"]})
    overrides = dict(overrides)
    num_classes = overrides.pop("num_classes")
    gcn = overrides.pop("gcn")
    net = create_model(base, num_classes=num_classes, gcn=gcn, **overrides)
    try:
        load_state_dict(net, mapped, source="the converted checkpoint")
    except CheckpointError as exc:
        raise ConvertError(f"{exc}\n  (the weights say: {_describe(structure)}; check --model / --config)") from None
    return net.eval()


@click.command("convert", context_settings=CTX, epilog="""
\b
Examples:
  cvig convert --from authors checkpoint.pth -o cvig_ti_authors.pth
  cvig convert --from authors model_best.pth --model cvig_s -o cvig_s_authors.pth
  cvig convert --from authors small.pth --config small.json -o small_cvig.pth
  cvig export --checkpoint cvig_ti_authors.pth --fp16 -o out/

\b
The variant is read from the weights (dim, depth, grid, local update, MLP
groups, classes) or checked against --model. The number of clusters is not
in the weights: it is the registered variant's, or 4 for a 14x14 and 6 for a
28x28 grid (the authors' variants), or --config {"clusters": N}. The
converted model computes DEGC as the authors' code (numerics="authors",
recorded in the checkpoint) except for the k-means initialisation, which is
deterministic here (README: "Checkpoints from the authors' code").
G-MRGCN and G-EdgeConv checkpoints have the same weights: mr (their default)
is assumed; give --config {"gcn": "edge"} for G-EdgeConv.
""")
@click.option("--from", "source", type=click.Choice(["authors"]), required=True,
              help="Layout of SRC: 'authors' = github dhruvashp/ClusterViG (IsoClusterViG).")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Converted checkpoint to write (.pth; written atomically).")
@click.option("--model", "model_name", type=MODEL_NAME, default=None,
              help=model_help("Registered variant the checkpoint must be (default: inferred from the weights)."))
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help='JSON object of create_model overrides for sizes not registered, e.g. {"dim": 64, "depth": 2, "groups": 1}.')
@click.option("--ema", is_flag=True, default=False,
              help="Take the EMA weights ('state_dict_ema') of a training checkpoint.")
@click.option("--json", "as_json", is_flag=True, default=False,
              help="Print the recorded config and the key count as JSON to stdout.")
def command(source: str, src: Path, output: Path, model_name: Optional[str], config_file: Optional[Path],
            ema: bool, as_json: bool) -> None:
    """Convert a checkpoint of the authors' ClusterViG code into a clustervig checkpoint."""
    existing_file(src, "checkpoint")
    check_output_file(output, "-o/--output")
    if output.resolve() == src.resolve():
        raise click.BadParameter("would overwrite the source checkpoint; choose another path", param_hint="-o/--output")
    config = None
    if config_file is not None:
        existing_file(config_file, "--config")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise click.BadParameter(f"{config_file} is not valid JSON ({exc})", param_hint="--config")
        if not isinstance(config, dict):
            raise click.BadParameter(f"{config_file} must hold a JSON object of overrides, e.g. "
                                     '{"dim": 64, "depth": 2, "groups": 1}', param_hint="--config")
    try:
        sd = read_authors_checkpoint(src, ema=ema)
        net = convert_authors(sd, model_name, config)
    except CheckpointError as exc:
        raise click.ClickException(str(exc))
    save_checkpoint(net, output, converted_from={"layout": source, "source": src.name, "keys": len(sd)})
    cfg = net.cfg.to_dict()
    if as_json:
        click.echo(json.dumps({"output": str(output), "keys": len(sd), "config": cfg}, indent=2))
    else:
        click.echo(f"{src} ({len(sd)} keys, the authors' layout) -> {output}: {cfg['name']} "
                   f"({_describe(cfg)}, clusters={cfg['clusters']}, numerics=authors)", err=False)


main = command

__all__ = ["ConvertError", "convert_authors", "converted_config", "infer_structure", "is_authors_layout",
           "map_state_dict", "read_authors_checkpoint", "command"]
