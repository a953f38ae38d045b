"""Loading and saving ClusterViG checkpoints, with errors that explain mismatches."""
from __future__ import annotations

import pickle
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .model import ClusterViG, SimpleFeaturePyramid, as_hw, grid_for, resample_pos_embed
from .utils import atomic_path

PathLike = Union[str, Path]
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "model_ema", "net")
_PREFIXES = ("module.", "_orig_mod.", "model.")
_MAX_LISTED = 25


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def _first_line(exc: BaseException, limit: int = 160) -> str:
    """``Type: first sentence of the message`` (just the type when the message is empty, e.g. EOFError())."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = text.split(". ")[0].rstrip(".")
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_torch_file(path: PathLike, what: str = "checkpoint", safe_globals: Sequence[type] = (),
                    resave: str = "save it again with torch.save") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line :class:`CheckpointError` messages that say what is
    wrong with the file and what to do: missing, a folder, empty, not a PyTorch file, truncated or corrupt, or
    holding pickled Python objects besides tensors (refused: unpickling them could run code from the file).
    ``safe_globals`` are classes the file may hold (e.g. ``argparse.Namespace``); ``resave`` ends the
    messages about damaged files."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a directory, not a file (give the .pth file inside it)")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist (check the path)")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise CheckpointError(f"{what} {path} could not be opened ({exc.strerror or exc}): check its permissions") from None
    if not head:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): the download or copy did not finish, or the save "
                              f"failed; {resave}")
    zipped = head.startswith(b"PK\x03\x04")
    if not zipped and head[:1] != b"\x80":  # neither torch.save's zip archive nor a legacy pickle
        page = ", a web page: the download saved an error page" if head.lstrip()[:1] == b"<" else ""
        raise CheckpointError(f"{what} {path} could not be read: it is not a PyTorch checkpoint (its first bytes are {head!r}"
                              f"{page}, not a zip archive or a pickle): give the .pth/.pt file written by torch.save")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # the weights-only unpickler names what it refused: a global (a class or function), a class to build or a
        # function to call; anything else it reports (an unknown operand, a bad type) is a damaged file
        if not re.search(r"GLOBAL|global:|allowlisted|unsupported class|reduce for", str(exc), re.I):
            fmt = "" if zipped else " in a legacy pickle file"
            why = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            detail = f"UnpicklingError: {why.group(1).strip()}" if why else _first_line(exc)
            raise CheckpointError(f"{what} {path} could not be read, it is truncated or corrupt ({detail}{fmt}); "
                                  f"{resave}") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        objects = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{what} {path} holds non-tensor Python objects{objects} besides its tensors and was refused: loading them "
            "could run code from the file. If you trust its source, load it with torch.load(PATH, weights_only=False), "
            "save only the model's state_dict with torch.save(state_dict, NEW.pth) and give NEW.pth") from None
    except Exception as exc:  # torch raises many types for a damaged file (RuntimeError, EOFError, KeyError, ...)
        fmt = "" if zipped else " in a legacy pickle file"
        raise CheckpointError(f"{what} {path} could not be read, it is truncated or corrupt ({_first_line(exc)}{fmt}); "
                              f"{resave}") from None


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Read a checkpoint file into a dict; one-line errors for missing, empty, corrupt or unsafe files."""
    obj = load_torch_file(path, resave="download it or save it again with torch.save")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict or dict")
    return dict(obj)


def extract_state_dict(obj: Mapping[str, Any]) -> Dict[str, Tensor]:
    """Unwrap ``{"model": ...}`` / ``{"state_dict": ...}`` and strip DDP/compile prefixes."""
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise CheckpointError("checkpoint contains no tensors (expected a state_dict)")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _fmt(keys, limit: int = _MAX_LISTED) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


_HEAD = ("prediction.", "head.", "dist_head.")


def _adapt_to_backbone(model: ClusterViG, sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A classifier's (or a deeper backbone's) weights for a ``features_only`` model: its head and the blocks
    after the last one the backbone returns are not part of it, and are left out."""
    kept = len(model.blocks)
    out = {}
    for k, v in sd.items():
        if k.startswith(_HEAD):
            continue
        if k.startswith("blocks.") and k.split(".")[1].isdigit() and int(k.split(".")[1]) >= kept:
            continue
        out[k] = v
    return out


def _resample_position(model: ClusterViG, sd: Dict[str, Tensor]) -> None:
    """A position embedding of another token grid (a checkpoint trained at another image size) is resampled to
    the model's grid, bicubically (:func:`~clustervig.model.resample_pos_embed`); noted in ``model.load_notes``."""
    pe = sd.get("pos_embed")
    own = model.pos_embed
    if pe is None or pe.ndim != 4 or pe.shape[:2] != own.shape[:2] or pe.shape[2:] == own.shape[2:]:
        return
    sd["pos_embed"] = resample_pos_embed(pe, tuple(own.shape[2:]))
    model.load_notes["pos_embed_resampled"] = {"from_grid": list(pe.shape[2:]), "to_grid": list(own.shape[2:]),
                                               "method": "bicubic, antialias (timm's resample_abs_pos_embed)"}


def load_state_dict(model: ClusterViG, sd: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Load ``sd`` into ``model`` strictly, adapting only the distillation head, the position embedding's
    grid and, for a backbone, what a backbone does not have.

    A checkpoint without ``dist_head.*`` drops the model's distillation head
    (logits = class head); one with it adds the head to a model built
    without it (logits = mean of both heads, as the model was trained).
    A checkpoint trained at another image size has a position embedding of
    another token grid: it is resampled to the model's grid (bicubic, as
    timm's ViTs), recorded in ``model.load_notes["pos_embed_resampled"]``.
    A backbone (``features_only``) takes a classifier's checkpoint without
    its head; its feature pyramid, which no ClusterViG checkpoint trains,
    keeps its initialisation when the checkpoint has none (listed in
    ``model.load_notes["untrained"]``).
    """
    sd = dict(sd)
    if any(k.startswith("backbone.") for k in sd) and not any(k.startswith("blocks.") for k in sd):
        raise CheckpointError(
            f"{source} has the layout of the authors' ClusterViG code (github dhruvashp/ClusterViG: "
            "backbone.* keys), which computes DEGC differently: convert it first with "
            "`cvig convert --from authors SRC -o DST` and use DST (it records its model)")
    model.load_notes = {}
    if model.cfg.features_only:
        sd = _adapt_to_backbone(model, sd)
    else:
        has_dist = any(k.startswith("dist_head.") for k in sd)
        if model.dist_head is not None and not has_dist:
            model.remove_distillation_head()
        elif model.dist_head is None and has_dist:
            w = sd["dist_head.weight"]
            model.dist_head = nn.Conv2d(w.shape[1], w.shape[0], 1, bias="dist_head.bias" in sd)
            model.cfg = replace(model.cfg, distillation=True)
    _resample_position(model, sd)
    own = model.state_dict()
    # BN's num_batches_tracked is bookkeeping, absent from some exports
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    untrained = [k for k in SimpleFeaturePyramid.UNTRAINED if k in own and k not in sd]
    if untrained:  # the pyramid's layers: no classifier checkpoint has them; they keep their initialisation
        optional |= set(untrained)
        model.load_notes["untrained"] = untrained
    missing = set(own) - set(sd) - optional
    unexpected = set(sd) - set(own)
    wrong = {k for k in set(own) & set(sd) if own[k].shape != sd[k].shape}
    if missing or unexpected or wrong:
        hint = _hint(model, sd)
        n = 6 if hint else _MAX_LISTED  # with a diagnosis, a few keys illustrate it; the full lists would bury it
        lines = [f"{source} does not match {model.cfg.name} (dim={model.cfg.dim}, depth={model.cfg.depth}, "
                 f"gcn={model.cfg.gcn}, num_classes={model.cfg.num_classes}):"]
        if hint:
            lines.append("  hint: " + hint)
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_fmt(missing, n)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected, n)}")
        if wrong:
            lines.append(f"  shape mismatches ({len(wrong)}): "
                         + _fmt([f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong], n))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(sd, strict=False)


def _hint(model: ClusterViG, sd: Mapping[str, Tensor]) -> Optional[str]:
    w = sd.get("head.weight")
    if w is not None and w.shape[0] != model.cfg.num_classes:
        return (f"the checkpoint has {w.shape[0]} classes: --num-classes {w.shape[0]} on the command line, "
                f"num_classes={w.shape[0]} in Python")
    pe = sd.get("pos_embed")
    if pe is not None and pe.ndim == 4 and pe.shape[1] != model.cfg.dim:
        return f"the checkpoint has dim={pe.shape[1]} (token grid {pe.shape[2]}x{pe.shape[3]}): choose the matching variant"
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if depth and depth != model.cfg.depth:
        return f"the checkpoint has {depth} blocks, the model {model.cfg.depth}: choose the matching variant"
    kinds = _gcn_kinds(sd)
    if kinds and model.cfg.gcn not in kinds:
        return f"the local-update (gcn) type differs: the checkpoint fits gcn={' or '.join(kinds)}"
    return None


def _gcn_kinds(sd: Mapping[str, Tensor]) -> list:
    """Which local updates a state_dict's block-0 keys fit (mr and edge share a layout)."""
    local = {k.split(".degc.local.", 1)[1] for k in sd if k.startswith("blocks.0.grapher.degc.local.")}
    if not local:
        return []
    if "eps" in local:
        return ["gin"]
    if any(k.startswith("nn1.") for k in local):
        return ["sage"]
    return ["mr", "edge"]


def load_checkpoint(model: ClusterViG, path: PathLike) -> Dict[str, Any]:
    """Load a checkpoint file into ``model``; returns the file's other entries (metadata)."""
    obj = read_checkpoint(path)
    load_state_dict(model, extract_state_dict(obj), source=f"checkpoint {path}")
    return {k: v for k, v in obj.items() if not isinstance(v, (Mapping, Tensor)) or k in ("config", "metrics")}


def save_checkpoint(model: ClusterViG, path: PathLike, **meta: Any) -> Path:
    """Write ``{"model": state_dict, "config": cfg, **meta}`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "config": model.cfg.to_dict(), **meta}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def model_from_checkpoint(path: PathLike, form: str = "static", **overrides: Any) -> ClusterViG:
    """Build the model recorded in a checkpoint saved by :func:`save_checkpoint` and load it."""
    return _from_record(Path(path), read_checkpoint(path), form, **overrides)


def _from_record(path: Path, obj: Mapping[str, Any], form: str = "static", **overrides: Any) -> ClusterViG:
    from .registry import create_model

    name, kwargs = _record_kwargs(path, obj.get("config"), form, overrides)
    model = create_model(name, **kwargs)
    load_state_dict(model, extract_state_dict(obj), source=f"checkpoint {path}")
    return model


def _record_kwargs(path: Path, cfg: Any, form: str, overrides: Dict[str, Any]):
    """``(name, create_model keyword arguments)`` of a recorded config with ``overrides``; another
    ``img_size`` keeps the recorded stride (its grid follows)."""
    if not isinstance(cfg, Mapping) or "name" not in cfg:
        raise CheckpointError(
            f"checkpoint {path} records no model config; name the variant explicitly (e.g. --model cvig_ti)"
        )
    cfg = dict(cfg)
    name = cfg.pop("name")
    if "img_size" in overrides and "grid" not in overrides and "img_size" in cfg and "grid" in cfg:
        # another input size at the recorded model's stride (which may not be its variant's: cvig convert --config)
        stride = as_hw(cfg["img_size"])[0] // as_hw(cfg["grid"])[0]
        try:
            cfg["grid"] = grid_for(overrides["img_size"], stride, f"the model of checkpoint {path}")
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
    cfg.update(form=form, **overrides)
    for key in ("mean", "std"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    cfg.setdefault("num_classes", 1000)
    cfg.setdefault("gcn", "mr")
    return name, cfg


def model_config(name: Optional[str], checkpoint: Optional[PathLike], num_classes: Optional[int] = None,
                 **overrides: Any):
    """The config :func:`build_model` builds for these options, without building the model or loading weights:
    command lines check sizes and outputs (``img_size``, ``out_indices``, ...) with it before any work.
    Raises ValueError (a :class:`CheckpointError` for the file) naming the problem."""
    from .registry import get_config

    extra = {"num_classes": num_classes} if num_classes is not None else {}
    if checkpoint is not None:
        cfg = recorded_config(checkpoint)
        if cfg is not None:
            rec_name, kwargs = _record_kwargs(Path(checkpoint), cfg, "static", overrides)
            return get_config(rec_name, **kwargs)
    if name is None:
        raise CheckpointError("give --model NAME, or --checkpoint of a file saved by clustervig (it records its model)")
    return get_config(name, **extra, **overrides)


def recorded_config(path: PathLike) -> Optional[Dict[str, Any]]:
    """The model config a clustervig checkpoint records (None for other checkpoints)."""
    cfg = read_checkpoint(path).get("config")
    return dict(cfg) if isinstance(cfg, Mapping) and "name" in cfg else None


def build_model(name: Optional[str], checkpoint: Optional[PathLike], num_classes: Optional[int] = None,
                **overrides: Any) -> ClusterViG:
    """The model of ``--model NAME --checkpoint PATH --num-classes N``, as every cvig command builds it.

    A checkpoint saved by clustervig records its variant and class count: it is rebuilt from that
    record, and a ``name`` or ``num_classes`` that contradicts the record is an error naming both
    (rather than a list of mismatching keys, or a silently ignored option). Other checkpoints need
    ``name`` and are loaded into ``create_model(name, num_classes=...)``.
    """
    from .registry import create_model

    if checkpoint is None:
        if name is None:
            raise CheckpointError("give --model NAME, or --checkpoint of a file saved by clustervig (it records its model)")
        return create_model(name, num_classes=num_classes, **overrides)
    path = Path(checkpoint)
    obj = read_checkpoint(path)
    cfg = obj.get("config")
    if isinstance(cfg, Mapping) and "name" in cfg:
        if name is not None and name != cfg["name"]:
            raise CheckpointError(
                f"checkpoint {path} holds a {cfg['name']} model (recorded in the file), not {name}: omit --model "
                f"(the checkpoint says which variant it is) or give --model {cfg['name']}")
        rec_classes = cfg.get("num_classes", 1000)
        if num_classes is not None and num_classes != rec_classes:
            raise CheckpointError(
                f"checkpoint {path} has {rec_classes} classes (recorded in the file), not --num-classes {num_classes}: "
                "omit --num-classes (a classifier head of another size would have no trained weights)")
        return _from_record(path, obj, **overrides)
    if name is None:
        raise CheckpointError(f"checkpoint {path} records no model config (it was not saved by clustervig): "
                              "name the variant with --model NAME")
    model = create_model(name, num_classes=num_classes, **overrides)
    load_state_dict(model, extract_state_dict(obj), source=f"checkpoint {path}")
    return model
